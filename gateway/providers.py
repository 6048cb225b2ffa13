"""What a provider plugin implements: verify a request's signature, then turn its payload into an Event."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import hmac
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from gateway.config import Source
from gateway.events import Event, lost_digits
from gateway.http_client import control_character_name, header_control_character

# How require_text names the payload's own id and type when they are of the wrong kind.
PAYLOAD_ID = "the payload's id"
PAYLOAD_TYPE = "the payload's type"

# The longest event id or type accepted, in bytes of UTF-8. Real ids are far shorter (svix msg_ ids and
# Stripe evt_ ids under 40 bytes, GitHub's and Consignly's UUIDs 36); past a few KB, receivers refuse the
# headers they are sent on in (431) and PostgreSQL refuses to index the id (the store action).
MAX_TEXT_BYTES = 512

# What HTTP strips from both ends of a header's value (RFC 9110 §5.5).
_HEADER_WHITESPACE = " \t"

# UTC written as a letter, after a time's last digit.
_ZULU = re.compile(r"(?<=[0-9])[Zz]\Z")


class Rejected(Exception):
    """A request that must not be accepted. `reason` is a short, stable label (it becomes a metric label);
    `detail` is for the sender and never contains a secret."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason.replace("_", " ")


def unauthorized(reason: str, detail: str = "") -> Rejected:
    return Rejected(401, reason, detail)


