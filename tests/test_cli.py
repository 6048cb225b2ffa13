"""The `hookyard` command: config checks, schema, plugins, and inspecting and replaying stored events."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from click.testing import CliRunner, Result

from gateway import hookimpl
from gateway.actions import Action, Job, Outcome, delivered
from gateway.cli import main
from gateway.events import Event
from gateway.plugins import new_plugin_manager
from gateway.storage import Attempt, Claim, DeliveryRecord, NewDelivery
from gateway.storage.sqlite import SQLiteStorage
from tests.support import (
    CONSIGNLY_SECRETS,
    SVIX_SECRET,
    Downstream,
    GatewayProcess,
    RunningGateway,
    bound_socket,
    free_port,
    plugins_with,
    raw_server,
    wait_until,
)

T = TypeVar("T")

REPO_CONFIG = Path(__file__).resolve().parent.parent / "routes.yaml"


def config_dict(tmp_path: Path) -> dict[str, Any]:
    return {
        "storage": {"url": f"sqlite:///{tmp_path}/db.sqlite"},
        "sources": {
            "consignease": {"path": "/webhooks/consignease", "provider": "svix", "secrets": [SVIX_SECRET]},
            "consignly": {
                "path": "/webhooks/consignly",
                "provider": "consignly",
                "secrets": CONSIGNLY_SECRETS,
            },
        },
        "routes": [
            {
                "name": "users",
                "source": "consignease",
                "events": ["user.*"],
                "actions": [{"id": "app", "use": "forward", "with": {"url": "http://127.0.0.1:3000/hooks"}}],
            }
        ],
    }


def write_config(tmp_path: Path, config: dict[str, Any] | str, name: str = "routes.yaml") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env=env).invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def check_reports(path: Path, expected: list[str], *, exactly: bool = True) -> None:
    """`hookyard check -c path` exits 1 and prints, on stderr only, a line starting with each of `expected`
    (and, when `exactly`, nothing else)."""
    result = invoke("check", "-c", path)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    for line in expected:
        assert any(printed.startswith(line) for printed in lines), (line, lines)
    if exactly:
        assert len(lines) == len(expected), lines


# -- check, schema, plugins ---------------------------------------------------------------------------


def test_check_accepts_the_repository_config() -> None:
    result = invoke("check", "-c", REPO_CONFIG)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"ok: \d+ sources, \d+ routes\n", result.stdout)
    assert result.stderr == ""


def test_check_reports_every_routing_error_with_its_place(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["sources"]["legacy"] = {"path": "/webhooks/legacy", "provider": "carrier-pigeon", "secrets": ["s"]}
    config["sources"]["consignly"]["secrets"] = ["${HOOKYARD_TEST_UNSET_SECRET}"]
    config["routes"][0]["actions"] = [
        {"id": "app", "use": "forward", "with": {}},
        {"id": "ack", "use": "forward", "with": {"url": "http://x/ack"}, "after": "nope"},
        {"id": "sms", "use": "carrier-pigeon"},
    ]
    path = write_config(tmp_path, config)

    check_reports(
        path,
        [
            f"{path}: sources.consignly.secrets[0]: environment variable HOOKYARD_TEST_UNSET_SECRET is not set",
            f"{path}: sources.legacy.provider: unknown provider 'carrier-pigeon'",
            f"{path}: routes[0].actions[0].with.url: field required",
            f"{path}: routes[0].actions[1].after: 'nope' is not the id of an earlier action in this route",
            f"{path}: routes[0].actions[2].use: unknown action 'carrier-pigeon'",
        ],
        exactly=False,
    )


def test_check_reports_an_unset_secret_variable_once(tmp_path: Path) -> None:
    """The empty text left in place of the variable is no reason of its own: `all configured ones are
    empty` or `has an empty password` would point away from the variable to set."""
    config = config_dict(tmp_path)
    config["sources"]["consignly"]["secrets"] = ["${HOOKYARD_TEST_UNSET_SECRET}"]
    config["sources"]["erp"] = {
        "path": "/webhooks/erp",
        "provider": "basic",
        "secrets": ["hookyard:${HOOKYARD_TEST_UNSET_PASSWORD}"],
        "options": {"id_from": "json:eventId", "type_from": "json:eventType"},
    }
    path = write_config(tmp_path, config)

    check_reports(
        path,
        [
            f"{path}: sources.consignly.secrets[0]: environment variable HOOKYARD_TEST_UNSET_SECRET is not set",
            f"{path}: sources.erp.secrets[0]: environment variable HOOKYARD_TEST_UNSET_PASSWORD is not set",
        ],
    )


def test_check_reports_an_action_option_whose_variable_is_unset_once(tmp_path: Path) -> None:
    """The demo's `token: "${CONSIGNLY_API_TOKEN}"` without its default was reported twice: `with: give a
    bearer token or oauth client credentials` came first, and sent the reader to write credentials into the
    file, where the variable was all there was to set."""
    config = config_dict(tmp_path)
    config["routes"][0]["actions"].append(
        {
            "id": "ack",
            "use": "acknowledge",
            "after": "app",
            "with": {"base_url": "http://127.0.0.1:3000/consignly", "token": "${HOOKYARD_TEST_UNSET_TOKEN}"},
        }
    )
    path = write_config(tmp_path, config)

    check_reports(
        path,
        [
            f"{path}: routes[0].actions[1].with.token: environment variable HOOKYARD_TEST_UNSET_TOKEN is not "
            "set"
        ],
    )


def test_check_reports_every_shape_error_with_its_place(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["sources"]["consignease"]["colour"] = "blue"
    config["sources"]["consignease"]["secrets"] = ["${HOOKYARD_TEST_UNSET_SECRET}"]
    config["listen"] = {"port": 70000}
    config["delivery"] = {"lease": "soon"}
    del config["routes"][0]["source"]
    # Valid routes are still compiled; one naming the source whose shape is invalid gets no knock-on error.
    config["routes"].append({**config["routes"][0], "name": "to-consignease", "source": "consignease"})
    config["routes"].append({**config["routes"][0], "name": "to-consignly", "source": "consignly"})
    path = write_config(tmp_path, config)

    check_reports(
        path,
        [
            f"{path}: sources.consignease.secrets[0]: environment variable HOOKYARD_TEST_UNSET_SECRET is not set",
            f"{path}: sources.consignease.colour: unknown key",
            f"{path}: listen.port: ",
            f"{path}: delivery.lease: 'soon' is not a duration",
            f"{path}: routes[0].source: field required",
        ],
    )


def test_check_reports_unreadable_and_invalid_files(tmp_path: Path) -> None:
    missing = invoke("check", "-c", tmp_path / "missing.yaml")
    assert missing.exit_code == 1
    assert f"{tmp_path / 'missing.yaml'}: cannot read" in missing.stderr

    broken = write_config(tmp_path, "sources: [unclosed\n", "broken.yaml")
    result = invoke("check", "-c", broken)
    assert result.exit_code == 1
    assert f"{broken}: not valid YAML" in result.stderr


def test_a_missing_config_found_by_default_says_how_to_name_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from a directory without routes.yaml, a new user read only "cannot read: No such file".
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HOOKYARD_CONFIG", raising=False)
    for args in (["check"], ["serve"], ["events", "list"], ["send", "consignease", "--type", "user.created"]):
        result = invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr == (
            "routes.yaml: cannot read: No such file or directory (no -c PATH nor $HOOKYARD_CONFIG was given, "
            f"so ./routes.yaml in {tmp_path} was read): give the config with -c PATH\n"
        ), args

    named = tmp_path / "elsewhere.yaml"
    result = invoke("check", env={"HOOKYARD_CONFIG": str(named)})
    assert result.exit_code == 1
    assert result.stderr == (
        f"{named}: cannot read: No such file or directory (the file $HOOKYARD_CONFIG names)\n"
    )

    # Named with -c, the path is the user's own: nothing to add.
    result = invoke("check", "-c", named)
    assert result.stderr == f"{named}: cannot read: No such file or directory\n"


# The mistakes a new user makes in routes.yaml, each with the one line that names it: what the line of
# `hookyard check` says, `hookyard serve` says too.
SOURCE = "sources: {hooks: {path: /hooks, provider: token, secrets: [s3cret]}}\n"
ROUTE = "routes: [{name: r, source: hooks, actions: [{use: forward, with: {url: 'http://127.0.0.1:9/'}}]}]\n"
NEW_USER_MISTAKES = {
    "wrong type": (
        "listen: {port: eighty}\n" + SOURCE + ROUTE,
        "listen.port: must be an integer; the text given does not read as one",
    ),
    "unknown key": (
        "listen: {port: 8080, hots: 127.0.0.1}\n" + SOURCE + ROUTE,
        "listen.hots: unknown key (did you mean host?)",
    ),
    "typo in a section": (
        "limts: {max_body_bytes: 10}\n" + SOURCE + ROUTE,
        "limts: unknown key (did you mean limits?)",
    ),
    "bad duration": (
        "defaults: {timeout: 5 seconds}\n" + SOURCE + ROUTE,
        "defaults.timeout: '5 seconds' is not a duration; use e.g. 500ms, 5s, 2m, 1h or a number of seconds",
    ),
    "variable not set": (
        'ops: {admin_token: "${HOOKYARD_TEST_UNSET_TOKEN}"}\n' + SOURCE + ROUTE,
        "ops.admin_token: environment variable HOOKYARD_TEST_UNSET_TOKEN is not set (and has no default)",
    ),
    "unknown source": (
        SOURCE + ROUTE.replace("source: hooks", "source: hoks"),
        "routes[0].source: unknown source 'hoks' (did you mean hooks?); known: hooks",
    ),
    "unknown action": (
        SOURCE + ROUTE.replace("use: forward", "use: forwrd"),
        "routes[0].actions[0].use: unknown action 'forwrd' (did you mean forward?); "
        "known: acknowledge, forward, notify, store",
    ),
    "YAML syntax": (
        "listen: {port: 8080\n" + SOURCE,
        "not valid YAML: line 2, column 8: expected ',' or '}', but got ':' "
        "(while parsing a flow mapping at line 1, column 9)",
    ),
    "tab": (
        "listen:\n\tport: 8080\n" + SOURCE + ROUTE,
        "not valid YAML: line 2, column 1: a tab, where YAML takes only spaces (to indent, and after a "
        "key's colon): replace it with spaces",
    ),
}


@pytest.mark.parametrize(("text", "error"), NEW_USER_MISTAKES.values(), ids=NEW_USER_MISTAKES)
def test_check_and_serve_name_a_new_user_s_mistake_in_the_same_one_line(
    tmp_path: Path, text: str, error: str
) -> None:
    path = write_config(tmp_path, text)
    environment = {key: value for key, value in os.environ.items() if key != "HOOKYARD_TEST_UNSET_TOKEN"}
    said = {}
    for command in ("check", "serve"):
        # serve as it runs, in a process of its own: it must refuse the file before it binds or opens anything.
        result = subprocess.run(
            [sys.executable, "-m", "gateway", command, "-c", str(path)],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (result.returncode, result.stdout) == (1, ""), (command, result)
        said[command] = result.stderr
    assert said["check"] == said["serve"]
    assert said["check"].splitlines() == [f"{path}: {error}"]


def test_check_counts_one_source_and_one_route_in_the_singular(tmp_path: Path) -> None:
    # It said `ok: 1 sources, 1 routes`.
    config = config_dict(tmp_path)
    del config["sources"]["consignly"]
    result = invoke("check", "-c", write_config(tmp_path, config))
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: 1 source, 1 route\n"


def test_check_warns_of_route_events_that_their_provider_never_sends(tmp_path: Path) -> None:
    # A typo'd name or a glob that matches none of a provider's types passed `check`, and the route then
    # matched nothing, without a word. Only a provider that lists its types can tell; svix sends any.
    config = config_dict(tmp_path)
    config["routes"].append(
        {
            "name": "consignments",
            "source": "consignly",
            "events": ["ConsignmentCreate", 101, "ConsignmentCreated", "consignment.*", "JobConnection.*"],
            "actions": [{"id": "app", "use": "forward", "with": {"url": "http://127.0.0.1:3000/hooks"}}],
        }
    )
    config["routes"][0]["events"] = ["user.created", "user.craeted"]
    result = invoke("check", "-c", write_config(tmp_path, config))
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: 2 sources, 2 routes\n"
    assert result.stderr.splitlines() == [
        "hookyard: warning: routes[1].events[0] (consignments): consignly sends no event type "
        "'ConsignmentCreate' (did you mean ConsignmentCreated?); the route never matches it",
        "hookyard: warning: routes[1].events[4] (consignments): consignly sends no event type that "
        "'JobConnection.*' matches; the route never matches it",
    ]


def test_check_uses_hookyard_config_without_c(tmp_path: Path) -> None:
    good = write_config(tmp_path, config_dict(tmp_path), "good.yaml")
    result = invoke("check", env={"HOOKYARD_CONFIG": str(good)})
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: 2 sources, 1 route\n"

    bad = write_config(tmp_path, {"sources": {"x": {"path": "nope", "provider": "svix"}}}, "bad.yaml")
    result = invoke("check", env={"HOOKYARD_CONFIG": str(bad)})
    assert result.exit_code == 1
    assert f"{bad}: sources.x.path: path 'nope' must start with /" in result.stderr

    # -c wins over the environment.
    result = invoke("check", "-c", good, env={"HOOKYARD_CONFIG": str(bad)})
    assert result.exit_code == 0


def test_schema_is_the_json_schema_of_routes_yaml() -> None:
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "Hookyard routes.yaml"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert {"sources", "routes", "storage", "listen"} <= set(schema["properties"])


def test_plugins_lists_builtins_with_what_they_register() -> None:
    result = invoke("plugins")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "providers: svix" in lines["plugins.svix"]
    assert "providers: consignly" in lines["plugins.consignly"]
    assert "actions: forward" in lines["plugins.forward"]
    assert "providers" not in lines["plugins.forward"]


def test_plugins_lists_what_a_plugin_registers_as_the_gateway_collects_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway takes what the hook answers: None is no answer (pluggy leaves it out), and an
    implementation may have a name of its own (`specname`). `plugins` called an attribute named after the
    hook: a traceback for the first, nothing listed for the second."""

    class Optional:
        @hookimpl
        def register_providers(self) -> None:
            return None  # e.g. an optional dependency is missing

    class Renamed:
        @hookimpl(specname="register_actions")
        def actions(self) -> list[type[Action]]:
            return [Sms]

    class Sms(Action):
        name = "sms"

        async def deliver(self, job: Job) -> Outcome:  # an Action without it is refused
            return delivered()

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(Optional(), name="optional")
    pm.register(Renamed(), name="renamed")
    monkeypatch.setattr("gateway.cli.plugin_manager", lambda: pm)
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert lines["optional"] == "optional  (hooks: register_providers)"
    assert lines["renamed"] == "renamed  (actions: sms)"
    assert "actions: forward" in lines["plugins.forward"]


# -- events and replay against a filled database ---------------------------------------------------------


def with_storage(db_path: Path, work: Callable[[SQLiteStorage], Awaitable[T]]) -> T:
    async def run() -> T:
        storage = SQLiteStorage(db_path)
        await storage.open()
        try:
            return await work(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


def make_event(
    event_id: str, received_at: float, source: str = "consignease", type_: str = "user.created"
) -> Event:
    body = json.dumps({"type": type_, "data": {"id": event_id}}).encode()
    return Event(source, event_id, type_, received_at, body, json.loads(body), occurred_at=received_at - 1)


async def finish(
    storage: SQLiteStorage, claim: Claim, state: str, now: float, status: int, due_at: float | None = None
) -> None:
    outcome = "retry" if state == "pending" else state
    attempt = Attempt(claim.delivery.attempts, now - 0.5, 0.5, outcome, status, f"HTTP {status}")
    await storage.finish(claim.delivery, attempt, state, due_at, now)


APP = NewDelivery("users", "app")
NOTIFY = NewDelivery("users", "notify", after="app", when="failure")


async def fill(storage: SQLiteStorage) -> None:
    """evt_delivered, evt_dead (app dead after a retry; notify ran), evt_pending, evt_old_dead (2 h ago),
    evt_unrouted (10 min ago), and evt_twin stored under two sources."""
    now = time.time()
    await storage.ingest(make_event("evt_old_dead", now - 3 * 3600, "consignly", "ConsignmentCreated"), [APP])
    [old] = await storage.claim(now - 3 * 3600, 10, 60, "w")
    await finish(storage, old, "dead", now - 2 * 3600, 410)

    await storage.ingest(make_event("evt_delivered", now - 60), [APP])
    await storage.ingest(make_event("evt_dead", now - 50, type_="user.deleted"), [APP, NOTIFY])
    claims = {c.event.id: c for c in await storage.claim(now - 50, 10, 60, "w")}
    await finish(storage, claims["evt_delivered"], "delivered", now - 49, 200)
    await finish(storage, claims["evt_dead"], "pending", now - 49, 500, due_at=now - 45)
    [again] = await storage.claim(now - 45, 10, 60, "w")
    await finish(storage, again, "dead", now - 44, 500)
    [notify] = await storage.claim(now - 44, 10, 60, "w")
    await finish(storage, notify, "delivered", now - 43, 204)

    await storage.ingest(make_event("evt_pending", now - 40, "consignly", "ConsignmentCreated"), [APP])
    await storage.ingest(make_event("evt_unrouted", now - 600), [])
    await storage.ingest(make_event("evt_twin", now - 20), [])
    await storage.ingest(make_event("evt_twin", now - 10, "consignly", "ConsignmentCreated"), [])


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A config whose database holds the events of `fill`."""
    with_storage(tmp_path / "db.sqlite", fill)
    return write_config(tmp_path, config_dict(tmp_path))


def deliveries(config: Path, event_id: str) -> dict[str, DeliveryRecord]:
    async def get(storage: SQLiteStorage) -> dict[str, DeliveryRecord]:
        [detail] = await storage.get_event(event_id)
        return {d.action: d for d in detail.deliveries}

    return with_storage(config.parent / "db.sqlite", get)


def listed_ids(result: Result) -> list[str]:
    return [line.split()[-1] for line in result.stdout.splitlines()]


def test_events_list(filled: Path) -> None:
    result = invoke("events", "list", "-c", filled)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert listed_ids(result) == [
        "evt_twin",
        "evt_twin",
        "evt_unrouted",
        "evt_pending",
        "evt_dead",
        "evt_delivered",
        "evt_old_dead",
    ]
    assert lines[4].split()[1:] == ["dead", "consignease", "user.deleted", "evt_dead"]
    assert lines[5].split()[1:] == ["delivered", "consignease", "user.created", "evt_delivered"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[0].split()[0])

    dead = invoke("events", "list", "-c", filled, "--state", "dead")
    assert listed_ids(dead) == ["evt_dead", "evt_old_dead"]
    recent_dead = invoke("events", "list", "-c", filled, "--state", "dead", "--since", "1h")
    assert listed_ids(recent_dead) == ["evt_dead"]
    consignly = invoke("events", "list", "-c", filled, "--source", "consignly")
    assert listed_ids(consignly) == ["evt_twin", "evt_pending", "evt_old_dead"]
    first = invoke("events", "list", "-c", filled, "--limit", "2")
    assert listed_ids(first) == ["evt_twin", "evt_twin"]
    # The next page, from the cursor the first one ends with, as its hint on stderr says.
    [hint] = first.stderr.splitlines()
    assert hint.startswith("more: the same command with --cursor ")
    second = invoke("events", "list", "-c", filled, "--limit", "2", "--cursor", hint.split()[-1])
    assert listed_ids(second) == ["evt_unrouted", "evt_pending"]
    # A page that holds the last of them says no more, though it is full: the next would be empty.
    every = invoke("events", "list", "-c", filled, "--limit", "7")
    assert (len(listed_ids(every)), every.stderr) == (7, "")
    last = invoke("events", "list", "-c", filled, "--limit", "3", "--cursor", second.stderr.split()[-1])
    assert (listed_ids(last), last.stderr) == (["evt_dead", "evt_delivered", "evt_old_dead"], "")
    assert listed_ids(invoke("events", "list", "-c", filled, "--state", "unrouted", "--since", "5m")) == [
        "evt_twin",
        "evt_twin",
    ]

    as_json = invoke("events", "list", "-c", filled, "--state", "pending", "--json")
    assert as_json.exit_code == 0
    [row] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {k: row[k] for k in ("id", "source", "type", "state")} == {
        "id": "evt_pending",
        "source": "consignly",
        "type": "ConsignmentCreated",
        "state": "pending",
    }
    assert row["received_at"].endswith("Z")


def test_events_list_keeps_each_event_on_its_line(tmp_path: Path) -> None:
    # A provider that takes the id from the body (Consignly) stores whatever the sender wrote there.
    forged = "evt_x\n2026-12-02T11:18:09.371Z  delivered  consignly      consignment.created  evt_forged"

    async def fill_forged(storage: SQLiteStorage) -> None:
        await storage.ingest(make_event(forged, time.time(), "consignly", "consignment.created\t"), [])

    with_storage(tmp_path / "db.sqlite", fill_forged)
    result = invoke("events", "list", "-c", write_config(tmp_path, config_dict(tmp_path)))
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    assert line.split()[1:4] == ["unrouted", "consignly", "consignment.created\\t"]
    assert line.endswith(" " + forged.replace("\n", "\\n"))


def test_events_list_reads_a_type_as_a_routes_events_take_it(tmp_path: Path) -> None:
    """`hookyard send consignly --type ConsignmentCreated` stores consignment.created, and a route's
    `events: [ConsignmentCreated]` matches it; `events list --type ConsignmentCreated` listed nothing."""

    async def fill_types(storage: SQLiteStorage) -> None:
        now = time.time()
        await storage.ingest(make_event("evt_created", now - 30, "consignly", "consignment.created"), [])
        await storage.ingest(make_event("evt_updated", now - 20, "consignly", "consignment.updated"), [])
        await storage.ingest(make_event("msg_user", now - 10), [])

    with_storage(tmp_path / "db.sqlite", fill_types)
    config = config_dict(tmp_path)
    # The catalog needs no secret: an operator's shell need not hold one.
    config["sources"]["consignly"]["secrets"] = ["${HOOKYARD_TEST_UNSET_SECRET}"]
    path = write_config(tmp_path, config)
    for args in (
        ["--type", "ConsignmentCreated"],
        ["--type", "101"],
        ["--type", "consignment.created"],
        ["--source", "consignly", "--type", "ConsignmentCreated"],
    ):
        listed = invoke("events", "list", "-c", path, *args)
        assert (listed.exit_code, listed_ids(listed)) == (0, ["evt_created"]), (args, listed.output)
    assert listed_ids(invoke("events", "list", "-c", path, "--type", "user.created")) == ["msg_user"]
    # Svix has no catalog: through that source the name is only itself.
    other = invoke("events", "list", "-c", path, "--source", "consignease", "--type", "ConsignmentCreated")
    assert (other.exit_code, other.stdout) == (0, "")
    assert other.stderr.endswith("no events\n")


def test_events_list_says_what_to_write_for_a_type_the_sources_read_differently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugins.consignly import ConsignlyProvider

    class ParcelPost(ConsignlyProvider):
        name = "parcelpost"

        def event_type(self, name: str | int) -> str:
            return "parcel.created" if name == "ConsignmentCreated" else str(name)

    class Plugin:
        @hookimpl
        def register_providers(self) -> list[type[ConsignlyProvider]]:
            return [ParcelPost]

    pm = new_plugin_manager()
    pm.register(Plugin(), name="parcelpost")
    monkeypatch.setattr("gateway.cli.plugin_manager", lambda: pm)

    async def fill_types(storage: SQLiteStorage) -> None:
        now = time.time()
        await storage.ingest(make_event("evt_created", now - 30, "consignly", "consignment.created"), [])
        await storage.ingest(make_event("evt_parcel", now - 20, "parcels", "parcel.created"), [])

    with_storage(tmp_path / "db.sqlite", fill_types)
    config = config_dict(tmp_path)
    config["sources"]["parcels"] = {"path": "/parcels", "provider": "parcelpost", "secrets": ["s"]}
    path = write_config(tmp_path, config)
    ambiguous = invoke("events", "list", "-c", path, "--type", "ConsignmentCreated")
    assert (ambiguous.exit_code, ambiguous.stdout) == (1, "")
    assert ambiguous.stderr == (
        "hookyard: type: 'ConsignmentCreated' is consignment.created in consignly, parcel.created in parcels; "
        "give the canonical type, or the source with --source\n"
    )
    for args, expected in (
        (["--source", "parcels", "--type", "ConsignmentCreated"], ["evt_parcel"]),
        (["--source", "consignly", "--type", "ConsignmentCreated"], ["evt_created"]),
        (["--type", "parcel.created"], ["evt_parcel"]),
        (["--type", "101"], ["evt_created"]),  # a code only Consignly's catalog knows
    ):
        listed = invoke("events", "list", "-c", path, *args)
        assert (listed.exit_code, listed_ids(listed)) == (0, expected), (args, listed.output)


def test_events_list_takes_a_type_as_given_where_a_plugins_provider_cannot_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a ValueError was passed over: a provider plugin whose constructor raised anything else ended
    # `events list --type` with a traceback (`check` and `serve` name the plugin and its error).
    from plugins.consignly import ConsignlyProvider

    class Broken(ConsignlyProvider):
        name = "broken"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise KeyError("kid")

    class Plugin:
        @hookimpl
        def register_providers(self) -> list[type[ConsignlyProvider]]:
            return [Broken]

    pm = new_plugin_manager()
    pm.register(Plugin(), name="broken")
    monkeypatch.setattr("gateway.cli.plugin_manager", lambda: pm)

    async def fill_types(storage: SQLiteStorage) -> None:
        await storage.ingest(make_event("evt_created", time.time(), "consignly", "consignment.created"), [])

    with_storage(tmp_path / "db.sqlite", fill_types)
    config = config_dict(tmp_path)
    config["sources"]["broken"] = {"path": "/broken", "provider": "broken", "secrets": ["s"]}
    listed = invoke("events", "list", "-c", write_config(tmp_path, config), "--type", "ConsignmentCreated")
    assert (listed.exit_code, listed_ids(listed)) == (0, ["evt_created"]), listed.output


def test_events_list_rejects_a_bad_since(filled: Path) -> None:
    result = invoke("events", "list", "-c", filled, "--since", "yesterday")
    assert result.exit_code != 0
    assert result.stdout == ""
    assert "since" in result.stderr
    assert "'yesterday'" in result.stderr


@pytest.mark.parametrize("cursor", [str(2**63), "99999999999999999999999"])
def test_events_list_refuses_a_cursor_the_database_cannot_hold(filled: Path, cursor: str) -> None:
    """As the admin API does: not a traceback from SQLite's OverflowError."""
    result = invoke("events", "list", "-c", filled, "--cursor", cursor)
    assert result.exit_code == 1, result.output
    assert (result.stdout, result.stderr) == ("", "hookyard: cursor: out of range\n")


def test_operator_commands_refuse_a_database_that_does_not_exist(tmp_path: Path) -> None:
    """Run from the wrong directory (a relative storage.url) or with the wrong config, they say where they
    looked, rather than create an empty database there and list nothing."""
    config = write_config(tmp_path, config_dict(tmp_path))
    for args in (["events", "list"], ["events", "show", "evt_1"], ["replay", "evt_1"]):
        result = invoke(*args, "-c", config)
        assert result.exit_code == 1, (args, result.output)
        assert result.stdout == ""
        assert result.stderr.startswith(f"hookyard: no database at {tmp_path / 'db.sqlite'} "), result.stderr
        assert "--admin-url" in result.stderr
    assert not (tmp_path / "db.sqlite").exists()


def test_operator_commands_on_a_database_locked_by_another_process_say_so_without_a_traceback(
    filled: Path,
) -> None:
    """A shell left with a write transaction open: the store gives up after 5 s, as the admin API answers
    503 then. The commands ended with a traceback of StorageUnavailable."""
    holder = sqlite3.connect(filled.parent / "db.sqlite", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        result = CliRunner().invoke(main, ["replay", "-c", str(filled), "evt_dead"])
    finally:
        holder.close()
    assert (result.exit_code, result.stdout) == (1, ""), result.output
    assert result.stderr.startswith(
        "hookyard: storage unavailable: sqlite: database is locked (by another process, for "
    ), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert deliveries(filled, "evt_dead")["app"].state == "dead"


def test_commands_on_the_store_need_no_variable_of_the_rest_of_the_config(filled: Path) -> None:
    """An operator's shell need not hold the gateway's secrets, the admin token or a chat webhook's URL:
    the commands that only read and replay stored events work without them, and say which were unset.
    `check` and a replay of what is missing (which routes events with the config) still refuse."""
    config = config_dict(filled.parent)
    config["ops"] = {"admin_token": "${HOOKYARD_TEST_UNSET_TOKEN}"}
    config["sources"]["consignly"]["secrets"] = ["${HOOKYARD_TEST_UNSET_SECRET}"]
    config["routes"][0]["actions"].append(
        {"id": "chat", "use": "notify", "with": {"url": "${HOOKYARD_TEST_UNSET_SLACK}", "text": "x"}}
    )
    path = write_config(filled.parent, config)
    note = (
        # In the order of the file (safe_dump sorts the keys).
        "hookyard: not set, and not needed by this command: HOOKYARD_TEST_UNSET_TOKEN (ops.admin_token), "
        "HOOKYARD_TEST_UNSET_SLACK (routes[0].actions[1].with.url), HOOKYARD_TEST_UNSET_SECRET "
        "(sources.consignly.secrets[0])\n"
    )
    listed = invoke("events", "list", "-c", path, "--state", "dead")
    assert (listed.exit_code, listed.stderr) == (0, note)
    assert listed_ids(listed) == ["evt_dead", "evt_old_dead"]
    shown = invoke("events", "show", "-c", path, "evt_dead", "--json")
    assert (shown.exit_code, shown.stderr) == (0, note)
    assert json.loads(shown.stdout)["id"] == "evt_dead"
    replayed = invoke("replay", "-c", path, "evt_dead", "--action", "notify")
    assert (replayed.exit_code, replayed.stdout, replayed.stderr) == (0, "replaying 1 delivery\n", note)
    dead = invoke("replay", "-c", path, "--state", "dead")
    assert (dead.exit_code, dead.stdout, dead.stderr) == (0, "replaying 2 deliveries\n", note)

    for args in (["check"], ["replay", "--state", "missing", "--since", "1h"]):
        refused = invoke(*args, "-c", path)
        assert refused.exit_code == 1, (args, refused.output)
        assert refused.stdout == ""
        assert (
            f"{path}: sources.consignly.secrets[0]: environment variable HOOKYARD_TEST_UNSET_SECRET is not set"
            in refused.stderr
        )
    assert deliveries(path, "evt_unrouted") == {}

    # The store's own place is needed: unset there, it is the error it always was.
    config["storage"]["url"] = "${HOOKYARD_TEST_UNSET_DATABASE}"
    path = write_config(filled.parent, config)
    unset = invoke("events", "list", "-c", path)
    assert unset.exit_code == 1
    assert unset.stdout == ""
    assert (
        f"{path}: storage.url: environment variable HOOKYARD_TEST_UNSET_DATABASE is not set" in unset.stderr
    )


def test_send_and_sign_need_no_variable_but_their_sources(tmp_path: Path) -> None:
    """They sign for one source and send to `listen:`: another source's secret, the admin token or a chat
    webhook's URL, unset in the shell, is named and not needed. One of the source's own still is."""
    with RunningGateway(config_dict(tmp_path)) as gw:
        config = config_dict(tmp_path)
        # The default URL comes from listen:, here the running gateway's.
        config["listen"] = {"host": "127.0.0.1", "port": gw.ingress_sock.getsockname()[1]}
        config["ops"] = {"admin_token": "${HOOKYARD_TEST_UNSET_TOKEN}"}
        config["sources"]["consignly"]["secrets"] = ["${HOOKYARD_TEST_UNSET_SECRET}"]
        config["routes"][0]["actions"].append(
            {
                "id": "chat",
                "use": "notify",
                "with": {"url": "${HOOKYARD_TEST_UNSET_SLACK}", "format": "slack"},
            }
        )
        path = write_config(tmp_path, config)
        note = (
            "hookyard: not set, and not needed by this command: HOOKYARD_TEST_UNSET_TOKEN (ops.admin_token), "
            "HOOKYARD_TEST_UNSET_SLACK (routes[0].actions[1].with.url), HOOKYARD_TEST_UNSET_SECRET "
            "(sources.consignly.secrets[0])\n"
        )
        sent = invoke("send", "-c", path, "consignease", "--type", "user.created", "--id", "evt_sent")
        assert (sent.exit_code, sent.stderr) == (0, note), sent.output
        assert sent.stdout == '200 {"id":"evt_sent","status":"accepted"}\n'

        signed = invoke("sign", "-c", path, "consignease", "--type", "user.created", "--id", "evt_signed")
        assert (signed.exit_code, signed.stderr) == (0, note), signed.output
        command = shlex.split(signed.stdout)
        assert command[4] == f"{gw.url}/webhooks/consignease"
        options = list(zip(command[5::2], command[6::2], strict=True))
        headers = [tuple(value.split(": ", 1)) for option, value in options if option == "-H"]
        [body] = [value for option, value in options if option == "--data-binary"]
        response = httpx.post(command[4], content=body.encode(), headers=headers)
        assert (response.status_code, response.json()) == (200, {"id": "evt_signed", "status": "accepted"})

    unknown = invoke("sign", "-c", path, "consignlee", "--type", "101")
    assert unknown.exit_code == 2
    assert "unknown source 'consignlee'; known: consignease, consignly" in unknown.stderr

    # The source's own secret, and listen: where no --url is given, are needed: unset, the error they were.
    for command_name in ("send", "sign"):
        refused = invoke(command_name, "-c", path, "consignly", "--type", "101")
        assert refused.exit_code == 1, refused.output
        assert refused.stdout == ""
        # Listed with every other error of the file, as `check` lists them.
        assert (
            f"{path}: sources.consignly.secrets[0]: environment variable HOOKYARD_TEST_UNSET_SECRET is not set"
            in refused.stderr
        )
    config["listen"]["port"] = "${HOOKYARD_TEST_UNSET_PORT}"
    path = write_config(tmp_path, config)
    refused = invoke("sign", "-c", path, "consignease", "--type", "user.created")
    assert refused.exit_code == 1, refused.output
    assert f"{path}: listen.port: environment variable HOOKYARD_TEST_UNSET_PORT is not set" in refused.stderr
    with_url = invoke("sign", "-c", path, "consignease", "--type", "user.created", "--url", "http://h:1")
    assert with_url.exit_code == 0, with_url.output
    assert "HOOKYARD_TEST_UNSET_PORT (listen.port)" in with_url.stderr
    assert " http://h:1/webhooks/consignease " in with_url.stdout


def test_an_empty_listing_says_so_on_stderr(filled: Path) -> None:
    result = invoke("events", "list", "-c", filled, "--source", "nobody")
    assert result.exit_code == 0
    assert (result.stdout, result.stderr) == ("", "no events\n")
    assert "no events" not in invoke("events", "list", "-c", filled).stderr


def test_events_show(filled: Path) -> None:
    result = invoke("events", "show", "-c", filled, "evt_dead")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert {k: shown[k] for k in ("id", "source", "type", "verified")} == {
        "id": "evt_dead",
        "source": "consignease",
        "type": "user.deleted",
        "verified": True,
    }
    assert shown["payload"] == {"type": "user.deleted", "data": {"id": "evt_dead"}}
    assert shown["received_at"].endswith("Z")
    app, notify = shown["deliveries"]
    assert (app["route"], app["action"], app["state"], app["next_attempt_at"]) == (
        "users",
        "app",
        "dead",
        None,
    )
    assert [(a["number"], a["outcome"], a["status_code"], a["error"]) for a in app["attempts"]] == [
        (1, "retry", 500, "HTTP 500"),
        (2, "dead", 500, "HTTP 500"),
    ]
    assert all(a["duration_ms"] == 500.0 for a in app["attempts"])
    assert (notify["action"], notify["state"]) == ("notify", "delivered")
    assert [a["status_code"] for a in notify["attempts"]] == [204]

    pending = json.loads(invoke("events", "show", "-c", filled, "evt_pending", "--json").stdout)
    [delivery] = pending["deliveries"]
    assert delivery["state"] == "pending"
    assert delivery["attempts"] == []
    assert delivery["next_attempt_at"].endswith("Z")

    twin = invoke("events", "show", "-c", filled, "evt_twin", "--source", "consignly", "--json")
    assert json.loads(twin.stdout)["source"] == "consignly"
    # Without --source an id stored under two sources is ambiguous.
    both = invoke("events", "show", "-c", filled, "evt_twin")
    assert both.exit_code == 1
    assert both.stdout == ""
    assert "several sources (consignly, consignease); give the source with --source\n" in both.stderr


def test_an_event_whose_stored_body_cannot_be_read_is_shown_replayed_and_left_out_of_missing(
    filled: Path,
) -> None:
    conn = sqlite3.connect(filled.parent / "db.sqlite")
    with conn:
        conn.execute("UPDATE events SET body = X'FF00' WHERE event_id = 'evt_dead'")
    conn.close()

    result = invoke("events", "show", "-c", filled, "evt_dead", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["payload"] is None
    assert shown["unreadable"].startswith("the stored event cannot be read: JSONDecodeError")
    assert [d["state"] for d in shown["deliveries"]] == ["dead", "delivered"]
    assert "unreadable" not in json.loads(invoke("events", "show", "-c", filled, "evt_delivered").stdout)

    # Its own replay runs it again (the engine then ends it dead again, saying why); a replay of what is
    # missing, which routes every event anew, has no payload to route it on and goes on past it.
    missing = invoke("replay", "-c", filled, "--state", "missing", "--since", "1h")
    assert missing.exit_code == 0, missing.output
    assert deliveries(filled, "evt_dead")["app"].state == "dead"
    assert missing.stdout == "replaying 0 deliveries, created 2 missing ones\n"  # evt_unrouted, evt_twin
    replayed = invoke("replay", "-c", filled, "evt_dead")
    assert replayed.stdout == "replaying 1 delivery\n"
    assert deliveries(filled, "evt_dead")["app"].state == "pending"


def test_a_replay_of_one_says_delivery_and_one_created_says_one(filled: Path) -> None:
    # Only evt_twin (20 s ago) of the unrouted events is in the window, and the dead event before it too.
    result = invoke("replay", "-c", filled, "--state", "missing", "--since", "5m")
    assert result.exit_code == 0, result.output
    assert result.stdout == "replaying 1 delivery, created 1 missing one\n"


def test_events_show_an_unknown_id_exits_1(filled: Path) -> None:
    result = invoke("events", "show", "-c", filled, "evt_nope")
    assert result.exit_code == 1
    assert "no event 'evt_nope'" in result.stderr


def test_replay_an_event(filled: Path) -> None:
    result = invoke("replay", "-c", filled, "evt_dead")
    assert result.exit_code == 0, result.output
    assert result.stdout == "replaying 1 delivery\n"
    records = deliveries(filled, "evt_dead")
    assert (records["app"].state, records["app"].attempts) == ("pending", 0)
    assert records["app"].due_at is not None and records["app"].due_at <= time.time()
    assert (records["notify"].state, records["notify"].attempts) == ("waiting", 0)
    # The others are untouched.
    assert deliveries(filled, "evt_delivered")["app"].state == "delivered"
    assert deliveries(filled, "evt_old_dead")["app"].state == "dead"

    # Its delivery is due now: left alone, and said so, not answered as if nothing matched.
    again = invoke("replay", "-c", filled, "evt_dead")
    assert again.exit_code == 0
    assert again.stdout == "replaying 0 deliveries; 1 left alone: still pending (in flight, due or waiting)\n"


def test_replay_of_a_pending_delivery_says_it_was_left_alone(filled: Path) -> None:
    result = invoke("replay", "-c", filled, "evt_pending", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"replayed": 0, "created": 0, "next_cursor": None, "pending": 1}
    assert deliveries(filled, "evt_pending")["app"].state == "pending"


def test_replay_one_action(filled: Path) -> None:
    result = invoke("replay", "-c", filled, "evt_dead", "--action", "notify")
    assert result.exit_code == 0, result.output
    assert result.stdout == "replaying 1 delivery\n"
    records = deliveries(filled, "evt_dead")
    assert {k: r.state for k, r in records.items()} == {"app": "dead", "notify": "pending"}


def test_replay_one_route(filled: Path) -> None:
    elsewhere = invoke("replay", "-c", filled, "evt_dead", "--route", "nope")
    assert elsewhere.exit_code == 1
    assert "has no delivery for route 'nope'" in elsewhere.stderr
    assert deliveries(filled, "evt_dead")["app"].state == "dead"
    route = deliveries(filled, "evt_dead")["app"].route
    result = invoke("replay", "-c", filled, "evt_dead", "--route", route, "--action", "app")
    assert result.exit_code == 0, result.output
    assert result.stdout == "replaying 1 delivery\n"
    assert deliveries(filled, "evt_dead")["app"].state == "pending"


def test_replay_dead_deliveries_since(filled: Path) -> None:
    result = invoke("replay", "-c", filled, "--state", "dead", "--since", "1h")
    assert result.exit_code == 0, result.output
    assert result.stdout == "replaying 1 delivery\n"
    assert {k: r.state for k, r in deliveries(filled, "evt_dead").items()} == {
        "app": "pending",
        "notify": "waiting",
    }
    assert deliveries(filled, "evt_old_dead")["app"].state == "dead"

    everything = invoke("replay", "-c", filled, "--state", "dead")
    assert everything.stdout == "replaying 1 delivery\n"
    assert deliveries(filled, "evt_old_dead")["app"].state == "pending"
    assert deliveries(filled, "evt_delivered")["app"].state == "delivered"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--state", "dead", "--since", ""], "--since: empty"),
        (["--state", "dead", "--since", "2h", "--until", ""], "--until: empty"),
        (["--state", "missing", "--since", ""], "--since: empty"),
    ],
)
def test_a_bulk_replay_with_an_empty_window_is_a_usage_error(
    filled: Path, args: list[str], error: str
) -> None:
    # `--since "$WINDOW"` with the variable unset was no window at all: every dead delivery ran again.
    result = invoke("replay", "-c", filled, *args)
    assert result.exit_code == 2, result.output
    assert (
        f"Error: {error} (a variable not set?): give a time, e.g. 2h, or leave the option out\n"
        in result.stderr
    )
    assert result.stdout == ""
    assert deliveries(filled, "evt_dead")["app"].state == "dead"
    assert deliveries(filled, "evt_old_dead")["app"].state == "dead"


@pytest.mark.parametrize(
    "command",
    [
        ["events", "list"],
        ["replay", "--state", "dead"],
        ["replay", "--state", "missing"],
    ],
)
@pytest.mark.parametrize(
    ("since", "until"), [("1h", "2h"), ("2026-12-02T10:00", "2026-12-02T09:00"), ("1h", "1h")]
)
def test_a_window_that_ends_before_it_starts_is_a_usage_error_naming_both_options(
    filled: Path, command: list[str], since: str, until: str
) -> None:
    # `--since 1h --until 2h` (events received after an hour ago and before two hours ago) found nothing,
    # and said `no events`, or `replaying 0 deliveries`, as if there were none.
    result = invoke(*command, "-c", filled, "--since", since, "--until", until)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert (
        f"Error: --since {since!r} is not before --until {until!r}: the window holds no time (a duration is "
        "counted back from now: --since 2h, --until 1h is the hour before the last)\n"
    ) in result.stderr
    assert deliveries(filled, "evt_old_dead")["app"].state == "dead"
    assert deliveries(filled, "evt_unrouted") == {}
    # The right way round, the same window finds what is in it.
    if since == "1h" and until == "2h":
        turned = invoke(*command, "-c", filled, "--since", until, "--until", since)
        assert turned.exit_code == 0, turned.output


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "give an EVENT_ID, or --state dead|missing for a bulk replay"),
        (["--since", "2h"], "give an EVENT_ID, or --state dead|missing for a bulk replay"),
        (["evt_dead", "--state", "dead"], "give an EVENT_ID or --state dead|missing, not both"),
    ],
)
def test_replay_needs_an_id_or_a_state(filled: Path, args: list[str], error: str) -> None:
    result = invoke("replay", "-c", filled, *args)
    assert result.exit_code == 2
    # Given neither, the message said "not both".
    assert f"Error: {error}\n" in result.stderr
    assert deliveries(filled, "evt_dead")["app"].state == "dead"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["events", "list", "--since", "20261202"],
            "Invalid value for '--since': '20261202' could be a date or epoch seconds (in 1970); write the date "
            "as 2026-12-02",
        ),
        (
            ["events", "list", "--until", "yesterday"],
            "Invalid value for '--until': 'yesterday' is neither a duration (2h), an ISO time nor epoch seconds",
        ),
        (
            ["replay", "--state", "dead", "--since", "1796437700000"],
            "Invalid value for '--since': '1796437700000' is outside the years 1 to 9999: epoch milliseconds? "
            "give seconds",
        ),
    ],
)
def test_a_time_the_cli_cannot_read_is_a_usage_error_naming_its_option(
    filled: Path, args: list[str], error: str
) -> None:
    # It was the admin API's words, `hookyard: since: …`, with exit status 1.
    result = invoke(*args, "-c", filled)
    assert result.exit_code == 2, result.output
    assert f"Error: {error}\n" in result.stderr
    assert result.stdout == ""
    assert deliveries(filled, "evt_dead")["app"].state == "dead"


def test_replay_an_unknown_id_exits_1(filled: Path) -> None:
    result = invoke("replay", "-c", filled, "evt_nope")
    assert result.exit_code == 1
    assert "no event 'evt_nope'" in result.stderr
    assert result.stdout == ""


def test_replay_an_unknown_action_exits_1(filled: Path) -> None:
    result = invoke("replay", "-c", filled, "evt_dead", "--action", "sms")
    assert result.exit_code == 1
    assert "'sms'" in result.stderr
    assert {k: r.state for k, r in deliveries(filled, "evt_dead").items()} == {
        "app": "dead",
        "notify": "delivered",
    }


def test_replay_an_id_in_several_sources_needs_source(filled: Path) -> None:
    result = invoke("replay", "-c", filled, "evt_twin")
    assert result.exit_code == 1
    assert "several sources (consignly, consignease); give the source with --source\n" in result.stderr
    assert result.stdout == ""

    chosen = invoke("replay", "-c", filled, "evt_twin", "--source", "consignly")
    assert chosen.exit_code == 0
    assert chosen.stdout == "replaying 0 deliveries\n"


# As Python reads an argument that is not UTF-8 (`$'ev\xff'` in bash): each byte it cannot decode becomes a
# lone surrogate, which neither the database nor the admin API's JSON and URLs can carry.
NOT_UTF8 = "ev\udcff"


@pytest.mark.parametrize(
    "args",
    [
        ["events", "show", NOT_UTF8],
        ["events", "list", "--source", NOT_UTF8],
        ["events", "list", "--type", NOT_UTF8],
        ["replay", NOT_UTF8],
        ["replay", "evt_dead", "--action", NOT_UTF8],
        ["replay", "evt_dead", "--route", NOT_UTF8],
        ["replay", "--state", "dead", "--source", NOT_UTF8],
        ["replay", "--state", "dead", "--since", NOT_UTF8],
    ],
    ids=lambda args: "-".join(arg for arg in args if arg != NOT_UTF8),
)
@pytest.mark.parametrize("through", ["database", "admin-url"])
def test_an_argument_that_is_not_utf8_is_a_usage_error_not_a_traceback(
    filled: Path, args: list[str], through: str
) -> None:
    # A traceback: sqlite3 cannot bind it, nor httpx put it in a URL or a JSON body.
    gateway = f"http://127.0.0.1:{free_port()}"  # never reached
    result = CliRunner().invoke(
        main, [*args, *(["-c", str(filled)] if through == "database" else ["--admin-url", gateway])]
    )
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "'ev\\udcff' is not UTF-8" in result.stderr, result.stderr
    assert {k: r.state for k, r in deliveries(filled, "evt_dead").items()} == {
        "app": "dead",
        "notify": "delivered",
    }


def test_check_lists_the_errors_in_the_order_of_the_file(tmp_path: Path) -> None:
    # The shape's errors came first and the plugins' checks after them, each mapping's in the order its
    # model declares its keys: a reader going down the file met them out of order.
    config = config_dict(tmp_path)
    store = {"mode": "upsert", "table": "1x", "url": "ftp://db"}
    config["routes"][0]["actions"] = [{"id": "db", "use": "store", "with": store, "when": "success"}]
    config["routes"].append(
        {"name": "late", "source": "consignly", "actions": [{"use": "log"}], "colour": "red"}
    )
    config["listen"] = {"bogus": 1}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    result = invoke("check", "-c", path)
    assert result.exit_code == 1
    places = [line.removeprefix(f"{path}: ").partition(": ")[0] for line in result.stderr.splitlines()]
    assert places == [
        "routes[0].actions[0].with.table",
        "routes[0].actions[0].with.url",
        "routes[0].actions[0].with.key",  # missing: after the keys that are there
        "routes[0].actions[0].when",
        "routes[1].colour",
        "listen.bogus",
    ]


def test_check_reports_shape_and_routing_errors_in_one_run(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["listen"] = {"bogus": 1}
    config["sources"]["legacy"] = {"path": "/webhooks/legacy", "provider": "carrier-pigeon", "secrets": ["s"]}
    config["routes"] = [
        {"name": "broken", "source": "consignly", "actions": [{"use": "forward"}], "colour": "blue"},
        {
            "name": "users",
            "source": "consignease",
            "filter": {"data.a": {"between": [1, 2]}, "body.x": 1, "data.b": {"in": 3}},
            "actions": [
                {"id": "app", "use": "forward", "with": {}},
                {"id": "sms", "use": "carrier-pigeon"},
            ],
        },
    ]
    path = write_config(tmp_path, config)

    check_reports(
        path,
        [
            f"{path}: listen.bogus: unknown key",
            f"{path}: routes[0].colour: unknown key",
            f"{path}: sources.legacy.provider: unknown provider 'carrier-pigeon'",
            # Every bad entry of the filter, not only the first.
            f"{path}: routes[1].filter.data.a.between: unknown operator 'between'",
            f"{path}: routes[1].filter.body.x: unknown path 'body.x'",
            f"{path}: routes[1].filter.data.b.in: in takes a list",
            # The route keeps its place in the file although routes[0] was left out of the later checks.
            f"{path}: routes[1].actions[0].with.url: field required",
            f"{path}: routes[1].actions[1].use: unknown action 'carrier-pigeon'",
        ],
    )


# -- bulk replays over several pages, on the database and through the admin API -----------------------


async def fill_for_bulk(storage: SQLiteStorage) -> None:
    """evt_dead_0..4 (app dead), evt_unrouted_0..2 (matched no route when they arrived) and evt_done
    (delivered), all received a minute ago."""
    now = time.time()
    for index in range(5):
        await storage.ingest(make_event(f"evt_dead_{index}", now - 60), [APP])
    for claim in await storage.claim(now - 60, 10, 60, "w"):
        await finish(storage, claim, "dead", now - 59, 410)
    await storage.ingest(make_event("evt_done", now - 60), [APP])
    [done] = await storage.claim(now - 60, 10, 60, "w")
    await finish(storage, done, "delivered", now - 59, 200)
    for index in range(3):
        await storage.ingest(make_event(f"evt_unrouted_{index}", now - 60), [])


def bulk_replay(
    tmp_path: Path, downstream: Downstream, through: str, *args: str, expect: int = 0
) -> tuple[Result, set[str]]:
    """Run `hookyard replay ARGS --page-size 2` on a database filled by fill_for_bulk, directly or
    through a running gateway's admin API; answers the result and the event ids now due for app (through
    the admin API: delivered by the gateway, `expect` of them)."""
    config = config_dict(tmp_path)
    config["routes"][0]["actions"][0]["with"]["url"] = f"{downstream.url}/hooks"
    path = write_config(tmp_path, config)
    with_storage(tmp_path / "db.sqlite", fill_for_bulk)
    if through == "database":
        result = invoke("replay", "-c", path, *args, "--page-size", "2")

        async def due(storage: SQLiteStorage) -> set[str]:
            claims = await storage.claim(time.time() + 1, 100, 60, "test")
            return {claim.event.id for claim in claims}

        return result, with_storage(tmp_path / "db.sqlite", due)
    with RunningGateway(path) as gw:  # ops on loopback without a token: the CLI needs none
        result = invoke("replay", "--admin-url", gw.ops_url, *args, "--page-size", "2")
        wait_until(lambda: len(downstream.received("/hooks")) >= expect)
        time.sleep(0.3)  # anything else would have arrived by now
    return result, {r.headers["idempotency-key"] for r in downstream.received("/hooks")}


@pytest.mark.parametrize("through", ["database", "admin-api"])
def test_bulk_replay_of_dead_deliveries_pages_and_shows_progress(
    tmp_path: Path, downstream: Downstream, through: str
) -> None:
    result, due = bulk_replay(tmp_path, downstream, through, "--state", "dead", "--since", "1h", expect=5)
    assert result.exit_code == 0, result.output
    assert result.stdout == "replaying 5 deliveries\n"
    # Five dead deliveries in pages of two: progress after each page but the last.
    assert result.stderr.splitlines() == ["... 2 replayed, 0 created", "... 4 replayed, 0 created"]
    assert due == {f"evt_dead_{index}" for index in range(5)}


@pytest.mark.parametrize("through", ["database", "admin-api"])
def test_bulk_replay_of_missing_deliveries_creates_them_and_shows_progress(
    tmp_path: Path, downstream: Downstream, through: str
) -> None:
    result, due = bulk_replay(tmp_path, downstream, through, "--state", "missing", "--since", "1h", expect=8)
    assert result.exit_code == 0, result.output
    # The current config routes user.created to app: the unrouted events get their delivery, the dead
    # ones run again, and evt_done, delivered already, is left alone. Nine events in pages of two.
    assert result.stdout == "replaying 5 deliveries, created 3 missing ones\n"
    # In the order received: evt_dead_0..4, evt_done, evt_unrouted_0..2.
    assert result.stderr.splitlines() == [
        "... 2 replayed, 0 created",
        "... 4 replayed, 0 created",
        "... 5 replayed, 0 created",
        "... 5 replayed, 2 created",
    ]
    assert due == {f"evt_dead_{index}" for index in range(5)} | {
        f"evt_unrouted_{index}" for index in range(3)
    }


@pytest.mark.parametrize("through", ["database", "admin-api"])
def test_bulk_replay_with_json_prints_the_counts_on_one_line(
    tmp_path: Path, downstream: Downstream, through: str
) -> None:
    args = ("--state", "missing", "--since", "1h", "--json")
    result, due = bulk_replay(tmp_path, downstream, through, *args, expect=8)
    assert result.exit_code == 0, result.output
    # The sums of the pages' counts, for a script; the progress stays on stderr.
    assert result.stdout.count("\n") == 1
    assert json.loads(result.stdout) == {"replayed": 5, "created": 3, "pending": 0}
    assert len(result.stderr.splitlines()) == 4
    assert len(due) == 8


@pytest.mark.parametrize("through", ["database", "admin-api"])
def test_replay_of_an_event_with_json_prints_the_admin_api_s_answer(
    tmp_path: Path, downstream: Downstream, through: str
) -> None:
    with_storage(tmp_path / "db.sqlite", fill)
    config = config_dict(tmp_path)
    config["routes"][0]["actions"][0]["with"]["url"] = f"{downstream.url}/hooks"
    path = write_config(tmp_path, config)
    if through == "database":
        result = invoke("replay", "-c", path, "evt_dead", "--action", "app", "--json")
    else:
        with RunningGateway(path) as gw:
            result = invoke("replay", "--admin-url", gw.ops_url, "evt_dead", "--action", "app", "--json")
    assert result.exit_code == 0, result.output
    # The admin API's answer (a ReplayPage and what it left alone), as it came.
    assert result.stdout.count("\n") == 1
    assert json.loads(result.stdout) == {"replayed": 1, "created": 0, "next_cursor": None, "pending": 0}


@pytest.mark.parametrize("through", ["database", "admin-api"])
def test_bulk_replay_of_missing_needs_since(tmp_path: Path, downstream: Downstream, through: str) -> None:
    result, due = bulk_replay(tmp_path, downstream, through, "--state", "missing")
    # A usage error naming the option, as the CLI spells it: not the admin API's "since: required for mode
    # missing", exit status 1.
    assert result.exit_code == 2
    assert "Error: --since is required with --state missing, e.g. --since 2h\n" in result.stderr
    assert due == set()


async def _dead_a_moment_ago(storage: SQLiteStorage) -> None:
    """evt_late_0..2: app ended dead a second ago."""
    now = time.time()
    for index in range(3):
        await storage.ingest(make_event(f"evt_late_{index}", now - 5), [APP])
    for claim in await storage.claim(now - 5, 10, 60, "w"):
        await finish(storage, claim, "dead", now - 1, 410)


# `hookyard` on a machine whose clock is a minute behind the gateway's (a laptop through a port-forward).
CLOCK_BEHIND = """
import sys, time
real = time.time
time.time = lambda: real() - 60
from gateway.cli import main
main(prog_name="hookyard")
"""


def test_a_bulk_replay_through_the_admin_api_ends_its_window_by_the_gateways_clock(
    tmp_path: Path, downstream: Downstream
) -> None:
    """The window of a replay through --admin-url is fixed by the gateway's clock, on every page: by the
    CLI's, a minute behind, what ended dead in the last minute would be left out."""
    config = config_dict(tmp_path)
    config["routes"][0]["actions"][0]["with"]["url"] = f"{downstream.url}/hooks"
    path = write_config(tmp_path, config)
    with_storage(tmp_path / "db.sqlite", _dead_a_moment_ago)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKYARD_")}
    args = ["--state", "dead", "--since", "1h", "--page-size", "1"]
    with RunningGateway(path) as gw:
        result = subprocess.run(
            [sys.executable, "-c", CLOCK_BEHIND, "replay", "--admin-url", gw.ops_url, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "replaying 3 deliveries\n", result.stderr
        wait_until(lambda: len(downstream.received("/hooks")) >= 3)
    assert {r.headers["idempotency-key"] for r in downstream.received("/hooks")} == {
        f"evt_late_{index}" for index in range(3)
    }


def test_a_bulk_replay_through_a_gateway_that_answers_no_window_fixes_it_here(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway of a version before the window was answered (made here by leaving it out of the answer):
    the CLI fixes the window itself, by its clock, and sends it on every later page, as it did then."""
    import gateway.operations

    config = config_dict(tmp_path)
    config["routes"][0]["actions"][0]["with"]["url"] = f"{downstream.url}/hooks"
    path = write_config(tmp_path, config)
    with_storage(tmp_path / "db.sqlite", _dead_a_moment_ago)
    asked: list[tuple[Any, Any]] = []
    answer = gateway.operations.Operations.replay

    async def replay_as_before(self: Any, **request: Any) -> dict[str, Any]:
        asked.append((request.get("since"), request.get("until")))
        page = await answer(self, **request)
        return {name: value for name, value in page.items() if name not in ("since", "until")}

    monkeypatch.setattr(gateway.operations.Operations, "replay", replay_as_before)
    with RunningGateway(path) as gw:
        started = time.time()
        result = invoke(
            "replay", "--admin-url", gw.ops_url, "--state", "dead", "--since", "1h", "--page-size", "1"
        )
        assert result.exit_code == 0, result.output
        assert result.stdout == "replaying 3 deliveries\n", result.output
        wait_until(lambda: len(downstream.received("/hooks")) >= 3)
    assert asked[0] == ("1h", None)
    later = set(asked[1:])
    assert len(asked) >= 3 and len(later) == 1, asked  # one window, carried on every later page
    since, until = map(float, later.pop())
    assert started - 3600 - 5 <= since <= started - 3600 + 5 and started - 5 <= until <= started + 5


@pytest.mark.parametrize("limit", ["0", "501", "-3"])
def test_events_list_limit_is_bounded_as_a_usage_error(filled: Path, limit: str) -> None:
    """As --page-size is: a bad option is exit status 2, with click's usage line, not 1 as a failure."""
    result = invoke("events", "list", "-c", filled, "--limit", limit)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "Invalid value for '--limit'" in result.stderr and "1<=x<=500" in result.stderr, result.stderr


@pytest.mark.parametrize("page_size", ["0", "501"])
def test_replay_page_size_is_bounded(filled: Path, page_size: str) -> None:
    result = invoke("replay", "-c", filled, "--state", "dead", "--page-size", page_size)
    assert result.exit_code == 2
    assert "--page-size" in result.stderr


async def _dead_near_the_edge(storage: SQLiteStorage) -> None:
    """Three dead deliveries that ended 2 h minus 5 s ago."""
    now = time.time()
    for index in range(3):
        await storage.ingest(make_event(f"evt_edge_{index}", now - 7300), [APP])
    for claim in await storage.claim(now - 7300, 10, 60, "w"):
        await finish(storage, claim, "dead", now - 7195, 410)


def test_a_bulk_replay_keeps_its_window_fixed_across_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--since 2h` means 2 h before the replay started, on every page: a window that slides forward
    with each page skips the deliveries near its start."""
    path = write_config(tmp_path, config_dict(tmp_path))
    with_storage(tmp_path / "db.sqlite", _dead_near_the_edge)
    import gateway.operations

    real = time.time

    class Clock:
        calls = 0

        @staticmethod
        def time() -> float:
            Clock.calls += 1
            return real() + 10 * (Clock.calls - 1)  # each page a little later, as on a large replay

    monkeypatch.setattr(gateway.operations, "time", Clock)
    result = invoke("replay", "-c", path, "--state", "dead", "--since", "2h", "--page-size", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "replaying 3 deliveries\n"


async def _dead_due_and_in_flight(storage: SQLiteStorage) -> None:
    """evt_dead (app dead), evt_in_flight (app claimed, its attempt under way) and evt_due (app due, not
    claimed yet), received a minute ago."""
    now = time.time()
    await storage.ingest(make_event("evt_dead", now - 60), [APP])
    [dead] = await storage.claim(now, 10, 60, "w")
    await finish(storage, dead, "dead", now, 410)
    await storage.ingest(make_event("evt_in_flight", now - 59), [APP])
    await storage.claim(now, 10, 3600, "w")
    await storage.ingest(make_event("evt_due", now - 58), [APP])


def test_a_bulk_replay_of_missing_deliveries_says_what_it_left_alone_as_still_pending(
    tmp_path: Path,
) -> None:
    """As the replay of one event says it: a count of the dead alone reads as if the others had been
    forgotten, where they are on their way already."""
    path = write_config(tmp_path, config_dict(tmp_path))
    with_storage(tmp_path / "db.sqlite", _dead_due_and_in_flight)
    result = invoke("replay", "-c", path, "--state", "missing", "--since", "1h", "--page-size", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == "replaying 1 delivery; 2 left alone: still pending (in flight, due or waiting)\n"
    states = {
        event: deliveries(path, event)["app"].state for event in ("evt_dead", "evt_in_flight", "evt_due")
    }
    assert states == {"evt_dead": "pending", "evt_in_flight": "pending", "evt_due": "pending"}
    # The replayed one is pending now, and counted so by the next replay.
    again = invoke("replay", "-c", path, "--state", "missing", "--since", "1h", "--json")
    assert json.loads(again.stdout) == {"replayed": 0, "created": 0, "pending": 3}


async def _app_and_notify_dead(storage: SQLiteStorage) -> None:
    """evt_twice: app ended dead a minute ago, and notify (after app, when failure) then ended dead too."""
    now = time.time()
    await storage.ingest(make_event("evt_twice", now - 60), [APP, NOTIFY])
    [app] = await storage.claim(now - 60, 10, 60, "w")
    await finish(storage, app, "dead", now - 59, 410)
    [notify] = await storage.claim(now - 59, 10, 60, "w")
    await finish(storage, notify, "dead", now - 58, 410)


def test_a_bulk_replay_leaves_alone_what_ends_dead_again_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first page makes app run again, and notify wait for it. Before the next page is read, the
    gateway runs both and both end dead again (the app still refuses the event). The next page, past app,
    must not find notify dead and make it run a second time: the chat would be told twice."""
    path = write_config(tmp_path, config_dict(tmp_path))
    with_storage(tmp_path / "db.sqlite", _app_and_notify_dead)
    from gateway.operations import Operations

    real = Operations.replay
    pages = 0

    async def replay(self: Operations, **window: Any) -> dict[str, Any]:
        nonlocal pages
        page = await real(self, **window)
        pages += 1
        if pages == 1:  # what a serving gateway does meanwhile
            for _ in range(2):
                now = time.time()
                [claim] = await self.storage.claim(now, 10, 60, "gateway")
                await finish(self.storage, claim, "dead", now, 410)
        return page

    monkeypatch.setattr(Operations, "replay", replay)
    result = invoke("replay", "-c", path, "--state", "dead", "--since", "1h", "--page-size", "1")
    assert result.exit_code == 0, result.output
    assert pages == 2
    assert result.stdout == "replaying 1 delivery\n"
    assert {action: d.state for action, d in deliveries(path, "evt_twice").items()} == {
        "app": "dead",
        "notify": "dead",
    }


