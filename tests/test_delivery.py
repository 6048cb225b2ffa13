"""The delivery engine: retries, dead deliveries and dependent actions, against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import yaml
from standardwebhooks.webhooks import Webhook as StandardWebhook

from gateway import hookimpl
from gateway.actions import Outcome, delivered, retry
from gateway.app import Gateway
from gateway.ingress import plan_deliveries
from gateway.storage import Ingested, Lease, NewDelivery, StorageUnavailable
from gateway.storage import sqlite as sqlite_module
from tests.support import (
    Downstream,
    RunningGateway,
    downstream_server,
    gateway_config,
    metric_value,
    plugins_with,
    svix_request,
    wait_until,
)

SIGNING_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"


def users_route(downstream: Downstream, *actions: dict[str, Any], **route: Any) -> dict[str, Any]:
    return {
        "name": "users",
        "source": "consignease",
        "events": ["user.*"],
        "actions": list(actions)
        or [{"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}}],
        **route,
    }


def alert_on_failure_route(downstream: Downstream, alert_path: str) -> dict[str, Any]:
    """Users forwarded to /app, and to `alert_path` only once /app's delivery is dead."""
    return users_route(
        downstream,
        {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}},
        {
            "id": "alert",
            "use": "forward",
            "after": "app",
            "when": "failure",
            "with": {"url": f"{downstream.url}{alert_path}"},
        },
    )


class FinishedRecorder:
    """A plugin that records each delivery_finished call: (action, state, outcome, error, final)."""

    def __init__(self) -> None:
        self.finished: list[tuple[Any, ...]] = []

    @hookimpl
    def delivery_finished(self, delivery, outcome, final):  # type: ignore[no-untyped-def]
        self.finished.append((delivery.action, delivery.state, outcome.kind, outcome.error, final))


def one_slot_config(tmp_path: Any, downstream: Downstream, delay: float = 0.0) -> dict[str, Any]:
    """Users forwarded to `downstream`, which takes `delay` seconds to answer, one delivery at a time, by a
    claim loop that looks only when woken (or after 30 s): so a test sees the order deliveries start in."""
    downstream.delay = delay
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"].update({"poll_interval": "30s", "concurrency": 1})
    return config


def event_detail(gw: RunningGateway, event_id: str):
    [detail] = asyncio.run_coroutine_threadsafe(gw.gateway.storage.get_event(event_id), gw.loop).result(10)
    return detail


def delivery_states(gw: RunningGateway, event_id: str) -> dict[str, str]:
    return {d.action: d.state for d in event_detail(gw, event_id).deliveries}


def store_webhook(gateway: Gateway, msg_id: str) -> asyncio.Future[Ingested]:
    """What the listener does with a signed user.created webhook, up to its commit (on the gateway's loop)."""
    body, headers = svix_request(msg_id=msg_id)
    endpoint = gateway.table.endpoints["/webhooks/consignease"]
    return gateway.ingress.store(*gateway.ingress.accept(endpoint, headers, body))


async def queue_unannounced(gateway: Gateway, msg_id: str, due_at: float | None = None) -> None:
    """Store a webhook and its deliveries, due at once (or at `due_at`), without telling the engine."""
    body, headers = svix_request(msg_id=msg_id)
    endpoint = gateway.table.endpoints["/webhooks/consignease"]
    event, routes = gateway.ingress.accept(endpoint, headers, body)
    if due_at is not None:
        event.received_at = due_at  # a delivery falls due when its event was received
    await gateway.storage.ingest(event, plan_deliveries(routes))


def test_500_500_200_is_delivered_on_the_third_attempt(tmp_path, downstream: Downstream) -> None:
    downstream.answer("/app", 500, 500, 200)
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:
        body, headers = svix_request(msg_id="msg_retry")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        received = downstream.wait_for(3, "/app")
        assert [r.headers["x-hookyard-attempt"] for r in received] == ["1", "2", "3"]
        # Every retry carries the same Idempotency-Key, so the app can dedupe.
        assert {r.headers["idempotency-key"] for r in received} == {"msg_retry"}
        wait_until(lambda: delivery_states(gw, "msg_retry") == {"app": "delivered"})
        attempts = event_detail(gw, "msg_retry").attempts
        [history] = attempts.values()
        assert [(a.outcome, a.status_code) for a in history] == [
            ("retry", 500),
            ("retry", 500),
            ("delivered", 200),
        ]
        assert all(a.duration >= 0 for a in history)
        assert gw.metric("hookyard_deliveries_total", route="users", action="app", outcome="retried") == 2
        assert gw.metric("hookyard_deliveries_total", route="users", action="app", outcome="delivered") == 1
        assert gw.metric("hookyard_end_to_end_seconds_count", route="users") == 1


def test_400_from_downstream_is_dead_without_retries(tmp_path, downstream: Downstream) -> None:
    downstream.answer("/app", 400)
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:
        body, headers = svix_request(msg_id="msg_400")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_400") == {"app": "dead"})
        assert len(downstream.received("/app")) == 1
        [delivery] = event_detail(gw, "msg_400").deliveries
        assert delivery.attempts == 1
        assert delivery.last_status == 400
        assert gw.metric("hookyard_deliveries_total", route="users", action="app", outcome="dead") == 1


def test_schedule_used_up_ends_dead(tmp_path, downstream: Downstream) -> None:
    downstream.default = 503
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:
        body, headers = svix_request(msg_id="msg_exhausted")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_exhausted") == {"app": "dead"})
        # The test schedule has three delays: one first attempt plus three retries.
        assert len(downstream.received("/app")) == 4
        [delivery] = event_detail(gw, "msg_exhausted").deliveries
        assert "gave up after 4 attempts" in (delivery.last_error or "")


def test_retry_after_is_honoured(tmp_path, downstream: Downstream) -> None:
    downstream.answer("/app", (429, {"Retry-After": "1"}), 200)
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:
        body, headers = svix_request(msg_id="msg_429")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_429") == {"app": "delivered"}, timeout=10)
        first, second = event_detail(gw, "msg_429").attempts.popitem()[1]
        # The schedule says 50 ms; the receiver asked for a second.
        assert second.started_at - first.started_at >= 1.0