def bad_request(reason: str, detail: str = "") -> Rejected:
    return Rejected(400, reason, detail)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Provider(ABC):
    """Base class of providers. Subclasses set `name` and implement `verify`; most keep `parse`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # False for schemes with nothing to verify; such a source must say `insecure: true`.
    needs_secret: ClassVar[bool] = True
    # False for a provider that checks nothing (`none`): its events are stored as unverified.
    verifies: ClassVar[bool] = True
    # Settings under the source's `options:`.
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, source_name: str, source: Source) -> None:
        self.source_name = source_name
        self.secrets = list(source.secrets)
        self.tolerance = source.tolerance
        self.options = self.Options.model_validate(source.options)
        # Headers that carry a secret itself (not a signature of it): never stored with the event.
        self.secret_headers: frozenset[str] = frozenset()
        # Headers read as one value (an event's id, type or timestamp, a signature header that holds one):
        # a request that repeats one is refused `400 repeated_header` rather than read joined with ", ".
        self.single_headers: frozenset[str] = frozenset()

    @abstractmethod
    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        """Raise Rejected unless the request carries a valid signature for the exact bytes of body.
        Must never raise anything else, whatever the headers hold."""

    def parse(self, headers: Mapping[str, str], body: bytes, payload: Any, received_at: float) -> Event:
        """Build the canonical event from a verified request. The default reads `id` and `type` from a
        JSON object payload; raise bad_request(...) when they are missing."""
        if not isinstance(payload, dict):
            raise bad_request("invalid_payload", "the body must be a JSON object")
        return Event(
            source=self.source_name,
            id=require_text(payload.get("id"), "missing_event_id", "the payload has no id", name=PAYLOAD_ID),
            type=self.event_type(
                require_text(payload.get("type"), "missing_event_type", "no type", name=PAYLOAD_TYPE)
            ),
            received_at=received_at,
            body=body,
            payload=payload,
            headers=dict(headers),
        )

    def reply(self, event: Event) -> dict[str, Any] | None:
        """Fields to add to the 200 answer, for senders that expect something back (Slack's challenge)."""
        return None

    def event_type(self, name: str | int) -> str:
        """Map a route's `events:` entry or a payload's type to the canonical type (catalog lookups)."""
        return str(name)

    def known_types(self) -> Collection[str] | None:
        """Every type this provider sends, as a route's `events:` may name it (canonical types, and the names
        or codes of its catalog), or None for a provider that may send any type (the default)."""
        return None

    # -- the sender's side, for `hookyard send` and tests --------------------------------------------

    def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
        """A payload shaped as this provider sends it."""
        return {"id": event_id, "type": event_type, "data": data}

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        """The headers this provider would send with body, signed with the first configured secret."""
        return {}


def require_text(value: Any, reason: str, detail: str, *, name: str | None = None) -> str:
    """A string or an integer, as text; raises bad_request(reason, detail) when it is missing or empty.
    With `name` ("the payload's type"), a value of another kind is refused saying what it is, not as missing:
    `the payload's type is the number 1.5, not a string or an integer`. Text with a control character other
    than the tab is refused too: the id and the type are sent on in headers, which cannot carry one; so is
    text that begins or ends with a space or a tab, which HTTP strips from a header's value; and so is text
    longer than MAX_TEXT_BYTES bytes of UTF-8."""
    if value is None or value == "":
        raise bad_request(reason, detail)
    if isinstance(value, str):
        if (found := header_control_character(value)) is not None:
            # Sent on in headers (Idempotency-Key, X-Hookyard-Type), which cannot carry it (RFC 9110 §5.5).
            char = control_character_name(found)
            raise bad_request(reason, f"{name or 'it'} holds {char}, which no HTTP header can carry")
        if value[0] in _HEADER_WHITESPACE or value[-1] in _HEADER_WHITESPACE:
            # HTTP strips them from a header value's ends (RFC 9110 §5.5): sent on, "evt_1 " would arrive as
            # evt_1, the Idempotency-Key of another event, and as a webhook-id matching no signature.
            where, char = ("begins", value[0]) if value[0] in _HEADER_WHITESPACE else ("ends", value[-1])
            space = "a space" if char == " " else "a tab"
            raise bad_request(reason, f"{name or 'it'} {where} with {space}, which HTTP strips from a header")
        return _within_limit(value, reason, name)
    if isinstance(value, int) and not isinstance(value, bool):
        return _within_limit(str(value), reason, name)
    if name is None:
        raise bad_request(reason, detail)
    if lost_digits(value):
        # What orjson makes of an integer past 64 bits: "the number 1.2345678901234568e+22, not a string or
        # an integer" would contradict the integer its sender wrote.
        raise bad_request(
            reason,
            f"{name} is an integer past 64 bits, which the gateway cannot read exactly: send it as a string",
        )
    raise bad_request(reason, f"{name} is {described(value)}, not a string or an integer")


def header_text(value: str | None) -> str | None:
    """A header's value as the text its sender wrote, for an event id or type taken from a header. The
    listener reads headers one byte a character (latin-1), the bytes that signatures cover; a sender writes
    text that is not ASCII in UTF-8, as the id is sent on (Idempotency-Key). Bytes that are not UTF-8 stay
    as they were read."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not UTF-8, or not read from the wire
        return value


def _within_limit(text: str, reason: str, name: str | None) -> str:
    # Four bytes of UTF-8 at most per character: shorter text is within the limit without encoding it.
    if len(text) * 4 <= MAX_TEXT_BYTES:
        return text
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise bad_request(
            reason, f"{name or 'it'} is {size} bytes long; the limit is {MAX_TEXT_BYTES} bytes of UTF-8"
        )
    return text


def described(value: Any) -> str:
    """A JSON value's kind, as a sender would recognise it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def hmac_digest(key: bytes, content: bytes, algorithm: str = "sha256") -> bytes:
    """hmac.digest(key, content, algorithm), each key prepared once: hmac.digest() looks the hash up in
    OpenSSL and pads the key again for every call, which costs more than hashing a 1 KB webhook. Each call
    copies the prepared key's state instead."""
    mac = _prepared(key, algorithm).copy()
    mac.update(content)
    return mac.digest()


# Bounded: a config reload that rotates secrets leaves the old ones to fall out.
@functools.lru_cache(maxsize=64)
def _prepared(key: bytes, algorithm: str) -> hmac.HMAC:
    return hmac.new(key, digestmod=algorithm)


def any_digest_matches(expected: list[bytes], offered: list[bytes]) -> bool:
    """Constant time per comparison; every pair is compared so timing says nothing about which matched."""
    found = False
    for mine in expected:
        for theirs in offered:
            found |= hmac.compare_digest(mine, theirs)
    return found


def iso_datetime(text: str) -> datetime:
    """An ISO 8601 time; RFC 3339 allows a lower-case z (and t, which fromisoformat reads already) after
    the time's last digit. Raises ValueError."""
    return datetime.fromisoformat(_ZULU.sub("+00:00", text))


def parse_timestamp(value: Any) -> float | None:
    """Seconds since the epoch from epoch seconds, epoch milliseconds or ISO 8601; None when unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        # Anything past the year 33658 in seconds is really milliseconds.
        seconds = float(value) / 1000.0 if value > 1e12 else float(value)
        # Beyond the years 1-9999 no date can show it: treat it as unreadable.
        return seconds if -62135596800 <= seconds <= 253402300799 else None
    if isinstance(value, str):
        try:
            parsed = iso_datetime(value)
        except ValueError:
            return None
        # A time without a zone is UTC, whatever the server's own zone is.
        seconds = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
        # An offset can move a time at either end of the years 1-9999 out of them (0001-01-01T00:00+01:00):
        # unreadable, as for numbers, since no UTC date can show it.
        return seconds if -62135596800 <= seconds <= 253402300799 else None
    return None


def unknown_type(provider: Provider, pattern: str | int) -> str | None:
    """What to say of an event type (a `--type`, a route's `events:` entry: a name, a code or a glob) that
    none of the types its provider sends is, with the closest one it does; None when one is, or where the
    provider does not list its types. No route could match such a type: a typo, most often."""
    known = provider.known_types()
    if known is None:
        return None
    sent = {provider.event_type(name) for name in known}
    if isinstance(pattern, str) and any(char in pattern for char in "*?["):  # a glob, as routes read it
        if any(fnmatch.fnmatchcase(event_type, pattern) for event_type in sent):
            return None
        return f"{provider.name} sends no event type that {pattern!r} matches"
    if provider.event_type(pattern) in sent:
        return None
    close = difflib.get_close_matches(str(pattern), known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{provider.name} sends no event type {pattern!r}{hint}"
