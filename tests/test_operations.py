"""Operating Hookyard: hot reload as a ConfigMap update does it, SIGHUP, SIGTERM under load, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import inspect
import io
import json
import logging
import os
import selectors
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import BaseModel

from gateway import app, delivery, hookimpl, protocol, stalls
from gateway.actions import Action, Job, Outcome, Resources, delivered
from gateway.app import INGRESS_DRAIN_TIMEOUT, OPS_DRAIN_TIMEOUT
from gateway.config import DeliveryEngine, parse_config
from gateway.plugins import new_plugin_manager
from gateway.storage.sqlite import SCHEMA
from plugins.svix import SvixProvider
from tests import support
from tests.support import (
    Downstream,
    GatewayProcess,
    RunningGateway,
    ServerThread,
    bound_socket,
    consignly_body,
    consignly_headers,
    event_loops,
    free_port,
    gateway_config,
    metric_value,
    plugins_with,
    self_signed,
    svix_request,
    wait_until,
    worst_case_shutdown,
)


def users_config(tmp_path: Path, downstream: Downstream, target: str, **extra: Any) -> dict[str, Any]:
    config = gateway_config(tmp_path, **extra)
    config["reload"] = {"interval": "100ms"}
    config["routes"] = [
        {
            "name": "users",
            "source": "consignease",
            "actions": [{"id": "app", "use": "forward", "with": {"url": f"{downstream.url}{target}"}}],
        }
    ]
    return config


def stop_with_sigterm(process: subprocess.Popen[bytes], timeout: float = 15) -> tuple[int, float]:
    """SIGTERM to process: its exit status, and how long it took to come."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    exit_code = process.wait(timeout)
    return exit_code, time.monotonic() - started


# A process that gives up on what never ends exits within the bounds its test sums up, plus EXIT_SLACK for a
# busy machine (the interpreter's own start of the shutdown and its exit); one that waited for ever instead is
# waited for STUCK_EXIT_WAIT, over three times the largest of those sums with its slack.
EXIT_SLACK = 5
STUCK_EXIT_WAIT = 30


def users_config_file(tmp_path: Path, downstream: Downstream) -> tuple[Path, dict[str, Any]]:
    """users_config, on ports of its own and logging at info, written to tmp_path/routes.yaml: for a test
    that starts `hookyard serve` itself (one that never turns ready, say)."""
    config = users_config(tmp_path, downstream, "/app")
    config["listen"] = {"host": "127.0.0.1", "port": free_port()}
    config["ops"] = {"host": "127.0.0.1", "port": free_port()}
    config["log"] = {"level": "info"}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


