"""The admin API on the ops listener: auth, listing, inspection and every replay mode; and the CLI through it."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from prometheus_client import Metric
from svix.webhooks import Webhook

from gateway import hookimpl
from gateway.admin_client import RemoteOperations
from gateway.app import Gateway
from gateway.cli import main
from gateway.config import ConfigError, load_config, parse_config
from gateway.operations import OperationError, Operations, parse_time
from gateway.plugins import new_plugin_manager
from tests.support import (
    SVIX_SECRET,
    Downstream,
    RunningGateway,
    ServerThread,
    consignly_body,
    consignly_headers,
    gateway_config,
    read_body,
    svix_request,
    wait_until,
)

TOKEN = "admin-token-for-tests"


def users_config(
    tmp_path: Path, downstream: Downstream, events: list[str] | None = None, **ops: Any
) -> dict[str, Any]:
    config = gateway_config(tmp_path)
    config["ops"] = {"host": "127.0.0.1", "admin_token": TOKEN, **ops}
    config["reload"] = {"interval": "100ms"}
    config["routes"] = [
        {
            "name": "users",
            "source": "consignease",
            "events": events or ["user.*"],
            "actions": [
                {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}},
                {"id": "audit", "use": "forward", "after": "app", "with": {"url": f"{downstream.url}/audit"}},
            ],
        }
    ]
    return config


def admin(
    gw: RunningGateway, method: str, path: str, token: str | None = TOKEN, **kwargs: Any
) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return gw.client.request(method, gw.ops_url + path, headers=headers, **kwargs)


def send(gw: RunningGateway, msg_id: str, event_type: str = "user.created") -> None:
    body, headers = svix_request(event_type=event_type, msg_id=msg_id)
    assert gw.post("/webhooks/consignease", body, headers).status_code == 200


def counts(page: dict[str, Any]) -> dict[str, Any]:
    """A bulk replay's page without its window (the since and until the gateway fixed)."""
    return {name: page[name] for name in ("replayed", "created", "next_cursor")}


def states(gw: RunningGateway, msg_id: str) -> dict[str, str]:
    return {d["action"]: d["state"] for d in admin(gw, "GET", f"/admin/events/{msg_id}").json()["deliveries"]}


@pytest.mark.parametrize(
    ("ops", "token", "status"),
    [
        ({}, None, 401),
        ({}, "wrong", 401),
        ({}, TOKEN, 200),
        ({"admin_token": None}, None, 200),  # no token configured, bound to loopback: open
        ({"host": "0.0.0.0"}, None, 401),  # reachable from outside, with its token: closed without it
        ({"host": "0.0.0.0"}, TOKEN, 200),
    ],
    ids=["no-token", "bad-token", "good-token", "loopback-open", "exposed-no-token", "exposed-good-token"],
)
def test_auth(
    tmp_path: Path, downstream: Downstream, ops: dict[str, Any], token: str | None, status: int
) -> None:
    with RunningGateway(users_config(tmp_path, downstream, **ops)) as gw:
        response = admin(gw, "GET", "/admin/events", token=token)
        assert response.status_code == status, response.text
        if status == 401:
            assert response.headers["www-authenticate"] == "Bearer"
        # Never on the webhook listener.
        assert gw.client.get(gw.url + "/admin/events").status_code == 404


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
@pytest.mark.parametrize("token", [None, "", "${HOOKYARD_ADMIN_TOKEN:-}"])
def test_an_ops_listener_off_loopback_without_a_token_is_refused_at_load(
    tmp_path: Path, downstream: Downstream, host: str, token: str | None
) -> None:
    config_path = tmp_path / "routes.yaml"
    config_path.write_text(yaml.safe_dump(users_config(tmp_path, downstream, host=host, admin_token=token)))
    with pytest.raises(ConfigError) as caught:
        load_config(config_path, environ={})
    assert caught.value.errors == [
        f"ops.admin_token: required when the ops listener is not bound to loopback (ops.host is {host!r}): "
        'set admin_token: "${HOOKYARD_ADMIN_TOKEN}", or bind ops.host to 127.0.0.1'
    ]
    # `hookyard serve` and `hookyard check` stop with that line before anything listens.
    result = CliRunner().invoke(main, ["check", "-c", str(config_path)])
    assert result.exit_code == 1
    assert (
        f"ops.admin_token: required when the ops listener is not bound to loopback (ops.host is {host!r})"
        in (result.output)
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost", "LocalHost"])
def test_an_ops_listener_on_loopback_needs_no_token(tmp_path: Path, host: str) -> None:
    config = parse_config(yaml.safe_dump({"ops": {"host": host}}), environ={})
    assert config.ops.admin_token is None
    # The default binds loopback, so an empty file still loads.
    assert parse_config("", environ={}).ops.host == "127.0.0.1"


def test_a_reload_that_drops_the_token_is_refused_while_ops_is_exposed(
    tmp_path: Path, downstream: Downstream
) -> None:
    config_path = tmp_path / "routes.yaml"
    config = users_config(tmp_path, downstream)
    config_path.write_text(yaml.safe_dump(config))
    with RunningGateway(config_path) as gw:
        # ops.host takes effect at the next restart, but the new file is checked as a whole: refused.
        config["ops"] = {"host": "0.0.0.0"}
        config_path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1)
        assert admin(gw, "GET", "/admin/events", token=None).status_code == 401
        assert admin(gw, "GET", "/admin/events").status_code == 200


def test_without_a_token_only_loopback_peers_are_answered(tmp_path: Path) -> None:
    """Belt and braces for a reload that drops the token while ops.host moves to loopback (the bound
    address changes only at the restart): a token-less admin API answers loopback peers only."""
    gateway = Gateway(parse_config(yaml.safe_dump(gateway_config(tmp_path)), environ={}))

    async def get(peer: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=gateway.ops, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://ops") as client:
            return await client.get("/admin/events")

    response = asyncio.run(get("10.1.2.3"))
    assert response.status_code == 403
    assert response.json() == {
        "error": "the admin API needs ops.admin_token when the ops listener is not on loopback"
    }


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),  # the CLI, curl, a script
        ({"host": "localhost"}, 200),
        ({"sec-fetch-site": "none"}, 200),  # typed into a browser's address bar
        ({"host": "rebound.example:9000"}, 403),  # a site's own name made to resolve to 127.0.0.1
        ({"origin": "https://any.example"}, 403),  # a site's script or form
        ({"sec-fetch-site": "cross-site"}, 403),
        ({"sec-fetch-site": "same-site"}, 403),  # a page on another loopback port
    ],
    ids=["program", "localhost", "address-bar", "rebinding", "origin", "cross-site", "same-site"],
)
def test_without_a_token_a_web_page_cannot_call_the_admin_api(
    tmp_path: Path, headers: dict[str, str], status: int
) -> None:
    """Any web page a browser on this host opens can send requests to a loopback address, and read the
    answers through a DNS name rebound to 127.0.0.1: a token-less admin API answers local programs only."""
    with RunningGateway(gateway_config(tmp_path)) as gw:
        send(gw, "msg_private")
        listed = gw.client.get(gw.ops_url + "/admin/events", headers=headers)
        assert listed.status_code == status, listed.text
        replayed = gw.client.post(gw.ops_url + "/admin/events/msg_private/replay", headers=headers)
        assert replayed.status_code == status
        if status == 403:
            assert "msg_private" not in listed.text + replayed.text


def test_list_filters_and_cursor_pages(tmp_path: Path, downstream: Downstream) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        for index in range(5):
            send(gw, f"msg_list_{index}")
        send(gw, "msg_session", event_type="session.created")
        downstream.wait_for(10)
        wait_until(lambda: states(gw, "msg_list_4") == {"app": "delivered", "audit": "delivered"})
        first = admin(gw, "GET", "/admin/events", params={"limit": 2, "type": "user.created"}).json()
        assert [e["id"] for e in first["events"]] == ["msg_list_4", "msg_list_3"]
        second = admin(
            gw,
            "GET",
            "/admin/events",
            params={"limit": 2, "type": "user.created", "cursor": first["next_cursor"]},
        ).json()
        assert [e["id"] for e in second["events"]] == ["msg_list_2", "msg_list_1"]
        unrouted = admin(gw, "GET", "/admin/events", params={"state": "unrouted"}).json()["events"]
        assert [e["id"] for e in unrouted] == ["msg_session"]
        assert admin(gw, "GET", "/admin/events", params={"route": "users", "since": "1h"}).json()["events"]
        assert admin(gw, "GET", "/admin/events", params={"since": "yesterday-ish"}).status_code == 400
        assert admin(gw, "GET", "/admin/events", params={"limit": 0}).status_code == 400
        # A cursor below 0 found no event before it: an empty page, as if there were none.
        expected = (400, "cursor: must be 0 or more (the next_cursor of the page before)")
        listed = admin(gw, "GET", "/admin/events", params={"cursor": -1})
        assert (listed.status_code, listed.json()["error"]) == expected
        replayed = admin(gw, "POST", "/admin/replay", json={"mode": "dead", "since": "1h", "cursor": -1})
        assert (replayed.status_code, replayed.json()["error"]) == expected


def test_list_filters_by_source_and_until(tmp_path: Path, downstream: Downstream) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_early")
        time.sleep(0.05)
        between = time.time()
        time.sleep(0.05)
        send(gw, "msg_late")
        body = consignly_body(event_id="evt_consignly")
        assert gw.post("/webhooks/consignly", body, consignly_headers(body)).is_success

        def ids(**params: Any) -> list[str]:
            response = admin(gw, "GET", "/admin/events", params=params)
            assert response.status_code == 200, response.text
            return [event["id"] for event in response.json()["events"]]

        assert ids() == ["evt_consignly", "msg_late", "msg_early"]
        assert ids(source="consignly") == ["evt_consignly"]
        assert ids(source="consignease") == ["msg_late", "msg_early"]
        assert ids(source="no-such-source") == []
        # Empty parameters are parameters not given, and cursor 0 is the first page, as for bulk replays.
        assert ids(source="", type="", cursor=0) == ["evt_consignly", "msg_late", "msg_early"]
        # until: received before that time; with since, a window.
        until = datetime.fromtimestamp(between, UTC).isoformat()
        assert ids(until=until) == ["msg_early"]
        assert ids(until=until.replace("+00:00", "Z")) == ["msg_early"]
        assert ids(since=until, until=datetime.now(UTC).isoformat()) == ["evt_consignly", "msg_late"]
        assert ids(source="consignly", until=until) == []
        assert ids(until="1h") == []  # received before an hour ago: none
        assert ids(until="0s") == ["evt_consignly", "msg_late", "msg_early"]  # before now: all
        bad = admin(gw, "GET", "/admin/events", params={"until": "yesterday-ish"})
        assert bad.status_code == 400 and bad.json()["error"].startswith("until: ")


