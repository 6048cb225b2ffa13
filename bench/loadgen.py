"""An open-loop load generator: signed svix webhooks at a fixed rate, whatever the server's speed.

    python -m bench.loadgen --url http://127.0.0.1:8080/webhooks/consignease --rate 1000 --duration 10 \
        --tag r1000 --out result.json

Request k is due at start + k/rate. It goes out on a free keep-alive connection at once; when every
connection is busy it waits in a queue, and its latency still counts from when it was due (no coordinated
omission). Each event id carries that due time, `{tag}-{k}-{due time in µs}`, so whoever receives the
delivery can compute the end-to-end latency. Each request is signed when it is sent (svix v1). Bounded:
exactly rate x duration requests, then at most --drain-timeout seconds for the last answers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from bench.common import SVIX_KEY, body_1kb, percentile


def event_due_time(event_id: str) -> float:
    """The due (intended send) time embedded in an event id made here."""
    return int(event_id.rsplit("-", 1)[1]) / 1e6


@dataclass
class Outcome:
    due: float
    sent: float
    done: float
    status: int


@dataclass
class Request:
    index: int
    due: float


@dataclass
class Run:
    host: str
    port: int
    path: str
    body: bytes
    tag: str
    head: bytes = b""
    outcomes: list[Outcome] = field(default_factory=list)
    queue: deque[Request] = field(default_factory=deque)
    idle: list[Connection] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    outstanding: int = 0
    connect_errors: int = 0
    closing: bool = False

    def request_bytes(self, request: Request) -> bytes:
        event_id = f"{self.tag}-{request.index}-{round(request.due * 1e6)}"
        timestamp = int(time.time())
        signed = f"{event_id}.{timestamp}.".encode() + self.body
        signature = base64.b64encode(hmac.new(SVIX_KEY, signed, hashlib.sha256).digest())
        return b"".join(
            (
                self.head,
                b"svix-id: ",
                event_id.encode(),
                b"\r\nsvix-timestamp: ",
                str(timestamp).encode(),
                b"\r\nsvix-signature: v1,",
                signature,
                b"\r\n\r\n",
                self.body,
            )
        )

    def dispatch(self, request: Request) -> None:
        self.outstanding += 1
        if self.idle:
            self.idle.pop().send(request)
        else:
            self.queue.append(request)

    def finished(self, connection: Connection, request: Request, sent: float, status: int) -> None:
        self.outcomes.append(Outcome(request.due, sent, time.time(), status))
        self.outstanding -= 1
        self.ready(connection)

    def ready(self, connection: Connection) -> None:
        """A connection is free: it takes the oldest queued request, or waits."""
        if connection.transport is None or connection.transport.is_closing():
            return
        if self.queue:
            connection.send(self.queue.popleft())
        else:
            self.idle.append(connection)

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _transport, connection = await loop.create_connection(lambda: Connection(self), self.host, self.port)
        self.connections.append(connection)
        self.ready(connection)
        return connection

    def replace(self, connection: Connection) -> None:
        """The server closed a connection (an idle keep-alive timeout, say): open another."""
        if connection in self.idle:
            self.idle.remove(connection)
        if self.closing:
            return

        async def reconnect() -> None:
            try:
                await self.connect()
            except OSError:
                self.connect_errors += 1

        task = asyncio.get_running_loop().create_task(reconnect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: tuple[Request, float] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def send(self, request: Request) -> None:
        assert self.transport is not None
        self.current = (request, time.time())
        self.transport.write(self.run.request_bytes(request))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.current is not None:
            (request, sent), self.current = self.current, None
            self.run.finished(self, request, sent, self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.current is not None:
            (request, sent), self.current = self.current, None
            self.run.outcomes.append(Outcome(request.due, sent, time.time(), 0))
            self.run.outstanding -= 1
        self.run.replace(self)


async def generate(
    url: str, rate: float, duration: float, connections: int, tag: str, drain_timeout: float
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    run = Run(host, port, parts.path or "/", body_1kb(), tag)
    run.head = (
        f"POST {run.path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(run.body)}\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    for _ in range(connections):
        await run.connect()

    total = round(rate * duration)
    start_wall = time.time() + 0.05
    start_loop = loop.time() + 0.05
    index = 0
    while index < total:
        now = loop.time()
        # Everything due by now goes out (a late wake-up sends a few at once, each with its own due time).
        while index < total and start_loop + index / rate <= now:
            run.dispatch(Request(index, start_wall + index / rate))
            index += 1
        if index < total:
            await asyncio.sleep(max(0.0, start_loop + index / rate - loop.time()))
    schedule_end = time.time()
    deadline = loop.time() + drain_timeout
    while run.outstanding > 0 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    unanswered = run.outstanding
    run.closing = True
    for connection in run.connections:
        if connection.transport is not None:
            connection.transport.close()

    outcomes = run.outcomes
    ok = [o for o in outcomes if 200 <= o.status < 300]
    sent = [o.sent for o in outcomes]
    statuses: dict[str, int] = {}
    for outcome in outcomes:
        statuses[str(outcome.status)] = statuses.get(str(outcome.status), 0) + 1
    return {
        "url": url,
        "tag": tag,
        "rate": rate,
        "duration_s": duration,
        "connections": connections,
        "scheduled": total,
        "start": start_wall,
        "schedule_end": schedule_end,
        "answered": len(outcomes),
        "unanswered": unanswered,
        "accepted": len(ok),
        "statuses": statuses,
        "send_rate": len(sent) / (max(sent) - min(sent)) if len(sent) > 1 else 0.0,
        # from the due time (includes waiting for a free connection) and from the actual send
        "latency_ms": {
            "p50": percentile([(o.done - o.due) * 1000 for o in ok], 50),
            "p99": percentile([(o.done - o.due) * 1000 for o in ok], 99),
            "max": max(((o.done - o.due) * 1000 for o in ok), default=0.0),
        },
        "service_ms": {
            "p50": percentile([(o.done - o.sent) * 1000 for o in ok], 50),
            "p99": percentile([(o.done - o.sent) * 1000 for o in ok], 99),
        },
        "send_lag_ms": {"p99": percentile([(o.sent - o.due) * 1000 for o in outcomes], 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds (bounded)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--tag", default="load")
    parser.add_argument("--drain-timeout", type=float, default=15.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen only sends to loopback addresses")
    coroutine = generate(args.url, args.rate, args.duration, args.connections, args.tag, args.drain_timeout)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coroutine)
    else:
        result = uvloop.run(coroutine)
    with open(args.out, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