def test_connection_refused_and_timeouts_are_retried(tmp_path, downstream: Downstream) -> None:
    downstream.delay = 0.5
    route = users_route(
        downstream,
        {"id": "slow", "use": "forward", "timeout": "100ms", "with": {"url": f"{downstream.url}/slow"}},
        {"id": "closed", "use": "forward", "with": {"url": "http://127.0.0.1:9/closed"}},
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        body, headers = svix_request(msg_id="msg_faults")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(
            lambda: delivery_states(gw, "msg_faults") == {"slow": "dead", "closed": "dead"}, timeout=15
        )
        attempts = {
            d.action: event_detail(gw, "msg_faults").attempts[d.id]
            for d in event_detail(gw, "msg_faults").deliveries
        }
        assert len(attempts["slow"]) == 4 and all("timeout" in (a.error or "") for a in attempts["slow"])
        assert len(attempts["closed"]) == 4 and all(a.status_code is None for a in attempts["closed"])


@pytest.mark.parametrize(
    ("app_status", "alert_runs"), [(400, True), (200, False)], ids=["app-dead", "app-delivered"]
)
def test_after_app_when_failure_runs_only_when_app_is_dead(
    tmp_path, downstream: Downstream, app_status: int, alert_runs: bool
) -> None:
    downstream.answer("/app", app_status)
    route = alert_on_failure_route(downstream, "/alert")
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        body, headers = svix_request(msg_id="msg_dependent")
        gw.post("/webhooks/consignease", body, headers)
        expected = (
            {"app": "dead", "alert": "delivered"} if alert_runs else {"app": "delivered", "alert": "skipped"}
        )
        wait_until(lambda: delivery_states(gw, "msg_dependent") == expected)
        assert len(downstream.received("/alert")) == (1 if alert_runs else 0)
        skipped = gw.metric("hookyard_deliveries_total", route="users", action="alert", outcome="skipped")
        assert skipped == (0 if alert_runs else 1)


def test_dependent_waits_for_its_parent_to_finish(tmp_path, downstream: Downstream) -> None:
    downstream.answer("/app", 500, 500, 200)
    route = users_route(
        downstream,
        {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}},
        {"id": "audit", "use": "forward", "after": "app", "with": {"url": f"{downstream.url}/audit"}},
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        body, headers = svix_request(msg_id="msg_chain")
        gw.post("/webhooks/consignease", body, headers)
        [audit] = downstream.wait_for(1, "/audit")
        app_times = [r for r in downstream.received("/app")]
        assert len(app_times) == 3  # audit only ran once app had finished (delivered on the third attempt)
        assert audit.headers["idempotency-key"] == "msg_chain"


def test_forward_signs_with_standard_webhooks(tmp_path, downstream: Downstream) -> None:
    route = users_route(
        downstream,
        {
            "id": "app",
            "use": "forward",
            "with": {
                "url": f"{downstream.url}/app",
                "sign": {"secret": SIGNING_SECRET},
                "headers": {"X-Team": "platform"},
            },
        },
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        body, headers = svix_request(msg_id="msg_signed")
        gw.post("/webhooks/consignease", body, headers)
        [received] = downstream.wait_for(1, "/app")
        assert received.headers["x-team"] == "platform"
        # The app verifies Hookyard with the official Standard Webhooks library.
        verified = StandardWebhook(SIGNING_SECRET).verify(received.body, received.headers)
        assert verified["type"] == "user.created"
        assert received.headers["webhook-id"] == "msg_signed"


def test_filter_and_codes_decide_what_consignly_delivers(tmp_path, downstream: Downstream) -> None:
    from tests.support import consignly_body, consignly_headers

    route = {
        "name": "consignments",
        "source": "consignly",
        "events": ["ConsignmentCreated", 112],
        "filter": {"data.status": {"in": [1, 2]}},
        "actions": [{"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/c"}}],
    }
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        sent = {
            "created-status-1": consignly_body("consignment.created", "e1", status=1),
            "tracking-by-code": consignly_body(112, "e2", status=2),
            "filtered-status-9": consignly_body("ConsignmentCreated", "e3", status=9),
            "other-type": consignly_body("consignment.deleted", "e4", status=1),
            "created-by-name": consignly_body("ConsignmentCreated", "e5", status=2),
        }
        for body in sent.values():
            assert gw.post("/webhooks/consignly", body, consignly_headers(body)).status_code == 200
        received = downstream.wait_for(3, "/c")
        assert sorted(r.json()["id"] for r in received) == ["e1", "e2", "e5"]
        # The others were stored but matched no route: no delivery exists that could still arrive.
        assert event_detail(gw, "e3").deliveries == [] and event_detail(gw, "e4").deliveries == []
        types = {r.json()["id"]: r.headers["x-hookyard-type"] for r in received}
        assert types["e2"] == "consignment.tracking_updated"


def test_action_concurrency_limits_requests_in_flight(tmp_path, downstream: Downstream) -> None:
    downstream.delay = 0.1
    route = users_route(
        downstream,
        {"id": "app", "use": "forward", "concurrency": 2, "with": {"url": f"{downstream.url}/app"}},
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        for index in range(8):
            body, headers = svix_request(msg_id=f"msg_conc_{index}")
            gw.post("/webhooks/consignease", body, headers)
        downstream.wait_for(8, "/app")
    assert downstream.max_in_flight == 2


def test_an_action_at_its_concurrency_holds_no_slot_that_another_action_waits_for(
    tmp_path, downstream: Downstream
) -> None:
    # slow's receiver holds its answers until the test lets them go, one event at a time, and four of its
    # events are queued when fast's event comes. Two slots in all: had slow's queue taken them, to wait for
    # slow, fast's delivery would have waited behind slow's, which is not answered before fast's arrives.
    with downstream_server() as slow_app:
        slow_app.hold = threading.Event()
        routes = [
            users_route(
                slow_app,
                {"id": "app", "use": "forward", "concurrency": 1, "with": {"url": f"{slow_app.url}/slow"}},
                name="slow",
                events=["user.created"],
            ),
            users_route(downstream, name="fast", events=["user.deleted"]),
        ]
        config = gateway_config(tmp_path, routes=routes)
        config["delivery"]["concurrency"] = 2
        config["defaults"]["timeout"] = "30s"  # the held attempt is not timed out, however slow the machine
        with RunningGateway(config) as gw:
            for index in range(4):
                body, headers = svix_request(msg_id=f"msg_slow_{index}")
                gw.post("/webhooks/consignease", body, headers)
            wait_until(lambda: slow_app.in_flight == 1)
            body, headers = svix_request("user.deleted", msg_id="msg_fast")
            gw.post("/webhooks/consignease", body, headers)
            try:
                downstream.wait_for(1, "/app", timeout=10)
                assert not slow_app.received()  # slow's first is still held
            finally:
                slow_app.hold.set()
            # slow still took one at a time, in the order they came, each once.
            received = slow_app.wait_for(4, "/slow", timeout=15)
            assert [r.headers["idempotency-key"] for r in received] == [f"msg_slow_{i}" for i in range(4)]
            assert slow_app.max_in_flight == 1
            wait_until(lambda: delivery_states(gw, "msg_slow_3") == {"app": "delivered"})
            assert all(event_detail(gw, f"msg_slow_{i}").deliveries[0].attempts == 1 for i in range(4))


def test_an_attempt_longer_than_the_lease_is_sent_once(tmp_path, downstream: Downstream) -> None:
    # The engine renews the leases of running deliveries: a slow receiver never gets the same event twice.
    downstream.delay = 1.5
    config = gateway_config(tmp_path, routes=[users_route(downstream)], delivery={"lease": "600ms"})
    with RunningGateway(config) as gw:
        body, headers = svix_request(msg_id="msg_slow")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_slow") == {"app": "delivered"}, timeout=10)
        assert len(downstream.received("/app")) == 1
        [delivery] = event_detail(gw, "msg_slow").deliveries
        assert delivery.attempts == 1


def test_an_attempt_that_outlives_its_lease_while_renewals_fail_is_sent_once(
    tmp_path, downstream: Downstream
) -> None:
    downstream.delay = 2.0
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"].update({"lease": "1s", "poll_interval": "200ms"})
    with RunningGateway(config) as gw:
        storage = gw.gateway.storage
        real_renew, real_next_due_at = storage.renew, storage.next_due_at
        fail_until = time.time() + 1.6  # the lease runs out under the attempt, then renewals work again
        reads = 0

        async def renew(*args: Any, **kwargs: Any) -> None:
            if time.time() < fail_until:  # a full disk for a moment, say
                raise StorageUnavailable("sqlite: database or disk is full")
            await real_renew(*args, **kwargs)

        async def next_due_at(*args: Any, **kwargs: Any) -> float | None:
            nonlocal reads
            reads += 1
            return await real_next_due_at(*args, **kwargs)

        storage.renew = renew  # type: ignore[method-assign]
        storage.next_due_at = next_due_at  # type: ignore[method-assign]
        body, headers = svix_request(msg_id="msg_lapsed")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_lapsed") == {"app": "delivered"}, timeout=15)
        # Not claimed again beside its running attempt, whose result is the one recorded.
        assert len(downstream.received("/app")) == 1
        detail = event_detail(gw, "msg_lapsed")
        [delivery] = detail.deliveries
        assert [(a.number, a.outcome, a.status_code) for a in detail.attempts[delivery.id]] == [
            (1, "delivered", 200)
        ]
        assert delivery.attempts == 1
        assert gw.metric("hookyard_deliveries_total", route="users", action="app", outcome="delivered") == 1
        # Nor does the claim loop spin on the lapsed lease as if it were due: it looks every poll_interval.
        assert reads < 30, reads


def test_an_attempt_whose_result_the_store_refuses_for_a_while_is_recorded_then_not_sent_again(
    tmp_path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The checkpoint that starts the WAL over, stuck in its fsync past FSYNC_TIMEOUT (a disk that stopped
    # answering for a while: a fault a test cannot cause on demand): every write is refused, the attempt's
    # result and the lease renewals included, until it returns.
    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 0.3)
    stuck, release = threading.Event(), threading.Event()
    real = sqlite_module._GroupCommit._checkpoint

    def stuck_checkpoint(self: sqlite_module._GroupCommit) -> None:
        stuck.set()
        release.wait(10)
        real(self)

    monkeypatch.setattr(sqlite_module._GroupCommit, "_checkpoint", stuck_checkpoint)
    downstream.delay = 0.8  # the attempt's result comes once the checkpoint is overdue
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"].update({"lease": "1s", "poll_interval": "200ms"})
    with RunningGateway(config) as gw:
        writer = gw.gateway.storage._writer
        body, headers = svix_request(msg_id="msg_refused_result")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        gw.loop.call_soon_threadsafe(writer._start_checkpoint, sqlite_module.RESTART)
        try:
            assert stuck.wait(5)
            downstream.wait_for(1, "/app")
            wait_until(lambda: "cannot record attempt" in caplog.text, 5)
            time.sleep(1.5)  # past the lease, which no renewal could extend
        finally:
            release.set()
        wait_until(lambda: writer.overdue_since is None, 5)  # the store takes writes again
        wait_until(lambda: delivery_states(gw, "msg_refused_result") == {"app": "delivered"}, timeout=10)
        time.sleep(1.5)  # a lease's worth more: time for a second attempt, were one made
        # Recorded once the store took writes again: one attempt, not a second after its lease ran out.
        assert len(downstream.received("/app")) == 1
        detail = event_detail(gw, "msg_refused_result")
        [delivery] = detail.deliveries
        assert [(a.number, a.outcome) for a in detail.attempts[delivery.id]] == [(1, "delivered")]


def test_an_attempt_fenced_out_counts_in_no_metric_and_no_hook(tmp_path, downstream: Downstream) -> None:
    from gateway import hookimpl
    from gateway.plugins import new_plugin_manager

    finished: list[tuple[Any, ...]] = []

    class Recorder:
        @hookimpl
        def delivery_finished(self, delivery, outcome, final):  # type: ignore[no-untyped-def]
            finished.append((delivery.action, delivery.attempts, outcome.kind))

    downstream.delay = 1.0
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(Recorder(), name="recorder")
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)]), pm=pm) as gw:
        body, headers = svix_request(msg_id="msg_fenced")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: downstream.in_flight == 1)
        # Another worker claims the delivery as if this one's lease had run out: this attempt's result is
        # no longer the delivery's.
        storage = gw.gateway.storage
        later = time.time() + 10  # past the 5 s lease
        taken = asyncio.run_coroutine_threadsafe(storage.claim(later, 10, 60, "other"), gw.loop).result(10)
        assert [claim.delivery.attempts for claim in taken] == [2]
        wait_until(lambda: not gw.gateway.engine._running, timeout=5)
        assert len(downstream.received("/app")) == 1
        [delivery] = event_detail(gw, "msg_fenced").deliveries
        assert (delivery.state, delivery.attempts) == ("pending", 2)
        assert event_detail(gw, "msg_fenced").attempts[delivery.id] == []
        for outcome in ("delivered", "retried", "dead"):
            assert gw.metric("hookyard_deliveries_total", route="users", action="app", outcome=outcome) == 0
        assert gw.metric("hookyard_delivery_duration_seconds_count", route="users", action="app") == 0
        assert finished == []