def test_list_reads_a_type_as_a_routes_events_take_it(tmp_path: Path, downstream: Downstream) -> None:
    config = users_config(tmp_path, downstream)
    with RunningGateway(config) as gw:
        send(gw, "msg_user")
        body = consignly_body(event_type="ConsignmentCreated", event_id="evt_named")
        assert gw.post("/webhooks/consignly", body, consignly_headers(body)).is_success

        def ids(**params: Any) -> list[str]:
            response = admin(gw, "GET", "/admin/events", params=params)
            assert response.status_code == 200, response.text
            return [event["id"] for event in response.json()["events"]]

        # Stored as consignment.created, it was found by that type only.
        assert ids(type="consignment.created") == ["evt_named"]
        assert ids(type="ConsignmentCreated") == ["evt_named"]
        assert ids(type="101", source="consignly") == ["evt_named"]
        assert ids(type="ConsignmentCreated", source="consignease") == []
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
        listed = runner.invoke(main, ["events", "list", "--admin-url", gw.ops_url, "--type", "101"])
        assert listed.exit_code == 0, listed.output
        assert [line.split()[-1] for line in listed.stdout.splitlines()] == ["evt_named"]


def test_until_as_epoch_seconds(tmp_path: Path, downstream: Downstream) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_epoch")
        later = time.time() + 60
        events = admin(gw, "GET", "/admin/events", params={"until": f"{later:.3f}"}).json()["events"]
        assert [event["id"] for event in events] == ["msg_epoch"]


def test_a_store_that_cannot_write_is_503_not_500(tmp_path: Path, downstream: Downstream) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_readonly")
        wait_until(lambda: states(gw, "msg_readonly") == {"app": "delivered", "audit": "delivered"})
        storage = gw.gateway.storage
        asyncio.run_coroutine_threadsafe(
            storage._run(lambda conn: conn.execute("PRAGMA query_only = ON")),  # type: ignore[attr-defined]
            gw.loop,
        ).result(10)
        try:
            replay = admin(gw, "POST", "/admin/events/msg_readonly/replay")
            assert replay.status_code == 503
            assert replay.json()["error"].startswith("storage unavailable: ")
            assert replay.headers["retry-after"] == "5"
        finally:
            storage._writer.connection.execute("PRAGMA query_only = OFF")  # type: ignore[attr-defined]
        assert admin(gw, "POST", "/admin/events/msg_readonly/replay").status_code == 200


def test_show_event_with_attempts(tmp_path: Path, downstream: Downstream) -> None:
    downstream.answer("/app", 503, 200)
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_show")
        wait_until(lambda: states(gw, "msg_show") == {"app": "delivered", "audit": "delivered"})
        event = admin(gw, "GET", "/admin/events/msg_show").json()
        app = event["deliveries"][0]
        assert [(a["number"], a["outcome"], a["status_code"]) for a in app["attempts"]] == [
            (1, "retry", 503),
            (2, "delivered", 200),
        ]
        assert all(a["duration_ms"] >= 0 and a["at"].endswith("Z") for a in app["attempts"])
        assert admin(gw, "GET", "/admin/events/nope").status_code == 404


class HeldReceiver:
    """An ASGI receiver that holds every answer until `answer` is set, and counts the requests under way."""

    def __init__(self) -> None:
        self.arrived, self.answer = threading.Event(), threading.Event()
        self.running = self.most = 0  # requests under way, and at most

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        self.running += 1
        self.most = max(self.most, self.running)
        self.arrived.set()
        while not self.answer.is_set():
            await asyncio.sleep(0.01)
        self.running -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@contextmanager
def held_delivery(tmp_path: Path, msg_id: str) -> Iterator[tuple[RunningGateway, HeldReceiver]]:
    """A gateway with the admin API whose one delivery, of `msg_id`, is under way at a HeldReceiver (its
    lease outlasting the test) when this yields; its answer is let go on leaving, whatever happened."""
    receiver = HeldReceiver()
    with ServerThread(receiver) as server:
        config = gateway_config(tmp_path, f"http://127.0.0.1:{server.port}")
        config["ops"] = {"host": "127.0.0.1", "admin_token": TOKEN}
        config["delivery"]["lease"] = "1h"
        with RunningGateway(config) as gw:
            send(gw, msg_id)
            try:
                assert receiver.arrived.wait(10)
                yield gw, receiver
            finally:
                receiver.answer.set()


def test_a_delivery_whose_attempt_is_under_way_shows_no_next_attempt(tmp_path: Path) -> None:
    """While an attempt is in flight the delivery is leased until its lease runs out (`delivery.lease`):
    that time was shown as its next attempt, one nobody scheduled."""
    with held_delivery(tmp_path, "msg_running") as (gw, receiver):
        [running] = admin(gw, "GET", "/admin/events/msg_running").json()["deliveries"]
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
        shown = runner.invoke(main, ["events", "show", "msg_running", "--admin-url", gw.ops_url])
        receiver.answer.set()
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout)["deliveries"] == [running]
        assert (running["state"], running["in_flight"], running["next_attempt_at"]) == ("pending", True, None)
        wait_until(lambda: states(gw, "msg_running") == {"app": "delivered"})
        [done] = admin(gw, "GET", "/admin/events/msg_running").json()["deliveries"]
        assert (done["in_flight"], done["next_attempt_at"]) == (False, None)


def test_a_replay_while_a_delivery_is_in_flight_leaves_it_and_its_result_alone(tmp_path: Path) -> None:
    with held_delivery(tmp_path, "msg_busy") as (gw, receiver):
        replays = [admin(gw, "POST", "/admin/events/msg_busy/replay", json={}) for _ in range(3)]
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
        told = runner.invoke(main, ["replay", "msg_busy", "--admin-url", gw.ops_url])
        receiver.answer.set()
        # Matched, left alone, and counted so: not the answer of a replay that matched nothing.
        assert [(r.json()["replayed"], r.json()["pending"]) for r in replays] == [(0, 1)] * 3
        assert (told.exit_code, told.stdout) == (
            0,
            "replaying 0 deliveries; 1 left alone: still pending (in flight, due or waiting)\n",
        )
        wait_until(lambda: states(gw, "msg_busy") == {"app": "delivered"})
        [app] = admin(gw, "GET", "/admin/events/msg_busy").json()["deliveries"]
        assert [(a["number"], a["outcome"]) for a in app["attempts"]] == [(1, "delivered")]
        assert receiver.most == 1
        assert gw.metric("hookyard_replays_total", mode="event") == 0


def test_replay_one_event_and_one_action(tmp_path: Path, downstream: Downstream) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_replay")
        downstream.wait_for(1, "/audit")
        wait_until(lambda: states(gw, "msg_replay") == {"app": "delivered", "audit": "delivered"})
        assert admin(gw, "POST", "/admin/events/msg_replay/replay", json={}).json() == {
            "replayed": 1,
            "created": 0,
            "next_cursor": None,
            "pending": 0,
        }  # as docs/operations.md shows it
        # The root runs again, and its dependent after it, with the same event id for downstream dedupe.
        assert [r.headers["idempotency-key"] for r in downstream.wait_for(2, "/audit")] == ["msg_replay"] * 2
        assert len(downstream.received("/app")) == 2
        wait_until(lambda: states(gw, "msg_replay") == {"app": "delivered", "audit": "delivered"})
        assert (
            admin(gw, "POST", "/admin/events/msg_replay/replay", json={"action": "audit"}).json()["replayed"]
            == 1
        )
        downstream.wait_for(3, "/audit")
        assert len(downstream.received("/app")) == 2
        assert (
            admin(gw, "POST", "/admin/events/msg_replay/replay", json={"action": "nope"}).status_code == 404
        )
        assert gw.metric("hookyard_replays_total", mode="event") == 2


def test_a_replayed_delivery_numbers_its_attempts_on_and_starts_its_retry_schedule_over(
    tmp_path: Path, downstream: Downstream
) -> None:
    downstream.answer("/app", 500, 500, 500, 200)
    config = users_config(tmp_path, downstream)
    config["defaults"]["retry"]["schedule"] = ["50ms"]  # two attempts a round
    with RunningGateway(config) as gw:
        send(gw, "msg_rounds")
        wait_until(lambda: states(gw, "msg_rounds") == {"app": "dead", "audit": "delivered"})
        assert admin(gw, "POST", "/admin/events/msg_rounds/replay", json={}).json()["replayed"] == 1
        # The replay has the whole schedule again: a retry, and then delivered. Numbered on from the
        # round before, as the app is told, so no number names two attempts; so is its dependent's.
        wait_until(lambda: len(downstream.received("/audit")) == 2)
        app = admin(gw, "GET", "/admin/events/msg_rounds").json()["deliveries"][0]
        assert [(a["number"], a["outcome"], a["status_code"]) for a in app["attempts"]] == [
            (1, "retry", 500),
            (2, "dead", 500),
            (3, "retry", 500),
            (4, "delivered", 200),
        ]
        assert [r.headers["x-hookyard-attempt"] for r in downstream.received("/app")] == ["1", "2", "3", "4"]
        assert [r.headers["x-hookyard-attempt"] for r in downstream.received("/audit")] == ["1", "2"]


def test_replay_one_event_narrowed_to_a_route(tmp_path: Path, downstream: Downstream) -> None:
    config = users_config(tmp_path, downstream)
    # A second route whose action has the same id: `action` alone names both.
    config["routes"].append(
        {
            "name": "mirror",
            "source": "consignease",
            "actions": [{"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/mirror"}}],
        }
    )
    with RunningGateway(config) as gw:

        def replay(**body: str) -> httpx.Response:
            # Once every delivery has finished: a replay leaves one still pending alone.
            wait_until(
                lambda: (
                    {d["state"] for d in admin(gw, "GET", "/admin/events/msg_routes").json()["deliveries"]}
                    == {"delivered"}
                )
            )
            return admin(gw, "POST", "/admin/events/msg_routes/replay", json=body)

        send(gw, "msg_routes")
        assert replay(route="mirror", action="app").json()["replayed"] == 1
        assert replay(route="users").json()["replayed"] == 1  # its root; audit follows it again
        assert replay(action="app").json()["replayed"] == 2  # both routes' app
        downstream.wait_for(3, "/audit")
        downstream.wait_for(3, "/mirror")
        assert [len(downstream.received(path)) for path in ("/app", "/audit", "/mirror")] == [3, 3, 3]

        missing = replay(route="nope")
        assert (missing.status_code, missing.json()["error"]) == (
            404,
            "event 'msg_routes' has no delivery for route 'nope'",
        )
        missing = replay(route="mirror", action="audit")
        assert (missing.status_code, missing.json()["error"]) == (
            404,
            "event 'msg_routes' has no delivery for action 'audit' in route 'mirror'",
        )


