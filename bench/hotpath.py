"""Part 6: the hot path alone, in one process: no sockets to the sender, no load generator.

    python bench/hotpath.py --config ROUTES --requests FILE [--routed] [--warmup N] [--bytecodes FILE]

run with the tree under test first on PYTHONPATH, starts the gateway of ROUTES in its own process (the svix
source, SQLite on disk with its fsync helper, a route that forwards to the benchmark sink or that matches
nothing) and connects 32 in-memory transports to its webhook listener's protocol. Each round feeds every
transport one signed 1 KB webhook, as whole requests from FILE, and waits for all 32 answers, and with
--routed for all 32 deliveries, before the next round. It prints JSON: the process's CPU per webhook (every
thread) over the rounds after the warm-up.

Run under valgrind's callgrind with two numbers of rounds, the difference of the instructions counted,
divided by the difference of webhooks, is what one webhook costs in instructions: the same count on every
run of the same code, however busy the host is, where CPU seconds on a shared machine are not. The requests
are signed beforehand by the part, outside the process counted. With --bytecodes FILE it also counts the
Python bytecodes each function runs (every thread), the same way: a profile by function that a busy host
does not disturb either.

The part runs it for the current tree and, with `--against REV`, for a `git archive` of REV, the same way:
a before and after that does not depend on what the host was doing during either.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, cast

if __package__ in (None, ""):
    # Run as a script (the harness): the tree under test is on PYTHONPATH, this file's own tree is not.
    Json = dict[str, Any]
else:
    from bench.common import (
        COUNTED_ENV,
        PATH,
        PYTHON,
        ROOT,
        Json,
        Processes,
        Settings,
        body_1kb,
        die_with_parent,
        gateway_config,
        instructions_counted,
        say,
        start_sink,
        svix_signature,
        table,
        under_callgrind,
    )

HARNESS = Path(__file__).resolve()
CONNECTIONS = 32
WARMUP_ROUNDS = 20
# Rounds per measurement; under callgrind, the counted slope is between the two.
CPU_ROUNDS = 600
COUNTED_ROUNDS = (30, 100)
# Rounds of the two runs whose bytecodes are counted: tracing every bytecode makes a run ~20x slower.
BYTECODE_ROUNDS = (30, 60)
LENGTH = struct.Struct("!I")
TIMEOUT_S = 600  # one harness run, callgrind's included


# -- the harness (runs in its own process, importing the tree under test) ------------------------------


class MemoryTransport:
    """A connection's transport that keeps nothing: it counts the answers written, and those not 200."""

    def __init__(self, answered: Answered) -> None:
        self.answered = answered
        self.closing = False

    def write(self, data: bytes) -> None:
        self.answered.one(ok=data.startswith(b"HTTP/1.1 200 "))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Answered:
    """Counts what is done (answers, or deliveries) and wakes the round once the expected number is."""

    def __init__(self) -> None:
        self.count = 0
        self.failed = 0  # answers other than 200, deliveries other than delivered: the figures would lie
        self.expected = 0
        self.done = asyncio.Event()

    def expect(self, more: int) -> None:
        self.expected = self.count + more
        self.done.clear()

    def one(self, ok: bool) -> None:
        self.count += 1
        self.failed += not ok
        if self.count >= self.expected:
            self.done.set()


def read_requests(path: Path) -> list[bytes]:
    data = path.read_bytes()
    requests, offset = [], 0
    while offset < len(data):
        (size,) = LENGTH.unpack_from(data, offset)
        requests.append(data[offset + LENGTH.size : offset + LENGTH.size + size])
        offset += LENGTH.size + size
    return requests


