"""Real servers for tests: a downstream HTTP receiver and a running gateway, both on loopback ports."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import itertools
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pluggy
import pytest
import uvicorn
import yaml
from svix.webhooks import Webhook

from gateway import hookimpl
from gateway.actions import Action
from gateway.app import Gateway
from gateway.config import load_config, parse_config
from gateway.events import Event
from gateway.plugins import new_plugin_manager
from gateway.providers import Provider
from plugins.consignly import ConsignlyProvider

SVIX_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CONSIGNLY_SECRETS = ["client-secret-1", "signing-key-one", "signing-key-two"]


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


PORTS_PER_WORKER = 1000


def worker_ports(worker: str) -> list[int]:
    """The ports free_port gives out in pytest-xdist worker `worker` ("gw0", "gw1", ...; "" without xdist):
    outside the kernel's ephemeral range, from which binding port 0 and every outgoing connection take
    theirs, and apart from every other worker's."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        ephemeral = range(int(low), int(high) + 1)
    except (OSError, ValueError):
        ephemeral = range(32768, 61000)  # Linux's default; macOS's is 49152-65535
    # From 10000: below it are the ports of services a test may reach (PostgreSQL's 5432, 8080, 9000).
    outside = [*range(10000, ephemeral.start), *range(ephemeral.stop, 65536)]
    index = int(worker.removeprefix("gw") or 0)
    start = index * PORTS_PER_WORKER
    if start + PORTS_PER_WORKER > len(outside):
        raise RuntimeError(f"no ports left outside {ephemeral} for xdist worker {worker}")
    return outside[start : start + PORTS_PER_WORKER]


_ports = worker_ports(os.environ.get("PYTEST_XDIST_WORKER", ""))
# Where in them to begin: another test run on this machine at the same time has other ports, mostly.
_picks = itertools.count(random.randrange(PORTS_PER_WORKER))


def free_port() -> int:
    """A loopback port nothing listens on, for a server that binds it later (often `hookyard serve` in a
    child process, given it in its config) and may bind it again after a restart. Not one from binding
    port 0: back with the kernel, it could be handed to any other socket meanwhile. This worker's ports
    are given in turn, so one is not given again until a thousand more have been."""
    for _ in range(PORTS_PER_WORKER):
        port = _ports[next(_picks) % PORTS_PER_WORKER]
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))  # no SO_REUSEADDR: a port still in TIME_WAIT is passed over
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {_ports}")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def open_files() -> int:
    """This process's file descriptors: the test's and those of a gateway running in it (RunningGateway)."""
    return len(os.listdir("/proc/self/fd"))


def open_sockets() -> int:
    """This process's sockets: unlike open_files, blind to what an event loop keeps for the whole process
    (uvloop's first loop opens a pipe that outlives it)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):  # the listing's own descriptor, closed by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


# -- a downstream receiver ---------------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI request, for the stand-in servers of the tests."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


@dataclass
class Downstream:
    """An HTTP server that records every request and answers from a script: `script[path]` is a list of
    statuses (or (status, headers) pairs) used in turn; once used up, `default` answers."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    script: dict[str, list[Any]] = field(default_factory=dict)
    default: int = 200
    delay: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    # When given, every request waits, its body read, until it is set (30 s at most) before it is answered.
    hold: threading.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str, *answers: Any) -> None:
        with self.lock:
            self.script[path] = list(answers)

    def received(self, path: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if path is None or r.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 10.0) -> list[Received]:
        wait_until(lambda: len(self.received(path)) >= count, timeout)
        return self.received(path)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.delay:
            await asyncio.sleep(self.delay)
        for _ in range(600):
            if self.hold is None or self.hold.is_set():
                break
            await asyncio.sleep(0.05)
        with self.lock:
            self.in_flight -= 1
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self.lock:
            self.requests.append(Received(scope["method"], scope["path"], headers, body))
            queued = self.script.get(scope["path"])
            answer = queued.pop(0) if queued else self.default
        status, extra = answer if isinstance(answer, tuple) else (answer, {})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in extra.items()],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})