def test_a_dependent_running_as_its_parent_is_replayed_reports_the_new_result_once_it_ends(
    tmp_path, downstream: Downstream
) -> None:
    from gateway.actions import Action, Job, delivered
    from gateway.operations import Operations

    reports: list[tuple[int, str]] = []  # (attempt, the parent's state it reported)
    release = asyncio.Event()  # ends the first report, made on the gateway's loop

    class Report(Action):
        name = "report"

        async def deliver(self, job: Job) -> Outcome:
            assert job.parent is not None
            reports.append((job.attempt, job.parent.state))
            if len(reports) == 1:
                await release.wait()
            return delivered(200)

    pm = plugins_with(actions=[Report])
    route = users_route(
        downstream,
        {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}},
        {"id": "report", "use": "report", "after": "app", "when": "always", "timeout": "30s"},
    )
    # The lease outlasts the test: nothing here may wait for one to run out.
    config = gateway_config(tmp_path, routes=[route], delivery={"poll_interval": "200ms", "lease": "2m"})
    downstream.answer("/app", 422)  # dead at once; then 200
    with RunningGateway(config, pm=pm) as gw:
        body, headers = svix_request(msg_id="msg_rereport")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: reports == [(1, "dead")])  # reporting app's failure, and taking long

        # app is replayed and delivered while that report runs; report waits for app's new result, and is
        # claimed again for it, with its count started over.
        ops = Operations(gw.gateway.storage, gw.gateway.table, wake=gw.gateway.engine.wake)
        asyncio.run_coroutine_threadsafe(ops.replay_event("msg_rereport"), gw.loop).result(10)
        wait_until(lambda: delivery_states(gw, "msg_rereport")["app"] == "delivered")
        wait_until(lambda: event_detail(gw, "msg_rereport").deliveries[1].attempts == 1)
        gw.loop.call_soon_threadsafe(release.set)

        # The report of the failure ends after the replay: not taken for the report of the success, which
        # is made next, as the first attempt of the new round, numbered past the discarded one (the action
        # was told 1 for that one).
        wait_until(lambda: delivery_states(gw, "msg_rereport") == {"app": "delivered", "report": "delivered"})
        assert reports == [(1, "dead"), (2, "delivered")]
        app, report = event_detail(gw, "msg_rereport").deliveries
        [attempt] = event_detail(gw, "msg_rereport").attempts[report.id]
        assert (attempt.number, attempt.outcome) == (2, "delivered")
        assert app.finished_at is not None and attempt.started_at >= app.finished_at  # the new round's


def test_an_attempt_across_a_step_of_the_wall_clock_is_timed_as_long_as_it_took(
    tmp_path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its duration was the difference of two wall-clock readings: with the clock stepped back an hour (NTP,
    # a VM resumed) while it ran, `events show`, the log and the attempts table said -3,600,000 ms.
    from gateway import delivery
    from gateway.actions import Action, Job

    class SteppedClock:
        """time, as the engine reads it, with the wall clock an hour back once `step` is set."""

        step = 0.0

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def time(self) -> float:
            return time.time() + self.step

    clock = SteppedClock()
    monkeypatch.setattr(delivery, "time", clock)

    class StepsTheClock(Action):
        name = "steps-the-clock"

        async def deliver(self, job: Job) -> Outcome:
            await asyncio.sleep(0.1)
            clock.step = -3600.0
            return delivered(200)

    route = users_route(downstream, {"id": "app", "use": "steps-the-clock"})
    with RunningGateway(
        gateway_config(tmp_path, routes=[route]), pm=plugins_with(actions=[StepsTheClock])
    ) as gw:
        body, headers = svix_request(msg_id="msg_clock_step")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_clock_step") == {"app": "delivered"})
        [[attempt]] = event_detail(gw, "msg_clock_step").attempts.values()
    assert 0.1 <= attempt.duration < 60


def test_replays_while_a_dependent_runs_send_it_once_more_after_that_attempt_not_once_per_replay(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.actions import Action, Job, delivered
    from gateway.operations import Operations

    told: list[int] = []  # the attempt numbers the action was told, in the order it was called
    running = most = 0  # its calls under way now, and at most
    release = asyncio.Event()  # ends the first call, made on the gateway's loop

    class Report(Action):
        name = "report"

        async def deliver(self, job: Job) -> Outcome:
            nonlocal running, most
            told.append(job.attempt)
            running += 1
            most = max(most, running)
            try:
                if len(told) == 1:
                    await release.wait()
            finally:
                running -= 1
            return delivered(200)

    pm = plugins_with(actions=[Report])
    route = users_route(
        downstream,
        {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}},
        {"id": "report", "use": "report", "after": "app", "timeout": "30s"},
    )
    config = gateway_config(tmp_path, routes=[route], delivery={"poll_interval": "200ms", "lease": "2m"})
    config["log"] = {"level": "info"}
    caplog.set_level(logging.INFO, logger="hookyard.delivery")
    with RunningGateway(config, pm=pm) as gw:
        body, headers = svix_request(msg_id="msg_replays")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: told == [1])  # and held

        # Replayed three times while that attempt runs: each time app runs again, and report is claimed
        # for its new result, each claim fencing out the round of the one before.
        ops = Operations(gw.gateway.storage, gw.gateway.table, wake=gw.gateway.engine.wake)
        for replays in range(1, 4):
            asyncio.run_coroutine_threadsafe(ops.replay_event("msg_replays"), gw.loop).result(10)
            wait_until(lambda: delivery_states(gw, "msg_replays")["app"] == "delivered")
            wait_until(lambda: event_detail(gw, "msg_replays").deliveries[1].attempts == 1)
            assert len(downstream.received("/app")) == replays + 1
        gw.loop.call_soon_threadsafe(release.set)

        # Only the last claim is sent, once the attempt under way has ended: the two before it were
        # of rounds that are over, and their results would only be discarded.
        wait_until(lambda: delivery_states(gw, "msg_replays") == {"app": "delivered", "report": "delivered"})
        assert told == [1, 4]
        assert most == 1
        report = event_detail(gw, "msg_replays").deliveries[1]
        assert [a.number for a in event_detail(gw, "msg_replays").attempts[report.id]] == [4]
    # Said once, when the first claim came, and not as a warning: a replay is expected to cause it.
    said = [r for r in caplog.records if r.message.startswith("delivery claimed again while an attempt")]
    assert [(r.levelname, r.route, r.action) for r in said] == [("INFO", "users", "report")]


@pytest.mark.parametrize(
    ("made", "error"),
    [
        (
            lambda: Outcome("sent"),
            "ValueError: an Outcome's kind is 'sent', not delivered, retry, dead or skipped",
        ),
        (lambda: retry(OSError(5, "I/O error")), "TypeError: an Outcome's error is an OSError, not a str"),
        (
            lambda: retry("later", retry_after="30"),
            "TypeError: an Outcome's retry_after is a str, not a number",
        ),
        (lambda: delivered("200 OK"), "TypeError: an Outcome's status_code is a str, not an int"),
        (lambda: "done", "the action returned str, not an Outcome"),
    ],
    ids=["kind", "error", "retry_after", "status_code", "not_an_outcome"],
)
def test_an_action_that_makes_a_malformed_outcome_is_retried_then_dead(
    tmp_path, downstream: Downstream, made: Callable[[], Outcome], error: str
) -> None:
    # Recorded like an attempt that raised: retried on the schedule, then dead, never left leased. Recorded
    # as it was, each failed the engine after the attempt: the delivery left in a state of no meaning, or
    # leased and claimed again for ever, with nothing counted.
    errors, dead = errors_until_dead(tmp_path, downstream, made)
    assert errors == [error, f"gave up after 2 attempts: {error}"]
    assert dead == 1


class PluginsOwnBaseException(BaseException):
    pass


def _raise(exc: BaseException) -> Outcome:
    raise exc


@pytest.mark.parametrize(
    ("raised", "error"),
    [
        (KeyboardInterrupt(), "KeyboardInterrupt (raised by the action)"),
        (SystemExit(3), "SystemExit: 3 (raised by the action)"),
        (PluginsOwnBaseException("gone"), "PluginsOwnBaseException: gone (raised by the action)"),
    ],
    ids=["KeyboardInterrupt", "SystemExit", "own"],
)
def test_an_action_that_raises_a_base_exception_fails_the_attempt_and_the_gateway_goes_on(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture, raised: BaseException, error: str
) -> None:
    # KeyboardInterrupt and SystemExit ended `serve` from the delivery's task, and another BaseException left
    # the delivery leased with no attempt recorded. A plugin's, never a signal's (serve handles those).
    errors, dead = errors_until_dead(tmp_path, downstream, lambda: _raise(raised))
    assert errors == [error, f"gave up after 2 attempts: {error}"]
    assert dead == 1
    said = [r for r in caplog.records if r.getMessage().startswith("action raised")]
    assert len(said) == 2
    assert said[0].getMessage() == (
        f"action raised {type(raised).__name__}, which is not an Exception; counted as a failed attempt"
    )
    assert said[0].plugin == "test-plugin"  # as `hookyard plugins` lists the plugin that registered it


def test_an_action_that_turns_the_shutdowns_cancellation_into_system_exit_is_cut_off_not_failed(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    # The SystemExit was taken for the action's own failure: the shutdown's cancellation was lost and a
    # failed attempt recorded for a delivery the stop had cut off.
    from gateway.actions import Action, Job

    started = threading.Event()

    class Exits(Action):
        name = "exits"

        async def deliver(self, job: Job) -> Outcome:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise SystemExit(4) from None
            return delivered()

    route = users_route(downstream, {"id": "app", "use": "exits"})
    config = gateway_config(tmp_path, routes=[route])
    config["delivery"]["shutdown_timeout"] = "1s"
    with RunningGateway(config, pm=plugins_with(actions=[Exits])) as gw:
        body, headers = svix_request(msg_id="msg_exits")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        assert started.wait(10)
    with contextlib.closing(sqlite3.connect(tmp_path / "hookyard.db")) as db:
        attempts = db.execute("SELECT count(*) FROM attempts").fetchone()[0]
        states = [state for (state,) in db.execute("SELECT state FROM deliveries")]
    assert (attempts, states) == (0, ["pending"])
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith("action raised")]
    assert "released unfinished deliveries" in messages


def test_an_action_that_goes_on_after_its_timeout_is_named_and_cancelled_again(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    # Cancelled once for running late, it caught the cancellation and went on waiting: its delivery stayed
    # in flight, holding a worker slot, until the gateway stopped, and nothing said why.
    from gateway.actions import Action, Job

    cancellations = 0

    class Stubborn(Action):
        name = "stubborn"

        async def deliver(self, job: Job) -> Outcome:
            nonlocal cancellations
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancellations += 1
            await asyncio.Event().wait()  # the next cancellation ends it
            return delivered()

    route = users_route(
        downstream, {"id": "app", "use": "stubborn", "timeout": "100ms", "retry": {"schedule": ["1h"]}}
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route]), pm=plugins_with(actions=[Stubborn])) as gw:
        body, headers = svix_request(msg_id="msg_stubborn")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: event_detail(gw, "msg_stubborn").deliveries[0].last_error is not None)
        [delivery] = event_detail(gw, "msg_stubborn").deliveries
        assert (delivery.state, delivery.last_error) == ("pending", "timeout after 0.1s")  # to retry
    assert cancellations == 1
    said = [r for r in caplog.records if "did not stop" in r.getMessage()]
    assert [r.getMessage() for r in said] == [
        "action 'app' of route 'users' did not stop within 1 s of its attempt's cancellation for running "
        "past its timeout (0.1 s): cancelled again"
    ]
    assert (said[0].levelname, said[0].event_id, said[0].plugin) == ("WARNING", "msg_stubborn", "test-plugin")