def test_send_with_a_missing_data_file_is_a_usage_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_dict(tmp_path))
    missing = tmp_path / "nope.json"
    result = invoke("send", "-c", path, "consignease", "--type", "user.created", "--data", f"@{missing}")
    assert result.exit_code == 2, (result.exit_code, result.exception)
    assert f"cannot read {missing}: No such file or directory" in result.stderr


@pytest.mark.parametrize(
    ("levels", "reason"), [(300, "Recursion limit reached"), (1100, "nested too deeply")]
)
def test_send_with_data_nested_too_deeply_is_a_usage_error(tmp_path: Path, levels: int, reason: str) -> None:
    # The webhook's body is written by orjson, which stops at 254 levels (TypeError), and --data is read by
    # Python's json, which stops near its recursion limit (RecursionError): both ended in a traceback.
    path = write_config(tmp_path, config_dict(tmp_path))
    deep = tmp_path / "deep.json"
    deep.write_text('{"items":' + "[" * levels + "]" * levels + "}")
    result = invoke("send", "-c", path, "consignease", "--type", "user.created", "--data", f"@{deep}")
    assert result.exit_code == 2, (result.exit_code, result.exception)
    assert "--data" in result.stderr and reason in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("sign_raises", "cannot sign for consignease: the mint provider's sign raised RuntimeError: no key"),
        (
            "sign_list",
            "cannot sign for consignease: the mint provider's sign returned ['x'] (a list), not headers",
        ),
        ("sign_keyerror", "cannot sign for consignease: the mint provider's sign raised KeyError: 'kid'"),
        (
            "sample_object",
            "cannot sign for consignease: the mint provider's sample_payload cannot be written as JSON: "
            "Type is not JSON serializable: object",
        ),
    ],
)
def test_send_whose_provider_cannot_sign_blames_the_provider_not_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, said: str
) -> None:
    # A plugin's sign() or sample_payload() that failed was a traceback, `unknown source` (a KeyError) or an
    # error of --data, which the operator had not given.
    from plugins.svix import SvixProvider

    class Mint(SvixProvider):
        name = "mint"

        def sample_payload(self, event_type: str, event_id: str, data: Any, now: float) -> Any:
            if fault == "sample_object":
                return {"id": event_id, "type": event_type, "at": object()}
            return super().sample_payload(event_type, event_id, data, now)

        def sign(self, body: bytes, event_id: str, now: float) -> Any:
            if fault == "sign_raises":
                raise RuntimeError("no key")
            if fault == "sign_keyerror":
                raise KeyError("kid")
            return ["x"]

    pm = plugins_with(providers=[Mint])
    monkeypatch.setattr("gateway.cli.plugin_manager", lambda: pm)
    config = config_dict(tmp_path)
    config["sources"]["consignease"]["provider"] = "mint"
    path = write_config(tmp_path, config)
    result = invoke(
        "send", "-c", path, "consignease", "--type", "user.created", "--url", "http://127.0.0.1:9"
    )
    assert result.exit_code == 1, (result.exit_code, result.exception, result.output)
    assert result.stderr.strip() == f"Error: {said}", result.stderr


