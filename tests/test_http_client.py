"""The lean HTTP/1.1 client that forward sends with, against scripted servers on loopback: what it sends,
how it reads answers, and when it keeps, retries or gives up a connection."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.http_client import OBS_FOLD, HeaderError, HttpClient, RequestError, Target
from tests.support import free_port, self_signed

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

# What the scripted server does with each request it reads: (connection number, request number on that
# connection, raw request) -> bytes to answer (a list: pieces written apart), or None to close the
# connection without answering.
Script = Callable[[int, int, bytes], Awaitable[bytes | list[bytes] | None]]


class Scripted:
    """A raw HTTP server: reads whole requests (Content-Length bodies) and answers from a script."""

    def __init__(self, script: Script, *, close_after_answer: bool = False) -> None:
        self.script = script
        self.close_after_answer = close_after_answer
        self.requests: list[tuple[int, bytes]] = []  # (connection number, raw request)
        self.connections = 0
        self.ended_by_client: set[int] = set()  # connections the client closed
        self.server: asyncio.Server | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            for index in range(1_000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                request = head + await reader.readexactly(length)
                self.requests.append((number, request))
                answer = await self.script(number, index, request)
                if answer is None:
                    break
                for piece in [answer] if isinstance(answer, bytes) else answer:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if self.close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended_by_client.add(number)
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def client(**options: float) -> HttpClient:
    return HttpClient(ssl_context=ssl.create_default_context(), user_agent="hookyard/test", **options)


def answer(reply: bytes | list[bytes]) -> Script:
    async def script(_connection: int, _index: int, _request: bytes) -> bytes | list[bytes] | None:
        return reply

    return script


@contextlib.asynccontextmanager
async def serving(
    script: Script | bytes | list[bytes], *, close_after_answer: bool = False, **options: float
) -> AsyncIterator[tuple[Scripted, HttpClient, Target]]:
    """A scripted server (a script, or one reply to every request), a client, and the target of the
    server's `/`; both closed at the end."""
    server = Scripted(script if callable(script) else answer(script), close_after_answer=close_after_answer)
    port = await server.start()
    http = client(**options)
    try:
        yield server, http, Target.parse(f"http://127.0.0.1:{port}/")
    finally:
        await http.aclose()
        await server.close()


def test_a_request_is_one_well_formed_http_1_1_message_and_the_connection_is_kept() -> None:
    async def test() -> None:
        async with serving(OK) as (server, http, target):
            target = Target.parse(f"http://127.0.0.1:{target.port}/hooks/users?tenant=a")
            for n in range(3):
                result = await http.request("POST", target, {"x-n": str(n)}, b'{"n": %d}' % n)
                assert (result.status, result.headers["content-length"]) == (200, "2")
        assert server.connections == 1
        first = server.requests[0][1]
        assert first.startswith(b"POST /hooks/users?tenant=a HTTP/1.1\r\n")
        assert f"\r\nhost: 127.0.0.1:{target.port}\r\n".encode() in first
        assert b"\r\nuser-agent: hookyard/test\r\n" in first
        assert b"\r\ncontent-length: 8\r\n" in first
        assert first.endswith(b'\r\nx-n: 0\r\n\r\n{"n": 0}')

    run(test)