def test_an_action_error_is_stored_and_logged_cut_to_a_bounded_length(
    tmp_path, downstream: Downstream
) -> None:
    from gateway.actions import MAX_ERROR_CHARS

    # A whole answer body, say: stored with every attempt as it was.
    errors, _dead = errors_until_dead(tmp_path, downstream, lambda: retry("E" * 5_000_000))
    assert [len(e) for e in errors] == [MAX_ERROR_CHARS, MAX_ERROR_CHARS], [len(e) for e in errors]
    assert errors[0].startswith("EEE") and errors[0].endswith("… (5000000 characters)")
    assert errors[1].startswith("gave up after 2 attempts: EEE")


def errors_until_dead(
    tmp_path: Path, downstream: Downstream, outcome: Callable[[], Outcome]
) -> tuple[list[str], float]:
    """One webhook to an action whose every attempt returns outcome(), retried once: the errors its two
    attempts recorded, and the deliveries counted dead."""
    from gateway.actions import Action, Job

    class Made(Action):
        name = "made"

        async def deliver(self, job: Job) -> Outcome:
            return outcome()

    pm = plugins_with(actions=[Made])
    route = users_route(downstream, {"id": "app", "use": "made", "retry": {"schedule": ["10ms"]}})
    with RunningGateway(gateway_config(tmp_path, routes=[route]), pm=pm) as gw:
        body, headers = svix_request(msg_id="msg_made")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_made") == {"app": "dead"})
        [delivery] = event_detail(gw, "msg_made").deliveries
        attempts = event_detail(gw, "msg_made").attempts[delivery.id]
        assert [a.outcome for a in attempts] == ["retry", "dead"]
        return [a.error or "" for a in attempts], gw.metric(
            "hookyard_deliveries_total", route="users", action="app", outcome="dead"
        )


def test_refused_connections_are_named_as_such(tmp_path, downstream: Downstream) -> None:
    route = users_route(
        downstream, {"id": "closed", "use": "forward", "with": {"url": "http://127.0.0.1:9/x"}}
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        body, headers = svix_request(msg_id="msg_refused")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: event_detail(gw, "msg_refused").attempts.popitem()[1] != [])
        [first, *_] = next(iter(event_detail(gw, "msg_refused").attempts.values()))
        assert first.error is not None and first.error.startswith("cannot connect"), first.error


def test_a_failing_observer_hook_changes_no_answer(tmp_path, downstream: Downstream) -> None:
    from gateway import hookimpl
    from gateway.plugins import new_plugin_manager

    calls: list[str] = []

    class Broken:
        @hookimpl
        def event_accepted(self, event):  # type: ignore[no-untyped-def]
            calls.append(f"event_accepted {event.id}")
            raise RuntimeError("observer bug")

        @hookimpl
        def delivery_finished(self, delivery, outcome, final):  # type: ignore[no-untyped-def]
            calls.append(f"delivery_finished {delivery.action}")
            raise RuntimeError("observer bug")

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(Broken(), name="broken")
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)]), pm=pm) as gw:
        body, headers = svix_request(msg_id="msg_observed")
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
        wait_until(lambda: delivery_states(gw, "msg_observed") == {"app": "delivered"})
        # Both hooks did run (and raise): the answer and the delivery are as if they had not.
        wait_until(lambda: "delivery_finished app" in calls)
        assert calls == ["event_accepted msg_observed", "delivery_finished app"]
        assert len(downstream.received("/app")) == 1


@pytest.mark.parametrize("hook", ["register_actions", "event_accepted", "delivery_finished"])
def test_an_async_implementation_of_a_hook_called_synchronously_is_refused_at_start(
    tmp_path, hook: str
) -> None:
    import pluggy

    from gateway import hookimpl
    from gateway.config import parse_config
    from gateway.plugins import new_plugin_manager

    ran: list[str] = []

    async def observe(**arguments: Any) -> Any:
        ran.append(hook)  # never, had it been called: nobody would await it
        return []

    observe.__name__ = hook
    plugin = type("Observer", (), {hook: staticmethod(hookimpl(observe))})()
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="async-observer")
    config = parse_config(yaml.safe_dump(gateway_config(tmp_path)))
    with pytest.raises(pluggy.PluginValidationError, match=f"plugin async-observer: {hook} is an async def"):
        Gateway(config, pm=pm)
    assert ran == []


@pytest.mark.parametrize("hook", ["startup", "shutdown"])
@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
def test_a_wrapper_on_a_hook_called_one_implementation_at_a_time_is_refused_at_start(
    tmp_path, hook: str, style: str
) -> None:
    """Hookyard calls each startup and shutdown implementation itself (awaited one at a time, a shutdown
    one on a thread of its own and given up on in time): a wrapper was called too, as a plain function,
    and the generator it returned was dropped, so its body never ran, and it counted as started."""
    import pluggy

    from gateway.config import parse_config
    from gateway.plugins import new_plugin_manager

    ran: list[str] = []

    def wrap(**arguments: Any) -> Iterator[None]:
        ran.append("before")  # never, as it was: nobody advanced the generator
        yield
        ran.append("after")

    wrap.__name__ = hook
    plugin = type("Wraps", (), {hook: staticmethod(hookimpl(**{style: True})(wrap))})()
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="wraps")
    config = parse_config(yaml.safe_dump(gateway_config(tmp_path)))
    with pytest.raises(
        pluggy.PluginValidationError, match=f"^plugin wraps: {hook} is a hook wrapper \\({style}=True\\)"
    ):
        Gateway(config, pm=pm)
    assert ran == []


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
def test_a_wrapper_on_a_hook_pluggy_calls_runs_around_the_other_implementations(
    tmp_path, downstream: Downstream, style: str
) -> None:
    """event_accepted and delivery_finished are called through pluggy, whose wrappers work as documented."""
    from gateway.plugins import new_plugin_manager

    calls: list[str] = []

    class Observes:
        @hookimpl
        def event_accepted(self, event):  # type: ignore[no-untyped-def]
            calls.append(f"observed {event.id}")

    def around(event: Any) -> Iterator[None]:
        calls.append("before")
        yield
        calls.append("after")

    around.__name__ = "event_accepted"
    wraps = type("Wraps", (), {"event_accepted": staticmethod(hookimpl(**{style: True})(around))})()
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(wraps, name="wraps")
    pm.register(Observes(), name="observes")
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)]), pm=pm) as gw:
        body, headers = svix_request(msg_id="msg_wrapped")
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
    assert calls == ["before", "observed msg_wrapped", "after"]