class ServerThread:
    """Runs an ASGI app under a real uvicorn server in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = bound_socket()
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started, 10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@contextmanager
def downstream_server() -> Iterator[Downstream]:
    downstream = Downstream()
    with ServerThread(downstream) as server:
        downstream.url = f"http://127.0.0.1:{server.port}"
        yield downstream


REQUEST_READ_TIMEOUT = 10.0  # seconds, for the whole of a request that raw_server reads
REQUEST_LIMIT = 16 * 1024 * 1024


def read_request(conn: socket.socket) -> bytes:
    """One HTTP/1.1 request from conn, however many packets it came in: its head, then the body its
    Content-Length or chunked encoding says. Less if the client stops sending first, or past
    REQUEST_READ_TIMEOUT or REQUEST_LIMIT bytes."""
    deadline = time.monotonic() + REQUEST_READ_TIMEOUT
    buffer = bytearray()

    def read_until(enough: Callable[[bytes], bool]) -> bool:
        """Receive until enough(what came so far); False if the client stopped, or the time or size ran out."""
        while not enough(bytes(buffer)):
            left = deadline - time.monotonic()
            if left <= 0 or len(buffer) > REQUEST_LIMIT:
                return False
            conn.settimeout(left)
            try:
                chunk = conn.recv(65536)
            except OSError:  # timed out, or reset
                return False
            if not chunk:
                return False
            buffer.extend(chunk)
        return True

    if not read_until(lambda data: b"\r\n\r\n" in data):
        return bytes(buffer)
    body_start = buffer.index(b"\r\n\r\n") + 4
    headers = {
        name.strip().lower(): value.strip().lower()
        for name, _, value in (
            line.partition(b":") for line in bytes(buffer[: body_start - 4]).split(b"\r\n")[1:]
        )
    }
    if b"chunked" not in headers.get(b"transfer-encoding", b""):
        length = int(headers.get(b"content-length", b"0") or b"0")
        read_until(lambda data: len(data) >= body_start + length)
        return bytes(buffer)
    # Chunk after chunk (its size line, its data, CRLF) up to the last, of size 0, then the trailers' blank line.
    position = body_start
    while read_until(lambda data, at=position: b"\r\n" in data[at:]):
        line_end = buffer.index(b"\r\n", position)
        try:
            size = int(bytes(buffer[position:line_end]).split(b";")[0].strip(), 16)
        except ValueError:
            return bytes(buffer)
        position = line_end + 2
        if size == 0:
            read_until(lambda data, at=position: data[at:].startswith(b"\r\n") or b"\r\n\r\n" in data[at:])
            return bytes(buffer)
        position += size + 2
        if not read_until(lambda data, at=position: len(data) >= at):
            break
    return bytes(buffer)


@contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A server that reads each request whole (read_request), however many packets it comes in, and hands
    the connection to `answer`, which writes what it likes and may close it: the server's address."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                # Once the request is in: a reset during the handshake would be a failed connect instead.
                read_request(conn)
                conn.settimeout(None)
                answer(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


# -- a running gateway -------------------------------------------------------------------------------


def gateway_config(
    tmp_path: Path, downstream_url: str = "http://127.0.0.1:9", **overrides: Any
) -> dict[str, Any]:
    """A config dict with both demo sources, fast retries and storage under tmp_path."""
    config: dict[str, Any] = {
        "storage": {"url": f"sqlite:///{tmp_path}/hookyard.db"},
        "defaults": {"retry": {"schedule": ["50ms", "50ms", "50ms"], "jitter": 0}, "timeout": "5s"},
        "delivery": {"poll_interval": "200ms", "lease": "5s"},
        "log": {"level": "warning"},
        "sources": {
            "consignease": {"path": "/webhooks/consignease", "provider": "svix", "secrets": [SVIX_SECRET]},
            "consignly": {
                "path": "/webhooks/consignly",
                "provider": "consignly",
                "secrets": CONSIGNLY_SECRETS,
            },
        },
        "routes": [
            {
                "name": "users",
                "source": "consignease",
                "events": ["user.*"],
                "actions": [
                    {"id": "app", "use": "forward", "with": {"url": f"{downstream_url}/hooks/users"}}
                ],
            },
            {
                "name": "consignments",
                "source": "consignly",
                "events": ["ConsignmentCreated", 112],
                "actions": [
                    {"id": "app", "use": "forward", "with": {"url": f"{downstream_url}/hooks/consignments"}}
                ],
            },
        ],
    }
    config.update(overrides)
    return config


def event_loops() -> list[Any]:
    """asyncio's event loop, and uvloop's (`hookyard serve`'s where it is installed), each to run a gateway
    in a thread of the test's."""
    loops: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is an optional speed-up
        return loops

    class ThreadedUvloop(uvloop.Loop):
        def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:
            # As asyncio's loop refuses it outside the main thread, which Gateway.serve expects; uvloop's
            # raises ValueError.
            raise RuntimeError("signal handlers are the main thread's")

    return [*loops, pytest.param(ThreadedUvloop, id="uvloop")]


class RunningGateway:
    """A Gateway serving on two real loopback sockets in a background thread with its own event loop."""

    def __init__(
        self,
        config: dict[str, Any] | Path,
        pm: pluggy.PluginManager | None = None,
        scheme: str = "http",
        new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
        **serve_options: Any,
    ) -> None:
        """new_loop: the event loop's factory (`hookyard serve` runs on uvloop's where it is installed)."""
        self.serve_options = serve_options
        if isinstance(config, Path):  # a file: watched for hot reload like `hookyard serve -c`
            self.gateway = Gateway(load_config(config), pm=pm, config_path=config)
        else:
            self.gateway = Gateway(parse_config(yaml.safe_dump(config)), pm=pm)
        self.ingress_sock, self.ops_sock = bound_socket(), bound_socket()
        self.url = f"{scheme}://127.0.0.1:{self.ingress_sock.getsockname()[1]}"
        self.ops_url = f"http://127.0.0.1:{self.ops_sock.getsockname()[1]}"
        self.loop = new_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.client = httpx.Client(timeout=10)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(
                self.gateway.serve([self.ingress_sock], [self.ops_sock], **self.serve_options)
            )
        finally:
            self.loop.close()

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        wait_until(lambda: _ready(self.ops_url), 10)
        return self

    def __exit__(self, *exc: object) -> None:
        with suppress(RuntimeError):  # its event loop is closed: the gateway has stopped already
            self.loop.call_soon_threadsafe(self._exit_once)
        self.thread.join(20)
        self.client.close()
        self.ingress_sock.close()
        self.ops_sock.close()

    def _exit_once(self) -> None:
        # A test that asked for the exit itself waits for the shutdown it began: a second request would
        # cut it short (a second Ctrl-C).
        if not self.gateway.exit_requested:
            self.gateway.request_exit()

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.client.post(self.url + path, content=body, headers=headers)

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.client.get(self.ops_url + "/metrics").text, name, **labels)


