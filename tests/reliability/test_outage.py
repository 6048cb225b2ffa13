"""Scenario 2: the downstream app goes away. It answers 503, then refuses connections, for a compressed
"10 minutes" (a few seconds, with a retry schedule compressed about a hundredfold). Webhooks keep being
accepted; after recovery every event is delivered, none dead, in the order their retries fall due; the
delivery gauges show the outage and settle afterwards."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import parse_duration
from tests.reliability.harness import (
    Child,
    RestartableDownstream,
    child_gateway,
    delivered_keys,
    read_db,
    record,
    sampler,
)
from tests.support import gateway_config, metric_value, svix_request, wait_until

# 5 s, 30 s, 2 min, 10 min, 1 h (the default), compressed; long enough to outlast the outage.
SCHEDULE = ["200ms", "500ms", "1s", "2s", "4s", "4s", "4s", "4s"]
OUTAGE_503_S = 2.5
OUTAGE_REFUSED_S = 3.0
SEND_INTERVAL_S = 0.1
PATH = "/webhooks/consignease"


class Sender:
    """One signed event every `interval` seconds until stopped (bounded in count); records every answer."""

    def __init__(self, url: str, interval: float, limit: int = 500) -> None:
        self.url = url
        self.interval = interval
        self.limit = limit
        self.answers: list[tuple[float, str, int, str]] = []  # (wall time, id, status, status/error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            for index in range(self.limit):
                if self._stop.is_set():
                    return
                msg_id = f"msg_outage_{index:04}"
                body, headers = svix_request(data={"id": msg_id}, msg_id=msg_id)
                response = client.post(self.url, content=body, headers=headers)
                answer = response.json().get("status") or response.json().get("error")
                self.answers.append((time.time(), msg_id, response.status_code, answer))
                self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _gauges(child: Child, client: httpx.Client) -> dict[str, float]:
    text = child.metrics(client)
    return {
        "lag": metric_value(text, "hookyard_delivery_lag_seconds"),
        "oldest_pending": metric_value(text, "hookyard_delivery_oldest_pending_seconds"),
        **{
            state: metric_value(text, "hookyard_delivery_queue", state=state)
            for state in ("due", "scheduled", "in_flight")
        },
    }


def _attempts_with_due_times(db: Path) -> list[dict[str, Any]]:
    """Every attempt, in the order it started, with the time it was due: the delivery's creation for the
    first attempt, and for a retry the end of the previous attempt plus the schedule's delay (jitter 0)."""
    rows = read_db(
        db,
        "SELECT a.delivery_id, a.number, a.started_at, a.duration, a.outcome, d.created_at, e.event_id "
        "FROM attempts a JOIN deliveries d ON d.id = a.delivery_id JOIN events e ON e.seq = d.event_seq "
        "ORDER BY a.started_at",
    )
    delays = [parse_duration(delay) for delay in SCHEDULE]
    previous_end: dict[int, float] = {}
    attempts = []
    for delivery_id, number, started_at, duration, outcome, created_at, event_id in rows:
        due = created_at if number == 1 else previous_end[delivery_id] + delays[number - 2]
        previous_end[delivery_id] = started_at + duration
        attempts.append(
            {"event": event_id, "number": number, "started": started_at, "due": due, "outcome": outcome}
        )
    return attempts


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs the outage once for the tests below; returns what they check."""
    tmp_path = tmp_path_factory.mktemp("outage")
    started = time.monotonic()
    server = RestartableDownstream()
    downstream = server.app
    config = gateway_config(
        tmp_path,
        downstream.url,
        defaults={"retry": {"schedule": SCHEDULE, "jitter": 0}, "timeout": "2s"},
        # One worker: the order of attempts is exactly the order in which the engine claims them.
        delivery={"concurrency": 1, "lease": "30s", "poll_interval": "200ms"},
        routes=[
            {
                "name": "users",
                "source": "consignease",
                "actions": [{"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}}],
            }
        ],
    )
    child = child_gateway(tmp_path, config)
    server.start()
    child.process.start()
    timeline: dict[str, float] = {}
    try:
        with (
            httpx.Client(timeout=5) as scraper,
            sampler(lambda: _gauges(child, scraper), 0.25) as gauges,
            Sender(child.url + PATH, SEND_INTERVAL_S) as sender,
        ):
            wait_until(lambda: len(delivered_keys(downstream)) >= 5, 10)
            timeline["outage_503"] = time.time()
            downstream.default = 503
            time.sleep(OUTAGE_503_S)
            timeline["outage_refused"] = time.time()
            server.stop()
            time.sleep(OUTAGE_REFUSED_S)
            downstream.default = 200
            server.start()
            timeline["recovered"] = time.time()
            time.sleep(1.0)  # events keep arriving while the backlog drains
            sender.stop()
            accepted = {msg_id for _, msg_id, status, _ in sender.answers if status == 200}
            wait_until(lambda: set(delivered_keys(downstream)) >= accepted, 30, 0.1)
            timeline["all_delivered"] = time.time()
            # The gauges are refreshed every 2 s: give them a few rounds to settle.
            wait_until(lambda: _gauges(child, scraper)["scheduled"] == 0, 10, 0.25)
            time.sleep(4.5)
            timeline["settled"] = time.time()
        assert child.process.terminate(30) == 0
    finally:
        child.process.kill()
        server.stop()

    offset = time.monotonic() - time.time()  # sampler times are monotonic; the timeline is wall time
    # The gauges lag the queue by up to one 2 s refresh.
    during = [v for at, v in gauges if timeline["outage_503"] + 2.5 <= at - offset <= timeline["recovered"]]
    after = [v for at, v in gauges if at - offset >= timeline["settled"] - 2.5]
    attempts = _attempts_with_due_times(child.db_path)
    states = dict(read_db(child.db_path, "SELECT state, count(*) FROM deliveries GROUP BY state"))
    outage_answers = [a for a in sender.answers if timeline["outage_503"] <= a[0] <= timeline["recovered"]]
    figures = {
        "retry_schedule": SCHEDULE,
        "outage_503_s": round(timeline["outage_refused"] - timeline["outage_503"], 2),
        "outage_refused_s": round(timeline["recovered"] - timeline["outage_refused"], 2),
        "events_sent": len(sender.answers),
        "events_sent_during_outage": len(outage_answers),
        "answered_2xx": len(accepted),
        "delivered": len(set(delivered_keys(downstream)) & accepted),
        "failed_attempts": sum(a["outcome"] != "delivered" for a in attempts),
        "max_attempts_per_delivery": max(a["number"] for a in attempts),
        "delivery_states": states,
        "recovery_to_all_delivered_s": round(timeline["all_delivered"] - timeline["recovered"], 2),
        "max_lag_during_outage_s": max((g["lag"] for g in during), default=None),
        "max_oldest_pending_during_outage_s": max((g["oldest_pending"] for g in during), default=None),
        "max_scheduled_during_outage": max((g["scheduled"] for g in during), default=None),
        "lag_after_s": max((g["lag"] for g in after), default=None),
        "oldest_pending_after_s": max((g["oldest_pending"] for g in after), default=None),
        "scheduled_after": max((g["scheduled"] for g in after), default=None),
        "test_s": round(time.monotonic() - started, 1),
    }
    record("outage", figures, tmp_path)
    return {
        "figures": figures,
        "answers": sender.answers,
        "outage_answers": outage_answers,
        "accepted": accepted,
        "states": states,
        "attempts": attempts,
        "recovered": timeline["recovered"],
    }


@pytest.mark.slow
def test_downstream_outage_is_ridden_out_in_schedule_order(outage: dict[str, Any]) -> None:
    figures = outage["figures"]
    # Webhooks were accepted all through the outage.
    assert [a for a in outage["answers"] if a[2] != 200] == []
    assert len(outage["outage_answers"]) >= 30
    # All delivered after recovery; none dead: the schedule outlasts the outage.
    assert outage["states"] == {"delivered": len(outage["accepted"])}
    assert figures["failed_attempts"] > 0
    # In schedule order: each attempt was due no later than the next one (one worker, oldest due first)...
    attempts = outage["attempts"]
    late = [(a, b) for a, b in itertools.pairwise(attempts) if a["due"] > b["due"] + 1e-3]
    assert not late, late[:3]
    # ... and after recovery, the first attempt is the delivery that was due first.
    after_recovery = [a for a in attempts if a["started"] >= outage["recovered"]]
    assert after_recovery[0]["due"] == min(a["due"] for a in after_recovery)
    assert after_recovery[0]["outcome"] == "delivered"
    # Which delivery that is depends on the last moments of the outage: a retry, or an event that arrived
    # after the last retry fell due (its first attempt is then the oldest due). Either way the outage's
    # retries are delivered after recovery, in the order above.
    assert any(a["number"] > 1 and a["outcome"] == "delivered" for a in after_recovery), (
        "the outage's retries are delivered after recovery"
    )
    # The gauges: retries pile up as scheduled during the outage; the queue is empty again after, lag ~0.
    assert figures["max_scheduled_during_outage"] is not None
    assert figures["max_scheduled_during_outage"] >= 10
    assert figures["scheduled_after"] == 0
    assert figures["lag_after_s"] is not None and figures["lag_after_s"] < 0.5
    assert figures["oldest_pending_after_s"] is not None and figures["oldest_pending_after_s"] < 0.5


@pytest.mark.slow
def test_oldest_pending_delivery_ages_during_the_outage(outage: dict[str, Any]) -> None:
    # Deliveries wait for their retries, not for a worker: the lag stays low, the oldest pending ages.
    figures = outage["figures"]
    assert (figures["max_oldest_pending_during_outage_s"] or 0.0) >= 1.0
    assert (figures["max_lag_during_outage_s"] or 0.0) < figures["max_oldest_pending_during_outage_s"]
