"""The webhook listener's protocol: one write per response."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from gateway.protocol import CoalescedWrites
from tests.support import RunningGateway, gateway_config, svix_request


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
        coalesced = CoalescedWrites(transport, asyncio.get_running_loop())
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
        coalesced = CoalescedWrites(transport, loop)
        coalesced.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        coalesced.close()

        gone = RecordingTransport()
        late = CoalescedWrites(gone, loop)
        late.write(b"too late")
        gone.closed = True  # the peer went away before the loop turned
        await asyncio.sleep(0)
        return transport, gone

    transport, gone = asyncio.run(close_after_writing())
    assert transport.writes == [b"HTTP/1.1 408 Request Timeout\r\n\r\n"] and transport.closed
    assert gone.writes == []


def test_everything_else_is_the_wrapped_transports() -> None:
    async def ask() -> Any:
        return CoalescedWrites(RecordingTransport(), asyncio.get_running_loop()).get_extra_info("peername")

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