def test_interim_and_chunked_answers_are_read_whole_and_keep_the_connection() -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"
    chunked = (
        b"HTTP/1.1 202 Accepted\r\ntransfer-encoding: chunked\r\nretry-after: 7\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )

    async def test() -> None:
        async with serving(interim + chunked) as (server, http, target):
            for _ in range(2):
                result = await http.request("POST", target, {}, b"{}")
                assert result.status == 202
                assert result.headers["retry-after"] == "7"
                assert "link" not in result.headers  # the interim answer's headers are not the answer's
        assert server.connections == 1

    run(test)


def test_an_answer_arriving_in_pieces_gives_each_header_whole_even_an_empty_one() -> None:
    pieces = [b"HTTP/1.1 503 Service Unavailable\r\nx-em", b"pty: \r\nretry-af", b"ter: 7\r\ncontent-l"]
    pieces.append(b"ength: 2\r\n\r\no")
    pieces.append(b"k")

    async def test() -> None:
        async with serving(pieces) as (server, http, target):
            for _ in range(2):
                result = await http.request("POST", target, {}, b"{}")
                assert result.status == 503
                assert result.headers == {"x-empty": "", "retry-after": "7", "content-length": "2"}
                await asyncio.sleep(0.1)  # the body's last byte, read after the status was returned
        # The connection went back to the pool once its body was whole.
        assert server.connections == 1

    run(test)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100_000, id="too large"),
        pytest.param(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", id="close"),
        # Both framings (RFC 9112 6.3): the chunked one is read, the status stands (the receiver has the
        # event and must not get it again), and the connection is not trusted with another request.
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            id="content-length and chunked",
        ),
    ],
)
def test_an_answer_not_worth_keeping_its_connection_for_gives_the_connection_up(reply: bytes) -> None:
    async def test() -> None:
        async with serving(reply) as (server, http, target):
            for _ in range(2):
                assert (await http.request("POST", target, {}, b"{}", read_limit=64 * 1024)).status == 200
        assert server.connections == 2
        assert len(server.requests) == 2  # not sent once more on a connection that was given up

    run(test)


def test_a_stalled_body_costs_its_connection_after_the_read_timeout_and_the_status_stands() -> None:
    async def stall(_connection: int, index: int, _request: bytes) -> bytes | None:
        if index == 0:
            return b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nx"  # nine bytes never come
        return OK

    async def test() -> None:
        async with serving(stall) as (server, http, target):
            loop = asyncio.get_running_loop()
            started = loop.time()
            # The status is returned as soon as it is in; the body is waited for apart from the caller. The
            # read timeout is long enough that a busy machine cannot take it for the time the status took.
            async with asyncio.timeout(1.5):
                assert (await http.request("POST", target, {}, b"{}", read_timeout=2)).status == 200
            while 1 not in server.ended_by_client and loop.time() - started < 10:
                await asyncio.sleep(0.02)
            assert 2 <= loop.time() - started < 10  # closed by the client after the read timeout
            assert (await http.request("POST", target, {}, b"{}")).status == 200
        assert server.connections == 2

    run(test)


def test_a_body_ended_by_closing_the_connection_gives_the_status_without_waiting() -> None:
    async def test() -> None:
        reply = b"HTTP/1.0 200 OK\r\n\r\nthe body ends with the connection"
        async with serving(reply, close_after_answer=True) as (server, http, target):
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(2):
                assert (await http.request("POST", target, {}, b"{}", read_timeout=5)).status == 200
            # The close ends each body: no connection is left waiting out the 5 s read timeout for more.
            while http._draining and loop.time() - started < 4:
                await asyncio.sleep(0.02)
            assert not http._draining
            assert loop.time() - started < 4
        assert server.connections == 2

    run(test)


def test_a_kept_connection_the_peer_dropped_is_retried_once_on_a_new_one() -> None:
    async def drop_second(connection: int, index: int, _request: bytes) -> bytes | None:
        # The first connection answers once, then closes on the next request, as a server whose keep-alive
        # timer fired just as the request arrived.
        return None if (connection, index) == (1, 1) else OK

    async def test() -> None:
        async with serving(drop_second) as (server, http, target):
            assert (await http.request("POST", target, {"x-n": "1"}, b"1")).status == 200
            assert (await http.request("POST", target, {"x-n": "2"}, b"2")).status == 200
        assert server.connections == 2
        assert [(connection, request[-1:]) for connection, request in server.requests] == [
            (1, b"1"),
            (1, b"2"),
            (2, b"2"),
        ]

    run(test)


