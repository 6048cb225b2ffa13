"""The webhook listener's protocol: the fast path for webhooks, deadlines, one write per response."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import json
import select
import socket
import sqlite3
import ssl
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest

from gateway import app, hookimpl, protocol, providers
from gateway.app import GC_YOUNG_THRESHOLD, INGRESS_DRAIN_TIMEOUT
from gateway.plugins import new_plugin_manager
from gateway.protocol import OPS_MAX_CONNECTIONS, CoalescedWrites, Lingering
from gateway.providers import Provider
from plugins.svix import SvixProvider
from tests.support import (
    RunningGateway,
    event_loops,
    gateway_config,
    metric_value,
    open_sockets,
    self_signed,
    svix_request,
    wait_until,
)


class RecordingTransport:
    """Stands in for a socket transport: what was written, in which system call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1234)}.get(name, default)


def test_writes_of_one_loop_turn_leave_as_one() -> None:
    async def respond() -> RecordingTransport:
        transport = RecordingTransport()
        coalesced = CoalescedWrites(transport, asyncio.get_running_loop(), Lingering())
        coalesced.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        coalesced.write(b"ok")
        assert transport.writes == []  # nothing sent before the loop turns
        await asyncio.sleep(0)
        coalesced.write(b"next")
        await asyncio.sleep(0)
        return transport

    transport = asyncio.run(respond())
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"next"]


def test_close_sends_what_is_buffered_first_and_a_closed_transport_gets_nothing() -> None:
    async def close_after_writing() -> tuple[RecordingTransport, RecordingTransport]:
        loop = asyncio.get_running_loop()
        transport = RecordingTransport()
        coalesced = CoalescedWrites(transport, loop, Lingering())
        coalesced.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        coalesced.close_at_once()

        gone = RecordingTransport()
        late = CoalescedWrites(gone, loop, Lingering())
        late.write(b"too late")
        gone.closed = True  # the peer went away before the loop turned
        await asyncio.sleep(0)
        return transport, gone

    transport, gone = asyncio.run(close_after_writing())
    assert transport.writes == [b"HTTP/1.1 408 Request Timeout\r\n\r\n"] and transport.closed
    assert gone.writes == []


def test_everything_else_is_the_wrapped_transports() -> None:
    async def ask() -> Any:
        return CoalescedWrites(RecordingTransport(), asyncio.get_running_loop(), Lingering()).get_extra_info(
            "peername"
        )

    assert asyncio.run(ask()) == ("127.0.0.1", 1234)


def test_a_client_that_closes_its_side_after_the_request_still_gets_the_answer(tmp_path) -> None:
    with RunningGateway(gateway_config(tmp_path)) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            sock.shutdown(socket.SHUT_WR)  # the answer is still buffered when the EOF arrives
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert answer.endswith(b'{"error":"missing_signature","detail":"missing svix-id/svix-signature headers"}')


def test_a_client_that_closes_its_side_still_gets_the_answer_that_waits_for_an_fsync(tmp_path) -> None:
    with RunningGateway(gateway_config(tmp_path)) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        body, headers = svix_request(msg_id="msg_half_closed")
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(request.encode() + body)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b'{"id":"msg_half_closed","status":"accepted"}')


# -- the fast path: a POST to a source's path, answered from the parser's callbacks -------------------


class Connection:
    """One raw keep-alive connection to the listener: requests as bytes, answers parsed."""

    def __init__(self, url: str, sock: socket.socket | None = None) -> None:
        """sock: a connection to `url` made already (with options set before connecting)."""
        host, port = url.removeprefix("http://").split(":")
        self.sock = sock or socket.create_connection((host, int(port)), timeout=10)
        self.reader = self.sock.makefile("rb")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reader.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.reader.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        return self.reader.read(1) == b""


def signed(msg_id: str, path: str = "/webhooks/consignease", extra: str = "", version: str = "1.1") -> bytes:
    body, headers = svix_request(msg_id=msg_id)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}{extra}\r\n".encode()
        + body
    )


def test_pipelined_webhooks_are_answered_in_order_on_one_connection(tmp_path) -> None:
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        # Three requests in one write: the second and third wait for the first's fsync, in order.
        conn.send(signed("msg_p1") + signed("msg_p2") + signed("msg_p1"))
        answers = [conn.answer() for _ in range(3)]
        conn.send(signed("msg_p3"))  # and the connection is still good
        answers.append(conn.answer())
    assert [(status, json.loads(body)) for status, _, body in answers] == [
        (200, {"id": "msg_p1", "status": "accepted"}),
        (200, {"id": "msg_p2", "status": "accepted"}),
        (200, {"id": "msg_p1", "status": "duplicate"}),
        (200, {"id": "msg_p3", "status": "accepted"}),
    ]
    assert all(headers["content-type"] == "application/json" for _, headers, _ in answers)


def test_a_body_that_comes_in_pieces_is_put_together_in_order(tmp_path) -> None:
    # The signature covers the exact bytes: a body put together wrongly would be refused 401.
    head, _, body = signed("msg_pieces").partition(b"\r\n\r\n")
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        conn.send(head + b"\r\n\r\n")
        size = len(body) // 4 + 1
        for start in range(0, len(body), size):
            time.sleep(0.02)  # each piece read on its own
            conn.send(body[start : start + size])
        status, _, answer = conn.answer()
    assert (status, json.loads(answer)) == (200, {"id": "msg_pieces", "status": "accepted"})


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout_and_a_busy_one_is_not(tmp_path) -> None:
    # A second: a busy machine may run this thread late by a good part of it, and never idle that long.
    config = gateway_config(tmp_path, limits={"idle_timeout": "1s"})
    with RunningGateway(config) as gw, Connection(gw.url) as conn:
        # A request every 100 ms for two seconds: busy for longer than the idle timeout, never idle that long.
        for n in range(20):
            conn.send(signed(f"msg_busy_{n}"))
            assert conn.answer()[0] == 200
            answered = time.monotonic()
            time.sleep(0.1)
        assert conn.closed_by_server()
        idle_for = time.monotonic() - answered
    # Counted from the answer's arrival here, a little after the server started counting.
    assert 0.95 <= idle_for < 3.0


_OVER = b"x" * 200
_REFUSED_BEFORE_THE_BODY_ENDED = {
    "declared too large": b"Content-Length: 200\r\n\r\n" + _OVER,
    "too large mid-body": b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_OVER), _OVER),
    "too many headers": b"".join(b"X-H%d: v\r\n" % n for n in range(6)) + b"Content-Length: 2\r\n\r\n{}",
}


@pytest.mark.parametrize("rest", _REFUSED_BEFORE_THE_BODY_ENDED.values(), ids=_REFUSED_BEFORE_THE_BODY_ENDED)
def test_a_connection_whose_webhook_was_refused_before_its_body_ended_is_closed_once_idle(
    tmp_path, rest: bytes
) -> None:
    # Refused at its headers or mid-body, the body is read to its end and dropped: then the connection is
    # idle, and closed after idle_timeout like any other (read_timeout is far longer: not that deadline).
    limits = {"idle_timeout": "300ms", "read_timeout": "30s", "max_body_bytes": 100, "max_headers": 5}
    with RunningGateway(gateway_config(tmp_path, limits=limits)) as gw, Connection(gw.url) as conn:
        conn.send(b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\n" + rest)
        status = conn.answer()[0]
        answered = time.monotonic()
        conn.sock.settimeout(5)
        assert conn.closed_by_server()
        idle_for = time.monotonic() - answered
    assert status in (413, 431)
    # Not closed at once with the refusal: the connection was kept, and let go once idle that long.
    assert 0.25 <= idle_for < 2.0


def test_a_source_path_with_a_query_or_percent_encoding_is_still_a_webhook(tmp_path) -> None:
    # Not the fast path's exact path: uvicorn parses and unquotes it, and the webhook is taken all the same.
    paths = ["/webhooks/consignease?tenant=a", "/webhooks/%63onsignease"]
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        answers = []
        for n, path in enumerate(paths):
            conn.send(signed(f"msg_path_{n}", path=path))
            answers.append(conn.answer())
    assert [(status, json.loads(body)["status"]) for status, _, body in answers] == [(200, "accepted")] * 2


@pytest.mark.parametrize("expect", [False, True], ids=["fast_path", "asgi_path"])
def test_a_stalled_body_gets_408_body_timeout_and_the_connection_is_closed(tmp_path, expect: bool) -> None:
    # Closed at once, on either door: the rest of the body may still come, and a client that gave up on it
    # and sent its next request on the same connection would have that request read as the old body.
    limits = {"read_timeout": "300ms", "idle_timeout": "30s"}
    with RunningGateway(gateway_config(tmp_path, limits=limits)) as gw:
        with Connection(gw.url) as conn:
            request = signed("msg_stalled", extra="Expect: 100-continue\r\n" if expect else "")
            conn.send(request[:-10])  # all but the last ten bytes of the body
            if expect:
                assert conn.answer()[0] == 100
            status, headers, body = conn.answer()
            conn.sock.settimeout(5)
            assert conn.closed_by_server()
        assert (status, headers["connection"], json.loads(body)["error"]) == (408, "close", "body_timeout")
        assert (
            gw.metric("hookyard_webhook_rejections_total", source="consignease", reason="body_timeout") == 1
        )
        assert gw.gateway.ingress.in_flight == 0
        with Connection(gw.url) as conn:
            conn.send(signed("msg_in_time"))
            assert conn.answer()[0] == 200
        listed = gw.client.get(f"{gw.ops_url}/admin/events").text
        assert "msg_in_time" in listed and "msg_stalled" not in listed


@pytest.mark.parametrize("where", ["header", "url"])
def test_a_head_that_never_ends_is_refused_431_as_it_arrives_and_webhooks_go_on(tmp_path, where: str) -> None:
    # The parser holds an unfinished header (or URL) in memory, grown by a copy at each read: streamed
    # for the whole read_timeout, it took memory and kept the event loop copying, every webhook waiting.
    limits = {"read_timeout": "30s", "max_header_bytes": 1024}
    start = b"X-Endless: " if where == "header" else b""
    line = b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\n" + start
    if where == "url":
        line = b"POST /webhooks/consignease?"
    with RunningGateway(gateway_config(tmp_path, limits=limits)) as gw, Connection(gw.url) as conn:
        conn.sock.settimeout(5)
        conn.send(line)
        sent = 0
        while sent < 32 * 1024 * 1024 and not select.select([conn.sock], [], [], 0)[0]:
            conn.send(b"a" * 65536)
            sent += 65536
        assert sent < 4 * 1024 * 1024  # answered as it arrived, not once the head ended
        assert conn.reader.read().startswith(b"HTTP/1.1 431 ")  # then the connection is closed
        assert gw.metric("hookyard_webhook_rejections_total", source="", reason="headers_too_large") == 1
        with Connection(gw.url) as other:
            other.send(signed("msg_after_endless_head"))
            assert other.answer()[0] == 200


def test_an_ops_request_whose_head_never_ends_is_refused_431_as_it_arrives(tmp_path) -> None:
    # uvicorn's parser held it all: a header streamed to the ops listener grew the process by its size (64
    # MB read, then answered 200), from any peer that reaches the port, token or not.
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.ops_url) as conn:
        conn.sock.settimeout(5)
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        while sent < 32 * 1024 * 1024 and not select.select([conn.sock], [], [], 0)[0]:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # closed under what is sent
                conn.send(b"a" * 65536)
            sent += 65536
        assert sent < 4 * 1024 * 1024  # answered as it arrived, not once the head ended
        status, headers, body = conn.answer()
        assert gw.client.get(gw.ops_url + "/healthz").status_code == 200
    assert (status, headers["content-type"], headers["connection"]) == (431, "application/json", "close")
    assert json.loads(body) == {
        "error": f"the request line and headers are longer than {protocol.OPS_HEAD_LIMIT} bytes"
    }


