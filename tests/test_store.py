"""The store action against real databases: PostgreSQL (the postgres_url fixture) and SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

import asyncpg  # type: ignore[import-untyped]
import orjson
import pytest
import yaml

from gateway.actions import Action, Job, Outcome, Resources
from gateway.config import ConfigError, RetryPolicy, parse_config
from gateway.events import Event
from gateway.http_client import HttpClient
from gateway.plugins import Registry, new_plugin_manager
from gateway.routing import RouteTable
from gateway.storage import EventDetail
from plugins.store import POOL_SIZE
from tests.support import (
    Downstream,
    RunningGateway,
    TcpProxy,
    free_port,
    gateway_config,
    svix_request,
    unavailable,
    wait_until,
)

T0 = 1_790_000_000.0  # a fixed occurred_at, so that ordering tests say exactly which event is older


@cache
def registry() -> Registry:
    return Registry.collect(new_plugin_manager(load_entry_points=False))


# -- the databases ------------------------------------------------------------------------------------


class Database:
    """A table of a real database, read back with the database's own client."""

    kind: str
    url: str

    def __init__(self, table: str) -> None:
        self.table = table

    def fetch(self, sql: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def execute(self, sql: str) -> None:
        raise NotImplementedError

    def events(self) -> list[dict[str, Any]]:
        return [_decode(row) for row in self.fetch(f'SELECT * FROM "{self.table}" ORDER BY event_id')]

    def rows(self) -> dict[str, dict[str, Any]]:
        return {row["key"]: _decode(row) for row in self.fetch(f'SELECT * FROM "{self.table}"')}

    def tombstones(self) -> dict[str, datetime]:
        rows = self.fetch(f'SELECT * FROM "{self.table}_tombstones"')
        return {row["key"]: _decode(row)["occurred_at"] for row in rows}

    def drop(self) -> None:
        for name in (self.table, f"{self.table}_tombstones"):
            self.execute(f'DROP TABLE IF EXISTS "{name}"')


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    """JSON columns to values and timestamps to aware datetimes, whichever database they came from."""
    decoded = dict(row)
    for column in ("payload", "headers", "data"):
        if isinstance(decoded.get(column), str):
            decoded[column] = json.loads(decoded[column])
    for column in ("occurred_at", "received_at", "updated_at", "deleted_at"):
        if isinstance(decoded.get(column), str):
            decoded[column] = datetime.fromisoformat(decoded[column])
    return decoded


class SQLiteDatabase(Database):
    kind = "sqlite"

    def __init__(self, path: Path, table: str) -> None:
        super().__init__(table)
        self.path = path
        self.url = f"sqlite:///{path}"  # path is absolute: sqlite:////tmp/...

    def fetch(self, sql: str) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.path)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(sql)]
        finally:
            conn.close()

    def execute(self, sql: str) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(sql)
        finally:
            conn.close()


