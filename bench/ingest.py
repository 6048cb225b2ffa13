"""Part 1, ingest: the same wrk load against each server, one after the other, in one run.

1. bare Starlette no-op under uvicorn (uvloop + httptools, one worker): the baseline;
2. Hookyard: svix verification + durable SQLite commit + a route forwarding to the sink;
2b. Hookyard with a route that matches nothing: the pure ingest cost;
2c. the same with its database on tmpfs, where an fsync costs nothing: what waiting for the disk costs;
3. adnanh/webhook with a payload-hmac-sha256 trigger rule, running no command, and running `true`.

Every request carries svix headers and the webhook HMAC header, so the load is identical. CPU per request is
the server's CPU time (/proc: the process, its running helpers such as Hookyard's fsync process, and the
children it reaped: webhook's commands) over the measured window, divided by the requests wrk completed in
it; RSS is the highest sampled during the window (the process's RSS plus its helpers' private memory).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import (
    HOST,
    PATH,
    PYTHON,
    WEBHOOK_HEADER,
    WEBHOOK_SECRET,
    GatewayPorts,
    Json,
    Processes,
    Sampler,
    Scrape,
    Settings,
    SinkHandle,
    body_1kb,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    gateway_config,
    loop_seconds,
    machine_busy_seconds,
    machine_steal_seconds,
    rss_mb,
    run_wrk,
    say,
    start_gateway,
    start_sink,
    svix_signature,
    table,
    wait_http,
    webhook_signature,
    write_signed_requests,
)

# Memory-backed on Linux: an fsync there returns at once.
TMPFS = Path("/dev/shm")

# Pre-signed ids per second of load: more than any server here completes, so no id repeats.
IDS_PER_SECOND = 40_000


@dataclass
class Server:
    key: str
    name: str
    url: str
    process: subprocess.Popen[bytes]
    verifies: bool = True
    gateway: GatewayPorts | None = None
    sink: SinkHandle | None = None
    scratch: Path | None = None  # a directory of its own outside the work directory, removed after


Starter = Callable[[Processes, Settings], Server]


def start_starlette(processes: Processes, settings: Settings) -> Server:
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", "bench.noop_app:app", "--host", HOST, "--port", str(port)]
    argv += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    process = processes.start("starlette", argv)
    wait_http(f"http://{HOST}:{port}/", process)
    return Server("starlette", "bare Starlette no-op", f"http://{HOST}:{port}{PATH}", process, verifies=False)


def _start_hookyard(processes: Processes, settings: Settings, *, routed: bool, tmpfs: bool = False) -> Server:
    key = "hookyard" if routed else "hookyard-tmpfs" if tmpfs else "hookyard-unrouted"
    sink = start_sink(processes, name=f"sink-{key}") if routed else None
    directory = TMPFS / f"hookyard-bench-{os.getpid()}" if tmpfs else settings.work
    directory.mkdir(exist_ok=True)
    config, ports = gateway_config(
        settings.work, directory / f"ingest-{key}.db", sink.url if sink else None, route_matches=routed
    )
    process = start_gateway(processes, key, config, ports)
    name = (
        "Hookyard: svix + durable + forward route"
        if routed
        else "Hookyard: svix, route not matching, database on tmpfs (fsync free)"
        if tmpfs
        else "Hookyard: svix + durable, route not matching"
    )
    return Server(
        key, name, ports.url, process, gateway=ports, sink=sink, scratch=directory if tmpfs else None
    )


def start_hookyard(processes: Processes, settings: Settings) -> Server:
    return _start_hookyard(processes, settings, routed=True)


def start_hookyard_unrouted(processes: Processes, settings: Settings) -> Server:
    return _start_hookyard(processes, settings, routed=False)


def start_hookyard_tmpfs(processes: Processes, settings: Settings) -> Server:
    """The unrouted gateway with its database in memory (tmpfs, where fsync returns at once): what durable
    ingest costs beyond the CPU of verifying, parsing and inserting is the difference from the row above.
    Not a configuration to run: a power cut loses everything."""
    return _start_hookyard(processes, settings, routed=False, tmpfs=True)


def _start_floor(processes: Processes, settings: Settings, *, routed: bool) -> Server:
    key = "floor" if routed else "floor-unrouted"
    sink = start_sink(processes, name=f"sink-{key}") if routed else None
    port = free_port()
    database = settings.work / f"ingest-{key}.db"
    argv = [PYTHON, "-m", "bench.floor_app", "--port", str(port), "--database", str(database)]
    process = processes.start(key, argv + (["--sink-port", str(sink.port)] if sink else []))
    wait_http(f"http://{HOST}:{port}/", process)
    name = f"least Python gateway: svix + durable{' + forward' if routed else ''} (bench/floor_app.py)"
    return Server(key, name, f"http://{HOST}:{port}{PATH}", process, sink=sink)


def start_floor(processes: Processes, settings: Settings) -> Server:
    """What the same durable work costs with none of Hookyard's generality (bench/floor_app.py)."""
    return _start_floor(processes, settings, routed=True)