def test_replaying_an_event_that_retention_deletes_meanwhile_is_a_404_not_a_delivery_left_pending(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    downstream.answer("/app", 422)  # dead at once: the replay has something to run again
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_old")
        wait_until(lambda: states(gw, "msg_old") == {"app": "dead", "audit": "delivered"})
        send(gw, "msg_newest")  # the newest event is never deleted, whatever its age
        wait_until(lambda: states(gw, "msg_newest") == {"app": "delivered", "audit": "delivered"})
        storage = gw.gateway.storage
        replay_event = storage.replay_event

        async def replay_after_a_prune(*args: Any, **kwargs: Any) -> Any:
            # The replay reads the event, then replays it in a batch of its own: a batch of retention's,
            # deleting the event, may come in between. Staged here with a real prune of the store.
            assert (await storage.prune(time.time() + 3600)).events == 1
            return await replay_event(*args, **kwargs)

        monkeypatch.setattr(storage, "replay_event", replay_after_a_prune)
        replayed = admin(gw, "POST", "/admin/events/msg_old/replay", json={})
        # Not `{"replayed": 0, "pending": 1}`: nothing is left to run, and no delivery waits.
        assert (replayed.status_code, replayed.json()) == (
            404,
            {"error": "no event 'msg_old': deleted by retention (storage.retention) as it was replayed"},
        )
        assert admin(gw, "GET", "/admin/events/msg_old").status_code == 404
        assert gw.metric("hookyard_replays_total", mode="event") == 0


def test_replay_while_a_dependent_is_in_flight_runs_it_again_after_its_parent(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    downstream.delay = 0.5
    caplog.set_level(logging.INFO, "hookyard.delivery")
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_in_flight")
        # app is done (a request is recorded once answered) and audit's request is under way.
        wait_until(lambda: len(downstream.received("/app")) == 1 and downstream.in_flight == 1)
        assert admin(gw, "POST", "/admin/events/msg_in_flight/replay", json={}).json()["replayed"] == 1
        # audit acted on app's old result: it runs again once app's new one is in. The attempt that was
        # under way is let finish, and its result discarded: the next is numbered past it, as it was sent.
        downstream.wait_for(2, "/audit")
        wait_until(lambda: states(gw, "msg_in_flight") == {"app": "delivered", "audit": "delivered"})
        assert len(downstream.received("/app")) == 2
        assert [r.headers["x-hookyard-attempt"] for r in downstream.received("/audit")] == ["1", "2"]
        detail = admin(gw, "GET", "/admin/events/msg_in_flight").json()
        audit = next(d for d in detail["deliveries"] if d["action"] == "audit")
        assert [(a["number"], a["outcome"]) for a in audit["attempts"]] == [(2, "delivered")]
        labels = {"route": "users", "action": "audit", "outcome": "delivered"}
        assert gw.metric("hookyard_deliveries_total", **labels) == 1
    # The replay's expected outcome, nothing for an operator to act on: not a warning.
    [discarded] = [r for r in caplog.records if r.getMessage().startswith("attempt result discarded")]
    assert (discarded.levelname, discarded.getMessage()) == (
        "INFO",
        "attempt result discarded, as expected after a replay: the delivery was replayed or claimed again "
        "while the attempt ran",
    )
    assert (discarded.route, discarded.action, discarded.attempt) == ("users", "audit", 1)  # type: ignore[attr-defined]


def test_bulk_replay_dead(tmp_path: Path, downstream: Downstream) -> None:
    downstream.answer("/app", 400, 400, 400)
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        for index in range(3):
            send(gw, f"msg_dead_{index}")
        wait_until(lambda: all(states(gw, f"msg_dead_{i}")["app"] == "dead" for i in range(3)))
        # audit runs after app whatever its outcome (when: always by default).
        wait_until(lambda: {states(gw, f"msg_dead_{i}")["audit"] for i in range(3)} == {"delivered"})
        # A misspelt name is refused, not left out: without its window, this would replay every dead delivery.
        misspelt = admin(gw, "POST", "/admin/replay", json={"mode": "dead", "sinse": "1h"})
        assert (misspelt.status_code, misspelt.json()["error"]) == (
            400,
            "unknown 'sinse'; known: mode, since, until, source, route, action, cursor, limit",
        )
        one = admin(gw, "POST", "/admin/events/msg_dead_0/replay", json={"acton": "app"})
        assert (one.status_code, one.json()["error"]) == (
            400,
            "unknown 'acton'; known: source, route, action",
        )
        listed = admin(gw, "GET", "/admin/events", params={"sate": "dead", "limit": 1})
        assert (listed.status_code, listed.json()["error"]) == (
            400,
            "unknown 'sate'; known: source, type, state, route, since, until, cursor, limit",
        )
        shown = admin(gw, "GET", "/admin/events/msg_dead_0", params={"sorce": "consignease"})
        assert (shown.status_code, shown.json()["error"]) == (400, "unknown 'sorce'; known: source")
        # A parameter given twice is refused too: the last one was used, and the other left out unseen.
        twice = admin(
            gw, "GET", "/admin/events", params=[("state", "dead"), ("state", "pending"), ("type", "")]
        )
        assert (twice.status_code, twice.json()["error"]) == (
            400,
            "'state' given more than once; give each once",
        )
        twice = admin(
            gw, "GET", "/admin/events/msg_dead_0", params=[("source", "x"), ("source", "consignease")]
        )
        assert (twice.status_code, twice.json()["error"]) == (
            400,
            "'source' given more than once; give each once",
        )
        # An empty one is one not given, so it never counts as the second.
        once = admin(gw, "GET", "/admin/events", params=[("state", "dead"), ("state", ""), ("limit", 1)])
        assert once.status_code == 200 and once.json()["events"][0]["state"] == "dead"
        assert gw.metric("hookyard_replays_total", mode="dead") == 0
        before = time.time()
        first = admin(gw, "POST", "/admin/replay", json={"mode": "dead", "since": "1h", "limit": 2}).json()
        assert first["replayed"] == 2 and first["next_cursor"] is not None
        # The window as the gateway fixed it, by its clock: `1h` read once, and ending at that call.
        assert before <= first["until"] <= time.time()
        assert before - 3600 <= first["since"] <= first["until"] - 3600
        window = {"since": first["since"], "until": first["until"]}
        rest = admin(
            gw, "POST", "/admin/replay", json={"mode": "dead", **window, "cursor": first["next_cursor"]}
        ).json()
        assert rest == {"replayed": 1, "created": 0, "next_cursor": None, "pending": 0, **window}
        for index in range(3):
            wait_until(
                lambda i=index: states(gw, f"msg_dead_{i}") == {"app": "delivered", "audit": "delivered"}
            )
        assert gw.metric("hookyard_replays_total", mode="dead") == 3
        assert admin(gw, "POST", "/admin/replay", json={"mode": "sideways"}).status_code == 400


def test_a_body_field_given_twice_is_refused(tmp_path: Path, downstream: Downstream) -> None:
    # Of `{"since": "1h", "since": "30d"}`, either could be the one meant: a JSON parser keeps the last, and
    # the bulk replay would run wider than the first asked, unseen.
    downstream.answer("/app", 400)
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_twice")
        wait_until(lambda: states(gw, "msg_twice")["app"] == "dead")
        twice = admin(
            gw,
            "POST",
            "/admin/replay",
            content=b'{"mode": "dead", "since": "1h", "route": "users", "since": "30d"}',
        )
        assert (twice.status_code, twice.json()["error"]) == (
            400,
            "'since' given more than once; give each once",
        )
        one = admin(
            gw,
            "POST",
            "/admin/events/msg_twice/replay",
            content=b'{"action": "app", "action": "audit"}',
        )
        assert (one.status_code, one.json()["error"]) == (
            400,
            "'action' given more than once; give each once",
        )
        assert states(gw, "msg_twice")["app"] == "dead"
        assert gw.metric("hookyard_replays_total", mode="dead") == 0
        assert gw.metric("hookyard_replays_total", mode="event") == 0
        # Each given once, the same replay runs.
        once = admin(gw, "POST", "/admin/replay", json={"mode": "dead", "since": "1h", "route": "users"})
        assert once.status_code == 200 and once.json()["replayed"] == 1


def test_a_bulk_replay_with_an_empty_window_is_refused(tmp_path: Path, downstream: Downstream) -> None:
    # `"since": ""` (a script's unset variable) was read as no window: every dead delivery in the store ran.
    downstream.answer("/app", 400)
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_empty_window")
        wait_until(lambda: states(gw, "msg_empty_window")["app"] == "dead")
        for name in ("since", "until"):
            empty = admin(gw, "POST", "/admin/replay", json={"mode": "dead", name: ""})
            assert (empty.status_code, empty.json()["error"]) == (
                400,
                f"{name}: empty: give a time, e.g. 2h, or leave it out",
            )
        assert states(gw, "msg_empty_window")["app"] == "dead"
        assert gw.metric("hookyard_replays_total", mode="dead") == 0


def test_a_window_that_ends_before_it_starts_is_refused(tmp_path: Path, downstream: Downstream) -> None:
    # since 1h, until 2h: answered with nothing, as if nothing were there.
    downstream.answer("/app", 400)
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_window")
        wait_until(lambda: states(gw, "msg_window")["app"] == "dead")
        error = (
            "since '1h' is not before until '2h': the window holds no time (a duration is counted back from "
            "now: since 2h, until 1h is the hour before the last)"
        )
        listed = admin(gw, "GET", "/admin/events", params={"since": "1h", "until": "2h"})
        assert (listed.status_code, listed.json()["error"]) == (400, error)
        for mode in ("dead", "missing"):
            replayed = admin(gw, "POST", "/admin/replay", json={"mode": mode, "since": "1h", "until": "2h"})
            assert (replayed.status_code, replayed.json()["error"]) == (400, error)
        assert states(gw, "msg_window")["app"] == "dead"
        assert gw.metric("hookyard_replays_total", mode="dead") == 0
        # The CLI says so before it asks: as a usage error naming its options.
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
        through = runner.invoke(
            main, ["events", "list", "--admin-url", gw.ops_url, "--since", "1h", "--until", "2h"]
        )
        assert through.exit_code == 2 and "--since '1h' is not before --until '2h'" in through.stderr


def test_bulk_replay_missing_counts_the_deliveries_it_left_alone_as_pending(
    tmp_path: Path, downstream: Downstream
) -> None:
    downstream.delay = 0.5
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_under_way")
        wait_until(lambda: downstream.in_flight == 1)
        # app's attempt is under way and audit waits for it: both left alone, and counted.
        result = admin(gw, "POST", "/admin/replay", json={"mode": "missing", "since": "1h"}).json()
        assert {**counts(result), "pending": result["pending"]} == {
            "replayed": 0,
            "created": 0,
            "next_cursor": None,
            "pending": 2,
        }
        assert gw.metric("hookyard_replays_total", mode="missing") == 0
        downstream.wait_for(1, "/audit")
        assert len(downstream.received("/app")) == 1
        dead = admin(gw, "POST", "/admin/replay", json={"mode": "dead", "since": "1h"}).json()
        assert dead["pending"] == 0


def test_bulk_replay_missing_includes_events_that_matched_no_route(
    tmp_path: Path, downstream: Downstream
) -> None:
    config_path = tmp_path / "routes.yaml"
    config_path.write_text(yaml.safe_dump(users_config(tmp_path, downstream, events=["user.created"])))
    downstream.answer("/app", 200, 400)
    with RunningGateway(config_path) as gw:
        send(gw, "msg_ok")
        send(gw, "msg_failed")
        send(gw, "msg_unrouted", event_type="user.deleted")
        wait_until(lambda: states(gw, "msg_failed")["app"] == "dead")
        wait_until(lambda: states(gw, "msg_ok") == {"app": "delivered", "audit": "delivered"})
        assert states(gw, "msg_unrouted") == {}

        # The current config routes user.deleted too: its missing deliveries are created and run.
        config_path.write_text(yaml.safe_dump(users_config(tmp_path, downstream, events=["user.*"])))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        assert gw.metric("hookyard_replays_total", mode="missing") == 0
        result = admin(gw, "POST", "/admin/replay", json={"mode": "missing", "since": "1h"}).json()
        assert counts(result) == {"replayed": 1, "created": 2, "next_cursor": None}
        # Every delivery the replay reset or created counts, under its mode only.
        assert gw.metric("hookyard_replays_total", mode="missing") == 3
        assert gw.metric("hookyard_replays_total", mode="dead") == 0
        wait_until(lambda: states(gw, "msg_unrouted") == {"app": "delivered", "audit": "delivered"})
        wait_until(lambda: states(gw, "msg_failed") == {"app": "delivered", "audit": "delivered"})
        # Nothing left to replay: the metric stays.
        again = admin(gw, "POST", "/admin/replay", json={"mode": "missing", "since": "1h"}).json()
        assert counts(again) == {"replayed": 0, "created": 0, "next_cursor": None}
        assert gw.metric("hookyard_replays_total", mode="missing") == 3
        # msg_ok was delivered already: not sent again.
        assert [r.headers["idempotency-key"] for r in downstream.received("/app")].count("msg_ok") == 1
        assert (
            admin(gw, "POST", "/admin/replay", json={"mode": "missing"}).status_code == 400
        )  # since required
        # A route or action the current config does not have would create nothing: a typo, said so.
        for body, error in [
            ({"route": "user"}, "route: 'user' is not a route of the current config"),
            ({"action": "ap"}, "action: 'ap' is not an action of any route in the current config"),
            (
                {"route": "users", "action": "ap"},
                "action: 'ap' is not an action of route 'users' in the current config",
            ),
        ]:
            refused = admin(gw, "POST", "/admin/replay", json={"mode": "missing", "since": "1h", **body})
            assert (refused.status_code, refused.json()["error"]) == (400, error)
        fine = {"mode": "missing", "since": "1h", "route": "users", "action": "audit"}
        assert admin(gw, "POST", "/admin/replay", json=fine).status_code == 200


def test_replay_missing_of_a_dependent_creates_its_missing_parent_for_it_to_wait_for(
    tmp_path: Path, downstream: Downstream
) -> None:
    config = users_config(tmp_path, downstream, events=["user.created"])
    config["routes"][0]["actions"][1] = {
        "id": "alert",
        "use": "forward",
        "after": "app",
        "when": "failure",
        "with": {"url": f"{downstream.url}/alert"},
    }
    config_path = tmp_path / "routes.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with RunningGateway(config_path) as gw:
        send(gw, "msg_unrouted", event_type="user.deleted")
        assert states(gw, "msg_unrouted") == {}
        config["routes"][0]["events"] = ["user.*"]
        config_path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)

        # Only alert is asked for; it runs after app, which the event has no delivery of either: app is
        # created too, and alert waits for its result instead of running as if it had no parent.
        body = {"mode": "missing", "since": "1h", "action": "alert"}
        result = admin(gw, "POST", "/admin/replay", json=body).json()
        assert counts(result) == {"replayed": 0, "created": 2, "next_cursor": None}
        wait_until(lambda: states(gw, "msg_unrouted") == {"app": "delivered", "alert": "skipped"})
        assert len(downstream.received("/app")) == 1
        assert downstream.received("/alert") == []


def test_openapi_document_is_valid(tmp_path: Path, downstream: Downstream) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        document = admin(gw, "GET", "/admin/openapi.json").json()
    validate(document)
    assert set(document["paths"]) == {
        "/admin/events",
        "/admin/events/{event_id}",
        "/admin/events/{event_id}/replay",
        "/admin/replay",
    }
    # What the endpoints refuse, the document says: a client built from it never sends a cursor below 0.
    listed = {
        param["name"]: param["schema"] for param in document["paths"]["/admin/events"]["get"]["parameters"]
    }
    replayed = document["paths"]["/admin/replay"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert listed["cursor"]["minimum"] == replayed["properties"]["cursor"]["minimum"] == 0


def test_the_openapi_document_asks_for_the_bearer_token_only_where_one_is_set(
    tmp_path: Path, downstream: Downstream
) -> None:
    """Without ops.admin_token the API answers without one: a client built from the document asked its user
    for a token that does not exist."""
    with RunningGateway(users_config(tmp_path / "token", downstream)) as gw:
        assert admin(gw, "GET", "/admin/openapi.json").json()["security"] == [{"bearer": []}]
    with RunningGateway(users_config(tmp_path / "open", downstream, admin_token=None)) as gw:
        document = admin(gw, "GET", "/admin/openapi.json", token=None).json()
    validate(document)
    assert document["security"] == []


def test_the_window_a_bulk_replay_answers_is_a_body_the_document_lets_the_next_page_send(
    tmp_path: Path, downstream: Downstream
) -> None:
    """The next pages carry the since and until the first answered, as epoch seconds (numbers), as the CLI
    sends them: the document's request body takes them, as the endpoint does."""
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        document = admin(gw, "GET", "/admin/openapi.json").json()
        first = admin(gw, "POST", "/admin/replay", json={"mode": "dead", "since": "1h", "limit": 1})
        assert first.status_code == 200, first.text
        window = {name: first.json()[name] for name in ("since", "until")}
        assert all(isinstance(value, float) for value in window.values())
        following = {"mode": "dead", **window, "cursor": 1, "limit": 1}
        assert admin(gw, "POST", "/admin/replay", json=following).status_code == 200
    body = document["paths"]["/admin/replay"]["post"]["requestBody"]["content"]["application/json"]
    jsonschema.Draft4Validator(body["schema"]).validate(following)
    jsonschema.Draft4Validator(body["schema"]).validate({"mode": "dead", "since": "2h", "until": "0s"})


@pytest.mark.parametrize(
    ("path", "body", "valid"),
    [
        ("/admin/replay", {"mode": "dead", "since": "1h"}, True),
        ("/admin/replay", {"mode": "dead", "sinse": "1h"}, False),
        ("/admin/replay", {"mode": "dead", "since": ""}, False),
        ("/admin/replay", {"mode": "dead", "until": ""}, False),
        (
            "/admin/replay",
            {"mode": "dead", "since": None, "until": None, "source": None, "route": None},
            True,
        ),
        ("/admin/replay", {"mode": "dead", "action": None, "cursor": None, "limit": None}, True),
        ("/admin/events/msg_body/replay", {"route": "users"}, True),
        ("/admin/events/msg_body/replay", {"rout": "users"}, False),
        ("/admin/events/msg_body/replay", {"source": None, "route": None, "action": None}, True),
    ],
    ids=["window", "misspelt", "empty-since", "empty-until", "nulls", "more-nulls", "route", "rout", "null"],
)
def test_the_openapi_document_takes_the_request_bodies_the_endpoints_take(
    tmp_path: Path, downstream: Downstream, path: str, body: dict[str, Any], valid: bool
) -> None:
    """A client checks a body against the document before sending it: the document took a misspelt field
    and an empty since or until, which the endpoint refuses, and refused null, which it reads as a field
    not given (as the since: null a bulk replay's first page answers)."""
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_body")
        wait_until(lambda: len(downstream.received("/audit")) == 1)
        document = admin(gw, "GET", "/admin/openapi.json").json()
        response = admin(gw, "POST", path, json=body)
    assert response.status_code == (200 if valid else 400), response.text
    operation = "/admin/replay" if path == "/admin/replay" else "/admin/events/{event_id}/replay"
    schema = document["paths"][operation]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = OAS30Validator({**schema, "components": document["components"]})
    assert validator.is_valid(body) is valid, list(validator.iter_errors(body))


def test_the_admin_api_answers_in_the_shapes_the_openapi_document_gives(
    tmp_path: Path, downstream: Downstream
) -> None:
    """A client built from the document reads every answer with the schema it gives for that status: the
    listing, an event with its attempts, a replay's counts, and the errors."""
    downstream.answer("/app", 400)
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_shape")
        send(gw, "msg_unrouted", event_type="session.created")
        wait_until(lambda: states(gw, "msg_shape") == {"app": "dead", "audit": "delivered"})
        document = admin(gw, "GET", "/admin/openapi.json").json()
        answers = [
            ("get", "/admin/events", admin(gw, "GET", "/admin/events", params={"limit": 1})),
            ("get", "/admin/events", admin(gw, "GET", "/admin/events", params={"limit": 0})),
            ("get", "/admin/events", admin(gw, "GET", "/admin/events", token="wrong")),
            ("get", "/admin/events/{event_id}", admin(gw, "GET", "/admin/events/msg_shape")),
            ("get", "/admin/events/{event_id}", admin(gw, "GET", "/admin/events/msg_unrouted")),
            ("get", "/admin/events/{event_id}", admin(gw, "GET", "/admin/events/msg_none")),
            ("post", "/admin/events/{event_id}/replay", admin(gw, "POST", "/admin/events/msg_shape/replay")),
            ("post", "/admin/replay", admin(gw, "POST", "/admin/replay", json={"mode": "dead"})),
        ]
    assert [response.status_code for _, _, response in answers] == [200, 400, 401, 200, 200, 404, 200, 200]
    assert answers[0][2].json()["next_cursor"] is not None
    assert [d["attempts"][0]["status_code"] for d in answers[3][2].json()["deliveries"]] == [400, 200]
    for method, path, response in answers:
        documented = document["paths"][path][method]["responses"][str(response.status_code)]
        schema = documented["content"]["application/json"]["schema"]
        OAS30Validator({**schema, "components": document["components"]}).validate(response.json())


def test_cli_through_the_admin_api(tmp_path: Path, downstream: Downstream) -> None:
    downstream.answer("/app", 400)
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_cli")
        wait_until(lambda: states(gw, "msg_cli")["app"] == "dead")
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
        listed = runner.invoke(main, ["events", "list", "--admin-url", gw.ops_url, "--state", "dead"])
        assert listed.exit_code == 0, listed.output
        assert "msg_cli" in listed.output and "dead" in listed.output
        shown = runner.invoke(main, ["events", "show", "msg_cli", "--admin-url", gw.ops_url, "--json"])
        assert '"status_code": 400' in shown.output
        replayed = runner.invoke(
            main, ["replay", "--state", "dead", "--since", "1h", "--admin-url", gw.ops_url]
        )
        assert replayed.exit_code == 0 and "replaying 1 delivery\n" in replayed.output
        wait_until(lambda: states(gw, "msg_cli")["app"] == "delivered")
        denied = CliRunner().invoke(main, ["events", "list", "--admin-url", gw.ops_url])
        assert denied.exit_code == 1 and "bearer token" in denied.output


@pytest.mark.parametrize("option", ["--action", "--route", "--source"])
def test_an_empty_option_of_an_event_replay_replays_nothing_through_the_admin_api_as_on_the_database(
    tmp_path: Path, downstream: Downstream, option: str
) -> None:
    """`--action "$ACTION"` with the variable unset: on the database no delivery has the action '', and
    nothing was replayed; through the admin API the empty value was left out, and every delivery ran."""
    config = users_config(tmp_path, downstream)
    config_path = tmp_path / "routes.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
    with RunningGateway(config) as gw:
        send(gw, "msg_empty")
        downstream.wait_for(1, "/audit")
        wait_until(lambda: states(gw, "msg_empty") == {"app": "delivered", "audit": "delivered"})
        local = runner.invoke(main, ["replay", "msg_empty", option, "", "-c", str(config_path)])
        remote = runner.invoke(main, ["replay", "msg_empty", option, "", "--admin-url", gw.ops_url])
        assert (remote.exit_code, remote.stderr) == (local.exit_code, local.stderr) == (1, local.stderr)
        assert gw.metric("hookyard_replays_total", mode="event") == 0
    assert len(downstream.received("/app")) == 1


@pytest.mark.parametrize(
    "command",
    [
        ["events", "list", "--source", ""],
        ["events", "list", "--type", ""],
        ["events", "list", "--route", ""],
        ["events", "show", "msg_blank", "--source", ""],
    ],
)
def test_an_empty_filter_of_a_listing_answers_on_the_database_as_through_the_admin_api(
    tmp_path: Path, downstream: Downstream, command: list[str]
) -> None:
    """The admin API takes an empty query parameter as one not given (`--source "$SOURCE"`, the variable
    unset); on the database it named a source '' and listed nothing, or found no event to show."""
    config = users_config(tmp_path, downstream)
    config_path = tmp_path / "routes.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
    with RunningGateway(config) as gw:
        send(gw, "msg_blank")
        downstream.wait_for(1, "/audit")
        wait_until(lambda: states(gw, "msg_blank") == {"app": "delivered", "audit": "delivered"})
        local = runner.invoke(main, [*command, "-c", str(config_path)])
        remote = runner.invoke(main, [*command, "--admin-url", gw.ops_url])
    assert (local.exit_code, local.stdout, local.stderr) == (remote.exit_code, remote.stdout, remote.stderr)
    assert local.exit_code == 0 and "msg_blank" in local.stdout, local.output


def test_the_cli_says_what_to_do_about_a_401(tmp_path: Path, downstream: Downstream) -> None:
    """`missing or wrong bearer token` alone leaves the operator to guess where the CLI takes its token
    from, and whether it sent one."""
    env: dict[str, str | None]
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        for env, expected in (
            (
                {"HOOKYARD_ADMIN_TOKEN": None},
                "hookyard: missing or wrong bearer token: "
                "set $HOOKYARD_ADMIN_TOKEN to the gateway's ops.admin_token\n",
            ),
            (
                {"HOOKYARD_ADMIN_TOKEN": "not-the-token"},
                "hookyard: missing or wrong bearer token: "
                "$HOOKYARD_ADMIN_TOKEN is not the gateway's ops.admin_token\n",
            ),
        ):
            for command in (["events", "list"], ["events", "show", "x"], ["replay", "x"]):
                result = CliRunner(env=env).invoke(main, [*command, "--admin-url", gw.ops_url])
                assert (result.exit_code, result.stdout, result.stderr) == (1, "", expected), result.output


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda remote: remote.list_events(limit=5), "GET /admin/events within 0.5 s"),
        (
            lambda remote: remote.replay(mode="dead", since=0),
            "POST /admin/replay within 0.5 s; it may have been done all the same",
        ),
    ],
    ids=["list", "replay"],
)
def test_an_admin_api_that_does_not_answer_in_time_is_said_so(
    call: Callable[[RemoteOperations], Awaitable[Any]], expected: str
) -> None:
    """A timeout's own text is empty: `cannot reach the admin API at URL: `, for a request that did reach
    it, and that may have been done (a replay) when its answer is late."""
    with socket.socket() as listener:  # takes the connection, and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        async def run() -> str:
            remote = RemoteOperations(url, timeout=0.5)
            try:
                with pytest.raises(OperationError) as raised:
                    await call(remote)
            finally:
                await remote.aclose()
            return str(raised.value)

        assert asyncio.run(run()) == f"the admin API at {url} did not answer {expected}"


