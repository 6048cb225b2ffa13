"""Shared tools of the reliability suite: a `hookyard serve` child on fixed loopback ports, a downstream
that can go away and come back on the same port, signed load with provider-style retries, RSS readings,
the documented answers from docs/errors.md, and the figures each scenario reports."""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from tests.support import (
    Downstream,
    GatewayProcess,
    RunningGateway,
    free_port,
    metric_value,
    svix_request,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]

# Every scenario's figures, gathered for the end-of-run summary (see conftest.py) and docs/reliability.md.
FIGURES: dict[str, dict[str, Any]] = {}


def record(scenario: str, figures: dict[str, Any], directory: Path) -> Path:
    """Keep a scenario's figures for the run summary, print them and write them as JSON under directory."""
    FIGURES[scenario] = figures
    path = directory / f"{scenario}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(
        f"\n[reliability] {scenario}: {json.dumps(figures, sort_keys=True)}\n[reliability] written to {path}"
    )
    return path


# -- what docs/errors.md promises ---------------------------------------------------------------------------


def documented_answers() -> dict[int, set[str | None]]:
    """status -> the reasons docs/errors.md lists for it (None: an answer without a JSON body, from the
    HTTP parser). 200's reasons are the `status` values accepted and duplicate."""
    answers: dict[int, set[str | None]] = {}
    table_row = re.compile(r"^\|\s*(\d{3})\s*\|\s*(.*?)\s*\|")
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        match = table_row.match(line)
        if match is None:
            continue
        status, cell = int(match.group(1)), match.group(2)
        reason = re.search(r"`([a-z_]+)`", cell)
        answers.setdefault(status, set()).add(reason.group(1) if reason else None)
    return answers


# -- the gateway as a child process on fixed ports --------------------------------------------------------


@dataclass
class Child:
    """`hookyard serve` on ports chosen once, so that a restart after SIGKILL serves the same addresses
    and the same database."""

    process: GatewayProcess
    url: str
    ops_url: str
    config: dict[str, Any]
    db_path: Path

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    def alive(self) -> bool:
        return self.process.process is not None and self.process.process.poll() is None

    def metrics(self, client: httpx.Client | None = None) -> str:
        return (client or httpx).get(self.ops_url + "/metrics", timeout=5).text

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics(), name, **labels)


def child_gateway(tmp_path: Path, config: dict[str, Any]) -> Child:
    """Write the config with fixed loopback ports and return the (not yet started) child."""
    ingress, ops = free_port(), free_port()
    config["listen"] = {**config.get("listen", {}), "host": "127.0.0.1", "port": ingress}
    config["ops"] = {**config.get("ops", {}), "host": "127.0.0.1", "port": ops}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    ops_url = f"http://127.0.0.1:{ops}"
    db_path = Path(config["storage"]["url"].removeprefix("sqlite://").removeprefix("/"))
    return Child(GatewayProcess(path, ops_url), f"http://127.0.0.1:{ingress}", ops_url, config, db_path)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/PID/status."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "Threads"):
            figures[name] = int(value.split()[0])
    return figures


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def server_connections(port: int) -> int:
    """Established TCP connections whose local end is `port` on this host (the server's side of each
    connection to a listener), from /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def read_db(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the gateway's SQLite file with a connection of our own (WAL lets it read while the gateway
    writes)."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        return conn.execute(sql, params).fetchall()


# -- in-process servers without Nagle's delay -----------------------------------------------------------------


def no_delay(sock: socket.socket) -> socket.socket:
    """TCP_NODELAY on a listening socket; Linux passes it on to every accepted connection. The stdlib event
    loop sets it only on sockets whose proto is IPPROTO_TCP, and `socket.socket(AF_INET, SOCK_STREAM)`
    makes proto 0: without this, every keep-alive answer waits ~40 ms for a delayed ACK (see
    docs/reliability.md, findings)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def in_process(config: dict[str, Any]) -> RunningGateway:
    """A RunningGateway (tests.support) whose listeners answer without Nagle's delay."""
    gw = RunningGateway(config)
    no_delay(gw.ingress_sock)
    no_delay(gw.ops_sock)
    return gw


# -- a downstream that can go away and come back on the same port -------------------------------------------


class RestartableDownstream:
    """A recording Downstream (tests.support) served by uvicorn on a fixed loopback port. `stop()` closes
    the listening socket, so connections are refused, and `start()` serves again on the same port with the
    same records."""

    def __init__(self, downstream: Downstream | None = None) -> None:
        self.app = downstream or Downstream()
        self.port = free_port()
        self.app.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        no_delay(sock)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(1024)
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        wait_until(lambda: server.started, 10)
        self._server, self._thread, self._sock = server, thread, sock

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None and self._sock is not None
            self._thread.join(15)
            self._sock.close()
            self._server = self._thread = self._sock = None

    def __enter__(self) -> RestartableDownstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def delivered_keys(downstream: Downstream, path: str | None = None) -> list[str]:
    """The Idempotency-Key of every request the downstream received, in arrival order."""
    with downstream.lock:
        return [
            r.headers.get("idempotency-key", "")
            for r in downstream.requests
            if path is None or r.path == path
        ]


