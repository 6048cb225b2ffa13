"""Scenario 1: SIGKILL under load. 10,000 signed events from concurrent clients that retry like providers;
the `hookyard serve` child is killed three times at random moments (during ingest, again during ingest so
that a group commit is in progress, and during delivery) and restarted on the same ports and database.
Every event answered 2xx must reach the downstream at least once."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import (
    Child,
    Load,
    RestartableDownstream,
    child_gateway,
    delivered_keys,
    read_db,
    record,
    signed_events,
)
from tests.support import Downstream, gateway_config, metric_value, wait_until

EVENTS = 10_000
CLIENT_THREADS = 24
PATH = "/webhooks/consignease"


def _kill(
    child: Child, moment: str, load: Load, downstream: Downstream, rng: random.Random
) -> dict[str, Any]:
    """Scrape what the gateway is doing, wait a random few milliseconds more, SIGKILL it, start it again."""
    metrics = child.metrics()
    time.sleep(rng.uniform(0.0, 0.2))
    at = time.monotonic() - load.started_at
    answered, done = load.answered, load.done
    delivered = len(set(delivered_keys(downstream)))
    child.process.kill()
    down_at = time.monotonic()
    child.process.start()
    return {
        "moment": moment,
        "at_s": round(at, 2),
        "requests_finished_before": done,
        "answered_2xx_before": answered,
        "delivered_before": delivered,
        "commits_before": int(metric_value(metrics, "hookyard_storage_batch_size_count")),
        "mean_batch_before": round(
            metric_value(metrics, "hookyard_storage_batch_size_sum")
            / max(1.0, metric_value(metrics, "hookyard_storage_batch_size_count")),
            2,
        ),
        "restart_s": round(time.monotonic() - down_at, 2),
    }


@pytest.mark.slow
def test_three_sigkills_under_load_lose_no_answered_event(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    started = time.monotonic()
    with RestartableDownstream() as server:
        downstream = server.app
        # Deliveries are slower than ingest, so a backlog is left for the kill during delivery.
        downstream.delay = 0.05
        config = gateway_config(
            tmp_path,
            downstream.url,
            # A lease far longer than the test: only the restart's lease release brings deliveries back.
            delivery={"concurrency": 16, "lease": "10m", "poll_interval": "200ms"},
            routes=[
                {
                    "name": "users",
                    "source": "consignease",
                    "actions": [{"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}}],
                }
            ],
        )
        child = child_gateway(tmp_path, config)
        events = signed_events(EVENTS, "msg_kill")
        by_id = {event.id: event for event in events}
        load = Load(child.url + PATH, events, CLIENT_THREADS, seed)
        kills: list[dict[str, Any]] = []
        child.process.start()
        try:
            load.start()
            # Kills 1 and 2 land while every client thread is sending: group commits are in progress.
            for moment, share in (
                ("ingest", rng.uniform(0.10, 0.30)),
                ("ingest, group commit in progress", rng.uniform(0.45, 0.70)),
            ):
                target = int(share * EVENTS)
                wait_until(lambda target=target: load.done >= target, 180, 0.005)
                kills.append(_kill(child, moment, load, downstream, rng))
            load.join(300)
            ingest_s = (load.finished_at or time.monotonic()) - load.started_at
            answered = {event.id for event in events if event.answered_2xx}

            # Kill 3: once the clients are done, somewhere in the middle of the delivery backlog.
            delivered_then = len(set(delivered_keys(downstream)) & answered)
            target = delivered_then + int(rng.uniform(0.2, 0.6) * (len(answered) - delivered_then))
            wait_until(lambda: len(set(delivered_keys(downstream)) & answered) >= target, 180, 0.01)
            kills.append(_kill(child, "delivery", load, downstream, rng))
            backlog_at_kill = len(answered) - kills[-1]["delivered_before"]

            wait_until(lambda: set(delivered_keys(downstream)) >= answered, 300, 0.2)
            drained_s = time.monotonic() - load.started_at
            assert child.process.terminate(30) == 0
        finally:
            child.process.kill()

    keys = delivered_keys(downstream, "/app")
    with downstream.lock:
        received = list(downstream.requests)
    for request in received:
        key = request.headers["idempotency-key"]
        # A duplicate is the same event again: same key, same id header, same bytes.
        assert request.headers["x-hookyard-event-id"] == key
        assert request.body == by_id[key].body, key
    copies = Counter(keys)
    stored = {row[0] for row in read_db(child.db_path, "SELECT event_id FROM events")}
    states = dict(read_db(child.db_path, "SELECT state, count(*) FROM deliveries GROUP BY state"))
    unanswered = [event for event in events if not event.answered_2xx]
    lost = sorted(answered - set(copies))
    figures = {
        "seed": seed,
        "events_sent": EVENTS,
        "client_threads": CLIENT_THREADS,
        "answered_2xx": len(answered),
        "answered_accepted": sum(event.outcome == "accepted" for event in events),
        "answered_duplicate": sum(event.outcome == "duplicate" for event in events),
        "never_answered_2xx": len(unanswered),
        "client_retries": sum(event.attempts - 1 for event in events),
        "client_errors": dict(sum((Counter(event.errors) for event in events), Counter())),
        "delivered": len(answered & set(copies)),
        "delivery_requests": len(keys),
        "duplicated": len(keys) - len(copies),
        "lost": len(lost),
        "delivered_without_2xx": len(set(copies) - answered),
        "stored_events": len(stored),
        "delivery_states": states,
        "kills": kills,
        "backlog_at_delivery_kill": backlog_at_kill,
        "ingest_s": round(ingest_s, 1),
        "all_delivered_after_s": round(drained_s, 1),
        "test_s": round(time.monotonic() - started, 1),
    }
    record("kill", figures, tmp_path)

    assert not lost, f"{len(lost)} events answered 2xx were never delivered, e.g. {lost[:5]}"
    # Everything answered 2xx was durably stored, exactly once, and every delivery is final and delivered.
    assert answered <= stored
    assert states == {"delivered": len(stored)}
    # The clients' retries ride out the restarts: every event ends up answered.
    assert not unanswered, [(e.id, e.status, e.errors) for e in unanswered[:5]]
    assert backlog_at_kill > 0, "the third kill must interrupt delivery for the test to mean anything"
    assert all(kill["requests_finished_before"] < EVENTS for kill in kills[:2])
