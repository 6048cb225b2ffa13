"""A lean benchmark sink: answers every POST with 200 at once and records, in memory, when each event arrived.

    python -m bench.sink --port 8099

Raw asyncio (uvloop when installed) and httptools, keep-alive, no framework: at a few thousand deliveries a
second it costs little next to the gateway it measures. An event is known by the `x-hookyard-event-id`
header Hookyard's forward action sends. Control endpoints for the benchmark:

    GET  /_stats     {"count": events, "requests": requests, "duplicates": ..., "first": t, "last": t}
    GET  /_records   {"records": [[event id, arrival time], ...]}   first arrival of each event
    POST /_reset     forget everything recorded

Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import Any, cast

import httptools

EVENT_ID_HEADER = b"x-hookyard-event-id"
_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_OK_CLOSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class Recorder:
    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.requests = 0
        self.duplicates = 0

    def record(self, event_id: str | None, now: float) -> None:
        self.requests += 1
        if event_id is None:
            return
        if event_id in self.arrivals:
            self.duplicates += 1  # at-least-once: a redelivery
        else:
            self.arrivals[event_id] = now

    def stats(self) -> dict[str, Any]:
        times = self.arrivals.values()
        return {
            "count": len(self.arrivals),
            "requests": self.requests,
            "duplicates": self.duplicates,
            "first": min(times, default=None),
            "last": max(times, default=None),
        }

    def reset(self) -> None:
        self.arrivals = {}
        self.requests = 0
        self.duplicates = 0


class SinkProtocol(asyncio.Protocol):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.event_id: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.event_id = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == EVENT_ID_HEADER:
            self.event_id = value

    def on_message_complete(self) -> None:
        now = time.time()
        assert self.transport is not None
        keep_alive = self.parser.should_keep_alive()
        if self.url.startswith(b"/_"):
            self.transport.write(self._control(self.url.split(b"?", 1)[0], keep_alive))
        else:
            self.recorder.record(self.event_id.decode("latin-1") if self.event_id else None, now)
            self.transport.write(_OK if keep_alive else _OK_CLOSE)
        if not keep_alive:
            self.transport.close()

    def _control(self, path: bytes, keep_alive: bool) -> bytes:
        recorder = self.recorder
        if path == b"/_stats":
            body = json.dumps(recorder.stats()).encode()
        elif path == b"/_records":
            body = json.dumps({"records": list(recorder.arrivals.items())}).encode()
        elif path == b"/_reset":
            recorder.reset()
            body = b"{}"
        else:
            return b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
        connection = b"" if keep_alive else b"connection: close\r\n"
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + connection
        return head + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server = await loop.create_server(
        lambda: SinkProtocol(recorder), "127.0.0.1", port, reuse_address=True, backlog=1024
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
    else:
        uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
