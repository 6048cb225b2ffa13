"""The webhook listener: a plain ASGI app, because this is the hot path and every microsecond a framework
spends on request objects and routing is paid by every webhook.

One path for a webhook: admit (path, method, load, size of headers, sender address) -> read the body
(bounded in size and time) -> verify the signature on the exact bytes -> parse JSON -> canonical event ->
match routes -> store event + deliveries in one durable commit -> answer -> wake delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.addresses import client_address, contains
from gateway.providers import Provider, Rejected
from gateway.storage import NewDelivery, StorageUnavailable

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.events import Event
    from gateway.routing import CompiledRoute, Endpoint

log = logging.getLogger("hookyard.ingress")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

# Never persisted with an event: credentials a sender or a proxy may attach.
UNSTORED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})

_JSON_HEADERS = [(b"content-type", b"application/json")]


class Ingress:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        gateway = self.gateway
        endpoint = gateway.table.endpoints.get(scope["path"])
        source = endpoint.name if endpoint is not None else ""
        if self.in_flight >= gateway.config.limits.max_concurrent_requests:
            # Shed load before reading anything: a quick 503 lets the provider retry later.
            await self._reject(
                send, source, Rejected(503, "overloaded", "too many requests in progress"), scope
            )
            return
        self.in_flight += 1
        try:
            status, body = await self._handle(scope, receive, endpoint)
        except Rejected as rejection:
            await self._reject(send, source, rejection, scope)
            return
        finally:
            self.in_flight -= 1
        await _respond(send, 200, body)
        gateway.metrics.webhooks_received.labels(source, status).inc()
        gateway.metrics.ingest_duration.labels(source).observe(time.perf_counter() - started)

    async def _handle(
        self, scope: Scope, receive: Receive, endpoint: Endpoint | None
    ) -> tuple[str, dict[str, Any]]:
        """Everything between the request line and the answer; raises Rejected for any refusal."""
        gateway = self.gateway
        limits = gateway.config.limits
        if endpoint is None:
            raise Rejected(404, "unknown_path", "no source listens on this path")
        if scope["method"] != "POST":
            raise Rejected(405, "method_not_allowed", "use POST")
        headers = _headers(scope, limits.max_headers, limits.max_header_bytes)
        if endpoint.allow:
            client = scope.get("client")
            address = client_address(
                client[0] if client else None,
                headers,
                gateway.table.trusted_proxies,
                gateway.config.listen.forwarded_header,
            )
            if address is None or not contains(endpoint.allow, address):
                raise Rejected(403, "ip_denied", "this address may not send to this source")
        try:
            async with asyncio.timeout(limits.read_timeout):
                body = await _read_body(receive, headers, limits.max_body_bytes)
        except TimeoutError:
            raise Rejected(408, "body_timeout", "the body did not arrive in time") from None
        received_at = time.time()
        verified = self._verify(endpoint, headers, body, received_at)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise Rejected(400, "invalid_json", "the body is not valid JSON") from None
        unstored = endpoint.provider.secret_headers
        kept = {
            name: value
            for name, value in headers.items()
            if name not in UNSTORED_HEADERS and name not in unstored
        }
        event = endpoint.provider.parse(kept, body, payload, received_at)
        event.verified = verified
        return await self._store(event, endpoint.provider)

    def _verify(self, endpoint: Endpoint, headers: dict[str, str], body: bytes, now: float) -> bool:
        try:
            endpoint.provider.verify(headers, body, now)
        except Rejected as rejection:
            if not endpoint.log_only or rejection.status != 401:
                raise
            # verify: log-only, while a source is being migrated: count and keep the event, marked.
            self.gateway.metrics.unverified.labels(endpoint.name, rejection.reason).inc()
            log.warning(
                "accepting unverified webhook (verify: log-only)",
                extra={"source": endpoint.name, "reason": rejection.reason},
            )
            return False
        return endpoint.provider.verifies

    async def _store(self, event: Event, provider: Provider) -> tuple[str, dict[str, Any]]:
        gateway = self.gateway
        routes = gateway.table.match(event)
        try:
            stored = await gateway.storage.ingest(event, plan_deliveries(routes))
        except StorageUnavailable as exc:
            log.error("cannot store webhook", extra={**event.summary(), "error": str(exc)})
            raise Rejected(503, "storage_unavailable", "not stored; please retry") from None
        if stored:
            if routes:
                gateway.engine.wake()
            if gateway.observes_events:
                try:
                    gateway.pm.hook.event_accepted(event=event, routes=[route.name for route in routes])
                except Exception:
                    # The event is stored: a plugin's failure must not turn its answer into an error.
                    log.exception("an event_accepted hook failed", extra=event.summary())
        status = "accepted" if stored else "duplicate"
        return status, {**(provider.reply(event) or {}), "id": event.id, "status": status}

    async def _reject(self, send: Send, source: str, rejection: Rejected, scope: Scope) -> None:
        self.gateway.metrics.rejected(source, rejection.reason)
        if rejection.status >= 500 or rejection.status in (401, 403):
            client = scope.get("client")
            log.info(
                "webhook rejected",
                extra={
                    "source": source,
                    "reason": rejection.reason,
                    "status": rejection.status,
                    "client": client[0] if client else None,
                },
            )
        extra = _EXTRA_HEADERS.get(rejection.status)
        await _respond(send, rejection.status, {"error": rejection.reason, "detail": rejection.detail}, extra)


# Retry-After on 503 tells well-behaved senders when to come back; Allow on 405 names the method.
_EXTRA_HEADERS = {503: [(b"retry-after", b"5")], 405: [(b"allow", b"POST")]}


def plan_deliveries(routes: list[CompiledRoute]) -> list[NewDelivery]:
    return [
        NewDelivery(route.name, action.key, action.after, action.when)
        for route in routes
        for action in route.actions
    ]


def _headers(scope: Scope, max_count: int, max_bytes: int) -> dict[str, str]:
    raw = scope["headers"]
    if len(raw) > max_count or sum(len(name) + len(value) for name, value in raw) > max_bytes:
        raise Rejected(431, "headers_too_large", "too many or too large headers")
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        # A repeated header is one comma-separated value (RFC 9110), so a second signature header can
        # never silently replace the first.
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Rejected(400, "client_disconnected", "the client went away before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> Rejected:
    return Rejected(413, "body_too_large", f"the limit is {limit} bytes")


async def _respond(
    send: Send, status: int, body: dict[str, Any], extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    content = orjson.dumps(body)
    headers = [*_JSON_HEADERS, (b"content-length", str(len(content)).encode())]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
