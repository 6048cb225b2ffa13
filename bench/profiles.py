"""Part 4, profiles (`--profile`): where a gateway's CPU time goes, sampled with py-spy.

- ingest: the part-1 Hookyard (svix + durable + forward route) under the same wrk load;
- delivery: a gateway started on a database holding a backlog of due deliveries, draining it to the sink
  (delivery engine, storage claims and finishes, HTTP client; no ingest).

For each, py-spy records collapsed stacks (`--format raw`, kept as profile-*.txt) and then a flame graph
(profile-*.svg), one after the other under the same load. Samples are of running threads only (py-spy leaves
out idle ones: a loop waiting in epoll, the fsync helper process waiting for a request). Each sample is put in the
category of its innermost recognised frame: time in C code (httptools, hmac, sqlite3, orjson) counts for
the Python function that called it.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from pathlib import Path

from bench.common import (
    Json,
    Processes,
    Settings,
    body_1kb,
    gateway_config,
    process_tree,
    say,
    start_gateway,
    start_sink,
    table,
    webhook_signature,
    write_signed_requests,
    wrk_argv,
)
from bench.scale import create_database, grow

SAMPLE_RATE = 200  # Hz
MAX_SVG_BYTES = 1_000_000

# (category, substrings of a frame's file); the innermost frame that matches one decides.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    (
        "verification (svix HMAC)",
        ("plugins/svix.py", "plugins/hmac_generic.py", "/hmac.py", "gateway/providers.py"),
    ),
    ("storage: fsync of the WAL (helper process)", ("gateway/storage/fsync_helper.py",)),
    ("storage: statements and COMMIT (event loop)", ("gateway/storage/",)),
    ("storage: checkpoints and queue statistics (helper threads)", ("concurrent/futures/thread.py",)),
    ("delivery engine", ("gateway/delivery.py", "gateway/backoff.py", "gateway/actions.py")),
    (
        "HTTP client (forward, httpx, aiohttp)",
        ("plugins/forward.py", "gateway/http_client.py", "httpx/", "httpx_aiohttp/", "aiohttp/", "yarl/"),
    ),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("logging", ("logging/", "pythonjsonlogger/", "gateway/logs.py")),
    (
        "ingress (parse, route, respond)",
        (
            "gateway/ingress.py",
            "gateway/routing.py",
            "gateway/events.py",
            "gateway/filters.py",
            "gateway/addresses.py",
        ),
    ),
    ("ops listener (starlette)", ("starlette/", "gateway/ops.py", "gateway/admin.py")),
    ("uvicorn / httptools", ("uvicorn/", "httptools/")),
]
EVENT_LOOP = "event loop (uvloop: I/O, scheduling)"
# A helper thread between two jobs: taking the next one off its queue, getting the GIL back.
HELPER_WAKEUP = "storage: helper thread wake-ups (queue, GIL)"
# Who used the CPU, measured (/proc), beside py-spy's samples.
THREAD_ROLES = ("event loop (main thread)", "helper threads", "fsync helper process")
# Entry points every stack of the main thread goes through: no information in their inclusive share.
_ENTRY_FILES = ("gateway/__main__.py", "gateway/cli.py")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def parse_raw(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw format: `frame;frame;...;frame count` per line, outermost frame first."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            frames.append((match["function"], match["file"]) if match else (frame, ""))
        stacks.append((frames, int(count)))
    return stacks


def category(frames: list[tuple[str, str]]) -> str:
    function, file = frames[-1]
    if function == "_worker" and file.endswith("concurrent/futures/thread.py"):
        return HELPER_WAKEUP
    for _function, file in reversed(frames):
        for name, markers in CATEGORIES:
            if any(marker in file for marker in markers):
                return name
    return EVENT_LOOP


def summarize(path: Path, top: int = 12) -> Json:
    stacks = parse_raw(path)
    total = sum(count for _, count in stacks) or 1
    categories: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        categories[category(frames)] += count
        function, file = frames[-1]
        if (function, file) == ("Runner.run", "asyncio/runners.py"):
            function, file = "uvloop's C code: I/O, callbacks", "under Runner.run"
        own[f"{function} ({file})"] += count
        for name in {
            f"{f} ({p})"
            for f, p in frames
            if p.startswith(("gateway/", "plugins/")) and p not in _ENTRY_FILES
        }:
            inclusive[name] += count
    return {
        "samples": total,
        "categories": [{"category": c, "share": n / total} for c, n in categories.most_common()],
        "top_self": [{"function": f, "share": n / total} for f, n in own.most_common(top)],
        "top_inclusive_gateway": [{"function": f, "share": n / total} for f, n in inclusive.most_common(top)],
    }


def py_spy(settings: Settings, processes: Processes, pid: int, out: Path, fmt: str) -> None:
    spy = settings.tools["py-spy"].path
    assert spy is not None
    # --subprocesses: the fsync helper process too.
    argv = [spy, "record", "--pid", str(pid), "--subprocesses"]
    argv += ["--duration", f"{settings.profile_duration:g}"]
    argv += ["--rate", str(SAMPLE_RATE), "--format", fmt, "-o", str(out)]
    process = processes.start(f"py-spy-{out.stem}", argv)
    try:
        status = process.wait(settings.profile_duration + 60)
    finally:
        processes.kill(process)
    if status != 0:
        raise RuntimeError(f"py-spy failed ({status}):\n{processes.log_tail(f'py-spy-{out.stem}')}")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of the gateway's threads, by role: its event loop (the main thread), its other
    threads, and its helper processes (the fsync helper)."""
    seconds = dict.fromkeys(THREAD_ROLES, 0.0)
    for member in process_tree(pid):
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except OSError:
            continue  # ended meanwhile
        for task in tasks:
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            role = THREAD_ROLES[0 if task.name == str(pid) else 1 if member == pid else 2]
            seconds[role] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return seconds


