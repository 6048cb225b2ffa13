"""Part 3, scale: what a deep queue costs. One SQLite database grows to each level of queued deliveries
(0, 100 k, 1 M by default); at each level:

- the RSS of a `hookyard serve` process on that database, idle (and again after a short burst of webhooks
  that it ingests and delivers to the sink), and how long it took to become ready;
- the cost to claim the next due delivery: `claim(now, 1, lease, owner)` + `finish` pairs through
  SQLiteStorage (each one transaction and commit; leases and results need no fsync), median wall time
  and median CPU per pair of the thread that runs them (the event loop's, where the store's statements
  run); the process's CPU per pair too, helper threads included, which checkpoints make uneven; and with
  valgrind, callgrind's instructions per pair, which the flatness verdict goes by (CPU seconds of levels
  measured minutes apart move with the host);
- the two queue queries the gateway runs on its own: next_due_at (before sleeping) and queue_stats
  (the hookyard_delivery_queue / _lag gauges, every 2 s).

The schema comes from SQLiteStorage.open(); the backlog is bulk-inserted with one INSERT ... SELECT per
table, with the rows ingest() writes (a pending delivery due at its event's received_at). Backlog events are
received "an hour from now", so the idle gateway has nothing due; the timed claims pass a `now` past all of
them, so every queued delivery is due and the claim picks the oldest among them: the 1000 probe deliveries
ingested through the storage API just before, due an hour ago.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path

import orjson

from bench.common import (
    COUNTED_ENV,
    PYTHON,
    ROOT,
    SOURCE,
    Json,
    Processes,
    Scrape,
    Settings,
    body_1kb,
    die_with_parent,
    gateway_config,
    instructions_counted,
    percentile,
    rss_mb,
    say,
    start_gateway,
    start_sink,
    table,
    under_callgrind,
    wait_for,
)
from bench.end_to_end import run_loadgen
from gateway.events import Event
from gateway.storage import Attempt, NewDelivery
from gateway.storage.sqlite import CLAIM_ALL_DUE, NEXT_OF_ALL_DUE, QUEUE_STATS, SQLiteStorage

DUE_IN = 3600.0  # the backlog falls due this far ahead: the idle gateway leaves it alone
LEASE = 60.0
ROUTE, ACTION = "users", "app"
BURST = 1000  # webhooks sent to the gateway at each level, at BURST_RATE
BURST_RATE = 500
IDLE_SETTLE_S = 6.0  # the queue-stats loop runs every 2 s: let it run a few times before reading RSS
# callgrind counts a run of the fewer pairs and one of the more, each on as many probes: the difference is
# what the extra pairs cost, without the interpreter's start or the probes' ingest.
COUNTED_PAIRS = (50, 250)
COUNT_TIMEOUT_S = 600


def grow(db: Path, start: int, count: int, base: float) -> float:
    """Add `count` events with one pending delivery each, in one transaction; returns seconds taken."""
    if count <= 0:
        return 0.0
    started = time.perf_counter()
    headers = orjson.dumps(
        {"content-type": "application/json", "svix-id": "msg_backlog", "svix-timestamp": str(int(base))}
    )
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")  # building only; the gateway fsyncs what it answers
        conn.execute("BEGIN IMMEDIATE")
        last_seq = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?) "
            "INSERT INTO events (source, event_id, type, occurred_at, received_at, verified, headers, body) "
            "SELECT ?, 'msg_backlog_' || i, 'user.created', NULL, ? + i * 0.001, 1, ?, ? FROM n",
            (start, start + count, SOURCE, base, headers, body_1kb()),
        )
        conn.execute(
            "INSERT INTO deliveries (event_seq, route, action, state, attempts, due_at, pending_since, created_at) "
            "SELECT seq, ?, ?, 'pending', 0, received_at, received_at, received_at FROM events WHERE seq > ?",
            (ROUTE, ACTION, last_seq),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    built = time.perf_counter() - started
    # Written without fsync, the build would otherwise still be going to disk while claims are timed: the
    # kernel's writeback of a 1.5 GB file is not what a claim costs.
    os.sync()
    return built


def walks_the_due_index(plan: str) -> bool:
    """The claim's plan seeks deliveries_due, in due order: no scan of the deliveries table and no sort.
    (Once a lease may have lapsed, the claim also scans json_each of the ids the engine runs itself.)"""
    return "deliveries_due" in plan and "SCAN deliveries" not in plan and "TEMP B-TREE" not in plan


def query_plans(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        plans = {}
        for name, sql, params in (
            # The statements the gateway runs (from gateway/storage/sqlite.py) while its leases hold.
            ("claim", CLAIM_ALL_DUE, (0.0, 1)),
            ("next_due_at", NEXT_OF_ALL_DUE, ()),
            ("queue_stats", QUEUE_STATS, (0.0,)),
        ):
            rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
            plans[name] = "; ".join(str(row[-1]) for row in rows)
        return plans
    finally:
        conn.close()


async def ingest_probes(storage: SQLiteStorage, count: int, tag: str) -> None:
    """`count` probe events through the storage API, each with one delivery due an hour ago."""
    now = time.time()
    body = body_1kb()
    payload = orjson.loads(body)
    probes = [
        Event(
            source=SOURCE,
            id=f"msg_probe_{tag}_{i}",
            type="user.created",
            received_at=now - DUE_IN + i * 0.001,
            body=body,
            payload=payload,
            headers={"content-type": "application/json"},
        )
        for i in range(count)
    ]
    await asyncio.gather(*(storage.ingest(event, [NewDelivery(ROUTE, ACTION)]) for event in probes))


async def claim_and_finish(storage: SQLiteStorage, claim_now: float) -> None:
    """One pair: claim the oldest due delivery, which must be a probe, and finish it delivered."""
    claimed = await storage.claim(claim_now, 1, LEASE, "bench")
    if not claimed or not claimed[0].event.id.startswith("msg_probe_"):
        raise RuntimeError(f"claim returned {claimed!r}, not the oldest probe")
    delivery = claimed[0].delivery
    attempt = Attempt(delivery.attempts, time.time(), 0.001, "delivered", 200)
    await storage.finish(delivery, attempt, "delivered", None, time.time())


async def time_claims(db: Path, pairs: int, level: int, backlog_base: float) -> Json:
    """Ingest `pairs` probe events through the storage API, then claim + finish them one by one."""
    storage = SQLiteStorage(db)
    await storage.open()
    try:
        await ingest_probes(storage, pairs, str(level))
        claim_now = backlog_base + 2 * DUE_IN  # every queued delivery is due
        claims_ms, finishes_ms, pair_cpu_us = [], [], []
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        for _ in range(pairs):
            thread_cpu = time.thread_time()
            t0 = time.perf_counter()
            claimed = await storage.claim(claim_now, 1, LEASE, "bench")
            t1 = time.perf_counter()
            if not claimed or not claimed[0].event.id.startswith("msg_probe_"):
                raise RuntimeError(f"claim returned {claimed!r}, not the oldest probe")
            delivery = claimed[0].delivery
            attempt = Attempt(delivery.attempts, time.time(), 0.001, "delivered", 200)
            await storage.finish(delivery, attempt, "delivered", None, time.time())
            t2 = time.perf_counter()
            pair_cpu_us.append((time.thread_time() - thread_cpu) * 1e6)
            claims_ms.append((t1 - t0) * 1000)
            finishes_ms.append((t2 - t1) * 1000)
        cpu = time.process_time() - cpu_started
        wall = time.perf_counter() - wall_started

        stats_ms, next_due_ms = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            await storage.queue_stats(time.time())
            t1 = time.perf_counter()
            await storage.next_due_at()
            t2 = time.perf_counter()
            stats_ms.append((t1 - t0) * 1000)
            next_due_ms.append((t2 - t1) * 1000)

        backlog_claim_ok = None
        if level:
            # The bulk-inserted rows are what ingest() writes: one of them claims and parses like any other.
            claimed = await storage.claim(claim_now, 1, LEASE, "bench")
            backlog_claim_ok = bool(claimed) and claimed[0].event.id.startswith("msg_backlog_")
            if claimed:
                await storage.release([claimed[0].delivery.id], backlog_base, "bench")
    finally:
        await storage.close()
    pair_ms = [c + f for c, f in zip(claims_ms, finishes_ms, strict=True)]
    return {
        "pairs": pairs,
        "claim_ms_median": statistics.median(claims_ms),
        "finish_ms_median": statistics.median(finishes_ms),
        "pair_ms_median": statistics.median(pair_ms),
        "pair_ms_p90": percentile(pair_ms, 90),
        # The claim's own cost: what the pair's statements took on their thread, its median (a checkpoint's
        # copy on a helper thread, or the scheduler, lands on some pairs and not others).
        "pair_cpu_us": statistics.median(pair_cpu_us),
        "pair_process_cpu_us": cpu / pairs * 1e6,
        "pairs_per_s": pairs / wall,
        "queue_stats_ms": statistics.median(stats_ms),
        "next_due_at_ms": statistics.median(next_due_ms),
        "backlog_row_claimable": backlog_claim_ok,
    }


async def run_pairs(db: Path, probes: int, pairs: int, claim_now: float, tag: str) -> None:
    """What callgrind counts: `probes` probes ingested, then `pairs` claim + finish pairs."""
    storage = SQLiteStorage(db)
    await storage.open()
    try:
        await ingest_probes(storage, probes, tag)
        for _ in range(pairs):
            await claim_and_finish(storage, claim_now)
    finally:
        await storage.close()


def count_pair_instructions(settings: Settings, db: Path, level: int, backlog_base: float) -> float:
    """callgrind's instructions per claim + finish pair at this level: a deterministic figure, where CPU
    seconds move with what the rest of the host does between one level and the next."""
    claim_now = backlog_base + 2 * DUE_IN
    counts = []
    for pairs in COUNTED_PAIRS:  # one after the other: both claim from the same database
        out = settings.work / f"callgrind-scale-{level}-{pairs}.out"
        argv = [PYTHON, "-m", "bench.scale", "--db", str(db), "--probes", str(COUNTED_PAIRS[-1])]
        argv += ["--pairs", str(pairs), "--claim-now", repr(claim_now), "--tag", f"{level}c{pairs}"]
        done = subprocess.run(
            under_callgrind(settings, argv, out),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **COUNTED_ENV},
            capture_output=True,
            text=True,
            timeout=COUNT_TIMEOUT_S,
            check=False,
            preexec_fn=die_with_parent,
        )
        out.unlink(missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"the counted claims failed ({done.returncode}): {done.stderr[-1500:]}")
        counts.append(instructions_counted(done.stderr))
    # The probes left queued (as many as the first run did not claim) are claimed here, uncounted, so the
    # next level's gateway finds nothing due.
    asyncio.run(run_pairs(db, 0, COUNTED_PAIRS[-1] - COUNTED_PAIRS[0], claim_now, ""))
    return (counts[1] - counts[0]) / (COUNTED_PAIRS[1] - COUNTED_PAIRS[0])


def idle_gateway(settings: Settings, processes: Processes, db: Path, level: int) -> Json:
    sink = start_sink(processes, name=f"sink-scale-{level}")
    config, ports = gateway_config(settings.work, db, sink.url)
    started = time.monotonic()
    gateway = start_gateway(processes, f"scale-{level}", config, ports)
    ready_s = time.monotonic() - started
    try:
        time.sleep(IDLE_SETTLE_S)
        idle = rss_mb(gateway.pid)
        scrape = Scrape.fetch(f"{ports.ops_url}/metrics")
        queued = scrape.get("hookyard_delivery_queue")
        sent = run_loadgen(settings, processes, ports.url, BURST_RATE, BURST / BURST_RATE, f"scale{level}")
        delivered = wait_for(lambda: sink.count() >= sent["accepted"], timeout=30)
        after_burst = rss_mb(gateway.pid)
    finally:
        processes.stop(gateway)
        if sink.process is not None:
            processes.stop(sink.process)
    return {
        "ready_s": ready_s,
        "rss_idle_mb": idle,
        "rss_after_burst_mb": after_burst,
        "queue_gauge": queued,
        "burst_accepted": sent["accepted"],
        "burst_delivered": delivered,
        "burst_ingest_p99_ms": sent["latency_ms"]["p99"],
    }


def run(settings: Settings, processes: Processes) -> Json:
    db = settings.work / "scale.db"
    asyncio.run(create_database(db))
    backlog_base = time.time() + DUE_IN
    rows: list[Json] = []
    queued = 0
    for level in sorted(settings.levels):
        build_s = grow(db, queued, level - queued, backlog_base)
        queued = level
        say(f"   {level} queued deliveries (built in {build_s:.1f}s, {db.stat().st_size / 1e6:.0f} MB) ...")
        row: Json = {"queued": level, "build_s": build_s, "db_mb": db.stat().st_size / 1e6}
        row.update(idle_gateway(settings, processes, db, level))
        row.update(asyncio.run(time_claims(db, settings.pairs, level, backlog_base)))
        if settings.tools["valgrind"].present:
            row["pair_instructions"] = count_pair_instructions(settings, db, level, backlog_base)
        rows.append(row)
        instructions = f", {row['pair_instructions']:,.0f} instructions" if "pair_instructions" in row else ""
        say(
            f"     claim+finish {row['pair_ms_median']:.2f} ms median, {row['pair_cpu_us']:.0f} µs CPU "
            f"(process {row['pair_process_cpu_us']:.0f}){instructions}; "
            f"RSS idle {row['rss_idle_mb']:.1f} MB; queue_stats {row['queue_stats_ms']:.1f} ms"
        )
    plans = query_plans(db)
    first, last = rows[0], rows[-1]
    # Against the smallest backlog, the worst of every larger one: a bump at a level in between counts.
    claim_ratio = max(row["pair_cpu_us"] for row in rows) / first["pair_cpu_us"]
    # Instructions, where callgrind counted them: the CPU seconds of levels measured minutes apart move with
    # the host (the smallest level's median CPU per pair read 336 and 788 µs in two runs of one tree).
    counted = all("pair_instructions" in row for row in rows)
    instruction_ratio = (
        max(row["pair_instructions"] for row in rows) / first["pair_instructions"] if counted else None
    )
    wall_ratio = max(row["pair_ms_median"] for row in rows) / first["pair_ms_median"]
    rss_change = max((row["rss_idle_mb"] / first["rss_idle_mb"] - 1 for row in rows), key=abs)
    indexed = walks_the_due_index(plans["claim"])
    verdict = {
        "claim_cpu_ratio": claim_ratio,
        "claim_instruction_ratio": instruction_ratio,
        "claim_wall_ratio": wall_ratio,
        "claim_indexed": indexed,
        # Flat: an index seek (no scan) and at most 1.5x the per-pair cost at the largest backlog: its
        # instructions where counted, else its CPU.
        "claim_flat": indexed
        and (instruction_ratio if instruction_ratio is not None else claim_ratio) <= 1.5
        and wall_ratio <= 1.5,
        "rss_change": rss_change,
        "rss_flat": abs(rss_change) <= 0.10,
        "queue_stats_ratio": last["queue_stats_ms"] / max(first["queue_stats_ms"], 1e-6),
    }
    say()
    say(render(rows))
    say(
        f"\n   claim cost: {'FLAT' if verdict['claim_flat'] else 'NOT flat'} "
        f"({'' if instruction_ratio is None else f'instructions x{instruction_ratio:.2f}, '}"
        f"CPU x{claim_ratio:.2f}, wall x{wall_ratio:.2f} at most, against {first['queued']}; "
        f"plan: {plans['claim']})"
    )
    say(f"   RSS idle: {'FLAT' if verdict['rss_flat'] else 'NOT flat'} ({rss_change:+.1%}, limit ±10 %)")
    say(
        f"   queue_stats (every 2 s in the gateway): x{verdict['queue_stats_ratio']:.0f}; plan: {plans['queue_stats']}"
    )
    return {"levels": rows, "plans": plans, "verdict": verdict, "pairs": settings.pairs}


async def create_database(db: Path) -> None:
    """An empty database with the gateway's own schema."""
    if db.exists():
        db.unlink()
    storage = SQLiteStorage(db)
    await storage.open()
    await storage.close()


def render(rows: list[Json]) -> str:
    headers = ["queued", "claim+finish ms", "claim ms", "CPU µs/pair", "process CPU µs/pair"]
    headers += ["queue_stats ms", "next_due ms", "RSS idle MB", "RSS burst MB", "ready s"]
    return table(
        headers,
        [
            [
                f"{row['queued']:,}",
                f"{row['pair_ms_median']:.2f}",
                f"{row['claim_ms_median']:.2f}",
                f"{row['pair_cpu_us']:.0f}",
                f"{row['pair_process_cpu_us']:.0f}",
                f"{row['queue_stats_ms']:.1f}",
                f"{row['next_due_at_ms']:.2f}",
                f"{row['rss_idle_mb']:.1f}",
                f"{row['rss_after_burst_mb']:.1f}",
                f"{row['ready_s']:.1f}",
            ]
            for row in rows
        ],
        "r" * 10,
    )


def main() -> None:
    """`python -m bench.scale`: the claims that count_pair_instructions runs under callgrind."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--probes", type=int, required=True)
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--claim-now", type=float, required=True)
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    asyncio.run(run_pairs(args.db, args.probes, args.pairs, args.claim_now, args.tag))


if __name__ == "__main__":
    main()
