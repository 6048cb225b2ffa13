"""Svix / Standard Webhooks signatures (Consignease uses them).

Signed content is `{id}.{timestamp}.{body}`. The signature header holds space-separated entries, several
during key rotation:

- `v1,<base64>`: HMAC-SHA256 keyed by the base64 part of a `whsec_` secret;
- `v1a,<base64>`: an ed25519 signature, checked with a `whpk_<base64 public key>` secret (or the public
  half of a `whsk_<base64 private key>` secret, which the sender's side signs with).

A source may list any mix of whsec_, whpk_ and whsk_ secrets. `svix` reads svix-* (or webhook-*) headers;
`standard-webhooks` reads only webhook-* headers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway import hookimpl
from gateway.config import Source
from gateway.events import Event
from gateway.providers import (
    PAYLOAD_TYPE,
    Provider,
    any_digest_matches,
    bad_request,
    header_text,
    hmac_digest,
    parse_timestamp,
    require_text,
    unauthorized,
)
from plugins.hmac_generic import (
    MAX_SIGNATURES,
    check_timestamp,
    decode_digest,
    iso_now,
    read_epoch,
    signature_entries,
    text_bytes,
    wire_bytes,
    without_leading_zeros,
)

# cryptography costs about 6 MB of resident memory and only v1a (ed25519) keys need it: it is imported when
# a whpk_/whsk_ secret is parsed, so a gateway whose sources use whsec_ secrets alone never loads it.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["MAX_SIGNATURES", "StandardWebhooksProvider", "SvixProvider", "decode_secret", "sign"]

PUBLIC_KEY_PREFIX = "whpk_"
PRIVATE_KEY_PREFIX = "whsk_"
ED25519_SIGNATURE_BYTES = 64


def _b64decode(encoded: str) -> bytes:
    """Strict base64, whose `=` padding may be left out: the Standard Webhooks reference pads a secret
    before decoding it. Raises binascii.Error (a ValueError)."""
    return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)


def decode_secret(secret: str) -> bytes:
    """`whsec_<base64>` (or bare base64) -> key bytes; ValueError names the problem, never the secret. The
    base64 may leave out its `=` padding."""
    try:
        key = _b64decode(secret.removeprefix("whsec_"))
    except ValueError:
        raise ValueError("is not a whsec_ secret: the part after whsec_ must be base64") from None
    if not key:
        raise ValueError("is an empty whsec_ secret")
    return key


def decode_ed25519(secret: str, prefix: str) -> bytes:
    """`whpk_<base64>` / `whsk_<base64>` -> the 32 raw key bytes (the private one is the ed25519 seed); the
    base64 may leave out its `=` padding, as a whsec_ secret's may."""
    try:
        key = _b64decode(secret.removeprefix(prefix))
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"is not a {prefix} ed25519 key: the part after {prefix} must be base64 of 32 bytes")
    return key