def record(settings: Settings, processes: Processes, name: str, pid: int) -> Json:
    """Raw stacks first (the summary), then the flame graph, each over profile_duration seconds. While the
    raw stacks are recorded, the CPU each of the gateway's threads really used is read from /proc too."""
    settings.results.mkdir(parents=True, exist_ok=True)
    raw, svg = settings.results / f"profile-{name}.txt", settings.results / f"profile-{name}.svg"
    before, started = thread_cpu(pid), time.monotonic()
    py_spy(settings, processes, pid, raw, "raw")
    after, elapsed = thread_cpu(pid), time.monotonic() - started
    py_spy(settings, processes, pid, svg, "flamegraph")
    summary = summarize(raw)
    summary["thread_cores"] = {role: (after[role] - before[role]) / elapsed for role in THREAD_ROLES}
    summary["raw"] = raw.name
    if svg.exists() and svg.stat().st_size > MAX_SVG_BYTES:
        svg.unlink()
        summary["svg"] = None
        summary["svg_note"] = "flame graph over 1 MB, not kept"
    else:
        summary["svg"] = svg.name if svg.exists() else None
    return summary


def profile_ingest(settings: Settings, processes: Processes) -> Json:
    sink = start_sink(processes, name="sink-profile-ingest")
    config, ports = gateway_config(settings.work, settings.work / "profile-ingest.db", sink.url)
    gateway = start_gateway(processes, "profile-ingest", config, ports)
    body_path = settings.work / "body.json"
    body_path.write_bytes(body_1kb())
    load_s = 2 * settings.profile_duration + 6
    requests = write_signed_requests(
        settings.work / "profile.tsv", "profile", round(load_s * 40_000), body_1kb()
    )
    wrk = None
    try:
        args = (settings.connections, settings.threads, requests, body_path, webhook_signature(body_1kb()))
        wrk = processes.start("wrk-profile", wrk_argv(ports.url, load_s, *args))
        time.sleep(2)  # past the start
        summary = record(settings, processes, "ingest", gateway.pid)
    finally:
        if wrk is not None:
            processes.kill(wrk)
        processes.stop(gateway)
        if sink.process is not None:
            processes.stop(sink.process)
    summary["load"] = (
        f"wrk, {settings.connections} connections, signed 1 KB webhooks, route forwarding to the sink"
    )
    return summary


def profile_delivery(settings: Settings, processes: Processes) -> Json:
    db = settings.work / "profile-delivery.db"
    asyncio.run(create_database(db))
    # Enough due deliveries to keep the engine busy through both recordings (it drains ~2,000/s here).
    backlog = int(2_500 * (2 * settings.profile_duration + 8))
    grow(db, 0, backlog, time.time() - 60)
    sink = start_sink(processes, name="sink-profile-delivery")
    config, ports = gateway_config(settings.work, db, sink.url)
    gateway = start_gateway(processes, "profile-delivery", config, ports)
    try:
        summary = record(settings, processes, "delivery", gateway.pid)
        summary["delivered_while_profiling"] = sink.count()
    finally:
        processes.stop(gateway)
        if sink.process is not None:
            processes.stop(sink.process)
    summary["load"] = f"a backlog of {backlog:,} due deliveries drained to the sink (no ingest)"
    return summary


def run(settings: Settings, processes: Processes) -> Json:
    results: Json = {"sample_rate_hz": SAMPLE_RATE, "duration_s": settings.profile_duration}
    for name, profile in (("ingest", profile_ingest), ("delivery", profile_delivery)):
        say(f"   {name} path ...")
        results[name] = summary = profile(settings, processes)
        say(render(summary))
    return results


def render(summary: Json) -> str:
    rows = [[c["category"], f"{c['share']:.1%}"] for c in summary["categories"]]
    lines = [table(["where the CPU goes", "samples"], rows)]
    lines.append("")
    lines.append(
        table(
            ["top functions (self)", "samples"],
            [[f["function"], f"{f['share']:.1%}"] for f in summary["top_self"]],
        )
    )
    return "\n".join(lines)
