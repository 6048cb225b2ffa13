"""The embedded SQLite store, against a real database file: ingest, claim, finish, replay, inspection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from gateway import retention as retention_module
from gateway.actions import ParentResult
from gateway.events import Event
from gateway.operations import detail_view, iso
from gateway.storage import (
    Attempt,
    Claim,
    DeliveryRecord,
    EventDetail,
    Finished,
    Ingested,
    Lease,
    NewDelivery,
    Pruned,
    QueueStats,
    StorageUnavailable,
    Unconfirmed,
    open_storage,
)
from gateway.storage import sqlite as sqlite_module
from gateway.storage.sqlite import (
    CHECKPOINT_COMMITS,
    PRUNE_BYTES,
    WAL_SIZE_LIMIT,
    SQLiteStorage,
    _GroupCommit,
    _WalSyncer,
)
from tests.support import Downstream, RunningGateway, gateway_config, svix_request, tmpfs, wait_until

T = TypeVar("T")

T0 = 1_700_000_000.0
LEASE = 60.0
ROUTE = "orders"


def make_event(event_id: str, *, source: str = "shop", at: float = T0, type_: str = "order.created") -> Event:
    body = json.dumps({"id": event_id, "type": type_, "data": {"total": 42}}).encode()
    return Event(
        source=source,
        id=event_id,
        type=type_,
        received_at=at,
        body=body,
        payload=json.loads(body),
        occurred_at=at - 1,
        headers={"content-type": "application/json"},
    )


def action(key: str, after: str | None = None, when: str | None = None) -> NewDelivery:
    return NewDelivery(ROUTE, key, after, when)


APP = action("app")


class Harness:
    """A SQLiteStorage on a file, driven from sync tests through one event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runner = asyncio.Runner()
        self.storage = SQLiteStorage(path)
        self.commits: list[int] = []
        self.storage.on_commit = lambda size, _duration: self.commits.append(size)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    @property
    def connection(self) -> sqlite3.Connection:
        assert self.storage._writer is not None
        return self.storage._writer.connection

    def settle(self) -> None:
        """Wait until no batch, fsync or checkpoint is running."""
        assert self.storage._writer is not None
        self.run(self.storage._writer.idle.wait())

    def ingest(self, event_id: str, *deliveries: NewDelivery, **event: Any) -> bool:
        return self.run(self.storage.ingest(make_event(event_id, **event), list(deliveries)))

    def ingest_leased(self, event: Event, deliveries: list[NewDelivery], lease: Lease) -> Ingested:
        async def ingest() -> Ingested:
            return await self.storage.begin_ingest(event, deliveries, lease)

        return self.run(ingest())

    def replay_dead(self, *, since: float | None, now: float, source: str | None = None) -> int:
        """What `hookyard replay --state dead` does, in one page."""
        ids = self.run(self.storage.dead_delivery_ids(since=since, source=source))
        return self.run(self.storage.reset_deliveries(ids, now))

    def claim(self, now: float, limit: int = 100, lease: float = LEASE, owner: str = "w1") -> list[Claim]:
        return self.run(self.storage.claim(now, limit, lease, owner))

    def finish(
        self,
        delivery: Claim | DeliveryRecord,
        state: str,
        now: float,
        *,
        due_at: float | None = None,
        status: int | None = None,
        error: str | None = None,
        number: int | None = None,
    ) -> Finished:
        record = delivery.delivery if isinstance(delivery, Claim) else delivery
        outcome = "retry" if state == "pending" else state
        attempt = Attempt(
            record.attempt_number if number is None else number, now - 0.25, 0.25, outcome, status, error
        )
        return self.run(self.storage.finish(record, attempt, state, due_at, now))

    def detail(self, event_id: str, source: str | None = None) -> EventDetail:
        [detail] = self.run(self.storage.get_event(event_id, source))
        return detail

    def deliveries(self, event_id: str) -> dict[str, DeliveryRecord]:
        return {d.action: d for d in self.detail(event_id).deliveries}

    def states(self, event_id: str) -> dict[str, str]:
        return {key: d.state for key, d in self.deliveries(event_id).items()}


def keyed(claims: list[Claim]) -> dict[tuple[str, str], Claim]:
    return {(c.event.id, c.delivery.action): c for c in claims}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Harness]:
    with opened_harness(tmp_path / "hookyard.db") as harness:
        yield harness


@contextlib.contextmanager
def opened_harness(path: Path) -> Iterator[Harness]:
    """A store opened on `path`, closed at the end with its runner."""
    harness = Harness(path)
    harness.run(harness.storage.open())
    try:
        yield harness
    finally:
        harness.run(harness.storage.close())
        harness.runner.close()


# -- ingest -------------------------------------------------------------------------------------------


def test_ingest_stores_an_event_once_per_source_and_id(db: Harness) -> None:
    assert db.ingest("evt_1", APP, action("audit")) is True
    assert db.ingest("evt_1", APP, action("audit"), at=T0 + 5) is False

    detail = db.detail("evt_1")
    assert [(d.action, d.state, d.attempts) for d in detail.deliveries] == [
        ("app", "pending", 0),
        ("audit", "pending", 0),
    ]
    # The first copy is kept as it was.
    assert detail.event.received_at == T0
    assert detail.event.payload == {"id": "evt_1", "type": "order.created", "data": {"total": 42}}
    assert detail.event.headers == {"content-type": "application/json"}
    assert detail.event.occurred_at == T0 - 1

    # The same id from another source is another event.
    assert db.ingest("evt_1", APP, source="billing") is True
    assert [d.event.source for d in db.run(db.storage.get_event("evt_1"))] == ["billing", "shop"]
    assert len(db.detail("evt_1", source="billing").deliveries) == 1
    assert len(db.detail("evt_1", source="shop").deliveries) == 2
    assert len(db.claim(T0 + 10)) == 3


def test_a_database_made_with_the_earlier_events_indexes_works_as_before(tmp_path: Path) -> None:
    # Earlier versions made events UNIQUE (source, event_id) with a second index on event_id; a table's
    # constraints cannot change, so such a database keeps them.
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(
            """
            CREATE TABLE events (
                seq INTEGER PRIMARY KEY, source TEXT NOT NULL, event_id TEXT NOT NULL, type TEXT NOT NULL,
                occurred_at REAL, received_at REAL NOT NULL, verified INTEGER NOT NULL DEFAULT 1,
                headers TEXT NOT NULL, body BLOB NOT NULL, UNIQUE (source, event_id)
            );
            CREATE INDEX events_by_id ON events (event_id);
            """
        )
    harness = Harness(path)
    harness.run(harness.storage.open())
    try:
        assert harness.ingest("evt_1", APP) is True
        assert harness.ingest("evt_1", APP) is False
        assert harness.ingest("evt_1", APP, source="billing") is True
        assert sorted(d.event.source for d in harness.run(harness.storage.get_event("evt_1"))) == [
            "billing",
            "shop",
        ]
    finally:
        harness.run(harness.storage.close())
        harness.runner.close()


def test_a_database_with_the_earlier_pending_since_index_drops_it_and_counts_the_same(tmp_path: Path) -> None:
    # Earlier versions indexed pending_since, written twice for every delivery; the queue statistics now
    # take the oldest on their scan of the pending deliveries.
    path = tmp_path / "old.db"
    harness = Harness(path)
    harness.run(harness.storage.open())
    try:
        harness.ingest("evt_1", APP, at=T0)
        harness.ingest("evt_2", APP, at=T0 + 5)
    finally:
        harness.run(harness.storage.close())
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.execute(
            "CREATE INDEX deliveries_pending_since ON deliveries (pending_since) WHERE state = 'pending'"
        )
        old.commit()
    harness.run(harness.storage.open())
    try:
        indexes = {row[0] for row in harness.connection.execute("SELECT name FROM sqlite_master")}
        assert "deliveries_pending_since" not in indexes and "deliveries_due" in indexes
        stats = harness.run(harness.storage.queue_stats(T0 + 10))
        assert stats.counts["due"] == 2
        assert stats.oldest_pending_since == T0
    finally:
        harness.run(harness.storage.close())
        harness.runner.close()


def test_binding_none_bytes_and_bools_runs_no_python_code() -> None:
    # sqlite3 offers these to the store's adapters (gateway.storage.sqlite, imported here): C callables
    # that give each value back, bound as sqlite3 would bind it anyway, without a Python frame per value.
    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)

    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        sys.setprofile(profile)
        try:
            row = conn.execute(
                "SELECT ?, ?, ?, typeof(?), typeof(?)", (None, b"\x00body", True, None, b"x")
            ).fetchone()
        finally:
            sys.setprofile(None)
    assert calls == []
    assert row == (None, b"\x00body", 1, "null", "blob")
    # Without an adapter, sqlite3 would raise and swallow an AttributeError for each of these values.
    assert {(type(None), sqlite3.PrepareProtocol), (bytes, sqlite3.PrepareProtocol)} <= set(sqlite3.adapters)


def test_an_event_is_found_by_its_id_through_an_index(db: Harness) -> None:
    # The admin's lookup of an id from any source: a search of an index, never a scan of every event.
    [(*_, plan)] = db.connection.execute("EXPLAIN QUERY PLAN SELECT * FROM events WHERE event_id = ?", ("x",))
    assert plan.startswith("SEARCH events USING INDEX"), plan


def test_the_same_event_twice_in_one_batch_is_stored_once(db: Harness) -> None:
    async def twice() -> list[bool]:
        return list(
            await asyncio.gather(
                db.storage.ingest(make_event("evt_twice"), [APP]),
                db.storage.ingest(make_event("evt_twice"), [APP]),
            )
        )

    assert sorted(db.run(twice())) == [False, True]
    assert len(db.detail("evt_twice").deliveries) == 1


