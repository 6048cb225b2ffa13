"""The webhook listener: a plain ASGI app, because this is the hot path and every microsecond a framework
spends on request objects and routing is paid by every webhook.

One path for a webhook: read the body (bounded) -> verify the signature on the exact bytes -> parse JSON ->
canonical event -> match routes -> store event + deliveries in one durable commit -> answer -> wake delivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.providers import Rejected
from gateway.storage import NewDelivery, StorageUnavailable

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.routing import CompiledRoute

log = logging.getLogger("hookyard.ingress")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

# Never persisted with an event: credentials a sender or a proxy may attach.
UNSTORED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})

_JSON_HEADERS = [(b"content-type", b"application/json")]


class BodyTooLarge(Exception):
    pass


class Ingress:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        gateway = self.gateway
        started = time.perf_counter()
        endpoint = gateway.table.endpoints.get(scope["path"])
        if endpoint is None:
            gateway.metrics.rejected("", "unknown_path")
            await _respond(send, 404, {"error": "unknown_path", "detail": "no source listens on this path"})
            return
        source = endpoint.name
        if scope["method"] != "POST":
            gateway.metrics.rejected(source, "method_not_allowed")
            await _respond(
                send, 405, {"error": "method_not_allowed", "detail": "use POST"}, [(b"allow", b"POST")]
            )
            return

        headers = _headers(scope)
        try:
            body = await _read_body(receive, headers, gateway.config.limits.max_body_bytes)
            received_at = time.time()
            endpoint.provider.verify(headers, body, received_at)
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise Rejected(400, "invalid_json", "the body is not valid JSON") from None
            kept = {name: value for name, value in headers.items() if name not in UNSTORED_HEADERS}
            event = endpoint.provider.parse(kept, body, payload, received_at)
        except BodyTooLarge:
            gateway.metrics.rejected(source, "body_too_large")
            limit = gateway.config.limits.max_body_bytes
            await _respond(send, 413, {"error": "body_too_large", "detail": f"the limit is {limit} bytes"})
            return
        except Rejected as rejection:
            gateway.metrics.rejected(source, rejection.reason)
            log.info(
                "webhook rejected",
                extra={
                    "source": source,
                    "reason": rejection.reason,
                    "status": rejection.status,
                    "client": _client(scope),
                },
            )
            await _respond(send, rejection.status, {"error": rejection.reason, "detail": rejection.detail})
            return

        routes = gateway.table.match(event)
        try:
            stored = await gateway.storage.ingest(event, plan_deliveries(routes))
        except StorageUnavailable as exc:
            gateway.metrics.rejected(source, "storage_unavailable")
            log.error("cannot store webhook", extra={**event.summary(), "error": str(exc)})
            await _respond(
                send,
                503,
                {"error": "storage_unavailable", "detail": "not stored; please retry"},
                [(b"retry-after", b"5")],
            )
            return

        status = "accepted" if stored else "duplicate"
        await _respond(send, 200, {"id": event.id, "status": status})
        gateway.metrics.webhooks_received.labels(source, status).inc()
        gateway.metrics.ingest_duration.labels(source).observe(time.perf_counter() - started)
        if stored:
            if routes:
                gateway.engine.wake()
            if gateway.observes_events:
                gateway.pm.hook.event_accepted(event=event, routes=[route.name for route in routes])


def plan_deliveries(routes: list[CompiledRoute]) -> list[NewDelivery]:
    return [
        NewDelivery(route.name, action.key, action.after, action.when)
        for route in routes
        for action in route.actions
    ]


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        # A repeated header is one comma-separated value (RFC 9110), so a second signature header can
        # never silently replace the first.
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Rejected(400, "client_disconnected", "the client went away before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


async def _respond(
    send: Send, status: int, body: dict[str, Any], extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    content = orjson.dumps(body)
    headers = [*_JSON_HEADERS, (b"content-length", str(len(content)).encode())]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
