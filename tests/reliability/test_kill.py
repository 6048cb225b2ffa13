"""Scenario 1: SIGKILL under load. 10,000 signed events from concurrent clients; the `hookyard serve` child
is killed three times (at a random moment during ingest; during ingest again, while a durable group commit
is in flight; at a random moment during delivery) and restarted on the same ports and database. Every event
answered 2xx must reach the downstream at least once, and no event the gateway explicitly refused (401,
503) may reach it."""

from __future__ import annotations

import base64
import contextlib
import os
import platform
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import (
    Child,
    Load,
    RestartableDownstream,
    Sent,
    child_gateway,
    delivered_keys,
    read_db,
    record,
    signed_events,
)
from tests.support import Downstream, gateway_config, metric_value, svix_request, wait_until

EVENTS = 10_000
# Of these: signed with a wrong secret (answered 401, never retried), and sent by a sender that gives up
# after its first try (no retry after a 503 or a connection error). The rest retry as providers do.
BAD_SIGNATURE = 500
GIVE_UP = 500
CLIENT_THREADS = 24
# Below CLIENT_THREADS, so that some requests are answered 503 overloaded: a sender that gives up after a
# 503 leaves an event the gateway explicitly refused.
MAX_CONCURRENT_REQUESTS = 16
PATH = "/webhooks/consignease"
WRONG_SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
# How long the kill during a group commit waits for one to be in flight before it falls back to a random
# moment (and says so in its figures).
COMMIT_WAIT_S = 5.0

# System call numbers, by machine (the kernel's syscall tables), of what a group commit does to the WAL:
# write its frames (pwrite64) and make them durable (fdatasync; fsync where SQLite has no fdatasync).
_WAL_SYSCALLS = {
    "x86_64": {1: "write", 18: "pwrite64", 74: "fsync", 75: "fdatasync"},
    "aarch64": {64: "write", 68: "pwrite64", 82: "fsync", 83: "fdatasync"},
}


