"""A reference for the ingest part: the least a durable, verifying webhook gateway in Python does, with none of
Hookyard's generality.

    python -m bench.floor_app --port P --database FILE [--sink-port S]

One source (the benchmark's svix secret), one route, no config, plugins, metrics, limits, timeouts, retries,
logs or admin API. Each POST is read with httptools, its svix signature and timestamp checked, its body parsed
as a JSON object; the webhooks of one turn of the event loop are inserted into SQLite (WAL, synchronous=NORMAL)
in one transaction, each event with its headers and, with --sink-port, one leased delivery; a helper process
fdatasyncs the WAL and only then are they answered 200, and forwarded to the sink over keep-alive connections.
Each answered delivery is marked delivered, with a row for its attempt, in the next transaction. The same rows
(with fewer columns) and the same fsync before every 200 as Hookyard with the benchmark's routes.yaml: what is
left between the two is what Hookyard's generality costs. Not a gateway to run: a sink that fails or is slow is
never retried.

Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import subprocess
import sys
import time
from collections import deque
from typing import Any, cast

import httptools
import orjson

from bench.common import SECRET, SOURCE

KEY = base64.b64decode(SECRET.removeprefix("whsec_"))
TOLERANCE = 300
OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 21\r\n\r\n{"status":"accepted"}'
CONNECTIONS = 32  # to the sink, as many as the load has

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, source TEXT NOT NULL, event_id TEXT NOT NULL, type TEXT NOT NULL,
    received_at REAL NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL, UNIQUE (event_id, source));
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY, event_seq INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    due_at REAL, lease_owner TEXT, last_status INTEGER, finished_at REAL);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (due_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_seq);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY, delivery_id INTEGER NOT NULL, number INTEGER NOT NULL, started_at REAL NOT NULL,
    status_code INTEGER);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts (delivery_id);
"""

# The fsync helper: one fdatasync of the WAL for each read of requests, then one byte back per request read.
HELPER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
while data := os.read(0, 4096):
    os.fdatasync(fd)
    os.write(1, bytes(len(data)))
"""


def error(status: str, reason: str) -> bytes:
    body = json.dumps({"error": reason}).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )


def verified(headers: dict[bytes, bytes], body: bytes) -> bytes | None:
    """The refusal of a webhook whose svix headers do not check out, else None."""
    msg_id, timestamp = headers.get(b"svix-id"), headers.get(b"svix-timestamp")
    signatures = headers.get(b"svix-signature")
    if not msg_id or not timestamp or not signatures:
        return error("400 Bad Request", "missing svix headers")
    try:
        if abs(time.time() - int(timestamp)) > TOLERANCE:
            return error("401 Unauthorized", "timestamp outside the tolerance")
    except ValueError:
        return error("400 Bad Request", "bad timestamp")
    expected = base64.b64encode(hmac.digest(KEY, msg_id + b"." + timestamp + b"." + body, hashlib.sha256))
    for signature in signatures.split():
        version, _, value = signature.partition(b",")
        if version == b"v1" and hmac.compare_digest(value, expected):
            return None
    return error("401 Unauthorized", "no valid signature")


class Webhook:
    __slots__ = ("body", "delivery", "event_id", "headers", "transport", "type")

    def __init__(
        self, transport: asyncio.Transport, headers: dict[bytes, bytes], body: bytes, type_: str
    ) -> None:
        self.transport, self.headers, self.body, self.type = transport, headers, body, type_
        self.event_id = headers[b"svix-id"]
        self.delivery: int | None = None


class Store:
    """Group commit: what arrived during one turn of the loop goes into one transaction, answered after the
    WAL's fdatasync. Commits go on while the helper syncs: one fdatasync covers every commit before it began."""

    def __init__(self, path: str, forward: Forward | None) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.executescript(SCHEMA)
        self.wal = f"{path}-wal"
        self.forward = forward
        self.arrived: list[Webhook] = []
        self.delivered: list[tuple[int, int, float]] = []  # delivery id, status, time
        self.syncing: deque[list[Webhook]] = deque()
        self.scheduled = False
        self.loop = asyncio.get_running_loop()
        self.helper: asyncio.WriteTransport | None = None

    async def start(self) -> None:
        helper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", HELPER, self.wal],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert helper.stdin is not None and helper.stdout is not None
        await self.loop.connect_read_pipe(lambda: _Synced(self), helper.stdout)
        self.helper, _ = await self.loop.connect_write_pipe(asyncio.Protocol, helper.stdin)

    def add(self, webhook: Webhook) -> None:
        self.arrived.append(webhook)
        self._schedule()

    def delivered_one(self, delivery: int, status: int) -> None:
        self.delivered.append((delivery, status, time.time()))
        self._schedule()

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.commit)

    def commit(self) -> None:
        self.scheduled = False
        batch, self.arrived = self.arrived, []
        delivered, self.delivered = self.delivered, []
        if not batch and not delivered:
            return
        db, now = self.db, time.time()
        db.execute("BEGIN IMMEDIATE")
        for webhook in batch:
            headers = orjson.dumps(
                {k.decode("latin-1"): v.decode("latin-1") for k, v in webhook.headers.items()}
            )
            inserted = db.execute(
                "INSERT INTO events (source, event_id, type, received_at, headers, body) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (event_id, source) DO NOTHING",
                (SOURCE, webhook.event_id.decode(), webhook.type, now, headers, webhook.body),
            )
            seq = inserted.lastrowid
            if self.forward is not None and inserted.rowcount:  # a duplicate is answered, not forwarded again
                webhook.delivery = db.execute(
                    "INSERT INTO deliveries (event_seq, state, attempts, due_at, lease_owner) "
                    "VALUES (?, 'pending', 1, ?, 'floor')",
                    (seq, now + 120),
                ).lastrowid
        for delivery, status, at in delivered:
            db.execute(
                "UPDATE deliveries SET state = 'delivered', due_at = NULL, lease_owner = NULL, last_status = ?, "
                "finished_at = ? WHERE id = ?",
                (status, at, delivery),
            )
            db.execute(
                "INSERT INTO attempts (delivery_id, number, started_at, status_code) VALUES (?, 1, ?, ?)",
                (delivery, at, status),
            )
        db.execute("COMMIT")
        self.syncing.append(batch)
        assert self.helper is not None
        self.helper.write(b"s")

    def synced(self, count: int) -> None:
        for _ in range(count):
            for webhook in self.syncing.popleft():
                if not webhook.transport.is_closing():
                    webhook.transport.write(OK)
                if self.forward is not None and webhook.delivery is not None:
                    self.forward.send(webhook)