def _ready(ops_url: str) -> bool:
    try:
        return httpx.get(ops_url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition, 0.0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def worst_case_shutdown(drain_delay: float, shutdown_timeout: float) -> float:
    """The longest a shutdown can take, with every wait on something that can stop answering stuck at once:
    the sum of their bounds, as docs/operations.md's table lists them."""
    from gateway import app, delivery, tasks
    from gateway.storage import sqlite

    store = max(sqlite.FSYNC_TIMEOUT, sqlite.BUSY_TIMEOUT)
    cancelled = tasks.CANCELLED_GRACE  # what was cancelled, waited for once more
    return (
        drain_delay
        + app.INGRESS_DRAIN_TIMEOUT
        + store  # a claim or a webhook's commit as the engine stops
        + shutdown_timeout
        + cancelled
        + store  # releasing the unfinished deliveries
        + delivery.LAST_STATS_TIMEOUT
        + delivery.ACTION_CLOSE_TIMEOUT
        + cancelled
        + app.SHUTDOWN_HOOKS_TIMEOUT
        + cancelled
        + app.CLIENTS_CLOSE_TIMEOUT
        + cancelled
        + sqlite.FSYNC_TIMEOUT  # closing the store
        + app.OPS_DRAIN_TIMEOUT
        + cancelled  # the tasks still running at the end
    )


# -- signing as the providers do -----------------------------------------------------------------------


def svix_request(
    event_type: str = "user.created",
    data: dict[str, Any] | None = None,
    msg_id: str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
    secret: str = SVIX_SECRET,
    timestamp: datetime | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A Consignease webhook signed by the svix library itself."""
    timestamp = timestamp or datetime.now(tz=UTC)
    body = json.dumps(
        {
            "data": data
            if data is not None
            else {"id": "user_29w83sxmDNGwOuEthce5gg56FcC", "first_name": "Ada"},
            "object": "event",
            "type": event_type,
            "timestamp": int(timestamp.timestamp() * 1000),
            "instance_id": "ins_123",
        }
    )
    signature = Webhook(secret).sign(msg_id, timestamp, body)
    headers = {
        "content-type": "application/json",
        "svix-id": msg_id,
        "svix-timestamp": str(int(timestamp.timestamp())),
        "svix-signature": signature,
    }
    return body.encode(), headers


def consignly_body(event_type: str = "consignment.created", event_id: str = "evt_1", **data: Any) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "type": event_type,
            "created": "2026-11-22T10:00:00Z",
            "data": {"consignmentId": "550e8400-e29b-41d4-a716-446655440000", "status": 1, **data},
            "operationId": "op-42",
        }
    ).encode()


def consignly_headers(body: bytes, secret: str = CONSIGNLY_SECRETS[0]) -> dict[str, str]:
    """As the Consignly docs show: hex HMAC-SHA256 of the raw body keyed by the secret, prefixed sha256=."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"content-type": "application/json", "x-consignly-signature": f"sha256={digest}"}


class UncheckedIdProvider(ConsignlyProvider):
    """Consignly, but the payload's id taken as it is, as a provider plugin that does not check it might:
    the built-in providers refuse an id that no header can carry, and the actions still guard against one."""

    name = "consignly-unchecked-id"

    def parse(self, headers: Any, body: bytes, payload: Any, received_at: float) -> Event:
        event = super().parse(headers, body, {**payload, "id": "checked"}, received_at)
        event.id, event.payload = payload["id"], payload
        return event


def with_unchecked_ids(config: dict[str, Any]) -> pluggy.PluginManager:
    """Switch config's consignly source to UncheckedIdProvider; the plugin manager to run it with."""
    config["sources"]["consignly"]["provider"] = UncheckedIdProvider.name
    return plugins_with(providers=[UncheckedIdProvider])


def plugins_with(
    providers: Sequence[type[Provider]] = (), actions: Sequence[type[Action]] = ()
) -> pluggy.PluginManager:
    """The built-in plugins (no installed ones) and one more that registers `providers` and `actions`, as a
    test's own plugin would."""

    class TestPlugin:
        @hookimpl
        def register_providers(self) -> list[type[Provider]]:
            return list(providers)

        @hookimpl
        def register_actions(self) -> list[type[Action]]:
            return list(actions)

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(TestPlugin(), name="test-plugin")
    return pm


def standard_webhooks_secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


# -- the gateway as a separate process (for crash tests) ---------------------------------------------


class GatewayProcess:
    """`hookyard serve` in a child process (crash tests kill it); its logs go to gateway.log beside the config."""

    def __init__(
        self,
        config_path: Path,
        ops_url: str,
        env: dict[str, str] | None = None,
        open_files: int | None = None,
        command: list[str] | None = None,
    ) -> None:
        """open_files: the child's open-file limit (RLIMIT_NOFILE, soft and hard), if not the test's own.
        command: what runs the CLI, if not `python -m gateway` (`serve -c PATH` follows it)."""
        self.config_path = config_path
        self.command = command or [sys.executable, "-m", "gateway"]
        self.ops_url = ops_url
        self.log_path = config_path.parent / "gateway.log"
        self.env = {**os.environ, **(env or {})}
        self.open_files = open_files
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.command, "serve", "-c", str(self.config_path)],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=None if self.open_files is None else self._limit_open_files,
            )
        process = self.process
        try:
            wait_until(lambda: process.poll() is not None or _ready(self.ops_url), 20)
        except AssertionError:
            self.kill()
            raise
        if process.poll() is not None:
            raise AssertionError(
                f"gateway exited with {process.returncode}: {self.log_path.read_text()[-2000:]}"
            )
        return self

    def _limit_open_files(self) -> None:
        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout)