class PostgresDatabase(Database):
    kind = "postgresql"

    def __init__(self, url: str, table: str) -> None:
        super().__init__(table)
        self.url = url
        # For the action: its sessions are named after the table, so that a test finds them, and only them
        # (the server is shared).
        parts = urlsplit(url)
        query = f"{parts.query}&" if parts.query else ""
        self.action_url = parts._replace(query=f"{query}application_name={table}").geturl()

    def action_url_via(self, proxy: TcpProxy) -> str:
        parts = urlsplit(self.action_url)
        user = parts.netloc.rpartition("@")[0]
        return parts._replace(
            netloc=f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"
        ).geturl()

    def action_sessions(self, condition: str = "true") -> int:
        [row] = self.fetch(
            f"SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = '{self.table}' AND {condition}"
        )
        return int(row["n"])

    def end_action_sessions(self) -> None:
        """What a server restart or failover does to the action's connections."""
        self.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{self.table}'"
        )

    @contextmanager
    def login_role(self) -> Iterator[tuple[str, str]]:
        """A role of the test's own that may write its tables (made beforehand): its name, and the action's URL
        that logs in as it. Roles are the server's: `ALTER ROLE` changes only this test's sessions."""
        role, password = self.table.replace("hookyard_test_", "hookyard_role_"), uuid.uuid4().hex
        self.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        try:
            for name in (self.table, f"{self.table}_tombstones"):
                if self.exists(name):
                    self.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON "{name}" TO {role}')
            parts = urlsplit(self.action_url)
            host = parts.netloc.rpartition("@")[2]
            yield role, parts._replace(netloc=f"{role}:{password}@{host}").geturl()
        finally:
            self.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
            self.execute(f"DROP OWNED BY {role}")
            self.execute(f"DROP ROLE {role}")

    def exists(self, name: str) -> bool:
        [row] = self.fetch(f"""SELECT to_regclass('"{name}"') IS NOT NULL AS found""")
        return bool(row["found"])

    async def _fetch(self, sql: str) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(self.url)
        try:
            return [dict(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    def fetch(self, sql: str) -> list[dict[str, Any]]:
        return asyncio.run(self._fetch(sql))

    def execute(self, sql: str) -> None:
        self.fetch(sql)


@contextmanager
def holding(url: str, *statements: str) -> Iterator[None]:
    """Another session runs `statements` in a transaction and holds it open, with its locks, for the block."""
    held, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():
                for sql in statements:
                    await conn.execute(sql)
                held.set()
                await asyncio.to_thread(release.wait)
        finally:
            await conn.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:
            failed.append(exc)
            held.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    held.wait(10)
    try:
        if failed:
            raise failed[0]
        yield
    finally:
        release.set()
        thread.join(10)


@pytest.fixture
def pg(postgres_url: str) -> Iterator[PostgresDatabase]:
    """A table of its own in the shared PostgreSQL database."""
    database = PostgresDatabase(postgres_url, f"hookyard_test_{uuid.uuid4().hex[:12]}")
    yield database
    database.drop()


@pytest.fixture(scope="session")
def pgbouncer_url(postgres_url: str) -> Iterator[str]:
    """A PgBouncer of the session's own in transaction pooling mode, in front of the test database: the URL
    that reaches the database through it. Two server connections at most, so that the store's ten share
    them, as many gateways' would in production."""
    with running_pgbouncer(postgres_url, "transaction") as url:
        yield url


@pytest.fixture(scope="session")
def pgbouncer_statement_mode_url(postgres_url: str) -> Iterator[str]:
    """As pgbouncer_url, in statement pooling mode: it refuses any transaction of several statements."""
    with running_pgbouncer(postgres_url, "statement") as url:
        yield url


@contextlib.contextmanager
def running_pgbouncer(postgres_url: str, pool_mode: str) -> Iterator[str]:
    """A PgBouncer in `pool_mode` in front of the test database, with two server connections; its URL."""
    binary = shutil.which("pgbouncer", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin")
    if binary is None:
        unavailable("pgbouncer is not installed; install it with: apt-get install -y pgbouncer")
    server = urlsplit(postgres_url)
    user = unquote(server.username or "postgres")
    target = f"host={server.hostname or '127.0.0.1'} port={server.port or 5432} dbname={server.path[1:]}"
    target += f" user={user}" + (f" password={unquote(server.password)}" if server.password else "")
    port = free_port()
    # Not under pytest's tmp_path: its directories are root's alone, and PgBouncer refuses to run as root.
    with tempfile.TemporaryDirectory(prefix="hookyard-pgbouncer-") as directory:
        home = Path(directory)
        (home / "users.txt").write_text(f'"{user}" ""\n')
        (home / "pgbouncer.ini").write_text(
            f"""[databases]
hookyard = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home / "users.txt"}
pool_mode = {pool_mode}
default_pool_size = 2
max_client_conn = 200
logfile = {home / "pgbouncer.log"}
pidfile = {home / "pgbouncer.pid"}
"""
        )
        command = [binary, str(home / "pgbouncer.ini")]
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in (home, *home.iterdir()):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            command[1:1] = ["-u", "nobody"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:

            def listening() -> bool:
                if process.poll() is not None:
                    log = home / "pgbouncer.log"
                    raise AssertionError(f"pgbouncer exited: {log.read_text() if log.exists() else ''}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
                return False

            wait_until(listening)
            # PgBouncer lets the user in (trust); it logs in to the server as the database entry says.
            yield f"postgresql://{quote(user, safe='')}@127.0.0.1:{port}/hookyard"
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    # A table of its own for every test: the PostgreSQL database is shared.
    table = f"hookyard_test_{uuid.uuid4().hex[:12]}"
    database: Database
    if request.param == "sqlite":
        database = SQLiteDatabase(tmp_path / "store.db", table)
    else:
        database = PostgresDatabase(request.getfixturevalue("postgres_url"), table)
    yield database
    if isinstance(database, PostgresDatabase):
        database.drop()


# -- calling the action directly ------------------------------------------------------------------------


def make_event(
    event_id: str,
    event_type: str = "user.updated",
    data: Any = None,
    occurred_at: float | None = None,
    received_at: float | None = None,
) -> Event:
    payload = {"type": event_type, "data": {"id": "user_1"} if data is None else data}
    return Event(
        source="consignease",
        id=event_id,
        type=event_type,
        received_at=time.time() if received_at is None else received_at,
        body=json.dumps(payload).encode(),
        payload=payload,
        occurred_at=occurred_at,
        headers={"content-type": "application/json", "svix-id": event_id},
    )


@asynccontextmanager
async def store_action(options: dict[str, Any]) -> AsyncIterator[Action]:
    """A store action, closed at the end as the engine closes it."""
    store = registry().actions["store"]
    context = ssl.create_default_context()
    client = HttpClient(ssl_context=context, user_agent="test")
    resources = Resources(client=client, user_agent="test", ssl_context=context, pool=10)
    action: Action = store(store.Options.model_validate(options), resources)
    try:
        yield action
    finally:
        await action.aclose()
        await resources.aclose()


def job(event: Event, timeout: float = 5.0) -> Job:
    return Job(event, "users", "db", attempt=1, timeout=timeout, retry=RetryPolicy())


def deliver(options: dict[str, Any], *events: Event, between: Any = None) -> list[Outcome]:
    """Deliver each event in turn through one store action, as the engine would; `between(index)` runs
    after each delivery."""

    async def run() -> list[Outcome]:
        outcomes = []
        async with store_action(options) as action:
            for index, event in enumerate(events):
                outcomes.append(await action.deliver(job(event)))
                if between is not None:
                    # In a thread: the PostgreSQL helpers run their own event loop.
                    await asyncio.to_thread(between, index)
        return outcomes

    return asyncio.run(run())


def kinds(outcomes: list[Outcome]) -> list[str]:
    return [outcome.kind for outcome in outcomes]


def upsert(db: Database, **extra: Any) -> dict[str, Any]:
    return {"url": db.url, "table": db.table, "mode": "upsert", "key": "data.id", **extra}


def at(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


# -- through a running gateway ----------------------------------------------------------------------------


def users_route(*actions: dict[str, Any]) -> dict[str, Any]:
    return {"name": "users", "source": "consignease", "events": ["user.*"], "actions": list(actions)}


def event_detail(gw: RunningGateway, event_id: str) -> EventDetail:
    future = asyncio.run_coroutine_threadsafe(gw.gateway.storage.get_event(event_id), gw.loop)
    [detail] = future.result(10)
    return detail


def delivery_states(gw: RunningGateway, event_id: str) -> dict[str, str]:
    return {d.action: d.state for d in event_detail(gw, event_id).deliveries}


def attempts_of(gw: RunningGateway, event_id: str, action: str) -> list[Any]:
    detail = event_detail(gw, event_id)
    [delivery] = [d for d in detail.deliveries if d.action == action]
    return detail.attempts.get(delivery.id, [])


def replay(gw: RunningGateway, event_id: str) -> None:
    seq = event_detail(gw, event_id).seq
    storage = gw.gateway.storage
    asyncio.run_coroutine_threadsafe(storage.replay_event(seq, now=time.time()), gw.loop).result(10)
    gw.loop.call_soon_threadsafe(gw.gateway.engine.wake)


def post_user_event(
    gw: RunningGateway, msg_id: str, event_type: str, data: dict[str, Any], seconds_ago: float = 0
) -> None:
    timestamp = datetime.fromtimestamp(time.time() - seconds_ago, UTC)
    body, headers = svix_request(event_type, data, msg_id=msg_id, timestamp=timestamp)
    assert gw.post("/webhooks/consignease", body, headers).status_code == 200


# -- append -------------------------------------------------------------------------------------------------


def test_append_stores_each_event_once_however_often_it_is_delivered(tmp_path: Path, db: Database) -> None:
    action = {"id": "db", "use": "store", "with": {"url": db.url, "table": db.table}}
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(action)])) as gw:
        post_user_event(gw, "msg_store", "user.created", {"id": "user_1", "first_name": "Ada"})
        wait_until(lambda: delivery_states(gw, "msg_store") == {"db": "delivered"})
        # The provider sends it again, and an operator replays it: still one row.
        post_user_event(gw, "msg_store", "user.created", {"id": "user_1", "first_name": "Ada"})
        replay(gw, "msg_store")
        wait_until(
            lambda: (
                len(attempts_of(gw, "msg_store", "db")) == 2
                and delivery_states(gw, "msg_store") == {"db": "delivered"}
            )
        )
    [row] = db.events()
    assert (row["source"], row["event_id"], row["type"]) == ("consignease", "msg_store", "user.created")
    assert row["payload"]["data"] == {"id": "user_1", "first_name": "Ada"}
    assert row["headers"]["svix-id"] == "msg_store"
    assert abs((row["received_at"] - row["occurred_at"]).total_seconds()) < 5
    if db.kind == "postgresql":
        # JSONB, so the payload is queryable in SQL.
        [found] = db.fetch(
            f"SELECT jsonb_typeof(payload) AS kind, payload->'data'->>'first_name' AS name "
            f"FROM \"{db.table}\" WHERE payload->'data'->>'id' = 'user_1'"
        )
        assert found == {"kind": "object", "name": "Ada"}
    else:
        [found] = db.fetch(f"SELECT json_extract(payload, '$.data.first_name') AS name FROM \"{db.table}\"")
        assert found == {"name": "Ada"}


def test_append_delivered_twice_is_one_row_and_keeps_a_missing_occurred_at(db: Database) -> None:
    first, second = make_event("evt_1"), make_event("evt_2", occurred_at=T0)
    outcomes = deliver({"url": db.url, "table": db.table}, first, first, second)
    assert kinds(outcomes) == ["delivered"] * 3
    rows = db.events()
    assert [row["event_id"] for row in rows] == ["evt_1", "evt_2"]
    assert rows[0]["occurred_at"] is None
    assert rows[1]["occurred_at"] == at(T0)


# -- upsert -------------------------------------------------------------------------------------------------


def test_upsert_keeps_the_latest_data_and_ignores_older_events(db: Database) -> None:
    outcomes = deliver(
        upsert(db),
        make_event("e1", "user.created", {"id": "user_1", "name": "Ada"}, occurred_at=T0),
        make_event("e3", "user.updated", {"id": "user_1", "name": "Grace"}, occurred_at=T0 + 20),
        # Arrives last, happened in between: must not overwrite Grace.
        make_event("e2", "user.updated", {"id": "user_1", "name": "Late"}, occurred_at=T0 + 10),
        make_event("e4", "user.created", {"id": 42, "name": "Numeric"}, occurred_at=T0),
    )
    assert kinds(outcomes) == ["delivered"] * 4
    rows = db.rows()
    assert set(rows) == {"user_1", "42"}
    row = rows["user_1"]
    assert row["data"] == {"id": "user_1", "name": "Grace"}
    assert (row["event_id"], row["type"], row["source"]) == ("e3", "user.updated", "consignease")
    assert row["occurred_at"] == at(T0 + 20)
    assert row["updated_at"] >= row["occurred_at"]


@pytest.mark.parametrize("delivered_first", ["earlier", "later"])
def test_on_an_occurred_at_tie_the_event_received_later_wins_whatever_the_delivery_order(
    db: Database, delivered_first: str
) -> None:
    # Providers that give times to the second make ties likely: two changes to one object in a second.
    # The later write won, so a retry of the first event, delivered after the second, put back stale data.
    earlier = make_event("e1", data={"id": "user_1", "name": "Ada"}, occurred_at=T0, received_at=T0 + 1)
    later = make_event("e2", data={"id": "user_1", "name": "Grace"}, occurred_at=T0, received_at=T0 + 2)
    order = (earlier, later) if delivered_first == "earlier" else (later, earlier)
    assert kinds(deliver(upsert(db), *order)) == ["delivered", "delivered"]
    row = db.rows()["user_1"]
    assert (row["data"]["name"], row["event_id"]) == ("Grace", "e2")
    assert row["received_at"] == at(T0 + 2)


def test_a_copy_of_the_stored_event_is_written_again(db: Database) -> None:
    event = make_event("e1", data={"id": "user_1", "name": "Ada"}, occurred_at=T0, received_at=T0 + 1)
    states: list[datetime] = []
    outcomes = deliver(
        upsert(db), event, event, between=lambda _index: states.append(db.rows()["user_1"]["updated_at"])
    )
    assert kinds(outcomes) == ["delivered", "delivered"]
    assert states[1] >= states[0]
    assert db.rows()["user_1"]["event_id"] == "e1"


def test_a_table_from_before_received_at_gets_the_column_and_its_rows_lose_a_tie(db: Database) -> None:
    # Tables created before received_at broke ties: setup adds the column (PostgreSQL checked only that
    # the tables and the index exist, and ran no DDL), and a row without it loses a tie to any event.
    ts, json_type = ("timestamptz", "jsonb") if db.kind == "postgresql" else ("text", "text")
    db.execute(
        f'CREATE TABLE "{db.table}" ("key" text PRIMARY KEY, data {json_type} NOT NULL, source text NOT NULL, '
        f"event_id text NOT NULL, type text NOT NULL, occurred_at {ts} NOT NULL, updated_at {ts} NOT NULL)"
    )
    db.execute(f'CREATE INDEX "{db.table}_updated_idx" ON "{db.table}" (updated_at)')
    db.execute(
        f'CREATE TABLE "{db.table}_tombstones" ("key" text PRIMARY KEY, occurred_at {ts} NOT NULL, '
        f"source text NOT NULL, event_id text NOT NULL, deleted_at {ts} NOT NULL)"
    )
    old = at(T0).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # the store's SQLite form, which PostgreSQL reads too
    db.execute(
        f"INSERT INTO \"{db.table}\" VALUES ('user_1', '{{\"name\": \"Old\"}}', 'consignease', 'e0', "
        f"'user.updated', '{old}', '{old}')"
    )
    earlier = make_event("e1", data={"id": "user_1", "name": "Ada"}, occurred_at=T0, received_at=T0 + 1)
    later = make_event("e2", data={"id": "user_1", "name": "Grace"}, occurred_at=T0, received_at=T0 + 2)
    assert kinds(deliver(upsert(db), later, earlier)) == ["delivered", "delivered"]
    row = db.rows()["user_1"]
    assert (row["data"]["name"], row["event_id"]) == ("Grace", "e2")


def test_delete_on_removes_the_row_and_older_updates_do_not_bring_it_back(db: Database) -> None:
    states: list[set[str]] = []
    outcomes = deliver(
        upsert(db, delete_on=["user.deleted"]),
        make_event("e1", "user.created", {"id": "user_1", "name": "Ada"}, occurred_at=T0),
        make_event("e3", "user.deleted", {"id": "user_1"}, occurred_at=T0 + 20),
        # Happened before the delete, arrives after it.
        make_event("e2", "user.updated", {"id": "user_1", "name": "Zombie"}, occurred_at=T0 + 10),
        # The user comes back after the delete.
        make_event("e4", "user.updated", {"id": "user_1", "name": "Back"}, occurred_at=T0 + 30),
        # A delete older than the row, arriving late, leaves the row.
        make_event("e5", "user.deleted", {"id": "user_1"}, occurred_at=T0 + 25),
        between=lambda _index: states.append(set(db.rows())),
    )
    assert kinds(outcomes) == ["delivered"] * 5
    assert states == [{"user_1"}, set(), set(), {"user_1"}, {"user_1"}]
    row = db.rows()["user_1"]
    assert (row["data"]["name"], row["event_id"]) == ("Back", "e4")


def test_delete_arriving_before_the_create_keeps_the_key_deleted(db: Database) -> None:
    outcomes = deliver(
        upsert(db, delete_on=["*.deleted"]),
        make_event("e2", "user.deleted", {"id": "user_1"}, occurred_at=T0 + 10),
        make_event("e1", "user.created", {"id": "user_1", "name": "Ada"}, occurred_at=T0),
    )
    assert kinds(outcomes) == ["delivered", "delivered"]
    assert db.rows() == {}
    assert db.tombstones() == {"user_1": at(T0 + 10)}


def test_upsert_through_the_gateway_converges_whatever_the_delivery_order(
    tmp_path: Path, db: Database
) -> None:
    action = {"id": "db", "use": "store", "with": upsert(db, delete_on=["user.deleted"])}
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(action)])) as gw:
        # Sent out of order and delivered concurrently; occurred_at (the svix timestamp) decides.
        post_user_event(gw, "m2", "user.updated", {"id": "u1", "name": "Grace"}, seconds_ago=20)
        post_user_event(gw, "m3", "user.deleted", {"id": "u1"}, seconds_ago=10)
        post_user_event(gw, "m1", "user.created", {"id": "u1", "name": "Ada"}, seconds_ago=30)
        post_user_event(gw, "m9", "user.created", {"id": "u2", "name": "Alan"}, seconds_ago=30)
        wait_until(
            lambda: all(delivery_states(gw, m) == {"db": "delivered"} for m in ("m1", "m2", "m3", "m9"))
        )
        assert set(db.rows()) == {"u2"}
        post_user_event(gw, "m4", "user.updated", {"id": "u1", "name": "Back"}, seconds_ago=5)
        wait_until(lambda: delivery_states(gw, "m4") == {"db": "delivered"})
    rows = db.rows()
    assert {key: row["data"]["name"] for key, row in rows.items()} == {"u1": "Back", "u2": "Alan"}


