"""Part 2, end to end: webhooks in at a fixed offered rate, deliveries out to the lean sink.

For each offered rate, the open-loop generator (bench/loadgen.py) sends signed webhooks for a bounded time;
each event id carries its due send time, and the sink records when the delivery arrived. Delivered ev/s is
the number delivered divided by the time from the first due send to the last arrival: a gateway that keeps
up delivers at the offered rate, one that falls behind finishes later. A rate is sustained when every
accepted event was delivered and the delivered rate is at least 97% of the offered one (the time to the
last arrival includes that event's own latency). Latency is arrival minus due time.
hookyard_delivery_lag_seconds (the gateway refreshes it every 2 s) is scraped twice a second.

Then the backlog: the sink is stopped, N events are sent, the sink starts again on the same port, and the
drain rate is the intervals between arrivals (one fewer than the events delivered) over the time from the
first arrival at the sink to the last (so the sink's own start-up is left out). The gateway retries failed
deliveries every 500 ms here (the benchmark's config), so the whole backlog is due again when the sink
returns and the drain measures the delivery engine, not the retry schedule.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bench.common import (
    PYTHON,
    GatewayPorts,
    Json,
    Processes,
    Sampler,
    Scrape,
    Settings,
    SinkHandle,
    cpu_seconds,
    gateway_config,
    machine_busy_seconds,
    machine_steal_seconds,
    percentile,
    rss_mb,
    say,
    start_gateway,
    start_sink,
    table,
    wait_for,
)
from bench.loadgen import event_due_time

RETRY_EVERY = "500ms"
RETRY_ATTEMPTS = 120  # a minute of retries: longer than any outage here
# A rate is sustained at this share of it: the time to the last arrival includes that event's latency.
SUSTAINED_SHARE = 0.97


@dataclass
class Rig:
    gateway: subprocess.Popen[bytes]
    ports: GatewayPorts
    sink: SinkHandle


def start_rig(settings: Settings, processes: Processes, name: str = "e2e") -> Rig:
    sink = start_sink(processes, name=f"sink-{name}")
    config, ports = gateway_config(
        settings.work, settings.work / f"{name}.db", sink.url, retry=[RETRY_EVERY] * RETRY_ATTEMPTS
    )
    gateway = start_gateway(processes, name, config, ports)
    return Rig(gateway, ports, sink)


def run_loadgen(
    settings: Settings, processes: Processes, url: str, rate: float, duration: float, tag: str
) -> Json:
    """The open-loop generator in its own process, so it never competes with the samplers here."""
    out = settings.work / f"loadgen-{tag}.json"
    argv = [PYTHON, "-m", "bench.loadgen", "--url", url, "--rate", str(rate), "--duration", str(duration)]
    argv += ["--tag", tag, "--out", str(out), "--drain-timeout", "15"]
    process = processes.start(f"loadgen-{tag}", argv)
    try:
        status = process.wait(duration + 60)
    finally:
        processes.kill(process)
    if status != 0:
        raise RuntimeError(f"loadgen failed ({status}):\n{processes.log_tail(f'loadgen-{tag}')}")
    result: Json = json.loads(out.read_text())
    return result


@contextmanager
def watch(rig: Rig) -> Iterator[tuple[Sampler, Sampler]]:
    """RSS of the gateway and its delivery lag gauge, sampled while a phase runs."""
    pid = rig.gateway.pid
    metrics = f"{rig.ports.ops_url}/metrics"
    with (
        Sampler(lambda: rss_mb(pid), 0.25) as rss,
        Sampler(lambda: Scrape.fetch(metrics).get("hookyard_delivery_lag_seconds"), 0.5) as lag,
    ):
        yield rss, lag


def latencies(records: dict[str, float]) -> list[float]:
    """End-to-end milliseconds: arrival at the sink minus the send time carried in the event id."""
    return [(arrived - event_due_time(event_id)) * 1000 for event_id, arrived in records.items()]


def offered_rate(settings: Settings, processes: Processes, rig: Rig, rate: int) -> Json:
    tag = f"r{rate}"
    rig.sink.reset()
    metrics = f"{rig.ports.ops_url}/metrics"
    before = Scrape.fetch(metrics)
    cpu_before = cpu_seconds(rig.gateway.pid)
    machine_before, steal_before, started = machine_busy_seconds(), machine_steal_seconds(), time.monotonic()
    with watch(rig) as (rss, lag):
        sent = run_loadgen(settings, processes, rig.ports.url, rate, settings.e2e_duration, tag)
        accepted = sent["accepted"]
        # Bounded wait for the deliveries still under way when the load stopped.
        settled = wait_for(lambda: rig.sink.count() >= accepted, timeout=max(15.0, settings.e2e_duration))
    cpu = cpu_seconds(rig.gateway.pid) - cpu_before
    elapsed = time.monotonic() - started
    machine_cores = (machine_busy_seconds() - machine_before) / elapsed
    steal_cores = (machine_steal_seconds() - steal_before) / elapsed
    after = Scrape.fetch(metrics)
    stats = rig.sink.stats()
    records = rig.sink.records()
    mine = {event_id: t for event_id, t in records.items() if event_id.startswith(f"{tag}-")}
    e2e = latencies(mine)
    last = max(mine.values(), default=sent["start"])
    delivered = len(mine)
    in_window = sum(1 for t in mine.values() if t <= sent["start"] + settings.e2e_duration)
    e2e_count = after.get("hookyard_end_to_end_seconds_count") - before.get(
        "hookyard_end_to_end_seconds_count"
    )
    e2e_sum = after.get("hookyard_end_to_end_seconds_sum") - before.get("hookyard_end_to_end_seconds_sum")
    delivered_rate = delivered / (last - sent["start"]) if last > sent["start"] else 0.0
    return {
        "offered_ev_s": rate,
        "duration_s": settings.e2e_duration,
        "sent": sent["answered"],
        "send_rate": sent["send_rate"],
        "accepted": accepted,
        "statuses": sent["statuses"],
        "unanswered": sent["unanswered"],
        "ingest_p50_ms": sent["latency_ms"]["p50"],
        "ingest_p99_ms": sent["latency_ms"]["p99"],
        "delivered": delivered,
        "all_delivered": settled and delivered >= accepted,
        "redeliveries": stats["duplicates"],
        "delivered_ev_s": delivered_rate,
        "delivered_in_window_ev_s": in_window / settings.e2e_duration,
        "finished_after_load_s": max(0.0, last - sent["schedule_end"]),
        "e2e_p50_ms": percentile(e2e, 50),
        "e2e_p99_ms": percentile(e2e, 99),
        "e2e_max_ms": max(e2e, default=0.0),
        "gateway_e2e_mean_ms": e2e_sum / e2e_count * 1000 if e2e_count else 0.0,
        "lag_max_s": lag.max(),
        "lag_mean_s": lag.mean(),
        "rss_max_mb": rss.max(),
        "cpu_us_per_event": cpu / max(1, delivered) * 1e6,
        "cpu_cores": cpu / max(1e-9, last - sent["start"]),
        # Everything on the machine (gateway, sink, load generator) over the phase, and the cores the
        # hypervisor took away from it meanwhile.
        "machine_busy_cores": machine_cores,
        "machine_steal_cores": steal_cores,
        "sustained": bool(settled and delivered >= accepted and delivered_rate >= SUSTAINED_SHARE * rate),
    }


def backlog_drain(settings: Settings, rig: Rig, processes: Processes) -> Json:
    """Sink down, N events in, sink up: how fast does the backlog drain?"""
    tag = "backlog"
    metrics = f"{rig.ports.ops_url}/metrics"
    assert rig.sink.process is not None
    port = rig.sink.port
    processes.stop(rig.sink.process)
    before = Scrape.fetch(metrics)
    duration = settings.backlog / settings.backlog_rate
    with watch(rig) as (rss, lag):
        sent = run_loadgen(settings, processes, rig.ports.url, settings.backlog_rate, duration, tag)
        time.sleep(1.0)
        down = Scrape.fetch(metrics)
        queue = {
            state: down.get("hookyard_delivery_queue", state=state)
            for state in ("due", "scheduled", "in_flight", "waiting")
        }
        restarted = time.time()  # the sink accepts connections a little later, when its process is up
        rig.sink = start_sink(processes, port, name="sink-e2e-restarted")
        accepted = sent["accepted"]
        settled = wait_for(lambda: rig.sink.count() >= accepted, timeout=max(60.0, accepted / 200))
    records = rig.sink.records()
    arrivals = sorted(t for event_id, t in records.items() if event_id.startswith(f"{tag}-"))
    drained = len(arrivals)
    # From the first delivery the sink took to the last: the engine's pace, not the sink's start-up.
    span = (arrivals[-1] - arrivals[0]) if arrivals else 0.0
    return {
        "events": settings.backlog,
        "send_rate": settings.backlog_rate,
        "accepted": accepted,
        "ingest_p99_ms_while_down": sent["latency_ms"]["p99"],
        "failed_attempts_while_down": down.get("hookyard_deliveries_total", outcome="retried")
        - before.get("hookyard_deliveries_total", outcome="retried"),
        "queue_when_sink_returned": queue,
        "drained": drained,
        "all_drained": settled and drained >= accepted,
        "first_delivery_after_s": (arrivals[0] - restarted) if arrivals else 0.0,
        "drain_s": span,
        "drain_ev_s": (drained - 1) / span if span > 0 else 0.0,
        "drained_after_s": (arrivals[-1] - restarted) if arrivals else 0.0,
        "lag_max_s": lag.max(),
        "rss_max_mb": rss.max(),
    }


def run(settings: Settings, processes: Processes) -> Json:
    rig = start_rig(settings, processes)
    try:
        rows = []
        for rate in settings.rates:
            say(f"   {rate} ev/s offered for {settings.e2e_duration:g}s ...")
            row = offered_rate(settings, processes, rig, rate)
            rows.append(row)
            say(
                f"     delivered {row['delivered_ev_s']:.0f} ev/s, e2e p50 {row['e2e_p50_ms']:.1f} ms "
                f"p99 {row['e2e_p99_ms']:.1f} ms, lag max {row['lag_max_s']:.2f} s, RSS {row['rss_max_mb']:.1f} MB; "
                f"gateway {row['cpu_cores']:.2f} cores, machine {row['machine_busy_cores']:.2f} busy, "
                f"{row['machine_steal_cores']:.2f} stolen"
            )
        say(f"   backlog: sink down, {settings.backlog} events at {settings.backlog_rate} ev/s, sink up ...")
        drain = backlog_drain(settings, rig, processes)
        say(
            f"     drained {drain['drained']} events in {drain['drain_s']:.1f}s: {drain['drain_ev_s']:.0f} ev/s "
            f"(first delivery {drain['first_delivery_after_s'] * 1000:.0f} ms after the sink was started)"
        )
    finally:
        processes.stop(rig.gateway)
        if rig.sink.process is not None:
            processes.stop(rig.sink.process)
    say()
    say(render(rows))
    return {
        "duration_s": settings.e2e_duration,
        "retry_schedule": f"{RETRY_EVERY} x {RETRY_ATTEMPTS}, no jitter",
        "rates": rows,
        "backlog": drain,
    }


def render(rows: list[Json]) -> str:
    headers = ["offered ev/s", "delivered ev/s", "e2e p50 ms", "e2e p99 ms", "ingest p99 ms", "lag max s"]
    headers += ["RSS MB", "sustained"]
    return table(
        headers,
        [
            [
                row["offered_ev_s"],
                f"{row['delivered_ev_s']:.0f}",
                f"{row['e2e_p50_ms']:.1f}",
                f"{row['e2e_p99_ms']:.1f}",
                f"{row['ingest_p99_ms']:.1f}",
                f"{row['lag_max_s']:.2f}",
                f"{row['rss_max_mb']:.1f}",
                "yes" if row["sustained"] else "no",
            ]
            for row in rows
        ],
        "r" * 8,
    )