def test_a_failing_shutdown_hook_skips_no_other_and_still_closes_the_store(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway import hookimpl
    from gateway.plugins import new_plugin_manager

    closed: list[str] = []

    class Closes:
        @hookimpl
        async def shutdown(self):  # type: ignore[no-untyped-def]
            closed.append("pool")

    class Raises:
        @hookimpl
        def shutdown(self, gateway):  # type: ignore[no-untyped-def]
            raise RuntimeError("flush failed")

    class RaisesLater:
        @hookimpl
        async def shutdown(self, gateway):  # type: ignore[no-untyped-def]
            raise RuntimeError("close failed")

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(Closes(), name="closes")
    # pluggy calls the last registered first: both failures come before the one that closes.
    pm.register(Raises(), name="raises")
    pm.register(RaisesLater(), name="raises-later")
    gw = RunningGateway(gateway_config(tmp_path), pm=pm)
    with gw:
        pass
    assert not gw.thread.is_alive()
    assert closed == ["pool"]
    failures = [r for r in caplog.records if r.getMessage() == "a shutdown hook failed"]
    assert [r.plugin for r in failures] == ["raises-later", "raises"]  # type: ignore[attr-defined]
    # The store was closed, its serving lock with it: the next gateway serves the same file.
    with RunningGateway(gateway_config(tmp_path)):
        pass


def test_with_hook_tracing_the_startup_and_shutdown_hooks_are_traced_too(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HOOKYARD_TRACE_HOOKS traced the hooks that pluggy calls, but not startup and shutdown, which the
    gateway calls itself one implementation at a time: a plugin that failed to start left no trace."""
    from gateway.plugins import new_plugin_manager

    class Opens:
        @hookimpl
        def startup(self, gateway):  # type: ignore[no-untyped-def]
            return "opened"

        @hookimpl
        async def shutdown(self):  # type: ignore[no-untyped-def]
            return "closed"

    monkeypatch.setenv("HOOKYARD_TRACE_HOOKS", "1")
    pm = new_plugin_manager(load_entry_points=False)  # writes its trace to the stderr captured now
    pm.register(Opens(), name="opens")
    with RunningGateway(gateway_config(tmp_path), pm=pm) as gw:
        gateway = gw.gateway
    trace = capsys.readouterr().err
    # As pluggy traces the hooks it calls: the call with its arguments, then what it returned.
    assert f"  startup of opens [hook]\n      gateway: {gateway}\n" in trace
    assert "  finish startup of opens --> opened [hook]\n" in trace
    assert "  shutdown of opens [hook]\n" in trace
    assert "  finish shutdown of opens --> closed [hook]\n" in trace
    assert trace.index("finish startup of opens") < trace.index("shutdown of opens [hook]")


def test_the_queue_gauges_follow_the_deliveries_that_finish_while_the_gateway_stops(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from gateway import delivery

    monkeypatch.setattr(delivery, "STATS_INTERVAL", 0.05)
    with downstream_server() as fast, downstream_server() as slow:
        # Each answer held until the test lets it go: the fast one once the drain has begun, the slow one
        # once a scrape has seen the fast one finish, however slow the machine.
        fast.hold, slow.hold = threading.Event(), threading.Event()
        route = users_route(
            fast,
            {"id": "fast", "use": "forward", "with": {"url": f"{fast.url}/fast"}},
            {"id": "slow", "use": "forward", "with": {"url": f"{slow.url}/slow"}},
        )
        config = gateway_config(tmp_path, routes=[route])
        config["delivery"]["shutdown_timeout"] = "10s"
        gw = RunningGateway(config).__enter__()

        def in_flight() -> float:
            return metric_value(
                httpx.get(gw.ops_url + "/metrics").text, "hookyard_delivery_queue", state="in_flight"
            )

        body, headers = svix_request(msg_id="msg_draining")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: in_flight() == 2)
        stopping = threading.Thread(target=gw.__exit__, args=(None, None, None))
        stopping.start()
        try:
            wait_until(lambda: not gw.gateway.ready)
            # The fast delivery finishes during the drain, and a scrape sees it; the slow one is still running.
            fast.hold.set()
            wait_until(lambda: in_flight() == 1)
            assert not slow.received()
        finally:
            fast.hold.set()
            slow.hold.set()
            stopping.join(20)
    assert [r.path for r in fast.received() + slow.received()] == ["/fast", "/slow"]
    # Read last, once both had finished: nothing is left in flight.
    assert (
        gw.gateway.metrics.registry.get_sample_value("hookyard_delivery_queue", {"state": "in_flight"}) == 0
    )


def test_the_storage_size_gauge_is_there_once_started_and_grows_with_the_events_stored(
    tmp_path: Any, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import delivery

    monkeypatch.setattr(delivery, "STATS_INTERVAL", 0.05)
    with RunningGateway(gateway_config(tmp_path, downstream.url)) as gw:
        wait_until(lambda: gw.metric("hookyard_storage_bytes") > 0)
        before = gw.metric("hookyard_storage_bytes")
        padding = "x" * 4096
        for n in range(100):
            body, headers = svix_request(msg_id=f"msg_size_{n}", data={"padding": padding})
            assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        # The bodies are in the file or in its WAL, whichever a checkpoint has left them in.
        wait_until(lambda: gw.metric("hookyard_storage_bytes") > before + 50 * 4096)


def test_an_attempt_cut_off_by_a_shutdown_is_not_in_the_history_and_its_number_is_skipped(
    tmp_path, downstream: Downstream
) -> None:
    downstream.delay = 3.0
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"]["shutdown_timeout"] = "200ms"
    with RunningGateway(config) as gw:
        body, headers = svix_request(msg_id="msg_cut_off")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: downstream.in_flight == 1)
    # Stopped with the request in flight: released, and sent again by the next start.
    downstream.delay = 0.0
    with RunningGateway(config) as gw:
        wait_until(lambda: delivery_states(gw, "msg_cut_off") == {"app": "delivered"})
        detail = event_detail(gw, "msg_cut_off")
    received = downstream.wait_for(2, "/app")
    assert sorted(r.headers["x-hookyard-attempt"] for r in received) == ["1", "2"]
    # The receiver got attempt 1 (and may have acted on it), but no result of it was recorded.
    [delivery] = detail.deliveries
    assert [a.number for a in detail.attempts[delivery.id]] == [2]


def test_observer_hooks_are_called_with_their_arguments(tmp_path, downstream: Downstream) -> None:
    from gateway import hookimpl
    from gateway.plugins import new_plugin_manager

    calls: list[tuple[Any, ...]] = []

    class Recorder:
        @hookimpl
        def startup(self, gateway):  # type: ignore[no-untyped-def]
            calls.append(("startup", gateway))

        @hookimpl
        def shutdown(self, gateway):  # type: ignore[no-untyped-def]
            calls.append(("shutdown", gateway))

        @hookimpl
        def event_accepted(self, event, routes):  # type: ignore[no-untyped-def]
            calls.append(("event_accepted", event.id, event.source, event.type, event.data, routes))

        @hookimpl
        def delivery_finished(self, delivery, outcome, final):  # type: ignore[no-untyped-def]
            # The record is the engine's own: copy what it says now.
            snapshot = (delivery.route, delivery.action, delivery.attempts, delivery.state)
            calls.append(("delivery_finished", *snapshot, outcome.kind, outcome.status_code, final))

    def finished(route: str, action: str) -> list[tuple[Any, ...]]:
        return [call[3:] for call in calls if call[0] == "delivery_finished" and call[1:3] == (route, action)]

    downstream.answer("/app", 500, 200)
    audit = {
        "name": "audit",
        "source": "consignease",
        "events": ["user.created"],
        "actions": [{"id": "log", "use": "forward", "with": {"url": f"{downstream.url}/audit"}}],
    }
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(Recorder(), name="recorder")
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream), audit]), pm=pm) as gw:
        gateway = gw.gateway
        assert calls == [("startup", gateway)]
        body, headers = svix_request(msg_id="msg_hooks", data={"id": "user_1"})
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
        # A duplicate is not a new event: no second call.
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "duplicate"
        body, headers = svix_request("order.created", {"id": "order_1"}, msg_id="msg_unrouted")
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
        wait_until(lambda: len(finished("users", "app")) == 2 and finished("audit", "log"))
        assert [call for call in calls if call[0] == "event_accepted"] == [
            (
                "event_accepted",
                "msg_hooks",
                "consignease",
                "user.created",
                {"id": "user_1"},
                ["users", "audit"],
            ),
            (
                "event_accepted",
                "msg_unrouted",
                "consignease",
                "order.created",
                {"id": "order_1"},
                [],
            ),
        ]
        # One call per attempt: a retry is not final, the delivered one is.
        assert finished("users", "app") == [
            (1, "pending", "retry", 500, False),
            (2, "delivered", "delivered", 200, True),
        ]
        assert finished("audit", "log") == [(1, "delivered", "delivered", 200, True)]
        assert not any(call[0] == "shutdown" for call in calls)
    assert calls[0] == ("startup", gateway)
    assert calls[-1] == ("shutdown", gateway)
    assert [call[0] for call in calls].count("shutdown") == 1


def test_delivery_finished_reports_dependents_that_end_skipped(tmp_path, downstream: Downstream) -> None:
    from gateway.plugins import new_plugin_manager

    recorder = FinishedRecorder()
    finished = recorder.finished
    route = alert_on_failure_route(downstream, "/a")
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(recorder, name="recorder")
    with RunningGateway(gateway_config(tmp_path, routes=[route]), pm=pm) as gw:
        body, headers = svix_request(msg_id="msg_skip")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: len(finished) == 2)
        assert finished == [
            ("app", "delivered", "delivered", None, True),
            ("alert", "skipped", "skipped", "parent did not reach the required state", True),
        ]
        assert gw.metric("hookyard_deliveries_total", route="users", action="alert", outcome="skipped") == 1
    assert downstream.received("/a") == []


def test_a_delivery_whose_stored_event_cannot_be_read_ends_dead_and_the_others_go_out(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.operations import Operations
    from gateway.plugins import new_plugin_manager

    recorder = FinishedRecorder()
    finished = recorder.finished
    downstream.answer("/app", 500, 500)  # the first attempt of each: both wait for a retry
    route = alert_on_failure_route(downstream, "/a")
    config = gateway_config(tmp_path, routes=[route])
    config["defaults"]["retry"] = {"schedule": ["1h"], "jitter": 0}  # due again only as the test says
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(recorder, name="recorder")
    with RunningGateway(config, pm=pm) as gw:
        for msg_id in ("msg_bad", "msg_good"):
            body, headers = svix_request(msg_id=msg_id)
            assert gw.post("/webhooks/consignease", body, headers).status_code == 200

        def recorded(msg_id: str) -> int:
            return sum(map(len, event_detail(gw, msg_id).attempts.values()))

        # Their first attempts recorded, so that their retries' due times are written, not still to come.
        wait_until(lambda: recorded("msg_bad") == recorded("msg_good") == 1)
        # The bad event's body damaged in the file, and both retries made due at once: one claim takes both.
        with sqlite3.connect(tmp_path / "hookyard.db") as conn:
            conn.execute("UPDATE events SET body = X'FF00' WHERE event_id = 'msg_bad'")
            conn.execute("UPDATE deliveries SET due_at = ? WHERE state = 'pending'", (time.time(),))
        conn.close()

        wait_until(lambda: delivery_states(gw, "msg_good") == {"app": "delivered", "alert": "skipped"})
        # Dead, and its dependent on a failure with it (the same event, no more readable for it).
        wait_until(lambda: delivery_states(gw, "msg_bad") == {"app": "dead", "alert": "dead"})
        detail = event_detail(gw, "msg_bad")
        assert detail.unreadable is not None and detail.event.payload is None
        for delivery in detail.deliveries:
            assert (delivery.last_error or "").startswith("the stored event cannot be read: JSONDecodeError")
        assert [r.headers["x-hookyard-attempt"] for r in downstream.received("/app")] == ["1", "1", "2"]
        assert downstream.received("/a") == []
        for action in ("app", "alert"):
            assert gw.metric("hookyard_deliveries_total", route="users", action=action, outcome="dead") == 1
        wait_until(lambda: len(finished) == 6)  # both retries, good: 2, bad: 2
        bad = [f for f in finished if f[1] == "dead"]
        assert [f[:3] + f[4:] for f in bad] == [
            ("app", "dead", "dead", True),
            ("alert", "dead", "dead", True),
        ]
        assert all(f[3].startswith("the stored event cannot be read: ") for f in bad)
        logged = [
            r for r in caplog.records if r.getMessage() == "delivery dead" and r.levelno >= logging.WARNING
        ]
        assert [(r.event_id, r.source, r.route, r.action) for r in logged] == [  # type: ignore[attr-defined]
            ("msg_bad", "consignease", "users", "app"),
            ("msg_bad", "consignease", "users", "alert"),
        ]

        # A replay runs it again: dead again, the same way, and nothing else goes wrong.
        ops = Operations(gw.gateway.storage, gw.gateway.table, wake=gw.gateway.engine.wake)
        replayed = asyncio.run_coroutine_threadsafe(ops.replay_event("msg_bad"), gw.loop).result(10)
        assert replayed["replayed"] == 1
        wait_until(lambda: len([f for f in finished if f[1] == "dead"]) == 4)
        assert delivery_states(gw, "msg_bad") == {"app": "dead", "alert": "dead"}
        assert downstream.received("/a") == [] and len(downstream.received("/app")) == 3
        assert gw.metric("hookyard_deliveries_total", route="users", action="app", outcome="dead") == 2
    assert "delivery loop failed" not in caplog.text


# -- retry policy ------------------------------------------------------------------------------------


def test_jitter_keeps_each_delay_within_its_band_and_spreads_them() -> None:
    from gateway.backoff import next_delay
    from gateway.config import RetryPolicy

    policy = RetryPolicy(schedule=[10.0, 60.0], jitter=0.2)
    for attempt, scheduled in ((1, 10.0), (2, 60.0)):
        delays = [next_delay(policy, attempt) for _ in range(500)]
        assert all(d is not None and scheduled * 0.8 <= d <= scheduled * 1.2 for d in delays), delays
        spread = [d for d in delays if d is not None]
        # Spread both ways, not one constant: deliveries that failed together do not retry together.
        assert min(spread) < scheduled < max(spread)
        assert len(set(spread)) > 400
    assert next_delay(policy, 3) is None  # the schedule is used up: dead
    assert next_delay(RetryPolicy(schedule=[10.0], jitter=0), 1) == 10.0
    # The receiver's Retry-After wins when it asks for longer than the jittered delay, not when shorter.
    assert next_delay(policy, 1, retry_after=30.0) == 30.0
    assert 8.0 <= (next_delay(policy, 1, retry_after=1.0) or 0) <= 12.0


def test_retry_after_holds_a_delivery_back_an_hour_at_most_or_the_schedule_longest() -> None:
    from gateway.backoff import next_delay
    from gateway.config import RetryPolicy

    # Ten years, from a wrong header: the delivery would stay pending, out of replay's reach, for as long.
    ten_years = 315_360_000.0
    assert next_delay(RetryPolicy(schedule=[1.0, 5.0], jitter=0), 1, retry_after=ten_years) == 3600.0
    assert next_delay(RetryPolicy(schedule=[1.0, 5.0], jitter=0), 1, retry_after=1800.0) == 1800.0
    # A schedule that waits longer than an hour by itself lets a receiver ask for as long.
    assert next_delay(RetryPolicy(schedule=[1.0, 86400.0], jitter=0), 1, retry_after=ten_years) == 86400.0


def test_408_from_downstream_is_retried(tmp_path, downstream: Downstream) -> None:
    downstream.answer("/app", 408, 200)
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:
        body, headers = svix_request(msg_id="msg_408")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_408") == {"app": "delivered"})
        [history] = event_detail(gw, "msg_408").attempts.values()
        assert [(a.outcome, a.status_code) for a in history] == [("retry", 408), ("delivered", 200)]


def test_retry_after_as_an_http_date_is_honoured(tmp_path, downstream: Downstream) -> None:
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:
        # Whole seconds only in an HTTP date: three seconds ahead means at least two from the answer.
        downstream.answer("/app", (503, {"Retry-After": formatdate(time.time() + 3, usegmt=True)}), 200)
        body, headers = svix_request(msg_id="msg_503_date")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_503_date") == {"app": "delivered"}, timeout=15)
        first, second = event_detail(gw, "msg_503_date").attempts.popitem()[1]
        # The schedule says 50 ms; the receiver asked for a time seconds away.
        assert second.started_at - first.started_at >= 1.5
        assert (first.outcome, first.status_code) == ("retry", 503)


@pytest.fixture
def far_east_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time 14 hours ahead of UTC (Line Islands), for as long as the test runs."""
    monkeypatch.setenv("TZ", "LINT-14")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    "written",
    [
        # RFC 5322's "-0000" (formatdate's), which email.utils reads as a time in no known zone, and asctime()
        # with no zone at all: RFC 9110 says an HTTP date is GMT whichever way it is written.
        lambda when: formatdate(when),
        lambda when: time.asctime(time.gmtime(when)),
    ],
    ids=["minus-0000", "asctime"],
)
def test_retry_after_as_an_http_date_without_a_zone_is_gmt(
    tmp_path, downstream: Downstream, far_east_clock: None, written: Callable[[float], str]
) -> None:
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:
        # Read as local time, three seconds ahead would be 14 hours ago: retried after the schedule's 50 ms.
        downstream.answer("/app", (503, {"Retry-After": written(time.time() + 3)}), 200)
        body, headers = svix_request(msg_id="msg_503_gmt")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_503_gmt") == {"app": "delivered"}, timeout=15)
        first, second = event_detail(gw, "msg_503_gmt").attempts.popitem()[1]
        assert second.started_at - first.started_at >= 1.5


def test_retry_after_with_a_date_past_any_calendar_is_ignored(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    # A year (or an hour, or a zone) of twenty digits: email.utils raises OverflowError, not ValueError.
    date = "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"
    downstream.answer("/app", (503, {"Retry-After": date}), 200)
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:
        body, headers = svix_request(msg_id="msg_503_overflow")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_503_overflow") == {"app": "delivered"})
        [history] = event_detail(gw, "msg_503_overflow").attempts.values()
        # Retried at the schedule's delay, the answer's status kept, as for any header that is no date.
        assert [(a.outcome, a.status_code, a.error) for a in history] == [
            ("retry", 503, "HTTP 503"),
            ("delivered", 200, None),
        ]
    assert not [r for r in caplog.records if r.getMessage() == "action raised"]


def test_retry_on_decides_which_statuses_are_retried(tmp_path, downstream: Downstream) -> None:
    downstream.answer("/app", 404, 200)
    downstream.answer("/other", 503, 200)
    retry = {"schedule": ["50ms", "50ms"], "jitter": 0, "retry_on": [404]}
    route = users_route(
        downstream,
        {"id": "app", "use": "forward", "retry": retry, "with": {"url": f"{downstream.url}/app"}},
        {"id": "other", "use": "forward", "retry": retry, "with": {"url": f"{downstream.url}/other"}},
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        body, headers = svix_request(msg_id="msg_retry_on")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_retry_on") == {"app": "delivered", "other": "dead"})
        # 404 is retried because the config says so; 503, no longer in retry_on, ends dead at once.
        assert len(downstream.received("/app")) == 2
        assert len(downstream.received("/other")) == 1
        assert gw.metric("hookyard_deliveries_total", route="users", action="app", outcome="retried") == 1
        assert gw.metric("hookyard_deliveries_total", route="users", action="other", outcome="dead") == 1


def test_delivery_duration_is_observed_for_every_attempt(tmp_path, downstream: Downstream) -> None:
    downstream.answer("/app", 500, 200)
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:

        def observed() -> float:
            return gw.metric("hookyard_delivery_duration_seconds_count", route="users", action="app")

        assert observed() == 0
        body, headers = svix_request(msg_id="msg_durations")
        gw.post("/webhooks/consignease", body, headers)
        wait_until(lambda: delivery_states(gw, "msg_durations") == {"app": "delivered"})
        wait_until(lambda: observed() == 2)
        assert gw.metric("hookyard_delivery_duration_seconds_sum", route="users", action="app") > 0


def test_a_retry_due_soon_is_made_on_time_however_long_the_poll_interval(
    tmp_path, downstream: Downstream
) -> None:
    # Nothing else is due when the first attempt fails: the claim loop must wake for the retry it just
    # scheduled instead of sleeping until its next poll.
    downstream.answer("/app", 503, 200)
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"]["poll_interval"] = "30s"
    config["defaults"]["retry"] = {"schedule": ["200ms"], "jitter": 0}
    with RunningGateway(config) as gw:
        body, headers = svix_request(msg_id="msg_soon")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        started = time.monotonic()
        downstream.wait_for(2, "/app", timeout=10)
        assert time.monotonic() - started < 5


def test_with_every_slot_busy_the_next_due_delivery_starts_when_one_frees_up(
    tmp_path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A result that frees the slot the engine waits for is committed at once, never held back to ride
    # along with a later batch (nothing else would commit here).
    monkeypatch.setattr(sqlite_module, "RIDE_ALONG_DELAY", 2.0)
    # Each attempt holds the one slot while the next events fall due.
    config = one_slot_config(tmp_path, downstream, delay=0.2)
    with RunningGateway(config) as gw:
        started = time.monotonic()
        for n in range(4):
            body, headers = svix_request(msg_id=f"msg_slot_{n}")
            assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        downstream.wait_for(4, "/app", timeout=10)
        assert time.monotonic() - started < 5
        assert downstream.max_in_flight == 1


def test_a_new_events_deliveries_start_from_its_commit_without_a_claim(
    tmp_path, downstream: Downstream
) -> None:
    # Leased in the event's own transaction, they start once it is durable: the claim loop, asleep for
    # its long poll interval, is neither woken nor needed.
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"]["poll_interval"] = "30s"
    with RunningGateway(config) as gw:
        storage = gw.gateway.storage
        claims: list[float] = []
        claim = storage.claim

        async def counted_claim(*args: Any, **kwargs: Any) -> Any:
            claims.append(time.monotonic())
            return await claim(*args, **kwargs)

        wait_until(lambda: gw.gateway.engine._due_at == math.inf)  # the claim loop read an empty queue
        storage.claim = counted_claim  # type: ignore[method-assign]
        for n in range(3):
            body, headers = svix_request(msg_id=f"msg_leased_{n}")
            assert gw.post("/webhooks/consignease", body, headers).status_code == 200
            downstream.wait_for(n + 1, "/app")
        wait_until(
            lambda: all(delivery_states(gw, f"msg_leased_{n}") == {"app": "delivered"} for n in range(3))
        )
        assert [r.headers["x-hookyard-attempt"] for r in downstream.received("/app")] == ["1", "1", "1"]
        assert claims == []


def test_events_stored_together_lease_no_more_deliveries_than_there_are_slots(
    tmp_path, downstream: Downstream
) -> None:
    # Stored in the same turn of the loop, they commit in one batch: each lease must count the slots the
    # leases before it hold, though none of their deliveries runs yet.
    downstream.delay = 0.2
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"]["concurrency"] = 2
    with RunningGateway(config) as gw:
        gateway = gw.gateway

        async def store_together() -> list[int]:
            stored = []
            for n in range(8):
                stored.append(store_webhook(gateway, f"msg_together_{n}"))
            return [len(ingested.claims) for ingested in await asyncio.gather(*stored)]

        leased = asyncio.run_coroutine_threadsafe(store_together(), gw.loop).result(10)
        assert leased == [1, 1, 0, 0, 0, 0, 0, 0]
        downstream.wait_for(8, "/app")
        assert downstream.max_in_flight == 2


def test_the_claim_loop_leaves_alone_the_slots_held_for_leases(tmp_path, downstream: Downstream) -> None:
    config = one_slot_config(tmp_path, downstream, delay=0.2)
    with RunningGateway(config) as gw:
        gateway = gw.gateway
        wait_until(lambda: gateway.engine._due_at == math.inf)  # the claim loop read an empty queue

        async def queue_one_then_lease_one() -> int:
            await queue_unannounced(gateway, "msg_queued")  # due, and nobody told
            stored = store_webhook(gateway, "msg_leased")
            gateway.engine.wake()  # the claim loop claims while the lease's commit waits for its fsync
            return len((await stored).claims)

        assert asyncio.run_coroutine_threadsafe(queue_one_then_lease_one(), gw.loop).result(10) == 1
        downstream.wait_for(2, "/app")
        assert downstream.max_in_flight == 1


def test_a_new_event_never_starts_ahead_of_a_delivery_that_was_due_first(
    tmp_path, downstream: Downstream
) -> None:
    config = one_slot_config(tmp_path, downstream, delay=0.1)
    with RunningGateway(config) as gw:
        gateway = gw.gateway

        async def queue_one_due_soon() -> None:
            await queue_unannounced(gateway, "msg_due_first", due_at=time.time() + 0.3)
            gateway.engine.wake()  # as whatever queues a delivery does

        async def store_once_it_is_due() -> int:
            # The loop is held past the moment it fell due, as a busy loop would be: the claim loop, asleep
            # until then, has not claimed it yet.
            time.sleep(0.5)
            stored = store_webhook(gateway, "msg_new")
            return len((await stored).claims)

        asyncio.run_coroutine_threadsafe(queue_one_due_soon(), gw.loop).result(10)
        # The claim loop has looked, found nothing due yet, and sleeps until it is.
        wait_until(lambda: 0 < gateway.engine._due_at < math.inf)
        assert asyncio.run_coroutine_threadsafe(store_once_it_is_due(), gw.loop).result(10) == 0
        received = downstream.wait_for(2, "/app")
        assert [r.headers["idempotency-key"] for r in received] == ["msg_due_first", "msg_new"]


def test_a_read_of_the_queue_older_than_the_last_wake_lets_no_new_event_ahead(
    tmp_path, downstream: Downstream
) -> None:
    # The claim loop reads when the next delivery falls due; a delivery queued (and the engine woken) after
    # that read began is missing from it, so the read must not tell leases the way is clear.
    config = one_slot_config(tmp_path, downstream, delay=0.1)
    with RunningGateway(config) as gw:
        gateway, storage = gw.gateway, gw.gateway.storage
        wait_until(lambda: gateway.engine._due_at == math.inf)  # the claim loop read an empty queue
        read = storage.next_due_at
        leased: list[int] = []

        def store_new() -> None:
            stored = store_webhook(gateway, "msg_new")
            stored.add_done_callback(lambda done: leased.append(len(done.result().claims)))

        async def read_then_queue_one(**kwargs: Any) -> float | None:
            due = await read(**kwargs)  # nothing due: the read is done before the delivery below is queued
            await queue_unannounced(gateway, "msg_queued")
            gateway.engine.wake()
            asyncio.get_running_loop().call_soon(store_new)  # before the claim loop looks again
            storage.next_due_at = read  # type: ignore[method-assign]
            return due

        storage.next_due_at = read_then_queue_one  # type: ignore[method-assign]
        gw.loop.call_soon_threadsafe(
            gateway.engine.wake
        )  # the claim loop looks: nothing to claim, then reads
        received = downstream.wait_for(2, "/app")
        assert [r.headers["idempotency-key"] for r in received] == ["msg_queued", "msg_new"]
        assert leased == [0]


def test_an_event_queued_while_its_commit_waits_is_not_overtaken_by_a_later_one(
    tmp_path, downstream: Downstream
) -> None:
    config = one_slot_config(tmp_path, downstream, delay=0.3)
    with RunningGateway(config) as gw:
        gateway = gw.gateway
        helper = gateway.storage._writer.syncer.process.pid

        def store(msg_id: str) -> asyncio.Future[Any]:
            return store_webhook(gateway, msg_id)

        assert gw.post("/webhooks/consignease", *svix_request(msg_id="msg_running")).status_code == 200
        stored: list[asyncio.Future[Any]] = []
        os.kill(helper, signal.SIGSTOP)  # a slow disk: commits wait for their fsync
        try:
            # The one slot is taken: this one goes to the queue, once its commit is on disk.
            gw.loop.call_soon_threadsafe(lambda: stored.append(store("msg_queued")))
            downstream.wait_for(1, "/app")
            wait_until(lambda: not gateway.engine._running)  # the slot is free; the queued one's commit waits
            gw.loop.call_soon_threadsafe(lambda: stored.append(store("msg_later")))
            wait_until(lambda: len(stored) == 2)
        finally:
            os.kill(helper, signal.SIGCONT)
        received = downstream.wait_for(3, "/app")
        assert [r.headers["idempotency-key"] for r in received] == ["msg_running", "msg_queued", "msg_later"]
        assert [len(future.result().claims) for future in stored] == [0, 0]


def test_no_lease_takes_the_slots_a_claim_in_progress_fills(tmp_path, downstream: Downstream) -> None:
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"].update({"poll_interval": "50ms", "concurrency": 1})
    with RunningGateway(config) as gw:
        engine, storage = gw.gateway.engine, gw.gateway.storage
        claim = storage.claim
        offered: list[Lease | None] = []
        deliveries = [NewDelivery("users", "app")]

        async def claim_while_an_event_asks_for_a_lease(*args: Any, **kwargs: Any) -> Any:
            lease = engine.lease(deliveries)
            offered.append(lease)
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(StorageUnavailable("this event was never stored"))
            engine.ingested(1, lease, failed)
            return await claim(*args, **kwargs)

        storage.claim = claim_while_an_event_asks_for_a_lease  # type: ignore[method-assign]
        wait_until(lambda: len(offered) >= 3)  # claims on the poll interval, the queue read as empty
        assert offered[:3] == [None, None, None]


def test_slots_held_for_a_duplicate_free_up_for_the_claim_loop_waiting_for_them(
    tmp_path, downstream: Downstream
) -> None:
    config = one_slot_config(tmp_path, downstream)
    with RunningGateway(config) as gw:
        gateway = gw.gateway
        endpoint = gateway.table.endpoints["/webhooks/consignease"]
        wait_until(lambda: gateway.engine._due_at == math.inf)  # the claim loop read an empty queue

        async def scenario() -> int:
            body, headers = svix_request(msg_id="msg_twice")
            await gateway.storage.ingest(gateway.ingress.accept(endpoint, headers, body)[0], [])
            await queue_unannounced(gateway, "msg_due")  # due; the engine not told yet
            stored = store_webhook(gateway, "msg_twice")  # holds the slot
            gateway.engine.wake()  # the claim loop finds no free slot, and waits for one
            return len((await stored).claims)

        assert asyncio.run_coroutine_threadsafe(scenario(), gw.loop).result(10) == 0
        started = time.monotonic()
        [received] = downstream.wait_for(1, "/app", timeout=10)
        assert received.headers["idempotency-key"] == "msg_due"
        assert time.monotonic() - started < 5  # not after the 30 s poll interval


def test_a_request_cancelled_while_its_commit_waits_still_has_its_delivery_started(
    tmp_path, downstream: Downstream
) -> None:
    # The ASGI door (requests the fast path leaves) awaits the store: a shutdown's deadline can cancel the
    # request while the commit, which goes on regardless, waits for its fsync. The delivery it leased must
    # start all the same, not wait for its lease to run out.
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"]["lease"] = "30s"
    with RunningGateway(config) as gw:
        gateway = gw.gateway
        endpoint = gateway.table.endpoints["/webhooks/consignease"]
        wait_until(lambda: gateway.engine._due_at == math.inf)  # the claim loop read an empty queue
        body, headers = svix_request(msg_id="msg_cancelled")
        helper = gateway.storage._writer.syncer.process.pid

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def cancel_while_committing() -> bool:
            request = asyncio.create_task(
                gateway.ingress._receive_and_store({"type": "http"}, receive, endpoint, headers)
            )
            await asyncio.sleep(0.2)  # the commit waits for the (stopped) fsync helper
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            return request.cancelled()

        os.kill(helper, signal.SIGSTOP)
        try:
            assert asyncio.run_coroutine_threadsafe(cancel_while_committing(), gw.loop).result(10)
        finally:
            os.kill(helper, signal.SIGCONT)
        [received] = downstream.wait_for(1, "/app", timeout=10)  # well before the 30 s lease runs out
        assert received.headers["idempotency-key"] == "msg_cancelled"


def test_a_commit_that_fails_gives_back_the_slots_it_held(tmp_path, downstream: Downstream) -> None:
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["delivery"]["concurrency"] = 1
    with RunningGateway(config) as gw:
        gateway = gw.gateway
        wait_until(lambda: gateway.engine._due_at == math.inf)  # the claim loop read an empty queue

        async def store_on_a_read_only_store() -> tuple[int, str]:
            await gateway.storage._run(lambda conn: conn.execute("PRAGMA query_only = ON"))
            stored = store_webhook(gateway, "msg_not_stored")
            held = gateway.engine._reserved  # the one slot, leased to the event's delivery
            try:
                await stored
            except StorageUnavailable as exc:
                return held, str(exc)
            finally:
                # Not through the writer: with query_only on, even its BEGIN IMMEDIATE fails.
                gateway.storage._writer.connection.execute("PRAGMA query_only = OFF")
            return held, "stored"

        held, outcome = asyncio.run_coroutine_threadsafe(store_on_a_read_only_store(), gw.loop).result(10)
        assert (held, outcome.startswith("sqlite:")) == (1, True), outcome
        # The slot is free again: the next event is delivered.
        body, headers = svix_request(msg_id="msg_stored")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        [received] = downstream.wait_for(1, "/app")
        assert received.headers["idempotency-key"] == "msg_stored"


def test_deliveries_leased_as_the_engine_stops_are_given_back(tmp_path, downstream: Downstream) -> None:
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)])) as gw:
        gateway = gw.gateway

        async def store_while_stopping() -> float:
            stored = store_webhook(gateway, "msg_at_stop")  # leased
            await gateway.engine.stop(1.0)  # stopping before the commit is done: it waits for it
            assert stored.done() and stored.result().claims
            return time.time()

        stopped = asyncio.run_coroutine_threadsafe(store_while_stopping(), gw.loop).result(10)
        [delivery] = event_detail(gw, "msg_at_stop").deliveries
        # Due again at once for the next start, rather than when the lease would have run out, and with
        # no attempt counted: none was made.
        assert (delivery.state, delivery.attempts) == ("pending", 0)
        assert delivery.due_at is not None and delivery.due_at <= stopped + 0.5
        assert downstream.received("/app") == []