@pytest.mark.parametrize(
    "sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half a head"]
)
def test_an_ops_connection_whose_head_does_not_come_in_time_gets_408_and_is_closed(
    tmp_path, monkeypatch: pytest.MonkeyPatch, sent: bytes
) -> None:
    # uvicorn's protocol held such a connection for ever (its keep-alive timeout runs only after an answer):
    # enough of them would take every file descriptor the process may open.
    monkeypatch.setattr(protocol, "OPS_HEAD_TIMEOUT", 0.3)
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.ops_url) as conn:
        conn.send(sent)
        status, headers, body = conn.answer()
        assert conn.closed_by_server()
        assert gw.client.get(gw.ops_url + "/healthz").status_code == 200  # a request in time is answered
    assert (status, headers["connection"]) == (408, "close")
    assert json.loads(body) == {"error": "the request line and headers did not come within 0.3 s"}


def test_an_admin_request_whose_body_stops_gets_408_and_its_connection_is_closed(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvicorn waited for the rest of the body for ever, with the connection and the endpoint's task.
    monkeypatch.setattr(protocol, "OPS_BODY_TIMEOUT", 0.3)
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.ops_url) as conn:
        head = b"POST /admin/replay HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
        conn.send(head + b'{"mode": "')
        status, headers, body = conn.answer()
        assert conn.closed_by_server()
        with Connection(gw.ops_url) as other:  # a body that comes whole is read as ever
            other.send(b"POST /admin/replay HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 16\r\n\r\n")
            other.send(b'{"mode": "dead"}')
            assert other.answer()[0] == 200
    assert (status, headers["content-type"], headers["connection"]) == (408, "application/json", "close")
    assert json.loads(body) == {"error": "the body did not come within 0.3 s"}


def test_an_ops_connection_whose_body_stops_after_its_answer_is_closed(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Answered without reading its body (/healthz), the connection read the rest to drop it: every byte
    # cancelled uvicorn's keep-alive timeout, so a body that stopped held the connection for ever.
    monkeypatch.setattr(protocol, "OPS_BODY_TIMEOUT", 0.3)
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.ops_url) as conn:
        conn.sock.settimeout(20)  # closed within a second or so, or never
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        assert conn.answer()[0] == 200
        conn.send(b"01234")  # after the answer, which armed the keep-alive timeout
        assert conn.closed_by_server()


@pytest.mark.parametrize(
    ("head", "then"),
    [(b"Content-Length: 10\r\n", b"0123456789"), (b"", b"\r\n")],
    ids=["the end of its body", "a blank line"],
)
def test_an_ops_connection_idle_again_after_what_follows_its_answer_is_closed_at_the_keep_alive_timeout(
    tmp_path, monkeypatch: pytest.MonkeyPatch, head: bytes, then: bytes
) -> None:
    # What came after the answer cancelled uvicorn's keep-alive timeout, which only the next answer arms:
    # the end of a body /healthz did not read, or a blank line (which begins no request), and the connection
    # was held for ever.
    monkeypatch.setattr(app, "OPS_IDLE_TIMEOUT", 1)
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.ops_url) as conn:
        conn.sock.settimeout(20)  # closed within a second or so, or never
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        assert conn.answer()[0] == 200
        conn.send(then)
        assert conn.closed_by_server()


def ops_metric(gw: RunningGateway, name: str, **labels: str) -> float:
    """A metric read in the gateway's process, not scraped: a scrape's connection would count among the ops
    listener's."""
    return metric_value(generate_latest(gw.gateway.metrics.registry).decode(), name, **labels)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_flood_of_idle_ops_connections_closes_the_oldest_and_probes_and_scrapes_are_answered(
    tmp_path,
) -> None:
    # The ops listener took every connection, each held until its head's deadline: a flood renewed as fast
    # took every file descriptor the process may open, and /healthz, /readyz, webhooks and the store failed.
    with RunningGateway(gateway_config(tmp_path)) as gw:
        port = int(gw.ops_url.rpartition(":")[2])
        flood = [
            socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3 * OPS_MAX_CONNECTIONS)
        ]
        try:
            flood[-1].sendall(b"GET /healthz HTTP/1.1\r\n")  # half a head: no request being answered
            assert httpx.get(gw.ops_url + "/healthz", timeout=10).status_code == 200
            assert httpx.get(gw.ops_url + "/metrics", timeout=10).status_code == 200
            assert closed_by_server(flood[0])  # the oldest, at once, not at its head's deadline
            assert ops_metric(gw, "hookyard_ops_connections") <= OPS_MAX_CONNECTIONS
            assert (
                ops_metric(gw, "hookyard_ops_connections_shed_total", outcome="closed")
                >= 2 * OPS_MAX_CONNECTIONS
            )
        finally:
            for sock in flood:
                sock.close()


