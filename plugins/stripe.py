"""Stripe: `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]`.

Each v1 is the hex HMAC-SHA256 of `{t}.{body}` keyed by the endpoint's whole signing secret, `whsec_`
included, as UTF-8 bytes (Stripe does not base64-decode it). Several v1 entries appear while a secret is
rolled; v0 (test mode's legacy scheme) and unknown entries are ignored. t must be within `tolerance` of
now, in either direction (stripe-python only refuses old ones). Two different t= are refused (400
repeated_header): Stripe's own libraries disagree on which one counts. The event id, type and creation time
come from the payload's `id`, `type` and `created`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from gateway import hookimpl
from gateway.config import Source
from gateway.events import Event
from gateway.providers import Provider, bad_request, parse_timestamp, unauthorized
from plugins.hmac_generic import (
    check_timestamp,
    make_event,
    require_header,
    require_object,
    require_signature,
    without_leading_zeros,
)

SIGNATURE_HEADER = "stripe-signature"
API_VERSION = "2025-06-30.basil"


class StripeProvider(Provider):
    name = "stripe"
    description = (
        "Stripe: Stripe-Signature t=...,v1=<hex HMAC-SHA256 of {t}.{body}> keyed by the whsec_ string"
    )

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        self.keys = [secret.encode() for secret in self.secrets]

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        header = require_header(headers, SIGNATURE_HEADER, "Stripe-Signature")
        timestamp: str | None = None
        offered: list[str] = []
        # Every entry is read, as stripe-python reads them: a t= or v1= past some count is not left out.
        # The ingress's header size limit bounds the work, and the HMAC is computed once per secret.
        for item in header.split(","):
            key, _, value = item.strip().partition("=")
            if not key:  # `,,`, a leading or a trailing comma: not a header Stripe writes
                raise unauthorized("invalid_signature", "the Stripe-Signature header has an empty entry")
            if key == "t":
                timestamp = _one_timestamp(timestamp, value)
            elif key == "v1":
                offered.append(value)
        timestamp = check_timestamp(timestamp, now, self.tolerance, "t= in the Stripe-Signature header")
        # As its number: stripe-python reads t= with int() and signs "%d".
        require_signature(self.keys, f"{without_leading_zeros(timestamp)}.".encode() + body, offered)

    def parse(self, headers: Mapping[str, str], body: bytes, payload: Any, received_at: float) -> Event:
        payload = require_object(payload)
        return make_event(
            self,
            headers,
            body,
            payload,
            received_at,
            event_id=payload.get("id"),
            event_type=payload.get("type"),
            occurred_at=parse_timestamp(payload.get("created")),
        )

    def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
        return {
            "id": event_id,
            "object": "event",
            "api_version": API_VERSION,
            "created": int(now),
            "data": {"object": data},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        timestamp = int(now)
        digest = hmac.new(self.keys[0], f"{timestamp}.".encode() + body, "sha256").hexdigest()
        return {
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": f"t={timestamp},v1={digest}",
        }


def _one_timestamp(before: str | None, value: str) -> str:
    """The header's t=, refused when it holds two that differ: stripe-python checks the first, stripe-node
    the last, so which one was signed cannot be told. The same one twice (the header repeated by a proxy,
    its lines joined) names one time."""
    if before is not None and before != value:
        raise bad_request(
            "repeated_header",
            "the Stripe-Signature header holds two different timestamps (t=); it holds one: send it once",
        )
    return value


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [StripeProvider]