def test_a_token_the_http_library_refuses_is_not_shown_by_the_admin_client(downstream: Downstream) -> None:
    """h11 refuses a vertical tab in a header and repeats the header in its error: `Bearer <token>`."""

    async def run() -> str:
        remote = RemoteOperations(downstream.url, "s3cr3t\x0bx9y")
        try:
            with pytest.raises(OperationError) as raised:
                await remote.list_events(limit=5)
        finally:
            await remote.aclose()
        return str(raised.value)

    message = asyncio.run(run())
    assert "s3cr3t" not in message and "x9y" not in message, message
    assert (
        message
        == f"a request to the admin API at {downstream.url} could not be sent: a header cannot be carried"
    )
    assert downstream.received() == []


def deep_request(msg_id: str, levels: int) -> tuple[bytes, dict[str, str]]:
    """A Consignease webhook whose data holds lists nested `levels` deep (the body is `levels` + 2 deep)."""
    timestamp = datetime.now(tz=UTC)
    deep = "[" * levels + "]" * levels
    body = f'{{"type":"user.created","data":{{"id":"user_1","deep":{deep}}},"timestamp":1}}'
    headers = {
        "svix-id": msg_id,
        "svix-timestamp": str(int(timestamp.timestamp())),
        "svix-signature": Webhook(SVIX_SECRET).sign(msg_id, timestamp, body),
    }
    return body.encode(), headers