def signed_content(msg_id: str, timestamp: int | str, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def sign(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """One `v1,<base64>` signature, as a sender computes it."""
    mac = hmac.new(key, signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def sign_ed25519(key: Ed25519PrivateKey, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """One `v1a,<base64>` signature, as a sender holding a whsk_ key computes it."""
    return "v1a," + base64.b64encode(key.sign(signed_content(msg_id, timestamp, body))).decode()


class SvixProvider(Provider):
    name = "svix"
    description = (
        "Svix / Standard Webhooks: svix-* or webhook-* headers, v1 (whsec_) and v1a (whpk_) signatures"
    )
    header_prefixes: tuple[str, ...] = ("svix-", "webhook-")

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        self.keys: list[bytes] = []
        self.public_keys: list[Ed25519PublicKey] = []
        self.private_keys: list[Ed25519PrivateKey] = []
        for index, secret in enumerate(self.secrets):
            try:
                if secret.startswith(PUBLIC_KEY_PREFIX):
                    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

                    raw = decode_ed25519(secret, PUBLIC_KEY_PREFIX)
                    self.public_keys.append(Ed25519PublicKey.from_public_bytes(raw))
                elif secret.startswith(PRIVATE_KEY_PREFIX):
                    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

                    private = Ed25519PrivateKey.from_private_bytes(decode_ed25519(secret, PRIVATE_KEY_PREFIX))
                    # A sender's key also verifies what it signed, so `hookyard send` works with it alone.
                    self.private_keys.append(private)
                    self.public_keys.append(private.public_key())
                else:
                    self.keys.append(decode_secret(secret))
            except ValueError as exc:
                raise ValueError(f"secrets[{index}] {exc}") from None
        # The signature header is a list of signatures (a repeated one counts too); the id and the
        # timestamp are one value each.
        self.single_headers = frozenset(
            prefix + name for prefix in self.header_prefixes for name in ("id", "timestamp")
        )

    def _header(self, headers: Mapping[str, str], name: str) -> tuple[str | None, str]:
        """The prefix (None when neither came) and the value of the first of svix-{name}, webhook-{name}
        that is there, even empty. The svix library reads each of the id, the timestamp and the signature
        so, one apart from the others: an empty svix-id is refused, not passed over for webhook-id, and
        svix-id with webhook-timestamp and webhook-signature is a whole request."""
        for prefix in self.header_prefixes:
            value = headers.get(prefix + name)
            if value is not None:
                return prefix, value
        return None, ""

    def _headers(self, headers: Mapping[str, str]) -> tuple[str | None, str, str]:
        """The prefix of the id header read (None when none came), the id and the timestamp."""
        prefix, msg_id = self._header(headers, "id")
        return prefix, msg_id, self._header(headers, "timestamp")[1]

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        prefix, msg_id = self._header(headers, "id")
        if prefix is None:
            first = self.header_prefixes[0]
            raise unauthorized("missing_signature", f"missing {first}id/{first}signature headers")
        if not msg_id:
            later = self.header_prefixes[self.header_prefixes.index(prefix) + 1 :]
            read_instead = "/".join(f"{other}id" for other in later)
            note = f" ({read_instead} is read only when there is no {prefix}id)" if later else ""
            raise unauthorized("missing_signature", f"empty {prefix}id header{note}")
        # A header missing under both names is named as the id's set names it.
        signature_prefix, signature = self._header(headers, "signature")
        if not signature:
            raise unauthorized("missing_signature", f"missing {signature_prefix or prefix}signature header")
        timestamp_prefix, timestamp = self._header(headers, "timestamp")
        timestamp = without_leading_zeros(timestamp)
        label = f"{timestamp_prefix or prefix}timestamp header"
        check_timestamp(timestamp, now, self.tolerance, label)
        entries = signature_entries(signature)
        # The id as its bytes arrived (the timestamp is ASCII digits by now).
        content = wire_bytes(msg_id) + f".{timestamp}.".encode() + body
        # v1 entries are compared as text with what each key signs, so no other spelling of the same
        # bytes passes (base64 with altered padding bits, a trailing comma).
        expected = [b"v1," + base64.b64encode(hmac_digest(key, content)) for key in self.keys]
        offered = [text_bytes(entry) for entry in entries]
        if not any_digest_matches(expected, offered) and not self._ed25519_matches(content, entries):
            raise unauthorized("invalid_signature", "no signature matches")

    def _ed25519_matches(self, content: bytes, entries: list[str]) -> bool:
        if not self.public_keys:
            return False  # and cryptography stays unloaded (see the top of this module)
        from cryptography.exceptions import InvalidSignature

        offered = [
            decoded
            for entry in entries
            if entry.startswith("v1a,") and (decoded := decode_digest(entry[4:], "base64")) is not None
        ]
        # Public keys are no secret, so stopping at the first match leaks nothing.
        for signature in offered:
            if len(signature) != ED25519_SIGNATURE_BYTES:
                continue
            for key in self.public_keys:
                try:
                    key.verify(signature, content)
                except InvalidSignature:
                    continue
                return True
        return False

    def parse(self, headers: Mapping[str, str], body: bytes, payload: Any, received_at: float) -> Event:
        if not isinstance(payload, dict):
            raise bad_request("invalid_payload", "the body must be a JSON object")
        prefix = self.header_prefixes[0]
        id_prefix, msg_id, timestamp = self._headers(headers)
        id_prefix = id_prefix or prefix
        occurred_at = parse_timestamp(payload.get("timestamp"))
        if occurred_at is None:
            # Read as verify reads it: with `verify: log-only` an unverified header gets here too, and
            # str.isdigit() accepts "²" (a latin-1 byte), which float() refuses.
            occurred_at = read_epoch(without_leading_zeros(timestamp))
        return Event(
            source=self.source_name,
            id=require_text(
                header_text(msg_id),
                "missing_event_id",
                f"missing {prefix}id header",
                name=f"the {id_prefix}id header",
            ),
            type=require_text(
                payload.get("type"), "missing_event_type", "the payload has no type", name=PAYLOAD_TYPE
            ),
            occurred_at=occurred_at,
            received_at=received_at,
            body=body,
            payload=payload,
            headers=dict(headers),
        )

    def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
        return {
            "data": data,
            "object": "event",
            "type": event_type,
            "timestamp": int(now * 1000),
            "instance_id": "ins_hookyard_sample",
        }

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        """v1 with the first whsec_ secret; v1a with the first whsk_ key when there is no whsec_ secret."""
        if self.keys:
            signature = sign(self.keys[0], event_id, int(now), body)
        elif self.private_keys:
            signature = sign_ed25519(self.private_keys[0], event_id, int(now), body)
        else:
            raise ValueError(
                f"source {self.source_name!r} has only whpk_ public keys, which cannot sign; "
                "add the whsk_ private key (or a whsec_ secret) to send test events"
            )
        prefix = self.header_prefixes[0]
        return {
            f"{prefix}id": event_id,
            f"{prefix}timestamp": str(int(now)),
            f"{prefix}signature": signature,
        }


class StandardWebhooksProvider(SvixProvider):
    name = "standard-webhooks"
    description = "Standard Webhooks: webhook-* headers, v1 (whsec_) and v1a (whpk_) signatures"
    header_prefixes = ("webhook-",)

    def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
        # The specification's payload: type, an ISO 8601 timestamp and data.
        return {"type": event_type, "timestamp": iso_now(now), "data": data}


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [SvixProvider, StandardWebhooksProvider]