# -- signed load with provider-style retries ----------------------------------------------------------------


@dataclass
class Sent:
    """One event as a provider sends it: the same id, body and signature on every retry."""

    id: str
    body: bytes
    headers: dict[str, str]
    # 1: a sender that gives up after its first try, whatever happened (no retry after a 503 or an error).
    max_attempts: int = 40
    attempts: int = 0
    status: int | None = None  # the last answer's status; None if the last try failed to connect
    outcome: str | None = None  # accepted or duplicate, from the first 2xx
    errors: dict[str, int] = field(default_factory=dict)
    # (wall time the answer arrived, status or None for a connection error, reason or status)
    history: list[tuple[float, int | None, str]] = field(default_factory=list)

    @property
    def answered_2xx(self) -> bool:
        return self.outcome is not None

    @property
    def refused(self) -> bool:
        """Every try got an answer, none 2xx: the gateway explicitly refused the event each time. Not so
        for a try that failed without an answer: that request may have been stored before its answer was
        lost (in a kill, say), and may legitimately be delivered."""
        return bool(self.history) and all(
            status is not None and not 200 <= status < 300 for _, status, _ in self.history
        )


def signed_events(count: int, prefix: str) -> list[Sent]:
    events = []
    for index in range(count):
        msg_id = f"{prefix}_{index:05}"
        body, headers = svix_request(data={"id": f"user_{index}", "n": index}, msg_id=msg_id)
        events.append(Sent(msg_id, body, headers))
    return events


def send_with_retries(
    client: httpx.Client,
    url: str,
    event: Sent,
    rng: random.Random,
    *,
    max_attempts: int = 40,
    deadline: float = 120.0,
) -> None:
    """POST until a 2xx or an answer that retrying cannot change; connection errors and 503 are retried
    with backoff, as providers do, up to max_attempts and `deadline` seconds."""
    give_up = time.monotonic() + deadline
    while event.attempts < max_attempts and time.monotonic() < give_up:
        event.attempts += 1
        try:
            response = client.post(url, content=event.body, headers=event.headers)
        except httpx.TransportError as exc:
            event.status = None
            name = type(exc).__name__
            event.errors[name] = event.errors.get(name, 0) + 1
            event.history.append((time.time(), None, name))
        else:
            event.status = response.status_code
            answer = _answer(response)
            event.history.append((time.time(), response.status_code, answer))
            if 200 <= response.status_code < 300:
                event.outcome = answer
                return
            if response.status_code != 503:
                event.errors[str(response.status_code)] = event.errors.get(str(response.status_code), 0) + 1
                return
            event.errors["503"] = event.errors.get("503", 0) + 1
        time.sleep(min(0.05 * 1.5 ** min(event.attempts, 10), 0.5) * (0.5 + rng.random()))


def _answer(response: httpx.Response) -> str:
    """The `status` of a 2xx or the `error` of a refusal; the status code for anything else."""
    try:
        body = response.json()
    except ValueError:
        return str(response.status_code)
    if isinstance(body, dict):
        return str(body.get("status") or body.get("error") or response.status_code)
    return str(response.status_code)


class Load:
    """Sends `events` from `threads` client threads (each with its own keep-alive client) until all are
    answered or given up on."""

    def __init__(self, url: str, events: list[Sent], threads: int, seed: int, timeout: float = 10.0) -> None:
        self.url = url
        self.events = events
        self.timeout = timeout
        self.seed = seed
        self._next = 0
        self._lock = threading.Lock()
        self.done = 0
        self.answered = 0
        self.threads = [threading.Thread(target=self._work, args=(n,), daemon=True) for n in range(threads)]
        self.started_at = 0.0
        self.finished_at: float | None = None

    def start(self) -> Load:
        self.started_at = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def _take(self) -> Sent | None:
        with self._lock:
            if self._next >= len(self.events):
                return None
            event = self.events[self._next]
            self._next += 1
            return event

    def _work(self, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        with httpx.Client(timeout=self.timeout) as client:
            while (event := self._take()) is not None:
                send_with_retries(client, self.url, event, rng, max_attempts=event.max_attempts)
                with self._lock:
                    self.done += 1
                    self.answered += event.answered_2xx
                    if self.done == len(self.events):
                        self.finished_at = time.monotonic()

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not self.running, "the load did not finish in time"


@contextlib.contextmanager
def sampler(
    probe: Callable[[], Any], interval: float, limit: int = 10_000
) -> Iterator[list[tuple[float, Any]]]:
    """Call `probe` every `interval` seconds on a thread while the block runs; yields the (time, value)
    samples (at most `limit`), each timed when its value came back: a probe sent just before a fault ends
    may be answered after it."""
    samples: list[tuple[float, Any]] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set() and len(samples) < limit:
            with contextlib.suppress(Exception):
                value = probe()
                samples.append((time.monotonic(), value))
            stop.wait(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(10)