def test_an_event_without_a_key_is_skipped_with_the_reason(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    action = {"id": "db", "use": "store", "with": {"url": url, "mode": "upsert", "key": "data.id"}}
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(action)])) as gw:
        post_user_event(gw, "m_nokey", "user.updated", {"first_name": "Ada"})
        wait_until(lambda: delivery_states(gw, "m_nokey") == {"db": "skipped"})
        [delivery] = event_detail(gw, "m_nokey").deliveries
        assert delivery.attempts == 1
        assert "data.id has no value" in (delivery.last_error or "")
    # An object is no key either.
    [outcome] = deliver({"url": url, "mode": "upsert", "key": "data.id"}, make_event("e", data={"id": {}}))
    assert outcome.kind == "skipped" and "dict" in (outcome.error or "")


# -- configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"mode": "upsert"}, "key", "required with mode: upsert"),
        ({"key": "data.id"}, "key", "only used with mode: upsert"),
        ({"mode": "upsert", "key": "id."}, "key", "is not an event path"),
        ({"mode": "upsert", "key": "body.id"}, "key", "is not an event path"),
        ({"delete_on": ["user.deleted"]}, "delete_on", "only used with mode: upsert"),
        ({"table": "events; DROP TABLE users"}, "table", "is not a table name"),
        ({"table": "a.b.c"}, "table", "is not a table name"),
        ({"table": "1events"}, "table", "is not a table name"),
        ({"table": "x" * 60}, "table", "too long"),
        ({"table": "analytics.events"}, "table", "SQLite has no schemas"),
        ({"url": "mysql://root:hunter2@db/app"}, "url", "unsupported scheme 'mysql'"),
        ({"url": "sqlite://relative.db"}, "url", "names no file: sqlite:///relative/path.db"),
        ({"url": "sqlite:///./var/"}, "url", "names no file: sqlite:///relative/path.db"),
        ({"url": "sqlite:///./var/.."}, "url", "names no file: sqlite:///relative/path.db"),
        ({"url": "postgresql://db:port/app"}, "url", "not a valid PostgreSQL URL"),
        ({"url": "sqlite:///./st\tore.db"}, "url", "a tab ('\\t') at character 15"),
        ({"url": "postgresql://root:hunter2@db/app\n"}, "url", "begins or ends with whitespace"),
        ({"transaction_pooling": True}, "transaction_pooling", "only for a PostgreSQL url"),
        (
            {"url": "postgresql://root:hunter2@db/app", "transaction_pooling": 1},
            "transaction_pooling",
            "the number 1, not a boolean: write true or false",
        ),
        ({"mode": "merge"}, "mode", "'append' or 'upsert'"),
        ({"url": None}, "url", "field required"),
    ],
)
def test_config_errors_name_the_field(
    tmp_path: Path, options: dict[str, Any], field: str, message: str
) -> None:
    settings = {"url": "sqlite:///./store.db", **options}
    if settings["url"] is None:
        del settings["url"]
    action = {"id": "db", "use": "store", "with": settings}
    config = parse_config(yaml.safe_dump(gateway_config(tmp_path, routes=[users_route(action)])))
    with pytest.raises(ConfigError) as raised:
        RouteTable.build(config, registry())
    [error] = raised.value.errors
    assert error.startswith(f"routes[0].actions[0].with.{field}: ")
    assert message in error
    assert "hunter2" not in error  # a URL's password never reaches a log


def test_a_sqlite_url_s_scheme_is_read_in_any_case(tmp_path: Path) -> None:
    # As a postgresql:// one's is: SQLITE:///x.db was refused with "sqlite needs a file path".
    [outcome] = deliver({"url": f"SQLITE:///{tmp_path}/store.db"}, make_event("e1"))
    assert outcome.kind == "delivered"
    rows = SQLiteDatabase(tmp_path / "store.db", "hookyard_events").fetch(
        "SELECT event_id FROM hookyard_events"
    )
    assert rows == [{"event_id": "e1"}]


def test_valid_options_load(tmp_path: Path) -> None:
    actions = [
        {"id": "log", "use": "store", "with": {"url": "postgres://u:p@db:5432/app", "table": "audit.events"}},
        # As a ${VAR} expands: text.
        {
            "id": "pooled",
            "use": "store",
            "with": {"url": "postgres://u@pgbouncer/app", "transaction_pooling": "true"},
        },
        {
            "id": "sync",
            "use": "store",
            "with": {
                "url": "sqlite:///./var/app.db",
                "table": "Users",
                "mode": "upsert",
                "key": "headers.x-user-id",
                "delete_on": ["user.deleted"],
            },
        },
    ]
    config = parse_config(yaml.safe_dump(gateway_config(tmp_path, routes=[users_route(*actions)])))
    table = RouteTable.build(config, registry())
    assert table.actions[("users", "log")].options.model_dump()["mode"] == "append"
    assert table.actions[("users", "log")].options.model_dump()["transaction_pooling"] is None  # found out
    assert table.actions[("users", "pooled")].options.model_dump()["transaction_pooling"] is True


# -- failures ------------------------------------------------------------------------------------------------


def test_a_table_of_the_wrong_shape_is_dead_not_retried(db: Database) -> None:
    # Made by hand without the headers column: no later attempt can succeed.
    db.execute(
        f'CREATE TABLE "{db.table}" (source text, event_id text, type text, occurred_at text, '
        "received_at text, payload text, PRIMARY KEY (source, event_id))"
    )
    [outcome] = deliver({"url": db.url, "table": db.table}, make_event("e1"))
    assert outcome.kind == "dead"
    assert "headers" in (outcome.error or "")


@pytest.mark.parametrize("mode", ["append", "upsert"])
@pytest.mark.parametrize("fault", ["no primary key", "a column missing"])
def test_a_hand_made_table_of_the_wrong_shape_says_what_to_do(db: Database, mode: str, fault: str) -> None:
    # The database's own words ("there is no unique or exclusion constraint matching the ON CONFLICT
    # specification") left the operator to work out that the table lacked the store's primary key.
    ts, js = ("timestamptz", "jsonb") if db.kind == "postgresql" else ("text", "text")
    if mode == "append":
        columns = f"source text, event_id text, type text, occurred_at {ts}, received_at {ts}, payload {js}"
        columns += f", headers {js}" if fault == "no primary key" else ""
        key = ", PRIMARY KEY (source, event_id)" if fault == "a column missing" else ""
    else:
        columns = f'"key" text, source text, event_id text, type text, occurred_at {ts}, updated_at {ts}'
        columns += f", received_at {ts}, data {js}" if fault == "no primary key" else ""
        key = ', PRIMARY KEY ("key")' if fault == "a column missing" else ""
    db.execute(f'CREATE TABLE "{db.table}" ({columns}{key})')
    if mode == "upsert":
        db.execute(f'CREATE INDEX "{db.table}_updated_idx" ON "{db.table}" (updated_at)')
    options = {"url": db.url, "table": db.table} if mode == "append" else upsert(db)
    [outcome] = deliver(options, make_event("e1"))
    assert outcome.kind == "dead", outcome
    error = outcome.error or ""
    expected = "PRIMARY KEY (source, event_id)" if mode == "append" else 'PRIMARY KEY ("key")'
    assert f"{db.table} is not of the shape the store writes" in error, error
    assert expected in error and "docs/configuration.md" in error and "replay" in error, error