def test_deliveries_a_claim_leases_as_the_engine_stops_are_given_back(
    tmp_path, downstream: Downstream
) -> None:
    with RunningGateway(one_slot_config(tmp_path, downstream)) as gw:
        gateway = gw.gateway
        claimed = asyncio.Event()
        claim = gateway.storage.claim

        async def claim_then_linger(*args: Any, **kwargs: Any) -> Any:
            # The claim's commit is done; the engine stops before the claim loop has its result.
            claims = await claim(*args, **kwargs)
            if claims:
                claimed.set()
                await asyncio.sleep(0.3)
            return claims

        gateway.storage.claim = claim_then_linger  # type: ignore[method-assign]

        async def stop_while_claiming() -> float:
            await queue_unannounced(gateway, "msg_claimed_at_stop")
            gateway.engine.wake()
            await claimed.wait()
            await gateway.engine.stop(1.0)
            return time.time()

        stopped = asyncio.run_coroutine_threadsafe(stop_while_claiming(), gw.loop).result(10)
        [delivery] = event_detail(gw, "msg_claimed_at_stop").deliveries
        # Not left leased, an attempt counted, until the next start: given back, due at once, no attempt.
        assert (delivery.state, delivery.attempts) == ("pending", 0)
        assert delivery.due_at is not None and delivery.due_at <= stopped + 0.5
        assert downstream.received("/app") == []