# -- a TCP proxy whose outage is real (for "the database went away" tests) ------------------------------


class TcpProxy:
    """Forwards a loopback port to `target`; `cut()` drops every connection and refuses new ones until
    `restore()`, `pause()` holds back what the target sends until `resume()`. Real network faults between
    Hookyard and a server, without stopping the shared server."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.flowing = asyncio.Event()  # cleared by pause()
        self.flowing.set()

    def __enter__(self) -> TcpProxy:
        self.thread.start()
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def restore(self) -> None:
        async def start() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._call(start())

    def cut(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
            for writer in list(self.writers):
                writer.close()
            self.writers.clear()

        self._call(stop())

    def pause(self) -> None:
        """The target's answers are held, on every connection, as from a server that stopped answering."""

        async def pause() -> None:
            self.flowing.clear()

        self._call(pause())

    def resume(self) -> None:
        async def resume() -> None:
            self.flowing.set()

        self._call(resume())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers.update({writer, upstream_writer})

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, answers: bool) -> None:
            try:
                while data := await source.read(65536):
                    if answers:
                        await self.flowing.wait()
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer, False), pipe(upstream_reader, writer, True))
        self.writers.difference_update({writer, upstream_writer})


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files in `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def unavailable(message: str) -> NoReturn:
    """Skip a test whose server, tool or privilege is missing here, or under HOOKYARD_REQUIRE_SERVICES=1 (CI)
    fail it: what cannot be staged must not pass CI silently."""
    if os.environ.get("HOOKYARD_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} (HOOKYARD_REQUIRE_SERVICES=1)")
    pytest.skip(message)


@contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A real, small file system that fills up: a tmpfs of `size` mounted on directory (needs root, or
    CAP_SYS_ADMIN), unmounted at the end."""
    directory.mkdir()
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)