def test_an_event_nested_too_deeply_to_show_as_json_is_shown_with_its_body_as_text(
    tmp_path: Path, downstream: Downstream
) -> None:
    # The gateway reads JSON nested up to 1024 levels (orjson's limit); Python's json, which writes the
    # admin API's answers and the CLI's output and reads them back, stops near its recursion limit. The
    # event's page was a 500 with a traceback in the log, and `hookyard events show` could not show it.
    config_path = tmp_path / "hookyard.yaml"
    config_path.write_text(yaml.safe_dump(users_config(tmp_path, downstream)))
    with RunningGateway(config_path) as gw:
        body, headers = deep_request("msg_deep", 1010)
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        shallow, headers = deep_request("msg_shallow", 300)
        assert gw.post("/webhooks/consignease", shallow, headers).status_code == 200
        answer = admin(gw, "GET", "/admin/events/msg_deep")
        assert answer.status_code == 200, answer.text
        event = answer.json()
        assert event["payload"] is None
        assert "nested more than 512 levels deep" in event["unreadable"]
        assert event["body"] == body.decode()
        assert [d["action"] for d in event["deliveries"]] == ["app", "audit"]
        # Within the limit, the payload is shown as JSON, as for any event.
        event = admin(gw, "GET", "/admin/events/msg_shallow").json()
        assert event["payload"]["data"]["id"] == "user_1" and "body" not in event
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
        for where in (["--admin-url", gw.ops_url], ["--config", str(config_path)]):
            for form in ([], ["--json"]):
                shown = runner.invoke(main, ["events", "show", "msg_deep", *where, *form])
                assert shown.exit_code == 0, shown.output
                assert '"payload": null' in shown.output and "nested more than 512" in shown.output


def test_an_integer_past_64_bits_is_shown_with_all_its_digits(tmp_path: Path, downstream: Downstream) -> None:
    # orjson reads such an integer as a float: the event's page showed 1.2345678901234568e+29.
    big = 123456789012345678901234567891
    config_path = tmp_path / "hookyard.yaml"
    config_path.write_text(yaml.safe_dump(users_config(tmp_path, downstream)))
    with RunningGateway(config_path) as gw:
        body, headers = svix_request(msg_id="msg_big", data={"id": "user_1", "amount": big, "parts": [-big]})
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        event = admin(gw, "GET", "/admin/events/msg_big").json()
        assert event["payload"]["data"] == {"id": "user_1", "amount": big, "parts": [-big]}
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
        for where in (["--admin-url", gw.ops_url], ["--config", str(config_path)]):
            shown = runner.invoke(main, ["events", "show", "msg_big", *where, "--json"])
            assert shown.exit_code == 0, shown.output
            assert f'"amount": {big}' in shown.output and "e+" not in shown.output


def test_replay_missing_makes_a_new_dependent_wait_for_its_replayed_parent(
    tmp_path: Path, downstream: Downstream
) -> None:
    config = users_config(tmp_path, downstream)
    config["routes"][0]["actions"] = config["routes"][0]["actions"][:1]  # only app
    config_path = tmp_path / "routes.yaml"
    config_path.write_text(yaml.safe_dump(config))
    downstream.answer("/app", 400)
    with RunningGateway(config_path) as gw:
        send(gw, "msg_late_alert")
        wait_until(lambda: states(gw, "msg_late_alert") == {"app": "dead"})
        # An alert on failure is added; app is fixed downstream and replayed: the alert must not fire.
        config["routes"][0]["actions"].append(
            {
                "id": "alert",
                "use": "forward",
                "after": "app",
                "when": "failure",
                "with": {"url": f"{downstream.url}/alert"},
            }
        )
        config_path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        result = admin(gw, "POST", "/admin/replay", json={"mode": "missing", "since": "1h"}).json()
        assert counts(result) == {"replayed": 1, "created": 1, "next_cursor": None}
        wait_until(lambda: states(gw, "msg_late_alert") == {"app": "delivered", "alert": "skipped"})
        assert downstream.received("/alert") == []