class ConfigMapVolume:
    """A directory laid out as the kubelet lays out a ConfigMap volume, updated the way it updates one:
    write a new timestamped directory, then atomically swap the `..data` symlink. Files are never
    rewritten in place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.generation = 0

    @property
    def path(self) -> Path:
        return self.root / "routes.yaml"

    def publish(self, config: dict[str, Any] | str) -> None:
        self.generation += 1
        version = self.root / f"..2026_11_22_10_00_{self.generation:02}.{os.getpid()}"
        version.mkdir()
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        (version / "routes.yaml").write_text(text)
        staging = self.root / "..data_tmp"
        staging.symlink_to(version.name)
        staging.replace(self.root / "..data")  # rename(2): atomic
        if not self.path.is_symlink():
            self.path.symlink_to("..data/routes.yaml")


class Holding:
    """A receiver slower than any timeout: requests to /held/* wait until `release` is set, then the
    Downstream answers them. `held` counts the requests waiting right now."""

    def __init__(self) -> None:
        self.downstream = Downstream()
        self.release = threading.Event()
        self.held = 0
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/held/"):
            with self.lock:
                self.held += 1
            try:
                while not self.release.is_set():
                    await asyncio.sleep(0.02)
            finally:
                with self.lock:
                    self.held -= 1
        await self.downstream(scope, receive, send)


@pytest.fixture
def holding() -> Iterator[Holding]:
    receiver = Holding()
    with ServerThread(receiver) as server:
        receiver.downstream.url = f"http://127.0.0.1:{server.port}"
        try:
            yield receiver
        finally:
            receiver.release.set()  # let the server's held requests end before it stops


def test_configmap_swap_changes_routing_without_restart(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    volume = ConfigMapVolume(tmp_path / "config")
    volume.publish(users_config(tmp_path, downstream, "/before"))
    with RunningGateway(volume.path) as gw:
        body, headers = svix_request(msg_id="msg_before")
        gw.post("/webhooks/consignease", body, headers)
        downstream.wait_for(1, "/before")

        volume.publish(users_config(tmp_path, downstream, "/after"))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        body, headers = svix_request(msg_id="msg_after")
        gw.post("/webhooks/consignease", body, headers)
        [after] = downstream.wait_for(1, "/after")
        assert after.headers["idempotency-key"] == "msg_after"

        # An invalid update is refused: the running routes stay.
        broken = users_config(tmp_path, downstream, "/broken")
        broken["routes"][0]["actions"][0]["use"] = "no-such-action"
        volume.publish(broken)
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1)
        [refused] = [
            r for r in caplog.records if r.getMessage() == "config reload refused; keeping the running config"
        ]
        assert refused.levelno == logging.ERROR and refused.name == "hookyard"
        assert any("no-such-action" in error for error in refused.errors)  # type: ignore[attr-defined]
        body, headers = svix_request(msg_id="msg_still_after")
        gw.post("/webhooks/consignease", body, headers)
        downstream.wait_for(2, "/after")
        assert downstream.received("/broken") == []
        assert gw.client.get(gw.ops_url + "/readyz").status_code == 200
        # The bad update is refused once, not again at every look at the file.
        assert gw.metric("hookyard_config_reloads_total", result="error") == 1

        # A source added by a reload answers on its path.
        added = users_config(tmp_path, downstream, "/after")
        added["sources"]["extra"] = {"path": "/webhooks/extra", "provider": "consignly", "secrets": ["s"]}
        volume.publish(added)
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 2)
        assert gw.post("/webhooks/extra", b"{}", {}).json()["error"] == "missing_signature"


def test_a_route_event_type_its_provider_never_sends_is_logged_at_start_and_at_reload(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    # What `hookyard check` warns of, for a file that reaches the gateway unchecked (a ConfigMap edit).
    def consignly_config(events: list[str | int]) -> dict[str, Any]:
        config = users_config(tmp_path, downstream, "/app")
        config["sources"]["consignly"] = {
            "path": "/webhooks/consignly",
            "provider": "consignly",
            "secrets": ["s"],
        }
        config["routes"].append(
            {**config["routes"][0], "name": "consignments", "source": "consignly", "events": events}
        )
        return config

    def warnings() -> list[str]:
        return [
            r.warning  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage() == "a route's event type is never sent"
        ]

    volume = ConfigMapVolume(tmp_path / "config")
    volume.publish(consignly_config(["ConsignmentCreate", 102]))
    with RunningGateway(volume.path) as gw:
        wait_until(lambda: warnings() != [])
        assert warnings() == [
            "routes[1].events[0] (consignments): consignly sends no event type 'ConsignmentCreate' "
            "(did you mean ConsignmentCreated?); the route never matches it"
        ]
        volume.publish(consignly_config(["ConsignmentCreated", "consignment.creatd"]))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        assert warnings()[1:] == [
            "routes[1].events[1] (consignments): consignly sends no event type 'consignment.creatd' "
            "(did you mean consignment.created?); the route never matches it"
        ]


def test_a_reload_lets_running_deliveries_finish_and_pending_ones_use_the_new_config(
    tmp_path: Path, holding: Holding
) -> None:
    downstream, url = holding.downstream, holding.downstream.url
    config = gateway_config(tmp_path)
    config["reload"] = {"interval": "100ms"}
    config["defaults"] = {"retry": {"schedule": ["1s"] * 20, "jitter": 0}, "timeout": "30s"}
    config["routes"] = [
        {
            "name": "users",
            "source": "consignease",
            "actions": [
                {"id": "slow", "use": "forward", "with": {"url": f"{url}/held/slow"}},
                {"id": "flaky", "use": "forward", "with": {"url": f"{url}/flaky/old"}},
                {"id": "removed", "use": "forward", "with": {"url": f"{url}/removed"}},
            ],
        }
    ]
    downstream.answer("/flaky/old", *[503] * 50)
    downstream.answer("/removed", *[503] * 50)
    volume = ConfigMapVolume(tmp_path / "config")
    volume.publish(config)

    def deliveries(gw: RunningGateway) -> dict[str, dict[str, Any]]:
        event = gw.client.get(gw.ops_url + "/admin/events/msg_reloaded").json()
        return {d["action"]: d for d in event["deliveries"]}

    with RunningGateway(volume.path) as gw:
        body, headers = svix_request(msg_id="msg_reloaded")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        # slow is in flight; flaky and removed failed once and wait for their retry.
        wait_until(lambda: holding.held == 1)
        downstream.wait_for(1, "/flaky/old")
        downstream.wait_for(1, "/removed")
        assert {a: d["state"] for a, d in deliveries(gw).items()} == {
            "slow": "pending",
            "flaky": "pending",
            "removed": "pending",
        }

        # The new config keeps slow as it is, sends flaky elsewhere and drops removed.
        changed = copy.deepcopy(config)
        slow, flaky, _removed = changed["routes"][0]["actions"]
        flaky["with"]["url"] = f"{url}/flaky/new"
        changed["routes"][0]["actions"] = [slow, flaky]
        volume.publish(changed)
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)

        # A pending delivery of an action that still exists runs with the new config.
        [moved] = downstream.wait_for(1, "/flaky/new")
        assert moved.headers["idempotency-key"] == "msg_reloaded"
        # One of an action that is gone ends dead, saying why; a replay can run it again.
        wait_until(lambda: deliveries(gw)["removed"]["state"] == "dead")
        removed = deliveries(gw)["removed"]
        expected = "action 'removed' of route 'users' is no longer configured"
        assert removed["last_error"] == expected
        assert removed["attempts"][-1]["error"] == expected
        wait_until(lambda: deliveries(gw)["flaky"]["state"] == "delivered")

        # The delivery in flight during the reload was not disturbed: it finishes once the receiver answers.
        assert deliveries(gw)["slow"]["state"] == "pending" and holding.held == 1
        holding.release.set()
        wait_until(lambda: deliveries(gw)["slow"]["state"] == "delivered")
        [slow_request] = downstream.received("/held/slow")
        assert slow_request.headers["idempotency-key"] == "msg_reloaded"
        assert [a["outcome"] for a in deliveries(gw)["slow"]["attempts"]] == ["delivered"]


def labelled_series(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition that has a source, route or action label, by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if {"source", "route", "action"} & sample.labels.keys()
    }


def test_a_reload_drops_the_metric_series_of_what_it_removed_and_keeps_the_rest(
    tmp_path: Path, downstream: Downstream
) -> None:
    """A removed source, route or action kept its series on /metrics for ever, with their last values:
    a dashboard showed, and an alert fired on, something that no longer exists."""
    config = gateway_config(tmp_path, downstream.url)
    config["reload"] = {"interval": "100ms"}
    users = config["routes"][0]
    users["actions"].append({"id": "audit", "use": "forward", "with": {"url": f"{downstream.url}/audit"}})
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path) as gw:
        body, headers = svix_request(msg_id="msg_metrics")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        body = consignly_body(event_type="ConsignmentCreated", event_id="evt_metrics")
        assert gw.post("/webhooks/consignly", body, consignly_headers(body)).status_code == 200
        assert gw.post("/webhooks/consignly", body, {"x-consignly-signature": "sha256=00"}).status_code == 401
        for route, action in (("users", "app"), ("users", "audit"), ("consignments", "app")):
            labels = {"route": route, "action": action, "outcome": "delivered"}
            wait_until(lambda labels=labels: gw.metric("hookyard_deliveries_total", **labels) == 1)
        before = labelled_series(gw.client.get(gw.ops_url + "/metrics").text)

        def of(series: dict[tuple[str, frozenset[tuple[str, str]]], float], **labels: str) -> set[str]:
            return {name for name, pairs in series if set(labels.items()) <= pairs}

        names = {
            "hookyard_webhooks_received_total",
            "hookyard_ingest_duration_seconds_count",
            "hookyard_webhook_rejections_total",
        }
        assert names <= of(before, source="consignly")
        names = {"hookyard_deliveries_total", "hookyard_delivery_duration_seconds_count"}
        assert names <= of(before, route="users", action="audit")
        assert "hookyard_end_to_end_seconds_count" in of(before, route="consignments")

        # The new config drops the consignly source with its route, and the audit action of users.
        users["actions"].pop()
        config["routes"] = [users]
        del config["sources"]["consignly"]
        path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1, timeout=5)
        after = labelled_series(gw.client.get(gw.ops_url + "/metrics").text)

    gone = {
        key
        for key in before
        if ("source", "consignly") in key[1]
        or ("route", "consignments") in key[1]
        or {("route", "users"), ("action", "audit")} <= key[1]
    }
    assert gone and not gone & after.keys()
    # What remains is as it was: counters go on from their values.
    assert {key: before[key] for key in before.keys() - gone} == after
    assert of(after, route="users", action="app") and of(after, source="consignease")


@pytest.mark.parametrize("query", ["", "?tenant=a"], ids=["fast path", "asgi"])
def test_a_webhook_whose_body_arrives_across_a_reload_is_routed_by_the_config_it_came_in_under(
    tmp_path: Path, downstream: Downstream, query: str
) -> None:
    """The source a webhook is for is looked up once its headers are in, the routes once its body is. A
    reload in between that renamed the source (the same path, its routes following it) left the event
    routed by the new table under the old name: stored, answered 200, and sent nowhere."""
    config_path = tmp_path / "routes.yaml"
    config = users_config(tmp_path, downstream, "/app")
    config["reload"] = {"watch": False}
    config_path.write_text(yaml.safe_dump(config))
    body, headers = svix_request(msg_id="msg_across_a_reload")
    head = f"POST /webhooks/consignease{query} HTTP/1.1\r\nhost: hookyard\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    with RunningGateway(config_path) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head.encode() + body[:10])
            wait_until(lambda: gw.gateway.ingress.in_flight == 1)  # its headers are in: its source is known
            renamed = copy.deepcopy(config)
            renamed["sources"] = {"users-src": config["sources"]["consignease"]}
            renamed["routes"][0]["source"] = "users-src"
            config_path.write_text(yaml.safe_dump(renamed))
            assert asyncio.run_coroutine_threadsafe(gw.gateway.reload(), gw.loop).result(5) is True
            sock.sendall(body[10:])
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200 ")
        [delivered] = downstream.wait_for(1, "/app")
        assert delivered.headers["idempotency-key"] == "msg_across_a_reload"


def parent_and_dependents(url: str, parent: str, path: str, *more_on_failure: str) -> list[dict[str, Any]]:
    """A route's actions: `parent` forwarding to url/path, `alert` after it on failure, `audit` on success,
    and each of more_on_failure on failure too (each forwarding to url/its name)."""

    def after(name: str, when: str) -> dict[str, Any]:
        return {"id": name, "use": "forward", "after": parent, "when": when, "with": {"url": f"{url}/{name}"}}

    return [
        {"id": parent, "use": "forward", "with": {"url": f"{url}/{path}"}},
        after("alert", "failure"),
        after("audit", "success"),
        *(after(name, "failure") for name in more_on_failure),
    ]


def published_with_dependents(
    tmp_path: Path, downstream: Downstream
) -> tuple[dict[str, Any], ConfigMapVolume]:
    """A config whose route `users` runs `app` (its receiver answering 503 for a while) and its dependents,
    published in a ConfigMap volume that the gateway reloads every 100 ms."""
    config = gateway_config(tmp_path)
    config["reload"] = {"interval": "100ms"}
    config["defaults"] = {"retry": {"schedule": ["1s"] * 20, "jitter": 0}, "timeout": "30s"}
    actions = parent_and_dependents(downstream.url, "app", "app")
    config["routes"] = [{"name": "users", "source": "consignease", "actions": actions}]
    downstream.answer("/app", *[503] * 50)
    volume = ConfigMapVolume(tmp_path / "config")
    volume.publish(config)
    return config, volume


def test_the_dependents_of_an_action_a_reload_removed_are_skipped_and_follow_it_once_it_is_back(
    tmp_path: Path, downstream: Downstream
) -> None:
    url = downstream.url
    config, volume = published_with_dependents(tmp_path, downstream)

    def deliveries(gw: RunningGateway) -> dict[str, dict[str, Any]]:
        event = gw.client.get(gw.ops_url + "/admin/events/msg_orphaned").json()
        return {d["action"]: d for d in event["deliveries"]}

    with RunningGateway(volume.path) as gw:
        body, headers = svix_request(msg_id="msg_orphaned")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        downstream.wait_for(1, "/app")

        # The operator moves the dependents to a new action and drops app, whose delivery is retrying.
        moved = copy.deepcopy(config)
        moved["routes"][0]["actions"] = parent_and_dependents(url, "app2", "app2")
        volume.publish(moved)
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        wait_until(lambda: deliveries(gw)["app"]["state"] == "dead")

        # app did not fail, it is gone: neither its failure nor its success runs, and each says why.
        wait_until(lambda: deliveries(gw)["alert"]["state"] == "skipped")
        reason = "parent action 'app' of route 'users' is no longer configured"
        assert {a: (d["state"], d["last_error"]) for a, d in deliveries(gw).items()} == {
            "app": ("dead", "action 'app' of route 'users' is no longer configured"),
            "alert": ("skipped", reason),
            "audit": ("skipped", reason),
        }
        assert downstream.received("/alert") == []

        # Put back (its receiver recovered), and replayed: its dependents follow its new result.
        volume.publish(
            config
            | {"routes": [{**config["routes"][0], "actions": parent_and_dependents(url, "app", "back")}]}
        )
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 2)
        replay = gw.client.post(gw.ops_url + "/admin/replay", json={"mode": "dead", "since": "1h"})
        assert replay.json()["replayed"] == 1
        wait_until(lambda: deliveries(gw)["audit"]["state"] == "delivered")
        assert {a: d["state"] for a, d in deliveries(gw).items()} == {
            "app": "delivered",
            "alert": "skipped",
            "audit": "delivered",
        }
        assert len(downstream.received("/back")) == 1
        assert downstream.received("/alert") == []


def test_a_dependent_of_an_action_a_reload_removed_is_skipped_when_replayed_or_created_on_its_own(
    tmp_path: Path, downstream: Downstream
) -> None:
    # It ran on its parent's stored state, dead with nothing sent: `alert` (when: failure) told of a
    # failure that never happened, as an `acknowledge` would have told the provider.
    url = downstream.url
    config, volume = published_with_dependents(tmp_path, downstream)

    def deliveries(gw: RunningGateway) -> dict[str, tuple[str, str | None, int]]:
        event = gw.client.get(gw.ops_url + "/admin/events/msg_alone").json()
        return {d["action"]: (d["state"], d["last_error"], len(d["attempts"])) for d in event["deliveries"]}

    with RunningGateway(volume.path) as gw:
        body, headers = svix_request(msg_id="msg_alone")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        downstream.wait_for(1, "/app")
        # The dependents move to a new action; app, whose delivery is retrying, is dropped.
        volume.publish(
            config
            | {"routes": [{**config["routes"][0], "actions": parent_and_dependents(url, "app2", "app2")}]}
        )
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        reason = "parent action 'app' of route 'users' is no longer configured"
        gone = {
            "app": ("dead", "action 'app' of route 'users' is no longer configured", 2),
            "alert": ("skipped", reason, 0),
            "audit": ("skipped", reason, 0),
        }
        wait_until(lambda: deliveries(gw) == gone)

        for action in ("alert", "audit"):
            replay = gw.client.post(gw.ops_url + "/admin/events/msg_alone/replay", json={"action": action})
            assert replay.json() == {"replayed": 1, "created": 0, "next_cursor": None, "pending": 0}
            wait_until(lambda: deliveries(gw)[action][0] == "skipped")  # noqa: B023
        time.sleep(0.3)
        assert deliveries(gw) == gone

        # Put back, with a new dependent: created on its own (`missing`), it does not run on app's result
        # either. Replayed, app runs, and its dependents follow its new result.
        volume.publish(
            config
            | {
                "routes": [
                    {**config["routes"][0], "actions": parent_and_dependents(url, "app", "back", "page")}
                ]
            }
        )
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 2)
        missing = {"mode": "missing", "since": "1h", "action": "page"}
        assert gw.client.post(gw.ops_url + "/admin/replay", json=missing).json()["created"] == 1
        wait_until(lambda: deliveries(gw)["page"] == ("skipped", reason, 0))
        replay = gw.client.post(gw.ops_url + "/admin/events/msg_alone/replay", json={"action": "app"})
        assert replay.json()["replayed"] == 1
        wait_until(lambda: deliveries(gw)["audit"][0] == "delivered")
        assert {action: state for action, (state, _, _) in deliveries(gw).items()} == {
            "app": "delivered",
            "alert": "skipped",
            "audit": "delivered",
            "page": "skipped",
        }
        assert len(downstream.received("/back")) == 1
        assert downstream.received("/alert") == []
        assert downstream.received("/page") == []


class ClosesPool:
    """A plugin whose plain shutdown hook closes a pool of its own: `closed` lists it once closed."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    @hookimpl
    def shutdown(self) -> None:
        self.closed.append("pool")


class Pooled:
    """A plugin whose action holds a pool of its own, closed in `closing[label]` seconds (None: never), and
    whose deliveries run until they are cancelled. `started` and `closed` list the labels."""

    def __init__(self, closing: dict[str, float | None]) -> None:
        self.closing = closing
        self.started: list[str] = []
        self.closed: list[str] = []

    @hookimpl
    def register_actions(self) -> list[type[Action]]:
        plugin = self

        class PooledOptions(BaseModel):
            label: str

        class PooledAction(Action):
            name = "pooled"
            Options = PooledOptions
            options: PooledOptions

            async def deliver(self, job: Job) -> Outcome:
                plugin.started.append(self.options.label)
                await asyncio.Event().wait()
                raise AssertionError("unreachable")

            async def aclose(self) -> None:
                seconds = plugin.closing[self.options.label]
                await (asyncio.sleep(seconds) if seconds is not None else asyncio.Event().wait())
                plugin.closed.append(self.options.label)

        return [PooledAction]


def pooled_config(tmp_path: Path, label: str) -> dict[str, Any]:
    config = gateway_config(tmp_path)
    config["reload"] = {"interval": "100ms"}
    config["delivery"] = {"poll_interval": "200ms", "lease": "2m", "shutdown_timeout": "200ms"}
    action = {"id": "app", "use": "pooled", "with": {"label": label}}
    config["routes"] = [{"name": "users", "source": "consignease", "actions": [action]}]
    return config


def replace_the_running_action(tmp_path: Path, plugin: Pooled) -> RunningGateway:
    """A gateway whose action `old`, running a delivery, a reload replaced with `new`; stopped."""
    volume = ConfigMapVolume(tmp_path / "config")
    volume.publish(pooled_config(tmp_path, "old"))
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="pooled")
    with RunningGateway(volume.path, pm=pm) as gw:
        body, headers = svix_request(msg_id="msg_pooled")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: plugin.started == ["old"])
        volume.publish(pooled_config(tmp_path, "new"))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
    assert not gw.thread.is_alive()
    return gw


def test_a_stop_waits_for_the_actions_a_reload_replaced_to_close(tmp_path: Path) -> None:
    # The old action closes once its delivery ends, which the stop cancels: slower than the new one.
    plugin = Pooled({"old": 1.0, "new": 0.0})
    replace_the_running_action(tmp_path, plugin)
    assert sorted(plugin.closed) == ["new", "old"]


def test_a_stop_waits_for_the_actions_to_close_for_a_while_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "ACTION_CLOSE_TIMEOUT", 0.5)
    plugin = Pooled({"old": None, "new": 0.0})  # a pool whose server stopped answering
    started = time.monotonic()
    replace_the_running_action(tmp_path, plugin)
    assert plugin.closed == ["new"]
    assert time.monotonic() - started < 5


def test_an_action_that_never_closes_keeps_none_of_the_others_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "ACTION_CLOSE_TIMEOUT", 0.5)
    # The first a pool whose server stopped answering: the one after it closes all the same.
    plugin = Pooled({"stuck": None, "quick": 0.0})
    config = pooled_config(tmp_path, "stuck")
    config["routes"][0]["actions"].append({"id": "audit", "use": "pooled", "with": {"label": "quick"}})
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="pooled")
    with RunningGateway(config, pm=pm) as gw:
        assert gw.client.get(f"{gw.ops_url}/readyz").status_code == 200
    assert not gw.thread.is_alive()
    assert plugin.closed == ["quick"]


# The bound on a stop that gives up on what never ends: the timeouts each test sets, with the second given to
# what was cancelled (CANCELLED_GRACE), add up to under 3 s, and a stop that waited for ever instead would take
# the 20 s RunningGateway gives its thread. Half of that, so that a busy machine's slow stop is not taken for a
# stuck one.
GIVEN_UP_STOP_BOUND = 10


def test_a_shutdown_hook_waiting_on_a_service_that_never_answers_is_given_up_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin flushes to a service that takes the connection and never answers, with no timeout of its
    own: the stop waited for it for ever, and the store was never closed."""
    monkeypatch.setattr(app, "SHUTDOWN_HOOKS_TIMEOUT", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connections land in its backlog, unanswered
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/audit"

        class Flushes:
            @hookimpl
            async def shutdown(self) -> None:
                async with httpx.AsyncClient(timeout=None) as client:
                    await client.post(url, content=b"the last audit records")

        closes = ClosesPool()
        pm = new_plugin_manager(load_entry_points=False)
        pm.register(closes, name="closes")
        pm.register(Flushes(), name="flushes")  # pluggy calls the last registered first
        gw = RunningGateway(gateway_config(tmp_path), pm=pm).__enter__()
        started = time.monotonic()
        gw.__exit__(None, None, None)
        took = time.monotonic() - started
    assert not gw.thread.is_alive()
    assert took < GIVEN_UP_STOP_BOUND, f"stopping took {took:.1f}s"
    [given_up] = [
        r for r in caplog.records if r.getMessage() == "a shutdown hook did not finish in time; given up"
    ]
    assert given_up.plugin == "flushes"  # type: ignore[attr-defined]
    # The plugin after it is still called: its hook has nothing to wait for, and closes what it opened.
    assert closes.closed == ["pool"]
    # The store was closed, its serving lock with it: the next gateway serves the same file.
    with RunningGateway(gateway_config(tmp_path)):
        pass


class Uploads:
    """A plugin whose action sends each event with the shared aiohttp session, in a task of its own that the
    cancellation of a late attempt does not reach (as the `store` action runs its statements). `sending`
    is set once a send has begun."""

    def __init__(self) -> None:
        self.sending = threading.Event()
        self.sends: set[asyncio.Task[int]] = set()

    @hookimpl
    def register_actions(self) -> list[type[Action]]:
        plugin = self

        class UploadOptions(BaseModel):
            url: str

        class UploadAction(Action):
            name = "upload"
            Options = UploadOptions
            options: UploadOptions

            async def deliver(self, job: Job) -> Outcome:
                async def send() -> int:
                    plugin.sending.set()
                    archive = io.BytesIO(job.event.body * (64 * 1024 * 1024 // len(job.event.body)))
                    async with self.resources.session.post(self.options.url, data=archive) as response:
                        return response.status

                task = asyncio.create_task(send())
                plugin.sends.add(task)
                return delivered(await asyncio.shield(task))

        return [UploadAction]


# The stuck connection is left to the end of the process: here, to the garbage collector, which warns of it.
# As an error, that warning would stop its transport's finalizer before it closes the socket, which the
# collector would then find unclosed in whichever test it runs next.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_closing_the_shared_http_clients_is_given_up_on_while_a_send_is_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An upload still running at the end (its receiver stopped reading, its buffers full): aiohttp's close
    waits for its connection to close, which it never does, and the stop waited for ever, the store never
    closed."""
    monkeypatch.setattr(app, "CLIENTS_CLOSE_TIMEOUT", 0.3)
    plugin = Uploads()
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="uploads")
    with socket.create_server(("127.0.0.1", 0)) as stalled:  # takes the connection, never reads from it
        config = gateway_config(tmp_path)
        config["delivery"] = {"poll_interval": "200ms", "lease": "2m", "shutdown_timeout": "200ms"}
        url = f"http://127.0.0.1:{stalled.getsockname()[1]}/archive"
        action = {"id": "archive", "use": "upload", "with": {"url": url}}
        config["routes"] = [{"name": "users", "source": "consignease", "actions": [action]}]
        gw = RunningGateway(config, pm=pm).__enter__()
        body, headers = svix_request(msg_id="msg_archived")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        assert plugin.sending.wait(5)
        time.sleep(0.5)  # its buffers fill up
        started = time.monotonic()
        gw.__exit__(None, None, None)
        took = time.monotonic() - started
    assert not gw.thread.is_alive()
    assert took < GIVEN_UP_STOP_BOUND, f"stopping took {took:.1f}s"
    assert "HTTP clients still closing; given up" in caplog.text
    with RunningGateway(gateway_config(tmp_path)):  # the store was closed, its serving lock let go
        pass
    # Collected here, where its warning is ignored, not in a later test.
    del gw, pm, plugin
    gc.collect()


async def ignoring_cancellation(released: threading.Event) -> None:
    """Wait until `released` is set, catching every cancellation (plugin code that retries whatever fails)."""
    while not released.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)


class IgnoresCancellation:
    """A plugin whose async `shutdown` hook catches its cancellation and goes on waiting (a flush it will not
    give up), until `released` is set. `cancelled` counts the cancellations it swallowed."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.cancelled = 0

    @hookimpl
    async def shutdown(self) -> None:
        while not self.released.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.cancelled += 1


class Blocks:
    """A plugin whose plain (not async) `shutdown` hook blocks (a socket call with no timeout) until `released`
    is set. `threads` lists the threads it ran on."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.threads: list[threading.Thread] = []

    @hookimpl
    def shutdown(self) -> None:
        self.threads.append(threading.current_thread())
        self.released.wait(60)


def stop_taking(gw: RunningGateway) -> float:
    """Stop a started gateway; the seconds it took."""
    started = time.monotonic()
    gw.__exit__(None, None, None)
    return time.monotonic() - started


# Left running on its loop when the loop is closed: the collector destroys it (asyncio logs that, no more).
def test_a_shutdown_hook_that_ignores_its_cancellation_is_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The hook catches the cancellation at the end of its time and waits on: the stop awaited it for ever,
    and the store was never closed."""
    monkeypatch.setattr(app, "SHUTDOWN_HOOKS_TIMEOUT", 0.5)
    stubborn = IgnoresCancellation()

    closes = ClosesPool()
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(closes, name="closes")
    pm.register(stubborn, name="stubborn")  # pluggy calls the last registered first
    try:
        took = stop_taking(RunningGateway(gateway_config(tmp_path), pm=pm).__enter__())
        assert stubborn.cancelled >= 1
    finally:
        stubborn.released.set()
    assert took < GIVEN_UP_STOP_BOUND, f"stopping took {took:.1f}s"
    given_up = {
        r.plugin: r.left_running  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "a shutdown hook did not finish in time; given up"
    }
    assert given_up["stubborn"] is True
    # The plugin after it is still called (on its thread: past the time, it is not waited for).
    wait_until(lambda: closes.closed == ["pool"], 2)
    with RunningGateway(gateway_config(tmp_path)):  # the store was closed, its serving lock let go
        pass


def test_a_plain_shutdown_hook_that_blocks_runs_on_a_thread_and_is_given_up_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain `def` hook that blocks (time.sleep, a socket with no timeout) ran on the event loop: no bound
    could end it, and it held up the whole stop, the ops listener with it."""
    monkeypatch.setattr(app, "SHUTDOWN_HOOKS_TIMEOUT", 0.5)
    blocks = Blocks()
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(blocks, name="blocks")
    try:
        gw = RunningGateway(gateway_config(tmp_path), pm=pm).__enter__()
        took = stop_taking(gw)
        alive = gw.thread.is_alive()
    finally:
        blocks.released.set()
    assert not alive
    assert took < GIVEN_UP_STOP_BOUND, f"stopping took {took:.1f}s"
    [hook_thread] = blocks.threads
    assert hook_thread is not gw.thread and hook_thread.daemon
    [given_up] = [
        r for r in caplog.records if r.getMessage() == "a shutdown hook did not finish in time; given up"
    ]
    assert given_up.plugin == "blocks"  # type: ignore[attr-defined]
    with RunningGateway(gateway_config(tmp_path)):
        pass


def test_a_plain_shutdown_hook_may_return_an_awaitable(tmp_path: Path) -> None:
    """On its thread, a plain hook returns a coroutine (an async client's close): it is awaited on the loop."""
    closed: list[bool] = []

    class Returns:
        @hookimpl
        def shutdown(self) -> Any:
            async def close() -> None:
                await asyncio.sleep(0)
                closed.append(threading.current_thread() is gw.thread)

            return close()

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(Returns(), name="returns")
    with RunningGateway(gateway_config(tmp_path), pm=pm) as gw:
        pass
    assert closed == [True]


class Stubborn:
    """A plugin whose action catches its cancellation and goes on waiting, in its deliveries and in its close,
    until `released` is set. `delivering` is set once a delivery has begun; `begun` lists the ids of the
    events whose delivery has."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.delivering = threading.Event()
        self.begun: list[str] = []

    @hookimpl
    def register_actions(self) -> list[type[Action]]:
        plugin = self

        class StubbornAction(Action):
            name = "stubborn"

            async def deliver(self, job: Job) -> Outcome:
                plugin.begun.append(job.event.id)
                plugin.delivering.set()
                await ignoring_cancellation(plugin.released)
                return delivered(200)

            async def aclose(self) -> None:
                await ignoring_cancellation(plugin.released)

        return [StubbornAction]


def test_a_delivery_and_an_action_close_that_ignore_their_cancellation_are_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The stop cancelled the late delivery, then the late close, and awaited each for ever: the delivery was
    never released, the store never closed."""
    monkeypatch.setattr(delivery, "ACTION_CLOSE_TIMEOUT", 0.5)
    plugin = Stubborn()
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="stubborn")
    config = gateway_config(tmp_path)
    config["delivery"] = {"poll_interval": "200ms", "lease": "2m", "shutdown_timeout": "200ms"}
    config["routes"] = [
        {"name": "users", "source": "consignease", "actions": [{"id": "app", "use": "stubborn"}]}
    ]
    try:
        gw = RunningGateway(config, pm=pm).__enter__()
        body, headers = svix_request(msg_id="msg_stubborn")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        assert plugin.delivering.wait(5)
        took = stop_taking(gw)
        alive = gw.thread.is_alive()
    finally:
        plugin.released.set()
    assert not alive
    assert took < GIVEN_UP_STOP_BOUND, f"stopping took {took:.1f}s"
    assert "deliveries still running after their cancellation; given up" in caplog.text
    assert "actions still closing; given up" in caplog.text
    # Released all the same: pending, no lease owner, for the next start to run.
    [row] = stored_deliveries(tmp_path / "hookyard.db").values()
    assert (row["state"], row["lease_owner"]) == ("pending", None)
    # Named, for an operator to replay it: the count alone said nothing of which it was.
    [given_up] = [r for r in caplog.records if r.getMessage().startswith("deliveries still running after")]
    assert given_up.deliveries == [  # type: ignore[attr-defined]
        {
            "source": "consignease",
            "event_id": "msg_stubborn",
            "route": "users",
            "action": "app",
            "delivery": 1,
        }
    ]
    assert given_up.more == 0  # type: ignore[attr-defined]


def test_a_shutdown_names_ten_of_the_deliveries_it_gives_up_on_and_counts_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = Stubborn()
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="stubborn")
    config = gateway_config(tmp_path)
    config["delivery"] = {"poll_interval": "200ms", "lease": "2m", "shutdown_timeout": "200ms"}
    config["routes"] = [
        {"name": "users", "source": "consignease", "actions": [{"id": "app", "use": "stubborn"}]}
    ]
    sent = [f"msg_{number}" for number in range(12)]
    try:
        gw = RunningGateway(config, pm=pm).__enter__()
        for msg_id in sent:
            body, headers = svix_request(msg_id=msg_id)
            assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        assert wait_until(lambda: len(plugin.begun) == len(sent), timeout=10)
        stop_taking(gw)
    finally:
        plugin.released.set()
    [given_up] = [r for r in caplog.records if r.getMessage().startswith("deliveries still running after")]
    named = given_up.deliveries  # type: ignore[attr-defined]
    assert (given_up.count, len(named), given_up.more) == (12, 10, 2)  # type: ignore[attr-defined]
    assert {delivery["event_id"] for delivery in named} < set(sent)
    assert {(delivery["route"], delivery["action"]) for delivery in named} == {("users", "app")}


class SlowToClose:
    """A plugin whose action's close (`stage` "close") or whose shutdown hook ("hook") waits for a service
    that does not answer, honouring its cancellation; `began` is set once it waits."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.began = threading.Event()

    async def _wait_for_ever(self) -> None:
        self.began.set()
        await asyncio.sleep(3600)

    @hookimpl
    def register_actions(self) -> list[type[Action]]:
        plugin = self

        class Lingering(Action):
            name = "lingering"

            async def deliver(self, job: Job) -> Outcome:
                return delivered(200)

            async def aclose(self) -> None:
                if plugin.stage == "close":
                    await plugin._wait_for_ever()

        return [Lingering]

    @hookimpl
    async def shutdown(self) -> None:
        if self.stage == "hook":
            await self._wait_for_ever()


@pytest.mark.parametrize(
    ("stage", "given_up"),
    [
        ("close", "actions still closing; given up"),
        ("hook", "a shutdown hook did not finish in time; given up"),
    ],
)
def test_a_second_signal_gives_up_on_the_closes_the_shutdown_waits_for(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stage: str,
    given_up: str,
) -> None:
    """A second signal cut short the waits for the work in progress only: an action's close or a shutdown
    hook waiting on a service that does not answer was still waited out, whatever the signals after."""
    monkeypatch.setattr(delivery, "ACTION_CLOSE_TIMEOUT", 60.0)
    monkeypatch.setattr(app, "SHUTDOWN_HOOKS_TIMEOUT", 60.0)
    plugin = SlowToClose(stage)
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin, name="slow-to-close")
    config = gateway_config(tmp_path)
    config["routes"] = [
        {"name": "users", "source": "consignease", "actions": [{"id": "app", "use": "lingering"}]}
    ]
    gw = RunningGateway(config, pm=pm).__enter__()
    try:
        gw.loop.call_soon_threadsafe(gw.gateway.request_exit)
        assert plugin.began.wait(20)
        second = time.monotonic()
        gw.loop.call_soon_threadsafe(gw.gateway.request_exit)
        gw.thread.join(40)
        took = time.monotonic() - second
        assert not gw.thread.is_alive(), "the shutdown waited out the close's 60 s"
    finally:
        gw.__exit__(None, None, None)
    # Cancelled at once, ended within its grace: far below the 60 s, whatever the machine's load.
    assert took < 20, f"stopping took {took:.1f}s after the second signal"
    assert "shutdown cut short: not waiting for the work in progress" in caplog.messages
    assert any(message.startswith(given_up) for message in caplog.messages), caplog.messages


def test_closing_the_shared_http_clients_is_given_up_on_if_it_ignores_its_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp's close ends on its cancellation: one that does not is a fault only a stand-in can cause.
    released = threading.Event()

    async def aclose(self: Resources) -> None:
        await ignoring_cancellation(released)

    monkeypatch.setattr(app, "CLIENTS_CLOSE_TIMEOUT", 0.3)
    monkeypatch.setattr(Resources, "aclose", aclose)
    try:
        gw = RunningGateway(gateway_config(tmp_path)).__enter__()
        took = stop_taking(gw)
        alive = gw.thread.is_alive()
    finally:
        released.set()
    assert not alive
    assert took < GIVEN_UP_STOP_BOUND, f"stopping took {took:.1f}s"
    assert "HTTP clients still closing; given up" in caplog.text
    with RunningGateway(gateway_config(tmp_path)):
        pass


# `hookyard serve` with a plugin whose shutdown hook never ends: `ignores` catches its cancellation and waits
# on, `blocks` is a plain function that sleeps. The hooks get 1 s, not 5. `ignores-at-start` is a startup hook
# that never ends and catches its cancellation; a cancelled start is waited for 2 s.
STUBBORN_SERVE = """
import asyncio, sys, time

from gateway import app, hookimpl
from gateway.cli import main
from gateway.plugins import plugin_manager


class Ignores:
    @hookimpl
    async def shutdown(self):
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass


class Blocks:
    @hookimpl
    def shutdown(self):
        time.sleep(3600)


class IgnoresAtStart:
    @hookimpl
    async def startup(self):
        print("starting", flush=True)
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass


app.SHUTDOWN_HOOKS_TIMEOUT = 1.0
app.START_CANCEL_BOUND = 2.0
plugin = {"ignores": Ignores, "blocks": Blocks, "ignores-at-start": IgnoresAtStart}[sys.argv.pop(1)]()
plugin_manager().register(plugin, name="stubborn")
main()
"""


@pytest.mark.parametrize("kind", ["ignores", "blocks"])
def test_hookyard_serve_exits_on_sigterm_whatever_a_shutdown_hook_does(
    tmp_path: Path, downstream: Downstream, kind: str
) -> None:
    script = tmp_path / "stubborn_serve.py"
    script.write_text(STUBBORN_SERVE)
    root = str(Path(__file__).resolve().parents[1])
    config = users_config(tmp_path, downstream, "/app")
    config["log"] = {"level": "info"}
    process, _url = start_process(
        tmp_path,
        config,
        command=[sys.executable, str(script), kind],
        env={"PYTHONPATH": root},
    )
    assert process.process is not None
    try:
        exit_code, took = stop_with_sigterm(process.process, STUCK_EXIT_WAIT)
    finally:
        process.kill()
    logged = process.log_path.read_text()
    assert exit_code == 0, logged
    # The hooks' 1 s, a second for the one cancelled to end, a second for the tasks left at the end.
    assert took < 1 + 2 * 1 + EXIT_SLACK, f"shutdown took {took:.1f}s"
    assert "a shutdown hook did not finish in time; given up" in logged, logged
    assert "destroyed" not in logged, logged
    assert "stopped" in logged and "Traceback" not in logged, logged


def test_hookyard_serve_exits_on_sigterm_while_a_startup_hook_ignores_its_cancellation(
    tmp_path: Path, downstream: Downstream
) -> None:
    """The start is cancelled, and the hook goes on waiting: the cancelled start was awaited for ever, and the
    process never exited (Kubernetes killed it at the end of its grace period). It is waited for as long as
    the start's own clean-up may take, then given up on."""
    script = tmp_path / "stubborn_serve.py"
    script.write_text(STUBBORN_SERVE)
    path, _ = users_config_file(tmp_path, downstream)
    log_path = tmp_path / "gateway.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script), "ignores-at-start", "serve", "-c", str(path)],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
    try:
        assert process.stdout is not None and process.stdout.readline() == b"starting\n"
        exit_code, took = stop_with_sigterm(process, STUCK_EXIT_WAIT)
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    logged = log_path.read_text()
    assert exit_code == 0, logged
    # START_CANCEL_BOUND (2 s in the script), a second for the tasks left at the end.
    assert took < 2 + 1 + EXIT_SLACK, f"stopping took {took:.1f}s"
    assert "shutting down while starting" in logged, logged
    assert "the start did not end on its cancellation; given up" in logged, logged
    # The process ended with the hook still running: no error for a task destroyed with the loop.
    assert "destroyed" not in logged, logged
    assert "stopped" in logged and "hookyard ready" not in logged and "Traceback" not in logged, logged


# `hookyard serve` with a plugin that fails as the gateway starts: its startup hook raises, or the constructor
# of its action does (a file or a client it prepares).
FAILING_SERVE = """
import sys

from gateway import Action, delivered, hookimpl
from gateway.cli import main
from gateway.plugins import plugin_manager


class Spool(Action):
    name = "spool"

    def __init__(self, options, resources):
        raise PermissionError(13, "Permission denied", "/var/spool/acme")

    async def deliver(self, job):
        return delivered()


class FailsAtStart:
    @hookimpl
    def startup(self):
        raise RuntimeError("the audit database is unreachable")


class FailsToBuild:
    @hookimpl
    def register_actions(self):
        return [Spool]


plugin = {"startup": FailsAtStart, "constructor": FailsToBuild}[sys.argv.pop(1)]()
plugin_manager().register(plugin, name="failing")
main()
"""


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        (
            "startup",
            "hookyard: plugin failing: startup raised RuntimeError: the audit database is unreachable",
        ),
        (
            "constructor",
            "hookyard: route 'users', action 'spool': the spool action (plugin failing) could not be set up: "
            "PermissionError: "
            "[Errno 13] Permission denied: '/var/spool/acme'",
        ),
    ],
)
def test_hookyard_serve_that_a_plugin_fails_to_start_says_so_in_one_line(
    tmp_path: Path, downstream: Downstream, kind: str, said: str
) -> None:
    script = tmp_path / "failing_serve.py"
    script.write_text(FAILING_SERVE)
    config = users_config(tmp_path, downstream, "/app")
    config["listen"] = {"host": "127.0.0.1", "port": free_port()}
    config["ops"] = {"host": "127.0.0.1", "port": free_port()}
    if kind == "constructor":
        config["routes"][0]["actions"] = [{"id": "spool", "use": "spool"}]
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), kind, "serve", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    # The traceback is the log's, for the plugin's author; the operator's last line says what failed.
    assert lines[-1] == said, done.stderr
    assert not any(line.startswith("Traceback") for line in lines), done.stderr


@pytest.mark.parametrize(("before", "after", "running"), [(1, 1, 1), (1, 2, 2)])
def test_a_reload_keeps_an_actions_concurrency_counting_the_deliveries_in_flight(
    tmp_path: Path, holding: Holding, before: int, after: int, running: int
) -> None:
    url = holding.downstream.url
    config = gateway_config(tmp_path)
    config["reload"] = {"interval": "100ms"}
    config["routes"] = [
        {
            "name": "users",
            "source": "consignease",
            "actions": [
                {"id": "app", "use": "forward", "concurrency": before, "with": {"url": f"{url}/held/app"}}
            ],
        }
    ]
    volume = ConfigMapVolume(tmp_path / "config")
    volume.publish(config)
    with RunningGateway(volume.path) as gw:
        body, headers = svix_request(msg_id="msg_before")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: holding.held == 1)

        changed = copy.deepcopy(config)
        changed["routes"][0]["actions"][0]["concurrency"] = after
        changed["routes"][0]["actions"][0]["with"]["headers"] = {"X-Config": "new"}
        volume.publish(changed)
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        for index in range(3):
            body, headers = svix_request(msg_id=f"msg_after_{index}")
            assert gw.post("/webhooks/consignease", body, headers).status_code == 200

        # The delivery started before the reload still holds one of the action's slots.
        wait_until(lambda: holding.held == running)
        time.sleep(0.3)
        assert holding.held == running
        holding.release.set()
        assert len(holding.downstream.wait_for(4, "/held/app")) == 4


def test_a_reload_keeps_the_running_shutdown_timeout_until_the_restart(
    tmp_path: Path, holding: Holding, caplog: pytest.LogCaptureFixture
) -> None:
    """`delivery` needs a restart, but a reload took its shutdown_timeout from the new file: a SIGTERM then
    waited as long as that said for a delivery that never answers, past the grace period the pod was
    given for the running value."""
    config = gateway_config(tmp_path)
    config["reload"] = {"interval": "100ms"}
    config["delivery"]["shutdown_timeout"] = "1s"
    url = holding.downstream.url
    config["routes"] = [
        {
            "name": "users",
            "source": "consignease",
            "actions": [{"id": "app", "use": "forward", "timeout": "2m", "with": {"url": f"{url}/held/app"}}],
        }
    ]
    volume = ConfigMapVolume(tmp_path / "config")
    volume.publish(config)
    with RunningGateway(volume.path) as gw:
        body, headers = svix_request(msg_id="msg_held")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: holding.held == 1)
        changed = copy.deepcopy(config)
        changed["delivery"]["shutdown_timeout"] = "90s"
        volume.publish(changed)
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        assert gw.gateway.config.delivery.shutdown_timeout == 1.0
        began = time.monotonic()
        gw.loop.call_soon_threadsafe(gw.gateway.request_exit)
        gw.thread.join(60)
        took = time.monotonic() - began
        assert not gw.thread.is_alive()
    # Far below the 90 s of the file, whatever the machine's load.
    assert took < 45, f"stopping took {took:.1f}s"
    assert "delivery changed; it takes effect at the next restart" in caplog.messages


def start_process(tmp_path: Path, config: dict[str, Any], **options: Any) -> tuple[GatewayProcess, str]:
    """`hookyard serve` in a child process; options as GatewayProcess takes them."""
    ingress, ops = free_port(), free_port()
    config["listen"] = {"host": "127.0.0.1", "port": ingress, **config.get("listen", {})}
    config["ops"] = {"host": "127.0.0.1", "port": ops}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    process = GatewayProcess(path, f"http://127.0.0.1:{ops}", **options).start()
    return process, f"http://127.0.0.1:{ingress}"


def test_sighup_reloads(tmp_path: Path, downstream: Downstream) -> None:
    config = users_config(tmp_path, downstream, "/before")
    config["reload"] = {"watch": False}
    process, url = start_process(tmp_path, config)
    try:
        changed = users_config(tmp_path, downstream, "/after")
        changed["reload"] = {"watch": False}
        changed["listen"], changed["ops"] = config["listen"], config["ops"]
        process.config_path.write_text(yaml.safe_dump(changed))
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)
        metrics_url = process.ops_url + "/metrics"
        wait_until(
            lambda: 'hookyard_config_reloads_total{result="success"} 1.0' in httpx.get(metrics_url).text
        )
        body, headers = svix_request()
        assert httpx.post(url + "/webhooks/consignease", content=body, headers=headers).status_code == 200
        downstream.wait_for(1, "/after")
    finally:
        process.kill()


SLOW_START = """
import asyncio, sys
from pathlib import Path

from gateway import hookimpl
from gateway.app import Gateway
from gateway.config import load_config
from gateway.plugins import new_plugin_manager


class SlowStart:
    @hookimpl
    async def startup(self, gateway):
        print("starting", flush=True)
        await asyncio.sleep(1.5)


pm = new_plugin_manager(load_entry_points=False)
pm.register(SlowStart())
path = Path(sys.argv[1])
asyncio.run(Gateway(load_config(path), pm=pm, config_path=path).serve())
"""


def test_a_sighup_while_starting_is_a_reload_once_started_not_the_end_of_the_process(
    tmp_path: Path, downstream: Downstream
) -> None:
    config = users_config(tmp_path, downstream, "/before")
    config["reload"] = {"watch": False}
    ops = free_port()
    config["listen"] = {"host": "127.0.0.1", "port": free_port()}
    config["ops"] = {"host": "127.0.0.1", "port": ops}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    script = tmp_path / "slow_start.py"
    script.write_text(SLOW_START)
    process = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "starting\n"
        process.send_signal(signal.SIGHUP)  # SIGHUP's default action would end the process
        metrics = f"http://127.0.0.1:{ops}/metrics"
        wait_until(lambda: 'hookyard_config_reloads_total{result="success"} 1.0' in _text(metrics))
        assert process.poll() is None
    finally:
        process.kill()
        process.communicate(timeout=10)  # reaped, its pipe closed


def children_of(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


# `hookyard serve` whose bounds on the waits the tests below stage are made 30 s, not 5: a stop that waited
# for one of them instead of ending at once is then far from the bound the test puts on it.
LONG_WAITS_SERVE = """
from gateway import app
from gateway.cli import main
from gateway.storage import sqlite

app.INGRESS_DRAIN_TIMEOUT = 30
sqlite.BUSY_TIMEOUT = 30.0
main()
"""


def long_waits_serve(tmp_path: Path) -> list[str]:
    """The command that runs LONG_WAITS_SERVE, with the project on its PYTHONPATH (see long_waits_env)."""
    script = tmp_path / "long_waits_serve.py"
    script.write_text(LONG_WAITS_SERVE)
    return [sys.executable, str(script)]


def long_waits_env() -> dict[str, str]:
    return {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_a_sigterm_while_starting_stops_the_gateway_cleanly(tmp_path: Path, downstream: Downstream) -> None:
    """The start waits (here for another process's write lock, which releasing the last run's leases needs,
    BUSY_TIMEOUT at most, made 30 s) and SIGTERM comes: the start is cancelled, the store it opened closed,
    and `hookyard serve` exits 0 at once. The handler was installed only once started: the signal's default
    action killed the process mid-start (and a PID 1 in a container, whose default the kernel ignores, went
    on starting)."""
    path, config = users_config_file(tmp_path, downstream)
    database = tmp_path / "hookyard.db"
    with sqlite3.connect(database, isolation_level=None) as setup:
        setup.execute("PRAGMA journal_mode = WAL")
        setup.executescript(SCHEMA)
    setup.close()
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*long_waits_serve(tmp_path), "serve", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, **long_waits_env()},
        )
    try:
        # The store is open once its fsync helper runs; the start then waits for the lock.
        wait_until(lambda: process.poll() is not None or bool(children_of(process.pid)))
        [helper] = children_of(process.pid)
        time.sleep(0.3)
        exit_code, took = stop_with_sigterm(process, STUCK_EXIT_WAIT)
    finally:
        process.kill()
        holder.rollback()
        holder.close()
    assert exit_code == 0, log_path.read_text()
    assert took < 10, f"stopping took {took:.1f}s"  # not the lock's 30 s
    logged = log_path.read_text()
    assert "shutting down while starting" in logged and "stopped" in logged, logged
    assert "hookyard ready" not in logged and "Traceback" not in logged, logged
    # The store was closed: its fsync helper has ended with it, and the next start opens the file as usual.
    wait_until(lambda: not Path(f"/proc/{helper}").exists() or _zombie(helper), 5)
    restarted = GatewayProcess(path, f"http://127.0.0.1:{config['ops']['port']}").start()
    restarted.kill()


# `hookyard serve` as its console script runs it, but with the import of gateway.cli held up until the test
# has sent its signal: the signal comes while the command is still importing, as in the first half second of
# any start.
SLOW_IMPORT = """
import importlib.abc, sys, time

class HoldCli(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "gateway.cli":
            print("importing", flush=True)
            sys.stdin.readline()  # until the test has signalled
        return None

sys.meta_path.insert(0, HoldCli())
sys.argv = ["hookyard", "serve", "-c", sys.argv[1]]
from gateway.launch import main
main()
"""


def test_a_sigterm_while_the_command_is_still_importing_stops_it_cleanly(
    tmp_path: Path, downstream: Downstream
) -> None:
    """Importing the gateway takes about half a second, before any handler of the gateway's own is
    installed: the command's entry point catches a SIGTERM then and the gateway, once its handlers are in
    place, stops at once without ever turning ready. Before, the signal's default action killed the process
    mid-import; a PID 1 in a container, whose default the kernel ignores, lost it and started as usual."""
    path, _ = users_config_file(tmp_path, downstream)
    script = tmp_path / "slow_import.py"
    script.write_text(SLOW_IMPORT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        assert process.stdout.readline() == "importing\n"
        process.send_signal(signal.SIGTERM)
        process.stdin.write("go on\n")
        process.stdin.flush()
        _, logged = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 0, (process.returncode, logged)
    assert "stopped" in logged and "hookyard ready" not in logged and "Traceback" not in logged, logged


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    return True


def _text(url: str) -> str:
    try:
        return httpx.get(url).text
    except httpx.HTTPError:
        return ""


def test_sigterm_under_load_loses_nothing(tmp_path: Path, downstream: Downstream) -> None:
    downstream.delay = 0.05
    config = users_config(tmp_path, downstream, "/app", listen={"drain_delay": "500ms"})
    config["delivery"] = {"concurrency": 8, "shutdown_timeout": "2s", "lease": "10m"}
    process, url = start_process(tmp_path, config)
    answered: list[str] = []
    failed = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal failed
        with httpx.Client(timeout=5) as client:
            index = 0
            while not stop.is_set() and index < 2000:
                body, headers = svix_request(msg_id=f"msg_term_{threading.get_ident()}_{index}")
                index += 1
                try:
                    response = client.post(url + "/webhooks/consignease", content=body, headers=headers)
                except httpx.HTTPError:
                    failed += 1
                    continue
                if response.status_code == 200:
                    answered.append(response.json()["id"])
                else:
                    failed += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answered) >= 100, 20)
        assert process.process is not None
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        # While draining, readiness says no but webhooks are still taken.
        assert httpx.get(process.ops_url + "/readyz").status_code == 503
        assert process.process.wait(30) == 0
        took = time.monotonic() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert took < 15, f"shutdown took {took:.1f}s"
    delivered_before_restart = {r.headers["idempotency-key"] for r in downstream.received("/app")}

    process.start()  # the next pod start delivers whatever the last one did not get to
    try:
        wait_until(
            lambda: {r.headers["idempotency-key"] for r in downstream.received("/app")} >= set(answered), 30
        )
    finally:
        process.kill()
    assert len(answered) >= 100
    assert len(delivered_before_restart) > 0


def refuses_connections(url: str) -> bool:
    host, port = httpx.URL(url).host, httpx.URL(url).port
    try:
        socket.create_connection((host, port or 80), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def stored_deliveries(database: Path) -> dict[str, sqlite3.Row]:
    """The deliveries as the file holds them, by event id, read without the gateway."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT e.event_id, d.state, d.lease_owner, d.due_at, d.attempts "
            "FROM deliveries d JOIN events e ON e.seq = d.event_seq"
        ).fetchall()
    conn.close()
    return {row["event_id"]: row for row in rows}


def test_the_default_shutdown_fits_well_inside_a_30s_grace_period() -> None:
    """A native sidecar gets SIGTERM only after the app has exited, from the same 30 s."""
    budget = INGRESS_DRAIN_TIMEOUT + DeliveryEngine().shutdown_timeout + OPS_DRAIN_TIMEOUT
    assert budget <= 15


def test_the_documented_worst_case_shutdown_is_the_sum_of_the_bounds() -> None:
    """Every wait of a shutdown on something that can stop answering has its bound; operations.md adds
    them up against the example's grace period."""
    assert worst_case_shutdown(0, 0) == 39
    assert worst_case_shutdown(0, DeliveryEngine().shutdown_timeout) == 47
    # The grace period of the example deploy, with its drain_delay, is checked against it in test_deploy.
    assert worst_case_shutdown(5, DeliveryEngine().shutdown_timeout) == 52
    guide = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    assert "`shutdown_timeout` + 39 s: 47 s with the\ndefaults, 52 s with the example's" in guide
    # A start cancelled by SIGTERM runs a part of the same clean-up, and is given up on after its bounds.
    assert app.START_CANCEL_BOUND == 13 < worst_case_shutdown(0, 0)
    assert "goes on waiting is given up on after 13 s" in guide


def test_sigterm_releases_unfinished_deliveries_for_the_next_start(tmp_path: Path, holding: Holding) -> None:
    """The receiver holds every request longer than delivery.shutdown_timeout: SIGTERM stops the webhook
    listener at once, waits shutdown_timeout for the deliveries, releases them in the file, and exits;
    the next start delivers them. (The default's fit in Kubernetes' grace period is its own test.)"""
    config = users_config(tmp_path, holding.downstream, "/held/app")
    config["defaults"]["timeout"] = "60s"  # only the shutdown ends the attempts
    config["delivery"] = {"poll_interval": "200ms", "lease": "2m", "shutdown_timeout": "2s"}
    process, url = start_process(tmp_path, config)
    ids = [f"msg_held_{index}" for index in range(3)]
    try:
        send_held(url, holding, ids)

        assert process.process is not None
        signalled_at, started = time.time(), time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        # No drain_delay: the webhook listener closes at once and refuses new connections, while the
        # process is still waiting for its deliveries and the ops listener still answers (not ready).
        wait_until(lambda: refuses_connections(url), 3)
        assert process.process.poll() is None
        assert httpx.get(process.ops_url + "/readyz").status_code == 503
        assert process.process.wait(30) == 0
        took = time.monotonic() - started
        exited_at = time.time()
    finally:
        process.kill()
    timeout = 2.0
    assert timeout - 0.5 <= took <= timeout + 3, f"shutdown took {took:.1f}s with shutdown_timeout {timeout}s"

    # Before any restart, the file has them pending, owned by nobody, due at once.
    stored = stored_deliveries(tmp_path / "hookyard.db")
    assert set(stored) == set(ids)
    for msg_id, row in stored.items():
        assert row["state"] == "pending", msg_id
        assert row["lease_owner"] is None, msg_id
        assert signalled_at <= row["due_at"] <= exited_at, msg_id
        assert row["attempts"] == 1, msg_id  # the interrupted attempt counts: it may have reached the app
    assert "released unfinished deliveries" in process.log_path.read_text()

    deliver_after_restart(process, holding, tmp_path / "hookyard.db")
    assert {row["attempts"] for row in stored_deliveries(tmp_path / "hookyard.db").values()} == {2}
    assert {r.headers["idempotency-key"] for r in holding.downstream.received("/held/app")} == set(ids)


def send_held(url: str, holding: Holding, ids: list[str]) -> None:
    """One webhook per id, each answered 200, until the receiver holds all of their deliveries."""
    for msg_id in ids:
        body, headers = svix_request(msg_id=msg_id)
        assert httpx.post(url + "/webhooks/consignease", content=body, headers=headers).status_code == 200
    wait_until(lambda: holding.held == len(ids))


def deliver_after_restart(process: GatewayProcess, holding: Holding, database: Path) -> None:
    """Start the gateway again with the receiver answering, until every delivery in the file is delivered."""
    holding.release.set()
    process.start()
    try:
        wait_until(lambda: {r["state"] for r in stored_deliveries(database).values()} == {"delivered"})
    finally:
        process.kill()


@pytest.mark.parametrize(
    ("signals", "when"),
    [((signal.SIGTERM, signal.SIGTERM), "deliveries"), ((signal.SIGINT, signal.SIGINT), "drain_delay")],
    ids=["sigterm_twice_while_delivering", "ctrl_c_twice_while_draining"],
)
def test_a_second_signal_cuts_the_shutdown_short(
    tmp_path: Path, holding: Holding, signals: tuple[signal.Signals, signal.Signals], when: str
) -> None:
    """The receiver holds every request, and the first signal's shutdown would wait a minute for them (or
    for a load balancer, drain_delay): a second signal ends the wait at once, as if the time were up. The
    running deliveries are released in the file, the process exits 0 within seconds, and the next start
    delivers them. Before, the second signal changed nothing: the whole minute was waited out."""
    config = users_config(tmp_path, holding.downstream, "/held/app")
    config["defaults"]["timeout"] = "5m"  # only the shutdown ends the attempts
    config["delivery"] = {"poll_interval": "200ms", "lease": "10m", "shutdown_timeout": "60s"}
    config["log"] = {"level": "info"}
    if when == "drain_delay":
        config["listen"] = {"drain_delay": "60s"}
    process, url = start_process(tmp_path, config)
    ids = [f"msg_cut_short_{index}" for index in range(3)]
    try:
        send_held(url, holding, ids)

        assert process.process is not None
        first, second = signals
        process.process.send_signal(first)
        if when == "drain_delay":
            wait_until(lambda: "shutting down" in process.log_path.read_text())
        else:  # the listener has stopped: the engine is waiting for the deliveries
            wait_until(lambda: refuses_connections(url), 5)
        time.sleep(0.3)
        assert process.process.poll() is None  # the first signal alone waits on
        started = time.monotonic()
        process.process.send_signal(second)
        exit_code = process.process.wait(15)
        took = time.monotonic() - started
    finally:
        process.kill()
    assert exit_code == 0, process.log_path.read_text()
    assert took < 15, f"stopping took {took:.1f}s after the second signal"
    logged = process.log_path.read_text()
    assert "shutdown cut short" in logged and "released unfinished deliveries" in logged, logged
    assert "stopped" in logged and "Traceback" not in logged, logged

    # Pending in the file, owned by nobody: the attempt cut short counts, as a timeout's does.
    stored = stored_deliveries(tmp_path / "hookyard.db")
    assert set(stored) == set(ids)
    assert {(row["state"], row["lease_owner"], row["attempts"]) for row in stored.values()} == {
        ("pending", None, 1)
    }

    deliver_after_restart(process, holding, tmp_path / "hookyard.db")
    assert {r.headers["idempotency-key"] for r in holding.downstream.received("/held/app")} == set(ids)


# `hookyard serve`, giving up on an fsync that does not answer sooner than after 5 s.
IMPATIENT_SERVE = """
from gateway.cli import main
from gateway.storage import sqlite

sqlite.FSYNC_TIMEOUT = 0.5
main()
"""


def fsync_helper_of(pid: int) -> int:
    """The fsync helper process of the gateway process pid: its only child."""
    [helper] = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return helper


def test_sigterm_ends_the_process_while_an_fsync_never_answers(
    tmp_path: Path, downstream: Downstream
) -> None:
    """A disk that stopped answering (the fsync helper stopped): the store gives up on the fsync after its
    bound, and so does the shutdown, where the process waited for it for ever (until Kubernetes' SIGKILL)."""
    script = tmp_path / "impatient_serve.py"
    script.write_text(IMPATIENT_SERVE)
    root = str(Path(__file__).resolve().parents[1])
    process, url = start_process(
        tmp_path,
        users_config(tmp_path, downstream, "/app"),
        command=[sys.executable, str(script)],
        env={"PYTHONPATH": root},
    )
    assert process.process is not None
    helper = fsync_helper_of(process.process.pid)
    body, headers = svix_request(msg_id="msg_on_a_hung_disk")
    os.kill(helper, signal.SIGSTOP)
    try:
        response = httpx.post(url + "/webhooks/consignease", content=body, headers=headers, timeout=5)
        assert response.status_code == 503, response.text
        assert response.json()["detail"] == "not confirmed stored; please retry"
        downstream.wait_for(1, "/app")  # its delivery runs all the same
        exit_code, took = stop_with_sigterm(process.process)
        assert exit_code == 0
    finally:
        os.kill(helper, signal.SIGCONT)
        process.kill()
    assert took < 5, f"shutdown took {took:.1f}s"
    assert "the store is closed with an fsync unconfirmed" in process.log_path.read_text()
    # Nothing is lost: the event reached the disk after all, and its retry is a duplicate, not sent again.
    process.start()
    try:
        retried = httpx.post(url + "/webhooks/consignease", content=body, headers=headers, timeout=5)
        assert retried.json()["status"] == "duplicate"
    finally:
        process.kill()
    assert len(downstream.received("/app")) == 1


# `hookyard serve` whose store action finds its SQLite file on a disk that stopped answering: opening it never
# returns (a fault the tests cannot stage on a real disk). Closing the actions gets 1 s, not 5.
STUCK_FILE_SERVE = """
import time

from gateway import delivery
from gateway.cli import main
from plugins import store

delivery.ACTION_CLOSE_TIMEOUT = 1.0
store.SQLite._connect = lambda self, timeout: time.sleep(3600)
main()
"""


def test_sigterm_ends_the_process_while_a_store_actions_sqlite_file_never_answers(
    tmp_path: Path, downstream: Downstream
) -> None:
    """The delivery is given up on at its timeout; its thread stays blocked. That thread was asyncio's
    (to_thread), which the interpreter joins at exit: the process logged `stopped` and never exited."""
    script = tmp_path / "stuck_file_serve.py"
    script.write_text(STUCK_FILE_SERVE)
    config = users_config(tmp_path, downstream, "/app")
    config["delivery"]["shutdown_timeout"] = "1s"
    store = {"url": f"sqlite:///{tmp_path}/users.db", "table": "users", "mode": "append"}
    config["routes"][0]["actions"] = [{"id": "users-table", "use": "store", "timeout": "1s", "with": store}]
    config["log"] = {"level": "info"}
    process, url = start_process(
        tmp_path,
        config,
        command=[sys.executable, str(script)],
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert process.process is not None
    try:
        body, headers = svix_request(msg_id="msg_to_a_stuck_file")
        assert httpx.post(url + "/webhooks/consignease", content=body, headers=headers).status_code == 200
        metrics = process.ops_url + "/metrics"
        wait_until(lambda: 'action="users-table",outcome="retried"' in httpx.get(metrics).text, 10)
        exit_code, took = stop_with_sigterm(process.process, STUCK_EXIT_WAIT)
    finally:
        process.kill()
    logged = process.log_path.read_text()
    assert exit_code == 0, logged
    # shutdown_timeout, then the action's close, which waits for the stuck thread: 1 s, then cancelled.
    assert took < 1 + 1 + 1 + EXIT_SLACK, f"shutdown took {took:.1f}s"
    assert "stopped" in logged and "Traceback" not in logged, logged


class RenewableTls:
    """A config file whose listener serves a certificate that can be renewed in place, as cert-manager does
    (a Secret volume swaps its files): same paths, new content."""

    def __init__(self, tmp_path: Path, downstream: Downstream) -> None:
        self.cert, self.key = self_signed(tmp_path, "current")
        self.renewed_cert, self.renewed_key = self_signed(tmp_path, "renewed")
        self.path = tmp_path / "routes.yaml"
        tls = {"cert": str(self.cert), "key": str(self.key)}
        self.config = users_config(tmp_path, downstream, "/app", listen={"tls": tls})
        self.path.write_text(yaml.safe_dump(self.config))

    def renew(self) -> None:
        self.cert.write_bytes(self.renewed_cert.read_bytes())
        self.key.write_bytes(self.renewed_key.read_bytes())

    def post_trusting_the_renewed(self, gw: RunningGateway, msg_id: str) -> int:
        body, headers = svix_request(msg_id=msg_id)
        with httpx.Client(verify=ssl.create_default_context(cafile=self.renewed_cert)) as client:
            return client.post(gw.url + "/webhooks/consignease", content=body, headers=headers).status_code


def test_renewed_certificate_files_are_picked_up_without_a_config_change(
    tmp_path: Path, downstream: Downstream
) -> None:
    tls = RenewableTls(tmp_path, downstream)
    with RunningGateway(tls.path, scheme="https") as gw:
        tls.renew()
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        assert tls.post_trusting_the_renewed(gw, "msg_renewed") == 200


def test_a_certificate_renewed_while_the_config_file_is_refused_is_picked_up(
    tmp_path: Path, downstream: Downstream
) -> None:
    # A bad ConfigMap update waiting to be fixed, and cert-manager renews the Secret meanwhile: the renewal
    # was refused with the file, and the old certificate was served until the config was fixed, even past
    # its expiry.
    tls = RenewableTls(tmp_path, downstream)
    with RunningGateway(tls.path, scheme="https") as gw:
        tls.path.write_text(yaml.safe_dump({**tls.config, "routes": [{"name": "broken"}]}))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1)
        tls.renew()
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 2)
        assert tls.post_trusting_the_renewed(gw, "msg_renewed_under_a_refused_file") == 200
        assert gw.metric("hookyard_config_last_reload_successful") == 0


def test_tls_listener_and_certificate_reload(tmp_path: Path, downstream: Downstream) -> None:
    first_cert, first_key = self_signed(tmp_path, "first")
    second_cert, second_key = self_signed(tmp_path, "second")
    config_path = tmp_path / "routes.yaml"
    config = users_config(
        tmp_path, downstream, "/app", listen={"tls": {"cert": str(first_cert), "key": str(first_key)}}
    )
    config_path.write_text(yaml.safe_dump(config))
    with RunningGateway(config_path, scheme="https") as gw:
        body, headers = svix_request()
        with httpx.Client(verify=ssl.create_default_context(cafile=first_cert)) as client:
            response = client.post(gw.url + "/webhooks/consignease", content=body, headers=headers)
        assert response.status_code == 200
        config["listen"]["tls"] = {"cert": str(second_cert), "key": str(second_key)}
        config_path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        body, headers = svix_request(msg_id="msg_second_cert")
        with httpx.Client(verify=ssl.create_default_context(cafile=second_cert)) as client:
            response = client.post(gw.url + "/webhooks/consignease", content=body, headers=headers)
        assert response.status_code == 200


def test_hookyard_serve_completes_the_handshake_of_https_connections_whose_client_hello_waits(
    tmp_path: Path, downstream: Downstream
) -> None:
    # `hookyard serve` runs on uvloop, which starts reading a connection once connection_made returns (a
    # pause there does nothing): a ClientHello read before the handshake began was kept as if it were the
    # request, the handshake never saw it, and the client read an EOF. Connections made while the gateway
    # is stopped have their ClientHello waiting when it takes them.
    cert, key = self_signed(tmp_path, "listener")
    listen = {"tls": {"cert": str(cert), "key": str(key)}}
    config = users_config(tmp_path, downstream, "/app", listen=listen, limits={"read_timeout": "2s"})
    process, url = start_process(tmp_path, config)
    assert process.process is not None
    url = url.replace("http://", "https://")
    verify = ssl.create_default_context(cafile=cert)

    def post(number: int) -> int:
        body, headers = svix_request(msg_id=f"msg_connection_{number}")
        with httpx.Client(verify=verify, timeout=10) as client:  # a connection of its own
            return client.post(url + "/webhooks/consignease", content=body, headers=headers).status_code

    try:
        with ThreadPoolExecutor(max_workers=10) as pool:
            process.process.send_signal(signal.SIGSTOP)
            try:
                statuses = [pool.submit(post, number) for number in range(10)]
                time.sleep(0.5)  # connected, in the listener's backlog, their ClientHello sent
            finally:
                process.process.send_signal(signal.SIGCONT)
            assert [status.result() for status in statuses] == [200] * 10
    finally:
        process.kill()


def test_idle_https_clients_that_never_close_their_side_do_not_hold_up_the_shutdown(
    tmp_path: Path, downstream: Downstream
) -> None:
    # Closing a TLS connection sends close_notify and waited for the client's, for asyncio's 30 s: a client
    # that keeps an idle connection open and never answers it (most do not until they next read) held
    # the shutdown for listen's whole drain (INGRESS_DRAIN_TIMEOUT, made 30 s), and then was cut off.
    cert, key = self_signed(tmp_path, "listener")
    config = users_config(tmp_path, downstream, "/app", listen={"tls": {"cert": str(cert), "key": str(key)}})
    process, url = start_process(tmp_path, config, command=long_waits_serve(tmp_path), env=long_waits_env())
    assert process.process is not None
    port = int(url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=cert)
    body, headers = svix_request(msg_id="msg_before_the_shutdown")
    request = b"".join(
        [b"POST /webhooks/consignease HTTP/1.1\r\nhost: localhost\r\n"]
        + [f"{name}: {value}\r\n".encode() for name, value in headers.items()]
        + [f"content-length: {len(body)}\r\n\r\n".encode(), body]
    )
    idle: list[ssl.SSLSocket] = []
    try:
        for number in range(3):
            client = context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="127.0.0.1"
            )
            idle.append(client)
            if number == 0:  # one has had its answer and stays open, as keep-alive clients do
                client.sendall(request)
                assert client.recv(4096).startswith(b"HTTP/1.1 200 ")
        exit_code, took = stop_with_sigterm(process.process, STUCK_EXIT_WAIT)
        assert exit_code == 0
    finally:
        for client in idle:
            client.close()
        process.kill()
    assert took < 10, f"shutdown took {took:.1f}s"  # not the drain's 30 s


@pytest.mark.parametrize("new_loop", event_loops())
def test_idle_https_connections_are_closed_at_once_as_the_listener_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_loop: Any
) -> None:
    # An idle connection was closed as one closed after its answer: its close_notify sent, then the
    # client's waited for (TLS_SHUTDOWN_TIMEOUT), which a client sends only when it next reads. Until
    # then it stayed among the listener's connections, and the shutdown waited for it. Made long here, so
    # such a wait would take the listener's whole drain (INGRESS_DRAIN_TIMEOUT), itself made 20 s, far from
    # the bound below.
    monkeypatch.setattr(protocol, "TLS_SHUTDOWN_TIMEOUT", 60.0)
    monkeypatch.setattr(app, "INGRESS_DRAIN_TIMEOUT", 20)
    cert, key = self_signed(tmp_path, "listener")
    config = gateway_config(tmp_path, listen={"tls": {"cert": str(cert), "key": str(key)}})
    context = ssl.create_default_context(cafile=cert)
    body, headers = svix_request(msg_id="msg_before_the_shutdown")
    request = b"".join(
        [b"POST /webhooks/consignease HTTP/1.1\r\nhost: localhost\r\n"]
        + [f"{name}: {value}\r\n".encode() for name, value in headers.items()]
        + [f"content-length: {len(body)}\r\n\r\n".encode(), body]
    )
    idle: list[ssl.SSLSocket] = []
    try:
        with RunningGateway(config, scheme="https", new_loop=new_loop) as gw:
            address = ("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
            for number in range(3):
                client = context.wrap_socket(
                    socket.create_connection(address, timeout=5),
                    server_hostname="127.0.0.1",
                    suppress_ragged_eofs=False,  # a connection closed without close_notify raises
                )
                idle.append(client)
                if number == 0:  # answered, and kept open, as keep-alive clients do
                    client.sendall(request)
                    assert client.recv(4096).startswith(b"HTTP/1.1 200 ")
            wait_until(lambda: gw.metric("hookyard_webhook_connections") == 3)
            started = time.monotonic()
        took = time.monotonic() - started
        # None of them read or answered anything meanwhile; each has its close_notify, then the end.
        assert [client.recv(4096) for client in idle] == [b"", b"", b""]
    finally:
        for client in idle:
            client.close()
    assert took < 20 / 4, f"the gateway took {took:.1f}s to stop"


def test_a_certificate_that_cannot_be_loaded_stops_the_start(tmp_path: Path) -> None:
    # The listener's TLS context is made before anything starts; uvicorn's, made as it began to serve,
    # failed in its task, and `hookyard serve` stopped at once with status 0 and nothing in the log.
    cert, key = tmp_path / "missing.crt", tmp_path / "missing.key"
    config = gateway_config(
        tmp_path,
        listen={"host": "127.0.0.1", "port": free_port(), "tls": {"cert": str(cert), "key": str(key)}},
        ops={"host": "127.0.0.1", "port": free_port()},
    )
    result = serve_to_its_end(tmp_path, config)
    assert result.returncode == 1
    assert f"hookyard: cannot load listen.tls ({cert}, {key}): No such file or directory" in result.stderr


def test_a_port_that_is_taken_stops_the_start_naming_the_address(tmp_path: Path) -> None:
    taken = bound_socket()
    port = taken.getsockname()[1]
    config = gateway_config(
        tmp_path, listen={"host": "127.0.0.1", "port": port}, ops={"host": "127.0.0.1", "port": free_port()}
    )
    with taken:
        result = serve_to_its_end(tmp_path, config)
    assert result.returncode == 1
    # As the docs quote it; it began `hookyard: [Errno 98] cannot listen on`.
    assert result.stderr.endswith(f"hookyard: cannot listen on 127.0.0.1:{port}: Address already in use\n")


@pytest.mark.parametrize("listener", ["listen", "ops"])
def test_a_host_that_is_not_a_name_stops_the_start_naming_the_address(tmp_path: Path, listener: str) -> None:
    # Refused by the IDNA encoding before any resolver is asked; it ended in a UnicodeError traceback.
    addresses = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "ops": {"host": "127.0.0.1", "port": free_port()},
    }
    addresses[listener] = {"host": "a..b", "port": 3000}
    addresses["ops"]["admin_token"] = "not-loopback"  # ops.host a..b is not loopback: the token is required
    result = serve_to_its_end(tmp_path, gateway_config(tmp_path, **addresses))
    assert result.returncode == 1
    assert result.stderr.endswith(
        "hookyard: cannot listen on a..b:3000: not a host name (label empty or too long)\n"
    )


def serve_to_its_end(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`hookyard serve` on `config`, expected to stop by itself (30 s at most)."""
    config_path = tmp_path / "routes.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_turning_tls_on_by_reload_is_said_to_wait_for_the_restart(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener is bound as plain HTTP or HTTPS at start: a reload renews a certificate, but cannot
    switch TLS on or off, and says so like the other settings that wait for a restart."""
    cert, key = self_signed(tmp_path, "later")
    config_path = tmp_path / "routes.yaml"
    config = users_config(tmp_path, downstream, "/app")
    config_path.write_text(yaml.safe_dump(config))
    with RunningGateway(config_path) as gw:
        config.setdefault("listen", {})["tls"] = {"cert": str(cert), "key": str(key)}
        config_path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        body, headers = svix_request(msg_id="msg_still_plain")
        assert httpx.post(gw.url + "/webhooks/consignease", content=body, headers=headers).status_code == 200
    messages = [record.getMessage() for record in caplog.records]
    assert "listen.tls changed; it takes effect at the next restart" in messages


def test_a_reload_keeps_the_sections_that_wait_for_a_restart_as_the_gateway_runs_them(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload said that the addresses, storage, log, reload.watch and turning TLS off wait for the
    restart, but put the new file's values in the running config all the same (it kept only `delivery`).
    What read them there was misled: with TLS off in the file, the certificate the listener still serves
    was no longer watched nor reloaded, and a plugin's gateway.config named addresses and a store not in
    use."""
    tls = RenewableTls(tmp_path, downstream)
    with RunningGateway(tls.path, scheme="https") as gw:
        started = gw.gateway.config
        changed = copy.deepcopy(tls.config)
        changed["listen"] = {"host": "127.0.0.2", "port": free_port(), "max_connections": 100}
        changed["ops"] = {"host": "127.0.0.2", "port": free_port(), "admin_token": "a-new-token"}
        changed["storage"] = {"url": f"sqlite:///{tmp_path}/elsewhere.db", "retention": "1d"}
        changed["log"] = {"level": "debug", "format": "text"}
        changed["reload"] = {"watch": False, "interval": "200ms"}
        tls.path.write_text(yaml.safe_dump(changed))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        running = gw.gateway.config
        assert running.listen.tls == started.listen.tls
        assert (running.listen.host, running.listen.port) == (started.listen.host, started.listen.port)
        assert (running.ops.host, running.ops.port) == (started.ops.host, started.ops.port)
        assert running.storage == started.storage
        assert running.log == started.log
        assert running.reload.watch is True
        assert gw.gateway.table.config == running
        # What a reload applies at once, it applied.
        assert running.listen.max_connections == 100
        assert running.ops.admin_token == "a-new-token"
        assert running.reload.interval == 0.2
        # The listener still speaks TLS, and a certificate renewed in place is still picked up.
        tls.renew()
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 2)
        assert tls.post_trusting_the_renewed(gw, "msg_renewed_after_the_reload") == 200
    messages = [record.getMessage() for record in caplog.records]
    for name in ("listen address", "ops address", "listen.tls", "storage", "log", "reload.watch"):
        assert f"{name} changed; it takes effect at the next restart" in messages, name


def test_a_setting_that_waits_for_the_restart_shows_in_a_metric_until_the_file_and_the_gateway_agree(
    tmp_path: Path, downstream: Downstream
) -> None:
    """A reload that changes the store, the delivery workers or an address says so in the log only: the
    running gateway keeps the old ones, and a pod whose file names another store starts on it, the
    deliveries pending in the old one left behind, with nothing an alert could see beforehand."""
    config_path = tmp_path / "routes.yaml"
    config = users_config(tmp_path, downstream, "/app")
    config["reload"] = {"watch": False}
    config_path.write_text(yaml.safe_dump(config))

    def reload(content: dict[str, Any]) -> None:
        config_path.write_text(yaml.safe_dump(content))
        assert asyncio.run_coroutine_threadsafe(gw.gateway.reload(), gw.loop).result(5) is True

    with RunningGateway(config_path) as gw:
        assert gw.metric("hookyard_config_restart_required") == 0
        moved = copy.deepcopy(config)
        moved["storage"] = {"url": f"sqlite:///{tmp_path}/elsewhere.db"}
        reload(moved)
        assert gw.metric("hookyard_config_restart_required") == 1
        # What a reload applies at once leaves it as it is.
        moved["routes"][0]["actions"][0]["with"]["url"] = f"{downstream.url}/moved"
        reload(moved)
        assert gw.metric("hookyard_config_restart_required") == 1
        # The file back on the running store: nothing waits for a restart.
        reload(config)
        assert gw.metric("hookyard_config_restart_required") == 0


def test_a_reload_asked_for_while_shutting_down_is_skipped(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    config_path = tmp_path / "routes.yaml"
    config = users_config(tmp_path, downstream, "/app")
    config.setdefault("listen", {})["drain_delay"] = "2s"  # the shutdown waits here, the ops port still up
    config_path.write_text(yaml.safe_dump(config))
    caplog.set_level(logging.INFO, logger="hookyard")
    with RunningGateway(config_path) as gw:
        gw.loop.call_soon_threadsafe(gw.gateway.request_exit)
        wait_until(lambda: "shutting down" in caplog.messages)
        running = gw.gateway.config
        config["routes"][0]["events"] = ["nothing.*"]
        config_path.write_text(yaml.safe_dump(config))
        reloaded = asyncio.run_coroutine_threadsafe(gw.gateway.reload(), gw.loop).result(5)
        assert reloaded is False
        assert gw.gateway.config is running
        assert gw.metric("hookyard_config_reloads_total", result="success") == 0
    assert "config reload skipped: shutting down" in caplog.messages


def _not_utf8(config: dict[str, Any]) -> bytes:
    return yaml.safe_dump(config).encode() + "# café\n".encode("latin-1")


def _malformed_notify_url(config: dict[str, Any]) -> bytes:
    # httpx raises its own InvalidURL for it, not a ValueError.
    broken = copy.deepcopy(config)
    broken["routes"][0]["actions"].append({"id": "chat", "use": "notify", "with": {"url": "http://[::1"}})
    return yaml.safe_dump(broken).encode()


def _emptied(config: dict[str, Any]) -> bytes:
    # As a write in place leaves it until its writer gets to the content: not a config without sources
    # (every webhook would be answered 404, and pending deliveries end dead) but a file to read again.
    return b""


def _only_its_comments(config: dict[str, Any]) -> bytes:
    # Its first lines, as a write in place of a file that begins with comments leaves it for a moment: YAML
    # reads nothing in them, as in an empty file.
    return b"# Hookyard routes\n# secrets come from the environment\n"


@pytest.mark.parametrize(
    "breaking",
    [_not_utf8, _malformed_notify_url, _emptied, _only_its_comments],
    ids=["not_utf8", "malformed_url", "empty", "only_comments"],
)
def test_a_reload_that_cannot_load_is_refused_and_watching_goes_on(
    tmp_path: Path, downstream: Downstream, breaking: Any
) -> None:
    config = users_config(tmp_path, downstream, "/app")
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path) as gw:
        path.write_bytes(breaking(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1, timeout=5)
        # The watcher is still alive: a fixed file is picked up.
        config["routes"][0]["name"] = "renamed"
        path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1, timeout=5)


def test_a_file_written_in_place_in_two_steps_is_refused_half_way_and_loaded_once_whole(
    tmp_path: Path, downstream: Downstream
) -> None:
    """An editor saving in place: the watcher of a real serve reads the file half written, refuses it, and
    must load the whole of it once the write is complete. The refusal leaves /readyz, and the config
    metrics once the whole file is in, as they were."""
    path, config = users_config_file(tmp_path, downstream)
    ops_url = f"http://127.0.0.1:{config['ops']['port']}"
    gateway = GatewayProcess(path, ops_url).start()
    try:

        def metric(name: str, **labels: str) -> float:
            return metric_value(httpx.get(ops_url + "/metrics", timeout=5).text, name, **labels)

        config["routes"][0]["actions"][0]["with"]["url"] = f"{downstream.url}/after"
        text = yaml.safe_dump(config)
        half = text.index("use: forward") + len("use: forw")  # an action no plugin registers, and no more
        with path.open("w") as file:
            file.write(text[:half])
            file.flush()
            wait_until(lambda: metric("hookyard_config_reloads_total", result="error") == 1)
            assert metric("hookyard_config_last_reload_successful") == 0
            assert httpx.get(ops_url + "/readyz", timeout=5).status_code == 200
            time.sleep(0.3)  # a few more looks of the watcher at the same half: refused once
            file.write(text[half:])
        wait_until(lambda: metric("hookyard_config_reloads_total", result="success") == 1)
        assert metric("hookyard_config_reloads_total", result="error") == 1
        assert metric("hookyard_config_last_reload_successful") == 1
        assert metric("hookyard_config_restart_required") == 0
        assert httpx.get(ops_url + "/readyz", timeout=5).status_code == 200
        body, headers = svix_request(msg_id="msg_whole")
        url = f"http://127.0.0.1:{config['listen']['port']}/webhooks/consignease"
        assert httpx.post(url, content=body, headers=headers, timeout=5).status_code == 200
        [delivered] = downstream.wait_for(1, "/after")
        assert delivered.headers["idempotency-key"] == "msg_whole"
    finally:
        assert gateway.terminate() == 0
    logged = gateway.log_path.read_text()
    assert (logged.count("config reload refused"), logged.count("config reloaded")) == (1, 1)


def test_a_file_written_in_place_is_loaded_only_once_it_stays_the_same(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half a file can be a valid config: cut between two routes, it is one without the second. Read
    during a write in place, it must not be loaded; the whole file is, once it has stopped changing."""
    monkeypatch.setattr(app, "CONFIG_SETTLE", 1.0)
    config = users_config(tmp_path, downstream, "/app")
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path) as gw:
        second = {**config["routes"][0], "name": "second"}
        text = yaml.safe_dump({**config, "routes": [*config["routes"], second]})
        half = text.index("- actions:", text.index("- actions:") + 1)  # the start of the second route
        assert [route.name for route in parse_config(text[:half]).routes] == ["users"]  # valid on its own
        with path.open("w") as file:
            file.write(text[:half])
            file.flush()
            time.sleep(0.3)  # several looks of the watcher (every 100 ms), all within the settle time
            file.write(text[half:])
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1, timeout=10)
        assert [route.name for route in gw.gateway.config.routes] == ["users", "second"]
        time.sleep(0.3)
        assert gw.metric("hookyard_config_reloads_total", result="success") == 1
        assert gw.metric("hookyard_config_reloads_total", result="error") == 0


@pytest.mark.parametrize("valid", [True, False], ids=["loaded", "refused"])
def test_a_file_that_changes_again_while_it_is_reloaded_is_reloaded_again(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch, valid: bool
) -> None:
    """A file written in place can be read by a reload before its writer has finished: what the reload
    took is then not what the file ends up holding, and the end of the write must still be loaded."""
    import gateway.routing

    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(users_config(tmp_path, downstream, "/before")))
    final = yaml.safe_dump(users_config(tmp_path, downstream, "/after"))
    load_config_tree = gateway.routing.load_config_tree

    def read_then_the_writer_finishes(config_path: Path, **options: Any) -> Any:
        try:
            return load_config_tree(config_path, **options)
        finally:
            path.write_text(final)

    with RunningGateway(path) as gw:
        monkeypatch.setattr(gateway.routing, "load_config_tree", read_then_the_writer_finishes)
        middle = users_config(tmp_path, downstream, "/middle")
        path.write_text(yaml.safe_dump(middle) if valid else "routes: [")
        result = "success" if valid else "error"
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result=result) == 1, timeout=5)
        wait_until(
            lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1 + valid, timeout=5
        )
        body, headers = svix_request(msg_id="msg_final")
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
        downstream.wait_for(1, "/after")


def test_a_reload_whose_action_cannot_be_built_is_refused_and_changes_nothing(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway import delivered

    class TemplateOptions(BaseModel):
        template: str

    class Templated(Action):
        """Its options validate; the file they name is read as it is built."""

        name = "templated"
        Options = TemplateOptions

        def __init__(self, options: Any, resources: Any) -> None:
            super().__init__(options, resources)
            self.template = Path(options.template).read_text()

        async def deliver(self, job: Job) -> Outcome:
            return delivered()

    pm = plugins_with(actions=[Templated])
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(users_config(tmp_path, downstream, "/before")))
    with RunningGateway(path, pm=pm) as gw:
        template = tmp_path / "message.txt"
        changed = users_config(tmp_path, downstream, "/after")
        changed["routes"][0]["actions"].append(
            {"id": "chat", "use": "templated", "with": {"template": str(template)}}
        )
        path.write_text(yaml.safe_dump(changed))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1, timeout=5)
        [refused] = [
            r for r in caplog.records if r.getMessage() == "config reload refused; keeping the running config"
        ]
        assert any("message.txt" in error for error in refused.errors)  # type: ignore[attr-defined]
        # The running config is whole: routes and actions as before, not the new routes with the old actions.
        body, headers = svix_request(msg_id="msg_kept")
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
        downstream.wait_for(1, "/before")
        assert set(gw.gateway.table.actions) == {("users", "app")}
        # And the watcher lives on: once the file exists, the same config loads.
        template.write_text("{{ event.id }}")
        changed["routes"][0]["name"] = "users-again"
        path.write_text(yaml.safe_dump(changed))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1, timeout=5)
        body, headers = svix_request(msg_id="msg_new")
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
        downstream.wait_for(1, "/after")


def test_a_reload_refused_for_an_action_that_cannot_be_built_closes_those_built_before_it(
    tmp_path: Path, downstream: Downstream
) -> None:
    # An action's constructor may open what its aclose() closes (a file, a client). Those built before the
    # one that failed were dropped unclosed: with a bad file that a GitOps loop applies again and again,
    # one more of each at every refused reload.
    from gateway import delivered

    opened: list[Action] = []
    closed: list[Action] = []

    class Spool(Action):
        name = "spool"

        def __init__(self, options: Any, resources: Any) -> None:
            super().__init__(options, resources)
            opened.append(self)

        async def deliver(self, job: Job) -> Outcome:
            return delivered()

        async def aclose(self) -> None:
            closed.append(self)

    class Unbuildable(Spool):
        name = "unbuildable"

        def __init__(self, options: Any, resources: Any) -> None:
            raise PermissionError(13, "Permission denied", "/var/spool/acme")

    pm = plugins_with(actions=[Spool, Unbuildable])
    path = tmp_path / "routes.yaml"
    config = users_config(tmp_path, downstream, "/app", reload={"watch": False})
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path, pm=pm) as gw:
        config["routes"][0]["actions"] += [
            {"id": "spool", "use": "spool"},
            {"id": "broken", "use": "unbuildable"},
        ]
        path.write_text(yaml.safe_dump(config))
        for attempt in range(1, 4):
            assert not asyncio.run_coroutine_threadsafe(gw.gateway.reload(), gw.loop).result(10)
            assert gw.metric("hookyard_config_reloads_total", result="error") == attempt
        assert len(opened) == 3
        assert closed == opened


def test_a_bad_update_that_a_sighup_refused_is_not_refused_again_by_the_watcher(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refused reload pauses to close the actions it built. The watcher saw the same change meanwhile
    # and, once the SIGHUP's reload was done, refused it a second time: two errors for one bad update.
    from gateway import delivered

    class SlowToClose(Action):
        name = "slow-to-close"

        async def deliver(self, job: Job) -> Outcome:
            return delivered()

        async def aclose(self) -> None:
            await asyncio.sleep(1.5)

    class Unbuildable(SlowToClose):
        name = "unbuildable"

        def __init__(self, options: Any, resources: Any) -> None:
            raise PermissionError(13, "Permission denied", "/var/spool/acme")

    monkeypatch.setattr(app, "CONFIG_SETTLE", 0.2)
    path = tmp_path / "routes.yaml"
    config = users_config(tmp_path, downstream, "/app")  # watched every 100 ms
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path, pm=plugins_with(actions=[SlowToClose, Unbuildable])) as gw:
        config["routes"][0]["actions"] += [
            {"id": "spool", "use": "slow-to-close"},
            {"id": "broken", "use": "unbuildable"},
        ]

        async def update_and_sighup() -> bool:
            # At once, as a SIGHUP sent with the update: written and read by the reload in one turn of the
            # loop, so that the watcher, however late this thread runs, cannot have taken the update first.
            path.write_text(yaml.safe_dump(config))
            return await gw.gateway.reload()

        assert not asyncio.run_coroutine_threadsafe(update_and_sighup(), gw.loop).result(10)
        time.sleep(2.5)  # several more looks of the watcher at the same file, and a close of 1.5 s
        assert gw.metric("hookyard_config_reloads_total", result="error") == 1


def test_a_refused_reload_logs_every_error_as_check_does(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    from click.testing import CliRunner

    from gateway.cli import main

    config = users_config(tmp_path, downstream, "/app")
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path) as gw:
        # One error of the file's shape, one that only the plugins see in a route whose shape is fine.
        config["routes"][0]["actions"][0]["timeout"] = "soon"
        config["routes"].append({"name": "two", "source": "consignease", "actions": [{"use": "nope"}]})
        path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1, timeout=5)
    [refused] = [
        r for r in caplog.records if r.getMessage() == "config reload refused; keeping the running config"
    ]
    errors: list[str] = refused.errors  # type: ignore[attr-defined]
    assert [error.split(": ", 1)[0] for error in errors] == [
        "routes[0].actions[0].timeout",
        "routes[1].actions[0].use",
    ]
    checked = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert checked.exit_code == 1
    assert checked.output.splitlines() == [f"{path}: {error}" for error in errors]


def test_text_logs_keep_each_lines_fields(tmp_path: Path, downstream: Downstream) -> None:
    # With log.format: text, they were left out: `delivery dead` said neither which event nor why, and a
    # refused reload not what was wrong.
    downstream.answer("/app", 422)
    config = users_config(tmp_path, downstream, "/app")
    config["log"] = {"format": "text"}
    process, url = start_process(tmp_path, config)
    try:
        body, headers = svix_request(msg_id="msg_text_log")
        assert httpx.post(f"{url}/webhooks/consignease", content=body, headers=headers).status_code == 200
        downstream.wait_for(1, "/app")
        config["routes"][0]["actions"][0]["timeout"] = "soon"
        process.config_path.write_text(yaml.safe_dump(config))
        wait_until(lambda: "config reload refused" in process.log_path.read_text(), timeout=5)
        wait_until(lambda: "delivery dead" in process.log_path.read_text(), timeout=5)
    finally:
        assert process.terminate() == 0
    lines = process.log_path.read_text().splitlines()
    [dead] = [line for line in lines if "WARNING hookyard.delivery: delivery dead " in line]
    assert "event_id=msg_text_log source=consignease event_type=user.created route=users action=app" in dead
    assert 'status_code=422 error="HTTP 422"' in dead
    [refused] = [line for line in lines if "config reload refused" in line]
    assert refused.endswith(
        "ERROR hookyard: config reload refused; keeping the running config "
        """errors=["routes[0].actions[0].timeout: 'soon' is not a duration; use e.g. 500ms, 5s, 2m, 1h or a """
        'number of seconds"]'
    )


def test_a_refused_reload_never_logs_a_urls_credentials_or_secret_path(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A chat webhook's URL is a secret, and so is a password in a URL: the reload's errors name the place
    and the host, not the rest."""
    config = users_config(tmp_path, downstream, "/app")
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path) as gw:
        broken = copy.deepcopy(config)
        actions = broken["routes"][0]["actions"]
        actions[0]["with"]["url"] = "https://alice:pa55word@app.example/hooks?token=qs-secret"
        actions.append(
            {
                "id": "chat",
                "use": "notify",
                "with": {"url": "htps://hooks.slack.example/services/T0/B0/XOXSECRET"},
            }
        )
        actions.append({"id": "fwd", "use": "forward", "with": {"url": "ftp://files.example/drop/FTPSECRET"}})
        path.write_text(yaml.safe_dump(broken))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1, timeout=5)
    [refused] = [
        r for r in caplog.records if r.getMessage() == "config reload refused; keeping the running config"
    ]
    errors: list[str] = refused.errors  # type: ignore[attr-defined]
    assert len(errors) == 3, errors
    for secret in ("alice", "pa55word", "qs-secret", "XOXSECRET", "FTPSECRET"):
        assert not any(secret in error for error in errors), (secret, errors)
    assert errors[0].startswith("routes[0].actions[0].with.url: 'https://app.example/…': credentials")
    assert errors[1] == "routes[0].actions[1].with.url: 'htps://hooks.slack.example/…' is not an http(s) URL"
    assert errors[2] == "routes[0].actions[2].with.url: 'ftp://files.example/…' is not an http(s) URL"


def test_uvicorns_lines_name_the_listener_they_are_about(tmp_path: Path, downstream: Downstream) -> None:
    """Both listeners are uvicorn servers: "Started server process [PID]" and "Shutting down" came twice,
    with nothing to tell which listener each was about."""
    config = users_config(tmp_path, downstream, "/app")
    config["log"] = {"level": "info"}
    process, _ = start_process(tmp_path, config)
    assert process.terminate() == 0
    records = [json.loads(line) for line in process.log_path.read_text().splitlines()]
    uvicorns = [
        (record["message"], record.get("listener"))
        for record in records
        if record["logger"] == "uvicorn.error"
    ]
    for message in ("Started server process [{}]", "Shutting down", "Finished server process [{}]"):
        said = [listener for text, listener in uvicorns if text == message.format(process.process.pid)]
        assert sorted(said) == ["ops", "webhook"], uvicorns


@pytest.mark.parametrize("new_loop", event_loops())
def test_an_ops_request_cut_off_by_the_shutdown_gets_no_answer_as_a_webhook_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, new_loop: Any
) -> None:
    # Its body still coming when the ops listener's drain (OPS_DRAIN_TIMEOUT) ran out, uvicorn cancelled
    # it and answered `500` text/plain "Internal Server Error", with a traceback logged at ERROR. As on the
    # webhook listener, a request cut off gets no answer: its connection is closed.
    with RunningGateway(gateway_config(tmp_path), new_loop=new_loop) as gw:
        port = int(gw.ops_url.rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /admin/replay HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
            # Answered after the request above was read: the ops listener reads its connections in turn.
            assert gw.client.get(gw.ops_url + "/healthz").status_code == 200
            gw.loop.call_soon_threadsafe(gw.gateway.request_exit)
            gw.thread.join(20)
            assert not gw.thread.is_alive()
            with conn.makefile("rb") as reader:
                assert reader.read() == b""
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


# A cluster's GitOps loop or frequent ConfigMap updates: a reload every RELOAD_EVERY_S under steady load,
# 40 to warm up, then CHURN_RELOADS more, measured.
CHURN_RELOADS = 150
CHURN_RATE = 100  # webhooks a second
RELOAD_EVERY_S = 0.15


def churned_config(config: dict[str, Any], downstream: Downstream, number: int) -> dict[str, Any]:
    """The config of reload `number`: the `users` route always, forwarding to the same place; a second route
    under a new name each time (its filter, action ids and notify template changed), dropped at every
    third; a second source under a new name each time, dropped at every fourth. Every seventh is
    refused."""
    changed = copy.deepcopy(config)
    changed["limits"] = {"max_body_bytes": [65536, 1048576][number % 2]}
    changed["routes"][0]["actions"][0]["concurrency"] = [4, 16, 64][number % 3]
    if number % 3 != 2:
        log_id = f"log-{number % 2}"
        changed["routes"].append(
            {
                "name": f"side-{number}",
                "source": "consignease",
                "filter": {"data.n": {"gte": [0, 50, 90][number % 3]}},
                "actions": [
                    {"id": log_id, "use": "forward", "with": {"url": f"{downstream.url}/side"}},
                    {
                        "id": "chat",
                        "use": "notify",
                        "after": log_id,
                        "with": {
                            "url": f"{downstream.url}/chat",
                            "template": f"v{number} {{{{ event.id }}}}",
                        },
                    },
                ],
            }
        )
    if number % 4 != 3:
        extra = f"extra-{number}"
        changed["sources"][extra] = {**changed["sources"]["consignease"], "path": "/webhooks/extra"}
        changed["routes"].append(
            {
                "name": f"from-{extra}",
                "source": extra,
                "actions": [{"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/extra"}}],
            }
        )
    if number % 7 == 0:
        changed["routes"].append({"name": "broken", "source": "nowhere", "actions": []})
    return changed


def reloaded_since(metrics_url: str, successes: float) -> bool:
    exposition = httpx.get(metrics_url).text
    return metric_value(exposition, "hookyard_config_reloads_total", result="success") > successes


def series_count(exposition: str) -> int:
    return sum(1 for line in exposition.splitlines() if line and not line.startswith("#"))


@pytest.mark.slow
def test_a_reload_every_150_ms_under_load_leaks_nothing_and_loses_no_webhook(
    tmp_path: Path, downstream: Downstream
) -> None:
    from tests.reliability.harness import open_fds, proc_status

    config = users_config(tmp_path, downstream, "/users")
    config["log"] = {"level": "info"}
    config["reload"] = {"interval": "200ms"}
    config["sources"].pop("consignly")
    process, url = start_process(tmp_path, config)
    assert process.process is not None
    pid = process.process.pid
    metrics_url = process.ops_url + "/metrics"
    accepted: list[str] = []
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(timeout=10) as client:
            number = 0
            deadline = time.monotonic() + 60  # bounded, however slowly the reloads go
            while not stop.is_set() and time.monotonic() < deadline:
                number += 1
                msg_id = f"msg_churn_{number:06d}"
                body, headers = svix_request(data={"id": msg_id, "n": number % 100}, msg_id=msg_id)
                response = client.post(url + "/webhooks/consignease", content=body, headers=headers)
                if response.status_code == 200:
                    accepted.append(msg_id)
                time.sleep(1 / CHURN_RATE)

    def reload_to(number: int) -> None:
        written = tmp_path / "routes.yaml.new"
        written.write_text(yaml.safe_dump(churned_config(config, downstream, number)))
        os.replace(written, process.config_path)  # as a ConfigMap's symlink swap: never half written
        if number % 4:  # the others are left to the watcher
            process.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        time.sleep(RELOAD_EVERY_S)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        for number in range(1, 41):  # warm up: every kind of config seen once, caches filled
            reload_to(number)
        baseline = proc_status(pid)
        fds_before = open_fds(pid)
        series_before = series_count(httpx.get(metrics_url).text)
        delivered_before = 0.0
        for number in range(41, 41 + CHURN_RELOADS):
            reload_to(number)
            if number % 20 == 0:
                # The kept route's counter goes on counting: a reload drops the series of what it removed only.
                delivered = metric_value(
                    httpx.get(metrics_url).text,
                    "hookyard_deliveries_total",
                    route="users",
                    action="app",
                    outcome="delivered",
                )
                assert delivered >= delivered_before
                delivered_before = delivered
        stop.set()
        sender.join(15)
        exposition = httpx.get(metrics_url).text
        reloads = metric_value(exposition, "hookyard_config_reloads_total", result="success")
        refused = metric_value(exposition, "hookyard_config_reloads_total", result="error")
        assert reloads + refused >= 100 and refused >= 10, exposition
        # Every webhook answered 200 reaches the kept route once; nothing is left pending.
        wait_until(lambda: len(downstream.received("/users")) >= len(accepted), 60, 0.2)
        keys = Counter(request.headers["idempotency-key"] for request in downstream.received("/users"))
        assert set(keys) == set(accepted)
        assert max(keys.values()) == 1
        database = sqlite3.connect(tmp_path / "hookyard.db")
        try:
            wait_until(
                lambda: (
                    database.execute(
                        "SELECT count(*) FROM deliveries WHERE state IN ('pending', 'waiting')"
                    ).fetchone()[0]
                    == 0
                ),
                30,
                0.2,
            )
            # The removed routes' deliveries end dead or skipped, each with its reason.
            unexplained = database.execute(
                "SELECT count(*) FROM deliveries WHERE state IN ('dead', 'skipped') AND last_error IS NULL"
            ).fetchone()[0]
        finally:
            database.close()
        assert unexplained == 0
        # Back to the config the baseline was read under, twice: the second drops the series that the
        # deliveries of actions removed by the first brought back as they ended.
        for again in range(2):
            successes = metric_value(
                httpx.get(metrics_url).text, "hookyard_config_reloads_total", result="success"
            )
            baseline_config = yaml.safe_dump(churned_config(config, downstream, 40))
            process.config_path.write_text(f"{baseline_config}# {again}\n")
            process.process.send_signal(signal.SIGHUP)
            wait_until(lambda since=successes: reloaded_since(metrics_url, since))
        after = proc_status(pid)
        fds_after = open_fds(pid)
        series_after = series_count(httpx.get(metrics_url).text)
        exit_code, took = stop_with_sigterm(process.process)
    finally:
        stop.set()
        process.kill()
    logged = process.log_path.read_text()
    assert exit_code == 0, logged[-3000:]
    assert took < worst_case_shutdown(0, DeliveryEngine().shutdown_timeout), f"shutdown took {took:.1f}s"
    # Past the warm-up, CHURN_RELOADS more reloads: a leak of what a reload builds (actions, their clients and
    # files, the series of what it removed, the tasks that close the old actions) would show in these.
    assert after["Threads"] == baseline["Threads"]
    assert fds_after <= fds_before + 16, (fds_before, fds_after)
    assert after["VmRSS"] - baseline["VmRSS"] < 16 * 1024, (baseline, after)  # KiB
    assert series_after <= series_before + 8, (series_before, series_after)
    errors = [
        line
        for line in logged.splitlines()
        if '"ERROR"' in line and "config reload refused; keeping the running config" not in line
    ]
    assert not errors, errors[:5]
    assert "Traceback" not in logged
    print(
        "FIGURES", baseline, after, fds_before, fds_after, series_before, series_after, reloads, refused, took
    )


class BlockingProvider(SvixProvider):
    name = "blocking"

    def verify(self, headers: Any, body: bytes, now: float) -> None:
        time.sleep(1.0)  # a plugin's blocking call: the whole loop waits
        super().verify(headers, body, now)


class SubprocessProvider(SvixProvider):
    name = "subprocess"

    def verify(self, headers: Any, body: bytes, now: float) -> None:
        # Waits in a selector, as the event loop does when it has nothing to do: taken for an idle loop.
        subprocess.run(["sleep", "1"], capture_output=True, check=True)
        super().verify(headers, body, now)


@pytest.mark.parametrize(
    ("provider", "blocking_line"),
    [(BlockingProvider, "time.sleep(1.0)"), (SubprocessProvider, 'subprocess.run(["sleep", "1"]')],
    ids=["sleep", "subprocess"],
)
def test_a_provider_that_blocks_the_event_loop_is_named_in_the_log(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    provider: type[SvixProvider],
    blocking_line: str,
) -> None:
    # Nothing said why every webhook and delivery waited, nor where.
    monkeypatch.setattr(stalls, "STALL_THRESHOLD", 0.3)
    config = gateway_config(tmp_path)
    config["sources"]["consignease"]["provider"] = provider.name
    with RunningGateway(config, pm=plugins_with(providers=[provider])) as gw:
        body, headers = svix_request(msg_id="msg_blocking")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        # (A loaded machine may hold the loop up elsewhere too: only the provider's is looked at.)
        blocked = wait_until(
            lambda: [r for r in caplog.records if r.name == "hookyard.loop" and r.function == "verify"]
        )
    [record] = blocked
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith("the event loop has been blocked for ")
    assert f"in verify ({__file__}:" in record.getMessage()
    assert (record.function, record.file, record.suppressed) == ("verify", __file__, 0)
    assert blocking_line in record.stack


class SyncClientProvider(SvixProvider):
    name = "sync-client"
    url = ""  # a server that never answers

    def verify(self, headers: Any, body: bytes, now: float) -> None:
        with contextlib.suppress(httpx.TimeoutException):
            httpx.get(self.url, timeout=1.0)  # a plugin's synchronous client: the whole loop waits for it
        super().verify(headers, body, now)


def test_a_plugin_blocked_in_an_installed_library_is_the_one_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The innermost frame outside the standard library was named: httpcore's, where the plugin's call waited,
    # with the plugin's own frame cut from the stack logged and a once-a-minute limit on httpcore's line
    # that silenced every other plugin blocked the same way.
    monkeypatch.setattr(stalls, "STALL_THRESHOLD", 0.3)
    silent = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
    monkeypatch.setattr(SyncClientProvider, "url", f"http://127.0.0.1:{silent.getsockname()[1]}/")
    config = gateway_config(tmp_path)
    config["sources"]["consignease"]["provider"] = SyncClientProvider.name
    with silent, RunningGateway(config, pm=plugins_with(providers=[SyncClientProvider])) as gw:
        body, headers = svix_request(msg_id="msg_sync_client")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        blocked = wait_until(
            lambda: [r for r in caplog.records if r.name == "hookyard.loop" and r.file == __file__]
        )
    [record] = blocked
    # Named as `hookyard plugins` lists it: the plugin that registered the provider (tests.support's).
    assert (record.function, record.plugin) == ("verify", "test-plugin")
    assert f"in verify ({__file__}:" in record.getMessage()
    assert "of plugin test-plugin" in record.getMessage()
    assert "a plugin must not block" in record.getMessage()
    assert record.stack.startswith(f'  File "{__file__}"')  # from the plugin's frame inward
    assert "httpcore" in record.stack


@pytest.mark.parametrize("new_loop", event_loops())
def test_an_event_loop_waiting_for_something_to_do_is_never_said_to_be_blocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, new_loop: Any
) -> None:
    # A loop late to beat only because the process had been paused (SIGSTOP, a VM suspended) was said to
    # be blocked in the frame that runs it, its thread waiting in the selector. Here any beat is late.
    monkeypatch.setattr(stalls, "STALL_THRESHOLD", 0.0)
    config = gateway_config(tmp_path)
    config["sources"]["consignease"]["provider"] = BlockingProvider.name
    with RunningGateway(config, pm=plugins_with(providers=[BlockingProvider]), new_loop=new_loop) as gw:
        time.sleep(1.0)  # idle, looked at by the watch a few times
        body, headers = svix_request(msg_id="msg_blocking")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        # The watch, which looked at the idle loop all along, has said something since.
        wait_until(lambda: [r for r in caplog.records if r.name == "hookyard.loop"])
    # (A loaded machine may hold the loop up elsewhere too, or find it at work: only a waiting loop is looked
    # for, its innermost frame the selector's or the one that runs the loop.)
    innermost = [r.stack.rpartition('  File "')[2] for r in caplog.records if r.name == "hookyard.loop"]
    waiting = [selectors.__file__, f'{support.__file__}", line {support_run_line()}, in _run']
    assert not [frame for frame in innermost if frame.startswith(tuple(waiting))]


def support_run_line() -> int:
    """The line of RunningGateway._run that runs the loop."""
    lines, first = inspect.getsourcelines(RunningGateway._run)
    return first + next(n for n, line in enumerate(lines) if "run_until_complete" in line)


def test_a_serve_cancelled_while_it_drains_stops_watching_the_event_loop(tmp_path: Path) -> None:
    # The watching thread was stopped at the end of the drain only: a serve cancelled during it (or whose
    # drain failed) left the thread watching a loop that no longer ran, for the life of the process.
    config = gateway_config(tmp_path)
    config["listen"] = {**config.get("listen", {}), "drain_delay": "60s"}
    gw = RunningGateway(config)  # its gateway and sockets, served here rather than in its thread
    before = set(threading.enumerate())

    async def cancel_while_draining() -> list[threading.Thread]:
        serving = asyncio.create_task(gw.gateway.serve([gw.ingress_sock], [gw.ops_sock]))
        watching: list[threading.Thread] = []
        for _ in range(1000):  # 10 s at most
            watching = [
                t for t in threading.enumerate() if t not in before and t.name == "hookyard-stall-watch"
            ]
            if watching or serving.done():
                break
            await asyncio.sleep(0.01)
        gw.gateway.request_exit()
        for _ in range(1000):
            if not gw.gateway.ready:
                break
            await asyncio.sleep(0.01)
        serving.cancel()  # in the drain delay's wait
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await gw.gateway.stop()
        return watching

    try:
        [watching] = asyncio.run(cancel_while_draining())
        wait_until(lambda: not watching.is_alive())
    finally:
        gw.loop.close()
        gw.client.close()
        gw.ingress_sock.close()
        gw.ops_sock.close()