def test_a_new_connection_closed_before_the_answer_is_an_error_not_retried() -> None:
    async def drop(_connection: int, _index: int, _request: bytes) -> bytes | None:
        return None

    async def test() -> None:
        async with serving(drop) as (server, http, target):
            with pytest.raises(RequestError, match="connection closed before the answer") as caught:
                await http.request("POST", target, {}, b"{}")
            assert not caught.value.connect
        assert server.connections == 1

    run(test)


def test_an_answer_that_is_not_http_is_an_error_and_not_sent_again() -> None:
    async def first_ok(_connection: int, index: int, _request: bytes) -> bytes | None:
        return OK if index == 0 else b"SSH-2.0-OpenSSH_9.2\r\n\r\n"

    async def test() -> None:
        async with serving(first_ok) as (server, http, target):
            assert (await http.request("POST", target, {}, b"{}")).status == 200
            # On a kept connection: answered, if badly, so not tried again on a new one.
            with pytest.raises(RequestError, match="invalid answer"):
                await http.request("POST", target, {}, b"{}")
        assert len(server.requests) == 2

    run(test)


def test_a_refused_connection_says_it_never_reached_the_peer() -> None:
    async def test() -> None:
        http = client()
        with pytest.raises(RequestError) as caught:
            await http.request("POST", Target.parse(f"http://127.0.0.1:{free_port()}/"), {}, b"{}")
        assert caught.value.connect
        await http.aclose()

    run(test)


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\rb", "a\0b"])
def test_a_header_value_that_would_break_the_request_apart_is_refused_and_nothing_is_sent(value: str) -> None:
    async def test() -> None:
        async with serving(OK) as (server, http, target):
            with pytest.raises(HeaderError):
                await http.request("POST", target, {"x-id": value}, b"{}")
        assert server.connections == 0

    run(test)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-id": "a\x01b"}, "header 'x-id' cannot be sent: its value holds a control character ('\\x01')"),
        ({"x-id": "a\x7f"}, "header 'x-id' cannot be sent: its value holds a control character ('\\x7f')"),
        (
            {"x id": "a"},
            "header 'x id' cannot be sent: its name is not a token (letters, digits or !#$%&'*+-.^_`|~)",
        ),
        (
            {"x:id": "a"},
            "header 'x:id' cannot be sent: its name is not a token (letters, digits or !#$%&'*+-.^_`|~)",
        ),
    ],
    ids=["value-with-control", "value-with-delete", "name-with-space", "name-with-colon"],
)
def test_a_header_that_is_no_rfc_9110_field_is_refused_by_name_and_nothing_is_sent(
    headers: dict[str, str], expected: str
) -> None:
    # Only CR, LF and NUL were refused: a name with a space or a colon, or a value with another control
    # character, went out as written, for the receiver to refuse or take as it would.
    async def test() -> None:
        async with serving(OK) as (server, http, target):
            with pytest.raises(HeaderError) as raised:
                await http.request("POST", target, headers, b"{}")
            assert str(raised.value) == expected
            with pytest.raises(HeaderError) as raised:
                http.prepare("POST", target, headers).encode("", 0, b"{}")
            assert str(raised.value) == expected
            # The lines that vary from request to request: their names are the caller's code's own, their
            # values are checked.
            [(name, value)] = headers.items()
            if name == "x-id":
                with pytest.raises(HeaderError) as raised:
                    http.prepare("POST", target, {}).encode(f"{name}: {value}\r\n", 1, b"{}")
                assert str(raised.value) == expected
        assert server.connections == 0

    run(test)


def test_a_prepared_head_sends_what_request_sends_and_refuses_what_it_refuses() -> None:
    async def test() -> None:
        async with serving(OK) as (server, http, target):
            head = http.prepare("PUT", target, {"x-static": "s", "x-two": "2"})
            await http.request("PUT", target, {"x-static": "s", "x-two": "2", "x-id": "a"}, b"{}")
            answer = await http.send(target, head.encode("x-id: a\r\n", 1, b"{}"))
            assert answer.status == 200
            for lines, count in (
                ("x-id: a\r\nx-injected: 1\r\n", 1),
                ("x-id: a\nb\r\n", 1),
                ("x-id: a\rb\r\n", 1),
                ("x-id: a\0\r\n", 1),
                ("x-id: a", 0),  # no CRLF after it: the body would be read as the rest of its value
            ):
                with pytest.raises(HeaderError):
                    head.encode(lines, count, b"{}")
            broken = http.prepare("PUT", target, {"x-static": "s\r\nx-injected: 1"})
            with pytest.raises(HeaderError):
                broken.encode("x-id: a\r\n", 1, b"{}")
        assert [request for _connection, request in server.requests][1:] == [server.requests[0][1]]

    run(test)


