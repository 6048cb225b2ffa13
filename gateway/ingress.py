"""The webhook listener's steps, in order: admit (load, path, method, headers, sender address, declared
size) -> read the body (bounded in size and time) -> verify the signature on the exact bytes -> parse JSON
-> canonical event -> match routes -> store event + deliveries in one durable commit -> answer, and start
the deliveries (or queue them for the engine).

A request comes in through one of two doors, and both take these same steps: the listener's HTTP protocol
takes the common case (a POST to a source's path) straight from the HTTP parser, without an ASGI cycle or a
task per request (gateway/protocol.py: this is the hot path, and every microsecond spent on it is paid by
every webhook); `Ingress` as a plain ASGI app takes everything else (other paths and methods, a sender
that expects `100 Continue`).
"""

from __future__ import annotations

import asyncio
import logging
import reprlib
import time
from collections.abc import Callable
from types import CodeType, TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from gateway.addresses import client_address, contains
from gateway.events import BYTE_ORDER_MARK, UNSTORED_HEADERS
from gateway.logs import Throttle
from gateway.plugins import plugin_of, raised_by
from gateway.providers import Provider, Rejected
from gateway.storage import Ingested, NewDelivery, StorageUnavailable, Unconfirmed

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.events import Event
    from gateway.routing import CompiledRoute, Endpoint

log = logging.getLogger("hookyard.ingress")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
Reply = dict[str, Any]

# A bug (in a provider plugin, say) must not leave the sender without an answer, nor show it a traceback.
INTERNAL_ERROR = Rejected(500, "internal_error", "the request could not be handled; see the gateway's log")


# A provider plugin that raised something other than Rejected (a bug), or gave an event the store refused:
# nothing was stored, so the sender is told to retry, as it will once the plugin is fixed.
def provider_failed(provider: str) -> Rejected:
    return Rejected(
        500,
        "provider_failed",
        f"the {provider} provider failed on this request (a bug in it, see the gateway's log); nothing was "
        "stored: retry later",
    )


# A flood of connections, or of requests refused 401, 403 or 5xx, comes as fast as anyone sends it: the log
# says so once a minute (for refusals, per source and reason), the metric counts each one.
_FULL_LOG_INTERVAL = 60.0  # seconds

# Retry-After on 503 tells well-behaved senders when to come back; Allow on 405 names the method.
EXTRA_HEADERS = {503: [(b"retry-after", b"5")], 405: [(b"allow", b"POST")]}

_JSON_HEADERS = [(b"content-type", b"application/json")]

# Set by the listener's protocol in the scope of a request the ASGI door has, when the HTTP parser finds
# its body malformed (a bad chunk): the parser's error. The body ends there, and its reading is refused
# invalid_http, as the fast path refuses its own; the connection the protocol then closes is not the
# client leaving.
MALFORMED_BODY = "hookyard.malformed_body"

# A body cut off by its deadline may still be coming: uvicorn would read the rest as the body and keep the
# connection, so a client that gave up on it and sent its next request there would have it swallowed.
# Closed instead, as the fast path does (RFC 9110 §15.5.9).
_CLOSE = [(b"connection", b"close")]


# orjson reads JSON nested this deep at most, and says "depth limit exceeded" past it.
JSON_DEPTH_LIMIT = 1024


def _json_after_bom(body: bytes, refused: orjson.JSONDecodeError) -> Any:
    """A body orjson refused: JSON after a UTF-8 byte order mark, which some senders write first and RFC
    8259 lets a parser ignore (the body is stored and forwarded as it came, mark included)."""
    if body.startswith(BYTE_ORDER_MARK):
        try:
            return orjson.loads(body[3:])
        except orjson.JSONDecodeError as again:
            refused = again
    if str(refused).startswith("depth limit exceeded"):
        # Read no further than that, so it may be valid JSON: "not valid" would send its sender looking for
        # a syntax error.
        raise Rejected(
            400,
            "invalid_json",
            f"the body nests more than {JSON_DEPTH_LIMIT} levels deep, more than the gateway reads",
        )
    raise Rejected(400, "invalid_json", "the body is not valid JSON")


