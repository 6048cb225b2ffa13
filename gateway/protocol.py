"""The webhook listener's HTTP/1.1 protocol: uvicorn's httptools protocol with the webhook fast path, a
deadline for headers and body, and one write per response.

The fast path: a POST to a source's path is taken straight from the HTTP parser's callbacks. uvicorn would
build an ASGI cycle for it and run the app in a task of its own, with receive() and send() coroutines; here
the request goes through the same steps as in the ASGI app (gateway.ingress.Ingress: admit, accept, store,
answer), called from the parser's callbacks, and its answer is written from the storage commit's callback.
No task, no coroutine, no ASGI message: on a webhook listener that is most of what a request costs beyond
its own work. Everything else (other paths and methods, `Expect: 100-continue` in HTTP/1.1) goes to the
ASGI app as usual. A webhook that is the connection's only request in progress (the common case: not
pipelined behind another) does not even get uvicorn's request cycle, with its asyncio.Event and its parsed
URL: a `FastCycle` holds what the protocol reads of it.

Deadlines: uvicorn bounds idle keep-alive connections but not a client that opens a connection and then
sends its request line and headers a byte at a time (slowloris): each such connection would hold a file
descriptor for ever. Here a request's headers must be complete within the listener's read timeout, counted
from the connection or from the request's first byte; otherwise it is answered 408 and closed. A fast-path
request's body then has the read timeout again (408 body_timeout, as the ASGI app answers). A head that goes
on past limits.max_header_bytes (and room for the request line) is answered 431 and closed as it arrives,
rather than held until it ends.

Malformed HTTP: uvicorn answers 400 and closes the connection as soon as the parser fails. Here, what fails
behind requests still in progress (pipelined) is answered 400 after them: each of their senders hears
whether its webhook was stored. A webhook whose own body is malformed (a bad chunk) is refused
`400 invalid_http` under its source, on the fast path or by the ASGI app (`MALFORMED_BODY`).

Upgrade: this listener switches to no other protocol. A request that asks to (`Upgrade: h2c`, sent by Java's
HttpClient with every cleartext request) is answered in HTTP/1.1 like any other, body included, where
httptools would drop its body (UpgradeIgnoring, which the ops listener's protocol shares).

uvicorn writes a response's head and its body separately, and each write is a send() system call: for a
webhook's small answer that is half of the cost of answering. Writes made in one turn of the event loop
are joined into one (`CoalescedWrites`). A fast-path answer is written at once, where the ASGI app's waits
until what was written before it has drained: while its client leaves answers unread, a connection reads no
further requests (pause_writing), so those answers cannot pile up.

Closing: a connection closed after its answer (408, 431, 400 invalid_http, `Connection: close`, a
connection past listen.max_connections) may still have its client sending (the rest of a body or of a
head, a request it sent before reading): closed with that unread, it would be reset, and the client would
read ECONNRESET instead of the answer. It is half-closed instead, and what the client sends is read and
dropped until it closes its side, or for a second (`LingeringClose`, RFC 9112 §9.6). A TLS connection has
no half-close: it is closed at once when its client has sent all it has to send (its requests read whole
and answered), so that a client reading to the end has the end with the answer, and lingers otherwise.
An idle connection (at limits.idle_timeout, or as the listener stops) is closed at once, over TLS too: its
close_notify is sent, and the client's is not waited for. So is one still lingering as the listener stops
(LingeringClose.end). One whose request is still in progress when the listener's drain runs out (its body
still coming, or its commit) is aborted, unanswered (cut_off).

The ops listener's protocol (OpsProtocol) is uvicorn's, but for the end of its drain: a request cut off
then gets no answer either. And a request's head has a deadline and a bound there too (408, 431), and
its body a deadline (408).

Expect: a request whose client waits for `100 Continue` and is refused before it is sent one closes its
connection after the answer, on both listeners (see _unanswered_if_cut_off).

HTTPS: the TLS handshake is the listener's own (`tls_protocol`), so that a connection counts against
listen.max_connections, and has a deadline, from the moment it is accepted.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Collection
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, cast

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from gateway.config import Limits
from gateway.ingress import (
    EXTRA_HEADERS,
    INTERNAL_ERROR,
    MALFORMED_BODY,
    Reply,
    body_timeout,
    client_disconnected,
    invalid_http,
    too_large,
)
from gateway.providers import Rejected
from gateway.storage import Ingested, StorageUnavailable

if TYPE_CHECKING:
    from gateway.events import Event
    from gateway.ingress import Ingress
    from gateway.routing import CompiledRoute, Endpoint

log = logging.getLogger("hookyard.ingress")


def _closing_answer(status: int, reason: str, detail: str) -> tuple[bytes, str]:
    """An answer for a request refused before it is one (its line and headers are not complete or not
    HTTP, or its connection is one too many): the same JSON reason as every refusal, then the connection
    is closed. With its reason, which is counted under no source (the path may never have been read)."""
    body = orjson.dumps({"error": reason, "detail": detail})
    head = STATUS_LINE[status] + b"content-type: application/json\r\nconnection: close\r\n"
    for name, value in EXTRA_HEADERS.get(status, ()):
        head += name + b": " + value + b"\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(body) + body, reason


_TIMED_OUT = _closing_answer(
    408, "header_timeout", "the request line and headers took longer than the read timeout"
)
_HEAD_TOO_LARGE = _closing_answer(
    431, "headers_too_large", "the request line and headers go on past the limit without ending"
)
_MALFORMED = _closing_answer(400, "invalid_http", "the request is not valid HTTP/1.1")
# The longest URL httptools parses (uvicorn parses it once the head is in): a longer one fails the parser,
# and is answered 414, as RFC 9112 §3 asks, not as HTTP that is malformed.
URL_LIMIT = 65535  # bytes
_URL_TOO_LONG = _closing_answer(414, "url_too_long", f"the URL is longer than {URL_LIMIT} bytes")
# Counted by Ingress.too_many_connections, which the listener over HTTPS shares.
_TOO_MANY_CONNECTIONS, _ = _closing_answer(
    503, "too_many_connections", "the listener has listen.max_connections connections open; retry later"
)
# A connection closed after its last answer is closed once its client has closed its side, or after this
# long (LingeringClose): what the client sends meanwhile is read and dropped first. Closed with that unread,
# the connection would be reset (RST), and the client could lose the answer it had not read yet.
_LINGER = 1.0  # seconds
# Connections lingering so at once, at most: their file descriptors are kept for them besides
# listen.max_connections (gateway.app.FILES_RESERVED). Past that, the one that has lingered longest is
# closed: a flood of clients that never close cannot take more.
LINGERING_AT_MOST = 64
# Beyond limits.max_header_bytes (the headers' names and values), what a request's head may hold: its
# line (a URL over URL_LIMIT is refused 414) and each header's punctuation.
_HEAD_ALLOWANCE = 128 * 1024

# A fast-path request's stages.
RECEIVING, STORING, ANSWERED = "receiving", "storing", "answered"


class _Unwaited:
    """uvicorn sets a cycle's message_event when the client leaves; nothing waits on a FastCycle's."""

    def set(self) -> None:
        pass


class FastCycle:
    """A webhook's request on the fast path, as uvicorn's protocol reads a request's cycle (connection_lost,
    shutdown, a pipelined request behind it). uvicorn's RequestResponseCycle would also make an asyncio.Event
    and the receive/send machinery of an ASGI app, which a webhook answered from the parser never uses."""

    __slots__ = ("body", "disconnected", "keep_alive", "more_body", "response_complete", "scope")
    waiting_for_100_continue = False
    message_event = _Unwaited()

    def __init__(self, scope: dict[str, Any], keep_alive: bool) -> None:
        self.scope = scope
        self.keep_alive = keep_alive
        # A body that comes in one chunk (the common case) is used as it came, without a copy.
        self.body: bytes | bytearray = b""
        self.more_body = True
        self.disconnected = False
        self.response_complete = False


Cycle = RequestResponseCycle | FastCycle


class Webhook:
    """One request on the fast path, from its headers to its answer."""

    __slots__ = ("cycle", "endpoint", "event", "headers", "routes", "stage", "started")

    def __init__(self, cycle: Cycle, endpoint: Endpoint, started: float) -> None:
        self.cycle = cycle
        self.endpoint = endpoint
        self.started = started
        self.stage = RECEIVING
        self.headers: dict[str, str] = {}
        self.event: Event | None = None
        self.routes: list[CompiledRoute] = []


class UpgradeIgnoring(HttpToolsProtocol):
    """uvicorn's protocol, but a request that asks to switch protocols (`Upgrade: h2c` and `Connection:
    Upgrade, HTTP2-Settings`, which Java's HttpClient sends with every cleartext request, or `Upgrade:
    websocket`) is answered in HTTP/1.1 like any other, body included. httptools stops after its headers
    and calls it complete without its body, which uvicorn then never reads: the request waits for it, or
    runs without it. Neither listener switches (no WebSockets, no h2c), and RFC 9110 §7.8 lets a server
    ignore Upgrade: the request is parsed again, by a new parser, without it."""

    cycle: Cycle  # type: ignore[assignment]  # uvicorn's, or a FastCycle
    # A request that asks to switch protocols, until it is parsed again without that (_ignore_upgrade):
    # the request in progress before it.
    _before_upgrade: tuple[Cycle] | None = None

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._feed(data)

    def _feed(self, data: bytes) -> bool:
        """Parse `data`; whether the parser took it all as it came (no error, no request to upgrade)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._invalid_http(error)
        except httptools.HttpParserUpgrade as upgrade:
            # Where the parser stopped: the request's body, and what follows it, are not parsed yet.
            self._parse_without_upgrade(memoryview(data)[upgrade.args[0] :])
        else:
            return True
        return False

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade():
            self._ignore_upgrade(self.cycle)
            return
        super().on_headers_complete()

    def _invalid_http(self, error: httptools.HttpParserError) -> None:
        """What the parser cannot read: uvicorn's answer (400, closed)."""
        message = "Invalid HTTP request received."
        self.logger.warning(message)
        self.send_400_response(message)

    def _url_too_long(self, error: httptools.HttpParserError) -> bool:
        """Whether the parser failed on the request's URL for its length alone (httptools.parse_url, which
        uvicorn calls from the parser's callback at the end of the head)."""
        return (
            isinstance(error.__context__, httptools.HttpParserInvalidURLError) and len(self.url) > URL_LIMIT
        )

    def _ignore_upgrade(self, cycle: Cycle) -> None:
        if self.parser.get_method() == b"CONNECT":
            super().on_headers_complete()  # a tunnel, not an upgrade: uvicorn's, as before
            return
        # Until it is parsed again (_parse_without_upgrade), it stands as a request already answered, so
        # that on_message_complete leaves the requests in progress as they are.
        self._before_upgrade = (cycle,)
        self.cycle = skipped = FastCycle(cast(dict[str, Any], self.scope), keep_alive=False)
        skipped.response_complete = True

    def _parse_without_upgrade(self, rest: memoryview) -> None:
        while (before := self._before_upgrade) is not None:
            self._before_upgrade = None
            head = self._head_without_upgrade()
            (self.cycle,) = before
            self.parser = parser = httptools.HttpRequestParser(self)
            parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn's
            try:
                parser.feed_data(head)  # without Upgrade, it cannot stop the parser again
                parser.feed_data(rest)
                return
            except httptools.HttpParserError as error:
                self._invalid_http(error)
                return
            except httptools.HttpParserUpgrade as upgrade:
                rest = rest[upgrade.args[0] :]  # the next request asks too
        # A CONNECT, answered as any other request (405 on the webhook listener). Not uvicorn's warning here,
        # that no WebSocket library is installed and to `pip install 'uvicorn[standard]'` (at each scanner's
        # CONNECT): none is missing, as no listener tunnels or switches protocols.

    def _head_without_upgrade(self) -> bytes:
        parser = self.parser
        version = parser.get_http_version().encode()
        head = [parser.get_method(), b" ", self.url, b" HTTP/", version, b"\r\n"]
        for name, value in self.headers:
            if name == b"upgrade":
                continue
            if name == b"connection":
                tokens = [token for token in value.split(b",") if token.strip().lower() != b"upgrade"]
                value = b",".join(tokens).strip()
                if not value:
                    continue
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        return b"".join(head)


class ListenerProtocol(UpgradeIgnoring):
    """What the gateway sees of the webhook listener's protocol class (webhook_protocol's)."""

    # The listener's connections closed after their last answer that still linger (LingeringClose).
    lingering: ClassVar[Lingering]
    # Over HTTPS, the TCP connection's own transport, under the TLS layer's (set by tls_protocol).
    tcp_transport: asyncio.Transport | None = None

    def all_answered(self) -> bool:
        """All its client has sent was read, as requests each whole and answered: a client that keeps to
        HTTP/1.1 sends nothing more on a connection closed after its answer (RFC 9112 §9.6). False here: a
        protocol that cannot tell lingers, the safe default (the listener's own class tells)."""
        return False

    def cut_off(self) -> None:
        """End the connection now, unanswered: the listener's drain has run out with it still open."""
        self.transport.abort()


# The server's default headers as they are written (the date: serve turns uvicorn's `server` header off),
# for the list uvicorn last set: it sets a new one each second, with the date, and every answer in between
# writes the same bytes.
_default_head: tuple[list[tuple[bytes, bytes]], bytes] = ([], b"")


def _default_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    global _default_head
    known, head = _default_head
    if headers is not known:
        head = b"".join(b"%s: %s\r\n" % header for header in headers)
        _default_head = (headers, head)
    return head


def cut_off(connections: Collection[Any]) -> None:
    """End the listener's connections still open once its drain has run out (INGRESS_DRAIN_TIMEOUT): the
    requests they carry are cut off, with no answer (their senders send them again). uvicorn cancels the
    ASGI app's requests then, but leaves their connections, and a fast-path webhook has no task to cancel:
    left open, a connection would hold its client until the process exits, and in a process that goes on
    (the gateway run in-process) for ever. Aborted rather than closed: a client still sending would keep a
    close waiting, and the event loop may end before it is done, leaving the socket to the collector."""
    for connection in list(connections):
        connection.cut_off()


def webhook_protocol(ingress: Ingress) -> type[ListenerProtocol]:
    """The listener's protocol class. The limits are read for each deadline and each body, so a config
    reload changes them for what comes next."""

    def limits() -> Limits:
        return ingress.gateway.config.limits

    class WebhookProtocol(ListenerProtocol):
        _webhook: Webhook | None = None  # the fast-path request being received or stored
        # The deadline of what is being waited for (headers, a body) and what to do when it passes.
        _timer: asyncio.TimerHandle | None = None
        _deadline = 0.0
        _expired: Callable[[], None] | None = None
        # The parser failed on what came after the requests in progress: answered 400 once they are.
        _malformed = False
        # A request's head (line and headers) being read: the heads begun so far, and the bytes of the reads
        # that were wholly inside the current one. The parser holds an unfinished header or URL until it
        # ends, grown by a copy at each read: without a bound, one endless head would take memory and
        # keep the event loop copying for the whole read_timeout.
        _in_head = False
        _heads = 0
        _head_bytes = 0
        # Refused (431) because its head went on past the limit, not because it is malformed.
        _head_too_large = False
        # Refused (408) because its head did not end in time, behind requests still in progress.
        _head_timed_out = False
        # Refused (414) because its URL is longer than the parser reads.
        _long_url = False
        lingering = Lingering()

        def connection_made(self, transport: Any) -> None:
            # Duck-typed: uvicorn only writes, closes and asks the transport about itself.
            writes = CoalescedWrites(transport, self.loop, self.lingering, self.tcp_transport)
            super().connection_made(cast(asyncio.Transport, writes))
            # uvicorn's set of the listener's open connections, this one included (added just now).
            if len(self.connections) > ingress.max_connections:
                self._too_many_connections()
                return
            self._arm(self._headers_timed_out, limits().read_timeout)

        def all_answered(self) -> bool:
            # What follows a request whose connection closes is never parsed (uvicorn's parser drops it:
            # lenient_data_after_close), so a request after it leaves no trace here.
            cycle = self.cycle
            return (
                cycle is not None
                and cycle.response_complete
                and not cycle.more_body
                and not self._in_head
                and not self.pipeline
                and not self._malformed
            )

        def _too_many_connections(self) -> None:
            # Answered at once, before anything is read: waiting for its request would hold the file
            # descriptor the limit is there to save. Its slot is given up now, not when the loop gets to
            # connection_lost, so a burst of refusals does not refuse the next one in turn. Then the
            # connection lingers until it closes, soon (the request its client sent is read and dropped).
            self.connections.discard(self)
            cast(CoalescedWrites, self.transport).write_now(_TOO_MANY_CONNECTIONS)
            self.transport.close()
            ingress.too_many_connections()

        def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol allows a bool
            # The client closed its side: what is buffered (the answer to its last request) leaves now, and
            # a close after the answer to come has nothing left to read.
            transport = cast(CoalescedWrites, self.transport)
            transport.client_closed = True
            transport.flush()
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                # Its whole request is in, and its answer (after an fsync) is still to come: a client may
                # half-close after sending and still read the answer. Close once it is written.
                cycle.keep_alive = False
                return True
            super().eof_received()
            return None

        def data_received(self, data: bytes) -> None:
            # uvicorn's, but for what the parser cannot read. (uvicorn's keep-alive timer is never set here:
            # the idle deadline is on the connection's one timer, so there is nothing to unset.)
            in_head, heads = self._in_head, self._heads
            if self._feed(data) and in_head and self._in_head and self._heads == heads:  # all the same head
                self._head_bytes += len(data)
                limit = limits().max_header_bytes + 4 * limits().max_headers + _HEAD_ALLOWANCE
                if self._head_bytes > limit:
                    self._head_too_large = True
                    self._invalid_http(httptools.HttpParserError("request head too large"))

        def _invalid_http(self, error: httptools.HttpParserError) -> None:
            # uvicorn answers 400 and closes at once. That is right when nothing else is in progress, but a
            # malformed request pipelined behind a webhook being stored would cost that webhook its answer
            # (the sender would retry an event that is stored): the 400 waits for the answers before it.
            if self._malformed:
                return  # the parser keeps failing on what follows, which is never read
            self._malformed = True
            self._long_url = self._url_too_long(error)
            cycle, webhook = self.cycle, self._webhook
            if webhook is not None and webhook.cycle is cycle and webhook.stage == RECEIVING:
                # The webhook's own body is malformed (a bad chunk): refused, for what it is. Nothing after
                # it can be read, so the connection is closed.
                cycle.keep_alive = False
                self._refuse(webhook, invalid_http(error))
                return
            if cycle is not None and cycle.response_complete and cycle.more_body:
                # The rest of a body whose request is answered already (refused, read to be dropped): no
                # request is left to answer, and a 400 would be read as the answer to the next one. (What
                # its client still sends is dropped as the connection lingers: see CoalescedWrites.close.)
                self.transport.close()
                return
            elif cycle is not None and cycle.more_body:
                # The body of a request the ASGI app has (a webhook that expects 100 Continue), or of one
                # queued behind the requests in progress (pipelined): it is refused once started, as the
                # fast path refuses its own, `invalid_http` under its source (_begin, or the app). A 400
                # from here would close the connection under the app and have it count the client as
                # gone, or answer a queued webhook under no source.
                cast(dict[str, Any], cycle.scope)[MALFORMED_BODY] = error
                cycle.keep_alive = False  # nothing after it can be read
                cycle.message_event.set()
                waiting = True
            else:
                # The last request's message is complete and its answer still to come: the error is in
                # what follows it. (One whose body is malformed and that is being answered gets the 400 now.)
                waiting = cycle is not None and not cycle.response_complete and not cycle.more_body
            if waiting:
                self._disarm()  # no deadline for what will never be read
                self.flow.pause_reading()
            else:
                self._answer_malformed()

        def _answer_malformed(self) -> None:
            if self._head_too_large:
                self._close_with(_HEAD_TOO_LARGE)
                return
            if self._head_timed_out:
                self._close_with(_TIMED_OUT)
                return
            if self._long_url:
                self._close_with(_URL_TOO_LONG)
                return
            suppressed = ingress.log_throttle.admit("invalid_http_received")
            if suppressed is not None:
                self.logger.warning("Invalid HTTP request received.", extra={"suppressed": suppressed})
            self._close_with(_MALFORMED)

        def _close_with(self, answer: tuple[bytes, str]) -> None:
            # The client may still be sending (the head refused 431, the rest of what is not HTTP): the
            # connection lingers after the answer (CoalescedWrites.close).
            content, reason = answer
            ingress.gateway.metrics.rejected("", reason)
            self.transport.write(content)
            self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0
            self._heads += 1
            self._arm(self._headers_timed_out, limits().read_timeout)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()
            parser, url, cycle = self.parser, self.url, self.cycle
            if parser.should_upgrade():
                self._ignore_upgrade(cycle)
                return
            if self.expect_100_continue and parser.get_http_version() == "1.0":
                # HTTP/1.0 has no 1xx answers: its client would read `100 Continue` as the answer. The
                # expectation is ignored (RFC 9110 §10.1.1), and the webhook taken as any other.
                self.expect_100_continue = False
            if (
                (cycle is None or cycle.response_complete)  # not pipelined behind a request in progress
                and parser.get_method() == b"POST"
                and not self.expect_100_continue
                and url.startswith(b"/")
                and url.isascii()
            ):
                # Looked for in str: `b"?" in url` first tries b"?" as an integer, and raises (and
                # swallows) a TypeError each time.
                path = url.decode("ascii")
                endpoint = None
                if "?" not in path and "%" not in path:  # the path as sent is the path: nothing to unquote
                    endpoint = ingress.gateway.table.endpoints.get(path)
                if endpoint is not None:
                    # Annotated, not cast(): cast(dict[str, Any], ...) builds the alias and calls, per webhook.
                    scope: dict[str, Any] = self.scope  # type: ignore[assignment]
                    scope.update(method="POST", path=path, raw_path=url, query_string=b"")
                    keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
                    self.cycle = fast = FastCycle(scope, keep_alive)
                    self._begin(fast, endpoint)
                    return
            super().on_headers_complete()  # starts the request: _start_asgi_task, now or once answered

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            scope = cycle.scope
            endpoint = None
            if app is self.app and scope["method"] == "POST" and not cycle.waiting_for_100_continue:
                endpoint = ingress.endpoint(cast(dict[str, Any], scope))
            if endpoint is None:
                super()._start_asgi_task(cycle, partial(_unanswered_if_cut_off, app, cycle))
                return
            self._begin(cycle, endpoint)

        def _begin(self, cycle: Cycle, endpoint: Endpoint) -> None:
            webhook = self._webhook = Webhook(cycle, endpoint, time.perf_counter())
            scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
            try:
                webhook.headers = ingress.admit(scope, endpoint)
            except Rejected as rejection:
                webhook.stage = ANSWERED  # never admitted: nothing to release
                self._refuse(webhook, rejection)
            else:
                limit = limits().max_body_bytes
                if len(cycle.body) > limit:  # queued behind another request, its body came in meanwhile
                    self._refuse(webhook, too_large(limit))
                elif not cycle.keep_alive and MALFORMED_BODY in cycle.scope:  # (looked up only then)
                    # Queued, and the parser failed on its body meanwhile (_invalid_http).
                    self._refuse(webhook, invalid_http(cast(dict[str, Any], cycle.scope)[MALFORMED_BODY]))
                    return  # nothing more of it can be read: its answer closes the connection
                elif not cycle.more_body:
                    self._received(webhook)
                    return
            if cycle.more_body:
                # The body is still coming: read it in time, and (if refused) drop it.
                self._arm(self._body_timed_out, limits().read_timeout)

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if type(cycle) is FastCycle:
                if cycle.response_complete:
                    return  # refused: the rest is read and dropped
                if not cycle.body:
                    cycle.body = body
                else:
                    if type(cycle.body) is bytes:
                        cycle.body = bytearray(cycle.body)  # more chunks: appended in place, not copied
                    cycle.body += body
            else:
                super().on_body(body)
            webhook = self._webhook
            if webhook is None or webhook.cycle is not cycle or webhook.stage != RECEIVING:
                return
            # uvicorn pauses reading past 64 KB until the app asks for more; here the limit bounds it.
            if not self.flow.write_paused:  # (see pause_writing)
                self.flow.resume_reading()
            limit = limits().max_body_bytes
            if len(cycle.body) > limit:
                self._refuse(webhook, too_large(limit))

        def on_message_complete(self) -> None:
            cycle = self.cycle
            if type(cycle) is FastCycle:
                cycle.more_body = False
            else:
                super().on_message_complete()
                if cycle.response_complete:
                    # uvicorn's leaves a body answered before it ended unfinished: it has ended.
                    cycle.more_body = False
                    if self._webhook is None and not self.transport.is_closing():
                        # The ASGI app's request, refused before its body ended (read and dropped since):
                        # the connection is idle from now, as below.
                        self._arm(self._idle_timed_out, limits().idle_timeout)
            webhook = self._webhook
            if webhook is None or webhook.cycle is not self.cycle:
                return
            self._disarm()
            if webhook.stage == RECEIVING:
                self._received(webhook)
            elif webhook.stage == ANSWERED:
                # A refused request's body, read to its end and dropped: its answer left before, and the
                # connection is idle from now (_begin had replaced that deadline with the body's).
                self._webhook = None
                if not self.transport.is_closing():
                    self._arm(self._idle_timed_out, limits().idle_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            webhook = self._webhook
            if webhook is not None and webhook.stage == RECEIVING:
                self._refuse(webhook, client_disconnected())
            super().connection_lost(exc)

        # -- Upgrade ----------------------------------------------------------------------------------

        # -- the steps --------------------------------------------------------------------------------

        def _received(self, webhook: Webhook) -> None:
            webhook.stage = STORING
            try:
                webhook.event, webhook.routes = ingress.accept(
                    webhook.endpoint, webhook.headers, bytes(webhook.cycle.body)
                )
                stored = ingress.store(webhook.event, webhook.routes)
            except Rejected as rejection:
                self._refuse(webhook, rejection)
                return
            except BaseException as exc:  # a provider's SystemExit too: it must not end `serve`
                self._refuse(webhook, ingress.failed(webhook.endpoint, exc))
                return
            stored.add_done_callback(partial(self._stored, webhook))

        def _stored(self, webhook: Webhook, stored: asyncio.Future[Ingested]) -> None:
            event = webhook.event
            assert event is not None
            try:
                new = stored.result().new
                status, reply = ingress.stored(webhook.endpoint, event, webhook.routes, new)
            except StorageUnavailable as exc:
                self._refuse(webhook, ingress.unstored(event, webhook.routes, exc))
                return
            except (Exception, asyncio.CancelledError):
                log.exception("a webhook could not be stored", extra=event.summary())
                self._refuse(webhook, INTERNAL_ERROR)
                return
            try:
                self._answer(webhook, 200, reply)
            except orjson.JSONEncodeError:  # a provider's reply() holds what JSON cannot
                log.exception("a webhook's answer could not be written", extra=event.summary())
                self._refuse(webhook, INTERNAL_ERROR)
                return
            ingress.answered(webhook.endpoint.name, status, webhook.started)

        def _refuse(self, webhook: Webhook, rejection: Rejected) -> None:
            # Refused before its body is in: the rest is read and dropped (uvicorn does that once a response
            # is complete), in time, or the connection is closed (_body_timed_out).
            reply = ingress.refused(
                webhook.endpoint.name, rejection, cast(dict[str, Any], webhook.cycle.scope)
            )
            self._answer(webhook, rejection.status, reply, EXTRA_HEADERS.get(rejection.status))

        def _answer(
            self,
            webhook: Webhook,
            status: int,
            reply: Reply,
            extra_headers: list[tuple[bytes, bytes]] | None = None,
        ) -> None:
            if webhook.stage != ANSWERED:
                webhook.stage = ANSWERED
                ingress.release()
            if self._webhook is webhook and not webhook.cycle.more_body:
                self._webhook = None
            cycle = webhook.cycle
            if cycle.disconnected or cycle.response_complete:
                return
            content = orjson.dumps(reply)
            head = [STATUS_LINE[status], _default_headers(self.server_state.default_headers)]
            for name, value in extra_headers or ():
                head += [name, b": ", value, b"\r\n"]
            head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(content))
            if not cycle.keep_alive:
                head.append(b"connection: close\r\n")
            head += [b"\r\n", content]
            # Already one write: nothing to join it with, so it leaves now rather than at the end of the turn.
            transport: CoalescedWrites = self.transport  # type: ignore[assignment]
            transport.write_now(b"".join(head))
            cycle.response_complete = True
            if not cycle.keep_alive:
                self.transport.close()  # lingers: the client may still be sending the body refused
            if self.pipeline:
                # The next pipelined request starts in a turn of the loop of its own: started from here,
                # each one answered at once would be a call inside the previous one's answer, and a few
                # hundred of them in one write would overflow the stack. (Reading is paused meanwhile.)
                self.loop.call_soon(self.on_response_complete)
            else:
                self.on_response_complete()

        def on_response_complete(self) -> None:
            # uvicorn's, with the idle deadline on the connection's timer instead of a timer of its own.
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self._unset_keepalive_if_required()  # never set here; kept in case uvicorn sets one elsewhere
            if not self.flow.write_paused:  # (see pause_writing)
                self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            elif self._malformed:
                self._answer_malformed()  # what came after the requests answered (_invalid_http)
            elif self.cycle.more_body:
                # Answered before its body ended (refused): the rest is read and dropped in the time a body
                # has, not an idle connection's, which a sender still sending would be reset by. Idle once
                # it has ended (on_message_complete).
                self._arm(self._body_timed_out, limits().read_timeout)
            elif not self._in_head:
                self._arm(self._idle_timed_out, limits().idle_timeout)
            # Else the next request's head began before this answer: its own deadline stands (on_message_begin).

        def pause_writing(self) -> None:
            # What is written piles up: the client is not reading its answers. The ASGI app's answers wait
            # for it (uvicorn's send() drains first), so no more of its requests are started; a fast-path
            # answer is written at once, and reading on would let a client that pipelines requests without
            # reading the answers fill the gateway's memory with them. Its next requests are read once it
            # reads (resume_writing).
            super().pause_writing()
            self.flow.pause_reading()

        def resume_writing(self) -> None:
            super().resume_writing()
            # Unless it is paused for another reason: a request queued behind the one in progress (resumed
            # once that is answered), or a malformed one that waits for the answers before it.
            if not self.pipeline and not self._malformed:
                self.flow.resume_reading()

        # -- deadlines --------------------------------------------------------------------------------

        # Every request sets a deadline three times (headers, body, then idle until the next request) and
        # clears two of them. A timer per deadline would cost a heap insertion and a cancellation each
        # time; instead one timer per connection stays armed, and when it fires it only acts if the
        # deadline it finds has passed (else it sleeps until that deadline). It is moved sooner only when
        # a deadline comes before it, which on a busy connection happens once per timer, not per request.

        def _arm(self, expired: Callable[[], None], seconds: float) -> None:
            self._deadline = self.loop.time() + seconds
            self._expired = expired
            if self._timer is not None and self._deadline < self._timer.when():
                self._timer.cancel()  # sooner than planned: an idle deadline after a read one, or a reload
                self._timer = None
            if self._timer is None:
                self._timer = self.loop.call_at(self._deadline, self._check_deadline)

        def _disarm(self) -> None:
            self._expired = None

        def _check_deadline(self) -> None:
            self._timer = None
            if self._expired is None:
                return
            if self.loop.time() < self._deadline:
                self._timer = self.loop.call_at(self._deadline, self._check_deadline)
                return
            expired, self._expired = self._expired, None
            expired()

        def _idle_timed_out(self) -> None:
            if not self.transport.is_closing():
                cast(CoalescedWrites, self.transport).close_at_once()  # idle: nothing was answered

        def cut_off(self) -> None:
            # Its webhook, still being received, gets no answer: not counted as client_disconnected, which
            # connection_lost would count it as, since the client did not leave.
            webhook, self._webhook = self._webhook, None
            if webhook is not None and webhook.stage == RECEIVING:
                webhook.stage = ANSWERED
                ingress.release()
            self._disarm()
            super().cut_off()

        def shutdown(self) -> None:
            # uvicorn's, as the listener stops: a request in progress is answered, then closed (and
            # lingers); an idle connection is closed at once, as it has no answer to lose.
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False
            elif cycle is not None and cycle.more_body:
                self.transport.close()  # answered before its body ended, which may still be coming
            else:
                cast(CoalescedWrites, self.transport).close_at_once()

        def _headers_timed_out(self) -> None:
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                # A head pipelined behind a request still in progress (a webhook being stored): answered
                # 408 now, the 408 would be read as that request's answer, and the connection closed under
                # it. It is answered after the answers before it, as what is malformed there is.
                self._head_timed_out = self._malformed = True
                self.flow.pause_reading()  # nothing after it is read
                return
            self._close_with(_TIMED_OUT)

        def _body_timed_out(self) -> None:
            webhook, self._webhook = self._webhook, None
            if webhook is not None and webhook.stage == RECEIVING:
                webhook.cycle.keep_alive = (
                    False  # the rest of the body may still come: never read it as a request
                )
                self._refuse(webhook, body_timeout())
            self.transport.close()

    return WebhookProtocol


async def _unanswered_if_cut_off(
    app: Any, cycle: RequestResponseCycle, scope: Any, receive: Any, send: Any
) -> None:
    """The ASGI app, for one request. Cancelled at the end of the listener's drain, its request gets no
    answer, as one on the fast path does (the sender sends it again): uvicorn would answer it `500`
    text/plain, and log a traceback. Its connection is closed, and the cycle marked as gone, which uvicorn
    then writes nothing to.

    A request whose client expects `100 Continue` and is answered before it is sent one (refused at its
    head: no such path, a body declared too large) closes its connection after the answer: its client may
    send the body or not (RFC 9110 §10.1.1), and kept alive, the connection would read what it sends next,
    a request, as the rest of that body and drop it unanswered."""
    if cycle.waiting_for_100_continue:
        send = partial(_closing_unless_continued, cycle, send)
    try:
        await app(scope, receive, send)
    except asyncio.CancelledError:
        if cycle.response_complete or (isinstance(cycle, RequestResponseCycle) and cycle.response_started):
            raise  # uvicorn closes the connection under an answer begun
        cycle.disconnected = True
        cycle.transport.close()


async def _closing_unless_continued(cycle: RequestResponseCycle, send: Any, message: Any) -> None:
    """uvicorn's send(), but an answer that begins before the request's 100 Continue, with its body not all
    in, closes the connection (uvicorn adds `connection: close`, then closes, and the webhook listener's
    connection lingers: what the client sends is read and dropped)."""
    if message["type"] == "http.response.start" and cycle.waiting_for_100_continue and cycle.more_body:
        cycle.keep_alive = False
    await send(message)


def _ops_closing(error: str) -> bytes:
    """An ops listener's answer that closes the connection, after its status line and the Date header: JSON,
    as every error a tool reads there."""
    body = orjson.dumps({"error": error})
    return b"content-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


# The ops listener's answer to a request that is not HTTP.
_OPS_MALFORMED = _ops_closing("the request is not valid HTTP/1.1")
# The longest request line and headers the ops listener reads: a URL as long as the parser reads, and 64 KiB
# of headers, far more than a probe, a scrape or an admin call sends. uvicorn's parser sets no bound.
OPS_HEAD_LIMIT = URL_LIMIT + 64 * 1024  # bytes
_OPS_HEAD_TOO_LARGE = _ops_closing(f"the request line and headers are longer than {OPS_HEAD_LIMIT} bytes")
_OPS_URL_TOO_LONG = _ops_closing(f"the URL is longer than {URL_LIMIT} bytes")
# How long the ops listener waits for a request's line and headers, from the connection or from the
# request's first byte: probes, scrapes and admin calls send theirs at once.
OPS_HEAD_TIMEOUT = 10.0  # seconds
# How long it waits for a request's body once its head is in: an admin call's is a few fields, sent with it.
OPS_BODY_TIMEOUT = 10.0  # seconds
# The ops listener's connections open at once, at most: probes, scrapes and admin calls take a few. Their file
# descriptors are kept besides listen.max_connections (gateway.app.FILES_RESERVED), so that a flood of them
# leaves the webhook listener and the store theirs.
OPS_MAX_CONNECTIONS = 32
_OPS_TOO_MANY_CONNECTIONS = b"retry-after: 5\r\n" + _ops_closing(
    f"the ops listener has {OPS_MAX_CONNECTIONS} connections open, each with a request being answered; "
    "retry later"
)


class OpsProtocol(UpgradeIgnoring):
    """The ops listener's protocol: uvicorn's, but a request cut off at the end of the listener's drain
    (OPS_DRAIN_TIMEOUT: its body still coming, say) gets no answer, as on the webhook listener, rather than
    uvicorn's `500` text/plain with a traceback logged. And a request that is not HTTP is answered in JSON.
    A request line and headers that go on past OPS_HEAD_LIMIT are answered 431 as they arrive, and closed:
    uvicorn would hold all of it in memory, for as long as it came. Those that have not come within
    OPS_HEAD_TIMEOUT of the connection, or of the request's first byte, are answered 408, and closed: uvicorn
    would hold the connection for ever (its keep-alive timeout runs only after an answer). So is a body that
    has not all come within OPS_BODY_TIMEOUT of its head, or closed without an answer if it was answered
    already (the rest of a body an endpoint did not read): uvicorn would wait for it for ever, and cancels
    its keep-alive timeout at every byte. And a connection that is idle again after what it was sent (the
    end of a body after its answer, a blank line between requests) has the keep-alive timeout again.

    At most OPS_MAX_CONNECTIONS connections are open at once. One more closes the oldest that has no request
    being answered (idle, still sending its request, or not reading its answer), so that a flood of idle or
    slow connections cannot keep a probe or a scrape out; refused with 503 only when each one has a request
    being answered. `shed` is told which ("closed", "refused"), to count and log it."""

    # A request's head is being read, and the bytes of the reads since it began.
    _in_head = False
    _head_bytes = 0
    _head_deadline: asyncio.TimerHandle | None = None
    _body_deadline: asyncio.TimerHandle | None = None
    _opened = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn's takes a Transport
        self._opened = self.loop.time()
        if len(self.connections) > OPS_MAX_CONNECTIONS and not self._make_room():
            # Its slot is given up at once, as on the webhook listener: a burst of refusals does not refuse
            # the next connection in turn.
            self.connections.discard(self)
            self._close_with(503, _OPS_TOO_MANY_CONNECTIONS)
            self.shed("refused")
            return
        self._wait_for_head()

    def _make_room(self) -> bool:
        """Close the oldest other connection with no request being answered; whether there was one."""
        others = (
            cast(OpsProtocol, other)
            for other in self.connections
            if other is not self and not cast(OpsProtocol, other)._answering()
        )
        oldest = min(others, key=lambda other: other._opened, default=None)
        if oldest is None:
            return False
        # Aborted: a close would wait for a client that does not read to take what was written to it.
        self.connections.discard(oldest)
        oldest.transport.abort()
        self.shed("closed")
        return True

    def shed(self, outcome: str) -> None:
        """A connection was closed ("closed") or refused ("refused") for the limit: see ops_protocol."""

    def _answering(self) -> bool:
        """Whether a request is being answered: all of it read, and its answer to come or being read."""
        if self.pipeline:
            # Requests wait behind one still being answered: the current cycle is the latest of them, whose
            # body may still be coming.
            return True
        cycle = self.cycle
        return (
            cycle is not None
            and not cycle.response_complete
            and not cycle.more_body
            and not self.transport.is_closing()
            and not self.flow.write_paused
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_came()
        self._body_came()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        self._wait_for_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_came()
        super().on_headers_complete()
        # Until on_message_complete, which follows at once for a request without a body.
        self._wait_for_body()

    def on_message_complete(self) -> None:
        self._body_came()
        super().on_message_complete()

    def _wait_for_body(self) -> None:
        self._body_came()
        self._body_deadline = self.loop.call_later(OPS_BODY_TIMEOUT, self._body_timed_out, OPS_BODY_TIMEOUT)

    def _body_came(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _body_timed_out(self, timeout: float) -> None:
        self._body_deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        if cycle.waiting_for_100_continue or any(queued is cycle for queued, _ in self.pipeline):
            # Its client was not asked for the body yet, or it is queued behind a request still being
            # answered, and reading is paused until then: its time begins once it is read.
            self._wait_for_body()
            return
        if cycle.response_complete or (isinstance(cycle, RequestResponseCycle) and cycle.response_started):
            # Answered already (or being answered): the rest of the body was to be read and dropped.
            self.transport.close()
            return
        # The endpoint waits for the body (an admin call): it is told its client left, and what it answers
        # goes nowhere (uvicorn writes nothing for a cycle that is disconnected).
        cycle.disconnected = True
        cycle.message_event.set()
        self._close_with(408, _ops_closing(f"the body did not come within {timeout:g} s"))

    def _wait_for_head(self) -> None:
        self._head_came()
        self._head_deadline = self.loop.call_later(OPS_HEAD_TIMEOUT, self._head_timed_out, OPS_HEAD_TIMEOUT)

    def _head_came(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self, timeout: float) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Pipelined behind a request still being answered: a 408 now would be read as its answer.
            self._wait_for_head()
            return
        self._close_with(408, _ops_closing(f"the request line and headers did not come within {timeout:g} s"))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # cancels the keep-alive timeout
        if self.transport.is_closing():
            return
        if self._in_head:
            self._head_bytes += len(data)  # with what came before it in the same read: a bound, no more
            if self._head_bytes > OPS_HEAD_LIMIT:
                self._close_with(431, _OPS_HEAD_TOO_LARGE)
        elif (
            self._head_deadline is None
            and self._body_deadline is None
            and self.timeout_keep_alive_task is None
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
        ):
            # Idle again, with nothing to wait for: what came ended a body already answered, or was no
            # request (blank lines between requests). uvicorn arms its timeout only after an answer.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        super()._start_asgi_task(cycle, partial(_unanswered_if_cut_off, app, cycle))

    def _invalid_http(self, error: httptools.HttpParserError) -> None:
        if self._url_too_long(error):
            self._close_with(414, _OPS_URL_TOO_LONG)  # HTTP, but a URL past what the parser reads
            return
        super()._invalid_http(error)

    def send_400_response(self, msg: str) -> None:
        # What the parser cannot read (not HTTP, a bad chunk): in JSON as every error a tool reads here,
        # where uvicorn answers text/plain. Then closed, as uvicorn does.
        self._close_with(400, _OPS_MALFORMED)

    def _close_with(self, status: int, rest: bytes) -> None:
        head = STATUS_LINE[status] + b"".join(
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        )
        self.transport.write(head + rest)
        self.transport.close()


# How long closing a TLS connection after its answer waits for the client's close_notify after sending its
# own, before it drops the connection. asyncio waits 30 s: most clients send theirs only when they next
# read. What the gateway wrote is sent before its close_notify: nothing the client was owed is lost. (An
# idle connection does not wait: see CoalescedWrites.close_at_once.)
TLS_SHUTDOWN_TIMEOUT = 1.0  # seconds


def ops_protocol(shed: Callable[[str], None]) -> type[OpsProtocol]:
    """The ops listener's protocol class, telling `shed` of each connection it closes or refuses when full."""

    class Ops(OpsProtocol):
        def shed(self, outcome: str) -> None:
            shed(outcome)

    return Ops


def tls_protocol(
    protocol: type[ListenerProtocol], ingress: Ingress, context: ssl.SSLContext
) -> type[asyncio.Protocol]:
    """The HTTPS listener's protocol: each connection goes through its TLS handshake here, then to
    `protocol` (webhook_protocol's).

    asyncio's own TLS server (create_server with ssl=) calls the protocol only once the handshake is over:
    a connection still in it was not counted against listen.max_connections, and it had 60 s to finish,
    so clients that connect and never send a ClientHello took file descriptors without limit. Here a
    connection counts from the moment it is accepted: it is in uvicorn's set of the listener's
    connections during its handshake too (and closed by uvicorn's shutdown). Its handshake has the read
    timeout, as a request's head does. One accepted past the limit is closed at once, unanswered: an answer
    would take a handshake first, and that is the cost the limit is there to refuse."""

    class TlsHandshake(asyncio.Protocol):
        def __init__(self, **kwargs: Any) -> None:
            self.protocol = protocol(**kwargs)  # uvicorn's arguments, for the protocol after the handshake
            self.connections = cast(set[Any], self.protocol.connections)
            self.transport: asyncio.Transport | None = None
            self.handshake: asyncio.Task[None] | None = None
            # What the client sent once the handshake was over, before the protocol took the connection
            # over: the TLS layer reads on as soon as it is done, in the turn before start_tls returns.
            self.received: list[bytes] = []
            # What the client sent before the handshake began (uvloop: see data_received).
            self.early: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            raw = cast(asyncio.Transport, transport)
            if len(self.connections) >= ingress.max_connections:
                raw.close()
                ingress.too_many_connections()
                return
            self.connections.add(self)
            self.transport = raw
            raw.pause_reading()  # the handshake reads from its first byte (start_tls resumes reading)
            self.handshake = asyncio.get_running_loop().create_task(self._handshake(raw))

        async def _handshake(self, raw: asyncio.Transport) -> None:
            loop = asyncio.get_running_loop()
            try:
                if raw.is_closing():
                    return  # the listener shut down before it began
                if self.early:
                    # Queued before start_tls queues the TLS layer's connection_made, which starts the
                    # handshake from what the layer was given: this, then what is read from then on.
                    loop.call_soon(_give, raw, b"".join(self.early))
                # This protocol stays the TLS layer's until the protocol takes over, below.
                transport = await loop.start_tls(
                    raw,
                    self,
                    context,
                    server_side=True,
                    ssl_handshake_timeout=ingress.gateway.config.limits.read_timeout,
                    ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
                )
            except OSError:
                return  # not TLS, too slow, or the client left: start_tls closed it, nothing to answer
            finally:
                self.connections.discard(self)
            if transport is None or transport.is_closing():
                return  # closed as it ended (shutdown, or the client left)
            transport.set_protocol(self.protocol)
            self.protocol.tcp_transport = raw
            self.protocol.connection_made(transport)
            if self.received and not transport.is_closing():
                # To the protocol that has the connection now (a LingeringClose, if it was refused).
                cast(asyncio.Protocol, transport.get_protocol()).data_received(b"".join(self.received))

        def data_received(self, data: bytes) -> None:
            if self.transport is not None and self.transport.get_protocol() is self:
                # Read before the handshake began, the start of it: uvloop starts reading once
                # connection_made has returned, whatever it paused. Kept for the TLS layer (_give).
                self.transport.pause_reading()
                self.early.append(data)
                return
            self.received.append(data)

        def shutdown(self) -> None:
            # uvicorn's, as the listener stops: a handshake is not waited for.
            if self.transport is not None:
                self.transport.close()

        def cut_off(self) -> None:
            # Still in its handshake once the listener's drain has run out (see the module's cut_off).
            if self.transport is not None:
                self.transport.abort()

    return TlsHandshake


def _give(transport: asyncio.Transport, data: bytes) -> None:
    """Hand `data` to the transport's protocol (a TLS layer: a buffered protocol, in asyncio and uvloop)
    as the transport hands it what it reads."""
    protocol = cast(asyncio.BufferedProtocol, transport.get_protocol())
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


class LingeringClose(asyncio.Protocol):
    """A connection closed after its last answer, from then on (CoalescedWrites.close). Its client may still
    be sending: the request it sent before reading (a connection refused too_many_connections), the rest of
    a head refused 431 or of a body refused 413, what follows a request that is not HTTP. What it sends is
    read and dropped, until it closes its side (having read the answer) or _LINGER has passed. Then the
    connection is closed, with nothing left unread to reset it: closed with data unread, the connection is
    reset (RST), and a client still sending, or not yet reading, reads ECONNRESET instead of the answer."""

    def __init__(
        self,
        transport: asyncio.Transport,
        lingering: Lingering,
        loop: asyncio.AbstractEventLoop,
        tcp_transport: asyncio.Transport | None = None,
    ) -> None:
        """tcp_transport: over TLS, the TCP connection's transport, under `transport` (the TLS layer's)."""
        self.transport = transport
        self.tcp_transport = tcp_transport
        self.lingering = lingering
        lingering.add(self)
        self.timer = loop.call_later(_LINGER, self.close)
        self.received = False  # anything since the answer

    def data_received(self, data: bytes) -> None:
        self.received = True  # and dropped: read, so that closing does not reset the connection

    def close_if_all_answered(self, protocol: ListenerProtocol) -> None:
        """Over TLS, close now if the client has sent all it has to send. A TLS transport (asyncio's,
        uvloop's) cannot half-close: a client that reads to the end (HTTP/1.0, `Connection: close`) would
        have the end only once the connection had lingered _LINGER. Closed, close_notify leaves after the
        answer, and the TLS layer waits TLS_SHUTDOWN_TIMEOUT at most for the client's. Not while the client
        may still be sending: asyncio's TLS layer fails on data that comes after its close_notify
        (APPLICATION_DATA_AFTER_CLOSE_NOTIFY) and resets the connection, the answer unread with it."""
        if not self.received and not self.transport.is_closing() and protocol.all_answered():
            self.transport.close()  # still lingering (close_all ends it) until the connection is lost

    def eof_received(self) -> None:
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        self.lingering.discard(self)
        self.timer.cancel()
        if not self.transport.is_closing():  # else closed by close_if_all_answered: its TLS layer ends it
            self.transport.close()

    def end(self) -> None:
        """Close now, waiting for nothing (over TLS, close() waits for the client's close_notify). Over TLS,
        close_notify is sent first when all that was written has been handed to the kernel: aborted without
        it, the connection's end reads as a truncation to its client ("EOF occurred in violation of
        protocol"), after an answer that was whole. With some of it still unsent (its client is not
        reading), close_notify would only wait behind it: the connection is aborted as it is."""
        self.lingering.discard(self)
        self.timer.cancel()
        transport, tcp = self.transport, self.tcp_transport
        if (
            tcp is not None
            # Closed already (close_if_all_answered): its close_notify has left. And a second close() makes
            # asyncio's TLS transport let go of its TLS layer, through which abort() reaches the socket.
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
            and not tcp.get_write_buffer_size()
        ):
            transport.close()  # its close_notify leaves now, after what was written
        transport.abort()


class Lingering:
    """A listener's lingering connections (LingeringClose), oldest first: at most LINGERING_AT_MOST."""

    def __init__(self) -> None:
        self._closes: dict[LingeringClose, None] = {}

    def add(self, close: LingeringClose) -> None:
        if len(self._closes) >= LINGERING_AT_MOST:
            next(iter(self._closes)).close()  # the oldest, which had the longest to read its answer
        self._closes[close] = None

    def discard(self, close: LingeringClose) -> None:
        self._closes.pop(close, None)

    def close_all(self) -> None:
        """Close them now: the listener has stopped, and its event loop may end before their time is up.
        Ended, not closed: a TLS connection's close would wait for the client's close_notify, which a
        client that has not closed its side by now is not sending, and outlive the loop all the same."""
        for close in list(self._closes):
            close.end()


class CoalescedWrites:
    """A connection's transport as the listener's protocol and uvicorn's request cycles see it: writes made
    in one turn of the event loop go out as one write, at the end of the turn, and close() lingers.
    Everything else is the wrapped transport's."""

    __slots__ = ("_buffer", "_closed", "_lingering", "_loop", "_tcp", "_transport", "client_closed")

    def __init__(
        self,
        transport: Any,
        loop: asyncio.AbstractEventLoop,
        lingering: Lingering,
        tcp_transport: asyncio.Transport | None = None,
    ) -> None:
        """tcp_transport: over TLS, the TCP connection's transport, under `transport` (the TLS layer's)."""
        self._transport = transport
        self._tcp = tcp_transport
        self._loop = loop
        self._lingering = lingering
        self._buffer: list[bytes] | None = None
        # Closed as the protocol and the cycles see it: the wrapped transport may be lingering.
        self._closed = False
        # The client closed its side: all it sent has been read.
        self.client_closed = False

    def write(self, data: bytes) -> None:
        if self._buffer is None:
            self._buffer = [data]
            self._loop.call_soon(self.flush)
        else:
            self._buffer.append(data)

    def write_now(self, data: bytes) -> None:
        """Write after what is buffered, at once."""
        self.flush()
        if not self._closed and not self._transport.is_closing():  # is_closing(), inlined: every answer
            self._transport.write(data)

    def close(self) -> None:
        """Close after the connection's last answer (what is buffered is written first). The client may
        still be sending, so the connection is not closed yet: it is half-closed (over TLS, closed if the
        client has sent all it has to: LingeringClose.close_if_all_answered), so a client that reads to the
        end has the answer now, and handed to a LingeringClose, which reads and drops what comes until the
        client closes its side. The protocol is told the connection is lost, as it would be once closed:
        it lets go of its slot among listen.max_connections, its deadline and its requests in progress,
        and writes nothing more."""
        self.flush()
        if self._closed:
            return
        transport = self._transport
        if transport.is_closing() or self.client_closed:
            self.close_at_once()  # nothing more can come
            return
        self._closed = True
        protocol = transport.get_protocol()
        lingering = LingeringClose(transport, self._lingering, self._loop, self._tcp)
        if transport.can_write_eof():
            transport.write_eof()
        elif isinstance(protocol, ListenerProtocol):
            # TLS: once what was read with the answer is parsed (the rest of a body refused at its head).
            self._loop.call_soon(lingering.close_if_all_answered, protocol)
        transport.set_protocol(lingering)
        transport.resume_reading()  # paused behind pipelined requests, or a malformed one
        self._loop.call_soon(protocol.connection_lost, None)  # in a turn of its own, as after a close

    def close_at_once(self) -> None:
        """Close with nothing to wait for: the connection is idle, or its client has closed its side."""
        self.flush()
        if self._closed:
            return
        self._closed = True
        transport, tcp = self._transport, self._tcp
        transport.close()  # over TLS, its close_notify is sent now, after what was written
        if tcp is not None and not transport.get_write_buffer_size() and not tcp.get_write_buffer_size():
            # Over TLS, close() goes on to wait for the client's close_notify (TLS_SHUTDOWN_TIMEOUT), which
            # an idle client sends only when it next reads: meanwhile the connection held its place among
            # the listener's connections, and a shutdown waited for it. All of it has been handed to the
            # kernel, close_notify last, and nothing more will be read: the TCP connection ends now.
            transport.abort()

    def is_closing(self) -> bool:
        # Asked for every answer: __getattr__ would first raise and catch an AttributeError each time.
        return self._closed or bool(self._transport.is_closing())

    def pause_reading(self) -> None:
        # uvicorn's flow control, which may still pause or resume the protocol's reading once the
        # connection is closed to it: a LingeringClose reads on.
        if not self._closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._closed:
            self._transport.resume_reading()

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, None
        if buffer and not self._closed and not self._transport.is_closing():
            self._transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