def test_database_is_wal_and_commits_never_fsync_on_the_loop(db: Harness) -> None:
    with contextlib.closing(sqlite3.connect(db.path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # NORMAL: a COMMIT hands the WAL to the OS; the store's own fsync helper makes it durable.
    assert db.connection.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert db.connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0


class HeldFsync:
    """The store's fsync helper process stopped (SIGSTOP) until released: a disk that takes its time, or,
    past FSYNC_TIMEOUT, one that stopped answering. Its failure is the helper killed: nobody can tell whether
    its last fsync happened."""

    def __init__(self, storage: SQLiteStorage) -> None:
        writer = storage._writer
        assert writer is not None
        self.syncer = writer.syncer
        self.pid = self.syncer.process.pid
        os.kill(self.pid, signal.SIGSTOP)

    @property
    def calls(self) -> int:
        return self.syncer.syncs

    async def requested(self) -> None:
        for _ in range(1000):
            if self.syncer.requested:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no fsync was asked for")

    def release(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def test_an_ingest_is_answered_only_after_the_wal_is_fsynced(db: Harness) -> None:
    fsync = HeldFsync(db.storage)

    async def ingest_while_the_disk_is_slow() -> tuple[bool, bool, list[str]]:
        task = asyncio.create_task(db.storage.ingest(make_event("evt_slow"), [APP]))
        await fsync.requested()
        await asyncio.sleep(0.05)
        answered_before = task.done()
        # Committed (visible to a reader) but not yet answered: the fsync has not returned.
        claims = await db.storage.claim(T0 + 1, 10, LEASE, "worker")
        fsync.release()
        return answered_before, await task, [c.event.id for c in claims]

    answered_before, stored, claimed = db.run(ingest_while_the_disk_is_slow())
    assert answered_before is False
    assert stored is True
    assert claimed == ["evt_slow"]  # a lease needs no fsync: it was answered while the disk was busy
    assert fsync.calls >= 1


def test_while_an_fsync_runs_durable_writes_wait_and_commit_together(db: Harness) -> None:
    fsync = HeldFsync(db.storage)

    async def trickle() -> tuple[list[bool], list[int]]:
        tasks = []
        for n in range(6):
            tasks.append(asyncio.create_task(db.storage.ingest(make_event(f"evt_{n}"), [APP])))
            await asyncio.sleep(0.02)  # each its own batch, were nothing held back
        # A lease is not held back: it commits and is answered while the fsync still runs.
        claimed = [c.event.id for c in await db.storage.claim(T0 + 1, 10, LEASE, "worker")]
        fsync.release()
        return list(await asyncio.gather(*tasks)), claimed

    stored, claimed = db.run(trickle())
    assert stored == [True] * 6
    assert claimed == ["evt_0"]  # the others were not committed yet
    # The first ingest took the fsync; the lease committed on its own; the other five ingests waited and
    # shared one commit and one more fsync.
    assert db.commits == [1, 1, 5]
    assert fsync.calls == 2


def test_after_a_failed_fsync_nothing_is_answered_stored_until_a_restart(db: Harness) -> None:
    fsync = HeldFsync(db.storage)

    async def ingest_while_the_helper_dies() -> None:
        task = asyncio.create_task(db.storage.ingest(make_event("evt_lost"), [APP]))
        await fsync.requested()
        fsync.kill()
        await task

    with pytest.raises(StorageUnavailable, match="fsync helper exited"):
        db.run(ingest_while_the_helper_dies())
    # evt_lost is committed, but whether it reached the disk nobody knows: a retry must not be answered
    # "duplicate" from a row that may not be on disk.
    with pytest.raises(StorageUnavailable, match="restart"):
        db.ingest("evt_lost", APP)
    with pytest.raises(StorageUnavailable, match="restart"):
        db.run(db.storage.check_writable())

    db.run(db.storage.close())
    db.run(db.storage.open())
    db.run(db.storage.check_writable())
    assert db.ingest("evt_after_restart", APP) is True


def test_a_helper_that_dies_while_nothing_waits_stops_the_store_too(db: Harness) -> None:
    assert db.ingest("evt_before", APP) is True
    writer = db.storage._writer
    assert writer is not None
    helper = writer.syncer.process
    helper.kill()
    helper.wait(10)

    async def ingest_after_the_helper_died() -> None:
        await asyncio.sleep(0.1)  # the loop sees the end of its replies
        # Refused at once, never left waiting for an fsync nobody will make.
        await asyncio.wait_for(db.storage.ingest(make_event("evt_after"), [APP]), 5)

    with pytest.raises(StorageUnavailable, match="restart"):
        db.run(ingest_after_the_helper_died())
    db.run(asyncio.wait_for(db.storage.close(), 10))  # and closing does not hang either


def test_what_waited_for_a_failed_fsync_is_refused_too(db: Harness) -> None:
    fsync = HeldFsync(db.storage)

    async def retry_during_the_failing_fsync() -> list[BaseException | bool]:
        first = asyncio.create_task(db.storage.ingest(make_event("evt_lost"), [APP]))
        await fsync.requested()
        # Queued while the fsync runs: the sender's retry of the same event, and another event.
        retry = asyncio.create_task(db.storage.ingest(make_event("evt_lost"), [APP]))
        other = asyncio.create_task(db.storage.ingest(make_event("evt_other"), [APP]))
        await asyncio.sleep(0.05)
        fsync.kill()
        return list(await asyncio.gather(first, retry, other, return_exceptions=True))

    results = db.run(retry_during_the_failing_fsync())
    # None of them is answered as stored: not the retry ("duplicate"), not the other one.
    assert all(isinstance(result, StorageUnavailable) for result in results), results
    assert fsync.calls == 0


def test_an_fsync_that_does_not_answer_in_time_is_waited_for_no_longer(
    db: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 0.3)
    fsync = HeldFsync(db.storage)

    async def ingest_while_the_disk_hangs() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        committed = asyncio.create_task(db.storage.ingest(make_event("evt_committed"), [APP]))
        await fsync.requested()
        queued = asyncio.create_task(db.storage.ingest(make_event("evt_queued"), [APP]))  # behind the fsync
        started = loop.time()
        answers = await asyncio.gather(committed, queued, return_exceptions=True)
        seen: dict[str, Any] = {"answers": answers, "waited": loop.time() - started}
        seen["age"] = db.storage.fsync_wait()
        # From now on a durable write, the readiness check's included, is refused at once.
        started = loop.time()
        seen["refused"] = await asyncio.gather(
            db.storage.ingest(make_event("evt_later"), [APP]),
            db.storage.check_writable(),
            return_exceptions=True,
        )
        seen["refused_in"] = loop.time() - started
        # What needs no fsync goes on: a lease.
        seen["claimed"] = [c.event.id for c in await db.storage.claim(T0 + 1, 10, LEASE, "worker")]
        fsync.release()
        for _ in range(500):
            if db.storage.fsync_wait() == 0:
                break
            await asyncio.sleep(0.01)
        await db.storage.check_writable()
        return seen

    try:
        seen = db.run(asyncio.wait_for(ingest_while_the_disk_hangs(), 10))
    finally:
        fsync.release()
    committed, queued = seen["answers"]
    # Its commit is written and may yet be on disk: not answered as stored, nor as not written.
    assert isinstance(committed, Unconfirmed) and committed.result.new is True, committed
    assert "may still be stored" in str(committed)
    # Behind the fsync, nothing of it was written: refused, as for any failed write.
    assert type(queued) is StorageUnavailable and "no fsync has finished" in str(queued), queued
    assert 0.2 < seen["waited"] < 2
    assert seen["age"] >= 0.3
    assert [type(refusal) for refusal in seen["refused"]] == [StorageUnavailable, StorageUnavailable]
    assert seen["refused_in"] < 0.2
    assert seen["claimed"] == ["evt_committed"]
    # Once the fsync has answered: the committed event is stored, once; the refused one was not stored.
    assert db.ingest("evt_committed", APP) is False
    assert db.ingest("evt_queued", APP) is True
    assert db.storage.fsync_wait() == 0


def test_closing_gives_an_fsync_that_does_not_answer_a_bounded_wait(
    db: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 0.3)
    assert db.ingest("evt_confirmed", APP) is True
    fsync = HeldFsync(db.storage)
    helper = fsync.syncer.process

    async def close_while_the_disk_hangs() -> tuple[list[BaseException | bool], float]:
        answers = await asyncio.gather(
            db.storage.ingest(make_event("evt_unconfirmed"), [APP]), return_exceptions=True
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(db.storage.close(), 5)
        return answers, loop.time() - started

    try:
        [unconfirmed], took = db.run(close_while_the_disk_hangs())
    finally:
        fsync.release()
    assert isinstance(unconfirmed, Unconfirmed), unconfirmed
    # FSYNC_TIMEOUT (0.3 s), where it waited for ever (here until the 5 s of wait_for): far apart, whatever the
    # machine's load.
    assert took < 3, took
    [closed] = [
        r for r in caplog.records if r.getMessage() == "the store is closed with an fsync unconfirmed"
    ]
    assert closed.levelname == "ERROR" and "no fsync has finished for" in closed.error  # type: ignore[attr-defined]
    # Once its fsync has answered, the helper ends (at the end of its input) and is reaped.
    wait_until(lambda: helper.returncode == 0, 5)
    # Nothing answered as stored is lost; the unconfirmed event reached the disk after all.
    db.run(db.storage.open())
    assert db.ingest("evt_confirmed", APP) is False
    assert db.ingest("evt_unconfirmed", APP) is False


class StuckClose:
    """The writer's connection, whose close does not return until released: the checkpoint that closing the
    last connection makes, stuck in its fsync on a disk that stopped answering (a fault a test cannot cause
    on demand)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.release = threading.Event()
        self.closed_on: threading.Thread | None = None
        self.closed = False

    def close(self) -> None:
        self.closed_on = threading.current_thread()
        self.release.wait(5)
        self.connection.close()
        self.closed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)


def test_closing_the_last_connection_holds_up_neither_the_loop_nor_the_shutdown(
    db: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The close is given up on after FSYNC_TIMEOUT, the stuck close returns only after 5 s: a second apart, and
    # each well apart from a turn of the loop, so that a busy machine cannot blur them.
    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 1.0)
    assert db.ingest("evt_stored", APP) is True
    writer = db.storage._writer
    assert writer is not None
    stuck = StuckClose(writer.connection)
    writer.connection = stuck  # type: ignore[assignment]

    async def close_and_watch_the_loop() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        gaps: list[float] = []

        async def tick() -> None:
            while True:
                before = loop.time()
                await asyncio.sleep(0.01)
                gaps.append(loop.time() - before)

        ticker = asyncio.create_task(tick())
        started = loop.time()
        await asyncio.wait_for(db.storage.close(), 10)
        took = loop.time() - started
        ticker.cancel()
        return took, max(gaps, default=took)  # none: the loop never turned while it closed

    try:
        took, longest_turn = db.run(close_and_watch_the_loop())
    finally:
        stuck.release.set()
    assert took < 3 and longest_turn < 0.9, (took, longest_turn)
    # Closed on a daemon thread: stuck there, it would not keep the process from exiting.
    assert stuck.closed_on is not None and stuck.closed_on.daemon
    assert "the store is closed with an fsync unconfirmed" in caplog.text
    wait_until(lambda: stuck.closed, 5)  # closed once its checkpoint has answered
    db.run(db.storage.open())
    assert db.ingest("evt_stored", APP) is False


class StuckReads:
    """The reader's connection, whose queries do not return until released: reads of a disk that stopped
    answering (a fault a test cannot cause on demand)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.release = threading.Event()
        self.read_on: threading.Thread | None = None

    def execute(self, *args: Any) -> sqlite3.Cursor:
        self.read_on = threading.current_thread()
        self.release.wait(10)
        return self.connection.execute(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)


def test_a_read_stuck_on_the_disk_does_not_hold_up_the_shutdown(
    db: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The queue statistics the engine reads every 2 s, under way when SIGTERM comes: close() waited for them
    # for ever, and their thread, not a daemon, would have kept the process from exiting even then.
    # Long enough for the writer's own close on a busy machine, well short of the stuck read's 10 s.
    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 1.0)
    assert db.ingest("evt_stored", APP) is True
    reader, reader_thread = db.storage._reader, db.storage._reader_thread
    assert reader is not None and reader_thread is not None
    stuck = StuckReads(reader)
    db.storage._reader = stuck  # type: ignore[assignment]

    async def read_then_close() -> tuple[asyncio.Task[QueueStats], float]:
        reading = asyncio.create_task(db.storage.queue_stats(time.time()))
        while stuck.read_on is None:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(db.storage.close(), 10)
        return reading, loop.time() - started

    try:
        reading, took = db.run(read_then_close())
        assert took < 5, took
        assert stuck.read_on is not None and stuck.read_on.daemon
        assert "the store is closed with a read unfinished" in caplog.text
        # The writer had nothing in progress: its own close had the time it needed.
        assert "fsync unconfirmed" not in caplog.text
    finally:
        stuck.release.set()
    # Once the disk answers, the read does, and then its connection is closed.
    assert db.run(asyncio.wait_for(reading, 5)).counts["due"] == 1
    # Looked at once its thread has closed it and ended: a query on a connection that another thread is
    # closing can crash the interpreter.
    wait_until(lambda: not reader_thread._thread.is_alive(), 5)
    assert is_closed(reader)
    db.run(db.storage.open())
    assert db.ingest("evt_stored", APP) is False


def test_closing_waits_for_a_stuck_read_and_a_stuck_fsync_side_by_side(
    db: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a disk that stopped answering both are stuck: the close waited for the read, then for the fsync,
    # each for FSYNC_TIMEOUT, twice the bound in all. Two seconds: the once and the twice are far enough apart
    # that a busy machine cannot blur them, and both short of the stuck read's 10 s.
    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 2.0)
    assert db.ingest("evt_confirmed", APP) is True
    reader = db.storage._reader
    assert reader is not None
    stuck = StuckReads(reader)
    db.storage._reader = stuck  # type: ignore[assignment]
    fsync = HeldFsync(db.storage)

    async def close_on_a_hung_disk() -> tuple[asyncio.Task[QueueStats], float]:
        await asyncio.gather(db.storage.ingest(make_event("evt_unconfirmed"), [APP]), return_exceptions=True)
        reading = asyncio.create_task(db.storage.queue_stats(time.time()))
        while stuck.read_on is None:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(db.storage.close(), 10)
        return reading, loop.time() - started

    try:
        reading, took = db.run(close_on_a_hung_disk())
    finally:
        stuck.release.set()
        fsync.release()
    assert 1.9 < took < 3.2, took
    db.run(asyncio.wait_for(reading, 5))
    db.run(db.storage.open())
    assert db.ingest("evt_unconfirmed", APP) is False


def test_a_stop_gives_up_on_the_queue_statistics_when_their_read_is_stuck_on_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine's last read of the queue's gauges, as it stops, waited behind the statistics' read stuck
    on a disk that stopped answering (their thread does one read at a time), and then in its own: the
    shutdown never reached closing the store. It is given up on after its bound."""
    from gateway import delivery

    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 0.3)
    monkeypatch.setattr(delivery, "STATS_INTERVAL", 0.05)
    monkeypatch.setattr(delivery, "LAST_STATS_TIMEOUT", 0.3)
    gw = RunningGateway(gateway_config(tmp_path)).__enter__()
    storage = gw.gateway.storage
    assert isinstance(storage, SQLiteStorage) and storage._reader is not None
    stuck = StuckReads(storage._reader)
    storage._reader = stuck  # type: ignore[assignment]
    try:
        wait_until(lambda: stuck.read_on is not None, 5)  # the statistics' next read
        started = time.monotonic()
        gw.__exit__(None, None, None)
        took = time.monotonic() - started
    finally:
        stuck.release.set()
    assert not gw.thread.is_alive()
    # Its bound and the store's close, 0.3 s each, where it waited for the stuck read's 10 s: far apart,
    # whatever the machine's load.
    assert took < 5, f"stopping took {took:.1f}s"
    [given_up] = [r for r in caplog.records if r.getMessage() == "cannot read queue statistics"]
    assert given_up.error == "not read in 0.3 s"  # type: ignore[attr-defined]
    assert "the store is closed with a read unfinished" in caplog.text


def is_closed(connection: sqlite3.Connection) -> bool:
    try:
        connection.execute("SELECT 1")
    except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
        return True
    return False


def test_a_batch_waits_for_another_processs_write_lock_off_the_loop(
    db: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bound is well apart from the 0.15 s the lock is held for, so a loaded machine cannot blur them: what
    # the fault would show (the whole bound, waited for in SQLite's busy handler with the loop held) is twice
    # what the checks below allow, and what they allow is ten times what each takes.
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 3.0)
    other = sqlite3.connect(db.path, isolation_level=None)

    async def timed(operation: Coroutine[Any, Any, T]) -> tuple[T | BaseException, float]:
        started = time.perf_counter()
        [answer] = await asyncio.gather(operation, return_exceptions=True)
        return answer, time.perf_counter() - started

    async def behind_the_lock() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        stalls = [0.0]

        async def tick() -> None:  # how long the loop went without running anything else
            while True:
                before = loop.time()
                await asyncio.sleep(0.005)
                stalls.append(loop.time() - before)

        ticker = asyncio.create_task(tick())
        seen: dict[str, Any] = {}
        # Released before the bound: stored once the lock is free.
        other.execute("BEGIN IMMEDIATE")
        loop.call_later(0.15, other.execute, "ROLLBACK")
        seen["waited"] = await timed(db.storage.ingest(make_event("evt_waited"), [APP]))
        # Held past it: refused, and while it stays taken, the next batch is refused at once.
        other.execute("BEGIN IMMEDIATE")
        seen["refused"] = await timed(db.storage.ingest(make_event("evt_refused"), [APP]))
        seen["refused_at_once"] = await timed(db.storage.check_writable())
        other.execute("ROLLBACK")
        # Once a batch got the lock, the next wait for it starts afresh.
        seen["retried"] = await timed(db.storage.ingest(make_event("evt_refused"), [APP]))
        other.execute("BEGIN IMMEDIATE")
        loop.call_later(0.15, other.execute, "ROLLBACK")
        seen["waited_again"] = await timed(db.storage.ingest(make_event("evt_waited_again"), [APP]))
        ticker.cancel()
        seen["stall"] = max(stalls)
        return seen

    try:
        seen = db.run(behind_the_lock())
    finally:
        other.close()
    for key in ("waited", "waited_again"):
        stored, took = seen[key]
        assert stored is True and 0.14 < took < 1.5, (key, stored, took)
    refused, took = seen["refused"]
    assert isinstance(refused, StorageUnavailable), refused
    assert "database is locked (by another process, for " in str(refused)
    assert 2.99 < took < 4.5, took
    refused, took = seen["refused_at_once"]
    assert isinstance(refused, StorageUnavailable) and took < 1.5, (refused, took)
    assert seen["retried"][0] is True  # nothing of it was written when it was refused
    # The loop ran all along: it never waited for the lock in SQLite's busy handler (which would hold it for
    # the whole bound, since the lock's release is itself a callback on this loop).
    assert seen["stall"] < 1.5, seen["stall"]


def test_an_operation_that_fails_after_sqlite_rolled_back_is_refused_not_left_waiting(tmp_path: Path) -> None:
    # The batch fails as a whole with an error raised here, not by SQLite: it carries no SQLite error code,
    # and is no busy lock to wait for.
    def rolled_back(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise ValueError("the transaction was rolled back under the operation")

    async def run() -> tuple[BaseException | bool, ...]:
        storage = SQLiteStorage(tmp_path / "hookyard.db")
        await storage.open()
        try:
            assert storage._writer is not None
            failing = storage._writer.submit(rolled_back, durable=True)
            [refused] = await asyncio.wait_for(asyncio.gather(failing, return_exceptions=True), 5)
            return refused, await asyncio.wait_for(storage.ingest(make_event("evt_after"), [APP]), 5)
        finally:
            await asyncio.wait_for(storage.close(), 5)  # nothing is left waiting

    refused, stored = asyncio.run(run())
    assert type(refused) is StorageUnavailable and "rolled back under the operation" in str(refused), refused
    assert stored is True


def test_the_fsync_helper_reports_the_error_of_a_failed_fdatasync(tmp_path: Path) -> None:
    # fdatasync of a character device fails (EINVAL) for real, in the helper process, as EIO would.
    async def sync_dev_null() -> tuple[int, OSError | None]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[int, OSError | None]] = loop.create_future()
        syncer = _WalSyncer(Path("/dev/null"), tmp_path, loop, lambda n, e: answer.set_result((n, e)))
        try:
            syncer.request(7)
            return await asyncio.wait_for(answer, 10)
        finally:
            syncer.stop()

    number, error = asyncio.run(sync_dev_null())
    assert number == 7
    assert isinstance(error, OSError) and error.errno == errno.EINVAL


def test_the_fsync_helper_outlives_signals_for_the_gateway_and_ends_with_the_store(db: Harness) -> None:
    writer = db.storage._writer
    assert writer is not None
    helper = writer.syncer.process
    assert db.ingest("evt_before_signals", APP) is True  # the helper is up and serving
    # Ctrl-C or a SIGTERM meant for the gateway must not end it before the gateway's last commits.
    os.kill(helper.pid, signal.SIGINT)
    os.kill(helper.pid, signal.SIGTERM)
    assert db.ingest("evt_after_signals", APP) is True
    assert helper.poll() is None
    db.run(db.storage.close())
    assert helper.poll() == 0  # closing the store ended it


def test_a_checkpoint_that_fails_stops_the_store(db: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_disk(self: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr("gateway.storage.sqlite._GroupCommit._checkpoint", broken_disk)
    monkeypatch.setattr("gateway.storage.sqlite._GroupCommit._checkpoint_in_background", broken_disk)
    for n in range(CHECKPOINT_COMMITS - 1):
        assert db.ingest(f"evt_{n}", APP) is True
    # This commit starts the checkpoint; whether its own answer comes before the failure is a race.
    with contextlib.suppress(StorageUnavailable):
        db.ingest("evt_starts_the_checkpoint", APP)
    # The checkpoint fails on its own thread: on a busy machine a commit may still go first.
    deadline = time.monotonic() + 10
    while db.storage.needs_restart() is None and time.monotonic() < deadline:
        db.run(asyncio.sleep(0.01))
    with pytest.raises(StorageUnavailable, match="checkpoint failed"):
        db.ingest("evt_after", APP)
    with pytest.raises(StorageUnavailable, match="restart"):
        db.run(db.storage.check_writable())


def test_a_database_behind_a_symlink_syncs_the_real_wal(tmp_path: Path) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.mkdir()
    (link / "hookyard.db").symlink_to(real / "hookyard.db")
    harness = Harness(link / "hookyard.db")
    harness.run(harness.storage.open())
    try:
        assert harness.ingest("evt_1", APP) is True
        assert (real / "hookyard.db-wal").exists()
    finally:
        harness.run(harness.storage.close())
        harness.runner.close()


def test_the_wal_is_checkpointed_off_the_loop_and_emptied(db: Harness) -> None:
    wal = Path(f"{db.path}-wal")

    # 400 events of 50 KB: past the WAL's size limit, in four commits (too few to checkpoint by count).
    for round_ in range(4):
        db.run(grow_batch(db, round_))
    db.settle()  # the checkpoint the last batch started
    assert len(db.run(db.storage.list_events(limit=1000))) == 400
    assert wal.stat().st_size < WAL_SIZE_LIMIT
    with contextlib.closing(sqlite3.connect(db.path)) as other:
        assert other.execute("SELECT count(*) FROM events").fetchone()[0] == 400


def test_a_reader_holding_an_old_snapshot_holds_up_no_commit_past_the_wal_size_limit(db: Harness) -> None:
    wal = Path(f"{db.path}-wal")
    db.ingest("evt_first", APP)
    with contextlib.closing(sqlite3.connect(db.path, isolation_level=None)) as backup:
        # A reader on the snapshot of now (a backup, a shell's open transaction): the WAL cannot start over.
        backup.execute("BEGIN")
        backup.execute("SELECT count(*) FROM events").fetchone()
        for round_ in range(4):
            db.run(grow_batch(db, round_))
        assert wal.stat().st_size > WAL_SIZE_LIMIT
        # Each batch past the size limit tries to start the WAL over: none may wait for the reader to end.
        started = time.perf_counter()
        for n in range(3):
            assert db.ingest(f"evt_while_read_{n}", APP) is True
        assert time.perf_counter() - started < 3  # a wait for the reader would take BUSY_TIMEOUT, 5 s
        backup.execute("COMMIT")
    # The reader gone, the WAL starts over.
    db.ingest("evt_after", APP)
    db.settle()  # the checkpoint
    assert wal.stat().st_size < WAL_SIZE_LIMIT


def test_the_wal_is_checkpointed_every_few_commits(db: Harness) -> None:
    main_file = db.path.stat().st_size
    for n in range(CHECKPOINT_COMMITS + 5):
        db.ingest(f"evt_{n}", APP)  # one commit each
    db.settle()  # the checkpoint
    # The events were copied from the WAL into the database file itself.
    assert db.path.stat().st_size > main_file
    with contextlib.closing(sqlite3.connect(f"file:{db.path}?mode=ro&immutable=1", uri=True)) as file_only:
        # immutable: the WAL is not read, so this counts what the checkpoint wrote to the main file.
        assert file_only.execute("SELECT count(*) FROM events").fetchone()[0] >= CHECKPOINT_COMMITS


@pytest.mark.parametrize(
    ("errorname", "stops"),
    [("SQLITE_IOERR_WRITE", False), ("SQLITE_FULL", False), ("SQLITE_IOERR_FSYNC", True)],
)
def test_a_checkpoint_that_cannot_write_is_tried_again_but_one_whose_fsync_failed_stops_the_store(
    db: Harness, monkeypatch: pytest.MonkeyPatch, errorname: str, stops: bool
) -> None:
    # The disk refusing a checkpoint's writes (read-only, full) loses nothing: the WAL still holds it all.
    # A failed fsync may have: the kernel can drop what it had accepted. (Faults a unit test cannot cause
    # on demand; the reliability tests make the file system read-only for real.)
    failures: list[sqlite3.Error] = []
    real = _GroupCommit._checkpoint_in_background

    def failing_once(self: _GroupCommit) -> bool:
        if not failures:
            failure = sqlite3.OperationalError("disk I/O error")
            failure.sqlite_errorname = errorname
            failures.append(failure)
            raise failure
        return real(self)

    monkeypatch.setattr(_GroupCommit, "_checkpoint_in_background", failing_once)
    for n in range(CHECKPOINT_COMMITS - 1):
        assert db.ingest(f"evt_{n}", APP) is True
    # This commit starts the checkpoint; whether its own answer comes before the failure is a race.
    with contextlib.suppress(StorageUnavailable):
        db.ingest("evt_starts_the_checkpoint", APP)
    db.run(asyncio.sleep(0.1))  # the failed checkpoint is reported
    assert failures
    if stops:
        with pytest.raises(StorageUnavailable, match="checkpoint failed"):
            db.ingest("evt_after", APP)
        return
    for n in range(CHECKPOINT_COMMITS):  # and the next checkpoint runs
        assert db.ingest(f"evt_after_{n}", APP) is True
    db.run(asyncio.sleep(0.1))
    with contextlib.closing(sqlite3.connect(f"file:{db.path}?mode=ro&immutable=1", uri=True)) as file_only:
        # What the checkpoint after the failed one copied into the database file itself.
        assert file_only.execute("SELECT count(*) FROM events").fetchone()[0] >= CHECKPOINT_COMMITS


def test_a_background_checkpoint_holds_up_no_commit(db: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # A checkpoint that takes its time (a slow disk: a fault a test cannot cause on demand).
    started, release = threading.Event(), threading.Event()
    real = _GroupCommit._checkpoint_in_background

    def slow(self: _GroupCommit) -> bool:
        started.set()
        release.wait(10)
        return real(self)

    monkeypatch.setattr(_GroupCommit, "_checkpoint_in_background", slow)

    async def ingest_during_the_checkpoint() -> tuple[list[bool], bool]:
        for n in range(CHECKPOINT_COMMITS):
            assert await db.storage.ingest(make_event(f"evt_{n}"), [APP])
        await asyncio.to_thread(started.wait, 10)
        # The checkpoint is still running: these commit and are answered all the same.
        during = [await db.storage.ingest(make_event(f"evt_during_{n}"), [APP]) for n in range(20)]
        still_running = not release.is_set()
        release.set()
        return during, still_running

    during, still_running = db.run(ingest_during_the_checkpoint())
    assert during == [True] * 20 and still_running
    assert len(db.run(db.storage.list_events(limit=1000))) == CHECKPOINT_COMMITS + 20


def test_a_checkpoint_that_commits_wait_for_and_does_not_finish_in_time_is_waited_for_no_longer(
    db: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpoint that starts the WAL over, stuck in its fsync (a disk that stopped answering: a fault a
    # test cannot cause on demand); batches wait for it.
    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 0.3)
    started, release = threading.Event(), threading.Event()
    real = _GroupCommit._checkpoint

    def stuck(self: _GroupCommit) -> None:
        started.set()
        release.wait(10)
        real(self)

    monkeypatch.setattr(_GroupCommit, "_checkpoint", stuck)
    writer = db.storage._writer
    assert writer is not None

    async def ingest_behind_the_checkpoint() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        writer._start_checkpoint(sqlite_module.RESTART)
        await asyncio.to_thread(started.wait, 10)
        begun = loop.time()
        held = await asyncio.gather(
            db.storage.ingest(make_event("evt_held"), [APP]),
            db.storage.claim(T0 + 1, 10, LEASE, "worker"),
            return_exceptions=True,
        )
        seen: dict[str, Any] = {"held": held, "waited": loop.time() - begun, "gauge": db.storage.fsync_wait()}
        begun = loop.time()
        seen["refused"] = await asyncio.gather(db.storage.check_writable(), return_exceptions=True)
        seen["refused_in"] = loop.time() - begun
        release.set()
        for _ in range(500):
            if writer.checkpoint is None:
                break
            await asyncio.sleep(0.01)
        return seen

    try:
        seen = db.run(asyncio.wait_for(ingest_behind_the_checkpoint(), 10))
    finally:
        release.set()
    # Nothing of what waited was written: refused, a lease as well as a webhook.
    assert [type(answer) for answer in seen["held"]] == [StorageUnavailable, StorageUnavailable], seen["held"]
    assert all("no fsync has finished" in str(answer) for answer in seen["held"])
    assert 0.2 < seen["waited"] < 2 and seen["gauge"] >= 0.3, seen
    assert [type(answer) for answer in seen["refused"]] == [StorageUnavailable] and seen["refused_in"] < 0.2
    # Once it has finished, the store takes writes again.
    db.run(db.storage.check_writable())
    assert db.ingest("evt_held", APP) is True
    assert db.storage.fsync_wait() == 0


def test_the_wal_starts_over_once_checkpoints_have_copied_it(db: Harness) -> None:
    wal = Path(f"{db.path}-wal")
    sizes = []
    for round_ in range(5):
        for n in range(CHECKPOINT_COMMITS):
            assert db.ingest(f"evt_{round_}_{n}", APP) is True  # one commit each
        sizes.append(wal.stat().st_size)
    # Without starting over, five rounds of commits would make the WAL five times as long.
    assert max(sizes) < 2 * sizes[0], sizes
    with contextlib.closing(sqlite3.connect(db.path)) as other:
        assert other.execute("SELECT count(*) FROM events").fetchone()[0] == 5 * CHECKPOINT_COMMITS


async def grow_batch(db: Harness, round_: int) -> None:
    await asyncio.gather(*(db.storage.ingest(*big_event(f"evt_{round_}_{n}")) for n in range(100)))


def test_concurrent_ingests_share_commits(db: Harness) -> None:
    async def flood() -> list[bool]:
        return list(
            await asyncio.gather(
                *(db.storage.ingest(make_event(f"evt_{n}", at=T0 + n), [APP]) for n in range(300))
            )
        )

    assert db.run(flood()) == [True] * 300
    assert sum(db.commits) == 300
    assert len(db.commits) < 300, db.commits
    with contextlib.closing(sqlite3.connect(db.path)) as other:
        assert other.execute("SELECT count(*) FROM events").fetchone()[0] == 300
        assert other.execute("SELECT count(*) FROM deliveries WHERE state = 'pending'").fetchone()[0] == 300
    assert len(db.run(db.storage.list_events(limit=1000))) == 300


def test_an_attempts_result_rides_along_with_the_next_batch(
    db: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "RIDE_ALONG_DELAY", 30.0)
    db.ingest("evt_1", APP)
    db.ingest("evt_2", APP)
    first, second = db.claim(T0 + 1)
    db.commits.clear()

    async def finish_then_ingest() -> tuple[Finished, bool]:
        attempt = Attempt(1, T0 + 1, 0.1, "delivered", 200, None)
        finishing = asyncio.ensure_future(
            db.storage.finish(first.delivery, attempt, "delivered", None, T0 + 2)
        )
        await asyncio.sleep(0.1)
        assert not finishing.done()  # it waits for a batch to ride along with
        stored = await db.storage.ingest(make_event("evt_3"), [APP])
        return await finishing, stored

    assert db.run(finish_then_ingest()) == (Finished(), True)
    assert db.commits == [2]  # one commit for both
    assert db.states("evt_1") == {"app": "delivered"}

    # One the engine waits for does not ride.
    db.ingest("evt_4", APP)
    fourth = keyed(db.claim(T0 + 1))[("evt_4", "app")]
    started = time.monotonic()
    attempt = Attempt(1, T0 + 1, 0.1, "delivered", 200, None)
    db.run(db.storage.finish(fourth.delivery, attempt, "delivered", None, T0 + 2, waited_for=True))
    assert time.monotonic() - started < 5

    # Alone, it commits by itself after RIDE_ALONG_DELAY.
    monkeypatch.setattr(sqlite_module, "RIDE_ALONG_DELAY", 0.3)
    db.commits.clear()
    started = time.monotonic()
    db.finish(second, "delivered", T0 + 3)
    assert 0.3 <= time.monotonic() - started < 5
    assert db.commits == [1]
    assert db.states("evt_2") == {"app": "delivered"}


def test_riders_are_committed_before_the_store_closes(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "hookyard.db")
    harness.run(harness.storage.open())
    harness.ingest("evt_1", APP)
    [claim] = harness.claim(T0 + 1)

    async def finish_and_close() -> None:
        attempt = Attempt(1, T0 + 1, 0.1, "delivered", 200, None)
        finishing = asyncio.ensure_future(
            harness.storage.finish(claim.delivery, attempt, "delivered", None, T0 + 2)
        )
        await asyncio.sleep(0)
        await harness.storage.close()
        assert finishing.done() and finishing.result() == Finished()

    harness.run(finish_and_close())
    harness.runner.close()
    with contextlib.closing(sqlite3.connect(harness.path)) as other:
        assert other.execute("SELECT state FROM deliveries").fetchall() == [("delivered",)]


# -- claim ----------------------------------------------------------------------------------------------


def test_claim_leases_the_oldest_due_deliveries(db: Harness) -> None:
    db.ingest("evt_b", APP, at=T0 + 2)
    db.ingest("evt_a", APP, at=T0 + 1)
    db.ingest("evt_c", APP, at=T0 + 3)
    db.ingest("evt_future", APP, at=T0 + 500)

    first = db.claim(T0 + 10, limit=2)
    assert {c.event.id for c in first} == {"evt_a", "evt_b"}
    assert all(c.delivery.attempts == 1 for c in first)
    assert all(c.parent is None for c in first)
    claimed = keyed(first)[("evt_a", "app")]
    assert claimed.event.payload["data"] == {"total": 42}
    assert claimed.event.received_at == T0 + 1
    assert (claimed.delivery.route, claimed.delivery.state) == (ROUTE, "pending")

    # Leased: only the remaining due delivery can be claimed, then nothing until the lease runs out.
    assert [c.event.id for c in db.claim(T0 + 10)] == ["evt_c"]
    assert db.claim(T0 + 10) == []
    assert db.claim(T0 + 10 + LEASE - 1) == []

    again = db.claim(T0 + 10 + LEASE)
    assert {c.event.id for c in again} == {"evt_a", "evt_b", "evt_c"}
    assert all(c.delivery.attempts == 2 for c in again)
    assert db.deliveries("evt_future")["app"].attempts == 0


def test_claim_returns_the_oldest_due_first(db: Harness) -> None:
    for event_id, at in [("evt_3", T0 + 3), ("evt_1", T0 + 1), ("evt_2", T0 + 2), ("evt_0", T0)]:
        db.ingest(event_id, APP, at=at)
    assert [c.event.id for c in db.claim(T0 + 10, limit=3)] == ["evt_0", "evt_1", "evt_2"]


def test_claim_leaves_out_the_deliveries_the_caller_runs_whatever_their_lease(db: Harness) -> None:
    db.ingest("evt_mine", APP, at=T0)
    db.ingest("evt_gone", APP, at=T0 + 1)
    claims = keyed(db.claim(T0 + 2))
    mine = claims[("evt_mine", "app")].delivery.id
    lapsed = T0 + 2 + LEASE  # both leases ran out

    # evt_mine still runs in the caller (its renewals failed): left out. evt_gone's worker is gone (another
    # process, a previous run): claimed again.
    again = db.run(db.storage.claim(lapsed, 10, LEASE, "w1", running=[mine]))
    assert [(c.event.id, c.delivery.attempts) for c in again] == [("evt_gone", 2)]
    assert db.run(db.storage.next_due_at(running=[mine])) == lapsed + LEASE
    assert db.run(db.storage.next_due_at()) == T0 + 2 + LEASE
    assert db.deliveries("evt_mine")["app"].attempts == 1
    # Once it no longer runs there, it is claimed like any other.
    assert [(c.event.id, c.delivery.attempts) for c in db.claim(lapsed)] == [("evt_mine", 2)]


def damage(path: Path, sql: str) -> None:
    """Change the database file behind the store's back, as a `sqlite3` shell (or a bad disk) would."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql)
    conn.close()


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("UPDATE events SET body = X'FF00' WHERE event_id = 'evt_bad'", "JSONDecodeError"),
        ("UPDATE events SET body = 'not json' WHERE event_id = 'evt_bad'", "TypeError"),
        ("UPDATE events SET headers = CAST(X'FF' AS TEXT) WHERE event_id = 'evt_bad'", "JSONDecodeError"),
        ("DELETE FROM events WHERE event_id = 'evt_bad'", "event 1 is missing"),
    ],
    ids=["body-not-utf8", "body-text", "headers-not-utf8", "row-deleted"],
)
def test_a_claimed_delivery_whose_event_cannot_be_read_ends_dead_and_the_others_are_claimed(
    db: Harness, sql: str, reason: str
) -> None:
    told: list[Any] = []
    db.storage.on_unreadable = told.append
    ack, alert = action("ack", after="app", when="success"), action("alert", after="app", when="failure")
    db.ingest("evt_bad", APP, ack, alert, at=T0)
    db.ingest("evt_good", APP, at=T0 + 1)
    damage(db.path, sql)

    assert [c.event.id for c in db.claim(T0 + 10)] == ["evt_good"]
    [[unreadable]] = told
    delivery, event, finished = unreadable
    error = delivery.last_error or ""
    assert error.startswith("the stored event cannot be read: ") and reason in error
    assert (delivery.action, delivery.state, delivery.attempts) == ("app", "dead", 1)
    assert event.payload is None and event.headers == {}
    if reason != "event 1 is missing":
        assert (event.id, event.source, event.received_at) == ("evt_bad", "shop", T0)
        detail = db.detail("evt_bad")
        assert detail.unreadable == error and detail.event.payload is None
        assert [(a.outcome, a.error) for a in detail.attempts[delivery.id]] == [("dead", error)]
        [page] = [e for e in db.run(db.storage.events_page(since=None)) if e.event.id == "evt_bad"]
        assert page.unreadable == error
    # Settled as for any dead delivery: the one on a failure runs (and ends the same way), the other skipped.
    assert finished.activated == [(ROUTE, "alert")]
    assert [(d.action, d.state) for d in finished.skipped] == [("ack", "skipped")]
    assert db.claim(T0 + 11) == []
    assert [d.action for [(d, _event, _finished)] in told[1:]] == ["alert"]


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("UPDATE events SET source = CAST(X'73FF' AS TEXT) WHERE event_id = 'evt_bad'", "its source"),
        ("UPDATE events SET event_id = CAST(X'65FF' AS TEXT) WHERE event_id = 'evt_bad'", "its event id"),
        ("UPDATE events SET type = CAST(X'74FF' AS TEXT) WHERE event_id = 'evt_bad'", "its type"),
        (
            "UPDATE deliveries SET route = CAST(X'72FF' AS TEXT) WHERE action = 'app' AND event_seq = 1",
            "its route",
        ),
        (
            "UPDATE deliveries SET action = CAST(X'61FF' AS TEXT) WHERE action = 'app' AND event_seq = 1",
            "its action",
        ),
    ],
    ids=["source", "event-id", "type", "route", "action"],
)
@pytest.mark.parametrize("limited", [False, True], ids=["all", "concurrency"])
def test_a_claimed_delivery_whose_text_is_not_utf8_ends_dead_and_the_others_are_claimed(
    db: Harness, sql: str, reason: str, limited: bool
) -> None:
    # As a `sqlite3` shell writes it: sqlite3 fails a statement that reads such text, and with it the claim
    # of every due delivery.
    told: list[Any] = []
    db.storage.on_unreadable = told.append
    alert = action("alert", after="app", when="failure")
    db.ingest("evt_bad", APP, alert, at=T0)
    db.ingest("evt_good", APP, at=T0 + 1)
    damage(db.path, sql)

    rooms = {(ROUTE, "app"): 5} if limited else None
    claims = db.run(db.storage.claim(T0 + 10, 100, LEASE, "w1", limited=rooms))
    assert [c.event.id for c in claims] == ["evt_good"]
    [[(delivery, event, finished)]] = told
    error = delivery.last_error or ""
    assert error.startswith("the stored event cannot be read: ") and reason in error and "\ufffd" in error
    assert (delivery.state, delivery.attempts) == ("dead", 1)
    assert event.payload is None and event.headers == {}
    # Shown with U+FFFD for the byte that is not UTF-8: JSON, a log line, a metric label can hold it.
    assert "\ufffd" in event.source + event.id + event.type + delivery.route + delivery.action
    assert finished.activated == [(ROUTE, "alert")]

    # The listings show it, as the CLI and the admin API list and show it.
    listed = db.run(db.storage.list_events())
    assert len(listed) == 2 and all("\ufffd" not in e.id for e in listed if e.id == "evt_good")
    page = db.run(db.storage.events_page(since=None))
    assert [e.unreadable is not None for e in page] == [
        reason in ("its source", "its event id", "its type"),
        False,
    ]
    [bad] = [e for e in listed if e.seq == 1]
    if reason in ("its source", "its event id"):
        # Its id (or source) as listed is not the one stored: not found, rather than a failure.
        assert db.run(db.storage.get_event(bad.id, bad.source)) == []
    else:
        [detail] = db.run(db.storage.get_event(bad.id, bad.source))
        [dead] = [d for d in detail.deliveries if d.id == delivery.id]
        assert dead.state == "dead" and dead.last_error == error
    # The other delivery goes on: its attempt is recorded, and the claims after it find nothing left.
    db.finish(claims[0], "delivered", T0 + 11, status=200)
    # The one on a failure runs, on an event that can be read; else it ends dead the same way.
    event_unreadable = reason in ("its source", "its event id", "its type")
    assert [c.delivery.action for c in db.claim(T0 + 12)] == ([] if event_unreadable else ["alert"])
    assert [d.action for [(d, _event, _finished)] in told[1:]] == (["alert"] if event_unreadable else [])
    assert db.claim(T0 + 13) == []


