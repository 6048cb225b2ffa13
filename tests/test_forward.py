"""The forward action against real receivers: how their answers and connections are read."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest

from gateway.http_client import OBS_FOLD
from tests.support import (
    RunningGateway,
    ServerThread,
    consignly_body,
    consignly_headers,
    gateway_config,
    raw_server,
    svix_request,
    wait_until,
    with_unchecked_ids,
)


class Chatty:
    """A receiver that answers 200 with a large body (length-delimited or chunked) and counts the
    connections its requests arrive on."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.released = threading.Event()  # ends the stall of /stalled

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.requests.append((scope["path"], scope["client"]))
        big = b"x" * 300_000
        if scope["path"].endswith("/truncated"):
            # 2xx, then the connection drops before the promised body is complete.
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]}
            )
            await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
            raise RuntimeError("the receiver dies mid-answer")
        if scope["path"].endswith("/brotli"):
            headers = [(b"content-encoding", b"br"), (b"content-length", b"4")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"\x8b\x01\x80\x03"})
            return
        if scope["path"].endswith("/stalled"):
            # 2xx, one byte of the body, then nothing until the test lets it go (a minute at most): longer
            # than the action's timeout and forward's own read bound (1 s).
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]}
            )
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            for _ in range(1200):
                if self.released.is_set():
                    break
                await asyncio.sleep(0.05)
            return
        if scope["path"].endswith("/small"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        if scope["path"].endswith("/chunked"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for start in range(0, len(big), 50_000):
                await send(
                    {"type": "http.response.body", "body": big[start : start + 50_000], "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"300000")]}
        )
        await send({"type": "http.response.body", "body": big})


def route(url: str) -> dict[str, Any]:
    return {
        "name": "users",
        "source": "consignease",
        "events": ["user.*"],
        "actions": [{"id": "app", "use": "forward", "with": {"url": url}}],
    }


def test_large_and_chunked_answers_are_delivered_and_the_next_request_still_goes_out(tmp_path) -> None:
    receiver = Chatty()
    with ServerThread(receiver) as server:
        base = f"http://127.0.0.1:{server.port}"
        config = gateway_config(
            tmp_path, routes=[route(f"{base}/big"), {**route(f"{base}/chunked"), "name": "c"}]
        )
        with RunningGateway(config) as gw:
            for n in range(3):
                body, headers = svix_request(msg_id=f"msg_big_{n}")
                assert gw.post("/webhooks/consignease", body, headers).status_code == 200
            wait_until(lambda: len(receiver.requests) == 6)
            wait_until(
                lambda: (
                    gw.metric("hookyard_deliveries_total", route="users", action="app", outcome="delivered")
                    == 3
                    and gw.metric("hookyard_deliveries_total", route="c", action="app", outcome="delivered")
                    == 3
                )
            )
            assert gw.metric("hookyard_deliveries_total", outcome="retried") == 0


def test_answers_are_read_so_one_keep_alive_connection_serves_event_after_event(tmp_path) -> None:
    receiver = Chatty()
    with ServerThread(receiver) as server:
        base = f"http://127.0.0.1:{server.port}"
        with RunningGateway(gateway_config(tmp_path, routes=[route(f"{base}/small")])) as gw:
            for n in range(3):
                body, headers = svix_request(msg_id=f"msg_small_{n}")
                assert gw.post("/webhooks/consignease", body, headers).status_code == 200
                wait_until(lambda n=n: len(receiver.requests) == n + 1)
    assert len({client for _path, client in receiver.requests}) == 1


@pytest.mark.parametrize("path", ["/truncated", "/brotli", "/stalled"])
def test_a_2xx_is_delivered_whatever_the_answers_body_does(tmp_path, path: str) -> None:
    receiver = Chatty()
    with ServerThread(receiver) as server:
        config = gateway_config(tmp_path, routes=[route(f"http://127.0.0.1:{server.port}{path}")])
        config["defaults"]["timeout"] = "20s"
        try:
            with RunningGateway(config) as gw:
                body, headers = svix_request(msg_id=f"msg{path.replace('/', '_')}")
                started = time.monotonic()
                assert gw.post("/webhooks/consignease", body, headers).status_code == 200
                delivered = {"route": "users", "action": "app", "outcome": "delivered"}
                wait_until(lambda: gw.metric("hookyard_deliveries_total", **delivered) == 1, 25)
                # Within the answer's own read bound, not the action's timeout: 20 s, which a busy machine
                # does not come near.
                assert time.monotonic() - started < 10
                assert gw.metric("hookyard_deliveries_total", outcome="retried") == 0
        finally:
            receiver.released.set()
    assert [path for path, _client in receiver.requests] == [path]


def test_an_event_whose_id_would_break_the_forwarded_request_apart_is_dead_and_nothing_is_sent(
    tmp_path,
) -> None:
    # An event id from the body may hold a line break, which is valid JSON; as an Idempotency-Key it
    # would smuggle a header into the app's request. The built-in providers refuse such an id at the door;
    # from a provider plugin that lets it through, the delivery is dead at once: every attempt would break
    # the same way.
    receiver = Chatty()
    with ServerThread(receiver) as server:
        config = gateway_config(tmp_path, f"http://127.0.0.1:{server.port}")
        config["routes"] = [r for r in config["routes"] if r["name"] == "consignments"]
        with RunningGateway(config, pm=with_unchecked_ids(config)) as gw:
            body = consignly_body(event_id="evt_1\r\nx-injected: yes")
            assert gw.post("/webhooks/consignly", body, consignly_headers(body)).status_code == 200
            body = consignly_body(event_id="evt_2")
            assert gw.post("/webhooks/consignly", body, consignly_headers(body)).status_code == 200
            wait_until(
                lambda: (
                    gw.metric("hookyard_deliveries_total", outcome="dead") == 1
                    and gw.metric("hookyard_deliveries_total", outcome="delivered") == 1
                )
            )
            assert gw.metric("hookyard_deliveries_total", outcome="retried") == 0
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("char", ["\x01", "\x7f"], ids=["control", "delete"])
def test_an_event_id_with_a_control_character_is_dead_naming_the_header_and_nothing_is_sent(
    tmp_path, char: str
) -> None:
    # RFC 9110 allows no control character but the tab in a field value. The client refused only CR, LF
    # and NUL, and sent the others on to the app, for its server to refuse or take as it would.
    receiver = Chatty()
    event_id = f"evt_1{char}"
    with ServerThread(receiver) as server:
        config = gateway_config(tmp_path, f"http://127.0.0.1:{server.port}")
        config["routes"] = [r for r in config["routes"] if r["name"] == "consignments"]
        with RunningGateway(config, pm=with_unchecked_ids(config)) as gw:
            body = consignly_body(event_id=event_id)
            assert gw.post("/webhooks/consignly", body, consignly_headers(body)).status_code == 200
            wait_until(lambda: gw.metric("hookyard_deliveries_total", outcome="dead") == 1)
            [detail] = asyncio.run_coroutine_threadsafe(
                gw.gateway.storage.get_event(event_id), gw.loop
            ).result(10)
    [delivery] = detail.deliveries
    assert (delivery.attempts, delivery.last_error) == (
        1,
        f"header 'idempotency-key' cannot be sent: its value holds a control character ({char!r})",
    )
    assert receiver.requests == []


def test_a_2xx_whose_body_outlasts_a_short_timeout_is_delivered_once(tmp_path) -> None:
    # The head says 200 at once; the body stalls past the action's timeout. The receiver has the event:
    # the attempt must not end as a timeout and send it again.
    receiver = Chatty()
    with ServerThread(receiver) as server:
        config = gateway_config(tmp_path, routes=[route(f"http://127.0.0.1:{server.port}/stalled")])
        config["defaults"]["timeout"] = "300ms"
        try:
            with RunningGateway(config) as gw:
                body, headers = svix_request(msg_id="msg_short_timeout")
                assert gw.post("/webhooks/consignease", body, headers).status_code == 200
                wait_until(
                    lambda: (
                        gw.metric("hookyard_deliveries_total", outcome="delivered")
                        + gw.metric("hookyard_deliveries_total", outcome="retried")
                        >= 1
                    )
                )
                assert gw.metric("hookyard_deliveries_total", outcome="delivered") == 1
                assert gw.metric("hookyard_deliveries_total", outcome="retried") == 0
        finally:
            receiver.released.set()
    assert [path for path, _client in receiver.requests] == ["/stalled"]


@pytest.mark.parametrize("retry_after", [b"\xb2", b"\xb9\xb3"])
def test_a_retry_after_of_digits_outside_ascii_leaves_the_answers_status_and_retry(
    retry_after: bytes,
) -> None:
    # A header is read as latin-1, where ² and ¹³ are digits to str.isdigit() but not to float().
    from gateway.actions import Job, Resources
    from gateway.config import RetryPolicy
    from gateway.events import Event
    from gateway.http_client import HttpClient, default_ssl_context
    from plugins.forward import Forward, ForwardOptions

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Busy\r\nretry-after: " + retry_after + b"\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def test() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = HttpClient(ssl_context=default_ssl_context(), user_agent="hookyard/test")
        resources = Resources(
            client=client, user_agent="hookyard/test", ssl_context=client.ssl_context, pool=1
        )
        action = Forward(ForwardOptions(url=f"http://127.0.0.1:{port}/hooks"), resources)
        event = Event(source="s", id="evt_1", type="user.created", received_at=0.0, body=b"{}", payload={})
        job = Job(event=event, route="r", action="app", attempt=1, timeout=5.0, retry=RetryPolicy())
        try:
            outcome = await action.deliver(job)
        finally:
            await client.aclose()
            server.close()
        assert (outcome.kind, outcome.status_code, outcome.retry_after) == ("retry", 503, None)

    asyncio.run(asyncio.wait_for(test(), 10))


@pytest.mark.parametrize(
    "folded",
    [b"x-trace: a,\r\n b\r\n", b"x-trace:\r\n\tb\r\n"],
    ids=["continued", "empty_then_continued"],
)
def test_an_answer_with_a_folded_header_is_delivered_on_a_connection_not_kept(
    tmp_path, folded: bytes
) -> None:
    # A header continued on the next line (obs-fold, RFC 9112 §5.2) is unfolded (see gateway.http_client):
    # the attempt was refused with llhttp's words, and the event sent again to an app that had taken it.
    log: list[str] = []

    def answer(conn: socket.socket) -> None:
        log.append("connection")
        conn.settimeout(10)
        for reply in (b"content-length: 2\r\n" + folded, b"content-length: 2\r\n"):
            log.append("answer")
            conn.sendall(b"HTTP/1.1 200 OK\r\n" + reply + b"\r\nok")
            try:
                if not conn.recv(65536):
                    return  # closed by the gateway
            except OSError:
                return

    with raw_server(answer) as url:
        config = gateway_config(tmp_path, routes=[route(f"{url}/hooks/users")])
        config["defaults"]["retry"] = {"schedule": [], "jitter": 0}
        with RunningGateway(config) as gw:

            def deliver(msg_id: str, delivered: int) -> None:
                body, headers = svix_request(msg_id=msg_id)
                assert gw.post("/webhooks/consignease", body, headers).status_code == 200
                wait_until(lambda: gw.metric("hookyard_deliveries_total", outcome="delivered") == delivered)

            deliver("msg_folded", 1)
            deliver("msg_next", 2)
            assert gw.metric("hookyard_deliveries_total", outcome="dead") == 0
    # The second delivery came on a new connection: the first was closed after its folded answer.
    assert log[:4] == ["connection", "answer", "connection", "answer"]


def test_an_answer_with_a_folded_content_length_is_refused_saying_so(tmp_path) -> None:
    # How long the body is must not be guessed: the attempt's error names the fold, not llhttp's words.
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length:\r\n 2\r\n\r\nok")

    with raw_server(answer) as url:
        config = gateway_config(tmp_path, routes=[route(f"{url}/hooks/users")])
        config["defaults"]["retry"] = {"schedule": [], "jitter": 0}
        with RunningGateway(config) as gw:
            body, headers = svix_request(msg_id="msg_folded")
            assert gw.post("/webhooks/consignease", body, headers).status_code == 200
            wait_until(lambda: gw.metric("hookyard_deliveries_total", outcome="dead") == 1)
            [detail] = asyncio.run_coroutine_threadsafe(
                gw.gateway.storage.get_event("msg_folded"), gw.loop
            ).result(10)
    [attempt] = detail.attempts[detail.deliveries[0].id]
    assert attempt.error == f"gave up after 1 attempt: invalid answer: {OBS_FOLD}"