def test_one_ops_connection_more_than_those_each_being_answered_is_refused_503(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, held = threading.Event(), []

    async def check_writable(room: int) -> None:
        held.append(room)
        for _ in range(600):  # 30 s at most
            if release.is_set():
                return
            await asyncio.sleep(0.05)

    with RunningGateway(gateway_config(tmp_path)) as gw:
        monkeypatch.setattr(gw.gateway.storage, "check_writable", check_writable)
        wait_until(lambda: ops_metric(gw, "hookyard_ops_connections") == 0)  # the start's readiness checks
        probes = [Connection(gw.ops_url) for _ in range(OPS_MAX_CONNECTIONS)]
        try:
            for probe in probes:
                probe.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            # Behind its request, one sends the start of another: still being answered all the same (it was
            # taken for a connection whose request's body is still coming, and closed).
            probes[0].send(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            wait_until(lambda: len(held) == OPS_MAX_CONNECTIONS)
            with Connection(gw.ops_url) as one_more:
                status, headers, body = one_more.answer()
                assert one_more.closed_by_server()
            release.set()
            assert [probe.answer()[0] for probe in probes] == [200] * OPS_MAX_CONNECTIONS  # none was closed
        finally:
            release.set()
            for probe in probes:
                probe.__exit__()
        assert httpx.get(gw.ops_url + "/healthz", timeout=10).status_code == 200
        assert ops_metric(gw, "hookyard_ops_connections_shed_total", outcome="refused") == 1
    assert (status, headers["retry-after"], headers["connection"]) == (503, "5", "close")
    assert json.loads(body) == {
        "error": f"the ops listener has {OPS_MAX_CONNECTIONS} connections open, each with a request being "
        "answered; retry later"
    }


@pytest.mark.parametrize("listener", ["url", "ops_url"])
@pytest.mark.parametrize("path", ["/webhooks/consignease?", "/nowhere/"])
def test_a_url_too_long_to_parse_is_refused_414_naming_it_and_the_listener_goes_on(
    tmp_path, listener: str, path: str
) -> None:
    # It was `400 invalid_http`, "the request is not valid HTTP/1.1": the request is HTTP, its URL is only
    # longer than the parser reads (64 KiB), which RFC 9112 §3 answers 414.
    request = b"POST %s%s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}" % (path.encode(), b"a" * 70_000)
    with RunningGateway(gateway_config(tmp_path)) as gw:
        with Connection(getattr(gw, listener)) as conn:
            conn.send(request)
            status, headers, body = conn.answer()
            assert conn.closed_by_server()
        refused = gw.metric("hookyard_webhook_rejections_total", source="", reason="url_too_long")
        with Connection(gw.url) as other:
            other.send(signed("msg_after_long_url"))
            assert other.answer()[0] == 200
    assert (status, headers["content-type"], headers["connection"]) == (414, "application/json", "close")
    if listener == "url":
        assert json.loads(body) == {"error": "url_too_long", "detail": "the URL is longer than 65535 bytes"}
        assert refused == 1
    else:
        assert json.loads(body) == {"error": "the URL is longer than 65535 bytes"}
        assert refused == 0  # the ops listener's requests are no webhooks


_HEAD = b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\n"
_CONTINUE = b"Expect: 100-continue\r\n"
_BULK = b"a" * 65536
# What a client sends, what it goes on sending (at once again and again, every 20 ms, or only once
# answered: a body that stalled), and the answer it is to read, closing the connection. Read after what
# it sent last, each answer was lost to a reset (ECONNRESET) nearly every time: the connection was closed
# with what the client had sent since unread.
_STILL_SENDING = {
    "header_timeout": (_HEAD + b"X-Slow: ", b"a", 0.02, 408, "header_timeout"),
    "headers_too_large": (_HEAD + b"X-Endless: ", _BULK, 0.0, 431, "headers_too_large"),
    "invalid_http_head": (b"GARBAGE \x00\x01\r\n", _BULK, 0.0, 400, "invalid_http"),
    "invalid_http_body": (
        _HEAD + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n",
        _BULK,
        0.0,
        400,
        "invalid_http",
    ),
    "body_too_large": (
        _HEAD + b"Connection: close\r\nContent-Length: 10000000\r\n\r\n",
        _BULK,
        0.0,
        413,
        "body_too_large",
    ),
    "body_timeout": (_HEAD + b"Content-Length: 500\r\n\r\n{", b"a" * 100, None, 408, "body_timeout"),
    # Through the ASGI app: its 100 Continue is read first.
    "asgi_invalid_http": (
        _HEAD + _CONTINUE + b"Transfer-Encoding: chunked\r\n\r\n",
        b"ZZ\r\n" + _BULK,
        0.0,
        400,
        "invalid_http",
    ),
    "asgi_body_too_large": (
        _HEAD + _CONTINUE + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"%x\r\n%s\r\n" % (len(_BULK), _BULK),
        0.0,
        413,
        "body_too_large",
    ),
    "asgi_body_timeout": (
        _HEAD + _CONTINUE + b"Content-Length: 500\r\n\r\n",
        b"a" * 100,
        None,
        408,
        "body_timeout",
    ),
}


@pytest.mark.parametrize("case", _STILL_SENDING.values(), ids=_STILL_SENDING)
def test_a_client_still_sending_when_its_connection_is_answered_and_closed_reads_the_answer(
    tmp_path, case: tuple[bytes, bytes, float | None, int, str]
) -> None:
    first, more, pace, status, reason = case
    limits = {"read_timeout": "300ms", "max_header_bytes": 1024, "max_body_bytes": 1000}
    with RunningGateway(gateway_config(tmp_path, limits=limits)) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        for _ in range(4):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                answer = send_until_answered(sock, first, more, pace)
            assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"connection: close" in head.lower().split(b"\r\n")
            assert json.loads(body)["error"] == reason
        # Closed by then, or soon after: none of them holds a place among listen.max_connections.
        wait_until(lambda: gw.metric("hookyard_webhook_connections") == 0)


def https_config(tmp_path) -> tuple[dict[str, Any], ssl.SSLContext]:
    """A gateway_config served over HTTPS, with a certificate of its own, and a client context trusting it."""
    cert, key = self_signed(tmp_path, "listener")
    config = gateway_config(
        tmp_path, listen={"tls": {"cert": str(cert), "key": str(key)}}, limits={"max_body_bytes": 1000}
    )
    return config, ssl.create_default_context(cafile=cert)


def tls_socket(url: str, context: ssl.SSLContext, suppress_ragged_eofs: bool = True) -> ssl.SSLSocket:
    address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
    return context.wrap_socket(
        socket.create_connection(address, timeout=5),
        server_hostname="127.0.0.1",
        suppress_ragged_eofs=suppress_ragged_eofs,
    )


@pytest.mark.parametrize("name", ["invalid_http_body", "asgi_invalid_http", "asgi_body_too_large"])
def test_an_https_client_still_sending_when_its_connection_is_answered_and_closed_reads_the_answer(
    tmp_path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # The connection lingers over TLS too: closed at once, with close_notify, asyncio's TLS layer fails on
    # what the client sends after it (APPLICATION_DATA_AFTER_CLOSE_NOTIFY) and resets the connection. (Not
    # a head refused 431: TLS 1.3 session tickets make the socket readable before the client sent enough.)
    monkeypatch.setattr(protocol, "_LINGER", 0.3)  # long enough for what the client still sends
    first, more, pace, status, reason = _STILL_SENDING[name]
    config, context = https_config(tmp_path)
    config["limits"] = {"read_timeout": "300ms", "max_header_bytes": 1024, "max_body_bytes": 1000}
    with RunningGateway(config, scheme="https") as gw:
        for _ in range(3):
            with tls_socket(gw.url, context) as sock:
                answer = send_until_answered(sock, first, more, pace)
            assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == reason


def send_until_answered(sock: socket.socket, first: bytes, more: bytes, pace: float | None) -> bytes:
    """Send `first`, then `more` every `pace` seconds until the answer comes (with no pace, nothing until
    then), and `more` twice again as it comes, as a client that is still sending; then read to the end.
    What was read, or the error that cut it short (as bytes)."""
    try:
        sock.sendall(first)
        if _CONTINUE in first:
            assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        for _ in range(500):
            if select.select([sock], [], [], 5.0 if pace is None else pace)[0]:
                break
            sock.sendall(more)
        for _ in range(2):
            sock.sendall(more)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer
    except OSError as error:
        return type(error).__name__.encode()


def test_a_head_not_complete_within_the_read_timeout_gets_408_header_timeout_and_is_closed(tmp_path) -> None:
    with RunningGateway(gateway_config(tmp_path, limits={"read_timeout": "300ms"})) as gw:
        with Connection(gw.url) as conn:
            conn.send(b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # then nothing
            status, headers, body = conn.answer()
            assert conn.closed_by_server()
        assert (status, headers["connection"], json.loads(body)["error"]) == (408, "close", "header_timeout")
        assert gw.metric("hookyard_webhook_rejections_total", source="", reason="header_timeout") == 1


def test_a_head_that_times_out_behind_a_webhook_being_stored_is_answered_after_it(tmp_path) -> None:
    # The 408 was written at once and the connection closed: the webhook's sender read it as its own answer
    # (and sent again) while the webhook was being stored, and the answer it was owed was never written.
    with RunningGateway(gateway_config(tmp_path, limits={"read_timeout": "300ms"})) as gw:
        # Another process holds the database's write lock: the webhook's commit waits for it.
        holder = sqlite3.connect(tmp_path / "hookyard.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with Connection(gw.url) as conn:
                conn.send(signed("msg_before_slow_head") + b"POST /webhooks/consignease HTTP/1.1\r\nX-Slow: ")
                time.sleep(1)  # well past the read timeout of the head that follows the webhook
                holder.rollback()
                first, second = conn.answer(), conn.answer()
                assert conn.closed_by_server()
        finally:
            holder.close()
    assert (first[0], json.loads(first[2])) == (200, {"id": "msg_before_slow_head", "status": "accepted"})
    assert (second[0], second[1]["connection"], json.loads(second[2])["error"]) == (
        408,
        "close",
        "header_timeout",
    )


def test_a_head_begun_before_the_answer_before_it_keeps_its_read_timeout(tmp_path) -> None:
    # The answer to the webhook before it set the connection's idle deadline in place of the head's own:
    # the head had limits.idle_timeout (a minute here) instead of the read timeout, and with an idle timeout
    # shorter than the read timeout it was cut off without its 408.
    limits = {"read_timeout": "300ms", "idle_timeout": "60s"}
    with RunningGateway(gateway_config(tmp_path, limits=limits)) as gw, Connection(gw.url) as conn:
        conn.send(signed("msg_before_slow_head") + b"POST /webhooks/consignease HTTP/1.1\r\nX-Slow: ")
        first, second = conn.answer(), conn.answer()  # within the socket's 10 s
        assert conn.closed_by_server()
    assert (first[0], json.loads(first[2])["status"]) == (200, "accepted")
    assert (second[0], json.loads(second[2])["error"]) == (408, "header_timeout")


def test_a_body_over_the_limit_is_refused_as_it_arrives_and_the_connection_stays_usable(tmp_path) -> None:
    chunk = b"x" * 600
    with (
        RunningGateway(gateway_config(tmp_path, limits={"max_body_bytes": 1000})) as gw,
        Connection(gw.url) as conn,
    ):
        # Chunked: no Content-Length to refuse it by, so it is refused once 1000 bytes are in.
        conn.send(b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2)
        status, _, body = conn.answer()
        conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))  # the rest is read and dropped
        conn.send(signed("msg_after_413"))
        after = conn.answer()
        assert gw.gateway.ingress.in_flight == 0
    assert (status, json.loads(body)["error"]) == (413, "body_too_large")
    assert (after[0], json.loads(after[2])["status"]) == (200, "accepted")


@pytest.mark.parametrize("expect", [False, True], ids=["fast_path", "asgi_path"])
def test_the_rest_of_a_body_refused_mid_way_is_read_for_the_read_timeout_not_the_idle_one(
    tmp_path, expect: bool
) -> None:
    # Refused 413 while its body was still coming, the connection was closed idle_timeout after the answer
    # (at once, not lingering): a sender still sending the rest was reset, and could lose the answer.
    limits = {"max_body_bytes": 1000, "idle_timeout": "300ms", "read_timeout": "30s"}
    chunk = b"%x\r\n%s\r\n" % (600, b"x" * 600)
    with RunningGateway(gateway_config(tmp_path, limits=limits)) as gw, Connection(gw.url) as conn:
        conn.send(b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n")
        conn.send(_CONTINUE + b"\r\n" if expect else b"\r\n")
        if expect:
            assert conn.answer()[0] == 100
        conn.send(chunk * 2)
        status, _, body = conn.answer()
        deadline = time.monotonic() + 1.0  # sending the rest for longer than idle_timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)
            conn.send(chunk)
        conn.send(b"0\r\n\r\n" + signed("msg_after_the_rest"))
        after = conn.answer()
    assert (status, json.loads(body)["error"]) == (413, "body_too_large")
    assert (after[0], json.loads(after[2])["status"]) == (200, "accepted")


def test_a_webhook_cut_off_by_the_shutdown_on_the_asgi_app_gets_no_answer_as_on_the_fast_path(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelled at the end of the listener's drain, the ASGI app's request was answered by uvicorn: `500`,
    # text/plain, counted nowhere, with a traceback in the log. A cut-off request gets no answer (docs/
    # operations.md), so its sender sends it again: its connection is closed.
    monkeypatch.setattr(app, "INGRESS_DRAIN_TIMEOUT", 1)
    request = signed("msg_cut_off", extra="Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    gw = RunningGateway(gateway_config(tmp_path, limits={"read_timeout": "30s"}))
    with gw, Connection(gw.url) as conn:
        conn.send(head + b"\r\n\r\n")
        assert conn.answer()[0] == 100
        conn.send(body[:10])  # and the rest never
        wait_until(lambda: gw.gateway.ingress.in_flight == 1)
        gw.loop.call_soon_threadsafe(gw.gateway.request_exit)
        assert conn.reader.read() == b""
        wait_until(lambda: gw.gateway.ingress.in_flight == 0)


@pytest.mark.parametrize("new_loop", event_loops())
@pytest.mark.parametrize("door", ["fast_path", "asgi_path", "https"])
def test_a_webhook_cut_off_by_the_shutdown_has_its_connection_ended_as_the_listener_stops(
    tmp_path, monkeypatch: pytest.MonkeyPatch, new_loop: Any, door: str
) -> None:
    # Its body still coming when the listener's drain ran out, a fast-path webhook has no task to cancel:
    # its connection was left open. Under `hookyard serve` the process exits; in-process, its client waited
    # for its own read timeout, and on asyncio's loop the socket outlived the loop until garbage collection.
    monkeypatch.setattr(app, "INGRESS_DRAIN_TIMEOUT", 1)
    request = signed("msg_cut_off", extra="Expect: 100-continue\r\n" if door == "asgi_path" else "")
    config, context = https_config(tmp_path) if door == "https" else (gateway_config(tmp_path), None)
    config["limits"] = {**config.get("limits", {}), "read_timeout": "60s"}
    gc.collect()
    sockets = open_sockets()
    with contextlib.ExitStack() as closing:  # the client's socket, once the gateway has stopped
        gw = RunningGateway(config, scheme="https" if context else "http", new_loop=new_loop)
        with gw:
            if context is not None:
                sock = closing.enter_context(tls_socket(gw.url, context))
                sock.sendall(request[:-10])  # and the rest never
            else:
                conn = closing.enter_context(Connection(gw.url))
                sock = conn.sock
                send_all_but_the_end(conn, request, door)
            sock.settimeout(10)
            wait_until(lambda: gw.gateway.ingress.in_flight == 1)
            gw.loop.call_soon_threadsafe(gw.gateway.request_exit)
            started = time.monotonic()
            try:
                ended = sock.recv(4096)  # no answer; TimeoutError if the connection is left open
            except ConnectionResetError:
                ended = b""
            took = time.monotonic() - started
            assert ended == b""
            assert took < 8, f"the connection ended {took:.1f}s after the exit was asked for"
            wait_until(lambda: gw.gateway.ingress.in_flight == 0)
        assert not gw.thread.is_alive()
        assert open_sockets() - sockets == 1  # only the client's socket is left
    # The gateway cut it off: its client did not leave.
    rejections = gw.gateway.metrics.registry.get_sample_value(
        "hookyard_webhook_rejections_total", {"source": "consignease", "reason": "client_disconnected"}
    )
    assert not rejections


def send_all_but_the_end(conn: Connection, request: bytes, door: str) -> None:
    """The request but its last bytes, which never come: through the ASGI door (Expect: 100-continue in its
    head) the head first, and some of the body once the gateway has answered 100."""
    if door == "asgi_path":
        head, _, body = request.partition(b"\r\n\r\n")
        conn.send(head + b"\r\n\r\n")
        assert conn.answer()[0] == 100
        conn.send(body[:10])
    else:
        conn.send(request[:-10])


@pytest.mark.parametrize("door", ["fast_path", "asgi_path"])
def test_a_second_exit_cuts_off_the_webhooks_the_listener_is_draining(
    tmp_path, monkeypatch: pytest.MonkeyPatch, door: str
) -> None:
    # The listener waits for the requests in progress once it stops (here a minute): a second exit, as a
    # second SIGTERM or Ctrl-C asks for it, ends that wait at once, as its timeout does. The second exit
    # changed nothing: the listener waited out its whole drain.
    monkeypatch.setattr(app, "INGRESS_DRAIN_TIMEOUT", 60)
    request = signed("msg_cut_short", extra="Expect: 100-continue\r\n" if door == "asgi_path" else "")
    gw = RunningGateway(gateway_config(tmp_path, limits={"read_timeout": "5m"}))
    with gw, Connection(gw.url) as conn:
        send_all_but_the_end(conn, request, door)
        wait_until(lambda: gw.gateway.ingress.in_flight == 1)
        gw.loop.call_soon_threadsafe(gw.gateway.request_exit)
        wait_until(lambda: not gw.gateway.ready)
        time.sleep(0.3)
        assert gw.thread.is_alive()  # the first exit waits for the request
        gw.loop.call_soon_threadsafe(gw.gateway.request_exit)
        conn.sock.settimeout(15)
        try:
            ended = conn.sock.recv(4096)  # no answer; TimeoutError if the drain goes on
        except ConnectionResetError:
            ended = b""
        assert ended == b""
        gw.thread.join(15)
        assert not gw.thread.is_alive()
    assert gw.gateway.ingress.in_flight == 0


def test_a_client_that_leaves_mid_body_is_counted_and_frees_its_slot(tmp_path) -> None:
    with RunningGateway(gateway_config(tmp_path)) as gw:
        with Connection(gw.url) as conn:
            conn.send(signed("msg_left")[:-10])
            wait_until(lambda: gw.gateway.ingress.in_flight == 1)
        wait_until(lambda: gw.gateway.ingress.in_flight == 0)
        assert (
            gw.metric("hookyard_webhook_rejections_total", source="consignease", reason="client_disconnected")
            == 1
        )


_CHUNKED = b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
# What follows the webhook, and the source its 400 invalid_http is counted under.
_MALFORMED = {
    # Under no source: the request may not even have had a path.
    "request line": (b"GARBAGE \x00\x01\r\n\r\n", ""),
    # A webhook's own body: under its source, as when it is not pipelined, on either door.
    "chunked body": (_CHUNKED + b"\r\nZZ\r\n", "consignease"),
    "chunked body, 100 Continue": (_CHUNKED + b"Expect: 100-continue\r\n\r\nZZ\r\n", "consignease"),
}


@pytest.mark.parametrize(("malformed", "source"), _MALFORMED.values(), ids=_MALFORMED)
def test_a_malformed_request_pipelined_behind_a_webhook_being_stored_waits_for_its_answer(
    tmp_path, malformed: bytes, source: str
) -> None:
    # The webhook is stored: its sender must hear so, not get the 400 meant for what came after it.
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        conn.send(signed("msg_before_garbage") + malformed)
        first, second = conn.answer(), conn.answer()
        if second[0] == 100:  # the ASGI app's, as it starts reading the body
            second = conn.answer()
        assert conn.closed_by_server()
        wait_until(lambda: gw.gateway.ingress.in_flight == 0)
        refused = {
            name: gw.metric("hookyard_webhook_rejections_total", source=name, reason="invalid_http")
            for name in ("", "consignease")
        }
    assert (first[0], json.loads(first[2])) == (200, {"id": "msg_before_garbage", "status": "accepted"})
    assert (second[0], second[1]["connection"], json.loads(second[2])["error"]) == (
        400,
        "close",
        "invalid_http",
    )
    assert refused == {"": 0, "consignease": 0, source: 1}


@pytest.mark.parametrize(
    "expect",
    [
        None,  # the fast path
        "100 Continue first",  # the ASGI app, waiting for the body when it comes
        "body at once",  # the ASGI app, whose request is malformed before it has started
    ],
)
def test_a_webhook_whose_chunked_body_is_malformed_is_refused_400_invalid_http(
    tmp_path, expect: str | None
) -> None:
    # Through the ASGI app (a sender that expects 100 Continue), the listener answered 400 itself, counted
    # under no source, and closed the connection under the app, which counted `client_disconnected`.
    request = b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    request += b"Expect: 100-continue\r\n\r\n" if expect else b"\r\n"
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        if expect == "100 Continue first":
            conn.send(request)
            assert conn.answer()[0] == 100
            conn.send(b"2\r\n{}\r\nZZ\r\n")
        else:
            conn.send(request + b"2\r\n{}\r\nZZ\r\n")
        status, headers, body = conn.answer()
        if status == 100:  # the ASGI app's, as it starts reading the body
            status, headers, body = conn.answer()
        assert conn.closed_by_server()  # nothing after it can be read
        wait_until(lambda: gw.gateway.ingress.in_flight == 0)
        rejections = {
            (source, reason): gw.metric("hookyard_webhook_rejections_total", source=source, reason=reason)
            for source in ("consignease", "")
            for reason in ("invalid_http", "client_disconnected")
        }
    assert rejections == {
        ("consignease", "invalid_http"): 1,
        ("consignease", "client_disconnected"): 0,
        ("", "invalid_http"): 0,
        ("", "client_disconnected"): 0,
    }
    assert (status, headers["connection"], json.loads(body)) == (
        400,
        "close",
        {
            "error": "invalid_http",
            "detail": "the body is not valid HTTP/1.1 (Invalid character in chunk size)",
        },
    )


def test_a_malformed_rest_of_a_refused_body_closes_the_connection_without_a_second_answer(tmp_path) -> None:
    request = b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    config = gateway_config(tmp_path, limits={"max_body_bytes": 100})
    with RunningGateway(config) as gw, Connection(gw.url) as conn:
        conn.send(request + b"c8\r\n" + b"x" * 200 + b"\r\n")
        status, _, body = conn.answer()  # refused mid-body; the rest is read to be dropped
        conn.send(b"ZZ\r\n")
        # Its request is answered: a 400 now would be read as the answer to the client's next request.
        assert conn.closed_by_server()
    assert (status, json.loads(body)["error"]) == (413, "body_too_large")


def test_a_sender_that_expects_100_continue_is_served_by_the_asgi_app(tmp_path) -> None:
    request = signed("msg_continue", extra="Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        conn.send(head + b"\r\n\r\n")
        assert conn.reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert conn.reader.readline() == b"\r\n"
        conn.send(body)
        status, _, answer = conn.answer()
    assert (status, json.loads(answer)) == (200, {"id": "msg_continue", "status": "accepted"})


# Requests refused at their head, before their body is asked for: the listener, the request's head, what it
# is answered.
_REFUSED_AT_THE_HEAD = {
    "unknown path": ("url", b"POST /nowhere HTTP/1.1\r\nContent-Length: %d\r\n", 404),
    "wrong method": ("url", b"PUT /webhooks/consignease HTTP/1.1\r\nContent-Length: %d\r\n", 405),
    "declared too large": ("url", b"POST /webhooks/consignease HTTP/1.1\r\nContent-Length: 5000\r\n", 413),
    "compressed": (
        "url",
        b"POST /webhooks/consignease HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n",
        415,
    ),
    "admin, no endpoint": ("ops_url", b"POST /admin/nowhere HTTP/1.1\r\nContent-Length: %d\r\n", 404),
    "admin, declared too large": (
        "ops_url",
        b"POST /admin/replay HTTP/1.1\r\nContent-Length: 70000\r\n",
        413,
    ),
}


@pytest.mark.parametrize(
    ("listener", "head", "status"), _REFUSED_AT_THE_HEAD.values(), ids=_REFUSED_AT_THE_HEAD
)
def test_a_request_refused_before_its_100_continue_closes_its_connection_so_its_body_is_never_a_request(
    tmp_path, listener: str, head: bytes, status: int
) -> None:
    # Answered without 100 Continue, the client may send the body or not (RFC 9110 §10.1.1): kept alive, the
    # connection read the client's next request as that body, dropped it unanswered, and hung until its
    # idle deadline. Closed instead (RFC 9112 §9.6), as Go's server does.
    following = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    head = head % len(following) if b"%d" in head else head
    config = gateway_config(tmp_path, limits={"max_body_bytes": 1000, "idle_timeout": "30s"})
    with RunningGateway(config) as gw, Connection(getattr(gw, listener)) as conn:
        conn.send(head + b"Host: 127.0.0.1\r\n" + _CONTINUE + b"\r\n")
        answered, headers, _ = conn.answer()
        assert (answered, headers.get("connection")) == (status, "close")
        conn.send(following)  # the client's next request, had the connection been kept: never answered
        if listener == "url":
            assert conn.closed_by_server()  # read and dropped as the connection lingers
        else:
            # The ops listener does not linger: what comes after its close may reset the connection.
            with contextlib.suppress(ConnectionResetError):
                assert conn.closed_by_server()


def test_a_request_refused_once_its_body_came_unasked_for_keeps_its_connection(tmp_path) -> None:
    # A client that sends its body without waiting for 100 Continue: nothing of it is left to tell apart
    # from the next request.
    request = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + _CONTINUE + b"\r\n{}"
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        conn.send(request)
        refused = conn.answer()
        conn.send(signed("msg_after_unasked_body"))
        after = conn.answer()
    assert (refused[0], refused[1].get("connection")) == (404, None)
    assert (after[0], json.loads(after[2])["status"]) == (200, "accepted")


def test_an_http_1_0_sender_that_expects_100_continue_gets_no_1xx_and_the_same_answer(tmp_path) -> None:
    # HTTP/1.0 has no 1xx answers: a client reads `100 Continue` as the final answer (RFC 9110 §15.2), so
    # the expectation is ignored (§10.1.1) and the webhook is answered as it would be without it.
    answers = []
    with RunningGateway(gateway_config(tmp_path)) as gw:
        for n, extra in enumerate(["", "Expect: 100-continue\r\n"]):
            with Connection(gw.url) as conn:
                conn.send(signed(f"msg_http_1_0_{n}", extra=extra, version="1.0"))
                answers.append(conn.answer())
                assert conn.closed_by_server()
        accepted = gw.metric("hookyard_webhooks_received_total", source="consignease", outcome="accepted")
    assert [
        (status, headers["connection"], json.loads(body)["status"]) for status, headers, body in answers
    ] == [(200, "close", "accepted")] * 2
    assert accepted == 2


# What Java's HttpClient (and Spring's RestClient on it) sends with every cleartext request.
_H2C = (
    "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    "HTTP2-Settings: AAEAAEAAAAIAAAAAAAMAAABkAAQBAAAAAAUAAEAA\r\n"
)


def chunked(msg_id: str, extra: str = "") -> tuple[bytes, bytes]:
    """A signed request whose body comes in two chunks; and the body."""
    body, headers = svix_request(msg_id=msg_id)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]))
    request = (
        f"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{head}{extra}\r\n"
    )
    return request.encode() + chunks + b"0\r\n\r\n", body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_webhook_that_asks_to_upgrade_to_h2c_is_answered_in_http_1_1_with_its_body(
    tmp_path, framing: str
) -> None:
    # The listener switches to no other protocol: Upgrade is ignored (RFC 9110 §7.8), the body is read.
    if framing == "chunked":
        request, body = chunked("msg_h2c", extra=_H2C)
    else:
        request = signed("msg_h2c", extra=_H2C)
        body = request.partition(b"\r\n\r\n")[2]
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        conn.send(request + signed("msg_after_h2c", extra=_H2C))  # and one pipelined behind it, asking too
        answers = [conn.answer(), conn.answer()]
        conn.send(signed("msg_later"))  # the connection is still HTTP/1.1, and kept alive
        answers.append(conn.answer())
        [stored] = asyncio.run_coroutine_threadsafe(gw.gateway.storage.get_event("msg_h2c"), gw.loop).result(
            10
        )
    assert [(status, json.loads(answer)) for status, _, answer in answers] == [
        (200, {"id": "msg_h2c", "status": "accepted"}),
        (200, {"id": "msg_after_h2c", "status": "accepted"}),
        (200, {"id": "msg_later", "status": "accepted"}),
    ]
    assert stored.event.body == body
    assert "upgrade" not in stored.event.headers and stored.event.headers["connection"] == "HTTP2-Settings"


def test_a_webhook_that_asks_to_upgrade_to_websocket_is_answered_in_http_1_1(tmp_path) -> None:
    extra = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        conn.send(signed("msg_websocket", extra=extra + "Sec-WebSocket-Version: 13\r\n"))
        status, _, answer = conn.answer()
        conn.send(signed("msg_after_websocket"))
        after = conn.answer()
    assert (status, json.loads(answer)) == (200, {"id": "msg_websocket", "status": "accepted"})
    assert (after[0], json.loads(after[2])["status"]) == (200, "accepted")


def test_http_1_0_is_answered_and_closed(tmp_path) -> None:
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        conn.send(signed("msg_http10", version="1.0"))
        status, headers, body = conn.answer()
        assert conn.closed_by_server()
    assert (status, headers["connection"], json.loads(body)["status"]) == (200, "close", "accepted")


def closing_request(kind: str) -> tuple[bytes, int]:
    """A request whose answer closes its connection, sent whole, and the status it is answered."""
    close = "Connection: close\r\n"
    return {
        "stored": (signed("msg_first", extra=close), 200),
        "http_1_0": (signed("msg_first", version="1.0"), 200),
        "refused_at_its_head": (_HEAD + close.encode() + b"Content-Length: 2\r\n\r\n{}", 401),
        "too_large": (_HEAD + close.encode() + b"Content-Length: 2000\r\n\r\n" + b"x" * 2000, 413),
        "asgi_app": (
            b"POST /nowhere HTTP/1.1\r\nHost: x\r\n" + close.encode() + b"Content-Length: 2\r\n\r\n{}",
            404,
        ),
    }[kind]


CLOSING_REQUESTS = ["stored", "http_1_0", "refused_at_its_head", "too_large", "asgi_app"]


@pytest.mark.parametrize("kind", CLOSING_REQUESTS)
def test_requests_pipelined_after_one_whose_answer_closes_the_connection_are_never_taken(
    tmp_path, kind: str
) -> None:
    # A client that sent `Connection: close` (or HTTP/1.0) sends no further request on that connection (RFC
    # 9112 §9.6). One that does anyway, in the same write, has them dropped unread: none is stored (so none
    # is delivered) or answered, and the answer to the first is whole, the last thing on the connection.
    first, status = closing_request(kind)
    with RunningGateway(gateway_config(tmp_path, limits={"max_body_bytes": 1000})) as gw:
        with Connection(gw.url) as conn:
            conn.send(first + signed("msg_pipelined_1") + signed("msg_pipelined_2", version="1.0"))
            answered, headers, body = conn.answer()
            assert conn.closed_by_server()
        assert (answered, headers["connection"], len(body)) == (
            status,
            "close",
            int(headers["content-length"]),
        )
        with Connection(gw.url) as conn:  # whatever the first connection left to do is done by its answer
            conn.send(signed("msg_next"))
            assert conn.answer()[0] == 200
        listed = [event["id"] for event in gw.client.get(f"{gw.ops_url}/admin/events").json()["events"]]
        assert sorted(listed) == (["msg_first", "msg_next"] if status == 200 else ["msg_next"])


@pytest.mark.parametrize("kind", CLOSING_REQUESTS)
def test_an_https_client_that_reads_to_the_end_has_the_end_with_its_answer(
    tmp_path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # A TLS connection cannot be half-closed: closed after its answer, it lingered a second (_LINGER) before
    # its close_notify, and a client that reads to the end (HTTP/1.0, `Connection: close`) waited that long
    # for it. Over plain HTTP the half-close ends its reading at once. Made long, for a wait to show.
    monkeypatch.setattr(protocol, "_LINGER", 30.0)
    first, status = closing_request(kind)
    config, context = https_config(tmp_path)
    with RunningGateway(config, scheme="https") as gw, tls_socket(gw.url, context) as sock:
        sock.sendall(first)
        answer = b""
        while chunk := sock.recv(65536):  # TimeoutError (5 s) while the connection lingers
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"content-length: %d" % len(body) in head.split(b"\r\n")


@pytest.mark.parametrize("new_loop", event_loops())
def test_an_https_connection_lingering_as_the_listener_stops_ends_with_close_notify(
    tmp_path, monkeypatch: pytest.MonkeyPatch, new_loop: Any
) -> None:
    # A connection still lingering after its last answer (a body refused before it ended, which its client
    # may still be sending) was aborted as the listener stopped: over TLS, with no close_notify, so its
    # client read "EOF occurred in violation of protocol" after the answer, not the end. Made long, so the
    # connection still lingers at the stop; and a wait for the client's close_notify would show.
    monkeypatch.setattr(protocol, "_LINGER", 30.0)
    monkeypatch.setattr(protocol, "TLS_SHUTDOWN_TIMEOUT", 60.0)
    config, context = https_config(tmp_path)
    body, headers = svix_request(msg_id="msg_before_the_stop")
    webhook = b"".join(
        [_HEAD]
        + [f"{name}: {value}\r\n".encode() for name, value in headers.items()]
        + [f"content-length: {len(body)}\r\n\r\n".encode(), body]
    )
    with contextlib.ExitStack() as closing:  # the client's connection, once the gateway has stopped
        with RunningGateway(config, scheme="https", new_loop=new_loop) as gw:
            # Ended without close_notify, the connection raises SSLEOFError.
            sock = tls_socket(gw.url, context, suppress_ragged_eofs=False)
            closing.callback(sock.close)
            sock.sendall(webhook)  # a keep-alive connection: answered, and open
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            # Past max_body_bytes: refused at once, and closed after its answer, its body still owed.
            sock.sendall(_HEAD + b"Connection: close\r\nContent-Length: 5000\r\n\r\n" + b"a" * 100)
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
            # Its slot is given up as it lingers: the listener has no connection left to wait for.
            wait_until(lambda: gw.metric("hookyard_webhook_connections") == 0)
            started = time.monotonic()
        took = time.monotonic() - started
        assert sock.recv(4096) == b""  # close_notify: the end, not a truncation
    # A wait for it would last until the listener's drain timeout at least; a loaded machine stops in far less.
    assert took < INGRESS_DRAIN_TIMEOUT - 1, f"the gateway took {took:.1f}s to stop"


class ExplodingProvider(SvixProvider):
    name = "exploding"

    def parse(self, headers: Any, body: bytes, payload: Any, received_at: float) -> Any:
        raise RuntimeError("a bug in a provider plugin")


class UnanswerableProvider(SvixProvider):
    name = "unanswerable"

    def reply(self, event: Any) -> dict[str, Any]:
        return {"challenge": object()}  # a bug in a provider plugin: JSON cannot hold it


def with_provider(tmp_path: Path, provider: type[Provider]) -> tuple[dict[str, Any], Any, str]:
    """A config with a source of `provider`, registered by a plugin named after it: the config, the plugin
    manager and the source's path."""

    class BuggyPlugin:
        @hookimpl
        def register_providers(self) -> list[type[Provider]]:
            return [provider]

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(BuggyPlugin(), name=provider.name)
    config = gateway_config(tmp_path)
    path = f"/webhooks/{provider.name}"
    config["sources"][provider.name] = {**config["sources"]["consignease"], "path": path}
    config["sources"][provider.name]["provider"] = provider.name
    return config, pm, path


def send_signed(conn: Connection, msg_id: str, path: str, expect: bool) -> tuple[int, bytes]:
    """Send one signed webhook on conn, through the ASGI app (which says 100 Continue first) if expect; its
    status and body."""
    if expect:
        head, _, body = signed(msg_id, path=path, extra="Expect: 100-continue\r\n").partition(b"\r\n\r\n")
        conn.send(head + b"\r\n\r\n")
        assert conn.reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert conn.reader.readline() == b"\r\n"
        conn.send(body)
    else:
        conn.send(signed(msg_id, path=path))
    status, _, answer = conn.answer()
    return status, answer


@pytest.mark.parametrize("expect", [False, True], ids=["fast_path", "asgi_path"])
@pytest.mark.parametrize(
    ("provider", "reason"),
    [(ExplodingProvider, "provider_failed"), (UnanswerableProvider, "internal_error")],
    ids=["parse_raises", "reply_not_json"],
)
def test_a_provider_bug_gets_a_500_and_the_connection_stays_usable(
    tmp_path, provider: type[Provider], reason: str, expect: bool
) -> None:
    config, pm, path = with_provider(tmp_path, provider)
    with RunningGateway(config, pm=pm) as gw, Connection(gw.url) as conn:
        status, body = send_signed(conn, "msg_buggy", path, expect)
        conn.send(signed("msg_fine"))
        after = conn.answer()
        assert gw.metric("hookyard_webhook_rejections_total", source=provider.name, reason=reason) == 1
        assert gw.gateway.ingress.in_flight == 0
    assert (status, json.loads(body)["error"]) == (500, reason)
    assert (after[0], json.loads(after[2])["status"]) == (200, "accepted")


class TypeMapping(SvixProvider):
    """svix's provider, with its event types mapped by event_type as catalog providers do."""

    name = "type-mapping"

    def parse(self, headers: Any, body: bytes, payload: Any, received_at: float) -> Any:
        event = super().parse(headers, body, payload, received_at)
        event.type = self.event_type(event.type)
        return event


class EventTypeRaises(TypeMapping):
    name = "event-type-raises"

    def event_type(self, name: str | int) -> str:
        raise KeyError(name)


class VerifyExits(SvixProvider):
    name = "verify-exits"

    def verify(self, headers: Any, body: bytes, now: float) -> None:
        raise SystemExit(2)  # a library's sys.exit(): it ended `serve`


class EventTypeNone(TypeMapping):
    name = "event-type-none"

    def event_type(self, name: str | int) -> Any:
        return None  # answered 503 storage_unavailable, the store blamed for the NOT NULL it refused


class EventTypeBytes(TypeMapping):
    name = "event-type-bytes"

    def event_type(self, name: str | int) -> Any:
        return str(name).encode()  # stored as a BLOB, then the answer's JSON failed: 500 for a stored event


class IdInteger(SvixProvider):
    name = "id-integer"

    def parse(self, headers: Any, body: bytes, payload: Any, received_at: float) -> Any:
        event = super().parse(headers, body, payload, received_at)
        # Stored as an INTEGER, which no id given as text then found again. Each webhook's its own, as
        # the log's throttle must not tell them apart by it.
        event.id = int(event.id.removeprefix("msg_"))
        return event


class ParseReturnsNone(SvixProvider):
    name = "parse-returns-none"

    def parse(self, headers: Any, body: bytes, payload: Any, received_at: float) -> Any:
        return None  # a 500 internal_error, with an AttributeError of the gateway's to read


class SharedVerify:
    """A mixin a plugin's providers share: not a Provider itself."""

    def verify(self, headers: Any, body: bytes, now: float) -> None:
        raise KeyError("x-signature")


class VerifyFromMixin(SharedVerify, SvixProvider):
    name = "verify-from-mixin"


@pytest.mark.parametrize("expect", [False, True], ids=["fast_path", "asgi_path"])
@pytest.mark.parametrize(
    ("provider", "said"),
    [
        (EventTypeRaises, "event_type raised KeyError: 'user.created'"),
        (VerifyExits, "verify raised SystemExit: 2"),
        (EventTypeNone, "parse made an event whose type is None (a NoneType), not a str"),
        (EventTypeBytes, "parse made an event whose type is b'user.created' (a bytes), not a str"),
        (IdInteger, "parse made an event whose id is 0 (a int), not a str"),
        (ParseReturnsNone, "parse returned NoneType, not an Event"),
        (VerifyFromMixin, "verify raised KeyError: 'x-signature'"),
    ],
    ids=[
        "event_type_raises",
        "verify_exits",
        "event_type_none",
        "event_type_bytes",
        "id_integer",
        "parse_returns_none",
        "verify_from_mixin",
    ],
)
def test_a_provider_that_fails_every_webhook_is_named_once_and_its_senders_are_told_to_retry(
    tmp_path, caplog: pytest.LogCaptureFixture, provider: type[Provider], said: str, expect: bool
) -> None:
    # Each webhook's traceback was logged in full, unnamed and unthrottled, and the answer said nothing of
    # whether to retry; a SystemExit ended `serve`.
    config, pm, path = with_provider(tmp_path, provider)
    with RunningGateway(config, pm=pm) as gw, Connection(gw.url) as conn:
        answers = [send_signed(conn, f"msg_{n}", path, expect) for n in range(3)]
        conn.send(signed("msg_fine"))
        assert conn.answer()[0] == 200  # the gateway, and the other sources, go on
        rejected = gw.metric(
            "hookyard_webhook_rejections_total", source=provider.name, reason="provider_failed"
        )
    for status, body in answers:
        assert status == 500
        assert json.loads(body) == {
            "error": "provider_failed",
            "detail": f"the {provider.name} provider failed on this request (a bug in it, see the gateway's "
            "log); nothing was stored: retry later",
        }
    assert rejected == 3
    named = [r for r in caplog.records if r.name == "hookyard.ingress" and r.levelname == "ERROR"]
    assert [r.getMessage() for r in named] == [
        f"the {provider.name} provider (plugin {provider.name}): {said}; answered 500 provider_failed, "
        "nothing stored"
    ]
    assert (named[0].plugin, named[0].hook, named[0].suppressed) == (provider.name, said.split()[0], 0)
    with contextlib.closing(sqlite3.connect(tmp_path / "hookyard.db")) as db:
        assert [event_id for (event_id,) in db.execute("SELECT event_id FROM events")] == ["msg_fine"]


class Kind(enum.StrEnum):
    CREATED = "user.created"


class TypeStrEnum(TypeMapping):
    """A catalog of its types as a StrEnum: each a str, taken as the text it holds."""

    name = "type-str-enum"

    def event_type(self, name: str | int) -> Any:
        return Kind(name)


@pytest.mark.parametrize("expect", [False, True], ids=["fast_path", "asgi_path"])
def test_an_event_whose_type_is_a_str_subclass_is_stored_as_its_text(tmp_path, expect: bool) -> None:
    config, pm, path = with_provider(tmp_path, TypeStrEnum)
    with RunningGateway(config, pm=pm) as gw, Connection(gw.url) as conn:
        status, body = send_signed(conn, "msg_enum", path, expect)
    assert (status, json.loads(body)["status"]) == (200, "accepted")
    with contextlib.closing(sqlite3.connect(tmp_path / "hookyard.db")) as db:
        stored = db.execute("SELECT event_id, type, typeof(type) FROM events").fetchall()
    assert stored == [("msg_enum", "user.created", "text")]


RAISED: list[weakref.ref[BaseException]] = []


class PluginBug(RuntimeError):
    """Unlike RuntimeError, can be referred to weakly."""


def tracked(exc: BaseException) -> BaseException:
    """exc, with a weak reference to it kept in RAISED (and no frame of the raiser holding it)."""
    RAISED.append(weakref.ref(exc))
    return exc


class VerifyRaises(SvixProvider):
    name = "verify-raises"

    def verify(self, headers: Any, body: bytes, now: float) -> None:
        raise tracked(PluginBug("a bug in a provider plugin"))


@pytest.mark.parametrize("expect", [False, True], ids=["fast_path", "asgi_path"])
def test_a_provider_failure_is_freed_with_its_request_not_at_a_collection(tmp_path, expect: bool) -> None:
    # The plugin was found by reading each frame's locals, which Python 3.11 copies onto the frame: the
    # handler's copy held the exception, whose traceback held the handler's frame, so each failed request
    # (its body, its event) stayed until a collection, rare in `hookyard serve` (a frozen heap).
    config, pm, path = with_provider(tmp_path, VerifyRaises)
    RAISED.clear()
    gc.disable()
    try:
        with RunningGateway(config, pm=pm) as gw, Connection(gw.url) as conn:
            statuses = [send_signed(conn, f"msg_{n}", path, expect)[0] for n in range(3)]
            # The first is logged, its traceback with it; the second is over once the third is answered.
            second_alive = RAISED[1]() is not None
    finally:
        gc.enable()
    assert statuses == [500, 500, 500]
    assert not second_alive


class KeepsParse(Provider):
    """A provider that keeps the base class's parse."""

    name = "keeps-parse"

    def verify(self, headers: Any, body: bytes, now: float) -> None:
        pass


def test_a_bug_in_the_provider_base_class_is_hookyards_not_the_plugins(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Provider.parse runs with the provider as its `self`: its failures were named the plugin's.
    def broken(**fields: Any) -> Any:
        raise RuntimeError("a bug in Hookyard")

    config, pm, path = with_provider(tmp_path, KeepsParse)
    monkeypatch.setattr(providers, "Event", broken)
    body = b'{"id": "evt_1", "type": "user.created"}'
    with RunningGateway(config, pm=pm) as gw, Connection(gw.url) as conn:
        conn.send(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status, _, answer = conn.answer()
    assert (status, json.loads(answer)["error"]) == (500, "internal_error")
    assert "a webhook could not be handled" in [r.getMessage() for r in caplog.records]


class Suspend:
    """Awaited, suspends the coroutine until it is resumed or closed."""

    def __await__(self) -> Any:
        yield


def test_a_webhook_closed_while_it_waits_for_its_body_is_not_answered_as_a_failure(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    # The ASGI door caught the GeneratorExit of a close(), logged "a webhook could not be handled" with it
    # and sent a 500 from a coroutine being closed.
    sent: list[Any] = []

    async def receive() -> Any:
        await Suspend()

    async def send(message: Any) -> None:
        sent.append(message)

    async def close_while_receiving(gw: RunningGateway) -> Any:
        _, headers = svix_request(msg_id="msg_closed")
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/webhooks/consignease",
            "raw_path": b"/webhooks/consignease",
            "headers": [(name.encode(), value.encode()) for name, value in headers.items()],
            "client": ("127.0.0.1", 50000),
        }
        coro = gw.gateway.ingress(scope, receive, send)
        coro.send(None)  # suspended in receive()
        coro.close()
        return gw.gateway.ingress.in_flight

    with RunningGateway(gateway_config(tmp_path)) as gw:
        in_flight = asyncio.run_coroutine_threadsafe(close_while_receiving(gw), gw.loop).result(10)
    assert sent == []
    assert in_flight == 0
    assert "a webhook could not be handled" not in [r.getMessage() for r in caplog.records]


def test_hookyard_serve_freezes_what_exists_once_started_and_tests_do_not(tmp_path) -> None:
    # A full collection would walk every module, config and plugin object, holding up the webhooks in
    # progress: `hookyard serve` (one gateway for the process's life) moves them out of the collector's sight.
    # And it collects the youngest objects less often: those of the webhooks in progress are freed by
    # their reference counts moments later, walking them is wasted.
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    with RunningGateway(gateway_config(tmp_path)):
        assert gc.get_freeze_count() == 0  # what the tests start many times is never frozen
        assert gc.get_threshold() == thresholds
    try:
        with RunningGateway(gateway_config(tmp_path), freeze_startup_objects=True) as gw:
            frozen, serving = gc.get_freeze_count(), gc.get_threshold()
            status = gw.post("/webhooks/consignease", *svix_request(msg_id="msg_frozen")).status_code
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert frozen > 10_000
    assert serving == (GC_YOUNG_THRESHOLD, *thresholds[1:]) and thresholds[0] < GC_YOUNG_THRESHOLD
    assert status == 200


def test_hundreds_of_pipelined_refusals_in_one_write_are_each_answered(tmp_path) -> None:
    # Queued behind a GET (answered by the ASGI app, in a task of its own), each is refused at once (401:
    # unsigned) and starts the next: that must not be a call inside the previous one's answer.
    count = 1500
    get = b"GET /webhooks/consignease HTTP/1.1\r\nHost: x\r\n\r\n"
    unsigned = b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.url) as conn:
        conn.send(get + unsigned * count + signed("msg_after_the_flood"))
        assert conn.answer()[0] == 405
        answers = [conn.answer() for _ in range(count + 1)]
        wait_until(lambda: gw.gateway.ingress.in_flight == 0)
    assert [status for status, _, _ in answers[:count]] == [401] * count
    assert {json.loads(body)["error"] for _, _, body in answers[:count]} == {"missing_signature"}
    assert (answers[-1][0], json.loads(answers[-1][2])["status"]) == (200, "accepted")


def test_a_client_that_pipelines_without_reading_the_answers_is_read_no_further_until_it_reads(
    tmp_path,
) -> None:
    # Each refusal is answered at once on the fast path: read on, the gateway held every answer its client
    # left unread (66 MB after 8 s of this, and more for as long as it went on sending). The ASGI app's
    # answers wait for the client to read; so are fast-path requests: their answers pile up no further than
    # one read's.
    count = 20_000  # their answers are many times what the socket buffers between the two sides hold
    unsigned = b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    with RunningGateway(gateway_config(tmp_path)) as gw:

        def on_the_loop(look: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(look(), gw.loop).result(10)

        async def connection() -> Any:
            """The listener's one connection; None until it is accepted."""
            server = gw.gateway._ingress_server
            assert server is not None
            connections = list(server.server_state.connections)
            assert len(connections) <= 1
            return connections[0] if connections else None

        async def server_side() -> tuple[bool, int, int]:
            """Whether the connection's reading is paused, its answers not sent yet (bytes), and how many
            requests the listener has answered."""
            protocol = await connection()
            total = protocol.server_state.total_requests
            return protocol.flow.read_paused, protocol.transport.get_write_buffer_size(), total

        async def fixed_send_buffer() -> None:
            # As the kernel's autotuning would leave it on a small host (it grows to tcp_wmem's maximum).
            sock = (await connection()).transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)

        host, port = gw.url.removeprefix("http://").split(":")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before connecting: it is the window
            sock.connect((host, int(port)))
            sock.settimeout(60)  # sendall's, for all it sends: it waits for the answers to be read
            wait_until(lambda: on_the_loop(connection))  # accepted
            on_the_loop(fixed_send_buffer)
            sender = threading.Thread(target=sock.sendall, args=(unsigned * count,), daemon=True)
            sender.start()

            def paused_or_all_answered() -> bool:
                paused, _, answered = on_the_loop(server_side)
                return paused or answered >= count

            wait_until(paused_or_all_answered, timeout=60)
            paused, unsent, answered = on_the_loop(server_side)
            assert paused and answered < count
            assert unsent < 2 * 1024 * 1024
            # The client reads: the rest of its requests are read and answered, in order.
            with Connection(gw.url, sock) as conn:
                statuses = [conn.answer()[0] for _ in range(count)]
                sender.join(10)
                conn.send(signed("msg_after_reading"))
                last = conn.answer()
    assert set(statuses) == {401}
    assert (last[0], json.loads(last[2])["status"]) == (200, "accepted")


def test_a_pipelined_chunked_body_over_the_limit_is_refused_even_when_it_arrived_whole(tmp_path) -> None:
    chunk = b"x" * 600
    over = b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    over += b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
    with (
        RunningGateway(gateway_config(tmp_path, limits={"max_body_bytes": 1000})) as gw,
        Connection(gw.url) as conn,
    ):
        # Queued behind the first request, its whole body is in before it starts.
        conn.send(signed("msg_first") + over)
        first, second = conn.answer(), conn.answer()
    assert first[0] == 200
    assert (second[0], json.loads(second[2])["error"]) == (413, "body_too_large")


def test_an_admin_request_that_asks_to_upgrade_to_h2c_is_answered_in_http_1_1_with_its_body(tmp_path) -> None:
    # As on the webhook listener: uvicorn's protocol read no body after an Upgrade (Java's HttpClient sends
    # `Upgrade: h2c` with every cleartext request), so a bulk replay was refused `mode: required`, and an
    # event's replay for one action would have replayed all of them.
    body = json.dumps({"mode": "dead", "since": "1h"}).encode()
    request = (
        f"POST /admin/replay HTTP/1.1\r\nHost: 127.0.0.1\r\n{_H2C}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with RunningGateway(gateway_config(tmp_path)) as gw, Connection(gw.ops_url) as conn:
        conn.send(request + request)  # and one pipelined behind it, asking too
        answers = [conn.answer(), conn.answer()]
        conn.send(b"GET /admin/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # still HTTP/1.1, kept alive
        later = conn.answer()
    # The page's counts; its window (since, until) is the gateway's time.
    assert [(status, json.loads(answer)["next_cursor"]) for status, _, answer in answers] == [(200, None)] * 2
    assert all(json.loads(answer)["replayed"] == 0 for _, _, answer in answers)
    assert (later[0], json.loads(later[2])) == (200, {"events": [], "next_cursor": None})


def test_the_ops_listener_answers_a_request_that_is_not_http_in_json(tmp_path) -> None:
    # uvicorn's own answer was `400` text/plain "Invalid HTTP request received.": the one error of the ops
    # listener that was neither JSON nor one of the plain health paths' answers.
    with RunningGateway(gateway_config(tmp_path)) as gw:
        for request in (b"BLAH\r\n\r\n", b"GET /admin/events HTTP/9.9\r\n\r\n"):
            with Connection(gw.ops_url) as conn:
                conn.send(request)
                status, headers, body = conn.answer()
                assert (status, headers["content-type"], headers["connection"]) == (
                    400,
                    "application/json",
                    "close",
                )
                assert json.loads(body) == {"error": "the request is not valid HTTP/1.1"}
                assert conn.closed_by_server()


def test_an_answer_writes_the_default_headers_uvicorn_set_last() -> None:
    # uvicorn sets a new list each second (the date changes): each answer writes the list set last, and
    # the bytes kept for one list are never written for another.
    first = [(b"date", b"Fri, 04 Dec 2026 19:00:00 GMT"), (b"server", b"hookyard")]
    later = [(b"date", b"Fri, 04 Dec 2026 19:00:01 GMT"), (b"server", b"hookyard")]
    assert protocol._default_headers(first) == b"date: Fri, 04 Dec 2026 19:00:00 GMT\r\nserver: hookyard\r\n"
    assert protocol._default_headers(first) == b"date: Fri, 04 Dec 2026 19:00:00 GMT\r\nserver: hookyard\r\n"
    assert protocol._default_headers(later) == b"date: Fri, 04 Dec 2026 19:00:01 GMT\r\nserver: hookyard\r\n"
    assert protocol._default_headers([]) == b""


def test_a_connect_request_is_answered_without_a_warning_to_install_a_websocket_library(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn logged `Unsupported upgrade request.` and `No supported WebSocket library detected. Please
    # use "pip install 'uvicorn[standard]'"` at each CONNECT (a scanner's, say): nothing is missing, as no
    # listener tunnels or switches protocols, and the request is answered as any other.
    with RunningGateway(gateway_config(tmp_path)) as gw:
        statuses = []
        for url in (gw.url, gw.ops_url):
            with Connection(url) as conn:
                conn.send(b"CONNECT /webhooks/consignease HTTP/1.1\r\nHost: x\r\n\r\n")
                statuses.append(conn.answer()[0])
    assert statuses == [405, 404]
    warnings = [
        r.getMessage() for r in caplog.records if r.name.startswith("uvicorn") and r.levelname != "INFO"
    ]
    assert warnings == []