def _check_codings(headers: dict[str, str]) -> None:
    """A body is verified and parsed as it comes: one that is compressed would be refused as a bad
    signature or as not JSON, which says nothing of the cause."""
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise Rejected(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed",
        )
    transfer = headers.get("transfer-encoding")
    if transfer is not None and transfer.strip().lower() != "chunked":
        # RFC 9112 6.1: a transfer coding the server does not understand is answered 501.
        raise Rejected(
            501,
            "unsupported_transfer_encoding",
            f"Transfer-Encoding {transfer!r} is not understood: only chunked is",
        )


class NotAnEvent(Exception):
    """A provider's parse that returned something other than an Event, or one whose id or type is not
    text: a bytes or an integer would be stored as such (a BLOB, an INTEGER) and answered 2xx, though no id
    given as text finds it again, and the admin API cannot show it."""

    def __init__(self, what: str, kind: str) -> None:
        super().__init__(what)
        self.kind = kind  # what the log's throttle tells failures apart by: not the value, each webhook's own


def as_plain_text(event: Event) -> None:
    """Make the event's id and type plain str where they are a subclass of it (a StrEnum, say: a str, as
    the store and the admin API take it), or raise NotAnEvent where either is not text at all."""
    for field in ("id", "type"):
        value = getattr(event, field)
        if isinstance(value, str):
            setattr(event, field, str.__str__(value))
            continue
        kind = type(value).__name__
        # Shown cut short: a provider may have put a whole body there.
        raise NotAnEvent(
            f"made an event whose {field} is {reprlib.repr(value)} (a {kind}), not a str", f"{field} {kind}"
        )