def test_the_result_of_a_delivery_whose_dependent_s_text_is_not_utf8_is_recorded(db: Harness) -> None:
    # Reading the dependents to settle failed, and with it the record of the parent's attempt: its lease
    # ran out, and the parent was attempted again, and again.
    told: list[Any] = []
    db.storage.on_unreadable = told.append
    db.ingest("evt_bad", APP, action("alert", after="app", when="failure"), at=T0)
    damage(db.path, "UPDATE deliveries SET action = CAST(X'61FF' AS TEXT) WHERE parent_id IS NOT NULL")
    [claim] = db.claim(T0 + 10)

    finished = db.finish(claim, "dead", T0 + 11, error="HTTP 500")
    assert finished.recorded and finished.activated == [(ROUTE, "a\ufffd")]
    assert db.deliveries("evt_bad")["app"].state == "dead"
    # The dependent runs, and its claim ends it dead as any whose action is not UTF-8.
    assert db.claim(T0 + 12) == []
    [[(dependent, _event, _finished)]] = told
    assert dependent.action == "a\ufffd" and "its action is not UTF-8" in (dependent.last_error or "")


def test_claim_takes_no_more_of_an_action_than_it_has_room_for_and_none_of_a_full_one(db: Harness) -> None:
    slow, fast = action("slow"), action("fast")
    for index in range(3):
        db.ingest(f"evt_slow_{index}", slow, at=T0 + index)
    db.ingest("evt_fast", fast, at=T0 + 5)

    def claim(room: int) -> list[str]:
        claims = db.run(db.storage.claim(T0 + 10, 10, LEASE, "w1", limited={(ROUTE, "slow"): room}))
        return [c.event.id for c in claims]

    # Room for one more of slow: the oldest. The others stay due, and fast, due after them, goes ahead.
    assert claim(1) == ["evt_slow_0", "evt_fast"]
    # Full: none of it, and when the next delivery falls due is read without its queue.
    assert claim(0) == []
    assert db.run(db.storage.next_due_at(full=[(ROUTE, "slow")])) == T0 + 10 + LEASE  # a lease's end
    assert db.run(db.storage.next_due_at()) == T0 + 1
    # With room again, its queue goes on from the oldest.
    assert claim(2) == ["evt_slow_1", "evt_slow_2"]
    assert [d.attempts for d in db.deliveries("evt_slow_2").values()] == [1]


