"""Shopify: `X-Shopify-Hmac-Sha256: <base64 HMAC-SHA256 of the body>` keyed by the app's client secret.

The event id is `X-Shopify-Event-Id`, the header Shopify's guide to duplicate webhooks names: the same on
every delivery of one event (`X-Shopify-Webhook-Id` when it is absent). The type is `X-Shopify-Topic`
(`orders/create`), and the time is `X-Shopify-Triggered-At` (ISO 8601). Shopify signs no timestamp, so
there is no replay window to check: dedupe on the id stops an unchanged resend.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping
from typing import Any

from gateway import hookimpl
from gateway.config import Source
from gateway.events import Event
from gateway.providers import Provider, header_text, parse_timestamp
from plugins.hmac_generic import (
    SampleTypes,
    iso_now,
    make_event,
    require_header,
    require_signature,
    signature_entries,
)

SIGNATURE_HEADER = "x-shopify-hmac-sha256"
API_VERSION = "2025-07"


class ShopifyProvider(Provider):
    name = "shopify"
    description = "Shopify: X-Shopify-Hmac-Sha256 <base64 HMAC-SHA256 of the body>; type X-Shopify-Topic"

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        self.keys = [secret.encode() for secret in self.secrets]
        self.sample_types = SampleTypes("orders/create")
        self.single_headers = frozenset(
            {"x-shopify-event-id", "x-shopify-webhook-id", "x-shopify-topic", "x-shopify-triggered-at"}
        )

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        header = require_header(headers, SIGNATURE_HEADER, "X-Shopify-Hmac-Sha256")
        require_signature(self.keys, body, signature_entries(header), encoding="base64")

    def parse(self, headers: Mapping[str, str], body: bytes, payload: Any, received_at: float) -> Event:
        from_event_id = bool(headers.get("x-shopify-event-id"))
        return make_event(
            self,
            headers,
            body,
            payload,
            received_at,
            event_id=header_text(headers.get("x-shopify-event-id") or headers.get("x-shopify-webhook-id")),
            event_type=header_text(headers.get("x-shopify-topic")),
            occurred_at=parse_timestamp(headers.get("x-shopify-triggered-at")),
            id_detail="missing X-Shopify-Event-Id header",
            type_detail="missing X-Shopify-Topic header",
            id_name=f"the X-Shopify-{'Event' if from_event_id else 'Webhook'}-Id header",
            type_name="the X-Shopify-Topic header",
        )

    def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
        # Shopify's body is the resource itself (the order, the product), not an envelope.
        self.sample_types.remember(event_id, event_type)
        return dict(data) if isinstance(data, dict) else {"data": data}

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        digest = hmac.new(self.keys[0], body, "sha256").digest()
        return {
            "X-Shopify-Topic": self.sample_types.recall(event_id),
            "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
            "X-Shopify-Shop-Domain": "hookyard-sample.myshopify.com",
            "X-Shopify-API-Version": API_VERSION,
            "X-Shopify-Event-Id": event_id,
            "X-Shopify-Webhook-Id": f"webhook-{event_id}",
            "X-Shopify-Triggered-At": iso_now(now),
        }


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [ShopifyProvider]