class Ingress:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.in_flight = 0  # admitted requests not answered yet
        # The listener's limit of open connections: listen.max_connections, or less where the process's
        # open-file limit cannot hold that many (gateway.app.fit_connections).
        self.max_connections = gateway.config.listen.max_connections
        # The lines a sender without a secret causes: `webhook rejected`, the listener's malformed requests
        # and its connections past max_connections.
        self.log_throttle = Throttle(_FULL_LOG_INTERVAL)

    # -- the steps, shared by both doors ----------------------------------------------------------------

    def endpoint(self, scope: Scope) -> Endpoint | None:
        endpoint = self.gateway.table.endpoints.get(scope["path"])
        # The path is decoded from the request line, where an encoded slash (%2F) belongs to its segment:
        # it is no separator, and `/webhooks%2Fconsignly` is not `/webhooks/consignly`, which its decoding
        # reads as. (The fast path takes no path with a %-escape.)
        if endpoint is not None and b"%2f" in (scope.get("raw_path") or b"").lower():
            return None
        return endpoint

    def admit(self, scope: Scope, endpoint: Endpoint | None) -> dict[str, str]:
        """Everything decided before the body: raises Rejected. An admitted request is in flight until
        `release()`."""
        gateway = self.gateway
        limits = gateway.config.limits
        if self.in_flight >= limits.max_concurrent_requests:
            # Shed load before reading anything: a quick 503 lets the provider retry later.
            raise Rejected(503, "overloaded", "too many requests in progress")
        if endpoint is None:
            raise Rejected(404, "unknown_path", "no source listens on this path")
        if scope["method"] != "POST":
            raise Rejected(405, "method_not_allowed", "use POST")
        headers = _headers(scope, limits.max_headers, limits.max_header_bytes, endpoint)
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
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_large(limits.max_body_bytes)
        if "content-encoding" in headers or "transfer-encoding" in headers:
            _check_codings(headers)
        self.in_flight += 1
        return headers

    def release(self) -> None:
        self.in_flight -= 1

    def too_many_connections(self) -> None:
        """Count a connection refused past max_connections (under no source: nothing of it is read), and
        say so in the log at most once a minute."""
        self.gateway.metrics.rejected("", "too_many_connections")
        suppressed = self.log_throttle.admit("too_many_connections")
        if suppressed is not None:
            log.warning(
                "the webhook listener has %d connections open (listen.max_connections): new ones are "
                "refused 503 too_many_connections",
                self.max_connections,
                extra={"max_connections": self.max_connections, "suppressed": suppressed},
            )

    def accept(
        self, endpoint: Endpoint, headers: dict[str, str], body: bytes
    ) -> tuple[Event, list[CompiledRoute]]:
        """Verify, parse and route a whole request; raises Rejected."""
        received_at = time.time()
        verified = self._verify(endpoint, headers, body, received_at)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as refused:
            payload = _json_after_bom(body, refused)
        # A copy, with the few names never stored taken out: a comprehension that tested every header
        # against both sets ran Python for each header of every webhook, about twice the cost.
        kept = headers.copy()
        for name in (*UNSTORED_HEADERS, *endpoint.provider.secret_headers):
            kept.pop(name, None)
        event = endpoint.provider.parse(kept, body, payload, received_at)
        try:
            event.verified = verified
        except AttributeError:  # (free unless raised) a provider's parse that returned None, say
            raise NotAnEvent(f"returned {type(event).__name__}, not an Event", type(event).__name__) from None
        if type(event.id) is not str or type(event.type) is not str:  # two checks, no call, per webhook
            as_plain_text(event)
        # By the endpoint's table, not the running one: a reload may have swapped it since the headers.
        return event, endpoint.match(event)

    def store(self, event: Event, routes: list[CompiledRoute]) -> asyncio.Future[Ingested]:
        """Start the durable commit of the event and its deliveries; the future says whether it was new,
        or fails with StorageUnavailable. Once it is done the engine starts or queues the deliveries."""
        if not routes:
            return self.gateway.storage.begin_ingest(event, [])
        engine = self.gateway.engine
        deliveries = plan_deliveries(routes)
        lease = engine.lease(deliveries)
        stored = self.gateway.storage.begin_ingest(event, deliveries, lease)
        engine.follow(deliveries, lease, stored)
        return stored

    def unstored(self, event: Event, routes: list[CompiledRoute], exc: StorageUnavailable) -> Rejected:
        if isinstance(exc, Unconfirmed):
            # Written, but its fsync did not answer in time: it may be stored, and its deliveries run.
            log.error("cannot confirm webhook stored", extra={**event.summary(), "error": str(exc)})
            ingested: Ingested = exc.result
            if ingested.new and self.gateway.observes_events:
                # Observers are told of what runs: its deliveries do, and the sender's retry is answered
                # `duplicate` if the event reached the disk, so this is the one time they can be.
                self._accepted(event, routes)
            return Rejected(503, "storage_unavailable", "not confirmed stored; please retry")
        log.error("cannot store webhook", extra={**event.summary(), "error": str(exc)})
        return Rejected(503, "storage_unavailable", "not stored; please retry")

    def stored(
        self, endpoint: Endpoint, event: Event, routes: list[CompiledRoute], new: bool
    ) -> tuple[str, Reply]:
        """After the commit: tell observers; the status and the reply to send."""
        if new and self.gateway.observes_events:
            self._accepted(event, routes)
        status = "accepted" if new else "duplicate"
        try:
            return status, {**(endpoint.provider.reply(event) or {}), "id": event.id, "status": status}
        except Exception:
            # A plugin's reply() that raised or gave no mapping: the event is stored, and its deliveries run,
            # so the sender is told so, as it would be told again each time it retried.
            log.exception("a provider's reply failed; answered without it", extra=event.summary())
            return status, {"id": event.id, "status": status}

    def _accepted(self, event: Event, routes: list[CompiledRoute]) -> None:
        """Tell the event_accepted hooks of a new event whose commit is written."""
        hook = self.gateway.pm.hook.event_accepted
        try:
            hook(event=event, routes=[route.name for route in routes])
        except BaseException as exc:  # a SystemExit too: it would end `serve`
            # The event is written: a plugin's failure must not change its answer.
            log.error(
                "an event_accepted hook failed",
                exc_info=exc,
                extra={**event.summary(), "plugin": raised_by(hook, exc)},
            )

    def failed(self, endpoint: Endpoint, exc: BaseException) -> Rejected:
        """A request that raised something other than Rejected before its commit: the refusal to answer. The
        provider's own bug when its traceback passes through one of its methods (verify, parse, event_type,
        ...): named, with the hook, at most once a minute per source, hook and exception, since every
        webhook of the source raises it until the plugin is fixed; otherwise one of Hookyard's."""
        provider = endpoint.provider
        if isinstance(exc, NotAnEvent):
            self._provider_failed(endpoint, "parse", str(exc), exc.kind, None)
            return provider_failed(provider.name)
        hook = _provider_hook(provider, exc.__traceback__)
        if hook is None:
            if self.log_throttle.admit(endpoint.name, "internal_error", type(exc).__name__) is not None:
                log.error("a webhook could not be handled", exc_info=exc, extra={"source": endpoint.name})
            return INTERNAL_ERROR
        self._provider_failed(endpoint, hook, f"raised {type(exc).__name__}: {exc}", type(exc).__name__, exc)
        return provider_failed(provider.name)

    def _provider_failed(
        self, endpoint: Endpoint, hook: str, what: str, kind: str, exc: BaseException | None
    ) -> None:
        """Log a provider's failure, at most once a minute per source, hook and kind of failure (the
        exception's class): a bug that fails every webhook would otherwise write a line for each."""
        provider = endpoint.provider
        suppressed = self.log_throttle.admit(endpoint.name, "provider_failed", hook, kind)
        if suppressed is None:
            return
        plugin = plugin_of(self.gateway.pm, type(provider))
        log.error(
            "the %s provider (plugin %s): %s %s; answered 500 provider_failed, nothing stored",
            provider.name,
            plugin,
            hook,
            what,
            exc_info=exc,
            extra={
                "source": endpoint.name,
                "provider": provider.name,
                "plugin": plugin,
                "hook": hook,
                "suppressed": suppressed,
            },
        )

    def answered(self, source: str, status: str, started: float) -> None:
        self.gateway.metrics.answered(source, status, time.perf_counter() - started)

    def refused(self, source: str, rejection: Rejected, scope: Scope) -> Reply:
        """Count and log a refusal; the reply to send with its status."""
        self.gateway.metrics.rejected(source, rejection.reason)
        if rejection.status >= 500 or rejection.status in (401, 403):
            suppressed = self.log_throttle.admit(source, rejection.reason)
            if suppressed is not None:
                client = scope.get("client")
                log.info(
                    "webhook rejected",
                    extra={
                        "source": source,
                        "reason": rejection.reason,
                        "status": rejection.status,
                        "client": client[0] if client else None,
                        "suppressed": suppressed,
                    },
                )
        return {"error": rejection.reason, "detail": rejection.detail}

    def _verify(self, endpoint: Endpoint, headers: dict[str, str], body: bytes, now: float) -> bool:
        try:
            endpoint.provider.verify(headers, body, now)
        except Rejected as rejection:
            if not endpoint.log_only or rejection.status != 401:
                raise
            # verify: log-only, while a source is being migrated: count and keep the event, marked.
            self.gateway.metrics.unverified.labels(endpoint.name, rejection.reason).inc()
            # Anyone who can reach the listener can send these, and each is stored: a line for each would
            # let them flood the log too. The metric counts every one; `events list` shows them.
            suppressed = self.log_throttle.admit(endpoint.name, rejection.reason, "unverified")
            if suppressed is not None:
                log.warning(
                    "accepting unverified webhook (verify: log-only)",
                    extra={"source": endpoint.name, "reason": rejection.reason, "suppressed": suppressed},
                )
            return False
        return endpoint.provider.verifies

    # -- the ASGI door: what the protocol's fast path leaves --------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        endpoint = self.endpoint(scope)
        source = endpoint.name if endpoint is not None else ""
        try:
            headers = self.admit(scope, endpoint)
        except Rejected as rejection:
            await self._refuse(send, source, rejection, scope)
            return
        assert endpoint is not None  # admitted
        try:
            status, reply = await self._receive_and_store(scope, receive, endpoint, headers)
        except Rejected as rejection:
            await self._refuse(send, source, rejection, scope)
            return
        except (asyncio.CancelledError, GeneratorExit):  # a coroutine closed while it waits: no answer
            raise
        except BaseException as exc:  # a provider's SystemExit too: it must not end `serve`
            await self._refuse(send, source, self.failed(endpoint, exc), scope)
            return
        finally:
            self.release()
        try:
            await _respond(send, 200, reply)
        except orjson.JSONEncodeError:  # a provider's reply() holds what JSON cannot; nothing is sent yet
            log.exception("a webhook's answer could not be written", extra={"source": source})
            await self._refuse(send, source, INTERNAL_ERROR, scope)
            return
        self.answered(source, status, started)

    async def _receive_and_store(
        self, scope: Scope, receive: Receive, endpoint: Endpoint, headers: dict[str, str]
    ) -> tuple[str, Reply]:
        limits = self.gateway.config.limits
        try:
            async with asyncio.timeout(limits.read_timeout):
                body = await _read_body(receive, limits.max_body_bytes, scope)
        except TimeoutError:
            raise body_timeout() from None
        event, routes = self.accept(endpoint, headers, body)
        try:
            # Shielded: a cancelled request (a shutdown's deadline) must not cancel what the store still
            # commits, or the engine would never start the deliveries it leased.
            new = (await asyncio.shield(self.store(event, routes))).new
        except StorageUnavailable as exc:
            raise self.unstored(event, routes, exc) from None
        return self.stored(endpoint, event, routes, new)

    async def _refuse(self, send: Send, source: str, rejection: Rejected, scope: Scope) -> None:
        reply = self.refused(source, rejection, scope)
        extra = _CLOSE if rejection.status == 408 else EXTRA_HEADERS.get(rejection.status)
        await _respond(send, rejection.status, reply, extra)


