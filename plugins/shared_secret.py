"""Schemes that send the secret itself instead of a signature: `token` and `basic`.

Nothing here binds the body to the secret (a captured request can be replayed and altered), so prefer a
signing scheme whenever the sender offers one. Every configured secret is compared, in constant time and
as SHA-256 digests so that not even a secret's length shows in the timing.

    provider: token     # Authorization: Bearer <secret>, or options: {header: X-Gitlab-Token}
    provider: basic     # Authorization: Basic base64(user:password); each secret is `user:password`
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping

from pydantic import model_validator

from gateway import hookimpl
from gateway.config import Source
from gateway.providers import Provider, any_digest_matches, unauthorized
from plugins.hmac_generic import FieldMappedProvider, FieldOptions, HeaderName, require_header

AUTHORIZATION = "authorization"


def _fingerprint(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _text_bytes(text: str) -> bytes:
    # Lone surrogates cannot arrive over HTTP; surrogatepass keeps such text from raising.
    return text.encode("utf-8", "surrogatepass")


def _basic_credentials(secret: str) -> str:
    """`user:password` as RFC 7617 sends it: standard base64 of its UTF-8 bytes."""
    return base64.b64encode(secret.encode()).decode()


def _require_credential(expected: list[bytes], offered: bytes) -> None:
    if not any_digest_matches(expected, [_fingerprint(offered)]):
        raise unauthorized("invalid_signature", "the credential matches no configured secret")


class TokenOptions(FieldOptions):
    # The header holding the token; with Authorization it is `<scheme> <token>`.
    header: HeaderName = AUTHORIZATION
    # Bearer by default with Authorization; none (the raw token) with any other header.
    scheme: str | None = None

    @model_validator(mode="after")
    def _default_scheme(self) -> TokenOptions:
        if self.scheme is None:
            self.scheme = "Bearer" if self.header == AUTHORIZATION else ""
        if any(char.isspace() for char in self.scheme):
            raise ValueError(f"scheme {self.scheme!r} must be one word, such as Bearer")
        # Matched in either case, over ASCII letters only: Unicode's lower() would make the Kelvin sign a
        # `k`, so a scheme holding one would accept a word it does not say.
        if not (self.scheme.isascii() and self.scheme.isprintable()):
            raise ValueError(
                f"scheme {self.scheme!r} is not printable ASCII, as a header's word such as Bearer is"
            )
        return self


class TokenProvider(FieldMappedProvider):
    name = "token"
    description = "a shared token: Authorization: Bearer <secret>, or the raw secret in a chosen header"
    Options = TokenOptions
    options: TokenOptions

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        for index, secret in enumerate(self.secrets):
            # A token an HTTP header cannot carry would never match: say so now, not at the first request.
            if not (secret.isascii() and secret.isprintable()) or secret != secret.strip() or " " in secret:
                raise ValueError(
                    f"secrets[{index}] cannot be sent in the {self.options.header} header: "
                    "use printable ASCII without spaces"
                )
        self.expected = [_fingerprint(secret.encode()) for secret in self.secrets]
        # The header is the secret itself: it is never stored with the event (Authorization never is).
        self.secret_headers = frozenset({self.options.header})
        self.single_headers |= self.secret_headers  # one token

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        header = self.options.header
        value = require_header(headers, header, header).strip()
        if self.options.scheme:
            scheme, _, value = value.partition(" ")
            if not (scheme.isascii() and scheme.lower() == self.options.scheme.lower()):
                raise unauthorized("invalid_signature", f"expected {header}: {self.options.scheme} <token>")
            value = value.strip()
        _require_credential(self.expected, _text_bytes(value))

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        token = f"{self.options.scheme} {self.secrets[0]}" if self.options.scheme else self.secrets[0]
        return {**self.field_headers(event_id), self.options.header: token}


class BasicProvider(FieldMappedProvider):
    name = "basic"
    description = "HTTP basic authentication; each secret is user:password"

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        for index, secret in enumerate(self.secrets):
            user, colon, password = secret.partition(":")
            if not user or not colon or not secret.isprintable():
                raise ValueError(f"secrets[{index}] must be user:password (printable, the user without ':')")
            # `user:${PASSWORD:-}` with the variable unset is `user:`, which anyone can send. An empty slot
            # is dropped (Source), but this one still names a user: refuse it.
            if not password:
                raise ValueError(
                    f"secrets[{index}] has an empty password: anyone could send it "
                    "(an unset ${VAR:-} leaves `user:`)"
                )
        # The base64 text is compared, not what it decodes to: other spellings of the same bytes (altered
        # padding bits) are refused, as for every signature.
        self.expected = [_fingerprint(_basic_credentials(secret).encode()) for secret in self.secrets]
        self.single_headers |= {AUTHORIZATION}  # one credential

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        scheme, _, encoded = require_header(headers, AUTHORIZATION, "Authorization").strip().partition(" ")
        if scheme.lower() != "basic":
            raise unauthorized("invalid_signature", "expected Authorization: Basic <base64 user:password>")
        _require_credential(self.expected, _text_bytes(encoded.strip()))

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        return {
            **self.field_headers(event_id),
            "Authorization": f"Basic {_basic_credentials(self.secrets[0])}",
        }


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [TokenProvider, BasicProvider]