def test_dependents_a_replay_skips_count_as_skipped(tmp_path: Path, downstream: Downstream) -> None:
    # `alert` runs only when app fails, and `page` after `alert`. app is delivered: both are skipped, once
    # at first, again when alert is replayed on its own, and `late`, added after the event came with the
    # same `when`, is created skipped by a replay of what is missing. Each counts, as a skip an attempt
    # makes does.
    config = users_config(tmp_path, downstream)
    config_path = tmp_path / "routes.yaml"
    actions = config["routes"][0]["actions"]
    actions.append(
        {
            "id": "alert",
            "use": "forward",
            "after": "app",
            "when": "failure",
            "with": {"url": f"{downstream.url}/alert"},
        }
    )
    actions.append(
        {"id": "page", "use": "forward", "after": "alert", "with": {"url": f"{downstream.url}/page"}}
    )
    config_path.write_text(yaml.safe_dump(config))
    with RunningGateway(config_path) as gw:

        def skipped(action: str) -> float:
            return gw.metric("hookyard_deliveries_total", route="users", action=action, outcome="skipped")

        send(gw, "msg_skips")
        wait_until(lambda: states(gw, "msg_skips")["page"] == "skipped")
        assert (skipped("alert"), skipped("page")) == (1, 1)

        replay = admin(gw, "POST", "/admin/events/msg_skips/replay", json={"action": "alert"})
        assert replay.json()["replayed"] == 1
        wait_until(lambda: skipped("alert") == 2)
        assert skipped("page") == 2
        assert states(gw, "msg_skips") == {
            "app": "delivered",
            "audit": "delivered",
            "alert": "skipped",
            "page": "skipped",
        }

        actions.append(
            {
                "id": "late",
                "use": "forward",
                "after": "app",
                "when": "failure",
                "with": {"url": f"{downstream.url}/late"},
            }
        )
        config_path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        result = admin(gw, "POST", "/admin/replay", json={"mode": "missing", "since": "1h"}).json()
        assert counts(result) == {"replayed": 0, "created": 1, "next_cursor": None}
        [late] = [
            d
            for d in admin(gw, "GET", "/admin/events/msg_skips").json()["deliveries"]
            if d["action"] == "late"
        ]
        # Said why, as for those skipped when their parent finished.
        assert (late["state"], late["last_error"]) == ("skipped", "parent did not reach the required state")
        assert skipped("late") == 1
        assert [r.path for r in downstream.received()] == ["/app", "/audit"]


def test_admin_api_takes_the_bearer_scheme_in_any_case(tmp_path: Path, downstream: Downstream) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        response = gw.client.get(gw.ops_url + "/admin/events", headers={"authorization": f"bearer {TOKEN}"})
        assert response.status_code == 200, response.text
        wrong = gw.client.get(gw.ops_url + "/admin/events", headers={"authorization": f"Basic {TOKEN}"})
        assert wrong.status_code == 401


def test_admin_api_shows_and_replays_an_event_whose_id_has_a_slash(
    tmp_path: Path, downstream: Downstream
) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg/with/slash")
        wait_until(lambda: len(downstream.received("/audit")) == 1)
        shown = admin(gw, "GET", "/admin/events/msg%2Fwith%2Fslash")
        assert shown.status_code == 200, shown.text
        assert shown.json()["id"] == "msg/with/slash"
        replayed = admin(gw, "POST", "/admin/events/msg%2Fwith%2Fslash/replay")
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["replayed"] == 1
        # The CLI through the admin API too.
        result = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN}).invoke(
            main, ["events", "show", "--admin-url", gw.ops_url, "msg/with/slash"]
        )
        assert result.exit_code == 0, result.output


def test_an_id_that_ends_in_a_line_feed_is_not_read_as_the_id_without_it(
    tmp_path: Path, downstream: Downstream
) -> None:
    """A path's pattern ended in `$`, which matches before a final line feed too: `msg_lf%0A` showed the
    event msg_lf, another than asked for. And an id's part matched no line feed at all: a replay of one was
    answered as a path that is no endpoint, which the CLI reads as an admin URL that is not Hookyard's."""
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_lf")
        wait_until(lambda: len(downstream.received("/audit")) == 1)
        shown = admin(gw, "GET", "/admin/events/msg_lf%0A")
        assert (shown.status_code, shown.json()) == (404, {"error": "no event 'msg_lf\\n'"})
        replayed = admin(gw, "POST", "/admin/events/msg_lf%0A/replay")
        assert (replayed.status_code, replayed.json()) == (404, {"error": "no event 'msg_lf\\n'"})
        inner = admin(gw, "POST", "/admin/events/msg%0Alf/replay")
        assert (inner.status_code, inner.json()) == (404, {"error": "no event 'msg\\nlf'"})
        listed = admin(gw, "GET", "/admin/events%0A")
        assert (listed.status_code, listed.json()) == (
            404,
            {"error": "no admin endpoint GET /admin/events\n; see /admin/openapi.json"},
        )
        assert len(downstream.received("/audit")) == 1


@pytest.mark.parametrize(
    ("command", "method", "path"),
    [
        (["events", "list"], "GET", "/admin/events"),
        (["events", "show", "msg_x"], "GET", "/admin/events/msg_x"),
        (["replay", "msg_x"], "POST", "/admin/events/msg_x/replay"),
        (["replay", "--state", "dead", "--since", "1h"], "POST", "/admin/replay"),
    ],
)
def test_an_admin_url_that_is_not_the_ops_listener_says_so(
    tmp_path: Path, downstream: Downstream, command: list[str], method: str, path: str
) -> None:
    """The webhook listener's answer was shown as `hookyard: unknown_path`, and the ops listener's under a
    base URL ending in /admin as its own 404, as if the admin API had refused what was asked."""
    runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        webhooks = runner.invoke(main, [*command, "--admin-url", gw.url])
        assert webhooks.exit_code == 1, webhooks.output
        assert webhooks.stderr == (
            f"hookyard: --admin-url {gw.url} does not answer as Hookyard's ops listener: {method} {path} "
            "answered 404 "
            '{"error":"unknown_path","detail":"no source listens on this path"}\n'
        )
        base = gw.ops_url + "/admin"
        nested = runner.invoke(main, [*command, "--admin-url", base])
        assert nested.exit_code == 1, nested.output
        assert nested.stderr == (
            f"hookyard: --admin-url {base} does not answer as Hookyard's ops listener: {method} "
            f"/admin{path} answered 404 "
            f'{{"error":"no admin endpoint {method} /admin{path}; see /admin/openapi.json"}}: give the ops '
            "listener's own URL, without /admin\n"
        )
        # What the admin API itself answers is still its own error.
        missing = runner.invoke(main, ["events", "show", "msg_x", "--admin-url", gw.ops_url])
        assert (missing.exit_code, missing.stderr) == (1, "hookyard: no event 'msg_x'\n")
    # A 409 from something else (a proxy) is not the admin API's "several sources": no --source hint.
    downstream.answer("/admin/events/msg_x", 409)
    proxied = runner.invoke(main, ["events", "show", "msg_x", "--admin-url", downstream.url])
    assert proxied.exit_code == 1, proxied.output
    assert "does not answer as Hookyard's ops listener" in proxied.stderr, proxied.stderr
    assert "--source" not in proxied.stderr, proxied.stderr


@pytest.mark.parametrize("event_id", [".", "..", "replay"])
def test_the_cli_shows_and_replays_an_event_whose_id_is_a_dot_segment_or_replay(
    tmp_path: Path, downstream: Downstream, event_id: str
) -> None:
    # Any sender chooses its ids; as a path segment `..` would resolve to /admin (and its replay to the
    # bulk replay), `.` to the list of events. `replay` was taken for the replay endpoint's path, and not
    # shown: the CLI said the admin URL was not the ops listener.
    runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, event_id)
        wait_until(lambda: len(downstream.received("/audit")) == 1)
        shown = runner.invoke(main, ["events", "show", "--admin-url", gw.ops_url, event_id])
        assert shown.exit_code == 0, shown.output
        assert yaml.safe_load(shown.output)["id"] == event_id
        replayed = runner.invoke(main, ["replay", "--admin-url", gw.ops_url, event_id])
        assert replayed.exit_code == 0, replayed.output
        wait_until(lambda: len(downstream.received("/audit")) == 2)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_time_that_is_not_finite_is_a_bad_parameter(
    tmp_path: Path, downstream: Downstream, value: str
) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        response = admin(gw, "GET", "/admin/events", params={"since": value})
        assert (response.status_code, response.json()["error"]) == (
            400,
            f"since: {value!r} is not a finite time",
        )


def test_eight_digits_that_read_as_a_date_are_refused_not_taken_for_epoch_seconds_in_1970(
    tmp_path: Path, downstream: Downstream
) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        response = admin(gw, "GET", "/admin/events", params={"since": "20261202"})
        assert (response.status_code, response.json()["error"]) == (
            400,
            "since: '20261202' could be a date or epoch seconds (in 1970); write the date as 2026-12-02",
        )
        # Not a date (no 13th month): epoch seconds, as any other number.
        assert admin(gw, "GET", "/admin/events", params={"since": "20261302"}).status_code == 200


def test_epoch_milliseconds_are_refused_not_read_as_seconds_thousands_of_years_ahead(
    tmp_path: Path, downstream: Downstream
) -> None:
    """A JavaScript timestamp pasted as a time: read as seconds, the year 58000 or so, after every event (an
    empty listing, a bulk replay of nothing, said only as counts of 0) or, as until, before all of them."""
    millis = int(time.time() * 1000)
    expected = "is outside the years 1 to 9999: epoch milliseconds? give seconds"
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_millis")
        for name in ("since", "until"):
            listed = admin(gw, "GET", "/admin/events", params={name: str(millis)})
            assert (listed.status_code, listed.json()["error"]) == (400, f"{name}: '{millis}' {expected}")
        replayed = admin(gw, "POST", "/admin/replay", json={"mode": "dead", "since": millis})
        assert (replayed.status_code, replayed.json()["error"]) == (400, f"since: '{millis}' {expected}")
        # Seconds, with their milliseconds as a fraction, are a time as ever.
        listed = admin(gw, "GET", "/admin/events", params={"until": f"{millis / 1000 + 60:.3f}"})
        assert [event["id"] for event in listed.json()["events"]] == ["msg_millis"]