async def harness(config: Path, requests: list[bytes], routed: bool, warmup: int) -> Json:
    import uvicorn
    from uvicorn.server import ServerState

    from gateway.app import Gateway
    from gateway.config import load_config
    from gateway.protocol import webhook_protocol

    gateway = Gateway(load_config(config))
    await gateway.start()
    # As `hookyard serve` does once started (earlier trees only froze what existed then).
    try:
        from gateway.app import collect_less
    except ImportError:
        gc.collect()
        gc.freeze()
    else:
        collect_less()
    try:
        # Earlier trees took the read timeout as a second argument.
        if len(inspect.signature(webhook_protocol).parameters) == 2:
            protocol = webhook_protocol(gateway.ingress, lambda: gateway.config.limits.read_timeout)  # type: ignore[call-arg]
        else:
            protocol = webhook_protocol(gateway.ingress)
        server = uvicorn.Config(gateway.ingress, lifespan="off", log_config=None, access_log=False, ws="none")
        state = ServerState()
        answered, delivered = Answered(), Answered()
        loop = asyncio.get_running_loop()
        connections = []
        for _ in range(CONNECTIONS):
            connection = protocol(server, state, {}, loop)
            connection.connection_made(cast(asyncio.Transport, MemoryTransport(answered)))
            connections.append(connection)
        finished = gateway.metrics.delivery_finished

        def count_delivery(route: str, action: str, outcome: str, *args: Any) -> None:
            finished(route, action, outcome, *args)
            delivered.one(ok=outcome == "delivered")

        gateway.metrics.delivery_finished = count_delivery  # type: ignore[method-assign, assignment]

        async def rounds(first: int, last: int) -> None:
            for start in range(first * CONNECTIONS, last * CONNECTIONS, CONNECTIONS):
                answered.expect(CONNECTIONS)
                delivered.expect(CONNECTIONS)
                for connection, request in zip(
                    connections, requests[start : start + CONNECTIONS], strict=True
                ):
                    connection.data_received(request)
                await answered.done.wait()
                if routed:
                    await delivered.done.wait()

        total = len(requests) // CONNECTIONS
        await rounds(0, warmup)
        cpu, started = time.process_time(), time.perf_counter()
        await rounds(warmup, total)
        cpu, elapsed = time.process_time() - cpu, time.perf_counter() - started
    finally:
        await gateway.stop()
    webhooks = (total - warmup) * CONNECTIONS
    return {
        "webhooks": webhooks,
        "cpu_us_per_webhook": cpu / webhooks * 1e6,
        "webhooks_per_s": webhooks / elapsed,
        "not_200": answered.failed,
        "not_delivered": delivered.failed if routed else 0,
    }


