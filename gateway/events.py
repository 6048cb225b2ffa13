"""The canonical event: what routes, filters and actions see, whatever the provider."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson

_MISSING = object()

# Written before their JSON by some senders; RFC 8259 lets a parser ignore it. A body is stored and
# forwarded as it came, mark included.
BYTE_ORDER_MARK = b"\xef\xbb\xbf"

# Never kept with an event (and so never seen by a filter): credentials a sender or a proxy may attach.
UNSTORED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def stored_payload(body: bytes) -> Any:
    """The payload of a body accepted as JSON (gateway.ingress), read back from the store: after its byte
    order mark, if it has one (orjson refuses one)."""
    return orjson.loads(body[3:] if body.startswith(BYTE_ORDER_MARK) else body)


def lost_digits(value: Any) -> bool:
    """Whether `value` may be what orjson makes of an integer past 64 bits: a float with no fraction beyond
    what a 64-bit integer holds (1.2345678901234568e+29 for 123456789012345678901234567890). The sender's
    digits are only in the body (exact_payload). A float the sender wrote as one (1e30) is one too. -2**63 is
    the float of the integers just below the least 64-bit one (-9223372036854775809 and its neighbours)."""
    return isinstance(value, float) and value.is_integer() and not -(2**63) < value < 2**64


def holds_lost_digits(value: Any) -> bool:
    """Whether `value`, or anything in it, is a number for which lost_digits() holds (without recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif lost_digits(item):
            return True
    return False


def exact_payload(body: bytes) -> Any:
    """The payload of a body accepted as JSON, read again by Python's json, which keeps every integer's
    digits; None when it cannot read it (nested past its recursion limit, an integer past 4,300 digits).
    Everything else it reads as orjson does: it is only for payloads where lost_digits() found a number,
    so that the common payload is parsed once."""
    try:
        return json.loads(body[3:] if body.startswith(BYTE_ORDER_MARK) else body)
    except (RecursionError, ValueError):
        return None


# How deep a payload may nest to be shown as JSON (the admin API, `hookyard events show`). The gateway reads
# JSON nested up to 1024 levels (orjson's limit); Python's json, which writes the admin API's answers and
# the CLI's output and reads them back, stops near its recursion limit (1000, less the frames in use).
SHOWN_DEPTH = 512


def nesting_depth(value: Any) -> int:
    """How many lists and objects deep `value` nests (0 for a scalar), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, level)
        stack.extend((inner, level + 1) for inner in item if isinstance(inner, dict | list))
    return deepest


@dataclass(slots=True)
class Event:
    source: str
    id: str
    type: str
    received_at: float
    body: bytes
    payload: Any
    occurred_at: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    verified: bool = True
    # exact_payload()'s answer once asked for: the filters, the actions and their attempts on this event read
    # the body again once between them.
    _exact: Any = field(default=_MISSING, init=False, repr=False, compare=False)

    def exact_payload(self) -> Any:
        """The payload read again from the body with every digit of an integer past 64 bits (the module's
        exact_payload), or None; read once per event, for those where lost_digits() found a number."""
        if self._exact is _MISSING:
            self._exact = exact_payload(self.body)
        return self._exact

    @property
    def data(self) -> Any:
        if isinstance(self.payload, dict):
            return self.payload.get("data")
        return None

    def lookup(self, path: str, default: Any = None) -> Any:
        """Resolve `type`, `id`, `source`, `data.a.b`, `payload.a.0`, `headers.name` on this event."""
        head, _, rest = path.partition(".")
        if head in ("type", "id", "source", "occurred_at", "received_at") and not rest:
            return getattr(self, head)
        if head == "headers":
            return self.headers.get(rest.lower(), default) if rest else self.headers
        if head == "data":
            return dig(self.data, rest, default)
        if head == "payload":
            return dig(self.payload, rest, default)
        return default

    def summary(self) -> dict[str, Any]:
        """Fields for logs: never the body, never a header."""
        return {"event_id": self.id, "source": self.source, "event_type": self.type}


def dig(value: Any, path: str, default: Any = None) -> Any:
    """Follow a dotted path through dicts and lists (`items.0.sku`)."""
    if not path:
        return value
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and _is_index(part):
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else _MISSING
        else:
            return default
        if value is _MISSING:
            return default
    return value


def _is_index(part: str) -> bool:
    """ASCII digits, after one minus sign at most: what int() reads as a list index. (str.isdigit() is
    true for "²" too, and "--1" is digits once all its dashes are stripped: int() refuses both.)"""
    digits = part[1:] if part.startswith("-") else part
    return digits.isascii() and digits.isdigit()