def test_a_tolerance_under_a_second_is_refused_at_load(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["sources"]["consignease"]["tolerance"] = 0
    result = invoke("check", "-c", write_config(tmp_path, config))
    assert result.exit_code == 1
    assert "sources.consignease.tolerance" in result.stderr


def test_check_reports_a_config_that_is_not_utf8_instead_of_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(yaml.safe_dump(config_dict(tmp_path)).encode() + "# café\n".encode("latin-1"))
    result = invoke("check", "-c", path)
    assert result.exit_code == 1
    assert not isinstance(result.exception, UnicodeDecodeError), result.exception
    assert "UTF-8" in result.stderr and str(path) in result.stderr


@pytest.mark.parametrize("option", [["--since", "2h"], ["--until", "1h"], ["--page-size", "500"]])
def test_replay_of_one_event_refuses_the_bulk_options(filled: Path, option: list[str]) -> None:
    result = invoke("replay", "-c", filled, "evt_dead", *option)
    assert result.exit_code == 2
    assert f"{option[0]}: only with --state, not with an EVENT_ID" in result.stderr
    assert deliveries(filled, "evt_dead")["app"].state == "dead"


@pytest.mark.parametrize("option", ["--count", "--concurrency"])
def test_send_refuses_a_count_or_concurrency_below_one(tmp_path: Path, option: str) -> None:
    path = write_config(tmp_path, config_dict(tmp_path))
    result = invoke("send", "-c", path, "consignease", "--type", "user.created", option, "0")
    assert result.exit_code == 2
    assert option in result.stderr


def test_check_reports_a_malformed_notify_url_instead_of_a_traceback(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["routes"][0]["actions"].append({"id": "chat", "use": "notify", "with": {"url": "http://[::1"}})
    path = write_config(tmp_path, config)
    check_reports(
        path,
        [
            f"{path}: routes[0].actions[1].with.url: 'http://[::1': its host cannot be read "
            "(a name, an IPv4 address, or an IPv6 address in brackets)"
        ],
    )


def test_send_and_sign_bracket_an_ipv6_listen_address(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["listen"] = {"host": "::1", "port": 8081}
    path = write_config(tmp_path, config)
    result = invoke("sign", "-c", path, "consignease", "--type", "user.created")
    assert result.exit_code == 0
    assert " 'http://[::1]:8081/webhooks/consignease' " in result.stdout


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/webhooks/consignease"),
        ("http://127.0.0.1:8080/gw/", "http://127.0.0.1:8080/gw/webhooks/consignease"),
        # The query stays a query: appended, the source's path went into it.
        ("http://127.0.0.1:8080/gw?tenant=a", "http://127.0.0.1:8080/gw/webhooks/consignease?tenant=a"),
        ("http://127.0.0.1:8080/?tenant=a#top", "http://127.0.0.1:8080/webhooks/consignease?tenant=a"),
    ],
)
def test_sign_puts_the_sources_path_after_the_urls_own_path(tmp_path: Path, url: str, target: str) -> None:
    path = write_config(tmp_path, config_dict(tmp_path))
    result = invoke("sign", "-c", path, "consignease", "--type", "user.created", "--url", url)
    assert result.exit_code == 0, result.output
    assert f" {shlex.quote(target)} " in result.stdout, result.stdout


@pytest.mark.parametrize("count", ["1", "3"])
@pytest.mark.parametrize("url", ["http://[::1", "localhost:8080", "ftp://127.0.0.1:8080"])
def test_send_with_a_malformed_url_is_a_usage_error(tmp_path: Path, url: str, count: str) -> None:
    path = write_config(tmp_path, config_dict(tmp_path))
    result = CliRunner().invoke(
        main,
        ["send", "-c", str(path), "consignease", "--type", "user.created", "--url", url, "--count", count],
    )
    assert result.exit_code == 2, result.output
    assert "--url" in result.stderr
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("mark", ["/", "?", "#"])
def test_send_with_a_slash_in_the_urls_password_shows_no_part_of_it(tmp_path: Path, mark: str) -> None:
    """httpx's own words repeat what it read as the port, here the start of the password. (After a '#', the
    rest is a fragment, which is never sent: dropped, it took the '@' that told of a password with it.)"""
    path = write_config(tmp_path, config_dict(tmp_path))
    url = f"http://user:s3cr3t{mark}x9y@127.0.0.1:8080"
    result = CliRunner().invoke(
        main, ["send", "-c", str(path), "consignease", "--type", "user.created", "--url", url]
    )
    assert result.exit_code == 2, result.output
    assert "s3cr3t" not in result.stderr and "x9y" not in result.stderr, result.stderr
    assert "percent-encoded" in result.stderr, result.stderr


def test_send_before_the_gateway_runs_says_to_start_it(tmp_path: Path) -> None:
    # A new user's first `hookyard send`, before `make run`: "Connection refused", and nothing to do.
    config = config_dict(tmp_path)
    port = free_port()
    config["listen"] = {"host": "127.0.0.1", "port": port}
    path = write_config(tmp_path, config)
    result = invoke("send", "-c", path, "consignease", "--type", "user.created")
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"hookyard: cannot reach http://127.0.0.1:{port}/webhooks/consignease: [Errno 111] Connection "
        "refused: is the gateway running there? Start it with `hookyard serve`, or give its address with --url\n"
    )