def _provider_hook(provider: Any, tb: TracebackType | None) -> str | None:
    """The provider's method (verify, parse, event_type, ...) the traceback passes through last, or None.
    Frames are matched by their code, never by their locals: on Python 3.11 reading a frame's f_locals keeps
    a copy of them on the frame, and the handler's holds the exception, whose traceback holds the frame, so
    each failed request (its body, its event) would stay until a collection, which a frozen heap makes rare.
    """
    cls = type(provider)
    codes = _PROVIDER_CODES.get(cls)
    if codes is None:
        codes = _PROVIDER_CODES[cls] = _provider_codes(cls)
    hook = None
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            hook = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return hook


_PROVIDER_CODES: dict[type, frozenset[CodeType]] = {}


def _provider_codes(cls: type) -> frozenset[CodeType]:
    """The code of every method the provider's own classes define, mixins among them: not Hookyard's
    Provider base class (nor its bases), whose bugs are Hookyard's."""
    codes: set[CodeType] = set()
    for klass in cls.__mro__:
        if klass in Provider.__mro__:
            continue
        for value in vars(klass).values():
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            functions = (value.fget, value.fset, value.fdel) if isinstance(value, property) else (value,)
            for function in functions:
                while function is not None:
                    code = getattr(function, "__code__", None)
                    if isinstance(code, CodeType):
                        codes.add(code)
                    function = getattr(function, "__wrapped__", None)
    return frozenset(codes)