class _Synced(asyncio.Protocol):
    def __init__(self, store: Store) -> None:
        self.store = store

    def data_received(self, data: bytes) -> None:
        self.store.synced(len(data))


class Forward:
    """Keep-alive connections to the sink, one request at a time on each; the rest wait for a free one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[_Upstream] = []
        self.waiting: deque[tuple[int, bytes]] = deque()
        self.store: Store | None = None
        self.head = f"POST /hooks HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(CONNECTIONS):
            await loop.create_connection(lambda: _Upstream(self), "127.0.0.1", self.port)

    def send(self, webhook: Webhook) -> None:
        assert webhook.delivery is not None
        event_id = webhook.event_id.decode()
        request = (
            f"{self.head}idempotency-key: {event_id}\r\nx-hookyard-event-id: {event_id}\r\n"
            f"content-length: {len(webhook.body)}\r\n\r\n"
        ).encode() + webhook.body
        if self.idle:
            self.idle.pop().send(webhook.delivery, request)
        else:
            self.waiting.append((webhook.delivery, request))


class _Upstream(asyncio.Protocol):
    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.delivery = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.forward.idle.append(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        assert self.forward.store is not None
        self.forward.store.delivered_one(self.delivery, self.parser.get_status_code())
        if self.forward.waiting:
            self.send(*self.forward.waiting.popleft())
        else:
            self.forward.idle.append(self)

    def send(self, delivery: int, request: bytes) -> None:
        assert self.transport is not None
        self.delivery = delivery
        self.transport.write(request)


class Listener(asyncio.Protocol):
    def __init__(self, store: Store) -> None:
        self.store = store
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(error("400 Bad Request", "malformed request"))
            self.transport.close()

    def on_message_begin(self) -> None:
        self.headers, self.body = {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        body = b"".join(self.body)
        refused = verified(self.headers, body)
        if refused is None:
            try:
                payload: Any = orjson.loads(body)
            except orjson.JSONDecodeError:
                payload = None
            if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
                refused = error("400 Bad Request", "not a JSON object with a type")
        if refused is not None:
            self.transport.write(refused)
            return
        self.store.add(Webhook(self.transport, self.headers, body, payload["type"]))


async def serve(port: int, database: str, sink_port: int | None) -> None:
    forward = Forward(sink_port) if sink_port else None
    store = Store(database, forward)
    await store.start()
    if forward is not None:
        forward.store = store
        await forward.connect()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Listener(store), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--sink-port", type=int, help="forward every webhook to the benchmark sink there")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.database, args.sink_port))


if __name__ == "__main__":
    main()