def test_send_with_count_before_the_gateway_runs_says_to_start_it(tmp_path: Path) -> None:
    # It printed `sent 3 in 0.01s (…/s); ConnectError: 3; …` alone: sent where nothing was, and no word of why.
    config = config_dict(tmp_path)
    port = free_port()
    config["listen"] = {"host": "127.0.0.1", "port": port}
    path = write_config(tmp_path, config)
    result = invoke("send", "-c", path, "consignease", "--type", "user.created", "--count", "3")
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("sent 3 in ") and "ConnectError: 3;" in result.stdout, result.stdout
    assert result.stderr == (
        f"hookyard: cannot reach http://127.0.0.1:{port}/webhooks/consignease: none of the 3 requests could "
        "connect: "
        "is the gateway running there? Start it with `hookyard serve`, or give its address with --url\n"
    )


def test_send_says_when_no_route_matched_the_event(tmp_path: Path) -> None:
    """It printed `200 … accepted` for an event no route took, and nothing was ever delivered, without a word
    of why: a type no route lists, or a misspelt --type. `hookyard serve` found as the config has it, the
    event looked up on its ops listener."""
    config = config_dict(tmp_path)
    ingress, ops = free_port(), free_port()
    config["listen"] = {"host": "127.0.0.1", "port": ingress}
    config["ops"] = {"host": "127.0.0.1", "port": ops}
    config["routes"].append(
        {
            "name": "consignments",
            "source": "consignly",
            "events": ["ConsignmentCreated"],
            "actions": [{"id": "app", "use": "forward", "with": {"url": "http://127.0.0.1:9/hooks"}}],
        }
    )
    path = write_config(tmp_path, config)
    process = GatewayProcess(path, f"http://127.0.0.1:{ops}").start()
    try:
        routed = invoke("send", "-c", path, "consignly", "--type", "ConsignmentCreated")
        unrouted = invoke("send", "-c", path, "consignly", "--type", "ConsignmentDeleted")
        misspelt = invoke("send", "-c", path, "consignly", "--type", "ConsignmentCreatd")
    finally:
        process.kill()
    assert (routed.exit_code, routed.stderr) == (0, ""), routed.output
    # Taken all the same, and said so as before: the gateway did what it was asked.
    for result in (unrouted, misspelt):
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("200 {") and '"status":"accepted"' in result.stdout
    assert unrouted.stderr == (
        "hookyard: no route matched type consignment.deleted from source consignly: nothing will be delivered\n"
    )
    assert misspelt.stderr == (
        "hookyard: warning: consignly sends no event type 'ConsignmentCreatd' (did you mean "
        "ConsignmentCreated?)\n"
        "hookyard: no route matched type ConsignmentCreatd from source consignly: nothing will be delivered\n"
    )


