"""Svix / Standard Webhooks signatures (Consignease uses them).

Signed content is `{id}.{timestamp}.{body}`, HMAC-SHA256 keyed by the base64 part of a `whsec_` secret;
the signature header holds space-separated `v1,<base64>` entries (several during key rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from gateway import hookimpl
from gateway.config import Source
from gateway.events import Event
from gateway.providers import (
    Provider,
    any_digest_matches,
    bad_request,
    parse_timestamp,
    require_text,
    unauthorized,
)

# More entries than this is not key rotation but an attempt to make us burn CPU.
MAX_SIGNATURES = 10


def decode_secret(secret: str) -> bytes:
    """`whsec_<base64>` (or bare base64) -> key bytes; ValueError names the problem, never the secret."""
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not a whsec_ secret: the part after whsec_ must be base64") from None
    if not key:
        raise ValueError("is an empty whsec_ secret")
    return key


def sign(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """One `v1,<base64>` signature, as a sender computes it."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class SvixProvider(Provider):
    name = "svix"
    description = "Svix / Standard Webhooks: svix-* or webhook-* headers, whsec_ secrets, v1 HMAC-SHA256"
    header_prefixes: tuple[str, ...] = ("svix-", "webhook-")

    def __init__(self, source_name: str, source: Source) -> None:
        super().__init__(source_name, source)
        keys = []
        for index, secret in enumerate(self.secrets):
            try:
                keys.append(decode_secret(secret))
            except ValueError as exc:
                raise ValueError(f"secrets[{index}] {exc}") from None
        self.keys = keys

    def _headers(self, headers: Mapping[str, str]) -> tuple[str, str, str]:
        for prefix in self.header_prefixes:
            msg_id = headers.get(prefix + "id")
            if msg_id is not None:
                return msg_id, headers.get(prefix + "timestamp", ""), headers.get(prefix + "signature", "")
        return "", "", ""

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        msg_id, timestamp, signature = self._headers(headers)
        if not msg_id or not signature:
            raise unauthorized("missing_signature", "missing svix-id/svix-signature headers")
        if not timestamp:
            raise unauthorized("missing_timestamp", "missing svix-timestamp header")
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
            raise unauthorized("invalid_timestamp", "the timestamp must be whole seconds since the epoch")
        if abs(now - int(timestamp)) > self.tolerance:
            raise unauthorized("timestamp_out_of_tolerance", "the timestamp is too old or too new")
        offered = []
        for entry in signature.split(" ")[:MAX_SIGNATURES]:
            version, _, value = entry.partition(",")
            if version != "v1" or not value:
                continue
            try:
                offered.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                continue
        signed = f"{msg_id}.{timestamp}.".encode() + body
        expected = [hmac.new(key, signed, hashlib.sha256).digest() for key in self.keys]
        if not any_digest_matches(expected, offered):
            raise unauthorized("invalid_signature", "no signature matches")

    def parse(self, headers: Mapping[str, str], body: bytes, payload: Any, received_at: float) -> Event:
        if not isinstance(payload, dict):
            raise bad_request("invalid_payload", "the body must be a JSON object")
        msg_id, timestamp, _ = self._headers(headers)
        occurred_at = parse_timestamp(payload.get("timestamp"))
        if occurred_at is None and timestamp.isdigit():
            occurred_at = float(timestamp)
        return Event(
            source=self.source_name,
            id=require_text(msg_id, "missing_event_id", "missing svix-id header"),
            type=require_text(payload.get("type"), "missing_event_type", "the payload has no type"),
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
        prefix = self.header_prefixes[0]
        return {
            f"{prefix}id": event_id,
            f"{prefix}timestamp": str(int(now)),
            f"{prefix}signature": sign(self.keys[0], event_id, int(now), body),
        }


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [SvixProvider]
