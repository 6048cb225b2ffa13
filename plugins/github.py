"""GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>` keyed by the webhook's secret.

The event id is the `X-GitHub-Delivery` GUID (a redelivery keeps it, so dedupe holds) and the event type is
the `X-GitHub-Event` header as sent (`push`, `issues`, `pull_request`, `ping`). The action of events that
have one is left in the payload: route on it with a filter (`payload.action: opened`). GitHub signs no
timestamp, so there is no replay window to check; configure the webhook's content type as
application/json (form-encoded bodies are not accepted). The hex and `sha256=` are read in either case. The
legacy SHA-1 `X-Hub-Signature` is ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from gateway import hookimpl
from gateway.config import Source
from gateway.events import Event
from gateway.providers import Provider, header_text
from plugins.hmac_generic import (
    SampleTypes,
    make_event,
    require_header,
    require_signature,
    signature_entries,
)

SIGNATURE_HEADER = "x-hub-signature-256"


class GitHubProvider(Provider):
    name = "github"
    description = "GitHub: X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>; type X-GitHub-Event"

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        self.keys = [secret.encode() for secret in self.secrets]
        self.sample_types = SampleTypes("ping")
        self.single_headers = frozenset({"x-github-delivery", "x-github-event"})

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        header = require_header(headers, SIGNATURE_HEADER, "X-Hub-Signature-256")
        require_signature(self.keys, body, signature_entries(header), prefix="sha256=")

    def parse(self, headers: Mapping[str, str], body: bytes, payload: Any, received_at: float) -> Event:
        return make_event(
            self,
            headers,
            body,
            payload,
            received_at,
            event_id=header_text(headers.get("x-github-delivery")),
            event_type=header_text(headers.get("x-github-event")),
            id_detail="missing X-GitHub-Delivery header",
            type_detail="missing X-GitHub-Event header",
            id_name="the X-GitHub-Delivery header",
            type_name="the X-GitHub-Event header",
        )

    def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
        # `--type issues.opened` is a sender's shorthand: X-GitHub-Event: issues, with "action": "opened".
        event, _, action = event_type.partition(".")
        self.sample_types.remember(event_id, event)
        payload: dict[str, Any] = dict(data) if isinstance(data, dict) else {"data": data}
        if action:
            payload = {"action": action, **payload}
        payload.setdefault("repository", {"id": 1296269, "full_name": "octocat/Hello-World"})
        payload.setdefault("sender", {"login": "octocat", "id": 1, "type": "User"})
        return payload

    def sign(self, body: bytes, event_id: str, now: float) -> dict[str, str]:
        key = self.keys[0]
        return {
            "User-Agent": "GitHub-Hookshot/hookyard",
            "X-GitHub-Event": self.sample_types.recall(event_id),
            "X-GitHub-Delivery": event_id,
            "X-GitHub-Hook-ID": "1",
            # GitHub still sends the SHA-1 signature beside the SHA-256 one.
            "X-Hub-Signature": "sha1=" + hmac.new(key, body, hashlib.sha1).hexdigest(),
            "X-Hub-Signature-256": "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest(),
        }


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [GitHubProvider]