def test_ingest_with_a_lease_leaves_the_deliveries_of_a_full_action_in_the_queue(db: Harness) -> None:
    lease = Lease("w1", T0 + LEASE, limit=2, skip=frozenset({(ROUTE, "app")}))
    ingested = db.ingest_leased(make_event("evt_1"), [APP, action("audit"), action("archive")], lease)
    assert [(c.delivery.action, c.delivery.attempts) for c in ingested.claims] == [
        ("audit", 1),
        ("archive", 1),
    ]
    assert (db.deliveries("evt_1")["app"].attempts, db.deliveries("evt_1")["app"].due_at) == (0, T0)


def test_claims_walk_the_due_index_with_the_running_ones_left_out(db: Harness) -> None:
    # Whatever the backlog: a walk of deliveries_due in due order, no sort, with or without ids left out.
    for sql, params in (
        (sqlite_module.CLAIM_DUE, (T0, "[1, 2, 3]", 10)),
        (sqlite_module.NEXT_DUE, ("[1, 2, 3]",)),
        (sqlite_module.CLAIM_DUE_LIMITED, (T0, "[1, 2, 3]", '[["orders", "app"]]', 10)),
        (sqlite_module.NEXT_DUE_LIMITED, ("[]", '[["orders", "app"]]')),
        (sqlite_module.CLAIM_ALL_DUE, (T0, 10)),
        (sqlite_module.NEXT_OF_ALL_DUE, ()),
    ):
        plan = [row[3] for row in db.connection.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        assert plan[0].startswith("SEARCH deliveries USING INDEX deliveries_due"), plan
        assert not any("TEMP B-TREE" in step for step in plan), plan


def test_dependents_wait_for_their_parent(db: Harness) -> None:
    db.ingest("evt_1", APP, action("ack", after="app", when="success"))
    ack = db.deliveries("evt_1")["ack"]
    assert (ack.state, ack.due_at, ack.when) == ("waiting", None, "success")
    assert ack.parent_id == db.deliveries("evt_1")["app"].id

    assert [c.delivery.action for c in db.claim(T0 + 10)] == ["app"]
    # Only app comes back once its lease runs out; ack waits for app's final state.
    assert [(c.delivery.action, c.delivery.attempts) for c in db.claim(T0 + 10 + LEASE)] == [("app", 2)]
    assert db.run(db.storage.queue_stats(T0 + 10 + LEASE)).counts["waiting"] == 1


def test_ingest_with_a_lease_leases_deliveries_without_a_parent_up_to_its_limit(db: Harness) -> None:
    lease = Lease("w1", T0 + LEASE, limit=2)
    deliveries = [APP, action("ack", after="app", when="success"), action("audit"), action("archive")]
    event = make_event("evt_1")
    ingested = db.ingest_leased(event, deliveries, lease)

    assert ingested.new is True
    # The claims are those a claim would return: the first attempt counted, leased until the lease's end.
    assert [(c.delivery.action, c.delivery.attempts, c.delivery.due_at) for c in ingested.claims] == [
        ("app", 1, T0 + LEASE),
        ("audit", 1, T0 + LEASE),
    ]
    stored = db.deliveries("evt_1")
    assert [c.delivery.id for c in ingested.claims] == [stored["app"].id, stored["audit"].id]
    assert all(c.parent is None for c in ingested.claims)
    # The first has the event stored; each sibling its own copy, as a claim reads it back: what one
    # delivery's plugin changes, no sibling sees.
    app, audit = ingested.claims
    assert app.event is event
    assert audit.event == event == db.detail("evt_1").event
    assert audit.event.payload is not event.payload and audit.event.headers is not event.headers
    assert all(c.delivery.event_seq == stored["app"].event_seq for c in ingested.claims)
    assert (stored["ack"].state, stored["ack"].attempts) == ("waiting", 0)

    # Leased: a claim finds only what the lease left out, until the lease runs out.
    assert [(c.delivery.action, c.delivery.attempts) for c in db.claim(T0 + 10)] == [("archive", 1)]
    assert db.claim(T0 + LEASE - 1) == []
    again = db.claim(T0 + LEASE)
    assert sorted((c.delivery.action, c.delivery.attempts) for c in again) == [("app", 2), ("audit", 2)]

    # Its first attempt's late result is fenced out, as a claimed one's would be.
    assert db.finish(ingested.claims[0], "delivered", T0 + LEASE + 1, status=200) == Finished(recorded=False)
    assert db.states("evt_1")["app"] == "pending"


def test_a_duplicate_ingested_with_a_lease_leases_nothing(db: Harness) -> None:
    assert db.ingest("evt_1", APP) is True
    again = db.ingest_leased(make_event("evt_1"), [APP], Lease("w1", T0 + LEASE, 1))
    assert (again.new, again.claims) == (False, ())
    # The first copy's delivery is as it was: due, not leased.
    assert [(c.event.id, c.delivery.attempts) for c in db.claim(T0 + 10)] == [("evt_1", 1)]


def test_a_delivery_leased_at_ingest_finishes_and_releases_its_dependents(db: Harness) -> None:
    lease = Lease("w1", T0 + LEASE, limit=5)
    deliveries = [APP, action("ack", after="app", when="success")]
    [app] = db.ingest_leased(make_event("evt_1"), deliveries, lease).claims
    finished = db.finish(app, "delivered", T0 + 1, status=200)
    assert finished.activated == [(ROUTE, "ack")]
    assert db.states("evt_1") == {"app": "delivered", "ack": "pending"}
    assert [(c.delivery.action, c.parent) for c in db.claim(T0 + 2)] == [
        ("ack", ParentResult("app", "delivered", 1, 200, None))
    ]


def test_a_delivered_result_with_no_dependent_waiting_runs_no_select_of_them(db: Harness) -> None:
    # Most deliveries have no dependent: the UPDATE that records the result checks for one itself, so
    # no statement of its own looks for dependents to settle.
    lease = Lease("w1", T0 + LEASE, limit=5)
    [app] = db.ingest_leased(make_event("evt_1"), [APP], lease).claims
    statements: list[str] = []
    db.connection.set_trace_callback(statements.append)
    try:
        assert db.finish(app, "delivered", T0 + 1, status=200) == Finished()
    finally:
        db.connection.set_trace_callback(None)
    assert not [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")], statements
    assert db.states("evt_1") == {"app": "delivered"}
    [attempt] = db.detail("evt_1").attempts[app.delivery.id]
    assert (attempt.number, attempt.outcome, attempt.status_code) == (1, "delivered", 200)
    # A late copy of the same result is fenced out, as before.
    assert db.finish(app, "delivered", T0 + 2, status=200) == Finished(recorded=False)


def test_a_dependent_added_while_its_parent_is_in_flight_is_released_by_its_result(db: Harness) -> None:
    # Leased at ingest with no dependent, then a replay of missing deliveries (from any process) adds one
    # that waits for it: the result, recorded after, must still release it.
    lease = Lease("w1", T0 + LEASE, limit=5)
    [app] = db.ingest_leased(make_event("evt_1"), [APP], lease).claims
    seq = db.detail("evt_1").seq
    assert db.run(db.storage.add_deliveries(seq, [action("ack", after="app", when="success")], T0 + 1)) == 1
    assert db.states("evt_1") == {"app": "pending", "ack": "waiting"}
    finished = db.finish(app, "delivered", T0 + 2, status=200)
    assert (finished.recorded, finished.activated) == (True, [(ROUTE, "ack")])
    assert db.states("evt_1") == {"app": "delivered", "ack": "pending"}
    [attempt] = db.detail("evt_1").attempts[app.delivery.id]
    assert (attempt.number, attempt.outcome) == (1, "delivered")
    # Fenced out with a dependent waiting as well: nothing recorded twice.
    assert db.finish(app, "delivered", T0 + 3, status=200) == Finished(recorded=False)
    assert len(db.detail("evt_1").attempts[app.delivery.id]) == 1


def test_the_records_made_for_every_delivery_are_immutable_tuples() -> None:
    # Made for every forwarded webhook: as frozen dataclasses each field cost an object.__setattr__ call,
    # about three times a NamedTuple's whole construction. Immutable either way.
    delivery, lease = NewDelivery(ROUTE, "app"), Lease("w1", T0 + LEASE, 1)
    attempt = Attempt(1, T0, 0.25, "delivered", 200)
    for record, field in [(delivery, "route"), (lease, "owner"), (attempt, "number")]:
        assert isinstance(record, tuple)
        with pytest.raises(AttributeError):
            setattr(record, field, None)
    assert delivery == APP and delivery.after is None
    assert lease.skip == frozenset()
    assert attempt.error is None


# -- finish ---------------------------------------------------------------------------------------------


def test_retry_makes_the_delivery_due_again_later(db: Harness) -> None:
    db.ingest("evt_1", APP)
    [claim] = db.claim(T0 + 1)
    finished = db.finish(claim, "pending", T0 + 2, due_at=T0 + 30, status=503, error="HTTP 503")
    assert finished == Finished()

    record = db.deliveries("evt_1")["app"]
    assert (record.state, record.due_at, record.attempts) == ("pending", T0 + 30, 1)
    assert (record.last_status, record.last_error, record.finished_at) == (503, "HTTP 503", None)
    assert db.claim(T0 + 29) == []
    [again] = db.claim(T0 + 30)
    assert again.delivery.attempts == 2


@pytest.mark.parametrize("state", ["delivered", "dead"])
def test_delivered_and_dead_are_final(db: Harness, state: str) -> None:
    db.ingest("evt_1", APP)
    [claim] = db.claim(T0 + 1)
    db.finish(claim, state, T0 + 2, status=200 if state == "delivered" else 400)

    record = db.deliveries("evt_1")["app"]
    assert (record.state, record.finished_at) == (state, T0 + 2)
    assert db.claim(T0 + 10 * LEASE) == []
    assert db.run(db.storage.next_due_at()) is None

    # A second report for the same attempt changes nothing.
    assert db.finish(claim, "pending", T0 + 3, due_at=T0 + 4) == Finished(recorded=False)
    assert db.deliveries("evt_1")["app"].state == state
    assert db.claim(T0 + 10 * LEASE) == []


def test_a_webhook_s_delivery_and_its_delivered_result_bind_no_none_and_no_bool(
    db: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sqlite3 binds each None or bool through its adapters (a tuple, a lookup and a call per parameter):
    # the statements of every webhook's delivery and of its result have what is NULL in their text.
    adapted: list[object] = []

    def counted(value: object) -> object:
        adapted.append(value)
        return value

    for kind in (type(None), bool):
        monkeypatch.setitem(sqlite3.adapters, (kind, sqlite3.PrepareProtocol), counted)
    [app] = db.ingest_leased(make_event("evt_1"), [APP], Lease("w1", T0 + LEASE, limit=5)).claims
    db.finish(app, "delivered", T0 + 1, status=200)
    assert adapted == []

    record = db.deliveries("evt_1")["app"]
    assert (record.state, record.due_at, record.parent_id, record.when) == ("delivered", None, None, None)
    assert (record.last_status, record.last_error, record.finished_at) == (200, None, T0 + 1)
    [row] = db.connection.execute("SELECT verified FROM events").fetchall()
    assert row == (1,)
    [attempt] = db.connection.execute("SELECT number, outcome, status_code, error FROM attempts").fetchall()
    assert attempt == (1, "delivered", 200, None)


def test_a_stale_attempt_cannot_finish_a_delivery_claimed_again(db: Harness) -> None:
    db.ingest("evt_1", APP, action("ack", after="app", when="success"))
    [first] = db.claim(T0 + 1)
    [second] = db.claim(T0 + 1 + LEASE)  # the first worker's lease ran out
    assert (first.delivery.attempts, second.delivery.attempts) == (1, 2)

    # The first worker finally reports: it was fenced out, so nothing changes, and the answer says so.
    finished = db.finish(first, "delivered", T0 + 2 + LEASE, status=200)
    assert finished == Finished(recorded=False)
    records = db.deliveries("evt_1")
    assert (records["app"].state, records["app"].attempts, records["app"].finished_at) == ("pending", 2, None)
    assert records["ack"].state == "waiting"
    assert db.detail("evt_1").attempts[records["app"].id] == []
    assert db.claim(T0 + 3 + LEASE) == []

    # The current worker's report counts.
    finished = db.finish(second, "delivered", T0 + 4 + LEASE, status=200)
    assert finished.activated == [(ROUTE, "ack")]
    assert db.states("evt_1") == {"app": "delivered", "ack": "pending"}


DEPENDENTS = (
    APP,
    action("on_success", after="app", when="success"),
    action("on_failure", after="app", when="failure"),
    action("always", after="app", when="always"),
    action("after_success", after="on_success", when="always"),
    action("after_failure", after="on_failure", when="always"),
)


def test_a_delivered_parent_runs_success_and_always_and_skips_failure(db: Harness) -> None:
    db.ingest("evt_1", *DEPENDENTS)
    [parent] = db.claim(T0 + 1)
    finished = db.finish(parent, "delivered", T0 + 2, status=202)

    assert sorted(finished.activated) == [(ROUTE, "always"), (ROUTE, "on_success")]
    assert sorted((d.route, d.action) for d in finished.skipped) == [
        (ROUTE, "after_failure"),
        (ROUTE, "on_failure"),
    ]
    assert db.states("evt_1") == {
        "app": "delivered",
        "on_success": "pending",
        "on_failure": "skipped",
        "always": "pending",
        "after_success": "waiting",
        "after_failure": "skipped",
    }
    skipped = db.deliveries("evt_1")["after_failure"]
    assert skipped.finished_at == T0 + 2

    claims = db.claim(T0 + 2)
    assert sorted(c.delivery.action for c in claims) == ["always", "on_success"]
    for claim in claims:
        assert claim.parent == ParentResult("app", "delivered", 1, 202, None)

    # One level further down: after_success runs once on_success is done.
    on_success = keyed(claims)[("evt_1", "on_success")]
    finished = db.finish(on_success, "dead", T0 + 3, status=400, error="HTTP 400")
    assert finished.activated == [(ROUTE, "after_success")]
    [grandchild] = db.claim(T0 + 3)
    assert grandchild.delivery.action == "after_success"
    assert grandchild.parent == ParentResult("on_success", "dead", 1, 400, "HTTP 400")


def test_a_dead_parent_runs_failure_and_always_and_skips_success(db: Harness) -> None:
    db.ingest("evt_1", *DEPENDENTS)
    [parent] = db.claim(T0 + 1)
    finished = db.finish(parent, "dead", T0 + 2, status=410, error="HTTP 410")

    assert sorted(finished.activated) == [(ROUTE, "always"), (ROUTE, "on_failure")]
    assert sorted((d.route, d.action) for d in finished.skipped) == [
        (ROUTE, "after_success"),
        (ROUTE, "on_success"),
    ]
    assert db.states("evt_1") == {
        "app": "dead",
        "on_success": "skipped",
        "on_failure": "pending",
        "always": "pending",
        "after_success": "skipped",
        "after_failure": "waiting",
    }
    claims = db.claim(T0 + 2)
    assert sorted(c.delivery.action for c in claims) == ["always", "on_failure"]
    assert {c.parent for c in claims} == {ParentResult("app", "dead", 1, 410, "HTTP 410")}


def test_a_skipped_parent_skips_every_dependent(db: Harness) -> None:
    db.ingest("evt_1", *DEPENDENTS)
    [parent] = db.claim(T0 + 1)
    finished = db.finish(parent, "skipped", T0 + 2, error="nothing to do")
    assert finished.activated == []
    assert len(finished.skipped) == 5
    assert set(db.states("evt_1").values()) == {"skipped"}


def test_a_retry_leaves_dependents_waiting(db: Harness) -> None:
    db.ingest("evt_1", *DEPENDENTS)
    [parent] = db.claim(T0 + 1)
    assert db.finish(parent, "pending", T0 + 2, due_at=T0 + 5, status=500) == Finished()
    assert list(db.states("evt_1").values()).count("waiting") == 5


# -- release --------------------------------------------------------------------------------------------


def test_release_makes_leased_deliveries_due_at_once(db: Harness) -> None:
    db.ingest("evt_1", APP, at=T0)
    db.ingest("evt_2", APP, at=T0 + 1)
    claims = keyed(db.claim(T0 + 2))
    db.run(db.storage.release([claims[("evt_1", "app")].delivery.id], T0 + 3, "w1"))

    assert db.claim(T0 + 2) == []  # due at the release time, not before
    [again] = db.claim(T0 + 3)
    assert again.event.id == "evt_1"
    stats = db.run(db.storage.queue_stats(T0 + 3))
    assert stats.counts["in_flight"] == 2


def test_release_leaves_a_recorded_result_and_other_owners_leases_alone(db: Harness) -> None:
    db.ingest("evt_1", APP, at=T0)
    db.ingest("evt_2", APP, at=T0 + 1)
    claims = keyed(db.claim(T0 + 2, owner="w1"))
    retried = claims[("evt_1", "app")]
    db.finish(retried, "pending", T0 + 3, due_at=T0 + 60, status=500)  # a retry, due after its backoff
    # w1 stops: its task for evt_1 was cancelled after that result was committed; evt_2's lease is w1's.
    ids = [claim.delivery.id for claim in claims.values()]
    db.run(db.storage.release(ids, T0 + 4, "w2"))  # not w2's leases: nothing changes
    db.run(db.storage.release(ids, T0 + 4, "w1"))

    [again] = db.claim(T0 + 4)
    assert again.event.id == "evt_2"  # given back, due at once
    assert db.claim(T0 + 59) == []  # evt_1 keeps its backoff
    [retry] = db.claim(T0 + 60)
    assert (retry.event.id, retry.delivery.attempts) == ("evt_1", 2)


def test_release_all_leases_after_a_crash(db: Harness) -> None:
    db.ingest("evt_1", APP, at=T0)
    db.ingest("evt_2", APP, at=T0 + 1)
    db.ingest("evt_later", APP, at=T0 + 1000)
    db.claim(T0 + 2, owner="crashed")
    assert db.run(db.storage.release_all_leases(T0 + 5)) == 2

    stats = db.run(db.storage.queue_stats(T0 + 5))
    assert stats.counts == {"due": 2, "scheduled": 1, "in_flight": 0, "waiting": 0}
    assert {c.event.id for c in db.claim(T0 + 5)} == {"evt_1", "evt_2"}
    assert db.deliveries("evt_later")["app"].due_at == T0 + 1000


# -- queue stats ----------------------------------------------------------------------------------------


def test_queue_stats_and_next_due_at(db: Harness) -> None:
    empty = db.run(db.storage.queue_stats(T0))
    assert empty.counts == {"due": 0, "scheduled": 0, "in_flight": 0, "waiting": 0}
    assert empty.oldest_pending_since is None and empty.oldest_due_at is None
    assert db.run(db.storage.next_due_at()) is None

    db.ingest("evt_inflight", APP, action("ack", after="app"), at=T0)
    db.claim(T0, lease=60)  # in flight until T0 + 60
    db.ingest("evt_retry", APP, at=T0 + 1)
    [retry] = db.claim(T0 + 1)
    db.finish(retry, "pending", T0 + 1, due_at=T0 + 100)  # scheduled
    db.ingest("evt_due", APP, at=T0 + 5)

    stats = db.run(db.storage.queue_stats(T0 + 10))
    assert stats.counts == {"due": 1, "scheduled": 1, "in_flight": 1, "waiting": 1}
    # The oldest pending counts from when a delivery became pending, retries included: evt_inflight's
    # app, at T0. The lag only counts what waits for a worker: evt_due, due since T0 + 5.
    assert stats.oldest_pending_since == T0
    assert stats.oldest_due_at == T0 + 5
    assert db.run(db.storage.next_due_at()) == T0 + 5

    assert db.run(db.storage.queue_stats(T0 + 2)).counts == {
        "due": 0,
        "scheduled": 2,
        "in_flight": 1,
        "waiting": 1,
    }

    db.claim(T0 + 10, lease=20)  # evt_due, leased until T0 + 30
    assert db.run(db.storage.next_due_at()) == T0 + 30
    stats = db.run(db.storage.queue_stats(T0 + 10))
    assert stats.counts == {"due": 0, "scheduled": 1, "in_flight": 2, "waiting": 1}
    assert stats.oldest_pending_since == T0
    assert stats.oldest_due_at is None  # nothing waits for a worker


def test_size_on_disk_is_the_file_with_its_wal_and_grows_with_the_events(db: Harness) -> None:
    wal = db.path.with_name(db.path.name + "-wal")

    def on_disk() -> int:
        return db.path.stat().st_size + wal.stat().st_size

    db.settle()
    before = db.run(db.storage.size_on_disk())
    assert before == on_disk()
    padding = "x" * 4096
    for n in range(200):
        event = make_event(f"evt_{n}")
        event.body = json.dumps({"id": event.id, "type": event.type, "padding": padding}).encode()
        db.run(db.storage.ingest(event, [APP]))
    db.settle()
    assert wal.stat().st_size > 0  # what is not checkpointed yet counts too
    after = db.run(db.storage.size_on_disk())
    assert after == on_disk()
    assert after > before + 100 * 4096  # the bodies are in the file or in its WAL


# -- inspection -----------------------------------------------------------------------------------------


def test_list_events_by_state_source_and_time(db: Harness) -> None:
    db.ingest("evt_pending", APP, at=T0 + 1, source="shop")
    db.ingest("evt_delivered", APP, at=T0 + 2, source="shop", type_="order.paid")
    db.ingest("evt_dead", APP, at=T0 + 3, source="billing")
    db.ingest("evt_unrouted", at=T0 + 4, source="billing")
    db.ingest("evt_mixed", APP, action("audit"), at=T0 + 5, source="shop")
    db.ingest("evt_waiting", APP, action("ack", after="app"), at=T0 + 6, source="shop")
    claims = keyed(db.claim(T0 + 10))
    for event_id, key, state in [
        ("evt_delivered", "app", "delivered"),
        ("evt_dead", "app", "dead"),
        ("evt_mixed", "app", "delivered"),
        ("evt_mixed", "audit", "dead"),
        ("evt_waiting", "app", "pending"),
    ]:
        db.finish(claims[(event_id, key)], state, T0 + 11, due_at=T0 + 50 if state == "pending" else None)

    def ids(**filters: Any) -> list[str]:
        return [summary.id for summary in db.run(db.storage.list_events(**filters))]

    everything = db.run(db.storage.list_events())
    assert [(e.id, e.state) for e in everything] == [
        ("evt_waiting", "pending"),
        ("evt_mixed", "dead"),
        ("evt_unrouted", "unrouted"),
        ("evt_dead", "dead"),
        ("evt_delivered", "delivered"),
        ("evt_pending", "pending"),
    ]
    delivered = everything[-2]
    assert (delivered.source, delivered.type, delivered.received_at) == ("shop", "order.paid", T0 + 2)
    assert everything[0].seq > everything[1].seq

    assert ids(state="pending") == ["evt_waiting", "evt_pending"]
    assert ids(state="delivered") == ["evt_delivered"]
    assert ids(state="dead") == ["evt_mixed", "evt_dead"]
    assert ids(state="unrouted") == ["evt_unrouted"]
    assert ids(source="billing") == ["evt_unrouted", "evt_dead"]
    assert ids(source="shop", state="dead") == ["evt_mixed"]
    assert ids(since=T0 + 4) == ["evt_waiting", "evt_mixed", "evt_unrouted"]
    assert ids(since=T0 + 4, state="dead") == ["evt_mixed"]
    assert ids(limit=2) == ["evt_waiting", "evt_mixed"]
    assert ids(state="pending", limit=1) == ["evt_waiting"]
    assert ids(source="nobody") == []


def test_a_listing_takes_no_write_lock_and_waits_for_none(db: Harness) -> None:
    db.ingest("evt_1", APP)
    # Filtered by state, a listing walks every event: seconds in a large database. Run as a write
    # transaction, `hookyard events list --state dead` held the file's write lock that long, and the
    # serving process's batches waited for it with their event loop stopped. Another writer holding the
    # lock (as that serving process's batch does) does not hold a listing up either.
    with contextlib.closing(sqlite3.connect(db.path, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE deliveries SET last_error = 'x'")
        started = time.perf_counter()
        assert [e.id for e in db.run(db.storage.list_events(state="pending"))] == ["evt_1"]
        # The same for what bulk replays page through (narrowed to a rare source: a long walk too).
        assert [e.event.id for e in db.run(db.storage.events_page(since=None, source="shop"))] == ["evt_1"]
        assert db.run(db.storage.dead_delivery_ids(since=None, source="shop")) == []
        assert time.perf_counter() - started < 3  # a wait for the lock would take BUSY_TIMEOUT, 5 s
        writer.execute("ROLLBACK")


def test_get_event_returns_deliveries_and_attempts_in_order(db: Harness) -> None:
    db.ingest("evt_1", APP, action("audit"), action("ack", after="app", when="always"))
    claims = keyed(db.claim(T0 + 1))
    db.finish(claims[("evt_1", "audit")], "delivered", T0 + 1, status=204)
    db.finish(claims[("evt_1", "app")], "pending", T0 + 2, due_at=T0 + 3, status=500, error="HTTP 500")
    [app] = db.claim(T0 + 3)
    db.finish(app, "pending", T0 + 4, due_at=T0 + 5, error="connect timeout")
    [app] = db.claim(T0 + 5)
    db.finish(app, "delivered", T0 + 6, status=200)

    detail = db.detail("evt_1")
    assert detail.event.id == "evt_1"
    assert [(d.action, d.state, d.attempts) for d in detail.deliveries] == [
        ("app", "delivered", 3),
        ("audit", "delivered", 1),
        ("ack", "pending", 0),
    ]
    app_record, audit_record, ack_record = detail.deliveries
    assert (app_record.last_status, app_record.last_error) == (200, None)
    history = detail.attempts[app_record.id]
    assert [(a.number, a.outcome, a.status_code, a.error) for a in history] == [
        (1, "retry", 500, "HTTP 500"),
        (2, "retry", None, "connect timeout"),
        (3, "delivered", 200, None),
    ]
    assert [a.started_at for a in history] == [T0 + 1.75, T0 + 3.75, T0 + 5.75]
    assert all(a.duration == 0.25 for a in history)
    assert [a.status_code for a in detail.attempts[audit_record.id]] == [204]
    assert detail.attempts[ack_record.id] == []
    assert db.run(db.storage.get_event("evt_missing")) == []
    assert db.run(db.storage.get_event("evt_1", source="other")) == []


def test_a_lease_that_has_run_out_is_not_in_flight(tmp_path: Path) -> None:
    """`events show` said `in_flight: true` for a delivery whose lease a crashed process left behind, until
    the next start released it, and showed no next attempt (and hookyard_delivery_queue counted it in
    flight): none of it runs, and it is due since its lease ended. Read by the clock, as `events show`
    reads it."""
    path = tmp_path / "hookyard.db"
    now = time.time()
    with opened_harness(path) as crashed:
        # One leased now for a minute, another for a minute ten minutes ago; the process then dies with both.
        crashed.ingest("evt_running", APP, at=now - 1)
        [running] = crashed.claim(now, lease=60)
        crashed.ingest("evt_stale", APP, at=now - 600)
        [stale] = crashed.claim(now - 600, lease=60)
    with opened_harness(path) as reopened:
        stale_detail, running_detail = reopened.detail("evt_stale"), reopened.detail("evt_running")
        # The queue gauge counts them so too: the stale one waits for a worker, and its lag runs.
        stats = reopened.run(reopened.storage.queue_stats(now))
    assert (stats.counts["in_flight"], stats.counts["due"]) == (1, 1)
    assert stats.oldest_due_at == now - 540
    assert stale_detail.in_flight == frozenset()
    assert running_detail.in_flight == {running.delivery.id}
    [stale_view] = detail_view(stale_detail)["deliveries"]
    [running_view] = detail_view(running_detail)["deliveries"]
    assert (stale_view["state"], stale_view["in_flight"]) == ("pending", False)
    assert stale_view["next_attempt_at"] == iso(now - 540)
    assert (running_view["state"], running_view["in_flight"], running_view["next_attempt_at"]) == (
        "pending",
        True,
        None,
    )
    assert stale.delivery.event_seq != running.delivery.event_seq


# -- replay ---------------------------------------------------------------------------------------------


def finished_event(db: Harness) -> int:
    """evt_1: app dead, its `always` dependent ack delivered, audit delivered, slow still in flight."""
    db.ingest("evt_1", APP, action("ack", after="app", when="always"), action("audit"), action("slow"))
    claims = keyed(db.claim(T0 + 1, lease=1000))
    db.finish(claims[("evt_1", "app")], "dead", T0 + 2, status=400)
    db.finish(claims[("evt_1", "audit")], "delivered", T0 + 2, status=200)
    [ack] = db.claim(T0 + 2, lease=1000)
    db.finish(ack, "delivered", T0 + 3, status=200)
    assert db.states("evt_1") == {"app": "dead", "ack": "delivered", "audit": "delivered", "slow": "pending"}
    return db.detail("evt_1").seq


def test_replay_event_reruns_finished_deliveries_and_rewinds_dependents(db: Harness) -> None:
    seq = finished_event(db)
    assert db.run(db.storage.replay_event(seq, now=T0 + 100)) == 2

    records = db.deliveries("evt_1")
    assert {k: (r.state, r.attempts) for k, r in records.items()} == {
        "app": ("pending", 0),
        "ack": ("waiting", 0),
        "audit": ("pending", 0),
        "slow": ("pending", 1),  # in flight: untouched
    }
    assert (records["app"].due_at, records["app"].finished_at) == (T0 + 100, None)
    assert records["ack"].due_at is None
    assert records["slow"].due_at == T0 + 1 + 1000
    assert db.run(db.storage.queue_stats(T0 + 100)).counts == {
        "due": 2,
        "scheduled": 0,
        "in_flight": 1,
        "waiting": 1,
    }
    assert db.claim(T0 + 99) == []
    claims = db.claim(T0 + 100)
    assert sorted(c.delivery.action for c in claims) == ["app", "audit"]
    assert all(c.delivery.attempts == 1 for c in claims)
    # The attempt history is kept.
    detail = db.detail("evt_1")
    assert len(detail.attempts[records["app"].id]) == 1


def dead_after_two_attempts(db: Harness) -> int:
    """evt_1: app dead after a retry, its `always` dependent ack delivered; answers its seq."""
    db.ingest("evt_1", APP, action("ack", after="app", when="always"))
    [app] = db.claim(T0 + 1)
    db.finish(app, "pending", T0 + 2, due_at=T0 + 3, status=500)
    [app] = db.claim(T0 + 3)
    db.finish(app, "dead", T0 + 4, status=500)
    [ack] = db.claim(T0 + 4)
    db.finish(ack, "delivered", T0 + 5, status=200)
    return db.detail("evt_1").seq


def replay_and_deliver(db: Harness, seq: int, now: float) -> tuple[DeliveryRecord, DeliveryRecord]:
    """Replay evt_1 and deliver app then ack: the records they were claimed with."""
    assert db.run(db.storage.replay_event(seq, now=now)) == 1
    [app] = db.claim(now)
    db.finish(app, "delivered", now + 1, status=200)
    [ack] = db.claim(now + 1)
    db.finish(ack, "delivered", now + 2, status=200)
    return app.delivery, ack.delivery


def numbers(db: Harness) -> dict[str, list[int]]:
    detail = db.detail("evt_1")
    return {d.action: [a.number for a in detail.attempts[d.id]] for d in detail.deliveries}


def test_a_replayed_delivery_numbers_its_attempts_on_and_counts_its_round_from_1(db: Harness) -> None:
    seq = dead_after_two_attempts(db)
    app, ack = replay_and_deliver(db, seq, T0 + 100)
    # The round's count drives the retry schedule, and starts over; the number goes on from the rounds
    # before, so that no number in the history names two attempts.
    assert (app.attempts, app.attempt_number) == (1, 3)
    assert (ack.attempts, ack.attempt_number) == (1, 2)
    assert numbers(db) == {"app": [1, 2, 3], "ack": [1, 2]}
    app, ack = replay_and_deliver(db, seq, T0 + 200)
    assert (app.attempts, app.attempt_number) == (1, 4)
    assert numbers(db) == {"app": [1, 2, 3, 4], "ack": [1, 2, 3]}
    # A bulk replay of dead deliveries starts a round as one event's replay does.
    assert db.run(db.storage.replay_event(seq, "app", now=T0 + 300)) == 1
    [claim] = db.claim(T0 + 300)
    db.finish(claim, "dead", T0 + 301, status=500)
    assert db.replay_dead(since=None, now=T0 + 400) == 1
    [claim] = db.claim(T0 + 400)
    assert (claim.delivery.attempts, claim.delivery.attempt_number) == (1, 6)


def test_a_database_made_before_attempts_were_numbered_across_replays_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    column = "    attempts_before INTEGER NOT NULL DEFAULT 0,\n"
    assert column in sqlite_module.SCHEMA
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(sqlite_module.SCHEMA.replace(column, ""))
    for _ in range(2):  # added once, and found there when opened again
        harness = Harness(path)
        harness.run(harness.storage.open())
        try:
            if not harness.run(harness.storage.get_event("evt_1")):
                seq = dead_after_two_attempts(harness)
                replay_and_deliver(harness, seq, T0 + 100)
            assert numbers(harness) == {"app": [1, 2, 3], "ack": [1, 2]}
        finally:
            harness.run(harness.storage.close())
            harness.runner.close()


def test_a_round_an_earlier_version_replayed_numbers_on_past_every_recorded_attempt(tmp_path: Path) -> None:
    # An earlier version numbered each replayed round from 1 and had no attempts_before: a delivery still
    # retrying (or a dependent waiting) when the gateway was upgraded went on from its round's count, and
    # numbered an attempt as one of the round before.
    path = tmp_path / "old.db"
    db = Harness(path)
    db.run(db.storage.open())
    dead_after_two_attempts(db)
    ids = {name: record.id for name, record in db.deliveries("evt_1").items()}
    reset = "UPDATE deliveries SET state = ?, due_at = ?, attempts = 0, finished_at = NULL WHERE id = ?"
    db.connection.execute(reset, ("pending", T0 + 100, ids["app"]))
    db.connection.execute(reset, ("waiting", None, ids["ack"]))
    [app] = db.claim(T0 + 100)
    db.finish(app, "pending", T0 + 101, due_at=T0 + 200, status=500, number=app.delivery.attempts)
    db.connection.execute("ALTER TABLE deliveries DROP COLUMN attempts_before")
    db.run(db.storage.close())
    db.runner.close()
    db = Harness(path)
    db.run(db.storage.open())
    try:
        [app] = db.claim(T0 + 200)
        db.finish(app, "dead", T0 + 201, status=500)
        [ack] = db.claim(T0 + 201)
        db.finish(ack, "delivered", T0 + 202, status=200)
        # The earlier version's own repeat (app's second 1) stays; none is added.
        assert numbers(db) == {"app": [1, 2, 1, 3], "ack": [1, 2]}
    finally:
        db.run(db.storage.close())
        db.runner.close()


def test_replay_event_of_one_action(db: Harness) -> None:
    seq = finished_event(db)
    assert db.run(db.storage.replay_event(seq, "audit", now=T0 + 100)) == 1
    assert db.states("evt_1") == {"app": "dead", "ack": "delivered", "audit": "pending", "slow": "pending"}
    # A dependent can be replayed on its own; in-flight or unknown actions are not reset.
    assert db.run(db.storage.replay_event(seq, "ack", now=T0 + 100)) == 1
    assert db.states("evt_1")["ack"] == "pending"
    assert db.run(db.storage.replay_event(seq, "slow", now=T0 + 100)) == 0
    assert db.run(db.storage.replay_event(seq, "nope", now=T0 + 100)) == 0
    assert sorted(c.delivery.action for c in db.claim(T0 + 100)) == ["ack", "audit"]


def test_a_dependent_replayed_below_a_skipped_parent_is_skipped_with_its_own(db: Harness) -> None:
    db.ingest(
        "evt_1",
        APP,
        action("alert", after="app", when="failure"),
        action("ack", after="alert", when="always"),
        action("audit", after="ack", when="always"),
    )
    [app] = db.claim(T0 + 1)
    db.finish(app, "delivered", T0 + 2, status=200)
    assert db.states("evt_1") == {
        "app": "delivered",
        "alert": "skipped",
        "ack": "skipped",
        "audit": "skipped",
    }
    seq = db.detail("evt_1").seq
    # ack replayed on its own: its parent has no result to tell it, neither success nor failure.
    assert db.run(db.storage.replay_event(seq, "ack", now=T0 + 10)) == 1
    assert db.states("evt_1")["audit"] == "waiting"
    assert db.claim(T0 + 10) == []
    records = db.deliveries("evt_1")
    assert {k: (r.state, r.attempts) for k, r in records.items()} == {
        "app": ("delivered", 1),
        "alert": ("skipped", 0),
        "ack": ("skipped", 0),
        "audit": ("skipped", 0),
    }
    assert records["ack"].last_error == "parent did not reach the required state"


def test_a_dependent_replayed_on_its_own_follows_its_when_on_the_parents_result(db: Harness) -> None:
    db.ingest(
        "evt_1",
        APP,
        action("alert", after="app", when="failure"),
        action("ack", after="app", when="success"),
        action("audit", after="alert", when="always"),
    )
    [app] = db.claim(T0 + 1)
    db.finish(app, "delivered", T0 + 2, status=200)
    [ack] = db.claim(T0 + 2)
    db.finish(ack, "delivered", T0 + 3, status=200)
    seq = db.detail("evt_1").seq
    for key in ("alert", "ack"):
        assert db.run(db.storage.replay_event(seq, key, now=T0 + 10)) == 1
    # alert runs only on a failure and app was delivered: skipped again (its own with it), never sent; ack
    # runs on the success it asks for.
    claims = db.claim(T0 + 10)
    assert [(c.delivery.action, c.parent) for c in claims] == [
        ("ack", ParentResult("app", "delivered", 1, 200, None))
    ]
    records = db.deliveries("evt_1")
    assert {k: (r.state, r.attempts) for k, r in records.items()} == {
        "app": ("delivered", 1),
        "alert": ("skipped", 0),
        "ack": ("pending", 1),
        "audit": ("skipped", 0),
    }


def test_replay_dead_since_and_by_source(db: Harness) -> None:
    db.ingest("evt_old", APP, at=T0, source="shop")
    db.ingest("evt_recent", APP, action("ack", after="app", when="failure"), at=T0 + 1, source="shop")
    db.ingest("evt_billing", APP, at=T0 + 2, source="billing")
    db.ingest("evt_ok", APP, at=T0 + 3, source="shop")
    db.ingest("evt_waiting", APP, at=T0 + 4, source="shop")
    claims = keyed(db.claim(T0 + 5, lease=1000))
    db.finish(claims[("evt_old", "app")], "dead", T0 + 10)
    db.finish(claims[("evt_recent", "app")], "dead", T0 + 500)
    db.finish(claims[("evt_billing", "app")], "dead", T0 + 600)
    db.finish(claims[("evt_ok", "app")], "delivered", T0 + 600)
    [ack] = db.claim(T0 + 500)
    db.finish(ack, "delivered", T0 + 501)
    # evt_waiting's app stays in flight.

    assert db.replay_dead(since=T0 + 100, source="shop", now=T0 + 700) == 1
    assert db.states("evt_recent") == {"app": "pending", "ack": "waiting"}
    assert db.deliveries("evt_recent")["app"].attempts == 0
    assert db.states("evt_old") == {"app": "dead"}
    assert db.states("evt_billing") == {"app": "dead"}

    assert db.replay_dead(since=T0 + 100, now=T0 + 700) == 1
    assert db.states("evt_billing") == {"app": "pending"}
    assert db.states("evt_old") == {"app": "dead"}

    assert db.replay_dead(since=None, now=T0 + 700) == 1
    assert db.states("evt_old") == {"app": "pending"}
    assert db.states("evt_ok") == {"app": "delivered"}
    assert db.deliveries("evt_waiting")["app"].attempts == 1
    assert db.replay_dead(since=None, now=T0 + 700) == 0
    assert {c.event.id for c in db.claim(T0 + 700)} == {"evt_old", "evt_recent", "evt_billing"}


def test_added_deliveries_wait_for_a_parent_added_with_them_or_stored_before(db: Harness) -> None:
    db.ingest("evt_1", APP)
    seq = db.detail("evt_1").seq
    added = [action("alert", after="app", when="failure"), action("audit"), action("log", after="audit")]
    assert db.run(db.storage.add_deliveries(seq, added, T0 + 5)) == 3
    records = db.deliveries("evt_1")
    assert {key: (r.state, r.parent_id) for key, r in records.items()} == {
        "app": ("pending", None),
        "alert": ("waiting", records["app"].id),
        "audit": ("pending", None),
        "log": ("waiting", records["audit"].id),
    }


def test_two_replays_adding_the_same_missing_deliveries_at_once_create_them_once(db: Harness) -> None:
    db.ingest("evt_1")
    [stored] = db.run(db.storage.events_page(since=None))
    missing = [APP, action("audit", after="app")]

    async def both() -> list[int]:
        # Both read the event without deliveries before either adds what it found missing.
        add = db.storage.add_deliveries
        return list(await asyncio.gather(add(stored.seq, missing, T0 + 5), add(stored.seq, missing, T0 + 5)))

    assert db.run(both()) == [2, 0]
    assert [d.action for d in db.detail("evt_1").deliveries] == ["app", "audit"]
    # One of them left out, its dependent still waits for the one created before.
    assert (
        db.run(db.storage.add_deliveries(stored.seq, [action("audit"), action("log", after="app")], T0 + 6))
        == 1
    )
    records = db.deliveries("evt_1")
    assert (records["log"].state, records["log"].parent_id) == ("waiting", records["app"].id)


def test_deliveries_are_added_to_an_event_one_of_whose_deliveries_has_text_that_is_not_utf8(
    db: Harness,
) -> None:
    # A replay of missing deliveries read the event's deliveries strictly: sqlite3 failed it, as the store
    # being unavailable (a 503), on every try, and the replay never got past that event.
    db.ingest("evt_bad", APP, action("audit"), at=T0)
    db.ingest("evt_good", at=T0 + 1)
    damage(db.path, "UPDATE deliveries SET action = CAST(X'61FF' AS TEXT) WHERE action = 'audit'")
    bad, good = db.run(db.storage.events_page(since=None))
    assert set(bad.deliveries) == {(ROUTE, "app"), (ROUTE, "a\ufffd")}

    # The stored one names no action of the config: `audit` is missing, and is created as any other.
    added = [action("audit"), action("log", after="app")]
    assert db.run(db.storage.add_deliveries(bad.seq, added, T0 + 5)) == 2
    records = db.deliveries("evt_bad")
    assert (records["audit"].state, records["log"].parent_id) == ("pending", records["app"].id)
    assert "a\ufffd" in records
    assert db.run(db.storage.add_deliveries(good.seq, [APP], T0 + 5)) == 1


def test_a_delivery_whose_parent_the_event_lacks_is_never_inserted_as_a_root(db: Harness) -> None:
    db.ingest("evt_1", action("audit"))
    seq = db.detail("evt_1").seq
    orphan = [action("audit2"), action("alert", after="app", when="failure")]
    with pytest.raises(ValueError, match="'alert' of route 'orders' runs after 'app'"):
        db.run(db.storage.add_deliveries(seq, orphan, T0 + 5))
    assert db.states("evt_1") == {"audit": "pending"}  # nothing of it was written
    with pytest.raises(ValueError, match="runs after 'app'"):
        db.ingest("evt_2", action("alert", after="app"))
    assert db.run(db.storage.get_event("evt_2")) == []


@pytest.mark.parametrize("dependent", ["retrying", "in_flight"])
def test_replay_sends_a_dependent_still_pending_back_to_waiting(db: Harness, dependent: str) -> None:
    db.ingest("evt_1", APP, action("ack", after="app", when="always"), action("audit", after="ack"))
    [app] = db.claim(T0 + 1)
    db.finish(app, "delivered", T0 + 2, status=200)
    [ack] = db.claim(T0 + 2)
    if dependent == "retrying":
        db.finish(ack, "pending", T0 + 3, due_at=T0 + 30, status=503)

    assert db.run(db.storage.replay_event(db.detail("evt_1").seq, now=T0 + 10)) == 1
    # ack acted on app's old result: it waits for the new one, with a fresh count (audit waits still).
    records = db.deliveries("evt_1")
    assert {key: (r.state, r.attempts, r.due_at) for key, r in records.items()} == {
        "app": ("pending", 0, T0 + 10),
        "ack": ("waiting", 0, None),
        "audit": ("waiting", 0, None),
    }
    if dependent == "in_flight":
        # The attempt that was running reports: fenced out, nothing of it is recorded.
        assert db.finish(ack, "delivered", T0 + 11, status=200) == Finished(recorded=False)
        assert db.states("evt_1")["ack"] == "waiting"
    [app] = db.claim(T0 + 100)
    assert app.delivery.action == "app"
    db.finish(app, "dead", T0 + 101, status=400)
    [ack] = db.claim(T0 + 101)
    assert (ack.delivery.attempts, ack.parent) == (1, ParentResult("app", "dead", 1, 400, None))


def test_an_attempt_begun_before_a_replay_cannot_finish_the_dependents_new_round(db: Harness) -> None:
    db.ingest("evt_1", APP, action("ack", after="app", when="always"))
    [app] = db.claim(T0 + 1)
    db.finish(app, "dead", T0 + 2, status=400)
    [stale] = db.claim(T0 + 2)  # ack's first attempt starts, to report app's failure, and takes long
    assert stale.delivery.attempts == 1

    # Meanwhile app is replayed and delivered, and ack is claimed again for that new result: its count
    # starts over, so this claim's attempt is number 1 as well.
    db.run(db.storage.replay_event(db.detail("evt_1").seq, now=T0 + 3))
    [app] = db.claim(T0 + 4)
    db.finish(app, "delivered", T0 + 5, status=200)
    [fresh] = db.claim(T0 + 5)
    assert (fresh.delivery.attempts, fresh.parent) == (1, ParentResult("app", "delivered", 1, 200, None))

    # The attempt that reported the failure ends: it belongs to the round before the replay, and is
    # fenced out, not taken for the report of app's new result.
    assert db.finish(stale, "delivered", T0 + 6, status=200) == Finished(recorded=False)
    ack = db.deliveries("evt_1")["ack"]
    assert (ack.state, ack.attempts) == ("pending", 1)
    assert db.detail("evt_1").attempts[ack.id] == []
    assert db.finish(fresh, "delivered", T0 + 7, status=200) == Finished()
    assert db.states("evt_1") == {"app": "delivered", "ack": "delivered"}
    # Its number goes on past the stale attempt's, which was sent as attempt 1 though not recorded: no
    # two attempts the receiver was sent have the same number, as for one a shutdown cut off.
    assert (stale.delivery.attempt_number, fresh.delivery.attempt_number) == (1, 2)
    assert [a.number for a in db.detail("evt_1").attempts[ack.id]] == [2]


def test_a_dependent_claimed_while_its_parent_runs_again_waits_for_it(db: Harness) -> None:
    db.ingest("evt_1", APP, action("ack", after="app", when="always"))
    [app] = db.claim(T0 + 1)
    db.finish(app, "delivered", T0 + 2, status=200)
    # app runs again while ack is pending, as a replay by an earlier version left a database.
    db.connection.execute(
        "UPDATE deliveries SET state = 'pending', due_at = ?, attempts = 0, finished_at = NULL WHERE id = ?",
        (T0 + 3, app.delivery.id),
    )

    # ack is not run on a result app does not have: it waits for app's new one.
    [app] = db.claim(T0 + 3)
    assert app.delivery.action == "app"
    ack = db.deliveries("evt_1")["ack"]
    assert (ack.state, ack.attempts, ack.due_at, ack.last_status) == ("waiting", 0, None, None)
    assert db.finish(app, "dead", T0 + 4, status=400).activated == [(ROUTE, "ack")]
    [claim] = db.claim(T0 + 4)
    assert (claim.delivery.attempts, claim.parent) == (1, ParentResult("app", "dead", 1, 400, None))


def test_replay_dead_keeps_a_dead_dependent_waiting_for_its_replayed_parent(db: Harness) -> None:
    db.ingest("evt_1", APP, action("cleanup", after="app", when="always"))
    [app] = db.claim(T0 + 1)
    db.finish(app, "dead", T0 + 2, status=500)
    [cleanup] = db.claim(T0 + 2)
    db.finish(cleanup, "dead", T0 + 3, status=500)

    db.replay_dead(since=None, now=T0 + 10)
    # cleanup runs after app: replaying both must not let it run before (or beside) app's new attempt.
    assert db.states("evt_1") == {"app": "pending", "cleanup": "waiting"}
    assert [c.delivery.action for c in db.claim(T0 + 10)] == ["app"]


# -- retention ------------------------------------------------------------------------------------------


def prune_all(db: Harness, before: float, limit: int = 100) -> list[Pruned]:
    """Every batch of one prune walk, as the gateway's retention runs them."""
    batches = [db.run(db.storage.prune(before, limit=limit))]
    while batches[-1].resume_after is not None:
        batches.append(db.run(db.storage.prune(before, after=batches[-1].resume_after, limit=limit)))
    return batches


def stored_ids(db: Harness) -> set[str]:
    return {row[0] for row in db.connection.execute("SELECT event_id FROM events")}


def test_prune_deletes_events_whose_deliveries_all_ended_before_its_time_and_nothing_else(
    db: Harness,
) -> None:
    db.ingest("evt_done", APP, action("audit"), action("ack", after="app", when="failure"), at=T0)
    db.ingest("evt_unrouted", at=T0)
    db.ingest("evt_retrying", APP, at=T0)
    db.ingest("evt_in_flight", APP, at=T0)
    db.ingest("evt_waiting", APP, action("ack", after="app", when="always"), at=T0)
    db.ingest("evt_young", APP, at=T0)
    claims = keyed(db.claim(T0 + 1, lease=1000))
    db.finish(claims[("evt_done", "app")], "delivered", T0 + 10)  # ack skipped with it
    db.finish(claims[("evt_done", "audit")], "dead", T0 + 20, status=410)
    db.finish(claims[("evt_retrying", "app")], "pending", T0 + 10, due_at=T0 + 5000)
    db.finish(claims[("evt_waiting", "app")], "pending", T0 + 10, due_at=T0 + 5000)
    db.finish(claims[("evt_young", "app")], "delivered", T0 + 100)
    # evt_in_flight's app stays leased. The newest event and delivery, whose seq and id are never handed out
    # again, are young.
    db.ingest("evt_newest", APP, at=T0 + 200)
    assert db.states("evt_done") == {"app": "delivered", "audit": "dead", "ack": "skipped"}
    done_ids = [d.id for d in db.detail("evt_done").deliveries]

    # At T0 + 20 itself evt_done's last delivery has only just ended.
    assert prune_all(db, T0 + 20) == [Pruned(1, 0, None)]  # evt_unrouted, received at T0
    assert prune_all(db, T0 + 50) == [Pruned(1, 3, None, dead=1)]  # audit's dead went with it
    assert stored_ids(db) == {"evt_retrying", "evt_in_flight", "evt_waiting", "evt_young", "evt_newest"}
    # Its deliveries and their attempts went with it.
    placeholders = ",".join("?" * len(done_ids))
    for table, column in (("deliveries", "id"), ("attempts", "delivery_id")):
        left = db.connection.execute(
            f"SELECT count(*) FROM {table} WHERE {column} IN ({placeholders})", done_ids
        )
        assert left.fetchone()[0] == 0, table
    assert db.run(db.storage.get_event("evt_done")) == []

    # Whatever the time, nothing pending, leased or waiting for its parent goes: only evt_young now.
    assert sum(p.events for p in prune_all(db, T0 + 10**6)) == 1
    assert stored_ids(db) == {"evt_retrying", "evt_in_flight", "evt_waiting", "evt_newest"}
    assert db.states("evt_waiting") == {"app": "pending", "ack": "waiting"}
    claimed = {c.event.id for c in db.claim(T0 + 6000)}
    assert claimed == {"evt_retrying", "evt_in_flight", "evt_waiting", "evt_newest"}


def test_a_dead_delivery_stays_replayable_until_its_event_is_pruned(db: Harness) -> None:
    db.ingest("evt_dead", APP, at=T0)
    [claim] = db.claim(T0 + 1)
    db.finish(claim, "dead", T0 + 10, status=422)
    db.ingest("evt_later", APP, at=T0 + 500)

    assert prune_all(db, T0 + 10) == [Pruned(0, 0, None)]
    # A replay makes it run again: pending, it stays whatever the time, and its retention starts over once
    # it has ended again.
    assert db.replay_dead(since=None, now=T0 + 100) == 1
    assert sum(p.events for p in prune_all(db, T0 + 10**6)) == 0
    [claim] = [c for c in db.claim(T0 + 100) if c.event.id == "evt_dead"]
    db.finish(claim, "dead", T0 + 110, status=422)
    assert prune_all(db, T0 + 50) == [Pruned(0, 0, None)]
    assert db.replay_dead(since=None, now=T0 + 120) == 1
    [claim] = [c for c in db.claim(T0 + 120) if c.event.id == "evt_dead"]
    db.finish(claim, "dead", T0 + 130, status=422)

    assert prune_all(db, T0 + 131) == [Pruned(1, 1, None, dead=1)]
    assert db.run(db.storage.dead_delivery_ids(since=None)) == []
    assert db.replay_dead(since=None, now=T0 + 200) == 0


def test_a_prune_batch_deletes_no_more_events_than_its_limit(db: Harness) -> None:
    for number in range(5):  # the oldest, still pending: looked at, and kept
        db.ingest(f"evt_pending_{number}", APP, at=T0 + number)
    for number in range(7):
        db.ingest(f"evt_unrouted_{number}", at=T0 + 10 + number)
    db.ingest("evt_newest", at=T0 + 100)
    commits = len(db.commits)

    batches = prune_all(db, T0 + 50, limit=3)
    # Each batch one transaction of its own; the kept ones do not count against the limit.
    assert [p.events for p in batches] == [3, 3, 1]
    assert len(db.commits) - commits == len(batches)
    assert len(stored_ids(db)) == 6


def test_a_prune_walk_looks_past_many_kept_events_in_few_batches(
    db: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Events past the retention with a delivery still pending (due tomorrow, say) stay, and are looked at
    # once a run: a batch goes past up to PRUNE_SCAN of them, not `limit`, and the deletable ones after
    # them go in the same run.
    monkeypatch.setattr(sqlite_module, "PRUNE_SCAN", 20)
    for number in range(50):
        db.ingest(f"evt_pending_{number}", APP, at=T0 + number)
    for number in range(7):
        db.ingest(f"evt_unrouted_{number}", at=T0 + 100 + number)
    db.ingest("evt_newest", at=T0 + 1000)
    kept_walked: list[int] = []  # per batch, the kept events in the range of keys it walked
    prune = sqlite_module._prune

    def counting(conn: sqlite3.Connection, before: float, after: Any, limit: int) -> Pruned:
        at, last = after if after is not None else (float("-inf"), 0)
        query = "SELECT count(*) FROM events WHERE received_at < ? AND (received_at, seq) > (?, ?)"
        pruned = prune(conn, before, after, limit)
        if pruned.resume_after is None:
            kept_walked.append(conn.execute(query, (before, at, last)).fetchone()[0])
        else:
            end, seq = pruned.resume_after
            kept_walked.append(
                conn.execute(
                    f"{query} AND (received_at, seq) <= (?, ?)", (before, at, last, end, seq)
                ).fetchone()[0]
            )
        return pruned

    monkeypatch.setattr(sqlite_module, "_prune", counting)
    commits = len(db.commits)

    batches = prune_all(db, T0 + 500, limit=3)
    # 20 kept, 20 kept, 10 kept and 3 deleted, 3 deleted, the last one.
    assert [p.events for p in batches] == [0, 0, 3, 3, 1]
    assert kept_walked == [20, 20, 10, 0, 0]  # each kept event once
    assert len(db.commits) - commits == len(batches)
    assert stored_ids(db) == {f"evt_pending_{number}" for number in range(50)} | {"evt_newest"}


def test_a_prune_batch_deletes_no_more_than_its_bytes_of_bodies(db: Harness) -> None:
    padding = "x" * (PRUNE_BYTES * 2 // 5)  # two fit in a batch, a third does not
    for number in range(5):
        event = make_event(f"evt_large_{number}", at=T0 + number)
        body = json.dumps({"id": event.id, "pad": padding}).encode()
        assert db.run(db.storage.ingest(dataclasses.replace(event, body=body), []))
    db.ingest("evt_newest", at=T0 + 100)

    assert [p.events for p in prune_all(db, T0 + 50)] == [2, 2, 1]
    assert stored_ids(db) == {"evt_newest"}


def fail_until_dead(db: Harness, event_id: str, *deliveries: NewDelivery, attempts: int, at: float) -> None:
    """An event whose deliveries each fail `attempts` times, the last one dead, one after the other."""
    db.ingest(event_id, *deliveries, at=at)
    for number in range(1, attempts + 1):
        claims = db.claim(at + number)
        assert {c.event.id for c in claims} == {event_id}
        for claim in claims:
            state = "pending" if number < attempts else "dead"
            db.finish(claim, state, at + number, due_at=at + number, status=503)


def attempt_and_delivery_rows(db: Harness) -> int:
    query = "SELECT (SELECT count(*) FROM deliveries) + (SELECT count(*) FROM attempts)"
    return int(db.connection.execute(query).fetchone()[0])


def test_a_prune_batch_deletes_no_more_than_its_rows_of_deliveries_and_attempts(
    db: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deleting rows holds the writer, and every webhook's commit waits: a delivery retried for days has
    # thousands of attempts, and a batch of such events would delete hundreds of thousands of rows.
    monkeypatch.setattr(sqlite_module, "PRUNE_ROWS", 20)
    fail_until_dead(db, "evt_few", APP, attempts=6, at=T0)  # 7 rows
    fail_until_dead(db, "evt_two", APP, action("audit"), attempts=4, at=T0 + 100)  # 10 rows
    fail_until_dead(db, "evt_many", APP, attempts=45, at=T0 + 200)  # 46 rows, more than a batch's
    db.ingest("evt_retrying", APP, at=T0 + 300)
    for number in range(1, 26):  # still retrying after 25 attempts: kept, every attempt with it
        [claim] = db.claim(T0 + 300 + number)
        due_at = T0 + 300 + number if number < 25 else T0 + 10**6
        db.finish(claim, "pending", T0 + 300 + number, due_at=due_at, status=503)
    fail_until_dead(db, "evt_after", APP, attempts=3, at=T0 + 400)  # 4 rows
    db.ingest("evt_newest", APP, at=T0 + 1000)
    retrying = db.detail("evt_retrying")

    batches: list[tuple[int, int]] = []
    after = None
    while True:
        rows = attempt_and_delivery_rows(db)
        pruned = db.run(db.storage.prune(T0 + 900, after=after))
        batches.append((pruned.events, rows - attempt_and_delivery_rows(db)))
        if pruned.resume_after is None:
            break
        after = pruned.resume_after
    # evt_many does not fit after the first two, and the next batch starts with it. Alone it has more rows
    # than a batch: its attempts go first, a batch's worth at a time, then the rest of it with evt_after.
    assert batches == [(2, 17), (0, 20), (0, 20), (2, 10)]
    assert stored_ids(db) == {"evt_retrying", "evt_newest"}
    assert db.detail("evt_retrying") == retrying  # its 25 attempts, all kept
    assert sum(len(attempts) for attempts in retrying.attempts.values()) == 25
    orphans = "SELECT count(*) FROM attempts WHERE delivery_id NOT IN (SELECT id FROM deliveries)"
    assert db.connection.execute(orphans).fetchone()[0] == 0


def test_prune_hands_no_seq_or_delivery_id_out_again(db: Harness) -> None:
    # SQLite gives a new row the largest rowid plus one: the newest event and the event of the newest
    # delivery stay, whatever their age, so that a seq or an id still held (a replay's cursor, a page read
    # before a replay acts on it) never names another event or delivery.
    db.ingest("evt_1", APP, at=T0)
    [claim] = db.claim(T0 + 1)
    db.finish(claim, "delivered", T0 + 2)
    first = db.detail("evt_1")
    assert sum(p.events for p in prune_all(db, T0 + 1000)) == 0  # the newest event
    db.ingest("evt_2", at=T0 + 10)
    assert sum(p.events for p in prune_all(db, T0 + 1000)) == 0  # still the newest delivery's
    db.ingest("evt_3", APP, at=T0 + 20)
    assert sum(p.events for p in prune_all(db, T0 + 1000)) == 2  # evt_1 and evt_2
    db.ingest("evt_4", APP, at=T0 + 30)
    latest = db.detail("evt_4")
    assert latest.seq > first.seq + 2
    assert latest.deliveries[0].id > first.deliveries[0].id + 1


def test_deliveries_added_to_an_event_pruned_since_it_was_read_are_not_created(db: Harness) -> None:
    # `replay --state missing` reads a page of events, then adds what each one lacks.
    db.ingest("evt_unrouted", at=T0)
    db.ingest("evt_newest", APP, at=T0 + 100)
    [page] = [p for p in db.run(db.storage.events_page(since=None)) if p.event.id == "evt_unrouted"]
    assert sum(p.events for p in prune_all(db, T0 + 50)) == 1
    assert db.run(db.storage.add_deliveries(page.seq, [APP], T0 + 200)) == 0
    assert db.connection.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 1
    assert [c.event.id for c in db.claim(T0 + 200)] == ["evt_newest"]


def test_a_prune_batch_walks_indexes_whatever_the_database_holds(db: Harness) -> None:
    # The events received before its time from events_received, each one's deliveries from deliveries_event,
    # their attempts from attempts_delivery: no statement scans a table, none sorts.
    seqs = "[1, 2, 3]"
    tables = {"events", "deliveries", "attempts", "e", "d", "a"}  # with the aliases the statements give them
    for sql, params in (
        (sqlite_module.PRUNE_CANDIDATES, {"before": T0, "at": T0 - 10, "last": 5, "limit": 100, "rows": 101}),
        (sqlite_module.PRUNE_NEWEST, ()),
        (sqlite_module.PRUNE_SOME_ATTEMPTS, (2, 100)),
        (sqlite_module.PRUNE_ATTEMPTS, (seqs,)),
        (sqlite_module.PRUNE_DEAD, (seqs,)),
        (sqlite_module.PRUNE_DELIVERIES, (seqs,)),
        (sqlite_module.PRUNE_EVENTS, (seqs,)),
    ):
        plan = [row[3] for row in db.connection.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        # Subqueries' rows are scanned as they are made (SCAN c), json_each's too: no table is.
        scans = [step for step in plan if step.startswith("SCAN ") and step.split()[1] in tables]
        assert scans == [], plan
        assert not any("TEMP B-TREE" in step for step in plan), plan
        if sql == sqlite_module.PRUNE_CANDIDATES:
            assert any(step.startswith("SEARCH e USING INDEX events_received") for step in plan), plan


# -- failures -------------------------------------------------------------------------------------------


def test_a_read_only_store_is_unavailable_until_writable_again(db: Harness) -> None:
    db.ingest("evt_before", APP)
    db.connection.execute("PRAGMA query_only = ON")
    with pytest.raises(StorageUnavailable):
        db.ingest("evt_refused", APP)
    with pytest.raises(StorageUnavailable):
        db.run(db.storage.check_writable())

    db.connection.execute("PRAGMA query_only = OFF")
    db.run(db.storage.check_writable())
    assert db.ingest("evt_after", APP) is True
    assert [e.id for e in db.run(db.storage.list_events())] == ["evt_after", "evt_before"]


def fill_disk(db: Harness) -> None:
    pages = db.connection.execute("PRAGMA page_count").fetchone()[0]
    db.connection.execute(f"PRAGMA max_page_count = {pages}")


def big_event(event_id: str) -> tuple[Event, list[NewDelivery]]:
    event = make_event(event_id)
    event.body = json.dumps({"id": event_id, "pad": "x" * 50_000}).encode()
    return event, [APP]


def test_a_full_disk_is_unavailable_and_loses_nothing_committed(db: Harness) -> None:
    db.ingest("evt_before", APP)
    fill_disk(db)

    async def flood() -> list[BaseException | bool]:
        return list(
            await asyncio.gather(
                db.storage.ingest(*big_event("evt_big")),
                db.storage.ingest(make_event("evt_small"), [APP]),
                return_exceptions=True,
            )
        )

    results = db.run(flood())
    assert all(isinstance(result, StorageUnavailable) for result in results), results
    with pytest.raises(StorageUnavailable):
        db.run(db.storage.ingest(*big_event("evt_big")))

    db.connection.execute("PRAGMA max_page_count = 1073741823")
    assert db.run(db.storage.ingest(*big_event("evt_big"))) is True
    assert db.ingest("evt_small", APP) is True
    assert [e.id for e in db.run(db.storage.list_events())] == ["evt_small", "evt_big", "evt_before"]


def test_a_full_disk_error_names_the_cause(db: Harness) -> None:
    fill_disk(db)
    with pytest.raises(StorageUnavailable) as failure:
        db.run(db.storage.ingest(*big_event("evt_big")))
    assert "full" in str(failure.value)


def test_readiness_fails_on_a_full_disk_after_a_refused_webhook(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk, opened_harness(disk / "hookyard.db") as harness:
        harness.ingest("evt_before", APP)
        # Room for a few pages, not for the whole of a large webhook.
        ballast = leave_free(disk, 32768)
        # The refused webhook leaves its frames in the write-ahead log: the readiness check's single page
        # fits there, so the write alone would pass while every webhook like it is refused.
        with pytest.raises(StorageUnavailable):
            harness.run(harness.storage.ingest(*big_event("evt_big")))
        with pytest.raises(StorageUnavailable) as failure:
            harness.run(harness.storage.check_writable())
        assert "full" in str(failure.value)

        ballast.unlink()
        harness.run(harness.storage.check_writable())
        assert harness.run(harness.storage.ingest(*big_event("evt_big"))) is True


def leave_free(disk: Path, free: int) -> Path:
    """Fill `disk` to its last byte with a ballast file, then give `free` bytes of it back."""
    ballast = disk / "ballast"
    with contextlib.suppress(OSError), ballast.open("ab") as out:
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    os.truncate(ballast, max(0, ballast.stat().st_size - free))
    return ballast


# One webhook at the default limits, as /readyz asks room for: its body, and its headers as JSON, where
# each byte read as latin-1 past ASCII takes two.
DEFAULT_ROOM = 1024 * 1024 + 2 * 16 * 1024


def largest_webhook(event_id: str) -> tuple[Event, list[NewDelivery]]:
    event = make_event(event_id)
    event.body = b"x" * (1024 * 1024)
    event.headers = {"x-pad": "\u00e9" * (16 * 1024 - len("x-pad"))}
    return event, [APP]


def checkpoint(path: Path) -> None:
    """Copy the whole write-ahead log into the database file, as the store's own checkpoints do."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        busy, frames, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert (busy, frames) == (0, copied)


def test_readiness_asks_room_for_one_webhook_of_the_configured_size(tmp_path: Path) -> None:
    # It asked for 1 MiB whatever the limits: a larger limits.max_body_bytes left the pod ready where such
    # a webhook is refused, and even at the default the log and the database file take it twice.
    with tmpfs(tmp_path / "disk", "16m") as disk, opened_harness(disk / "hookyard.db") as harness:
        harness.ingest("evt_before", APP)
        harness.settle()
        leave_free(disk, 2_500_000)
        harness.run(harness.storage.check_writable(room=DEFAULT_ROOM))
        with pytest.raises(StorageUnavailable) as failure:
            harness.run(harness.storage.check_writable(room=4 * DEFAULT_ROOM))
        assert "full" in str(failure.value) and "needed" in str(failure.value)

        # Ready means it fits: the webhook in the log, then in the database file.
        assert harness.run(harness.storage.ingest(*largest_webhook("evt_largest"))) is True
        harness.settle()
        checkpoint(harness.path)


def test_readiness_counts_the_files_free_pages_but_the_log_needs_room_on_the_volume(tmp_path: Path) -> None:
    # A file that retention emptied keeps its size (docs/operations.md): new webhooks go to its free
    # pages, so only their frames in the write-ahead log need room on the volume.
    with tmpfs(tmp_path / "disk", "16m") as disk, opened_harness(disk / "hookyard.db") as harness:
        for number in range(40):
            assert harness.run(harness.storage.ingest(*big_event(f"evt_old_{number}"))) is True
        harness.settle()
        with contextlib.closing(sqlite3.connect(harness.path, isolation_level=None)) as other:
            other.execute("DELETE FROM deliveries")
            other.execute("DELETE FROM events")
            assert other.execute("PRAGMA freelist_count").fetchone()[0] > 400
        checkpoint(harness.path)
        ballast = leave_free(disk, 1_500_000)
        harness.run(harness.storage.check_writable(room=DEFAULT_ROOM))
        assert harness.run(harness.storage.ingest(*largest_webhook("evt_largest"))) is True
        harness.settle()
        checkpoint(harness.path)

        # Free pages are left in the file, but the log has no room for a webhook's frames.
        ballast.unlink()
        leave_free(disk, 500_000)
        with pytest.raises(StorageUnavailable) as failure:
            harness.run(harness.storage.check_writable(room=DEFAULT_ROOM))
        assert "full" in str(failure.value)


def test_readiness_follows_a_reload_of_the_body_limit(tmp_path: Path, downstream: Downstream) -> None:
    with tmpfs(tmp_path / "disk", "16m") as disk:
        config = gateway_config(tmp_path, downstream.url)
        config["storage"] = {"url": f"sqlite:///{disk}/hookyard.db"}
        config["reload"] = {"interval": "100ms"}
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump(config))
        with RunningGateway(path) as gw:
            leave_free(disk, 3_500_000)
            assert ops_get(gw, "/readyz")[0].status_code == 200

            config["limits"] = {"max_body_bytes": 4 * 1024 * 1024}
            path.write_text(yaml.safe_dump(config))
            wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
            ready = ops_get(gw, "/readyz")[0]
            assert ready.status_code == 503
            assert ready.json()["reason"].startswith("storage: sqlite: database or disk is full")
            assert gw.metric("hookyard_storage_writable") == 0


def test_operations_on_a_closed_store_are_unavailable(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "closed.db")
    with pytest.raises(StorageUnavailable, match="not open"):
        asyncio.run(storage.ingest(make_event("evt_1"), [APP]))


def test_reads_asked_for_while_the_store_closes_are_unavailable(db: Harness) -> None:
    async def read_while_closing() -> list[BaseException | Any]:
        closing = asyncio.create_task(db.storage.close())
        await asyncio.sleep(0)  # close has begun: the ops listener still takes requests
        reads = await asyncio.gather(
            db.storage.list_events(), db.storage.queue_stats(T0), return_exceptions=True
        )
        await closing
        return reads

    reads = db.run(read_while_closing())
    assert [type(read) for read in reads] == [StorageUnavailable, StorageUnavailable], reads


def test_open_reports_an_unusable_path(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    storage = SQLiteStorage(tmp_path / "a-file" / "hookyard.db")
    with pytest.raises(StorageUnavailable, match="cannot open"):
        asyncio.run(storage.open())


def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "hookyard.db"

    async def write() -> None:
        storage = SQLiteStorage(path)
        await storage.open()
        await storage.ingest(make_event("evt_1"), [APP])
        await storage.close()

    async def read() -> list[str]:
        storage = open_storage(f"sqlite:///{path}")
        await storage.open()
        try:
            return [e.id for e in await storage.list_events()]
        finally:
            await storage.close()

    asyncio.run(write())
    assert asyncio.run(read()) == ["evt_1"]


# -- URLs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["mongodb://localhost/hookyard", "file:///tmp/hookyard.db", "hookyard.db"])
def test_open_storage_rejects_an_unknown_scheme(url: str) -> None:
    with pytest.raises(ValueError, match=r"storage\.url: unsupported scheme") as rejected:
        open_storage(url)
    assert repr(url.split(":", 1)[0]) in str(rejected.value)
    assert "sqlite" in str(rejected.value)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/hookyard.db", Path("var/hookyard.db")),
        ("sqlite:///./var/hookyard.db", Path("var/hookyard.db")),
        ("sqlite:////srv/hookyard/hookyard.db", Path("/srv/hookyard/hookyard.db")),
        ("SQLite:///var/hookyard.db", Path("var/hookyard.db")),
    ],
)
def test_sqlite_urls(url: str, path: Path) -> None:
    storage = SQLiteStorage.from_url(url)
    assert storage.path == path
    assert storage.path.is_absolute() == path.is_absolute()
    opened = open_storage(url)
    assert isinstance(opened, SQLiteStorage)
    assert opened.path == path


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///var/"])
def test_a_sqlite_url_needs_a_path(url: str) -> None:
    with pytest.raises(ValueError, match=r"storage\.url: names no file"):
        SQLiteStorage.from_url(url)


# -- another process's write lock and a disk that stops answering, under a running gateway ------------------


def ops_get(gw: RunningGateway, path: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.get(gw.ops_url + path, timeout=10)
    return response, time.perf_counter() - started


def test_another_process_holding_the_write_lock_holds_up_no_answer(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A minute: a loop held in SQLite's busy handler would not answer within the ops client's 10 s at all,
    # where one that answers may still take a second or two on a busy machine.
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 60.0)
    body, headers = svix_request(msg_id="msg_behind_the_lock")
    with RunningGateway(gateway_config(tmp_path, downstream.url)) as gw, ThreadPoolExecutor(1) as pool:
        # An operator's `sqlite3 var/hookyard.db` with a transaction open, or `hookyard replay` at work.
        with contextlib.closing(sqlite3.connect(tmp_path / "hookyard.db", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            answer = pool.submit(gw.post, "/webhooks/consignease", body, headers)
            time.sleep(0.3)  # the webhook's batch has found the lock taken, as have the engine's claims
            # The event loop answers: it does not wait for the lock in SQLite's busy handler (up to a minute).
            for path in ("/healthz", "/metrics"):
                response, took = ops_get(gw, path)
                assert response.status_code == 200 and took < 5, (path, took)
            assert not answer.done()  # nothing is answered before its commit
            other.execute("ROLLBACK")
        response = answer.result(10)
        assert response.status_code == 200 and response.json()["status"] == "accepted"
        downstream.wait_for(1, "/hooks/users")
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "duplicate"


def test_a_write_lock_held_past_the_bound_refuses_webhooks_and_readiness(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 0.3)
    body, headers = svix_request(msg_id="msg_refused_behind_the_lock")
    with RunningGateway(gateway_config(tmp_path, downstream.url)) as gw:
        with contextlib.closing(sqlite3.connect(tmp_path / "hookyard.db", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            started = time.perf_counter()
            response = gw.post("/webhooks/consignease", body, headers)
            assert time.perf_counter() - started < 2
            assert response.status_code == 503 and response.json()["error"] == "storage_unavailable"
            # While the lock stays taken, a write is tried once and refused at once.
            ready, took = ops_get(gw, "/readyz")
            assert ready.status_code == 503 and took < 2, took
            assert "database is locked (by another process" in ready.json()["reason"]
            other.execute("ROLLBACK")
        # Nothing of the refused webhook was stored: its retry is a new event.
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
        assert ops_get(gw, "/readyz")[0].status_code == 200
        assert gw.metric("hookyard_webhook_rejections_total", reason="storage_unavailable") == 1


def test_a_hung_fsync_is_refused_after_the_bound_and_shows_in_readiness_and_metrics(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 0.3)
    first, first_headers = svix_request(msg_id="msg_on_a_hung_disk")
    second, second_headers = svix_request(msg_id="msg_while_refused")
    with RunningGateway(gateway_config(tmp_path, downstream.url)) as gw:
        storage = gw.gateway.storage
        assert isinstance(storage, SQLiteStorage)
        fsync = HeldFsync(storage)
        try:
            started = time.perf_counter()
            response = gw.client.post(
                gw.url + "/webhooks/consignease", content=first, headers=first_headers, timeout=3
            )
            assert 0.2 < time.perf_counter() - started < 2
            # Not known to be on disk: refused, so the sender sends it again.
            assert response.status_code == 503 and response.json()["error"] == "storage_unavailable"
            assert response.json()["detail"] == "not confirmed stored; please retry"
            # Its commit leased its delivery, which runs (once, as its first attempt): left alone, it would
            # wait out its lease and be sent as a second attempt.
            [delivered] = downstream.wait_for(1, "/hooks/users")
            assert delivered.headers["x-hookyard-attempt"] == "1"
            ready, took = ops_get(gw, "/readyz")
            assert ready.status_code == 503 and took < 2, took
            assert "no fsync has finished for" in ready.json()["reason"]
            assert gw.metric("hookyard_storage_fsync_wait_seconds") >= 0.3
            refused = gw.post("/webhooks/consignease", second, second_headers)
            assert refused.status_code == 503 and refused.json()["detail"] == "not stored; please retry"
        finally:
            fsync.release()
        wait_until(lambda: ops_get(gw, "/readyz")[0].status_code == 200, 5)
        assert gw.metric("hookyard_storage_fsync_wait_seconds") < 0.3
        # The disk kept the first one after all: its retry is a duplicate, delivered no second time.
        assert gw.post("/webhooks/consignease", first, first_headers).json()["status"] == "duplicate"
        assert gw.post("/webhooks/consignease", second, second_headers).json()["status"] == "accepted"
        downstream.wait_for(2, "/hooks/users")
        time.sleep(0.2)
        keys = [r.headers["idempotency-key"] for r in downstream.received("/hooks/users")]
        assert sorted(keys) == ["msg_on_a_hung_disk", "msg_while_refused"]


@pytest.mark.parametrize("expect", [{}, {"expect": "100-continue"}], ids=["fast path", "asgi path"])
def test_an_event_whose_fsync_is_unconfirmed_is_reported_accepted_as_its_deliveries_run(
    tmp_path: Path, downstream: Downstream, monkeypatch: pytest.MonkeyPatch, expect: dict[str, str]
) -> None:
    from gateway import hookimpl
    from gateway.plugins import new_plugin_manager

    monkeypatch.setattr(sqlite_module, "FSYNC_TIMEOUT", 0.3)
    calls: list[tuple[str, str]] = []

    class Observer:
        @hookimpl
        def event_accepted(self, event, routes):  # type: ignore[no-untyped-def]
            calls.append(("event_accepted", event.id))

        @hookimpl
        def delivery_finished(self, delivery, outcome, final):  # type: ignore[no-untyped-def]
            calls.append(("delivery_finished", outcome.kind))

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(Observer(), name="observer")
    body, headers = svix_request(msg_id="msg_unconfirmed")
    with RunningGateway(gateway_config(tmp_path, downstream.url), pm=pm) as gw:
        storage = gw.gateway.storage
        assert isinstance(storage, SQLiteStorage)
        fsync = HeldFsync(storage)
        try:
            response = gw.post("/webhooks/consignease", body, {**headers, **expect})
            assert response.status_code == 503, response.text
            assert response.json()["detail"] == "not confirmed stored; please retry"
            wait_until(lambda: ("delivery_finished", "delivered") in calls)
        finally:
            fsync.release()
        wait_until(lambda: ops_get(gw, "/readyz")[0].status_code == 200, 5)
        # Its retry is a duplicate: never reported, as it is never delivered, a second time.
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "duplicate"
        time.sleep(0.2)
    # Told of the event whose delivery runs, before that delivery's result.
    assert calls == [("event_accepted", "msg_unconfirmed"), ("delivery_finished", "delivered")]
    assert len(downstream.received("/hooks/users")) == 1


# -- retention under a running gateway ------------------------------------------------------------------


class RetentionClock:
    """What the gateway's retention reads the time from: the real time until `now` is set."""

    now: float | None = None
    perf_counter = staticmethod(time.perf_counter)

    @classmethod
    def time(cls) -> float:
        return time.time() if cls.now is None else cls.now


@pytest.fixture
def retention_clock(monkeypatch: pytest.MonkeyPatch) -> type[RetentionClock]:
    monkeypatch.setattr(retention_module, "PRUNE_INTERVAL", 0.05)
    monkeypatch.setattr(retention_module, "PRUNE_PAUSE", 0.01)
    monkeypatch.setattr(RetentionClock, "now", None)
    monkeypatch.setattr(retention_module, "time", RetentionClock)
    return RetentionClock


def admin_show(gw: RunningGateway, event_id: str) -> httpx.Response:
    return gw.client.get(f"{gw.ops_url}/admin/events/{event_id}")


def states_of(gw: RunningGateway, event_id: str) -> list[str]:
    response = admin_show(gw, event_id)
    return [d["state"] for d in response.json()["deliveries"]] if response.status_code == 200 else []


def post_event(gw: RunningGateway, event_id: str) -> str:
    body, headers = svix_request(msg_id=event_id)
    status: str = gw.post("/webhooks/consignease", body, headers).json()["status"]
    return status


def retained_for_an_hour(tmp_path: Path, downstream: Downstream) -> dict[str, Any]:
    """A gateway config whose store keeps what ended an hour ago (the retention_clock moves time on)."""
    return gateway_config(
        tmp_path, downstream.url, storage={"url": f"sqlite:///{tmp_path}/hookyard.db", "retention": "1h"}
    )


def test_a_gateway_prunes_what_ended_before_its_retention_and_keeps_the_rest(
    tmp_path: Path,
    downstream: Downstream,
    retention_clock: type[RetentionClock],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hookyard.storage")
    # One event per batch: every run goes on past the batches that delete nothing.
    monkeypatch.setattr(retention_module, "PRUNE_BATCH", 1)
    config = retained_for_an_hour(tmp_path, downstream)
    config["defaults"]["retry"]["schedule"] = ["1h"]
    downstream.answer("/hooks/users", 503, 422, 422)  # then 200
    with RunningGateway(config) as gw:
        assert post_event(gw, "msg_pending") == "accepted"  # 503: retried in an hour
        wait_until(lambda: admin_show(gw, "msg_pending").json()["deliveries"][0]["attempts"])
        assert post_event(gw, "msg_dead") == "accepted"  # 422: dead at once
        wait_until(lambda: states_of(gw, "msg_dead") == ["dead"])
        # Replayable while it is kept.
        replay = gw.client.post(f"{gw.ops_url}/admin/events/msg_dead/replay", json={})
        assert replay.json()["replayed"] == 1
        downstream.wait_for(3, "/hooks/users")
        wait_until(lambda: states_of(gw, "msg_dead") == ["dead"])
        assert post_event(gw, "msg_delivered") == "accepted"
        wait_until(lambda: states_of(gw, "msg_delivered") == ["delivered"])
        middle = time.time()
        time.sleep(0.05)
        assert post_event(gw, "msg_young") == "accepted"
        wait_until(lambda: states_of(gw, "msg_young") == ["delivered"])
        time.sleep(0.2)  # runs on the real time find nothing an hour old
        assert gw.metric("hookyard_events_pruned_total") == 0

        # An hour on: what ended before `middle` goes.
        retention_clock.now = middle + 3600
        wait_until(lambda: gw.metric("hookyard_events_pruned_total") == 2)
        assert admin_show(gw, "msg_dead").status_code == 404
        assert admin_show(gw, "msg_delivered").status_code == 404
        assert gw.client.post(f"{gw.ops_url}/admin/events/msg_dead/replay", json={}).status_code == 404
        assert states_of(gw, "msg_young") == ["delivered"]
        assert states_of(gw, "msg_pending") == ["pending"]  # however old, never while it is pending
        time.sleep(0.2)
        assert gw.metric("hookyard_events_pruned_total") == 2
        # Its id is no longer known: the provider's resend of it is a new event, and delivered again.
        assert post_event(gw, "msg_delivered") == "accepted"
        wait_until(lambda: states_of(gw, "msg_delivered") == ["delivered"])
    runs = [r for r in caplog.records if r.getMessage() == "pruned events past storage.retention"]
    # msg_dead's delivery was dead, never replayed after its last failure: the log says so.
    assert [(r.events, r.deliveries, r.dead) for r in runs] == [(2, 2, 1)]  # type: ignore[attr-defined]


def test_a_prune_that_fails_unexpectedly_is_logged_and_tried_again_at_the_next_run(
    tmp_path: Path,
    downstream: Downstream,
    retention_clock: type[RetentionClock],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = retained_for_an_hour(tmp_path, downstream)
    with RunningGateway(config) as gw:
        for event_id in ("msg_old", "msg_newest"):  # the newest event is kept, whatever its age
            assert post_event(gw, event_id) == "accepted"
            wait_until(lambda: states_of(gw, event_id) == ["delivered"])  # noqa: B023 (called here)
        real_prune, failures = gw.gateway.storage.prune, [RuntimeError("a bug in a prune statement")]

        async def prune_failing_once(*args: Any, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop()
            return await real_prune(*args, **kwargs)

        monkeypatch.setattr(gw.gateway.storage, "prune", prune_failing_once)
        retention_clock.now = time.time() + 7200
        # The run after the failed one deletes the event: the failure did not end the runs.
        wait_until(lambda: gw.metric("hookyard_events_pruned_total") == 1)
    assert not gw.thread.is_alive()
    [failed] = [r for r in caplog.records if r.getMessage() == "cannot prune events"]
    assert failed.exc_info is not None


def test_a_run_cut_short_still_logs_what_it_deleted(
    tmp_path: Path,
    downstream: Downstream,
    retention_clock: type[RetentionClock],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A long run (the first one after an upgrade, say) that a shutdown, or a store that starts refusing
    # writes, ends between two batches has deleted events all the same: the log says so.
    caplog.set_level(logging.INFO, logger="hookyard.storage")
    monkeypatch.setattr(retention_module, "PRUNE_BATCH", 1)
    monkeypatch.setattr(retention_module, "PRUNE_PAUSE", 3600.0)  # the run waits after its first batch
    config = retained_for_an_hour(tmp_path, downstream)
    with RunningGateway(config) as gw:
        for event_id in ("msg_first", "msg_second", "msg_newest"):
            assert post_event(gw, event_id) == "accepted"
            wait_until(lambda event_id=event_id: states_of(gw, event_id) == ["delivered"])
        retention_clock.now = time.time() + 7200
        wait_until(lambda: gw.metric("hookyard_events_pruned_total") == 1)
        assert admin_show(gw, "msg_first").status_code == 404
        assert states_of(gw, "msg_second") == ["delivered"]  # left to the rest of the run
    assert not gw.thread.is_alive()
    runs = [r for r in caplog.records if r.getMessage() == "pruned events past storage.retention"]
    assert [(r.events, r.deliveries) for r in runs] == [(1, 1)]  # type: ignore[attr-defined]


def test_a_run_that_fails_midway_logs_what_it_deleted_before(
    tmp_path: Path,
    downstream: Downstream,
    retention_clock: type[RetentionClock],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hookyard.storage")
    monkeypatch.setattr(retention_module, "PRUNE_BATCH", 1)
    config = retained_for_an_hour(tmp_path, downstream)
    with RunningGateway(config) as gw:
        for event_id in ("msg_first", "msg_second", "msg_newest"):
            assert post_event(gw, event_id) == "accepted"
            wait_until(lambda event_id=event_id: states_of(gw, event_id) == ["delivered"])
        real_prune, batches = gw.gateway.storage.prune, [0]

        async def prune_refused_at_the_second_batch(*args: Any, **kwargs: Any) -> Any:
            batches[0] += 1
            if batches[0] == 2:
                raise StorageUnavailable("database or disk is full")
            return await real_prune(*args, **kwargs)

        monkeypatch.setattr(gw.gateway.storage, "prune", prune_refused_at_the_second_batch)
        retention_clock.now = time.time() + 7200
        # The next run deletes msg_second: two runs, each logged with its own.
        wait_until(lambda: gw.metric("hookyard_events_pruned_total") == 2)
        assert states_of(gw, "msg_newest") == ["delivered"]
    runs = [r for r in caplog.records if r.getMessage() == "pruned events past storage.retention"]
    assert [(r.events, r.deliveries) for r in runs] == [(1, 1), (1, 1)]  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == ["cannot prune events"]


def test_a_gateway_with_retention_off_prunes_nothing(
    tmp_path: Path, downstream: Downstream, retention_clock: type[RetentionClock]
) -> None:
    config = gateway_config(
        tmp_path, downstream.url, storage={"url": f"sqlite:///{tmp_path}/hookyard.db", "retention": False}
    )
    with RunningGateway(config) as gw:
        for event_id in ("msg_first", "msg_second"):
            assert post_event(gw, event_id) == "accepted"
            wait_until(lambda event_id=event_id: states_of(gw, event_id) == ["delivered"])
        retention_clock.now = time.time() + 10 * 365 * 86400
        time.sleep(0.5)  # ten runs, had retention been on: msg_first would be gone after the first
        assert states_of(gw, "msg_first") == ["delivered"]
        assert gw.metric("hookyard_events_pruned_total") == 0