def test_a_constraint_violation_is_dead_and_its_error_does_not_copy_the_row(db: Database) -> None:
    # PostgreSQL's DETAIL for a violated constraint is the failing row: the start of each of its values, the
    # event's payload and headers among them, went into the attempt record and the log.
    ts, js = ("timestamptz", "jsonb") if db.kind == "postgresql" else ("text", "text")
    db.execute(
        f'CREATE TABLE "{db.table}" (source text NOT NULL, event_id text NOT NULL, type text NOT NULL, '
        f"occurred_at {ts}, received_at {ts} NOT NULL, payload {js} NOT NULL, headers {js} NOT NULL, "
        "PRIMARY KEY (source, event_id), CONSTRAINT no_updates CHECK (type <> 'user.updated'))"
    )
    event = make_event("e1", "user.updated", {"id": "user_1", "email": "ada@example.com"})
    [outcome] = deliver({"url": db.url, "table": db.table}, event)
    assert outcome.kind == "dead"
    assert "no_updates" in (outcome.error or "")
    assert "ada@example.com" not in (outcome.error or ""), outcome.error


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_a_value_too_long_for_postgresql_s_index_is_dead_not_retried(db: Database, mode: str) -> None:
    # A btree index entry holds at most 2704 bytes: a longer key, event id or type (4000 random characters,
    # which compression cannot shrink) is refused with 54000 program_limit_exceeded, as it will be on every
    # attempt. It was retried for the whole schedule. SQLite has no such limit and stores it.
    long = "".join(uuid.uuid4().hex for _ in range(125))
    if mode == "append":
        options: dict[str, Any] = {"url": db.url, "table": db.table}
        events = [make_event(long), make_event("e2", f"user.{long}"), make_event("e3")]
    else:
        options = upsert(db)
        events = [make_event("e1", data={"id": long}), make_event("e2", data={"id": "user_2"})]
    outcomes = deliver(options, *events)
    if db.kind == "sqlite":
        assert kinds(outcomes) == ["delivered"] * len(events)
        return
    assert kinds(outcomes) == ["dead"] * (len(events) - 1) + ["delivered"]
    for outcome in outcomes[:-1]:
        assert "exceeds btree" in (outcome.error or ""), outcome.error
        assert long[:100] not in (outcome.error or "")


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_a_payload_nested_past_what_json_dumps_can_write_is_dead_not_raised(db: Database, mode: str) -> None:
    # The gateway reads JSON nested up to 1024 levels (orjson's limit); json.dumps stops near Python's
    # recursion limit (1000, less the frames already on the stack). Its RecursionError escaped the action:
    # the engine logged a traceback and retried the delivery for the whole schedule, to no avail.
    nested = b"[" * 1010 + b"]" * 1010
    body = b'{"type":"user.updated","data":{"id":"user_1","deep":' + nested + b"}}"
    deep = Event(
        source="consignease",
        id="e1",
        type="user.updated",
        received_at=time.time(),
        body=body,
        payload=orjson.loads(body),
        headers={"content-type": "application/json"},
    )
    options = upsert(db) if mode == "upsert" else {"url": db.url, "table": db.table}
    first, second = deliver(options, deep, make_event("e2", data={"id": "user_2"}))
    assert first.kind == "dead", first
    assert "nested too deeply" in (first.error or ""), first.error
    assert second.kind == "delivered"


def test_a_payload_nested_past_what_orjson_writes_is_stored_whole(db: Database) -> None:
    # The payload is written by orjson, which stops at 255 levels: one nested deeper (the gateway reads up
    # to 1024) is written by json instead, as it was before.
    nested: Any = "bottom"
    for _ in range(300):
        nested = [nested]
    event = make_event("e1", data={"id": "user_1", "deep": nested})
    [outcome] = deliver({"url": db.url, "table": db.table}, event)
    assert outcome.kind == "delivered", outcome
    [row] = db.events()
    assert row["payload"] == event.payload


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_a_nul_character_in_a_webhook_is_accepted_and_only_a_postgresql_store_of_it_is_dead(
    tmp_path: Path, db: Database, downstream: Downstream, mode: str
) -> None:
    # orjson reads "\u0000" in a body, and SQLite keeps it; jsonb and PostgreSQL's text cannot hold it. The
    # webhook is still answered 200 and kept: the store's delivery of it ends dead with the reason (never
    # delivered with no row, never retried for nothing), and its other actions and later events go on.
    options: dict[str, Any] = {"url": db.url, "table": db.table}
    if mode == "upsert":
        options.update(mode="upsert", key="data.id")
    store = {"id": "db", "use": "store", "with": options}
    app = {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}}
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(store, app)])) as gw:
        post_user_event(gw, "msg_nul", "user.created", {"id": "u1", "name": "Ada\x00Lovelace"})
        post_user_event(gw, "msg_after", "user.created", {"id": "u2", "name": "Grace"})
        wait_until(lambda: delivery_states(gw, "msg_after") == {"db": "delivered", "app": "delivered"})
        wait_until(lambda: "pending" not in delivery_states(gw, "msg_nul").values())
        states, attempts = delivery_states(gw, "msg_nul"), attempts_of(gw, "msg_nul", "db")
    if db.kind == "sqlite":
        assert states == {"db": "delivered", "app": "delivered"}
        names = (
            [row["payload"]["data"]["name"] for row in db.events()]
            if mode == "append"
            else [row["data"]["name"] for row in db.rows().values()]
        )
        assert sorted(names) == ["Ada\x00Lovelace", "Grace"]
    else:
        assert states == {"db": "dead", "app": "delivered"}
        [attempt] = attempts
        assert "\\u0000" in (attempt.error or ""), attempt.error
        stored_ids = [r["event_id"] for r in db.events()] if mode == "append" else sorted(db.rows())
        assert stored_ids == (["msg_after"] if mode == "append" else ["u2"])


# Two integers past 64 bits that orjson reads as one and the same float, 1.2345678901234568e+29.
BIG, BIG_NEXT = 123456789012345678901234567890, 123456789012345678901234567891


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_integers_past_64_bits_are_stored_with_all_their_digits(
    tmp_path: Path, db: Database, mode: str
) -> None:
    # The gateway parses bodies with orjson, which reads such an integer as a float: stored from that, the
    # amount lost its last digits, and two upsert keys became one row.
    options: dict[str, Any] = {"url": db.url, "table": db.table}
    if mode == "upsert":
        options.update(mode="upsert", key="data.id")
    store = {"id": "db", "use": "store", "with": options}
    with RunningGateway(gateway_config(tmp_path, routes=[users_route(store)])) as gw:
        post_user_event(gw, "msg_a", "user.created", {"id": BIG, "amount": BIG, "ratio": 0.5})
        post_user_event(gw, "msg_b", "user.created", {"id": BIG_NEXT, "amount": -BIG_NEXT})
        wait_until(lambda: all(delivery_states(gw, m) == {"db": "delivered"} for m in ("msg_a", "msg_b")))
    if mode == "append":
        stored = {row["event_id"]: row["payload"]["data"] for row in db.events()}
    else:
        stored = {row["event_id"]: (key, row["data"]) for key, row in db.rows().items()}
        assert stored == {
            "msg_a": (str(BIG), {"id": BIG, "amount": BIG, "ratio": 0.5}),
            "msg_b": (str(BIG_NEXT), {"id": BIG_NEXT, "amount": -BIG_NEXT}),
        }
        stored = {event_id: data for event_id, (_, data) in stored.items()}
    assert stored == {
        "msg_a": {"id": BIG, "amount": BIG, "ratio": 0.5},
        "msg_b": {"id": BIG_NEXT, "amount": -BIG_NEXT},
    }
    if db.kind == "postgresql":
        # Numbers in SQL too: jsonb's numeric holds every digit.
        column, path = ("payload", "payload->'data'") if mode == "append" else ("data", "data")
        found = db.fetch(f"SELECT ({path}->>'amount')::numeric AS amount FROM \"{db.table}\" ORDER BY 1")
        assert found == [{"amount": -BIG_NEXT}, {"amount": BIG}], column


def test_a_column_of_the_wrong_type_is_dead(postgres_url: str) -> None:
    database = PostgresDatabase(postgres_url, f"hookyard_test_{uuid.uuid4().hex[:12]}")
    database.execute(
        f'CREATE TABLE "{database.table}" ("key" text PRIMARY KEY, data integer NOT NULL, source text, '
        "event_id text, type text, occurred_at timestamptz, updated_at timestamptz)"
    )
    try:
        options = {"url": postgres_url, "table": database.table, "mode": "upsert", "key": "data.id"}
        [outcome] = deliver(options, make_event("e1"))
    finally:
        database.drop()
    assert outcome.kind == "dead"
    assert "DatatypeMismatchError" in (outcome.error or "")


def test_a_table_dropped_while_running_is_created_again(db: Database) -> None:
    outcomes = deliver(
        {"url": db.url, "table": db.table},
        make_event("e1"),
        make_event("e2"),
        make_event("e2"),
        between=lambda index: db.drop() if index == 0 else None,
    )
    assert kinds(outcomes) == ["delivered", "retry", "delivered"]
    assert "missing" in (outcomes[1].error or "")
    assert [row["event_id"] for row in db.events()] == ["e2"]