def test_a_result_committed_as_the_engine_stops_keeps_its_backoff(tmp_path, downstream: Downstream) -> None:
    downstream.answer("/app", 500)
    config = gateway_config(tmp_path, routes=[users_route(downstream)])
    config["defaults"]["retry"]["schedule"] = ["1h"]
    with RunningGateway(config) as gw:
        gateway = gw.gateway
        recorded = asyncio.Event()
        finish = gateway.storage.finish

        async def finish_then_hang(*args: Any, **kwargs: Any) -> Any:
            # The retry is committed, and the task is cancelled before it runs on: as if the engine were
            # stopped between the commit and the task's next step.
            await finish(*args, **kwargs)
            recorded.set()
            await asyncio.Event().wait()

        gateway.storage.finish = finish_then_hang  # type: ignore[method-assign]
        body, headers = svix_request(msg_id="msg_stopping")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200

        async def stop_once_recorded() -> None:
            await recorded.wait()
            await gateway.engine.stop(0.1)  # the task is still running: cancelled, its lease released

        started = time.time()
        asyncio.run_coroutine_threadsafe(stop_once_recorded(), gw.loop).result(10)
        [delivery] = event_detail(gw, "msg_stopping").deliveries
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("pending", 1, 500)
        assert delivery.due_at is not None and delivery.due_at >= started + 3000  # the hour's backoff stands


