"""The webhook listener's HTTP/1.1 protocol: uvicorn's httptools protocol with a deadline for headers and
one write per response.

uvicorn bounds idle keep-alive connections but not a client that opens a connection and then sends its
request line and headers a byte at a time (slowloris): each such connection would hold a file descriptor
for ever. Here a request's headers must be complete within the listener's read timeout, counted from the
connection or from the request's first byte; otherwise it is answered 408 and closed.

uvicorn writes a response's head and its body separately, and each write is a send() system call: for a
webhook's small answer that is half of the cost of answering. Writes made in one turn of the event loop
are joined into one (`CoalescedWrites`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def header_deadline_protocol(timeout: Callable[[], float]) -> type[HttpToolsProtocol]:
    """A protocol class whose header deadline is read from `timeout()` for each connection, so a config
    reload changes it for new connections."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            # Duck-typed: uvicorn only writes, closes and asks the transport about itself.
            super().connection_made(cast(asyncio.Transport, CoalescedWrites(transport, self.loop)))
            self._arm()

        def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol allows a bool
            # The client closed its side: what is buffered (the answer to its last request) leaves now.
            cast(CoalescedWrites, self.transport).flush()
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                # Its whole request is in, and its answer (after an fsync) is still to come: a client may
                # half-close after sending and still read the answer. Close once it is written.
                cycle.keep_alive = False
                return True
            super().eof_received()
            return None

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout(), self._timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(_TIMED_OUT)
                self.transport.close()

    return HeaderDeadlineProtocol


class CoalescedWrites:
    """A transport whose writes in one turn of the event loop go out as one write, at the end of the turn.
    Everything else is the wrapped transport's."""

    __slots__ = ("_buffer", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._buffer is None:
            self._buffer = [data]
            self._loop.call_soon(self.flush)
        else:
            self._buffer.append(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, None
        if buffer and not self._transport.is_closing():
            self._transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