def test_a_connection_the_server_ends_mid_write_is_retried_on_a_new_one(
    tmp_path: Path, pg: PostgresDatabase
) -> None:
    options = {"url": pg.action_url, "table": pg.table, "mode": "upsert", "key": "data.id"}
    with RunningGateway(
        gateway_config(tmp_path, routes=[users_route({"id": "db", "use": "store", "with": options})])
    ) as gw:
        post_user_event(gw, "m1", "user.created", {"id": "u1"})
        wait_until(lambda: delivery_states(gw, "m1") == {"db": "delivered"})
        # m2's write waits for another session's lock, inside its transaction, when the server ends the
        # action's sessions.
        with holding(pg.url, f'LOCK TABLE "{pg.table}" IN ACCESS EXCLUSIVE MODE'):
            post_user_event(gw, "m2", "user.created", {"id": "u2"})
            wait_until(lambda: pg.action_sessions("wait_event_type = 'Lock'") == 1)
            pg.end_action_sessions()
            wait_until(lambda: attempts_of(gw, "m2", "db"))
        wait_until(lambda: delivery_states(gw, "m2") == {"db": "delivered"})
        first, *_, last = attempts_of(gw, "m2", "db")
    # The cause, not asyncpg's "cannot call Transaction.__aexit__(): the underlying connection is closed".
    assert first.outcome == "retry" and "administrator command" in (first.error or ""), first.error
    assert last.outcome == "delivered"
    assert set(pg.rows()) == {"u1", "u2"}


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_a_pooled_connection_the_server_ended_while_idle_is_replaced_with_a_clear_error(
    pg: PostgresDatabase, mode: str
) -> None:
    # The server ends the action's idle sessions (a restart, a failover). asyncpg reads the server's last
    # message, and until it notices the connection is gone it refuses every statement with its own
    # "cannot switch to state 12; another operation (2) is in progress": that was the attempt's error. How
    # often an attempt comes in between depends on the loop's timing, so the test tries many times.
    options: dict[str, Any] = {"url": pg.action_url, "table": pg.table, "mode": mode}
    if mode == "upsert":
        options["key"] = "data.id"

    async def end_sessions(admin: asyncpg.Connection) -> None:
        # The server only signals them, and a session the pool was opening meanwhile can miss the signal:
        # one that ended after the last attempt below had taken it from the pool would fail that attempt too.
        async with asyncio.timeout(10):
            while await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                f"WHERE application_name = '{pg.table}'"
            ):
                await asyncio.sleep(0.001)

    async def run() -> list[Outcome]:
        outcomes = []
        admin = await asyncpg.connect(pg.url)
        try:
            async with store_action(options) as action:
                assert (await action.deliver(job(make_event("e0")))).kind == "delivered"
                for number in range(1, 121):
                    await end_sessions(admin)
                    await asyncio.sleep((number % 4) * 0.0005)
                    event = make_event(f"e{number}", data={"id": f"user_{number}"})
                    outcomes.append(await action.deliver(job(event)))
                # Each broken connection was closed, not given back: one more attempt goes through.
                last = make_event("e_last", data={"id": "user_last"})
                outcomes.append(await action.deliver(job(last)))
        finally:
            await admin.close()
        return outcomes

    *outcomes, last = asyncio.run(run())
    assert last.kind == "delivered", last.error
    for outcome in outcomes:
        error = outcome.error or ""
        assert outcome.kind in ("delivered", "retry") and "InternalClientError" not in error, error
        if "cannot switch to state" in error:
            assert "StaleConnection: the connection taken from the pool was no longer usable" in error
    assert pg.action_sessions() <= POOL_SIZE


def test_a_read_only_server_after_a_failover_makes_the_pool_connect_afresh(pg: PostgresDatabase) -> None:
    options = {"url": pg.url, "table": pg.table, "mode": "upsert", "key": "data.id"}
    assert kinds(deliver(options, make_event("e0", data={"id": "u0"}))) == ["delivered"]  # the tables
    with pg.login_role() as (role, url):
        options["url"] = url
        # The old primary, which a failover left read-only: the pool's connections are opened while the
        # role's sessions start read-only, and kept while the role's new sessions start writable again
        # (the writer endpoint's name now leads to the new primary).
        pg.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")

        async def delivery(action: Action, number: int, timeout: float = 5) -> Outcome:
            return await action.deliver(job(make_event(f"e{number}", data={"id": f"u{number}"}), timeout))

        async def run() -> tuple[list[Outcome], Outcome, list[Outcome]]:
            async with store_action(options) as action:
                # Five connections to the old primary, idle in the pool: five deliveries held by another
                # session's lock until their timeout, so that none of them is refused yet. The timeout counts
                # their connecting too: 3 s, in which a busy machine opens all five (not always in 0.5 s).
                blocker = await asyncpg.connect(pg.url)
                try:
                    await blocker.execute(f'BEGIN; LOCK TABLE "{pg.table}" IN ACCESS EXCLUSIVE MODE')
                    held = await asyncio.gather(*(delivery(action, n, 3) for n in range(1, 6)))
                finally:
                    await blocker.close()
                assert await asyncio.to_thread(pg.action_sessions) == 5
                await asyncio.to_thread(pg.execute, f"ALTER ROLE {role} RESET default_transaction_read_only")
                refused = await delivery(action, 1)
                # The engine's next attempts, as many at once as the pool held stale connections: every
                # one of them used to be refused again, for as long as those connections lived.
                after = await asyncio.gather(*(delivery(action, n) for n in range(1, 6)))
            return held, refused, after

        held, refused, after = asyncio.run(run())
    assert kinds(held) == ["retry"] * 5 and all("timed out" in (o.error or "") for o in held), held
    assert refused.kind == "retry"
    assert "read-only server" in (refused.error or ""), refused.error
    assert "in a read-only transaction" in (refused.error or ""), refused.error
    assert kinds(after) == ["delivered"] * 5, after
    assert set(pg.rows()) == {f"u{n}" for n in range(6)}


def test_deliveries_beyond_the_pool_end_by_their_timeout_and_say_what_they_waited_for(
    pg: PostgresDatabase,
) -> None:
    options = {"url": pg.action_url, "table": pg.table, "mode": "upsert", "key": "data.id"}

    async def timed(
        action: Action, number: int, timeout: float = 2, delay: float = 0
    ) -> tuple[Outcome, float]:
        await asyncio.sleep(delay)
        started = time.monotonic()
        outcome = await action.deliver(job(make_event(f"e{number}", data={"id": f"u{number}"}), timeout))
        return outcome, time.monotonic() - started

    async def run() -> tuple[list[tuple[Outcome, float]], list[Outcome]]:
        async with store_action(options) as action:
            assert (await timed(action, 0, timeout=5))[0].kind == "delivered"
            # Another session holds the table. The pool's 10 connections wait for it, an 11th delivery (with
            # a shorter timeout) for one of them, and a 12th, later, gets one when the first ten give up. Each
            # step had the whole timeout: the 12th waited for the pool, then for the lock, past its deadline.
            blocker = await asyncpg.connect(pg.url)
            try:
                await blocker.execute(f'BEGIN; LOCK TABLE "{pg.table}" IN ACCESS EXCLUSIVE MODE')
                blocked = await asyncio.gather(
                    *(timed(action, number) for number in range(1, 11)),
                    timed(action, 11, timeout=0.3),
                    timed(action, 12, delay=0.1),
                )
            finally:
                await blocker.close()
            # The pool is fine afterwards: a burst three times its size is written.
            burst = await asyncio.gather(*(timed(action, number, timeout=5) for number in range(20, 50)))
        return blocked, [outcome for outcome, _ in burst]

    blocked, burst = asyncio.run(run())
    assert kinds([outcome for outcome, _ in blocked]) == ["retry"] * 12
    errors = [outcome.error or "" for outcome, _ in blocked]
    assert all("waiting for the database (a lock held by another session" in e for e in errors[:10]), errors
    assert "waiting for a free connection: all 10 of the pool are in use" in errors[10], errors
    assert "waiting for the database" in errors[11], errors
    # Each delivery ends by its own deadline. Had each step its whole timeout, the 12th would take 3.9 s (1.9 s
    # for the pool, then 2 s for the lock); 1 s of slack is for a busy test machine's scheduling, not the
    # action's lateness.
    assert max(duration for _, duration in blocked) < 2 + 1, blocked
    assert kinds(burst) == ["delivered"] * 30
    assert len(pg.rows()) == 31
    assert pg.action_sessions("state = 'idle in transaction'") == 0


