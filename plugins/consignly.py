"""Consignly: HMAC-SHA256 of the raw body, hex, in `X-Consignly-Signature: sha256=<hex>`.

Consignly runs on .NET, whose Convert.ToHexString writes upper-case hex: the hex and `sha256=` are read in
either case.

Any of the configured secrets may have signed a request: the app's client secret and the subscription's
signingKey1/signingKey2 (two slots, so keys can be rotated without downtime).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from gateway import hookimpl
from gateway.events import Event
from gateway.providers import (
    PAYLOAD_ID,
    PAYLOAD_TYPE,
    Provider,
    bad_request,
    parse_timestamp,
    require_text,
    unauthorized,
)
from plugins.hmac_generic import hex_digest, require_signature

SIGNATURE_HEADER = "x-consignly-signature"

# Every event type Consignly documents, by code. The dotted type in payloads is derived from the name by one
# rule (see dotted_type): the first word is the resource, the remaining words, snake_cased, the change.
CATALOG: dict[int, str] = {
    0: "WebhookTest",
    101: "ConsignmentCreated",
    102: "ConsignmentUpdated",
    103: "ConsignmentDeleted",
    104: "ConsignmentStatusUpdated",
    105: "ConsignmentBooked",
    106: "ConsignmentBookingFailed",
    107: "ConsignmentCancelled",
    108: "ConsignmentLabelCreated",
    109: "ConsignmentDocumentsCreated",
    110: "ConsignmentDispatched",
    111: "ConsignmentDelivered",
    112: "ConsignmentTrackingUpdated",
    113: "ConsignmentDeliveryFailed",
    114: "ConsignmentReturned",
    115: "ConsignmentPickupBooked",
    116: "ConsignmentPickupCancelled",
    201: "ManifestCreated",
    202: "ManifestClosed",
    203: "ManifestFailed",
    301: "JobConnectionCreated",
    302: "JobConnectionUpdated",
    303: "JobConnectionDeleted",
    304: "JobConnectionActionManualTrigger",
}

_WORD = re.compile(r"[A-Z][a-z0-9]*")


def dotted_type(name: str) -> str:
    """ConsignmentStatusUpdated -> consignment.status_updated; JobConnectionActionManualTrigger ->
    job.connection_action_manual_trigger."""
    words = [word.lower() for word in _WORD.findall(name)]
    return f"{words[0]}.{'_'.join(words[1:])}" if len(words) > 1 else name.lower()


BY_NAME: dict[str, str] = {name: dotted_type(name) for name in CATALOG.values()}
BY_CODE: dict[int, str] = {code: dotted_type(name) for code, name in CATALOG.items()}
# Every type as a route may name it: by name (ConsignmentCreated) or dotted (consignment.created).
KNOWN_TYPES: tuple[str, ...] = (*BY_NAME, *BY_NAME.values())


class ConsignlyProvider(Provider):
    name = "consignly"
    description = "Consignly: X-Consignly-Signature: sha256=<hex HMAC-SHA256 of the body>, several secrets"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keys = [secret.encode() for secret in self.secrets]
        # Exactly one signature, so a repeated header is refused for what it is (not as a bad signature).
        self.single_headers = frozenset({SIGNATURE_HEADER})

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        header = headers.get(SIGNATURE_HEADER, "").strip()
        if not header:
            raise unauthorized("missing_signature", "missing X-Consignly-Signature header")
        # Exactly one `sha256=<64 hex digits>`, in either case: `a, b` in one header is refused. A header
        # written another way is told apart from a signature no secret made: the sender's fix is its
        # format, not its secret, and the format is public.
        digest = hex_digest(header, "sha256=")
        if digest is None or len(digest) != hashlib.sha256().digest_size:
            raise unauthorized(
                "invalid_signature", "X-Consignly-Signature must be sha256=<64 hex digits>, once"
            )
        require_signature(self.keys, body, [header], prefix="sha256=")

    def parse(self, headers: Mapping[str, str], body: bytes, payload: Any, received_at: float) -> Event:
        if not isinstance(payload, dict):
            raise bad_request("invalid_payload", "the body must be a JSON object")
        # A name or a code; a code comes as its text, which event_type looks up as it looks up 101.
        raw_type = require_text(
            payload.get("type"), "missing_event_type", "the payload has no type", name=PAYLOAD_TYPE
        )
        return Event(
            source=self.source_name,
            id=require_text(payload.get("id"), "missing_event_id", "the payload has no id", name=PAYLOAD_ID),
            type=self.event_type(raw_type),
            occurred_at=parse_timestamp(payload.get("created")),
            received_at=received_at,
            body=body,
            payload=payload,
            headers=dict(headers),
        )

    def event_type(self, name: str | int) -> str:
        # isdigit() is true for "²" and "①" too, which int() refuses: only short ASCII digit strings are codes.
        if isinstance(name, int) or (
            isinstance(name, str) and name.isascii() and name.isdigit() and len(name) < 19
        ):
            return BY_CODE.get(int(name), str(name))
        return BY_NAME.get(name, name)

    def known_types(self) -> Collection[str]:
        return KNOWN_TYPES

    def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
        created = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "id": event_id,
            "type": self.event_type(event_type),
            "created": created,
            "data": data,
            "operationId": f"op_{event_id}",
        }

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        return {"X-Consignly-Signature": "sha256=" + hmac.new(self.keys[0], body, hashlib.sha256).hexdigest()}


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [ConsignlyProvider]