def test_delivered_gives_the_outcome_of_its_status_whether_made_once_or_anew() -> None:
    from gateway.actions import Outcome, delivered

    for status in (None, 199, 200, 204, 299, 300, 200.0):
        outcome = delivered(status)  # type: ignore[arg-type]
        assert outcome == Outcome("delivered", status)  # type: ignore[arg-type]
        assert type(outcome.status_code) is type(status)
    assert delivered(202) is delivered(202)  # immutable: the usual ones are shared, not made per delivery


@pytest.mark.parametrize(
    ("table", "column"), [("events", "type"), ("deliveries", "route")], ids=["event-type", "delivery-route"]
)
def test_a_delivery_whose_stored_text_is_not_utf8_ends_dead_and_the_others_go_out(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture, table: str, column: str
) -> None:
    # A row written by hand (`CAST(x'ff' AS TEXT)` in a `sqlite3` shell) or by another version: sqlite3 failed
    # every claim that read it, and with them every delivery of the gateway, for as long as it stayed due.
    downstream.answer("/app", 500)  # the first attempt of each: both wait for a retry
    config = gateway_config(tmp_path, routes=[alert_on_failure_route(downstream, "/a")])
    config["defaults"]["retry"] = {"schedule": ["1h"], "jitter": 0}  # due again only as the test says
    with RunningGateway(config) as gw:
        for msg_id in ("msg_bad", "msg_good"):
            body, headers = svix_request(msg_id=msg_id)
            assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: sum(map(len, event_detail(gw, "msg_good").attempts.values())) == 1)
        wait_until(lambda: sum(map(len, event_detail(gw, "msg_bad").attempts.values())) == 1)
        with sqlite3.connect(tmp_path / "hookyard.db") as conn:
            seq = "(SELECT seq FROM events WHERE event_id = 'msg_bad')"
            where = "event_id = 'msg_bad'" if table == "events" else f"event_seq = {seq} AND action = 'app'"
            conn.execute(f"UPDATE {table} SET {column} = CAST(X'7573FF' AS TEXT) WHERE {where}")
            conn.execute("UPDATE deliveries SET due_at = ? WHERE state = 'pending'", (time.time(),))
        conn.close()

        wait_until(lambda: delivery_states(gw, "msg_good") == {"app": "delivered", "alert": "skipped"})
        wait_until(lambda: delivery_states(gw, "msg_bad")["app"] == "dead")
        [dead] = [
            d for d in event_detail(gw, "msg_bad").deliveries if d.state == "dead" and d.action == "app"
        ]
        assert f"its {column} is not UTF-8 ('us\ufffd')" in (dead.last_error or "")
        # Its dependent on a failure runs on the event, if that can be read; ends dead the same way if not.
        alert = "dead" if table == "events" else "delivered"
        wait_until(lambda: delivery_states(gw, "msg_bad")["alert"] == alert)
        route = "us\ufffd" if column == "route" else "users"
        assert gw.metric("hookyard_deliveries_total", route=route, action="app", outcome="dead") == 1
        assert gw.client.get(f"{gw.ops_url}/metrics").status_code == 200
    assert "delivery loop failed" not in caplog.text


def test_observer_hooks_that_raise_system_exit_are_logged_naming_their_plugin_and_the_gateway_goes_on(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    # A SystemExit (a library's sys.exit()) from either hook ended `serve`.
    from gateway.plugins import new_plugin_manager

    class Exits:
        @hookimpl
        def event_accepted(self, event):  # type: ignore[no-untyped-def]
            raise SystemExit(1)

        @hookimpl
        def delivery_finished(self, delivery, outcome, final):  # type: ignore[no-untyped-def]
            raise SystemExit(2)

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(Exits(), name="exits")
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(downstream)]), pm=pm) as gw:
        for msg_id in ("msg_exit_1", "msg_exit_2"):
            body, headers = svix_request(msg_id=msg_id)
            assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
        wait_until(lambda: len(downstream.received("/app")) == 2)
        wait_until(
            lambda: (
                len([r for r in caplog.records if r.getMessage() == "a delivery_finished hook failed"]) == 2
            )
        )
    failed = [r for r in caplog.records if r.getMessage().endswith("hook failed")]
    assert sorted((r.getMessage(), r.plugin, r.levelname) for r in failed) == [
        ("a delivery_finished hook failed", "exits", "ERROR"),
        ("a delivery_finished hook failed", "exits", "ERROR"),
        ("an event_accepted hook failed", "exits", "ERROR"),
        ("an event_accepted hook failed", "exits", "ERROR"),
    ]
