"""`hmac`: a configurable HMAC scheme for senders without a provider of their own, and the helpers that
every HMAC-style provider here shares (digest parsing, timestamp checks, where an id or a type is found).

    sources:
      acme:
        path: /webhooks/acme
        provider: hmac
        secrets: [${ACME_SECRET}]
        options:
          header: X-Acme-Signature          # required
          algorithm: sha256                 # sha1 | sha256 | sha512
          encoding: hex                     # hex | base64
          prefix: "sha256="                 # text before the digest, if any
          timestamp_header: X-Acme-Timestamp
          signed_content: "{timestamp}.{body}"
          id_from: header:X-Acme-Delivery   # or json:<dotted.path> (default json:id)
          type_from: json:event.type        # default json:type
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import string
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

from gateway import hookimpl
from gateway.config import Source
from gateway.events import Event, dig
from gateway.providers import (
    PAYLOAD_ID,
    PAYLOAD_TYPE,
    Provider,
    any_digest_matches,
    bad_request,
    header_text,
    hmac_digest,
    require_text,
    unauthorized,
)

# More entries than this is not key rotation but an attempt to make us burn CPU.
MAX_SIGNATURES = 10

Algorithm = Literal["sha1", "sha256", "sha512"]
Encoding = Literal["hex", "base64"]

# -- signatures ----------------------------------------------------------------------------------------


def encode_digest(digest: bytes, encoding: Encoding) -> str:
    """A digest as a sender writes it: lower-case hex, or standard base64 with padding."""
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def decode_digest(text: str, encoding: Encoding) -> bytes | None:
    """The raw digest when text is exactly its canonical spelling (see encode_digest), else None. Decoders
    also take upper-case hex and base64 whose unused padding bits were altered; those are other texts for
    the same bytes, refused here. (require_signature reads hex in either case with hex_digest.) Never
    raises."""
    try:
        digest = bytes.fromhex(text) if encoding == "hex" else base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error is a ValueError; so is non-ASCII input to b64decode
        return None
    return digest if encode_digest(digest, encoding) == text else None


def signature_entries(header: str) -> list[str]:
    """The entries of a signature header, at most MAX_SIGNATURES of them (split with a limit: an endless
    header costs no more than that). Entries are separated by whitespace, and a repeated header arrives
    joined with ", ": a separator is a run of whitespace and the one comma before it, if any. A comma not
    followed by whitespace is part of its entry. (No regular expression: this runs on every webhook.)"""
    pieces = header.split(None, MAX_SIGNATURES)
    if len(pieces) <= 1:
        return pieces or [""]  # the usual case: one signature
    separated = len(pieces) if len(pieces) > MAX_SIGNATURES else len(pieces) - 1
    return [
        piece[:-1] if index < separated and piece.endswith(",") else piece
        for index, piece in enumerate(pieces[:MAX_SIGNATURES])
    ]


def hex_digest(entry: str, prefix: str) -> bytes | None:
    """The digest in `<prefix><hex>`, the prefix's ASCII letters and the hex digits in either case; None
    for anything else. Hex digits only: bytes.fromhex() would also skip the spaces of `ab cd`."""
    head, digits = entry[: len(prefix)], entry[len(prefix) :]
    # Case is folded over ASCII only: Unicode's lower() maps the Kelvin sign to `k`, so a prefix holding
    # one would match text that differs from it. (Configured prefixes are ASCII; see HmacOptions.)
    if head != prefix and not (head.isascii() and prefix.isascii() and head.lower() == prefix.lower()):
        return None
    try:
        return binascii.a2b_hex(digits)
    except ValueError:  # binascii.Error (odd length, not a hex digit) or text that is not ASCII
        return None


def text_bytes(text: str) -> bytes:
    # For comparisons only. Lone surrogates cannot arrive over HTTP; surrogatepass keeps them from raising.
    return text.encode("utf-8", "surrogatepass")


def require_signature(
    keys: Sequence[bytes],
    content: bytes,
    entries: Sequence[str],
    *,
    prefix: str = "",
    encoding: Encoding = "hex",
    algorithm: Algorithm = "sha256",
) -> None:
    """Raise invalid_signature unless some entry is prefix + the encoding of the HMAC of content under
    some key. Hex is decoded and its bytes compared, so its digits and the prefix may come in either case
    (.NET's Convert.ToHexString writes upper case), but nothing else may differ. Base64 is compared as text,
    as the providers' own verifiers compare it, so other unused padding bits are refused. Every pair is
    compared in constant time, so neither the answer nor its timing names a secret."""
    if encoding == "hex":
        expected = [hmac_digest(key, content, algorithm) for key in keys]
        offered = [digest for entry in entries if (digest := hex_digest(entry, prefix)) is not None]
    else:
        expected = [
            text_bytes(prefix + encode_digest(hmac_digest(key, content, algorithm), encoding)) for key in keys
        ]
        offered = [text_bytes(entry) for entry in entries]
    if not any_digest_matches(expected, offered):
        raise unauthorized("invalid_signature", "no signature matches")


def require_header(headers: Mapping[str, str], name: str, label: str) -> str:
    """A signature header's value; missing_signature when it is absent or blank."""
    value = headers.get(name, "")
    if not value.strip():
        raise unauthorized("missing_signature", f"missing {label} header")
    return value


def wire_bytes(value: str) -> bytes:
    """A header value as the bytes that were sent (the ingress decodes headers as latin-1). Text that
    cannot have come over the wire matches no signature."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise unauthorized("invalid_signature", "the header holds characters HTTP cannot carry") from None


def read_epoch(value: str | None, *, allow_millis: bool = False) -> float | None:
    """Whole epoch seconds (or, if allowed, 13-digit milliseconds) as seconds; None for anything else."""
    # Twelve digits reach the year 33658; thirteen are milliseconds. Longer is garbage, not a time.
    if not value or not value.isascii() or not value.isdigit() or len(value) > (13 if allow_millis else 12):
        return None
    return int(value) / 1000.0 if len(value) == 13 else float(value)


def check_timestamp(
    value: str | None, now: float, tolerance: float, label: str, *, allow_millis: bool = False
) -> str:
    """The signed timestamp, as sent, once it is known to be an epoch time within tolerance of now."""
    if not value:
        raise unauthorized("missing_timestamp", f"missing {label}")
    seconds = read_epoch(value, allow_millis=allow_millis)
    if seconds is None:
        raise unauthorized("invalid_timestamp", "the timestamp must be whole seconds since the epoch")
    if abs(now - seconds) > tolerance:
        raise unauthorized("timestamp_out_of_tolerance", "the timestamp is too old or too new")
    return value


def without_leading_zeros(timestamp: str) -> str:
    """A timestamp as the svix, Standard Webhooks and Stripe libraries sign it: they read it as a number and
    sign that number, so `01700000000` is signed as `1700000000`, never as its own text."""
    if timestamp.startswith("0"):
        return timestamp.lstrip("0") or "0"
    return timestamp


def body_digest_id(body: bytes) -> str:
    """An id for payloads that carry none: the same bytes (a retry) get the same id, so dedupe holds."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


def iso_now(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- building the event ----------------------------------------------------------------------------------


def require_object(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise bad_request("invalid_payload", "the body must be a JSON object")
    return payload


def make_event(
    provider: Provider,
    headers: Mapping[str, str],
    body: bytes,
    payload: Any,
    received_at: float,
    *,
    event_id: Any,
    event_type: Any,
    occurred_at: float | None = None,
    id_detail: str = "the payload has no id",
    type_detail: str = "the payload has no type",
    id_name: str = PAYLOAD_ID,
    type_name: str = PAYLOAD_TYPE,
) -> Event:
    """The canonical event, with 400 missing_event_id / missing_event_type when either is unusable: the
    details say so when it is missing, and the names say where it is when it is of the wrong kind."""
    return Event(
        source=provider.source_name,
        id=require_text(event_id, "missing_event_id", id_detail, name=id_name),
        type=provider.event_type(require_text(event_type, "missing_event_type", type_detail, name=type_name)),
        occurred_at=occurred_at,
        received_at=received_at,
        body=body,
        payload=payload,
        headers=dict(headers),
    )


class SampleTypes:
    """`sign()` is told the body and the event id but not the type, yet some schemes send the type in a
    header (GitHub, Shopify, `type_from: header:...`). sample_payload() records the type it was asked for
    by event id and sign() reads it back. Sender side only, and bounded."""

    LIMIT = 256

    def __init__(self, default: str) -> None:
        self.default = default
        self._types: dict[str, str] = {}

    def remember(self, event_id: str, event_type: str) -> None:
        if len(self._types) >= self.LIMIT:
            del self._types[next(iter(self._types))]
        self._types[event_id] = event_type

    def recall(self, event_id: str) -> str:
        return self._types.get(event_id, self.default)


# -- options shared by hmac, token and basic ----------------------------------------------------------------

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_name(name: str) -> str:
    if not _HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not an HTTP header name")
    # The ingress lower-cases every header name.
    return name.lower()


HeaderName = Annotated[str, AfterValidator(_header_name)]


def _field_source(spec: str) -> str:
    kind, _, name = spec.partition(":")
    if kind == "header":
        return f"header:{_header_name(name)}"
    if kind == "json" and name and all(name.split(".")):
        return spec
    raise ValueError(f"{spec!r} must be header:<Header-Name> or json:<dotted.path>")


# `header:<Name>` (a request header) or `json:<dotted.path>` (a value in the JSON body).
FieldSource = Annotated[str, AfterValidator(_field_source)]


def read_field(spec: str, headers: Mapping[str, str], payload: Any) -> Any:
    kind, _, name = spec.partition(":")
    return header_text(headers.get(name)) if kind == "header" else dig(payload, name)


def _place_json(payload: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        child = payload.get(part)
        if not isinstance(child, dict):
            child = payload[part] = {}
        payload = child
    payload[last] = value


class FieldOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id_from: FieldSource = "json:id"
    type_from: FieldSource = "json:type"


class FieldMappedProvider(Provider):
    """A provider whose event id and type are found where `id_from` / `type_from` say."""

    Options: ClassVar[type[BaseModel]] = FieldOptions
    options: FieldOptions

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        self.sample_types = SampleTypes("test.event")
        # An id or a type read from a header is one value.
        self.single_headers = frozenset(
            spec.partition(":")[2]
            for spec in (self.options.id_from, self.options.type_from)
            if spec.startswith("header:")
        )

    def occurred_at(self, headers: Mapping[str, str]) -> float | None:
        return None

    def parse(self, headers: Mapping[str, str], body: bytes, payload: Any, received_at: float) -> Event:
        id_from, type_from = self.options.id_from, self.options.type_from
        from_body = id_from.startswith("json:") or type_from.startswith("json:")
        if from_body and not isinstance(payload, dict):
            raise bad_request("invalid_payload", "the body must be a JSON object")
        return make_event(
            self,
            headers,
            body,
            payload,
            received_at,
            event_id=read_field(id_from, headers, payload),
            event_type=read_field(type_from, headers, payload),
            occurred_at=self.occurred_at(headers),
            id_detail=f"no event id at {id_from}",
            type_detail=f"no event type at {type_from}",
            id_name=f"the event id at {id_from}",
            type_name=f"the event type at {type_from}",
        )

    def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
        self.sample_types.remember(event_id, event_type)
        payload: dict[str, Any] = {"data": data}
        for spec, value in ((self.options.id_from, event_id), (self.options.type_from, event_type)):
            kind, _, path = spec.partition(":")
            if kind == "json":
                _place_json(payload, path, value)
        return payload

    def field_headers(self, event_id: str) -> dict[str, str]:
        """The id and type headers a sender adds when id_from / type_from name headers."""
        headers = {}
        for spec, value in (
            (self.options.id_from, event_id),
            (self.options.type_from, self.sample_types.recall(event_id)),
        ):
            kind, _, name = spec.partition(":")
            if kind == "header":
                headers[name] = value
        return headers


# -- the hmac provider ----------------------------------------------------------------------------------------

PLACEHOLDERS = ("body", "timestamp", "id")


class Template:
    """`{timestamp}.{body}` compiled once: literals as bytes and placeholders by name, so that the body is
    spliced in as bytes (it need not be UTF-8). ValueError names the problem."""

    def __init__(self, text: str) -> None:
        self.parts: list[bytes | str] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a valid template: {exc}") from None
        for literal, field, spec, conversion in parsed:
            if literal:
                self.parts.append(literal.encode())
            if field is None:
                continue
            if field not in PLACEHOLDERS or spec or conversion:
                raise ValueError(f"unknown placeholder {{{field}}}; use {{body}}, {{timestamp}} or {{id}}")
            self.parts.append(field)
        self.fields = {part for part in self.parts if isinstance(part, str)}
        if "body" not in self.fields:
            raise ValueError("must include {body}: otherwise the body is not signed")

    def render(self, values: Mapping[str, bytes]) -> bytes:
        return b"".join(part if isinstance(part, bytes) else values[part] for part in self.parts)


def _template(text: str) -> str:
    Template(text)
    return text


def _ascii_prefix(prefix: str) -> str:
    # A hex signature's prefix is matched in either case, over ASCII letters only, and a header carries
    # no other text as sent: a prefix beyond ASCII would match nothing, or match what it does not say.
    if not prefix.isascii():
        raise ValueError(f"{prefix!r} is not ASCII: a signature's prefix is ASCII text, such as sha256=")
    return prefix


class HmacOptions(FieldOptions):
    header: HeaderName
    algorithm: Algorithm = "sha256"
    encoding: Encoding = "hex"
    prefix: Annotated[str, AfterValidator(_ascii_prefix)] = ""
    timestamp_header: HeaderName | None = None
    signed_content: Annotated[str, AfterValidator(_template)] = "{body}"

    @model_validator(mode="after")
    def _consistent(self) -> HmacOptions:
        fields = Template(self.signed_content).fields
        if ("timestamp" in fields) != (self.timestamp_header is not None):
            raise ValueError(
                "signed_content uses {timestamp} exactly when timestamp_header is set "
                "(an unsigned timestamp proves nothing; a signed one must come from a header)"
            )
        if "id" in fields and not self.id_from.startswith("header:"):
            raise ValueError("signed_content uses {id}: set id_from to header:<Name> (the id is signed)")
        return self


class HmacProvider(FieldMappedProvider):
    name = "hmac"
    description = "generic HMAC: options name the header, algorithm, encoding, prefix and signed content"
    Options = HmacOptions
    options: HmacOptions

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        self.keys = [secret.encode() for secret in self.secrets]
        self.template = Template(self.options.signed_content)
        # Entries are separated by whitespace, so a prefix with a space in it (`HMAC `) cannot start one:
        # such a header holds one signature, and its whole value is compared.
        self.one_signature = any(char.isspace() for char in self.options.prefix)
        single = {self.options.header} if self.one_signature else set()
        if self.options.timestamp_header is not None:
            single.add(self.options.timestamp_header)
        self.single_headers |= single

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        options = self.options
        header = require_header(headers, options.header, options.header)
        values = {"body": body}
        if options.timestamp_header is not None:
            timestamp = headers.get(options.timestamp_header)
            label = f"{options.timestamp_header} header"
            values["timestamp"] = check_timestamp(
                timestamp, now, self.tolerance, label, allow_millis=True
            ).encode()
        if "id" in self.template.fields:
            _, _, id_header = options.id_from.partition(":")
            values["id"] = wire_bytes(require_header(headers, id_header, id_header))
        require_signature(
            self.keys,
            self.template.render(values),
            [header.strip()] if self.one_signature else signature_entries(header),
            prefix=options.prefix,
            encoding=options.encoding,
            algorithm=options.algorithm,
        )

    def occurred_at(self, headers: Mapping[str, str]) -> float | None:
        if self.options.timestamp_header is None:
            return None
        return read_epoch(headers.get(self.options.timestamp_header), allow_millis=True)

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        options = self.options
        headers = self.field_headers(event_id)
        timestamp = str(int(now))
        if options.timestamp_header is not None:
            headers[options.timestamp_header] = timestamp
        content = self.template.render(
            {"body": body, "timestamp": timestamp.encode(), "id": event_id.encode()}
        )
        digest = hmac.new(self.keys[0], content, options.algorithm).digest()
        headers[options.header] = options.prefix + encode_digest(digest, options.encoding)
        return headers


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [HmacProvider]