def start_floor_unrouted(processes: Processes, settings: Settings) -> Server:
    return _start_floor(processes, settings, routed=False)


def _start_webhook(processes: Processes, settings: Settings, *, command: bool) -> Server:
    key = "webhook-true" if command else "webhook"
    hook: Json = {
        "id": "bench",
        "execute-command": "/bin/true" if command else "",
        "response-message": "accepted",
        "trigger-rule-mismatch-http-response-code": 401,
        "trigger-rule": {
            "match": {
                "type": "payload-hmac-sha256",
                "secret": WEBHOOK_SECRET,
                "parameter": {"source": "header", "name": WEBHOOK_HEADER},
            }
        },
    }
    if command:
        # Answer once the command has run: otherwise every request only queues a goroutine and a fork,
        # and the load measures how fast they pile up.
        hook["include-command-output-in-response"] = True
    hooks = settings.work / f"{key}-hooks.json"
    hooks.write_text(json.dumps([hook]))
    port = free_port()
    argv = ["webhook", "-hooks", str(hooks), "-ip", HOST, "-port", str(port), "-http-methods", "POST"]
    process = processes.start(key, argv)
    wait_http(f"http://{HOST}:{port}/", process)
    name = "adnanh/webhook: HMAC rule, runs `true`" if command else "adnanh/webhook: HMAC rule, no command"
    return Server(key, name, f"http://{HOST}:{port}/hooks/bench", process)


def start_webhook(processes: Processes, settings: Settings) -> Server:
    return _start_webhook(processes, settings, command=False)


def start_webhook_true(processes: Processes, settings: Settings) -> Server:
    return _start_webhook(processes, settings, command=True)


def check_verification(server: Server, body: bytes) -> None:
    """One correctly and one wrongly signed request: verification is really on (and the URL is right)."""
    timestamp = int(time.time())
    good_id, bad_id = f"msg_check_good_{server.key}", f"msg_check_bad_{server.key}"
    headers = {"content-type": "application/json", "svix-timestamp": str(timestamp)}
    good = {**headers, "svix-id": good_id, "svix-signature": svix_signature(good_id, timestamp, body)}
    good[WEBHOOK_HEADER] = webhook_signature(body)
    bad = {**headers, "svix-id": bad_id, "svix-signature": svix_signature(bad_id, timestamp, b"{}")}
    bad[WEBHOOK_HEADER] = webhook_signature(b"{}")
    answer = httpx.post(server.url, content=body, headers=good, timeout=10)
    if not answer.is_success:
        raise RuntimeError(
            f"{server.name}: a correctly signed request got {answer.status_code}: {answer.text}"
        )
    if server.verifies:
        refused = httpx.post(server.url, content=body, headers=bad, timeout=10)
        if refused.is_success:
            raise RuntimeError(f"{server.name}: a wrongly signed request was accepted")