def test_send_looks_its_event_up_on_the_admin_url_and_says_nothing_where_none_answers(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["ops"] = {"admin_token": "admin-token-for-tests"}
    path = write_config(tmp_path, config)
    token = {"HOOKYARD_ADMIN_TOKEN": "admin-token-for-tests"}
    closed = f"http://127.0.0.1:{free_port()}"
    with RunningGateway(path) as gw:

        def send(*args: str, env: dict[str, str] | None = None) -> Result:
            # consignment.created: no route of this config lists it.
            return invoke("send", "-c", path, "consignly", "--type", "101", "--url", gw.url, *args, env=env)

        # --url names a gateway whose ops listener the config does not say: nothing is looked up.
        alone = send()
        nothing_there = send("--admin-url", closed, env=token)
        looked_up = send("--admin-url", gw.ops_url, env=token)
        from_env = send(env={**token, "HOOKYARD_ADMIN_URL": gw.ops_url})
        no_token = send("--admin-url", gw.ops_url)
    unrouted = "hookyard: no route matched type consignment.created from source consignly: nothing will be delivered\n"
    for result in (alone, nothing_there, looked_up, from_env, no_token):
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("200 {"), result.output
    assert alone.stderr == nothing_there.stderr == ""
    assert looked_up.stderr == from_env.stderr == unrouted
    # One line, no traceback: the event was sent, whatever the look-up found.
    assert no_token.stderr.startswith("hookyard: cannot tell whether a route matched the event: ")
    assert no_token.stderr.count("\n") == 1, no_token.stderr


def test_send_to_a_gateway_that_takes_the_request_but_does_not_answer_says_it_may_be_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said `cannot reach URL: timed out`, as if the event had never got there. A gateway whose store is
    locked (a `sqlite3` shell's write) holds the webhook and answers 200 once its commit is on disk: the
    event may well be taken."""
    monkeypatch.setattr("gateway.sender.SEND_TIMEOUT", 0.5)
    path = write_config(tmp_path, config_dict(tmp_path))

    def hold(conn: socket.socket) -> None:
        # Reads on, answering nothing, until the client gives up and closes the connection.
        while conn.recv(65536):
            pass

    with raw_server(hold) as url:
        result = invoke("send", "-c", path, "consignease", "--type", "user.created", "--url", url)
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"hookyard: {url}/webhooks/consignease did not answer within 0.5 s; the event may have been taken "
        "all the same (`hookyard events list` shows it if it was)\n"
    )


@pytest.mark.parametrize("count", ["1", "3"])
def test_send_to_a_closed_port_shows_the_url_without_its_password(tmp_path: Path, count: str) -> None:
    path = write_config(tmp_path, config_dict(tmp_path))
    port = free_port()
    url = f"http://user:s3cr3t@127.0.0.1:{port}"
    result = CliRunner().invoke(
        main,
        ["send", "-c", str(path), "consignease", "--type", "user.created", "--url", url, "--count", count],
    )
    assert result.exit_code == 1, result.output
    assert "s3cr3t" not in result.output, result.output
    if count == "1":
        assert result.stderr.startswith(
            f"hookyard: cannot reach http://127.0.0.1:{port}/webhooks/consignease"
        )


@pytest.mark.parametrize(
    ("credentials", "shown"),
    [
        ("user:s3cr3t@", "http://127.0.0.1:{port}/gateway/webhooks/consignease"),
        # A '/' in the password: which '@' ends it is ambiguous, so all before the last one is left out.
        ("user:s3/cr3t@", "'http://…@127.0.0.1:{port}/gateway/webhooks/consignease'"),
    ],
)
def test_send_shows_the_urls_own_path_without_its_password(
    tmp_path: Path, credentials: str, shown: str
) -> None:
    """The path of --url (a gateway behind a proxy, say) was shown as /…, as a config error shows a URL."""
    path = write_config(tmp_path, config_dict(tmp_path))
    port = free_port()
    url = f"http://{credentials}127.0.0.1:{port}/gateway"
    result = CliRunner().invoke(
        main, ["send", "-c", str(path), "consignease", "--type", "user.created", "--url", url]
    )
    assert result.exit_code in (1, 2), result.output
    assert shown.format(port=port) in result.stderr, result.stderr
    assert "s3" not in result.stderr and "cr3t" not in result.stderr, result.stderr


ADMIN_COMMANDS = [["events", "list"], ["events", "show", "evt_1"], ["replay", "evt_1"]]


@pytest.mark.parametrize("command", ADMIN_COMMANDS)
@pytest.mark.parametrize("url", ["http://[::1", "localhost:9000", "ftp://127.0.0.1:9000"])
def test_a_malformed_admin_url_is_a_usage_error(command: list[str], url: str) -> None:
    result = CliRunner().invoke(main, [*command, "--admin-url", url])
    assert result.exit_code == 2, result.output
    assert "--admin-url" in result.stderr
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ADMIN_COMMANDS)
@pytest.mark.parametrize("credentials", ["user:s3cr3t/x9y@", "user:s3cr3t@"])
def test_an_admin_url_shows_no_part_of_its_password(command: list[str], credentials: str) -> None:
    """Unreadable (httpx's words repeat the start of a password holding a '/') or unreachable."""
    url = f"http://{credentials}127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, [*command, "--admin-url", url])
    assert result.exit_code in (1, 2), result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "s3cr3t" not in result.output and "x9y" not in result.output, result.output


@pytest.mark.parametrize("credentials", ["ops:s3cr3t@", "ops@"])
@pytest.mark.parametrize("through", ["--admin-url", "$HOOKYARD_ADMIN_URL"])
def test_an_admin_url_with_credentials_is_refused_without_showing_them(
    tmp_path: Path, credentials: str, through: str
) -> None:
    """httpx would send them as Basic auth in place of the bearer token, and the gateway's 401 would then
    say the token is wrong, though $HOOKYARD_ADMIN_TOKEN holds the right one."""
    config = config_dict(tmp_path)
    config["ops"] = {"admin_token": "admin-token-for-tests"}
    path = write_config(tmp_path, config)
    with RunningGateway(path) as gw:
        url = gw.ops_url.replace("http://", f"http://{credentials}") + "/"
        env = {"HOOKYARD_ADMIN_TOKEN": "admin-token-for-tests"}
        option = ["--admin-url", url]
        if through != "--admin-url":
            env["HOOKYARD_ADMIN_URL"], option = url, []
        for command in [*ADMIN_COMMANDS, ["replay", "--state", "dead"]]:
            result = CliRunner(env=env).invoke(main, [*command, *option])
            assert result.exit_code == 2, result.output
            assert (
                f"Invalid value for {through}: '{gw.ops_url}/': credentials in the URL are not used; the "
                "admin token comes from $HOOKYARD_ADMIN_TOKEN"
            ) in " ".join(result.stderr.split()), result.stderr
            assert "s3cr3t" not in result.output, result.output


@pytest.mark.parametrize("command", ADMIN_COMMANDS)
def test_an_unreachable_admin_url_is_shown_with_its_path(command: list[str]) -> None:
    port = free_port()
    result = CliRunner().invoke(main, [*command, "--admin-url", f"http://127.0.0.1:{port}/hookyard/"])
    assert result.exit_code == 1, result.output
    assert f"cannot reach the admin API at http://127.0.0.1:{port}/hookyard: " in result.stderr, result.stderr


@pytest.mark.parametrize(
    "token", ["s3cr3t\nx9y", "s3cr3t\rx9y", "s3cr3t\x0bx9y", "s3cr3t\x0cx9y", "s3cr3t\x01x9y"]
)
@pytest.mark.parametrize("command", ADMIN_COMMANDS)
def test_an_admin_token_no_header_can_carry_is_refused_without_showing_it(
    command: list[str], token: str, downstream: Downstream
) -> None:
    """Two lines of a token file, say: the HTTP library's refusal repeated the header, token and all."""
    result = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": token}).invoke(
        main, [*command, "--admin-url", downstream.url]
    )
    assert result.exit_code == 2, result.output
    assert downstream.received() == []
    assert "$HOOKYARD_ADMIN_TOKEN" in result.stderr, result.stderr
    assert "s3cr3t" not in result.output and "x9y" not in result.output, result.output


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY", "http_proxy"])
def test_a_proxy_in_the_environment_is_not_used_for_a_loopback_gateway(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """A shell (or a pod) with a proxy for its way out: the gateway on 127.0.0.1 is this host's, which no
    proxy can reach, and the proxy saw the admin token. `send` printed the proxy's answer as the
    gateway's."""
    config = config_dict(tmp_path)
    config["ops"] = {"admin_token": "admin-token-for-tests"}
    path = write_config(tmp_path, config)
    with RunningGateway(path) as gw:
        monkeypatch.setenv(variable, downstream.url)  # a proxy that answers 200 to everything
        env = {"HOOKYARD_ADMIN_TOKEN": "admin-token-for-tests"}
        for count in ("1", "2"):
            sent = invoke(
                "send", "-c", path, "consignease", "--type", "user.created", "--url", gw.url, "--count", count
            )
            assert sent.exit_code == 0, sent.output
        listed = invoke("events", "list", "--admin-url", gw.ops_url, "--json", env=env)
        assert listed.exit_code == 0, listed.output
        assert len(listed.stdout.splitlines()) == 3
    assert downstream.received() == []


ADMIN_CALLS = [
    (["events", "list"], "GET", "/admin/events"),
    (["events", "show", "evt_1"], "GET", "/admin/events/evt_1"),
    (["replay", "evt_1"], "POST", "/admin/events/evt_1/replay"),
    (["replay", "--state", "dead", "--since", "1h"], "POST", "/admin/replay"),
]


@contextmanager
def running_sink(out: Path | None = None) -> Iterator[str]:
    """`hookyard sink` in a child process, answering 200 with no body to everything: its URL. `out`: the
    file its output and errors go to."""
    port = free_port()
    with open(out or os.devnull, "wb") as written:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "sink", "--port", str(port)],
            stdout=written,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or _answers(url), 20)
        assert process.poll() is None, f"sink exited with {process.returncode}"
        yield url
    finally:
        process.kill()
        process.wait(10)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


def test_an_admin_url_that_answers_200_but_is_not_the_ops_listener_says_so(downstream: Downstream) -> None:
    """A sink (200, no body) or any app answering JSON (the downstream's `{}`): `events show` printed
    `{"error": ""}` and exited 0, the others ended in a KeyError traceback. Said as for a 404, naming the
    URL as the user gave it: the option or the variable."""
    with running_sink() as sink_url:
        for url, answer in ((sink_url, "with no body"), (downstream.url, "{}")):
            for command, method, path in ADMIN_CALLS:
                given = CliRunner().invoke(main, [*command, "--admin-url", url])
                assert given.exit_code == 1, given.output
                assert given.stderr == (
                    f"hookyard: --admin-url {url} does not answer as Hookyard's ops listener: "
                    f"{method} {path} answered 200 {answer}\n"
                )
                from_env = CliRunner(env={"HOOKYARD_ADMIN_URL": url}).invoke(main, command)
                assert from_env.exit_code == 1, from_env.output
                assert from_env.stderr == (
                    f"hookyard: $HOOKYARD_ADMIN_URL {url} does not answer as Hookyard's ops listener: "
                    f"{method} {path} answered 200 {answer}\n"
                )


def test_an_admin_url_that_answers_json_nested_past_the_parser_says_it_is_not_the_ops_listener() -> None:
    """Deeper than Python's json reads: its RecursionError ended the command in a traceback."""
    nested = b"[" * 5000

    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(nested), nested))

    with raw_server(answer) as url:
        for command, method, path in ADMIN_CALLS:
            given = CliRunner().invoke(main, [*command, "--admin-url", url])
            assert given.exit_code == 1, given.output
            assert given.stderr == (
                f"hookyard: --admin-url {url} does not answer as Hookyard's ops listener: "
                f"{method} {path} answered 200 {'[' * 200}\n"
            )