class BytecodeCounter:
    """Counts the Python bytecodes each function runs, in every thread (sys.settrace with opcode events): a
    profile that, like callgrind's count, does not depend on how busy the host is. Tracing makes the run
    many times slower; the counts are what matter."""

    def __init__(self) -> None:
        self.counts: dict[Any, int] = {}

    def install(self) -> None:
        import threading

        threading.settrace(self._call)
        sys.settrace(self._call)

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._opcode

    def _opcode(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            self.counts[code] = self.counts.get(code, 0) + 1
        return self._opcode

    def write(self, path: Path) -> None:
        sys.settrace(None)
        tree = os.getcwd() + os.sep
        counted: dict[str, int] = {}
        for code, count in self.counts.items():
            where = f"{_module(code.co_filename, tree)} {code.co_qualname}"
            counted[where] = counted.get(where, 0) + count
        path.write_text(json.dumps(counted))


def _module(filename: str, tree: str) -> str:
    """A code object's file as a module path: relative to the tree under test, to site-packages, or to the
    standard library."""
    if filename == "<string>":
        return "(generated)"  # a dataclass's __init__, a namedtuple's __new__
    for marker in ("site-packages" + os.sep, f"python3.{sys.version_info.minor}" + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename.removeprefix(tree)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/hotpath.py")
    parser.add_argument("--config", type=Path, required=True, help="the gateway's routes.yaml")
    parser.add_argument("--requests", type=Path, required=True, help="signed requests, length-prefixed")
    parser.add_argument("--routed", action="store_true", help="wait for each round's deliveries too")
    parser.add_argument("--warmup", type=int, default=WARMUP_ROUNDS, help="rounds before the measured ones")
    parser.add_argument("--bytecodes", type=Path, help="count each function's bytecodes into this file")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    counter = BytecodeCounter() if args.bytecodes else None
    if counter is not None:
        counter.install()
    result = asyncio.run(harness(args.config, read_requests(args.requests), args.routed, args.warmup))
    if counter is not None:
        counter.write(args.bytecodes)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()


# -- the part (runs in the benchmark's process) -----------------------------------------------------------

MODES = (("unrouted", "no route matching"), ("routed", "forward route, delivered to the sink"))


def write_requests(path: Path, prefix: str, rounds: int) -> Path:
    """rounds x CONNECTIONS signed webhooks, each a whole request, length-prefixed."""
    body, timestamp = body_1kb(), int(time.time())
    with path.open("wb") as out:
        for n in range(rounds * CONNECTIONS):
            msg_id = f"{prefix}-{n}"
            head = (
                f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nsvix-id: {msg_id}\r\nsvix-timestamp: {timestamp}\r\n"
                f"svix-signature: {svix_signature(msg_id, timestamp, body)}\r\n\r\n"
            ).encode()
            out.write(LENGTH.pack(len(head) + len(body)) + head + body)
    return path


def archive(rev: str, directory: Path) -> tuple[Path, str]:
    """A clean copy of the tree at `rev` (git archive), and its commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{rev}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tree = directory / f"tree-{commit}"
    tree.mkdir(parents=True, exist_ok=True)
    tar = subprocess.Popen(["git", "archive", commit], cwd=ROOT, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=tar.stdout, check=True)
    if tar.wait() != 0:
        raise RuntimeError(f"git archive {commit} failed")
    return tree, commit


def harness_run(
    settings: Settings,
    tree: Path,
    sink_url: str,
    mode: str,
    rounds: int,
    counted: bool,
    bytecodes: Path | None = None,
) -> tuple[Json, Counted | None]:
    """One run of the harness on `tree`, on a database of its own: its JSON, and with `counted`
    callgrind's instruction count, in all and by kind of code (instructions_by_kind). With `bytecodes`,
    each function's bytecodes are counted into that file (BytecodeCounter)."""
    name = f"hotpath-{mode}-{rounds}-{time.monotonic_ns()}"
    config, _ports = gateway_config(
        settings.work, settings.work / f"{name}.db", sink_url, route_matches=mode == "routed"
    )
    requests = write_requests(settings.work / f"{name}.bin", f"hp{time.time_ns()}", rounds)
    argv = [PYTHON, str(HARNESS), "--config", str(config), "--requests", str(requests)]
    argv += ["--warmup", str(WARMUP_ROUNDS)] + (["--routed"] if mode == "routed" else [])
    if bytecodes is not None:
        argv += ["--bytecodes", str(bytecodes)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if counted:
        argv = under_callgrind(settings, argv, settings.work / f"callgrind-{requests.stem}.out")
        env.update(COUNTED_ENV)
    try:
        # Killed by the kernel if the benchmark dies (a callgrind run takes minutes). The signal follows the
        # thread that started it: a pool thread here, which lives until this run has returned.
        done = subprocess.run(
            argv,
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
            preexec_fn=die_with_parent,
        )
    finally:
        requests.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"the harness failed ({done.returncode}): {done.stderr[-1500:]}")
    result: Json = json.loads(done.stdout.strip().splitlines()[-1])
    if result.get("not_200") or result.get("not_delivered"):
        # A refused webhook (a signature past its tolerance, say) costs far less than a stored one.
        raise RuntimeError(
            f"{result['not_200']} webhooks not answered 200, {result['not_delivered']} not delivered"
        )
    instructions = None
    if counted:
        profile = settings.work / f"callgrind-{requests.stem}.out"
        try:
            instructions = Counted(instructions_counted(done.stderr), instructions_by_kind(profile))
        finally:
            profile.unlink(missing_ok=True)
    return result, instructions


def measure(settings: Settings, tree: Path, sink_url: str, mode: str) -> Json:
    result, _ = harness_run(settings, tree, sink_url, mode, WARMUP_ROUNDS + CPU_ROUNDS, counted=False)
    row: Json = {"cpu_us_per_webhook": result["cpu_us_per_webhook"], "webhooks": result["webhooks"]}
    if settings.tools["valgrind"].present:
        # The two counted runs at once, one per core: each is single-threaded under valgrind.
        with ThreadPoolExecutor(2) as pool:
            short, long = pool.map(
                lambda rounds: harness_run(settings, tree, sink_url, mode, rounds, counted=True)[1],
                COUNTED_ROUNDS,
            )
        assert short is not None and long is not None
        extra = (COUNTED_ROUNDS[1] - COUNTED_ROUNDS[0]) * CONNECTIONS
        row["instructions_per_webhook"] = (long.total - short.total) / extra
        if long.by_kind and short.by_kind:
            row["instructions_by_kind"] = {
                kind: (count - short.by_kind.get(kind, 0)) / extra for kind, count in long.by_kind.items()
            }
    by_function = bytecodes_per_webhook(settings, tree, sink_url, mode)
    row["bytecodes_per_webhook"] = sum(by_function.values())
    row["bytecodes_by_function"] = by_function
    return row


class Counted(NamedTuple):
    """What callgrind counted in one harness run: every instruction, and by kind (empty without
    callgrind_annotate)."""

    total: int
    by_kind: dict[str, int]


# What kind of code a function callgrind names is, first match wins: where a webhook's instructions go in C,
# which the Python bytecodes by function leave out (what each bytecode costs, SQLite, the hashes, the loop).
CODE_KINDS = (
    ("SQLite", re.compile(r"libsqlite3|Modules/_sqlite")),
    ("hashes (HMAC-SHA256)", re.compile(r"libcrypto|sha256|hmac", re.IGNORECASE)),
    ("event loop (uvloop, libuv)", re.compile(r"uvloop|libuv")),
    ("HTTP parsing (httptools)", re.compile(r"httptools|llhttp")),
    ("JSON (orjson)", re.compile(r"orjson")),
    ("locks and the GIL", re.compile(r"pthread|ceval_gil")),
    (
        "memory: allocation, freeing, GC",
        re.compile(r"obmalloc|malloc\.c|memset|memmove|memcpy|gcmodule|_Py_NewReference|dealloc"),
    ),
    (
        "Python: the bytecode loop, frames, calls",
        re.compile(r"ceval|Python/frame\.c|pycore_frame|Objects/call\.c|Include/object\.h|genobject"),
    ),
    (
        "Python: dict and attribute lookups",
        re.compile(r"dictobject|typeobject|Objects/object\.c|descrobject"),
    ),
    ("Python: str and bytes", re.compile(r"unicodeobject|bytesobject|stringlib")),
    ("Python: the rest", re.compile(r"libpython|Python-3|/Python/|/Objects/|/Modules/")),
)
_ANNOTATED = re.compile(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.+)")


def instructions_by_kind(profile: Path) -> dict[str, int]:
    """A callgrind profile's instructions, by the kind of code (CODE_KINDS) of the function that ran them
    (its own, not those it called); {} without callgrind_annotate (valgrind's, a Perl script)."""
    annotate = shutil.which("callgrind_annotate")
    if annotate is None:
        return {}
    listed = subprocess.run(
        [annotate, "--auto=no", "--inclusive=no", "--threshold=100", str(profile)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    ).stdout
    kinds: dict[str, int] = {}
    for line in listed.splitlines():
        found = _ANNOTATED.match(line)
        if found is None or found.group(2).startswith("PROGRAM TOTALS"):
            continue
        where = found.group(2)
        kind = next((kind for kind, pattern in CODE_KINDS if pattern.search(where)), "other")
        kinds[kind] = kinds.get(kind, 0) + int(found.group(1).replace(",", ""))
    return kinds


def bytecodes_per_webhook(settings: Settings, tree: Path, sink_url: str, mode: str) -> dict[str, float]:
    """Each function's Python bytecodes per webhook: the difference between a run of BYTECODE_ROUNDS[1]
    rounds and one of BYTECODE_ROUNDS[0], per webhook of the difference (as for the instructions)."""

    def counted(rounds: int) -> dict[str, int]:
        path = settings.work / f"bytecodes-{mode}-{rounds}-{time.monotonic_ns()}.json"
        harness_run(settings, tree, sink_url, mode, rounds, counted=False, bytecodes=path)
        try:
            return cast(dict[str, int], json.loads(path.read_text()))
        finally:
            path.unlink()

    with ThreadPoolExecutor(2) as pool:  # one run per core, as for the instructions
        short, long = pool.map(counted, BYTECODE_ROUNDS)
    webhooks = (BYTECODE_ROUNDS[1] - BYTECODE_ROUNDS[0]) * CONNECTIONS
    per_webhook = {where: (count - short.get(where, 0)) / webhooks for where, count in long.items()}
    return {where: count for where, count in per_webhook.items() if count >= 0.5}


def run(settings: Settings, processes: Processes) -> Json:
    trees = [("now", ROOT, "")]
    if settings.against:
        tree, commit = archive(settings.against, settings.work)
        trees.append(("before", tree, commit))
    sink = start_sink(processes, name="sink-hotpath")
    rows: list[Json] = []
    try:
        for which, tree, commit in trees:
            for mode, label in MODES:
                say(f"   {which}{f' ({commit})' if commit else ''}, {label} ...")
                row: Json = {"tree": which, "commit": commit, "mode": mode, "label": label}
                try:
                    row.update(measure(settings, tree, sink.url, mode))
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                    row["error"] = str(exc)[-300:]
                    say(f"     failed: {row['error']}")
                else:
                    counted = row.get("instructions_per_webhook")
                    say(
                        f"     {row['cpu_us_per_webhook']:.1f} µs CPU per webhook"
                        + (f", {counted:,.0f} instructions" if counted else "")
                        + f", {row['bytecodes_per_webhook']:,.0f} Python bytecodes"
                    )
                rows.append(row)
    finally:
        if sink.process is not None:
            processes.stop(sink.process)
    say()
    say(render_table(rows))
    return {
        "connections": CONNECTIONS,
        "cpu_rounds": CPU_ROUNDS,
        "counted_rounds": list(COUNTED_ROUNDS),
        "valgrind": settings.tools["valgrind"].present,
        "rows": rows,
    }


def render_table(rows: list[Json]) -> str:
    return table(
        ["tree", "path", "CPU µs/webhook", "instructions/webhook", "bytecodes/webhook"],
        [
            [
                f"{row['tree']} {row['commit']}".strip(),
                row["label"],
                f"{row['cpu_us_per_webhook']:.1f}" if "cpu_us_per_webhook" in row else "failed",
                f"{row['instructions_per_webhook']:,.0f}" if row.get("instructions_per_webhook") else "",
                f"{row['bytecodes_per_webhook']:,.0f}" if row.get("bytecodes_per_webhook") else "",
            ]
            for row in rows
        ],
        "llrrr",
    )