def _processes(pid: int) -> list[int]:
    """pid and its children: the gateway writes the WAL, its fsync helper process syncs it."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(child) for child in (task / "children").read_text().split()]
    return [pid, *children]


def _in_commit(pid: int, syscalls: dict[int, str]) -> str | None:
    """What a thread of process pid (or of its fsync helper) is doing to a WAL file right now, from
    /proc/PID/task/*/syscall (the number of the system call a thread is blocked in, then its arguments):
    e.g. "fdatasync of the WAL". None when no thread is in one of `syscalls` on a `-wal` file."""
    found = None
    for process in _processes(pid):
        try:
            tasks = list(Path(f"/proc/{process}/task").iterdir())
        except OSError:
            continue  # the helper ended while being read
        for task in tasks:
            try:
                fields = (task / "syscall").read_text().split()
                name = syscalls.get(int(fields[0])) if fields and fields[0] not in ("running", "-1") else None
                if name is None:
                    continue
                target = os.readlink(f"/proc/{process}/fd/{int(fields[1], 16)}")
            except (OSError, ValueError, IndexError):
                continue  # the thread ended, or the descriptor closed, while being read
            if target.endswith("-wal"):
                found = f"{name} of the WAL"
                if "sync" in name:
                    return found
    return found


def _wait_for_commit(pid: int, timeout: float) -> str | None:
    """Poll the threads of pid until one is syncing (or writing) the WAL; None after timeout seconds or
    on a machine whose system call numbers are not known here."""
    syscalls = _WAL_SYSCALLS.get(platform.machine())
    if syscalls is None:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = _in_commit(pid, syscalls)
        if hit is not None:
            return hit
    return None


def _kill(
    child: Child,
    moment: str,
    load: Load,
    downstream: Downstream,
    rng: random.Random,
    *,
    in_commit: bool = False,
) -> dict[str, Any]:
    """Scrape what the gateway is doing, wait for the moment (a random few milliseconds more, or a group
    commit in flight), SIGKILL it, start it again."""
    metrics = child.metrics()
    syscalls = _WAL_SYSCALLS.get(platform.machine(), {})
    waited = time.monotonic()
    if in_commit:
        hit = _wait_for_commit(child.pid, COMMIT_WAIT_S)
        if hit is None:
            time.sleep(rng.uniform(0.0, 0.2))
            hit = (
                f"fell back to a random moment: no commit seen in flight within {COMMIT_WAIT_S:.0f} s"
                if syscalls
                else f"fell back to a random moment: system call numbers unknown on {platform.machine()}"
            )
    else:
        time.sleep(rng.uniform(0.0, 0.2))
        hit = f"random moment ({_in_commit(child.pid, syscalls) or 'no WAL write or sync in flight'})"
    waited = time.monotonic() - waited
    os.kill(child.pid, signal.SIGKILL)
    at = time.monotonic() - load.started_at
    answered, done = load.answered, load.done
    delivered = len(set(delivered_keys(downstream)))
    child.process.kill()
    down_at = time.monotonic()
    child.process.start()
    return {
        "moment": moment,
        "hit": hit,
        "waited_for_moment_s": round(waited, 3),
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


def _wait_for_requests(load: Load, count: int) -> None:
    wait_until(lambda: load.done >= count, 180, 0.005)


def _events(rng: random.Random) -> tuple[list[Sent], set[str], set[str]]:
    """EVENTS events in a random order: the ids of the badly signed ones and of those whose sender gives up
    after one try."""
    events = signed_events(EVENTS - BAD_SIGNATURE, "msg_kill")
    bad = []
    for index in range(BAD_SIGNATURE):
        msg_id = f"msg_kill_bad_{index:05}"
        body, headers = svix_request(data={"id": f"user_bad_{index}"}, msg_id=msg_id, secret=WRONG_SECRET)
        bad.append(Sent(msg_id, body, headers))
    give_up = rng.sample(events, GIVE_UP)
    for event in give_up:
        event.max_attempts = 1
    events += bad
    rng.shuffle(events)
    return events, {event.id for event in bad}, {event.id for event in give_up}


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
            limits={"max_concurrent_requests": MAX_CONCURRENT_REQUESTS},
            routes=[
                {
                    "name": "users",
                    "source": "consignease",
                    "actions": [{"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}}],
                }
            ],
        )
        child = child_gateway(tmp_path, config)
        events, bad_ids, give_up_ids = _events(rng)
        by_id = {event.id: event for event in events}
        load = Load(child.url + PATH, events, CLIENT_THREADS, seed)
        kills: list[dict[str, Any]] = []
        child.process.start()
        try:
            load.start()
            # Kills 1 and 2 land while every client thread is sending; kill 2 waits for a commit in flight.
            for moment, share, in_commit in (
                ("ingest", rng.uniform(0.10, 0.30), False),
                ("ingest, during a group commit", rng.uniform(0.45, 0.70), True),
            ):
                _wait_for_requests(load, int(share * EVENTS))
                kills.append(_kill(child, moment, load, downstream, rng, in_commit=in_commit))
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
            # Deliveries of events stored without a 2xx (their answer lost in a kill) are not waited for:
            # let them finish too, so that every delivery in the file is final.
            wait_until(
                lambda: (
                    read_db(child.db_path, "SELECT count(*) FROM deliveries WHERE state != 'delivered'")
                    == [(0,)]
                ),
                60,
                0.2,
            )
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
    lost = sorted(answered - set(copies))
    retrying = [event for event in events if event.id not in bad_ids | give_up_ids]
    # Explicitly refused: every try was answered, and never 2xx (401 invalid_signature, 503 overloaded...).
    refused = {event.id for event in events if event.refused}
    # Never answered 2xx and at least one try without an answer: the request may have reached the gateway
    # and been stored before a kill lost its answer. Such an event may be delivered; a refused one never.
    unanswered_maybe_stored = {event.id for event in events if not event.answered_2xx} - refused
    refusals = Counter(
        f"{status} {reason}" for event in events if event.refused for _, status, reason in event.history
    )
    figures = {
        "seed": seed,
        "events_sent": EVENTS,
        "retrying_senders": len(retrying),
        "bad_signature": len(bad_ids),
        "senders_giving_up_after_one_try": len(give_up_ids),
        "client_threads": CLIENT_THREADS,
        "max_concurrent_requests": MAX_CONCURRENT_REQUESTS,
        "answered_2xx": len(answered),
        "answered_accepted": sum(event.outcome == "accepted" for event in events),
        "answered_duplicate": sum(event.outcome == "duplicate" for event in events),
        "never_answered_2xx": EVENTS - len(answered),
        "refused": len(refused),
        "refusals": dict(refusals),
        "unanswered_maybe_stored": len(unanswered_maybe_stored),
        "client_retries": sum(event.attempts - 1 for event in events),
        "client_errors": dict(sum((Counter(event.errors) for event in events), Counter())),
        "delivered": len(answered & set(copies)),
        "delivery_requests": len(keys),
        "duplicated": len(keys) - len(copies),
        "lost": len(lost),
        "delivered_without_2xx": len(set(copies) & refused),
        "delivered_after_a_lost_answer": len(set(copies) & unanswered_maybe_stored),
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
    # Nothing the gateway refused was stored or delivered; whatever was delivered without a 2xx had a try
    # whose answer never came.
    assert not set(copies) & refused, sorted(set(copies) & refused)[:5]
    assert not stored & refused, sorted(stored & refused)[:5]
    assert set(copies) - answered <= unanswered_maybe_stored
    # A badly signed event is refused on every try that gets an answer, and never stored.
    assert all(by_id[event_id].status == 401 for event_id in bad_ids)
    assert not stored & bad_ids
    # The refusals are real, of both kinds, so the checks above are not vacuous.
    assert refusals["401 invalid_signature"] > 0 and refusals["503 overloaded"] > 0, refusals
    # Everything answered 2xx was durably stored, exactly once, and every delivery is final and delivered.
    assert answered <= stored
    assert states == {"delivered": len(stored)}
    # The retrying senders ride out the restarts: every one of their events ends up answered 2xx.
    unanswered = [event for event in retrying if not event.answered_2xx]
    assert not unanswered, [(e.id, e.status, e.errors) for e in unanswered[:5]]
    assert backlog_at_kill > 0, "the third kill must interrupt delivery for the test to mean anything"
    assert all(kill["requests_finished_before"] < EVENTS for kill in kills[:2])
