"""Slack: `X-Slack-Signature: v0=<hex>`, the HMAC-SHA256 of `v0:{X-Slack-Request-Timestamp}:{body}` keyed
by the app's signing secret; the timestamp must be within `tolerance` of now.

Events API payloads (JSON) only. An `event_callback` is identified by its `event_id` and typed by its inner
`event.type` (`app_mention`, `message`, ...); any other payload (`url_verification`, `app_rate_limited`) is
typed by its own `type` and, having no event_id, identified by the SHA-256 of the body, so that Slack's
retries of the same bytes are still duplicates. Slash commands and interactivity post form-encoded bodies,
which the gateway refuses as invalid JSON before a provider sees them.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from gateway import hookimpl
from gateway.config import Source
from gateway.events import Event
from gateway.providers import PAYLOAD_TYPE, Provider, parse_timestamp
from plugins.hmac_generic import (
    body_digest_id,
    check_timestamp,
    make_event,
    require_header,
    require_object,
    require_signature,
    signature_entries,
)

SIGNATURE_HEADER = "x-slack-signature"
TIMESTAMP_HEADER = "x-slack-request-timestamp"


def signed_content(timestamp: str, body: bytes) -> bytes:
    return f"v0:{timestamp}:".encode() + body


class SlackProvider(Provider):
    name = "slack"
    description = "Slack: X-Slack-Signature v0=<hex HMAC-SHA256 of v0:{timestamp}:{body}>, Events API JSON"

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        self.keys = [secret.encode() for secret in self.secrets]
        self.single_headers = frozenset({TIMESTAMP_HEADER})

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        header = require_header(headers, SIGNATURE_HEADER, "X-Slack-Signature")
        label = "X-Slack-Request-Timestamp header"
        timestamp = check_timestamp(headers.get(TIMESTAMP_HEADER), now, self.tolerance, label)
        entries = signature_entries(header)
        require_signature(self.keys, signed_content(timestamp, body), entries, prefix="v0=")

    def parse(self, headers: Mapping[str, str], body: bytes, payload: Any, received_at: float) -> Event:
        payload = require_object(payload)
        event_id = payload.get("event_id")
        if event_id is None or event_id == "":
            event_id = body_digest_id(body)
        if payload.get("type") == "event_callback":
            inner = payload.get("event")
            event_type = inner.get("type") if isinstance(inner, dict) else None
            type_detail, type_name = "the event_callback has no event.type", "the event_callback's event.type"
        else:
            event_type, type_detail, type_name = payload.get("type"), "the payload has no type", PAYLOAD_TYPE
        return make_event(
            self,
            headers,
            body,
            payload,
            received_at,
            event_id=event_id,
            event_type=event_type,
            occurred_at=parse_timestamp(payload.get("event_time")),
            id_detail="the event_id is not text",
            type_detail=type_detail,
            id_name="the payload's event_id",
            type_name=type_name,
        )

    def reply(self, event: Event) -> dict[str, Any] | None:
        # Slack confirms a new Events API URL by expecting its challenge echoed back.
        if event.type == "url_verification" and isinstance(event.payload, dict):
            challenge = event.payload.get("challenge")
            # Slack's is text. A list or an object is not echoed: nested past the 254 levels orjson writes
            # (the gateway reads 1024), the answer could not be written once the event was stored.
            if not isinstance(challenge, dict | list):
                return {"challenge": challenge}
        return None

    def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
        if event_type == "url_verification":
            return {
                "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
                "challenge": f"challenge-{event_id}",
                "type": event_type,
            }
        event: dict[str, Any] = dict(data) if isinstance(data, dict) else {"data": data}
        event["type"] = event_type
        event.setdefault("event_ts", f"{now:.6f}")
        return {
            "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
            "team_id": "T0HOOKYARD",
            "api_app_id": "A0HOOKYARD",
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(now),
        }

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        timestamp = str(int(now))
        digest = hmac.new(self.keys[0], signed_content(timestamp, body), "sha256").hexdigest()
        return {
            "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
            "X-Slack-Request-Timestamp": timestamp,
            "X-Slack-Signature": f"v0={digest}",
        }


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [SlackProvider]