def test_a_duration_back_past_the_year_1_answers_a_window_the_next_page_can_send(
    tmp_path: Path, downstream: Downstream
) -> None:
    """`since: 1000000d` (everything, say) was counted back to before the year 1 and answered so: the next
    page, sent that since as epoch seconds as the CLI sends it, was refused as outside the years 1 to 9999."""
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg_long_ago")
        listed = admin(gw, "GET", "/admin/events", params={"since": "1000000d"})
        assert [event["id"] for event in listed.json()["events"]] == ["msg_long_ago"]
        first = admin(gw, "POST", "/admin/replay", json={"mode": "dead", "since": "1000000d", "limit": 1})
        assert first.status_code == 200, first.text
        window = {name: first.json()[name] for name in ("since", "until")}
        following = admin(
            gw, "POST", "/admin/replay", json={"mode": "dead", **window, "cursor": 1, "limit": 1}
        )
        assert following.status_code == 200, following.text


def test_an_admin_token_beyond_ascii_is_accepted(tmp_path: Path, downstream: Downstream) -> None:
    token = "jeton-sécurisé-✓"
    with RunningGateway(users_config(tmp_path, downstream, admin_token=token)) as gw:
        raw = b"Bearer " + token.encode()  # as a client sends it: UTF-8 bytes
        response = httpx.get(gw.ops_url + "/admin/events", headers=[(b"authorization", raw)])
        assert response.status_code == 200, response.text
        wrong = httpx.get(gw.ops_url + "/admin/events", headers=[(b"authorization", b"Bearer jeton")])
        assert wrong.status_code == 401
        # The CLI sends it so too; it ended with a UnicodeEncodeError traceback.
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": token})
        listed = runner.invoke(main, ["events", "list", "--admin-url", gw.ops_url])
        assert (listed.exit_code, listed.stderr) == (0, "no events\n"), listed.output


def test_an_unknown_admin_path_or_method_is_answered_in_json(tmp_path: Path, downstream: Downstream) -> None:
    """As every other admin error, so a tool reads `error` whatever went wrong; the health and metrics
    paths, which no tool reads so, keep the plain answers."""
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        nothing = admin(gw, "GET", "/admin/nothing")
        assert nothing.status_code == 404
        assert nothing.headers["content-type"] == "application/json"
        assert nothing.json() == {"error": "no admin endpoint GET /admin/nothing; see /admin/openapi.json"}
        wrong = admin(gw, "GET", "/admin/replay")
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "POST"
        assert wrong.json() == {"error": "GET is not allowed on /admin/replay; allowed: POST"}
        # Not an event `x/replay` to show: an id's own `/` arrives as %2F, which still reads as an id.
        wrong = admin(gw, "GET", "/admin/events/x/replay")
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "POST"
        assert wrong.json() == {"error": "GET is not allowed on /admin/events/x/replay; allowed: POST"}
        an_id = admin(gw, "GET", "/admin/events/x%2Freplay")
        assert (an_id.status_code, an_id.json()) == (404, {"error": "no event 'x/replay'"})
        plain = admin(gw, "GET", "/nothing")
        assert (plain.status_code, plain.text) == (404, "Not Found")
        assert (admin(gw, "POST", "/healthz").status_code, admin(gw, "GET", "/healthz").status_code) == (
            405,
            200,
        )


# Each path of the ops listener with a slash after it, how it is asked for, and its answer's error.
_SLASHED = {
    "/healthz/": ("GET", "Not Found"),
    "/readyz/": ("GET", "Not Found"),
    "/metrics/": ("GET", "Not Found"),
    "/admin/": ("GET", "no admin endpoint GET /admin/; see /admin/openapi.json"),
    "/admin/events/": ("GET", "no event ''"),  # the path of the event '', as `events show ''` asks for it
    "/admin/replay/": ("POST", "no admin endpoint POST /admin/replay/; see /admin/openapi.json"),
    "/admin/openapi.json/": ("GET", "no admin endpoint GET /admin/openapi.json/; see /admin/openapi.json"),
}


@pytest.mark.parametrize("path", _SLASHED)
def test_a_path_with_a_trailing_slash_is_no_endpoint_and_never_redirected(
    tmp_path: Path, downstream: Downstream, path: str
) -> None:
    """A path is the one written, as on the webhook listener: /metrics/ was redirected 307 to /metrics,
    and so was a POST to /admin/replay/, while /admin/events/ was (and is) the event '' to show. A probe or
    a scraper configured so now sees the 404 at once, and a redirected POST is never sent twice."""
    method, error = _SLASHED[path]
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        answer = admin(gw, method, path, json={"mode": "dead"} if method == "POST" else None)
        found = admin(gw, method, path.rstrip("/"), json={"mode": "dead"} if method == "POST" else None)
        described = admin(gw, "GET", "/admin/openapi.json").json()["info"]["description"]
    assert "location" not in answer.headers
    assert answer.status_code == 404
    assert (answer.text if error == "Not Found" else answer.json()["error"]) == error
    assert found.status_code == (404 if path == "/admin/" else 200)
    assert "with a slash after it, it is another path, answered 404. Nothing is redirected." in described


def test_a_bulk_replay_without_a_mode_says_it_is_missing(tmp_path: Path, downstream: Downstream) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        response = admin(gw, "POST", "/admin/replay", json={"since": "1h"})
        assert (response.status_code, response.json()) == (
            400,
            {"error": "mode: required, one of dead, missing"},
        )


@pytest.mark.parametrize(("name", "value"), [("limit", 1.5), ("cursor", 2.7), ("limit", "1.5")])
def test_a_bulk_replay_page_that_is_not_a_whole_number_is_refused_not_cut_to_one(
    tmp_path: Path, downstream: Downstream, name: str, value: Any
) -> None:
    """The document says integer: 2.7 read as 2 would start the page at a cursor no answer gave."""
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        body = {"mode": "dead", "since": "1h", name: value}
        response = admin(gw, "POST", "/admin/replay", json=body)
        assert (response.status_code, response.json()) == (400, {"error": f"{name}: must be an integer"})
        # A whole number written as a float is the number.
        assert admin(gw, "POST", "/admin/replay", json={**body, name: 2.0}).status_code == 200


def test_a_page_size_is_read_only_as_written_digits_not_as_whatever_python_reads_as_a_number(
    tmp_path: Path, downstream: Downstream
) -> None:
    # int() reads "+5", " 5 ", "1_0" and Arabic-Indic digits as numbers: a limit the document's integer does
    # not allow, which another implementation of the API would refuse.
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        for limit in ["+5", " 5", "5 ", "1_0", "\u0665", "0x5"]:
            response = admin(gw, "GET", "/admin/events", params={"limit": limit})
            assert (response.status_code, response.json()) == (400, {"error": "limit: must be an integer"}), (
                limit
            )
        assert admin(gw, "GET", "/admin/events", params={"limit": "5"}).status_code == 200
        body = {"mode": "dead", "since": "1h", "cursor": "1_0"}
        response = admin(gw, "POST", "/admin/replay", json=body)
        assert (response.status_code, response.json()) == (400, {"error": "cursor: must be an integer"})


def test_a_fault_in_an_admin_endpoint_is_a_json_500_logged_once_with_its_traceback(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug, not an OperationError: uvicorn answered it `500` text/plain, which a tool reading `error`
    could not read. Its text stays out of the answer, in the log with its traceback."""

    async def fault(self: Operations, **filters: Any) -> Any:
        raise RuntimeError("a fault at /var/lib/hookyard")

    monkeypatch.setattr(Operations, "list_events", fault)
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        response = admin(gw, "GET", "/admin/events")
        assert (response.status_code, response.headers["content-type"]) == (500, "application/json")
        assert response.json() == {"error": "internal error"}
        # And the listener goes on answering.
        assert admin(gw, "GET", "/admin/events/nothing").status_code == 404
    faults = [r for r in caplog.records if r.exc_info]
    assert [(r.levelname, str(r.exc_info[1])) for r in faults] == [("ERROR", "a fault at /var/lib/hookyard")]


class FailingCollector:
    """A plugin's collector with a bug: it raises at every scrape."""

    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("a fault in a plugin's collector")


class RegistersAFailingCollector:
    @hookimpl
    def startup(self, gateway: Any) -> None:
        # As the plugin guide shows: a plugin's metrics are served on /metrics with Hookyard's own.
        gateway.metrics.registry.register(FailingCollector())


def faults_logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str, str]]:
    return [
        (r.levelname, r.getMessage(), getattr(r, "path", ""), str(r.exc_info[1]))
        for r in caplog.records
        if r.exc_info
    ]