def plan_deliveries(routes: list[CompiledRoute]) -> list[NewDelivery]:
    return [delivery for route in routes for delivery in route.deliveries]


def too_large(limit: int) -> Rejected:
    return Rejected(413, "body_too_large", f"the limit is {limit} bytes")


def body_timeout() -> Rejected:
    return Rejected(408, "body_timeout", "the body did not arrive in time")


def client_disconnected() -> Rejected:
    return Rejected(400, "client_disconnected", "the client went away before sending the body")


def repeated_header(name: str) -> Rejected:
    return Rejected(
        400, "repeated_header", f"the {name} header came more than once; it holds one value: send it once"
    )


def invalid_http(error: Exception) -> Rejected:
    return Rejected(400, "invalid_http", f"the body is not valid HTTP/1.1 ({error})")


def _headers(scope: Scope, max_count: int, max_bytes: int, endpoint: Endpoint) -> dict[str, str]:
    raw = scope["headers"]
    if len(raw) > max_count:
        raise Rejected(431, "headers_too_large", "too many or too large headers")
    headers: dict[str, str] = {}
    size = 0
    for raw_name, raw_value in raw:
        size += len(raw_name) + len(raw_value)
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if name in headers:
            # A header its provider reads one value from (an id, a type, a timestamp, one signature) is
            # refused: joined, `x, x` would be an event id of its own, past deduplication against x.
            # Looked up only here, as repeats are rare.
            if name in endpoint.provider.single_headers:
                raise repeated_header(name)
            # Any other is one comma-separated value (RFC 9110), so a second signature header can never
            # silently replace the first.
            headers[name] = f"{headers[name]}, {value}"
        else:
            headers[name] = value
    if size > max_bytes:
        raise Rejected(431, "headers_too_large", "too many or too large headers")
    return headers


async def _read_body(receive: Receive, limit: int, scope: Scope) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if MALFORMED_BODY in scope:
            raise invalid_http(scope[MALFORMED_BODY])
        if message["type"] == "http.disconnect":
            raise client_disconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(
    send: Send, status: int, body: Reply, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    content = orjson.dumps(body)
    headers = [*_JSON_HEADERS, (b"content-length", str(len(content)).encode())]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