def test_the_sink_prints_a_body_nested_past_what_orjson_writes_as_text(tmp_path: Path) -> None:
    """The gateway forwards JSON nested up to 1024 levels; orjson writes no more than 254. The sink failed
    such a request with a 500 and a traceback, so its forward was retried until it ended dead."""
    out = tmp_path / "sink.out"
    body = '{"data":' + "[" * 300 + "]" * 300 + "}"
    with running_sink(out) as url:
        answer = httpx.post(url + "/hooks/users", content=body, timeout=10)
        assert answer.status_code == 200
        wait_until(lambda: "/hooks/users" in out.read_text(), 20)
    [printed] = [json.loads(line) for line in out.read_text().splitlines() if "/hooks/users" in line]
    assert printed["method"] == "POST" and printed["body"] == body
    assert "Traceback" not in out.read_text()


def test_the_sink_prints_an_integer_past_64_bits_with_all_its_digits(tmp_path: Path) -> None:
    # orjson reads such an integer as a float: the sink printed 1.2345678901234568e+29.
    out = tmp_path / "sink.out"
    body = '{"data":{"amount":123456789012345678901234567891,"ratio":0.5}}'
    with running_sink(out) as url:
        answer = httpx.post(url + "/hooks/big", content=body, timeout=10)
        assert answer.status_code == 200
        wait_until(lambda: "/hooks/big" in out.read_text(), 20)
    [printed] = [json.loads(line) for line in out.read_text().splitlines() if "/hooks/big" in line]
    assert printed["body"] == {"data": {"amount": 123456789012345678901234567891, "ratio": 0.5}}