def test_a_fault_in_a_plugins_collector_is_a_json_500_on_metrics_logged_once(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    """It was starlette's `500 Internal Server Error` in plain text, and the traceback was logged by uvicorn
    as `Exception in ASGI application`, with neither the listener's nor the path's name."""
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(RegistersAFailingCollector(), name="failing-collector")
    with RunningGateway(users_config(tmp_path, downstream), pm=pm) as gw:
        response = gw.client.get(gw.ops_url + "/metrics")
        assert (response.status_code, response.headers["content-type"]) == (500, "application/json")
        assert response.json() == {"error": "internal error"}
        # The other endpoints, and the next scrape, are answered as before.
        assert gw.client.get(gw.ops_url + "/readyz").json() == {"status": "ready"}
        assert gw.client.get(gw.ops_url + "/metrics").status_code == 500
        faults = gw.gateway.metrics.ops_request_faults.labels("/metrics")._value.get()
    # Logged once a minute: each scrape brought the same traceback.
    assert faults_logged(caplog) == [
        ("ERROR", "an ops request failed", "/metrics", "a fault in a plugin's collector")
    ]
    assert faults == 2


def test_a_fault_in_the_readiness_check_is_a_json_503_not_ready_logged_once(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """/readyz answers 200 when ready and 503 otherwise (docs/operations.md): a check that raised proved
    nothing, so the pod goes out of rotation as for a store that cannot write, and the gauge that alerts
    on that says so too. Patched: the store turns every sqlite error into StorageUnavailable, so a bug is
    the only other cause."""
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        assert gw.metric("hookyard_storage_writable") == 1

        async def fault(*, room: int) -> None:
            raise RuntimeError("a fault in the readiness check")

        monkeypatch.setattr(gw.gateway.storage, "check_writable", fault)
        # Each probe: the same answer, counted, the traceback logged once a minute, not at every probe.
        for _probe in range(5):
            response = gw.client.get(gw.ops_url + "/readyz")
            assert (response.status_code, response.headers["content-type"]) == (503, "application/json")
            assert response.json() == {"status": "not ready", "reason": "internal error"}
        assert gw.metric("hookyard_ops_request_faults_total", path="/readyz") == 5
        assert gw.metric("hookyard_storage_writable") == 0
        assert gw.client.get(gw.ops_url + "/healthz").json() == {"status": "ok"}
        monkeypatch.undo()
        assert gw.client.get(gw.ops_url + "/readyz").json() == {"status": "ready"}
        assert gw.metric("hookyard_storage_writable") == 1
    assert faults_logged(caplog) == [
        ("ERROR", "an ops request failed", "/readyz", "a fault in the readiness check")
    ]


def test_a_fault_in_the_liveness_check_is_a_json_500_logged_once(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Patched, as the readiness check: needs_restart reads one attribute, and a bug is its only fault."""
    with RunningGateway(users_config(tmp_path, downstream)) as gw:

        def fault() -> str | None:
            raise RuntimeError("a fault in the liveness check")

        monkeypatch.setattr(gw.gateway.storage, "needs_restart", fault)
        for _probe in range(3):
            response = gw.client.get(gw.ops_url + "/healthz")
            assert (response.status_code, response.headers["content-type"]) == (500, "application/json")
            assert response.json() == {"status": "error", "reason": "internal error"}
        assert gw.metric("hookyard_ops_request_faults_total", path="/healthz") == 3
        monkeypatch.undo()
        assert gw.client.get(gw.ops_url + "/healthz").json() == {"status": "ok"}
    assert faults_logged(caplog) == [
        ("ERROR", "an ops request failed", "/healthz", "a fault in the liveness check")
    ]


@pytest.mark.parametrize("path", ["/admin/replay", "/admin/events/msg_1/replay"])
def test_a_replay_body_that_is_not_a_json_object_is_a_400_with_its_reason(
    tmp_path: Path, downstream: Downstream, path: str
) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        for body, reason in (
            (b"{mode: dead}", "the body is not valid JSON"),
            (b"\xff\xfe", "the body is not valid JSON"),
            (b'["dead"]', "the body must be a JSON object"),
            (b'"dead"', "the body must be a JSON object"),
        ):
            response = admin(gw, "POST", path, content=body)
            assert (response.status_code, response.json()) == (400, {"error": reason}), body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_past_64_kib_is_refused_not_read_into_memory_whole(
    tmp_path: Path, downstream: Downstream, chunked: bool
) -> None:
    # An admin body is a few fields. Read whole, one of 300 MB took the gateway's memory past 600 MB, and
    # its webhooks with it: refused once past the limit, however it is framed.
    body = b'{"mode": "dead"' + b" " * 70_000 + b"}"
    content: Any = iter([body[:1000], body[1000:]]) if chunked else body
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        response = admin(gw, "POST", "/admin/replay", content=content)
        assert (response.status_code, response.json()) == (
            413,
            {"error": "the body is longer than 64 KiB; an admin request's body is a few fields"},
        )
        fits = b'{"mode": "dead"' + b" " * 60_000 + b"}"
        assert admin(gw, "POST", "/admin/replay", content=fits).status_code == 200


def test_a_caller_that_leaves_before_its_body_ends_is_no_fault(
    tmp_path: Path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Its body cut short (the caller left, or its chunked body turned out malformed and the listener
    closed the connection), the request is over: nothing to answer, nothing to log. It was logged as an
    application error, with starlette's ClientDisconnect traceback."""
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        port = int(gw.ops_url.rpartition(":")[2])
        head = f"POST /admin/replay HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as left:
            left.sendall(head.encode() + b"Content-Length: 100\r\n\r\n{")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as malformed:
            malformed.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\nzz\r\n")
            with malformed.makefile("rb") as reader:
                assert reader.readline().startswith(b"HTTP/1.1 400 ")
        assert admin(gw, "GET", "/admin/events").status_code == 200
    # The gateway has stopped, its ops listener once those requests were over.
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_since_and_until_read_rfc_3339_s_lower_case_z() -> None:
    # RFC 3339 allows `z` for UTC, as payload times are read; and a time without a zone is UTC too.
    expected = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    for text in ("2026-01-01T00:00:00Z", "2026-01-01t00:00:00z", "2026-01-01T00:00:00+00:00", "2026-01-01"):
        assert parse_time(text, "until") == expected, text


def test_the_openapi_document_names_every_status_an_endpoint_answers(
    tmp_path: Path, downstream: Downstream
) -> None:
    """Each endpoint is asked what it refuses (a parameter it does not know, a wrong token, a web page's
    request, an unknown event): its answer's status is in the document's responses for it, as are those
    the guard gives every endpoint (a store that cannot be read, a fault)."""
    requests = {
        ("get", "/admin/events"): ("GET", "/admin/events", {"params": {"nope": "1"}}),
        ("get", "/admin/events/{event_id}"): ("GET", "/admin/events/msg_x", {"params": {"nope": "1"}}),
        ("post", "/admin/events/{event_id}/replay"): (
            "POST",
            "/admin/events/msg_x/replay",
            {"json": {"nope": 1}},
        ),
        ("post", "/admin/replay"): ("POST", "/admin/replay", {"json": {"nope": 1}}),
    }
    answered: dict[tuple[str, str], set[int]] = {key: {500, 503} for key in requests}
    with RunningGateway(users_config(tmp_path / "token", downstream)) as gw:
        document = admin(gw, "GET", "/admin/openapi.json").json()
        for key, (method, path, refused) in requests.items():
            answered[key].add(admin(gw, method, path, **refused).status_code)
            answered[key].add(admin(gw, method, path, token="wrong").status_code)
            answered[key].add(admin(gw, method, path, json={} if method == "POST" else None).status_code)
    with RunningGateway(users_config(tmp_path / "open", downstream, admin_token=None)) as gw:
        for key, (method, path, _) in requests.items():
            headers = {"origin": "https://any.example"}
            answered[key].add(gw.client.request(method, gw.ops_url + path, headers=headers).status_code)
    assert answered[("get", "/admin/events/{event_id}")] >= {400, 401, 403, 404}
    for (method, path), statuses in answered.items():
        documented = {int(status) for status in document["paths"][path][method]["responses"]}
        missing = sorted(statuses - documented)
        assert not missing, f"{method.upper()} {path} answers {missing}, which /admin/openapi.json leaves out"


def test_an_event_whose_stored_text_is_not_utf8_is_listed_and_shown_not_a_500(
    tmp_path: Path, downstream: Downstream
) -> None:
    # Written by hand (`CAST(x'ff' AS TEXT)` in a `sqlite3` shell) or by another version: sqlite3 failed
    # the whole listing on it, a 500 on the admin API and a failure of `hookyard events list`.
    config_path = tmp_path / "hookyard.yaml"
    config_path.write_text(yaml.safe_dump(users_config(tmp_path, downstream)))
    with RunningGateway(config_path) as gw:
        send(gw, "msg_bad")
        send(gw, "msg_good")
        wait_until(lambda: states(gw, "msg_bad") == {"app": "delivered", "audit": "delivered"})
        conn = sqlite3.connect(tmp_path / "hookyard.db")
        with conn:
            conn.execute("UPDATE events SET type = CAST(X'7573FF' AS TEXT) WHERE event_id = 'msg_bad'")
            conn.execute("UPDATE deliveries SET action = CAST(X'6170FF' AS TEXT) WHERE action = 'audit'")
        conn.close()

        listed = admin(gw, "GET", "/admin/events")
        assert listed.status_code == 200, listed.text
        assert {e["id"]: e["type"] for e in listed.json()["events"]} == {
            "msg_bad": "us\ufffd",
            "msg_good": "user.created",
        }
        shown = admin(gw, "GET", "/admin/events/msg_bad")
        assert shown.status_code == 200, shown.text
        event = shown.json()
        assert event["payload"] is None and "its type is not UTF-8 ('us\ufffd')" in event["unreadable"]
        assert [d["action"] for d in event["deliveries"]] == ["app", "ap\ufffd"]
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
        for where in (["--admin-url", gw.ops_url], ["--config", str(config_path)]):
            result = runner.invoke(main, ["events", "list", *where])
            assert result.exit_code == 0 and "us\ufffd" in result.output, result.output
            result = runner.invoke(main, ["events", "show", "msg_bad", *where])
            assert result.exit_code == 0 and '"ap\\ufffd"' in result.output, result.output  # JSON, ASCII


def test_an_id_or_action_shown_with_u_fffd_is_refused_saying_why_not_replayed_as_none(
    tmp_path: Path, downstream: Downstream
) -> None:
    # What is shown with U+FFFD is not what is stored: looked up by it, the event was "not found", and a
    # replay of the action shown replayed nothing, and said "replaying 0 deliveries".
    downstream.answer("/app", *[500] * 8)  # each app ends dead (4 attempts); audit runs after it all the same
    config_path = tmp_path / "hookyard.yaml"
    config_path.write_text(yaml.safe_dump(users_config(tmp_path, downstream)))
    with RunningGateway(config_path) as gw:
        send(gw, "msg_bad")
        send(gw, "msg_action")
        wait_until(
            lambda: states(gw, "msg_bad") == states(gw, "msg_action") == {"app": "dead", "audit": "delivered"}
        )
        conn = sqlite3.connect(tmp_path / "hookyard.db")
        with conn:
            conn.execute("UPDATE events SET event_id = CAST(X'6D73FF' AS TEXT) WHERE event_id = 'msg_bad'")
            conn.execute(
                "UPDATE deliveries SET action = CAST(X'6175FF' AS TEXT) WHERE action = 'audit' "
                "AND event_seq = (SELECT seq FROM events WHERE event_id = 'msg_action')"
            )
        conn.close()
        assert {e["id"] for e in admin(gw, "GET", "/admin/events").json()["events"]} == {
            "ms\ufffd",
            "msg_action",
        }
        assert [d["action"] for d in admin(gw, "GET", "/admin/events/msg_action").json()["deliveries"]] == [
            "app",
            "au\ufffd",
        ]

        not_utf8 = "text shown with U+FFFD is stored as bytes that are not UTF-8, and cannot be named"
        for method, path, body in [
            ("GET", "/admin/events/ms%EF%BF%BD", None),
            ("POST", "/admin/events/ms%EF%BF%BD/replay", {}),
            ("POST", "/admin/events/msg_action/replay", {"action": "au\ufffd"}),
        ]:
            answer = admin(gw, method, path, json=body)
            assert answer.status_code == 404 and not_utf8 in answer.json()["error"], answer.text
        assert states(gw, "msg_action") == {"app": "dead", "au\ufffd": "delivered"}
        runner = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN})
        for where in (["--admin-url", gw.ops_url], ["--config", str(config_path)]):
            for args in (
                ["events", "show", "ms\ufffd"],
                ["replay", "ms\ufffd"],
                ["replay", "msg_action", "--action", "au\ufffd"],
            ):
                result = runner.invoke(main, [*args, *where])
                assert result.exit_code == 1 and not_utf8 in result.stderr, result.output