def measure(server: Server, settings: Settings, body_path: Path) -> Json:
    body = body_path.read_bytes()
    signature = webhook_signature(body)
    check_verification(server, body)
    work = settings.work
    # Fresh files for every server: signed now (svix tolerance), ids never seen by this server before.
    warmup = write_signed_requests(
        work / "warmup.tsv", f"{server.key}_w", round(settings.warmup * IDS_PER_SECOND), body
    )
    requests = write_signed_requests(
        work / "requests.tsv", f"{server.key}_r", round(settings.duration * IDS_PER_SECOND), body
    )
    args = (settings.connections, settings.threads)
    run_wrk(server.url, settings.warmup, *args, warmup, body_path, signature)

    before = Scrape.fetch(f"{server.gateway.ops_url}/metrics") if server.gateway else None
    pid = server.process.pid
    sink = server.sink.process.pid if server.sink is not None and server.sink.process is not None else None
    cpu_before = cpu_seconds(pid)
    sink_before = cpu_seconds(sink) if sink else 0.0
    wrk_before, machine_before = children_cpu_seconds(), machine_busy_seconds()
    steal_before, started = machine_steal_seconds(), time.monotonic()
    with (
        Sampler(lambda: rss_mb(pid), 0.2) as rss,
        Sampler(lambda: loop_seconds(pid)[0], 0.2) as loop_ran,
        Sampler(lambda: loop_seconds(pid)[1], 0.2) as loop_waited,
    ):
        result = run_wrk(server.url, settings.duration, *args, requests, body_path, signature)
    cpu = cpu_seconds(pid) - cpu_before
    machine = machine_busy_seconds() - machine_before
    # The seconds the CPU figures were read over: wrk's own duration leaves out its start and its end.
    elapsed = time.monotonic() - started
    per_request = 1e6 / max(1, result.requests)
    row: Json = {
        "key": server.key,
        "name": server.name,
        "requests": result.requests,
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
        "cpu_us_per_request": cpu * per_request,
        "cpu_cores": cpu / elapsed,
        # The main thread: the event loop of the Python servers (not a figure of Go's scheduler). The share
        # of the load's steady part it ran, and the share it was ready to run but waited for a core.
        "loop_cores": None if server.key.startswith("webhook") else steady_rate(loop_ran.samples),
        "loop_waiting_cores": None if server.key.startswith("webhook") else steady_rate(loop_waited.samples),
        # The whole machine over the window: wrk's own CPU, the sink's, and every core's busy time.
        "wrk_cpu_us_per_request": (children_cpu_seconds() - wrk_before) * per_request,
        "sink_cpu_us_per_request": (cpu_seconds(sink) - sink_before) * per_request if sink else 0.0,
        "machine_cpu_us_per_request": machine * per_request,
        "machine_busy_cores": machine / elapsed,
        "machine_steal_cores": (machine_steal_seconds() - steal_before) / elapsed,
        "machine_cores": os.cpu_count() or 1,  # what /proc/stat's busy time adds up
        "rss_mb": rss.max(),
        "rss_end_mb": rss_mb(pid),
    }
    if server.gateway is not None and before is not None:
        after = Scrape.fetch(f"{server.gateway.ops_url}/metrics")

        def delta(name: str, **labels: str) -> float:
            return after.get(name, **labels) - before.get(name, **labels)

        commits = delta("hookyard_storage_batch_size_count")
        row["accepted"] = delta("hookyard_webhooks_received_total", outcome="accepted")
        row["duplicates"] = delta("hookyard_webhooks_received_total", outcome="duplicate")
        row["rejected"] = delta("hookyard_webhooks_received_total", outcome="rejected")
        row["operations_per_commit"] = delta("hookyard_storage_batch_size_sum") / commits if commits else 0.0
        row["commits_per_second"] = commits / result.seconds
        row["delivered_during_load"] = delta("hookyard_deliveries_total", outcome="delivered")
    return row


