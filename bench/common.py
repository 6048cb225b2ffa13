"""What every part of the benchmark shares: processes that are always cleaned up, /proc readings, ports,
signed requests, wrk, Prometheus scrapes, gateway configs and result files."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable
HOST = "127.0.0.1"

# The svix (Standard Webhooks) secret of the benchmark's source, and the path it listens on.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SVIX_KEY = base64.b64decode(SECRET.removeprefix("whsec_"))
SOURCE = "consignease"
PATH = "/webhooks/consignease"
# adnanh/webhook checks a hex HMAC-SHA256 of the body (payload-hmac-sha256) in this header.
WEBHOOK_SECRET = "bench-webhook-secret"
WEBHOOK_HEADER = "X-Signature"

Json = dict[str, Any]


@dataclass
class Settings:
    """What one run measures, and for how long (every load phase is bounded by these)."""

    work: Path  # scratch directory: databases, request files, logs
    results: Path = RESULTS  # JSON files, profiles
    duration: float = 10.0  # seconds of wrk load per ingest server
    warmup: float = 2.0
    connections: int = 32
    threads: int = 2
    rates: tuple[int, ...] = (500, 1000, 2000)  # offered end-to-end rates, ev/s
    e2e_duration: float = 10.0  # seconds per offered rate
    backlog: int = 10_000  # events sent while the sink is down
    backlog_rate: int = 1000
    levels: tuple[int, ...] = (0, 100_000, 1_000_000)  # queued deliveries for the scale part
    pairs: int = 1000  # claim + finish pairs timed per level
    profile_duration: float = 8.0
    client_requests: int = 20_000  # requests per HTTP client in part 5
    against: str = ""  # a git revision whose hot path part 6 also measures, for a before and after
    tools: dict[str, Tool] = field(default_factory=dict)


# -- tools ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    path: str | None
    install: str

    @property
    def present(self) -> bool:
        return self.path is not None


def find_tools() -> dict[str, Tool]:
    """The external programs the benchmark uses; nothing is ever installed from here."""
    venv_spy = Path(PYTHON).parent / "py-spy"
    return {
        "wrk": Tool("wrk", shutil.which("wrk"), "apt-get install wrk"),
        "webhook": Tool("webhook", shutil.which("webhook"), "apt-get install webhook"),
        "py-spy": Tool(
            "py-spy",
            str(venv_spy) if venv_spy.exists() else shutil.which("py-spy"),
            ".venv/bin/pip install py-spy",
        ),
        "valgrind": Tool("valgrind", shutil.which("valgrind"), "apt-get install valgrind"),
    }


# -- processes ------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


# -- callgrind ------------------------------------------------------------------------------------

# A random hash seed moves what each dict and set lookup costs, by about 1% of a webhook's count: the runs
# whose instructions are compared get the same one.
COUNTED_ENV = {"PYTHONHASHSEED": "0"}


def under_callgrind(settings: Settings, argv: list[str], out: Path) -> list[str]:
    """`argv` run under callgrind, its profile written to `out` (deleted by the caller once counted)."""
    return [str(settings.tools["valgrind"].path), "--tool=callgrind", f"--callgrind-out-file={out}", *argv]


def instructions_counted(stderr: str) -> int:
    """The total callgrind printed on a run's stderr."""
    found = re.search(r"I\s+refs:\s+([\d,]+)", stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count: {stderr[-500:]}")
    return int(found.group(1).replace(",", ""))


def die_with_parent() -> None:
    """In the child, before exec: the kernel kills it if the benchmark itself dies (even by SIGKILL)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """Every server and load generator the benchmark starts; whatever happens, `close()` ends them all."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        try:
            process = subprocess.Popen(
                list(argv),
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # prctl only, then exec
            )
        finally:
            log.close()
        self.running.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.running = [(n, p) for n, p in self.running if p is not process]

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        self.running = [(n, p) for n, p in self.running if p is not process]

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def close(self) -> None:
        for _name, process in reversed(self.running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _name, process in reversed(self.running):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.running = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` runs and every child is stopped."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# -- /proc --------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """pid and its descendants still running: a server's own helpers (Hookyard's fsync helper process)
    count with it."""
    tree, index = [pid], 0
    while index < len(tree):
        try:
            for task in Path(f"/proc/{tree[index]}/task").iterdir():
                tree += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass  # ended while being read
        index += 1
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, of its running descendants, and of the children it has waited for
    (a hook's commands)."""
    ticks = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state is field 3, so utime (14), stime (15), cutime (16), cstime (17) are 11-14.
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def loop_seconds(pid: int) -> tuple[float, float]:
    """A process's main thread (a Python server's event loop): seconds it has run on a core, and seconds
    it was ready to run but waited for one (the scheduler's /proc schedstat), since it started."""
    try:
        ran, waited, _slices = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent on anything but idling since boot (/proc/stat):
    the gateway, the sink and the load generator together, and whatever else runs."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user, nice, system, idle, iowait, irq, softirq; not steal (the hypervisor ran someone else) nor
    # guest (already inside user).
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def machine_steal_seconds() -> float:
    """CPU seconds the hypervisor gave this machine's cores to someone else since boot (/proc/stat steal):
    on a shared host, time every process here waited for a core that was there but not ours."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[7] if len(fields) > 7 else 0) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU of the processes this one has waited for (wrk, run to its end)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_mb(pid: int) -> float:
    """Resident memory of a process, plus the private memory of its running descendants (Hookyard's fsync
    helper): what they add to the machine. A helper's shared pages are the same files the process has
    mapped (the Python library), counted once in the process's RSS."""
    kilobytes = _proc_kb(f"/proc/{pid}/status", ("VmRSS:",))
    for child in process_tree(pid)[1:]:
        kilobytes += _proc_kb(f"/proc/{child}/smaps_rollup", ("Private_Clean:", "Private_Dirty:"))
    return kilobytes / 1024


def _proc_kb(path: str, keys: tuple[str, ...]) -> int:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return 0
    return sum(int(line.split()[1]) for line in lines if line.startswith(keys))


class Sampler:
    """Calls `probe` every `interval` seconds on a thread and keeps (time, value) pairs."""

    def __init__(self, probe: Callable[[], float | None], interval: float = 0.25) -> None:
        self.probe = probe
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.probe()
            except (OSError, httpx.HTTPError, ValueError):
                value = None
            if value is not None:
                self.samples.append((time.time(), value))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def values(self) -> list[float]:
        return [value for _, value in self.samples]

    def max(self) -> float:
        return max(self.values, default=0.0)

    def mean(self) -> float:
        values = self.values
        return sum(values) / len(values) if values else 0.0


# -- network --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> float:
    """Wait until `url` answers below 500; returns how long it took. Fails early if `process` exits."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {timeout:g}s")


# -- requests -------------------------------------------------------------------------------------


def body_1kb() -> bytes:
    """A 1 KB Svix-style JSON event (user.created)."""
    data = {"id": "user_29w83sxmDNGwOuEthce5gg56FcC", "first_name": "Ada", "last_name": "Lovelace", "bio": ""}
    payload = {
        "data": data,
        "object": "event",
        "type": "user.created",
        "timestamp": 0,
        "instance_id": "ins_1",
    }
    data["bio"] = "x" * max(0, 1024 - len(json.dumps(payload)))
    return json.dumps(payload).encode()


def svix_signature(msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(SVIX_KEY, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def webhook_signature(body: bytes) -> str:
    return "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()


def write_signed_requests(path: Path, prefix: str, count: int, body: bytes) -> Path:
    """One pre-signed svix request per line (id, timestamp, signature), signed now: every id unique, so a
    gateway never takes its dedupe shortcut. The timestamp must stay within the source's tolerance (300 s)."""
    timestamp = int(time.time())
    with path.open("w") as out:
        for index in range(count):
            msg_id = f"msg_{prefix}_{index}"
            out.write(f"{msg_id}\t{timestamp}\t{svix_signature(msg_id, timestamp, body)}\n")
    return path


# -- wrk ------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int


def wrk_argv(
    url: str, duration: float, connections: int, threads: int, requests: Path, body: Path, signature: str
) -> list[str]:
    """wrk with the signed-requests script: every request carries svix headers and the webhook HMAC header,
    whatever the server, so every server gets the same load."""
    script = [str(BENCH / "signed_requests.lua"), url, "--", str(requests), str(body), str(threads)]
    options = [f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s", "--latency"]
    return ["wrk", *options, "-s", *script, WEBHOOK_HEADER, signature]


def run_wrk(
    url: str, duration: float, connections: int, threads: int, requests: Path, body: Path, signature: str
) -> WrkResult:
    command = wrk_argv(url, duration, connections, threads, requests, body, signature)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=True, preexec_fn=die_with_parent
    )
    return parse_wrk(done.stdout)


def parse_wrk(output: str) -> WrkResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    if total is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    seconds = _seconds(total.group(2), total.group(3))
    latency = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+\w+)", output, re.M)}
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests=int(total.group(1)),
        seconds=seconds,
        rps=int(total.group(1)) / seconds,
        p50_ms=latency.get("50", 0.0),
        p99_ms=latency.get("99", 0.0),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


# -- Prometheus -----------------------------------------------------------------------------------


@dataclass
class Scrape:
    """One /metrics exposition: sum the samples of a name whose labels match."""

    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    @classmethod
    def fetch(cls, url: str) -> Scrape:
        text = httpx.get(url, timeout=10).text
        scrape = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                scrape.samples.append((sample.name, dict(sample.labels), float(sample.value)))
        return scrape

    def get(self, name: str, **labels: str) -> float:
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )


# -- the gateway ----------------------------------------------------------------------------------


@dataclass
class GatewayPorts:
    listen: int
    ops: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.listen}{PATH}"

    @property
    def ops_url(self) -> str:
        return f"http://{HOST}:{self.ops}"


def gateway_config(
    directory: Path,
    db: Path,
    sink_url: str | None,
    *,
    route_matches: bool = True,
    retry: list[str] | None = None,
) -> tuple[Path, GatewayPorts]:
    """A routes.yaml on loopback ports: the svix source, and a route forwarding user.* events to the sink
    (or, with route_matches=False, a route that no benchmark event matches)."""
    ports = GatewayPorts(free_port(), free_port())
    route: Json = {
        "name": "users",
        "source": SOURCE,
        "events": ["user.*"] if route_matches else ["never.matches"],
        "actions": [
            {"id": "app", "use": "forward", "with": {"url": f"{sink_url or 'http://127.0.0.1:9'}/hooks"}}
        ],
    }
    config: Json = {
        "listen": {"host": HOST, "port": ports.listen},
        "ops": {"host": HOST, "port": ports.ops},
        "storage": {"url": f"sqlite:///{db}"},
        "log": {"level": "warning"},
        "delivery": {"shutdown_timeout": "2s"},
        "sources": {SOURCE: {"path": PATH, "provider": "svix", "secrets": [SECRET]}},
        "routes": [route],
    }
    if retry is not None:
        config["defaults"] = {"retry": {"schedule": retry, "jitter": 0}}
    path = directory / f"routes-{db.stem}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, ports


def start_gateway(
    processes: Processes, name: str, config: Path, ports: GatewayPorts
) -> subprocess.Popen[bytes]:
    process = processes.start(name, [PYTHON, "-m", "gateway", "serve", "-c", str(config)])
    try:
        wait_http(f"{ports.ops_url}/readyz", process, timeout=120)
    except RuntimeError as exc:
        processes.kill(process)
        raise RuntimeError(f"{exc}\n{processes.log_tail(name)}") from None
    return process


# -- the sink ---------------------------------------------------------------------------------------


@dataclass
class SinkHandle:
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def count(self) -> int:
        return int(httpx.get(f"{self.url}/_stats", timeout=10).json()["count"])

    def records(self) -> dict[str, float]:
        """Event id -> arrival time (first arrival) of every event the sink received since its last reset."""
        return dict(httpx.get(f"{self.url}/_records", timeout=30).json()["records"])

    def stats(self) -> Json:
        result: Json = httpx.get(f"{self.url}/_stats", timeout=10).json()
        return result

    def reset(self) -> None:
        httpx.post(f"{self.url}/_reset", timeout=10)


def start_sink(processes: Processes, port: int | None = None, name: str = "sink") -> SinkHandle:
    sink = SinkHandle(port or free_port())
    sink.process = processes.start(name, [PYTHON, "-m", "bench.sink", "--port", str(sink.port)])
    wait_http(f"{sink.url}/_stats", sink.process, timeout=30)
    return sink


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- numbers and results ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    # The smallest value with at least q% of them at or below it: rank ceil(q/100 x n).
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered) / 100)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def machine() -> Json:
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory": memory,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "commit": commit,
    }


def write_json(directory: Path, name: str, data: Json) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def say(message: str = "", out: IO[str] | None = None) -> None:
    print(message, file=out or sys.stdout, flush=True)


@contextmanager
def phase(title: str) -> Iterator[None]:
    say(f"\n== {title}")
    started = time.monotonic()
    try:
        yield
    finally:
        say(f"   ({time.monotonic() - started:.0f}s)")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], aligns: str = "") -> str:
    """A plain-text table; `aligns` has one of l/r per column (default: first left, the rest right)."""
    aligns = aligns or "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, aligns, strict=True)
        )

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(row) for row in cells[1:])])