def test_a_request_cancelled_midway_gives_its_connection_up() -> None:
    async def slow_first(_connection: int, index: int, _request: bytes) -> bytes | None:
        if index == 0:
            await asyncio.sleep(0.5)
        return OK

    async def test() -> None:
        async with serving(slow_first) as (server, http, target):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await http.request("POST", target, {}, b"{}")
            # The late answer to the first request must never be read as the answer to the second.
            assert (await http.request("POST", target, {}, b"{}")).status == 200
            assert server.connections == 2
            for _ in range(100):
                if 1 in server.ended_by_client:
                    break
                await asyncio.sleep(0.02)
            assert server.ended_by_client == {1}  # closed by the client, not left open

    run(test)


def test_idle_connections_are_not_reused_past_the_keepalive() -> None:
    async def test() -> None:
        async with serving(OK, keepalive=0.1) as (server, http, target):
            await http.request("POST", target, {}, b"{}")
            await asyncio.sleep(0.2)
            await http.request("POST", target, {}, b"{}")
        assert server.connections == 2

    run(test)


def test_https_verifies_the_receiver_against_the_trusted_certificates(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "receiver")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def test() -> None:
        server = Scripted(answer(OK))
        port = await server.start(server_context)
        target = Target.parse(f"https://127.0.0.1:{port}/hooks")
        trusting = HttpClient(ssl_context=ssl.create_default_context(cafile=cert), user_agent="t")
        for _ in range(2):
            assert (await trusting.request("POST", target, {}, b"{}")).status == 200
        await trusting.aclose()
        assert server.connections == 1
        untrusting = client()
        with pytest.raises(RequestError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            await untrusting.request("POST", target, {}, b"{}")
        assert caught.value.connect
        await untrusting.aclose()
        await server.close()

    run(test)


@pytest.mark.parametrize(
    ("url", "host_header", "path"),
    [
        ("http://app:3000/hooks", "app:3000", "/hooks"),
        ("http://app:80/hooks", "app", "/hooks"),
        ("https://app.example/", "app.example", "/"),
        ("https://app.example", "app.example", "/"),
        ("http://[::1]:8080/a/b?x=1&y=2", "[::1]:8080", "/a/b?x=1&y=2"),
        ("http://app/hooks/a b?q=ü v", "app", "/hooks/a%20b?q=%C3%BC%20v"),
        ("http://app/hooks/a%2Fb?q=%20", "app", "/hooks/a%2Fb?q=%20"),
        ("http://bücher.example:8080/", "xn--bcher-kva.example:8080", "/"),
    ],
)
def test_a_url_gives_the_host_header_and_request_target(url: str, host_header: str, path: str) -> None:
    target = Target.parse(url)
    assert (target.host_header, target.path) == (host_header, path)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://app/x",
        "http:///x",
        "http://user:secret@app/x",
        "app:3000/x",
        "http://app:0/x",
        "http://app:70000/x",
        "http://[fe80::1%25eth0]/x",
        "http://exa mple.com/x",
    ],
)
def test_urls_the_client_cannot_send_to_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        Target.parse(url)