@contextmanager
def upserts_via_proxy(pg: PostgresDatabase) -> Iterator[tuple[TcpProxy, dict[str, Any]]]:
    """A proxy to the test server, to pause its answers, and the options of an upsert action through it."""
    parts = urlsplit(pg.url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        yield proxy, {"url": pg.action_url_via(proxy), "table": pg.table, "mode": "upsert", "key": "data.id"}


async def attempt_left_to_roll_back(
    pg: PostgresDatabase, proxy: TcpProxy, blocker: asyncpg.Connection, action: Any
) -> tuple[asyncio.Task[Outcome], float]:
    """An attempt (timeout 2 s) whose transaction has begun and whose statement waits for the table's lock,
    which blocker takes; then the server's answers stop (proxy paused), so that its rollback after the
    deadline waits (ROLLBACK_TIMEOUT) until the proxy resumes. The attempt, and the loop's time it began."""
    loop = asyncio.get_running_loop()
    await blocker.execute(f'BEGIN; LOCK TABLE "{pg.table}" IN ACCESS EXCLUSIVE MODE')
    started = loop.time()
    attempt = asyncio.create_task(action.deliver(job(make_event("e1"), 2)))
    for _ in range(100):
        if await asyncio.to_thread(pg.action_sessions, "wait_event_type = 'Lock'"):
            break
        await asyncio.sleep(0.02)
    await asyncio.to_thread(proxy.pause)
    return attempt, started


def test_an_attempt_cancelled_while_it_rolls_back_leaves_no_error_and_a_clean_connection(
    pg: PostgresDatabase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from plugins import store

    monkeypatch.setattr(store, "ROLLBACK_TIMEOUT", 5.0)
    with upserts_via_proxy(pg) as (proxy, options):

        async def run() -> tuple[bool, Outcome]:
            loop = asyncio.get_running_loop()
            async with store_action(options) as action:
                assert (await action.deliver(job(make_event("e0")))).kind == "delivered"
                blocker = await asyncpg.connect(pg.url)
                try:
                    attempt, started = await attempt_left_to_roll_back(pg, proxy, blocker, action)
                    # The engine cancels an attempt past its timeout on a timer of its own: here a second into
                    # the rollback, as the server answers again. asyncpg then left the transaction to the pool,
                    # which logged an error about it.
                    await asyncio.sleep(max(started + 3 - loop.time(), 0))
                    rolling_back = not attempt.done()  # past its deadline, and not ended: in the rollback
                    # Let go, and cancelled in the same turn of the loop: before it reads any of the answers.
                    proxy.resume()
                    attempt.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await attempt
                finally:
                    await asyncio.to_thread(proxy.resume)
                    await blocker.close()
                return rolling_back, await action.deliver(job(make_event("e2", data={"id": "user_2"})))

        rolling_back, after = asyncio.run(run())
    assert rolling_back
    assert after.kind == "delivered"
    assert "Resetting connection" not in caplog.text
    assert pg.action_sessions("state = 'idle in transaction'") == 0


def test_an_attempt_whose_deadline_falls_in_its_begin_is_rolled_back_without_an_error(
    pg: PostgresDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    with upserts_via_proxy(pg) as (proxy, options):

        async def run() -> tuple[Outcome, Outcome]:
            async with store_action(options) as action:
                assert (await action.deliver(job(make_event("e0")))).kind == "delivered"
                # The server's answers stop for a while: the next attempt's BEGIN has none by its deadline.
                # asyncpg's Transaction could then no more be rolled back; it stayed open on the connection
                # until the pool rolled it back, with an error in the log.
                await asyncio.to_thread(proxy.pause)
                attempt = asyncio.create_task(action.deliver(job(make_event("e1"), 0.3)))
                await asyncio.sleep(0.4)
                await asyncio.to_thread(proxy.resume)
                stalled = await attempt
                return stalled, await action.deliver(job(make_event("e2", data={"id": "user_2"})))

        stalled, after = asyncio.run(run())
    assert stalled.kind == "retry" and "timed out waiting for the database" in (stalled.error or "")
    assert after.kind == "delivered"
    assert "Resetting connection" not in caplog.text
    assert set(pg.rows()) == {"user_1", "user_2"}


def test_an_attempt_against_a_server_that_stopped_answering_ends_without_waiting_for_its_rollback(
    pg: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugins import store

    monkeypatch.setattr(store, "ROLLBACK_TIMEOUT", 0.2)
    with upserts_via_proxy(pg) as (proxy, options):

        async def run() -> tuple[bool, Outcome, Outcome]:
            async with store_action(options) as action:
                assert (await action.deliver(job(make_event("e0")))).kind == "delivered"
                # No answer at all, as from a server gone without a reset: the rollback after the deadline
                # gets none either, and used to wait for one until the server answered again.
                await asyncio.to_thread(proxy.pause)
                attempt = asyncio.create_task(action.deliver(job(make_event("e1"), 0.3)))
                done, _ = await asyncio.wait([attempt], timeout=2.0)
                await asyncio.to_thread(proxy.resume)
                stalled = await attempt
                return bool(done), stalled, await action.deliver(job(make_event("e2", data={"id": "user_2"})))

        ended_while_unanswered, stalled, after = asyncio.run(run())
    assert ended_while_unanswered
    assert stalled.kind == "retry" and "timed out waiting for the database" in (stalled.error or "")
    # Its connection was closed rather than given back with a transaction in an unknown state.
    assert after.kind == "delivered"
    assert set(pg.rows()) == {"user_1", "user_2"}


def test_an_attempt_whose_rollback_the_close_cuts_short_leaves_no_transaction_to_the_pool(
    pg: PostgresDatabase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The engine stops, or a reload replaces the action, while an attempt past its deadline is rolling back:
    # the action's close cancels it there. Its connection went back to the pool with the transaction open,
    # and the pool's reset of it logged an error: "Resetting connection with an active transaction" or, on a
    # server that stopped answering as here, a ConnectionError that no one retrieved.
    from plugins import store

    monkeypatch.setattr(store, "ROLLBACK_TIMEOUT", 5.0)
    with upserts_via_proxy(pg) as (proxy, options):

        async def run() -> list[Any]:
            loop = asyncio.get_running_loop()
            blocker = await asyncpg.connect(pg.url)
            try:
                async with store_action(options) as action:
                    assert (await action.deliver(job(make_event("e0")))).kind == "delivered"
                    attempt, started = await attempt_left_to_roll_back(pg, proxy, blocker, action)
                    await asyncio.sleep(max(started + 3 - loop.time(), 0))  # a second into the rollback
                # Closed here, with the rollback under way.
                return await asyncio.gather(attempt, return_exceptions=True)
            finally:
                await asyncio.to_thread(proxy.resume)
                await blocker.close()

        [ended] = asyncio.run(run())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert isinstance(ended, asyncio.CancelledError), ended  # cut short by the close, not timed out
    assert set(pg.rows()) == {"user_1"}


def test_a_url_with_several_hosts_reaches_the_one_that_answers(pg: PostgresDatabase) -> None:
    # libpq's and asyncpg's form for a primary and its standbys (host1:port1,host2:port2). The config
    # refused it ("the host and port cannot be read"), though asyncpg connects to the first that answers.
    parts = urlsplit(pg.action_url)
    user, _, host = parts.netloc.rpartition("@")
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there: asyncpg goes on to the next host
    url = parts._replace(netloc=f"{user}@{nobody},{host}" if user else f"{nobody},{host}").geturl()
    [outcome] = deliver({"url": url, "table": pg.table}, make_event("e1"))
    assert outcome.kind == "delivered", outcome
    assert [row["event_id"] for row in pg.events()] == ["e1"]


@pytest.mark.parametrize("pooling", [True, None], ids=["given", "found-out"])
@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_behind_pgbouncer_in_transaction_mode_every_event_is_written_once(
    pgbouncer_url: str, postgres_url: str, mode: str, pooling: bool | None, caplog: pytest.LogCaptureFixture
) -> None:
    # Two gateways' actions on a table that does not exist yet, each with more deliveries at once than its
    # pool holds, through a PgBouncer that hands its two server connections from client to client at
    # every transaction's end. A statement prepared on one server connection and run on another failed
    # ("prepared statement __asyncpg_stmt_3__ does not exist"), one attempt in two. Without the option
    # given, the store finds out that the URL leads to a pooler.
    caplog.set_level(logging.INFO, logger="hookyard.store")
    pg = PostgresDatabase(postgres_url, f"hookyard_test_{uuid.uuid4().hex[:12]}")
    options: dict[str, Any] = {"url": pgbouncer_url, "table": pg.table, "mode": mode}
    if pooling is not None:
        options["transaction_pooling"] = pooling
    if mode == "upsert":
        options |= {"key": "data.id", "delete_on": ["user.deleted"]}

    def events(gateway: int) -> list[Event]:
        if mode == "append":
            return [make_event(f"g{gateway}-e{number}") for number in range(100)]
        # Per key: three updates (one from each gateway, the third twice), and for every fifth key a
        # delete after them; each gateway sends them in its own order.
        made = []
        for key in range(25):
            data = {"id": f"u{key}", "version": gateway + 1}
            made.append(make_event(f"g{gateway}-u{key}", data=data, occurred_at=T0 + gateway + 1))
            made.append(make_event(f"v3-u{key}", data={"id": f"u{key}", "version": 3}, occurred_at=T0 + 3))
            if key % 5 == 0:
                gone = make_event(f"d-u{key}", "user.deleted", data={"id": f"u{key}"}, occurred_at=T0 + 4)
                made.append(gone)
        return made[::-1] if gateway else made

    async def gateway(number: int) -> list[Outcome]:
        async with store_action(options) as action:
            return await asyncio.gather(*(action.deliver(job(event, timeout=30)) for event in events(number)))

    async def run() -> list[Outcome]:
        first, second = await asyncio.gather(gateway(0), gateway(1))
        return first + second

    try:
        outcomes = asyncio.run(run())
        failed = [outcome.error for outcome in outcomes if outcome.kind != "delivered"]
        assert not failed, failed
        if mode == "append":
            assert sorted(row["event_id"] for row in pg.events()) == sorted(
                f"g{gateway}-e{number}" for gateway in (0, 1) for number in range(100)
            )
        else:
            rows = pg.rows()
            assert {key: row["data"]["version"] for key, row in rows.items()} == {
                f"u{key}": 3 for key in range(25) if key % 5
            }
            assert sorted(pg.tombstones()) == sorted(f"u{key}" for key in range(0, 25, 5))
    finally:
        pg.drop()
    found_out = [r.getMessage() for r in caplog.records if "behind a connection pooler" in r.getMessage()]
    assert len(found_out) == (2 if pooling is None else 0), found_out  # once per action's pool


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_behind_pgbouncer_in_statement_mode_attempts_are_retried_and_say_to_change_the_pool_mode(
    pgbouncer_statement_mode_url: str, postgres_url: str, mode: str
) -> None:
    # PgBouncer refuses the BEGIN of the transactions that create the tables and write upserts, and closes
    # the connection: the error was asyncpg's "connection was closed in the middle of operation", followed by
    # PgBouncer's words, which did not say what to change.
    pg = PostgresDatabase(postgres_url, f"hookyard_test_{uuid.uuid4().hex[:12]}")
    options: dict[str, Any] = {"url": pgbouncer_statement_mode_url, "table": pg.table, "mode": mode}
    if mode == "upsert":
        options["key"] = "data.id"
    try:
        outcomes = deliver(options, make_event("e1"), make_event("e2"))
    finally:
        pg.drop()
    for outcome in outcomes:
        assert outcome.kind == "retry", outcome  # a pool_mode changed meanwhile lets a later attempt through
        error = outcome.error or ""
        assert "transaction blocks not allowed in statement pooling mode" in error, error
        assert "PgBouncer in statement pooling mode (pool_mode = statement)" in error, error
        assert "a pool in transaction mode (with transaction_pooling: true) or session mode" in error, error


def test_a_direct_connection_keeps_its_prepared_statements(pg: PostgresDatabase) -> None:
    # Not behind a pooler: the statements are prepared once per connection and reused, as asyncpg does.
    options = {"url": pg.url, "table": pg.table}

    async def run() -> int:
        async with store_action(options) as action:
            for number in range(3):
                assert (await action.deliver(job(make_event(f"e{number}")))).kind == "delivered"
            backend = action.backend  # type: ignore[attr-defined]
            async with (await backend._get_pool()).acquire() as conn:
                # Kept on its connection, under asyncpg's names: the pool has one connection here.
                return cast(
                    int,
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '__asyncpg_stmt_%'"
                    ),
                )

    assert asyncio.run(run()) >= 1


def deliver_at_once(options: dict[str, Any], count: int) -> list[Outcome]:
    """`count` appends delivered at once through one store action."""

    async def run() -> list[Outcome]:
        async with store_action(options) as action:
            return await asyncio.gather(*(action.deliver(job(make_event(f"e{n}"))) for n in range(count)))

    return asyncio.run(run())


def test_behind_pgbouncer_with_transaction_pooling_off_attempts_are_retried_and_say_to_set_it(
    pgbouncer_url: str, postgres_url: str
) -> None:
    # Each run is a gateway process of its own, as a pod is: asyncpg numbers its prepared statements from 1
    # in each process, so a restarted gateway prepares names that its predecessor left on the pooler's
    # server connections. That was "DuplicatePreparedStatementError: prepared statement
    # "__asyncpg_stmt_1__" already exists", an error in the statement to the action: dead, not retried. And
    # every such error repeated asyncpg's advice to set statement_cache_size, which is no option of the store.
    pg = PostgresDatabase(postgres_url, f"hookyard_test_{uuid.uuid4().hex[:12]}")
    options = json.dumps({"url": pgbouncer_url, "table": pg.table, "transaction_pooling": False})
    script = (
        "import json, sys\n"
        "from tests.test_store import deliver_at_once\n"
        "outcomes = deliver_at_once(json.loads(sys.argv[1]), 60)\n"
        "print(json.dumps([[outcome.kind, outcome.error] for outcome in outcomes]))\n"
    )
    root = Path(__file__).resolve().parent.parent

    def gateway_run() -> list[tuple[str, str | None]]:
        done = subprocess.run(
            [sys.executable, "-c", script, options], cwd=root, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return [(kind, error) for kind, error in json.loads(done.stdout)]

    try:
        outcomes = gateway_run()
        # A duplicate needs names left by an earlier process on the server connection a statement lands on.
        for _ in range(5):
            outcomes += gateway_run()
            if any("DuplicatePreparedStatementError" in (error or "") for _, error in outcomes):
                break
    finally:
        pg.drop()
    errors = [error or "" for kind, error in outcomes if kind != "delivered"]
    assert any("DuplicatePreparedStatementError" in error for error in errors), errors
    assert {kind for kind, _ in outcomes} <= {"delivered", "retry"}, [kind for kind, _ in outcomes]
    for error in errors:
        assert "a pooler in transaction mode" in error and "set transaction_pooling: true" in error, error
        assert "statement_cache_size" not in error, error


def test_a_missing_database_is_retried(postgres_url: str, tmp_path: Path) -> None:
    parts = urlsplit(postgres_url)
    missing = parts._replace(path=f"/hookyard_missing_{uuid.uuid4().hex[:8]}").geturl()
    [outcome] = deliver({"url": missing}, make_event("e1"))
    assert outcome.kind == "retry"
    assert "does not exist" in (outcome.error or "")
    # SQLite: a directory that cannot be created (a file is in the way).
    (tmp_path / "blocked").write_text("")
    [outcome] = deliver({"url": f"sqlite:///{tmp_path}/blocked/store.db"}, make_event("e1"))
    assert outcome.kind == "retry"
    assert "cannot connect" in (outcome.error or "")


def test_postgres_outage_retries_only_the_store_and_recovers(
    tmp_path: Path, postgres_url: str, downstream: Downstream
) -> None:
    parts = urlsplit(postgres_url)
    table = f"hookyard_test_{uuid.uuid4().hex[:12]}"
    database = PostgresDatabase(postgres_url, table)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        user = parts.netloc.rpartition("@")[0]
        through_proxy = parts._replace(
            netloc=f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"
        )
        store = {
            "id": "db",
            "use": "store",
            "timeout": "2s",
            # Fast and long enough to outlast the outage.
            "retry": {"schedule": ["100ms"] * 100, "jitter": 0},
            "with": {"url": through_proxy.geturl(), "table": table},
        }
        app = {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}}
        try:
            # Down from the start: the gateway starts anyway.
            proxy.cut()
            with RunningGateway(gateway_config(tmp_path, routes=[users_route(store, app)])) as gw:
                errors = ride_out_outage(gw, proxy, downstream, "msg_down_at_start")
                assert all("cannot connect" in error for error in errors), errors
                # Drops the pool's open connection: the pool must connect again once the network is back.
                proxy.cut()
                errors = ride_out_outage(gw, proxy, downstream, "msg_lost")
            assert [row["event_id"] for row in database.events()] == ["msg_down_at_start", "msg_lost"]
        finally:
            database.drop()


def ride_out_outage(gw: RunningGateway, proxy: TcpProxy, downstream: Downstream, msg_id: str) -> list[str]:
    """Send an event while the proxy is cut, check it is retried, restore; the attempts' errors."""
    with downstream.lock:
        downstream.requests.clear()
    post_user_event(gw, msg_id, "user.created", {"id": msg_id})
    # The other action of the same event is not held up.
    downstream.wait_for(1, "/app")
    wait_until(lambda: len(attempts_of(gw, msg_id, "db")) >= 2)
    assert delivery_states(gw, msg_id) == {"db": "pending", "app": "delivered"}
    failed = attempts_of(gw, msg_id, "db")
    assert all(a.outcome == "retry" and f"127.0.0.1:{proxy.port}" in (a.error or "") for a in failed)
    proxy.restore()
    wait_until(lambda: delivery_states(gw, msg_id)["db"] == "delivered")
    assert attempts_of(gw, msg_id, "db")[-1].outcome == "delivered"
    return [a.error or "" for a in failed]


def test_a_postgres_password_with_a_slash_never_reaches_the_config_error(tmp_path: Path) -> None:
    # Generated passwords (base64) often hold a "/": unencoded, urlsplit ends the netloc there and reads the
    # password's first part as the port. The error must not quote it.
    action = {"id": "db", "use": "store", "with": {"url": "postgresql://app:Xy9/Secr3t@db.internal:5432/app"}}
    config = parse_config(yaml.safe_dump(gateway_config(tmp_path, routes=[users_route(action)])))
    with pytest.raises(ConfigError) as raised:
        RouteTable.build(config, registry())
    [error] = raised.value.errors
    assert error.startswith("routes[0].actions[0].with.url: not a valid PostgreSQL URL")
    assert "Xy9" not in error and "Secr3t" not in error


@pytest.mark.parametrize("password", ["/Secr3t", "42/Secr3t", "5432?Secr3t", "42#Secr3t"])
def test_a_postgres_password_cut_short_where_a_port_can_be_read_is_refused_without_it(
    tmp_path: Path, password: str
) -> None:
    # Ended by an unencoded "/", "?" or "#" after nothing or digits only, the password's first part reads
    # as a valid (or empty) port: the URL was accepted, with its user as the host and the rest of the
    # password in the path, query or fragment. Every attempt's error then quoted it ("postgresql
    # app:42/Secr3t@db.internal:5432/app: cannot connect", or asyncpg's "bad query field: 'Secr3t@...'"),
    # in the attempt record and the log.
    url = f"postgresql://app:{password}@db.internal:5432/app"
    action = {"id": "db", "use": "store", "with": {"url": url}}
    config = parse_config(yaml.safe_dump(gateway_config(tmp_path, routes=[users_route(action)])))
    with pytest.raises(ConfigError) as raised:
        RouteTable.build(config, registry())
    [error] = raised.value.errors
    assert error.startswith("routes[0].actions[0].with.url: not a valid PostgreSQL URL"), error
    assert "Secr3t" not in error and "db.internal" not in error
    # Percent-encoded, the same password is taken, and so is an encoded "@" elsewhere.
    encoded = quote(password, safe="")
    for ok in (f"postgresql://app:{encoded}@db.internal:5432/app", "postgresql://db.internal/app?user=a%40b"):
        action["with"] = {"url": ok}
        RouteTable.build(
            parse_config(yaml.safe_dump(gateway_config(tmp_path, routes=[users_route(action)]))), registry()
        )


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_a_new_action_does_not_wait_for_the_apps_transactions_on_an_existing_table(
    pg: PostgresDatabase, mode: str
) -> None:
    # A restart, a reload or another gateway: the tables are there. CREATE INDEX IF NOT EXISTS takes a SHARE
    # lock on its table even when the index exists: it waited for any open transaction that wrote to the
    # table (and the app's writers queued behind it), and the attempt timed out.
    options = {"url": pg.url, "table": pg.table}
    if mode == "upsert":
        options.update(mode="upsert", key="data.id")
    assert kinds(deliver(options, make_event("e1"))) == ["delivered"]
    column = "event_id" if mode == "append" else '"key"'
    with holding(pg.url, f'UPDATE "{pg.table}" SET {column} = {column}'):

        async def run() -> Outcome:
            async with store_action(options) as action:
                return await action.deliver(job(make_event("e2", data={"id": "user_2"}), 0.5))

        outcome = asyncio.run(run())
    assert outcome.kind == "delivered", outcome


def test_a_hand_made_table_missing_an_indexed_column_is_dead_not_retried(db: Database) -> None:
    # Without `type`, CREATE INDEX ... (type, received_at) fails at setup. That error was retried for the
    # whole schedule ("cannot create table"), though no attempt can succeed: docs promise dead for a
    # column missing from a table created by hand. Same for a table switched from append to upsert.
    db.execute(
        f'CREATE TABLE "{db.table}" (source text, event_id text, occurred_at text, received_at text, '
        "payload text, headers text, PRIMARY KEY (source, event_id))"
    )
    [outcome] = deliver({"url": db.url, "table": db.table}, make_event("e1"))
    assert outcome.kind == "dead", outcome
    assert "type" in (outcome.error or "")
    if db.kind == "postgresql":  # which runs the index's statement on its own, and says so
        assert f"cannot create index {db.table}_type_idx on table {db.table}:" in (outcome.error or "")


def hand_made_tables(pg: PostgresDatabase, mode: str, *, received_at: bool = True) -> dict[str, Any]:
    """The store's tables as a DBA makes them, with the columns and primary keys but not the index; the
    action's options."""
    if mode == "append":
        pg.execute(
            f'CREATE TABLE "{pg.table}" (source text NOT NULL, event_id text NOT NULL, type text NOT NULL, '
            "occurred_at timestamptz, received_at timestamptz NOT NULL, payload jsonb NOT NULL, "
            "headers jsonb NOT NULL, PRIMARY KEY (source, event_id))"
        )
        return {"url": pg.url, "table": pg.table}
    column = ", received_at timestamptz" if received_at else ""
    pg.execute(
        f'CREATE TABLE "{pg.table}" ("key" text PRIMARY KEY, data jsonb NOT NULL, source text NOT NULL, '
        "event_id text NOT NULL, type text NOT NULL, occurred_at timestamptz NOT NULL, "
        f"updated_at timestamptz NOT NULL{column})"
    )
    pg.execute(
        f'CREATE TABLE "{pg.table}_tombstones" ("key" text PRIMARY KEY, occurred_at timestamptz NOT NULL, '
        "source text NOT NULL, event_id text NOT NULL, deleted_at timestamptz NOT NULL)"
    )
    return {"url": pg.url, "table": pg.table, "mode": "upsert", "key": "data.id"}


def may_create_in_public(pg: PostgresDatabase, role: str) -> bool:
    [row] = pg.fetch(f"SELECT has_schema_privilege('{role}', 'public', 'CREATE') AS allowed")
    return bool(row["allowed"])


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "hookyard.store" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_a_hand_made_table_without_its_index_is_written_by_a_role_that_may_not_create_it(
    pg: PostgresDatabase, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A DBA made the tables and gave the app's role SELECT, INSERT, UPDATE and DELETE, no CREATE. Setup's
    # CREATE INDEX (and, in upsert, ALTER TABLE ADD COLUMN IF NOT EXISTS of a column that is there: the
    # server asks for ownership first) failed with insufficient_privilege, and every delivery was retried
    # until dead, though the index only serves queries.
    options = hand_made_tables(pg, mode)
    index = f"{pg.table}_type_idx" if mode == "append" else f"{pg.table}_updated_idx"
    with pg.login_role() as (role, url), caplog.at_level(logging.WARNING, logger="hookyard.store"):
        assert not may_create_in_public(pg, role)
        events = (make_event("e1", data={"id": "user_1"}), make_event("e2", data={"id": "user_2"}))
        outcomes = deliver({**options, "url": url}, *events)
        [record] = store_warnings(caplog)  # once, at setup: not once per delivery
        warning = record.getMessage()
        assert not pg.exists(index)
        # The DBA runs the statement the warning gives; a restart then finds nothing missing.
        pg.execute(warning.partition("Have the table's owner run: ")[2])
        later = deliver({**options, "url": url}, make_event("e3", data={"id": "user_3"}))
    assert kinds(outcomes + later) == ["delivered"] * 3, outcomes + later
    assert len(pg.events() if mode == "append" else pg.rows()) == 3
    assert f'CREATE INDEX IF NOT EXISTS "{index}" ON "{pg.table}"' in warning, warning
    assert f"must be owner of table {pg.table}" in record.__dict__["error"]
    assert len(store_warnings(caplog)) == 1 and pg.exists(index)
    password = urlsplit(url).password
    assert password and password not in caplog.text


@pytest.mark.parametrize("missing", ["the table", "the tombstones table", "a column"])
def test_a_table_the_role_may_not_create_or_complete_is_still_retried_with_the_reason(
    pg: PostgresDatabase, missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Without the table, its tombstones or upsert's received_at column, there is nothing to write to: a
    # privilege a DBA may grant while the schedule runs, not something to warn about and go on. The error
    # names what is missing: "cannot create table <table>" sent a DBA to a table that was there.
    options = {"url": pg.url, "table": pg.table, "mode": "upsert", "key": "data.id"}
    doing = {
        "the table": f"create table {pg.table}",
        "the tombstones table": f"create table {pg.table}_tombstones",
        "a column": f"add column received_at to table {pg.table}",
    }[missing]
    if missing != "the table":
        hand_made_tables(pg, "upsert", received_at=missing != "a column")
    if missing == "the tombstones table":
        pg.execute(f'DROP TABLE "{pg.table}_tombstones"')
    with pg.login_role() as (role, url), caplog.at_level(logging.WARNING, logger="hookyard.store"):
        assert not may_create_in_public(pg, role)
        [outcome] = deliver({**options, "url": url}, make_event("e1"))
    assert outcome.kind == "retry", outcome
    error = outcome.error or ""
    assert f"cannot {doing}: InsufficientPrivilegeError" in error, error
    reason = "must be owner of table" if missing == "a column" else "permission denied for schema public"
    assert reason in error, error
    assert not store_warnings(caplog)
    assert pg.exists(pg.table) == (missing != "the table")


def test_a_role_that_may_create_in_the_schema_makes_the_missing_tombstones_beside_a_table_it_does_not_own(
    pg: PostgresDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    # A DBA made the upsert table (not its index) and granted the app's role its rows and CREATE in the
    # schema, but made no tombstones table: setup creates that one, warns about the index of the table the
    # role does not own, and every write, deletes too, goes through.
    options = hand_made_tables(pg, "upsert")
    pg.execute(f'DROP TABLE "{pg.table}_tombstones"')
    with pg.login_role() as (role, url), caplog.at_level(logging.WARNING, logger="hookyard.store"):
        pg.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
        assert may_create_in_public(pg, role)
        events = (
            make_event("e1", data={"id": "user_1"}, occurred_at=T0),
            make_event("e2", "user.deleted", data={"id": "user_1"}, occurred_at=T0 + 1),
            make_event("e3", data={"id": "user_1"}, occurred_at=T0),  # older than the delete
            make_event("e4", data={"id": "user_2"}, occurred_at=T0),
        )
        outcomes = deliver({**options, "url": url, "delete_on": ["user.deleted"]}, *events)
        tombstones, rows = pg.tombstones(), pg.rows()
        [record] = store_warnings(caplog)
    assert kinds(outcomes) == ["delivered"] * 4, outcomes
    assert (list(tombstones), list(rows)) == (["user_1"], ["user_2"])
    assert f'CREATE INDEX IF NOT EXISTS "{pg.table}_updated_idx"' in record.getMessage()


@pytest.mark.parametrize("created", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_provider_time_beyond_the_years_1_to_9999_is_stored_as_unknown(db: Database, created: str) -> None:
    # Consignly's `created` (or Svix's `timestamp`) in ISO 8601 with an offset can land just outside what a
    # datetime holds. parse_timestamp bounds epoch numbers to years 1-9999 but not ISO text, so the store
    # raised "year 0 is out of range" on every attempt: retried for the whole schedule, never stored.
    from gateway.providers import parse_timestamp

    occurred_at = parse_timestamp(created)
    [outcome] = deliver({"url": db.url, "table": db.table}, make_event("e1", occurred_at=occurred_at))
    assert outcome.kind == "delivered", outcome
    [row] = db.events()
    assert row["occurred_at"] is None


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_an_unverified_svix_timestamp_past_the_year_9999_is_stored_as_unknown(
    tmp_path: Path, db: Database, mode: str
) -> None:
    # With `verify: log-only` a request whose svix-timestamp failed verification is kept, and without a
    # timestamp in the payload that header is the event's occurred_at: twelve digits reach the year 33658,
    # which no datetime holds. The store raised "year 33658 is out of range" on every attempt: retried for
    # the whole schedule, never stored.
    options: dict[str, Any] = {"url": db.url, "table": db.table}
    if mode == "upsert":
        options.update(mode="upsert", key="data.id")
    config = gateway_config(tmp_path, routes=[users_route({"id": "db", "use": "store", "with": options})])
    config["sources"]["consignease"]["verify"] = "log-only"
    body = json.dumps({"type": "user.created", "data": {"id": "u1"}}).encode()
    headers = {"svix-id": "msg_far", "svix-timestamp": "999999999999", "svix-signature": "v1,AAAA"}
    with RunningGateway(config) as gw:
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: delivery_states(gw, "msg_far")["db"] != "pending")
        states, attempts = delivery_states(gw, "msg_far"), attempts_of(gw, "msg_far", "db")
    assert states == {"db": "delivered"}, attempts
    if mode == "append":
        [row] = db.events()
        assert row["occurred_at"] is None
    else:
        # Ordered by when the gateway received it, as an event without a time of its own is.
        row = db.rows()["u1"]
        assert row["occurred_at"] == row["received_at"]


def test_sqlite_orders_times_before_the_year_1000_correctly(tmp_path: Path) -> None:
    # _iso promises fixed-width text so that SQL text comparison is time order, but strftime("%Y") writes
    # year 999 as "999": "999-06-01..." sorts after "2026-...", so a row stamped with a bogus early time
    # (a sender's placeholder date) was newer than every real update and froze the key for good.
    from gateway.providers import parse_timestamp

    database = SQLiteDatabase(tmp_path / "store.db", "users")
    early = parse_timestamp("0999-06-01T00:00:00Z")
    outcomes = deliver(
        upsert(database),
        make_event("e1", data={"id": "user_1", "v": "placeholder"}, occurred_at=early),
        make_event("e2", data={"id": "user_1", "v": "real"}, occurred_at=T0),
    )
    assert kinds(outcomes) == ["delivered", "delivered"]
    [row] = database.fetch('SELECT data FROM "users"')
    assert json.loads(row["data"]) == {"id": "user_1", "v": "real"}


def test_a_sqlite_store_on_the_gateways_own_database_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `table: events` on storage.url's file added an index to the gateway's own events table before the
    # delivery ended dead; any other table mixed the app's rows into the gateway's store, whose retention and
    # backups are the gateway's. Refused when the config loads, however the same file is written.
    monkeypatch.chdir(tmp_path)
    for url in (
        f"sqlite:///{tmp_path}/hookyard.db",
        "sqlite:///hookyard.db",
        f"SQLITE:///{tmp_path}/./hookyard.db",
    ):
        action = {"id": "db", "use": "store", "with": {"url": url, "table": "events"}}
        config = parse_config(yaml.safe_dump(gateway_config(tmp_path, routes=[users_route(action)])))
        with pytest.raises(ConfigError) as raised:
            RouteTable.build(config, registry())
        [error] = raised.value.errors
        assert error == (
            "routes[0].actions[0].with.url: the gateway's own database (storage.url); give the store a file "
            "of its own"
        ), error
    # Another file beside it is the store's own.
    action = {"id": "db", "use": "store", "with": {"url": f"sqlite:///{tmp_path}/app.db"}}
    RouteTable.build(
        parse_config(yaml.safe_dump(gateway_config(tmp_path, routes=[users_route(action)]))), registry()
    )