def test_the_sink_prints_the_query_string(tmp_path: Path) -> None:
    # A forward URL may carry a query (`/hooks/users?tenant=a`): the sink printed the path alone.
    out = tmp_path / "sink.out"
    with running_sink(out) as url:
        answer = httpx.post(url + "/hooks/query?tenant=a&x=%2F", content=b"{}", timeout=10)
        assert answer.status_code == 200
        assert httpx.post(url + "/hooks/plain", content=b"{}", timeout=10).status_code == 200
        wait_until(lambda: "/hooks/plain" in out.read_text(), 20)
    [queried, plain] = [json.loads(line) for line in out.read_text().splitlines() if "/hooks/" in line]
    assert (queried["path"], queried["query"]) == ("/hooks/query", "tenant=a&x=%2F")
    assert plain["path"] == "/hooks/plain" and "query" not in plain


# `hookyard` with SIGINT handled as Python handles it from a terminal (KeyboardInterrupt): a child of a
# process that ignores it (a test runner's worker, say) would inherit the ignoring, and never see it.
FROM_A_TERMINAL = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from gateway.launch import main; main()"
)


def http_answer(body: dict[str, Any]) -> bytes:
    content = json.dumps(body).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(content)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + content


def interrupted(tmp_path: Path, args: list[str], answers: tuple[bytes, ...] = ()) -> tuple[int, str]:
    """Ctrl-C on `hookyard ARGS` ({url} in them: a server's, answering `answers` to its first requests, one
    each, then holding the next one unanswered) once that held request has arrived: the exit status, and
    what the command said on stderr."""
    held = threading.Event()
    answered = iter(answers)

    def answer(conn: socket.socket) -> None:
        if (reply := next(answered, None)) is not None:
            conn.sendall(reply)
            return
        held.set()
        while conn.recv(65536):  # until the command ends, and its connection with it
            pass

    err = tmp_path / "interrupted.err"
    with raw_server(answer) as url:
        status = ctrl_c_once([arg.format(url=url) for arg in args], held.is_set, err)
    return status, err.read_text()