def test_a_second_answer_to_one_request_costs_the_connection_and_is_never_read_as_the_next_answer() -> None:
    stray = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 400 Bad Request\r\ncontent-le"

    async def first_stray(connection: int, index: int, _request: bytes) -> bytes | None:
        return stray if (connection, index) == (1, 0) else b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n"

    async def test() -> None:
        async with serving(first_stray) as (server, http, target):
            assert (await http.request("POST", target, {}, b"{}")).status == 200
            assert (await http.request("POST", target, {}, b"{}")).status == 503
        assert server.connections == 2

    run(test)


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_an_answer_without_a_body_that_announces_one_costs_the_connection(status: bytes) -> None:
    # The body such a receiver sends after the head, in a later packet, would be read as the next answer.
    reply = [b"HTTP/1.1 " + status + b"\r\ncontent-length: 5\r\n\r\n", b"hello"]

    async def test() -> None:
        async with serving(reply) as (server, http, target):
            for _ in range(2):
                assert (await http.request("POST", target, {}, b"{}")).status == int(status[:3])
        assert server.connections == 2

    run(test)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-trace: a,\r\n b\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-trace: a,\r\n\t  b\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-trace:\r\n a, b\r\n\r\nok",
        [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-tr", b"ace: a,\r\n b\r\n\r\nok"],
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-trace: a,\r\n b\r\n\r\nok",
    ],
    ids=["after_a_value", "tab", "after_an_empty_value", "head_in_pieces", "after_an_interim_answer"],
)
def test_a_folded_header_is_unfolded_and_the_connection_given_up(reply: bytes | list[bytes]) -> None:
    # RFC 9112 §5.2: a user agent replaces each obs-fold with a space. llhttp unfolds only under
    # lenient_headers, which loosens far more (see http_client): the head is unfolded and parsed again strictly.
    # What follows it was framed by the receiver's reading of that head: the connection is not kept.
    async def first_folded(_connection: int, index: int, _request: bytes) -> bytes | list[bytes]:
        return reply if index == 0 else OK

    async def test() -> None:
        async with serving(first_folded) as (server, http, target):
            answer = await http.request("POST", target, {}, b"{}")
            assert (answer.status, answer.headers["x-trace"]) == (200, "a, b")
            assert (await http.request("POST", target, {}, b"{}")).status == 200
        assert server.connections == 2

    run(test)


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        (b"content-length:\r\n 2\r\n", OBS_FOLD),
        (b"x-a: 1\r\ncontent-length: 2\r\n \r\n", OBS_FOLD),
        (b"transfer-encoding: \r\n chunked\r\n\r\n2\r\nok\r\n0\r\n", OBS_FOLD),
        (b"content-length: 2\r\nx-trace: a,\r\n b\x01\r\n", OBS_FOLD),
        (b"content-length: 2\r\nx-trace: a,\r\n b\rc\r\n", OBS_FOLD),
        # Not a fold: llhttp's words, as before.
        (b"content-length: 2\r\nx-trace: a\x01b\r\n", "Invalid header value char"),
        (b"content-length: 2\r\nx-trace: a\x01b\r\nx-next:\r\n b\r\n", "Invalid header value char"),
    ],
    ids=[
        "content_length",
        "content_length_blank",
        "transfer_encoding",
        "control_character_after",
        "bare_cr_after",
        "control_character",
        "control_character_first",
    ],
)
def test_a_fold_that_would_guess_the_answer_is_refused_saying_so(headers: bytes, error: str) -> None:
    # The framing headers are not unfolded: how long the body is must not be guessed. Nor is a head that is
    # malformed beyond its folds.
    reply = b"HTTP/1.1 200 OK\r\n" + headers + b"\r\nok"

    async def test() -> None:
        async with serving(reply) as (_server, http, target):
            with pytest.raises(RequestError) as caught:
                await http.request("POST", target, {}, b"{}")
            assert str(caught.value) == f"invalid answer: {error}"

    run(test)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\n x-trace: a\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200\r\n OK\r\ncontent-length: 2\r\n\r\nok",
        [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-trace: a,\r\n b", b"\r\n\r\nok"],
    ],
    ids=["first_header", "status_line", "head_not_whole_at_the_fold"],
)
def test_a_fold_of_the_status_line_or_in_an_unfinished_head_is_refused(reply: bytes | list[bytes]) -> None:
    async def test() -> None:
        async with serving(reply) as (_server, http, target):
            with pytest.raises(RequestError, match="invalid answer"):
                await http.request("POST", target, {}, b"{}")

    run(test)