def steady_rate(samples: list[tuple[float, float]]) -> float | None:
    """How fast a cumulative count of seconds grew over the middle half of its samples: the steady part of
    the load, without wrk's start (it reads its file of requests first) or its end."""
    if len(samples) < 4:
        return None
    (start, first), (end, last) = samples[len(samples) // 4], samples[3 * len(samples) // 4]
    return (last - first) / (end - start) if end > start else None


SERVERS: list[tuple[str, Starter]] = [
    ("starlette", start_starlette),
    ("hookyard", start_hookyard),
    ("hookyard-unrouted", start_hookyard_unrouted),
    ("hookyard-tmpfs", start_hookyard_tmpfs),
    ("floor", start_floor),
    ("floor-unrouted", start_floor_unrouted),
    ("webhook", start_webhook),
    ("webhook-true", start_webhook_true),
]


def run(settings: Settings, processes: Processes) -> Json:
    missing: list[str] = []
    body_path = settings.work / "body.json"
    body_path.write_bytes(body_1kb())
    rows: list[Json] = []
    for key, starter in SERVERS:
        if key == "hookyard-tmpfs" and not TMPFS.is_dir():
            say(f"   no {TMPFS} (tmpfs) here; skipping the in-memory variant")
            continue
        if key.startswith("webhook") and not settings.tools["webhook"].present:
            if not missing:
                say("   adnanh/webhook is not installed (Debian: apt-get install webhook); skipping it")
                missing.append("webhook")
            continue
        server = starter(processes, settings)
        try:
            say(f"   {server.name} ...")
            row = measure(server, settings, body_path)
        finally:
            processes.stop(server.process)
            if server.sink is not None and server.sink.process is not None:
                processes.stop(server.sink.process)
            if server.scratch is not None:
                shutil.rmtree(server.scratch, ignore_errors=True)
        rows.append(row)
        say(
            f"     {row['rps']:.0f} req/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
            f"{row['cpu_us_per_request']:.0f} µs CPU/req, RSS {row['rss_mb']:.1f} MB; the machine: "
            f"{row['machine_busy_cores']:.2f} cores busy, {row['machine_cpu_us_per_request']:.0f} µs/req"
            + (f"; its event loop {row['loop_cores']:.2f} of a core" if row["loop_cores"] is not None else "")
        )
        if row["non_2xx"] or row["socket_errors"]:
            say(f"     WARNING: {row['non_2xx']} non-2xx answers, {row['socket_errors']} socket errors")
    baseline = rows[0]
    for row in rows:
        row["ratio"] = {
            "rps": row["rps"] / baseline["rps"],
            "p50": row["p50_ms"] / baseline["p50_ms"] if baseline["p50_ms"] else 0.0,
            "p99": row["p99_ms"] / baseline["p99_ms"] if baseline["p99_ms"] else 0.0,
            "cpu": row["cpu_us_per_request"] / baseline["cpu_us_per_request"],
            "rss": row["rss_mb"] / baseline["rss_mb"],
        }
    say()
    say(render(rows))
    for row in rows:
        if "operations_per_commit" in row:
            say(
                f"   {row['key']}: {row['operations_per_commit']:.1f} storage operations per fsync'd commit, "
                f"{row['commits_per_second']:.0f} commits/s, {row['duplicates']:.0f} duplicate ids"
            )
    return {
        "duration_s": settings.duration,
        "warmup_s": settings.warmup,
        "connections": settings.connections,
        "wrk_threads": settings.threads,
        "body_bytes": body_path.stat().st_size,
        "missing": missing,
        "results": rows,
    }


def render(rows: list[Json]) -> str:
    headers = ["server", "req/s", "x bare", "p50 ms", "p99 ms", "x bare", "CPU µs/req", "x bare", "RSS MB"]
    return table(
        headers,
        [
            [
                row["name"],
                f"{row['rps']:.0f}",
                f"{row['ratio']['rps']:.2f}",
                f"{row['p50_ms']:.2f}",
                f"{row['p99_ms']:.2f}",
                f"{row['ratio']['p99']:.2f}",
                f"{row['cpu_us_per_request']:.0f}",
                f"{row['ratio']['cpu']:.2f}",
                f"{row['rss_mb']:.1f}",
            ]
            for row in rows
        ],
    )