def ctrl_c_once(args: list[str], ready: Callable[[], bool], err: Path) -> int:
    """Run `hookyard ARGS` as from a terminal (its stderr to `err`), press Ctrl-C once `ready()` (20 s at
    most; the command must still run then), and return its exit status."""
    with open(err, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", FROM_A_TERMINAL, *args], stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        wait_until(lambda: ready() or process.poll() is not None, 20)
        assert process.poll() is None, f"exited with {process.returncode}: {err.read_text()}"
        process.send_signal(signal.SIGINT)
        return process.wait(20)
    finally:
        process.kill()
        process.wait(10)


PAGE = {"replayed": 2, "created": 0, "next_cursor": 2, "pending": 0, "since": 1.0, "until": 2.0}


@pytest.mark.parametrize(
    ("args", "answers", "said"),
    [
        (
            ["send", "consignease", "--type", "user.created", "--url", "{url}"],
            (),
            "the event may have been taken all the same (`hookyard events list` shows it if it was)",
        ),
        (  # it counts the answers so far
            ["send", "consignease", "--type", "user.created", "--url", "{url}", "--count", "3"],
            (http_answer({"status": "accepted"}),),
            "1 of 3 sent and answered, 200: 1; those under way may have been taken all the same "
            "(`hookyard events list` shows those that were)",
        ),
        (["events", "list", "--admin-url", "{url}"], (), None),
        (["events", "show", "evt_1", "--admin-url", "{url}"], (), None),
        (
            ["replay", "evt_1", "--admin-url", "{url}"],
            (),
            "the replay may have been done all the same (`hookyard events show evt_1` shows it)",
        ),
        (  # an id is the sender's: quoted as a shell reads it
            ["replay", "evt 1;$(x)", "--admin-url", "{url}"],
            (),
            "the replay may have been done all the same (`hookyard events show 'evt 1;$(x)'` shows it)",
        ),
        (
            ["replay", "--state", "dead", "--since", "1h", "--admin-url", "{url}"],
            (http_answer(PAGE),),
            "after 2 replayed, 0 created; the page under way may have been replayed all the same, and the "
            "same command again replays what is left",
        ),
    ],
)
def test_ctrl_c_ends_a_command_with_status_130_saying_what_may_be_done(
    tmp_path: Path, args: list[str], answers: tuple[bytes, ...], said: str | None
) -> None:
    """It printed click's `Aborted!` and exited 1, as a command that failed, where a shell expects 130 of
    one the user interrupted; and `Aborted!` read as if nothing had been done, where a request under way
    may well have been, and a bulk replay's pages before it were."""
    config = write_config(tmp_path, config_dict(tmp_path))
    status, stderr = interrupted(tmp_path, [*args, "-c", str(config)], answers)
    assert status == 130
    progress = "... 2 replayed, 0 created\n" if args[0] == "replay" and answers else ""
    assert stderr == progress + (f"hookyard: interrupted: {said}\n" if said else "")


def test_ctrl_c_stops_the_sink_quietly_with_status_0(tmp_path: Path) -> None:
    """Ctrl-C is how the tour stops the sink, again and again: it printed click's `Aborted!` and exited 1,
    as a command that failed does, where `serve` stops on it with status 0."""
    port = free_port()
    err = tmp_path / "sink.err"
    status = ctrl_c_once(["sink", "--port", str(port)], lambda: _answers(f"http://127.0.0.1:{port}"), err)
    assert (status, err.read_text()) == (0, "")


@pytest.mark.parametrize("option", [["--status", "600"], ["--status", "99"], ["--answer", "/hooks=1000"]])
def test_sink_refuses_a_status_no_http_answer_can_carry(
    option: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused at once: the sink would otherwise fail every such request with a traceback, and the gateway
    see the connection close without an answer."""
    import uvicorn

    served: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: served.append(server))
    result = CliRunner().invoke(main, ["sink", *option])
    assert served == []
    assert result.exit_code == 2, result.output
    assert "100" in result.stderr and "599" in result.stderr


@pytest.mark.parametrize("answer", ["hooks=422", "/hooks=", "/hooks"])
def test_sink_names_the_option_an_answer_without_prefix_or_status_was_given_to(
    answer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: None)
    result = CliRunner().invoke(main, ["sink", "--answer", answer])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for --answer: {answer!r} is not PREFIX=STATUS" in result.stderr


@pytest.mark.parametrize("port", ["70000", "65536", "0", "-1"])
def test_sink_refuses_a_port_it_cannot_listen_on(port: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused at once: 70000 was taken modulo 65536 (the sink listened on 4464 without a word), and with 0
    it listened on a port nobody is told."""
    import uvicorn

    served: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: served.append(sockets))
    result = CliRunner().invoke(main, ["sink", "--port", port])
    assert served == []
    assert result.exit_code == 2, result.output
    assert "--port" in result.stderr and "65535" in result.stderr


def test_sink_on_a_port_that_is_taken_says_so_as_serve_does() -> None:
    with bound_socket() as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["sink", "--port", str(port)])
    assert result.exit_code == 1, result.output
    assert result.stderr == f"hookyard: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_sink_on_a_host_that_does_not_resolve_says_so_as_serve_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name lookup that fails needs a resolver to ask, which a test does not reach: its answer is made."""

    def fail(host: str, *args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    result = CliRunner().invoke(main, ["sink", "--host", "nowhere.invalid", "--port", "3000"])
    assert result.exit_code == 1, result.output
    assert result.stderr == "hookyard: cannot listen on nowhere.invalid:3000: Name or service not known\n"


@pytest.mark.parametrize("host", ["a..b", "a" * 64 + ".test"])
def test_sink_on_a_host_that_is_not_a_name_says_so_as_serve_does(host: str) -> None:
    """Refused by the IDNA encoding before any resolver is asked; it ended in a UnicodeError traceback."""
    result = CliRunner().invoke(main, ["sink", "--host", host, "--port", "3000"])
    assert result.exit_code == 1, result.output
    assert (
        result.stderr
        == f"hookyard: cannot listen on {host}:3000: not a host name (label empty or too long)\n"
    )


def test_serve_and_sink_say_in_their_help_how_they_are_stopped() -> None:
    # `serve` named SIGTERM alone, and `sink` nothing: Ctrl-C stops both, which is how the tour stops them.
    for command in ("serve", "sink"):
        result = invoke(command, "--help")
        assert result.exit_code == 0, result.output
        assert "Ctrl-C" in " ".join(result.stdout.split()), result.stdout


def test_every_option_of_every_command_says_what_it_does_in_its_help() -> None:
    import click

    def commands(group: click.Group, words: tuple[str, ...]) -> Iterator[tuple[str, click.Command]]:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, (*words, name))
            else:
                yield " ".join((*words, name)), command

    # `sink --host` and `--port` say their default, which is all they need to.
    plain = {("sink", "host"), ("sink", "port")}
    silent = [
        f"hookyard {name} {param.opts[-1]}"
        for name, command in commands(main, ())
        for param in command.params
        if isinstance(param, click.Option) and not param.help and (name, param.name) not in plain
    ]
    assert not silent, f"options whose --help says nothing: {silent}"