def test_an_upgrade_answer_is_an_error_not_a_crash_of_the_protocol(caplog: pytest.LogCaptureFixture) -> None:
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"

    async def test() -> None:
        async with serving(upgrade) as (_server, http, target):
            with pytest.raises(RequestError, match="invalid answer"):
                await http.request("POST", target, {}, b"{}")

    run(test)
    assert "Fatal error" not in caplog.text


def test_a_trailer_does_not_replace_the_answers_headers() -> None:
    chunked = (
        b"HTTP/1.1 503 Busy\r\ntransfer-encoding: chunked\r\nretry-after: 7\r\n\r\n"
        b"2\r\nok\r\n0\r\nretry-after: 9999\r\n\r\n"
    )

    async def test() -> None:
        async with serving(chunked) as (_server, http, target):
            result = await http.request("POST", target, {}, b"{}")
            assert result.headers["retry-after"] == "7"

    run(test)


def test_an_idle_connection_past_the_keepalive_is_let_go_even_while_a_newer_one_is_in_use() -> None:
    async def test() -> None:
        async with serving(OK, keepalive=0.3) as (server, http, target):
            await asyncio.gather(*(http.request("POST", target, {}, b"{}") for _ in range(2)))
            assert server.connections == 2
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3
            # The newest connection serves every request; the older one waits, idle, past the keepalive.
            while not server.ended_by_client and loop.time() < deadline:
                await http.request("POST", target, {}, b"{}")
                await asyncio.sleep(0.05)
            assert len(server.ended_by_client) == 1
            assert server.connections == 2

    run(test)


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
def test_a_status_outside_100_to_599_is_an_invalid_answer_and_costs_the_connection(status: bytes) -> None:
    async def first_odd(connection: int, _index: int, _request: bytes) -> bytes:
        return b"HTTP/1.1 " + status + b" Odd\r\ncontent-length: 0\r\n\r\n" if connection == 1 else OK

    async def test() -> None:
        async with serving(first_odd) as (server, http, target):
            async with asyncio.timeout(0.5):  # not left waiting for an answer's end taken for an interim's
                with pytest.raises(RequestError, match=f"invalid answer: status {status.decode()}"):
                    await http.request("POST", target, {}, b"{}")
            assert (await http.request("POST", target, {}, b"{}")).status == 200
        assert server.connections == 2

    run(test)


def test_an_answer_whose_head_never_ends_is_an_invalid_answer_once_past_the_head_limit() -> None:
    endless = [b"HTTP/1.1 200 OK\r\n"] + [b"x-filler: " + b"y" * 16_000 + b"\r\n"] * 6

    async def test() -> None:
        async with serving(endless) as (_server, http, target):
            with pytest.raises(RequestError, match="head is longer than 65536 bytes"):
                await http.request("POST", target, {}, b"{}")

    run(test)


def test_idle_connections_are_let_go_past_the_keepalive_without_another_request() -> None:
    # A reload that points actions at new receivers leaves the old origins without requests, and a quiet
    # gateway sends none at all: their idle connections must close past the keepalive all the same, and
    # the pool must forget the origins, however many there were.
    async def test() -> None:
        servers = [Scripted(answer(OK)) for _ in range(200)]
        targets = [Target.parse(f"http://127.0.0.1:{await server.start()}/") for server in servers]
        http = client(keepalive=0.2)
        try:
            for target in targets:
                assert (await http.request("POST", target, {}, b"{}")).status == 200
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while sum(len(s.ended_by_client) for s in servers) < len(servers) and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert sum(len(s.ended_by_client) for s in servers) == len(servers)
            assert http._idle == {}
        finally:
            await http.aclose()
            for server in servers:
                await server.close()

    run(test)
