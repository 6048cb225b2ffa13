"""The embedded store: one SQLite file in WAL mode.

Operations queued together run in one transaction with one commit, and a webhook is answered only once the
write-ahead log holding its commit is fsynced: under load many webhooks share one fsync (group commit). The
event loop never waits on the disk: the fsync runs in a helper process (see _GroupCommit and _WalSyncer),
checkpoints and the queue statistics' scans on helper threads (the scans on a reader connection of their
own). Nor does it wait on another process's write lock: a batch that finds it taken is tried again from a
timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import orjson

from gateway.actions import ParentResult
from gateway.config import sqlite_path
from gateway.events import Event, stored_payload
from gateway.storage import (
    DUPLICATE,
    FINAL_STATES,
    STORED,
    Attempt,
    Claim,
    DeliveryRecord,
    EventDetail,
    EventSummary,
    Finished,
    Ingested,
    Lease,
    NewDelivery,
    PruneCursor,
    Pruned,
    QueueStats,
    Storage,
    StorageUnavailable,
    StoredEvent,
    Unconfirmed,
    Unreadable,
    no_longer_configured,
    unreadable_event,
)
from gateway.storage.fsync_helper import REPLY, REQUEST  # the helper's messages
from gateway.tasks import DaemonThread

log = logging.getLogger("hookyard.storage")

# sqlite3 binds int, float, str and bytearray parameters as they are. Any other (None, a bool, bytes: a body,
# the NULLs of most rows) it first offers to its adapters, and finding none it raises and swallows an
# AttributeError (PrepareProtocol has no __adapt__) on the way to binding it as it is anyway: 1.4% of a
# webhook's instructions with no route, 2% with a forward route (bench part 6). Adapters that give back the
# same value bind exactly what sqlite3 would, without the error. They are the process's (sqlite3 keeps one
# registry).
# Each adapter is a C callable, so binding runs no Python frame: bytes.__bytes__ gives an exact bytes object
# back as it is (no copy), and an empty dict's get gives None back for None.
_NOTHING: dict[None, None] = {}
sqlite3.register_adapter(bytes, bytes.__bytes__)
sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(type(None), _NOTHING.get)

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]
# Told the size and duration of every committed batch (metrics), fsync included; called on the loop.
CommitObserver = Callable[[int, float], None]

# Bounds one transaction so a flood cannot make a single commit (and its callers' latency) arbitrarily large.
MAX_BATCH = 512
# The WAL is copied into the database every this many durable commits, in the background, and started
# over from its beginning once it is larger than WAL_SIZE_LIMIT (or all copied). Batches wait while it is
# started over, for longer the more was committed since the last time (mostly the database file's fsync):
# short and often keeps those waits out of the ingest p99 (measured: 1.3 ms each at 25, 4.8 ms at 100).
CHECKPOINT_COMMITS = 25
# How long an operation that nobody waits on to go on (an attempt's result) may wait for another batch to
# ride along with before it commits on its own. At a few hundred events a second each event otherwise
# costs four commits of its own (store, lease, result, the next-due read), each writing its own WAL frames.
RIDE_ALONG_DELAY = 0.005
WAL_SIZE_LIMIT = 16 * 1024 * 1024
# How long a batch waits for another process's write lock (the CLI's, a `sqlite3` shell's open transaction)
# before its operations are refused. Not in SQLite's busy handler, which sleeps on the calling thread, here the
# event loop's: the writer's busy timeout is 0, and a batch that finds the lock taken goes back to the head of
# the queue and is tried again from a timer, after BUSY_RETRY_FIRST, then twice as long each time up to
# BUSY_RETRY_MAX (SQLite's own handler backs off alike). Opening the database still waits in SQLite.
BUSY_TIMEOUT = 5.0
BUSY_RETRY_FIRST = 0.002
BUSY_RETRY_MAX = 0.1
# How long a commit may wait for its fsync (or batches for a checkpoint that starts the WAL over) before the
# store stops waiting for it: what waits for it is answered (_GroupCommit._fsync_overdue), and durable writes
# are refused until it finishes. A disk that stopped answering would otherwise hold every webhook, and
# /readyz, for ever. Closing the store waits as long at most for what is in progress (_GroupCommit.close).
FSYNC_TIMEOUT = 5.0
# The free space the store's file system must have at least for /readyz (check_writable), whatever the
# limits: other writes (results, leases, checkpoints) need room too. Its test write takes a single page,
# which fits in what the write-ahead log already holds of a transaction the disk refused (a larger
# webhook's), so on a full disk the write alone passes while every webhook is refused 503: the check asks
# for room for one webhook of the configured size (_room_needed) besides.
READY_FREE_BYTES = 1024 * 1024
# Pages a webhook writes besides those of its body and headers: its rows' leaves, the indexes' leaves, the
# b-tree pages above them that a split changes, the database header.
READY_ROW_PAGES = 16
# What a WAL frame adds to its page, and the pointer an overflow page keeps of its page (SQLite's formats).
WAL_FRAME_HEADER = 24
OVERFLOW_POINTER = 4
# The two kinds of checkpoint (_GroupCommit.checkpoint).
BACKGROUND, RESTART = "background", "restart"
# A prune batch deletes no more than this many bytes of bodies (at least one event, whatever its size).
# Deleting a body frees its overflow pages, which SQLite reads one by one and, where it is built with
# secure_delete on (as Debian's is, which the image uses), overwrites with zeros: about 3 ms per MiB, on the
# event loop, measured. A batch of 100 small events takes 2 to 3 ms.
PRUNE_BYTES = 1024 * 1024
# Nor more than this many rows of deliveries and attempts: a delivery retried every few seconds for days has
# thousands of attempts, and a batch of 100 such events held the loop for tens of milliseconds. 2,000 rows
# take about 4 ms, measured. An event with more on its own loses its attempts first, this many a batch, then
# goes whole (its deliveries, a few per route, together).
PRUNE_ROWS = 2_000
# Nor does it look at more than this many events, most of them kept (a delivery still pending, due tomorrow
# say): `limit` counts the events it deletes, so a walk past many kept ones takes a few batches, not one per
# `limit` of them. Each kept one is a seek in deliveries_event: 2,000 take a few milliseconds.
PRUNE_SCAN = 2_000
SKIPPED_REASON = "parent did not reach the required state"
# A final state as a dependent's `when` names it (a skipped parent has neither result).
RESULT_OF = {"delivered": "success", "dead": "failure"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    type        TEXT NOT NULL,
    occurred_at REAL,
    received_at REAL NOT NULL,
    verified    INTEGER NOT NULL DEFAULT 1,
    headers     TEXT NOT NULL,
    body        BLOB NOT NULL,
    -- event_id first: the same index finds an id whatever its source (the admin's lookups) and keeps one
    -- per source. Every index is written on every webhook; databases made before this have a second one,
    -- events_by_id, which does no harm. Listings filtered by source walk the events newest first until
    -- they have a page: quick for a busy source, a long walk for a rare one in a large database.
    UNIQUE (event_id, source)
);
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);

CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY,
    event_seq   INTEGER NOT NULL REFERENCES events (seq),
    route       TEXT NOT NULL,
    action      TEXT NOT NULL,
    parent_id   INTEGER REFERENCES deliveries (id),
    run_when    TEXT,
    -- waiting (for its parent), pending (due at due_at, or leased until due_at), delivered, dead, skipped
    state       TEXT NOT NULL,
    -- this round's: a replay starts the count over, and the retry schedule with it
    attempts    INTEGER NOT NULL DEFAULT 0,
    -- those made in the rounds before, which the numbering goes on from (added to an older database
    -- by _add_missing_columns, after its other columns)
    attempts_before INTEGER NOT NULL DEFAULT 0,
    due_at      REAL,
    -- when it last became pending (created, released by its parent, replayed): what the lag is measured from
    pending_since REAL,
    lease_owner TEXT,
    last_status INTEGER,
    last_error  TEXT,
    created_at  REAL NOT NULL,
    finished_at REAL
);
-- Claiming the next due delivery is an index seek, whatever the backlog.
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (due_at) WHERE state = 'pending';
-- Written twice for every delivery (made pending, then finished) for one reader, the queue statistics,
-- which visit every pending delivery anyway and take the oldest on the way.
DROP INDEX IF EXISTS deliveries_pending_since;
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_seq);
CREATE INDEX IF NOT EXISTS deliveries_parent ON deliveries (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_waiting ON deliveries (state) WHERE state = 'waiting';
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (finished_at) WHERE state = 'dead';

CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id),
    number      INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    duration    REAL NOT NULL,
    outcome     TEXT NOT NULL,
    status_code INTEGER,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts (delivery_id);
"""

# The pending deliveries by where they stand, each group with the oldest time one became pending: a scan of
# every pending delivery (through the partial index deliveries_due), every 2 s on the reader's thread. A
# lease's due_at is its end: one that has run out (its process died) is due again, as a claim takes it.
QUEUE_STATS = (
    "SELECT CASE WHEN due_at <= :now THEN 'due' WHEN lease_owner IS NOT NULL THEN 'in_flight' "
    "ELSE 'scheduled' END, count(*), min(pending_since) FROM deliveries WHERE state = 'pending' GROUP BY 1"
)

_DELIVERY_COLUMNS = (
    "id, event_seq, route, action, state, attempts, due_at, created_at, parent_id, run_when, "
    "last_status, last_error, finished_at, pending_since, attempts_before"
)
# The headers as bytes, which orjson decodes and checks: a row whose text is not UTF-8 (edited by hand, a
# damaged page) then fails on its own in _read_event, where sqlite3 would fail the whole statement.
_EVENT_COLUMNS = (
    "seq, source, event_id, type, occurred_at, received_at, verified, CAST(headers AS BLOB), body"
)


# The columns added since the first databases were made: (table, column, definition).
_ADDED_COLUMNS = (("deliveries", "attempts_before", "INTEGER NOT NULL DEFAULT 0"),)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Add to a database made by an earlier version the columns it lacks (CREATE TABLE IF NOT EXISTS
    leaves its tables as they are). Every statement names its columns, so an earlier version still works
    on it. A database that has them all is only read: opening it takes no write lock."""
    missing = [added for added in _ADDED_COLUMNS if added[1] not in _columns(conn, added[0])]
    if not missing:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, definition in missing:
            if column not in _columns(conn, table):  # another process opening it may have added it since
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                if column == "attempts_before":
                    # A round that an earlier version's replay began, still running or waiting, numbered
                    # its attempts from 1: it goes on past every attempt recorded, not past its own count.
                    conn.execute(
                        f"UPDATE deliveries SET attempts_before = max(0, {_RECORDED} - attempts) "
                        "WHERE state IN ('pending', 'waiting')"
                    )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


class _GroupCommit:
    """Runs operations in batches, one transaction each, and answers a durable operation only once the
    write-ahead log that holds it is on disk.

    A batch's statements and its COMMIT run on the event loop's thread, back to back: with
    synchronous=NORMAL a commit only hands the WAL frames to the OS, which takes microseconds. The fsync
    happens in a helper process (`_WalSyncer`), whose answer wakes the callers of every batch committed
    before the fsync began: the loop never waits on the disk. While an fsync runs, durable operations wait
    uncommitted and then commit together (group commit): their answer could not come sooner, and one large
    commit writes fewer WAL pages than many small ones.

    For what we answer this is as durable as synchronous=FULL: SQLite in WAL mode with NORMAL never
    corrupts the database on power loss; it may lose the last commits, and nobody was told they were
    stored. Operations that need no durability (a lease, a read) neither wait for an fsync nor for the
    durable operations held back: they commit at once and are answered then.

    Checkpoints (copying the WAL into the database file, with two fsyncs) run on a helper thread; SQLite's
    automatic checkpoints are off because they would run inside a COMMIT, on the loop. Most run in the
    background, on a connection of their own, while batches go on committing (a PASSIVE checkpoint copies
    what was committed when it began and never blocks a writer). Only to start the WAL over from its
    beginning must nothing else write: when it has grown past WAL_SIZE_LIMIT, or when a background
    checkpoint found it all copied, batches wait while the rest is copied and one small commit on the
    helper thread starts the file over (that commit fsyncs the WAL's new header, which should not happen
    on the loop; it still may, rarely, when a batch commits between a background checkpoint that copied
    everything and that restart). Checkpointing everything with batches held back, as this did before,
    held up every webhook in progress by the checkpoint's length ten times a second under load: it set the
    ingest p99.

    The loop never waits for another process's write lock (the CLI's, a shell's open transaction) either:
    a batch that finds it taken is put back at the head of the queue, nothing of it written, and tried
    again from a timer (_wait_for_lock). Its durable operations are still answered only once committed and
    fsynced, and refused if the lock stays taken past BUSY_TIMEOUT.

    Nor does anything wait for ever on a disk that stopped answering: an fsync that has not returned within
    FSYNC_TIMEOUT (the helper's, or that of a RESTART checkpoint, which batches wait for) is no longer
    waited for (_fsync_overdue). What waits uncommitted is refused; what its batch committed may still
    reach the disk, and is answered Unconfirmed, with its result; durable operations are then refused
    until it returns. Closing the store waits FSYNC_TIMEOUT at most too (close).
    """

    def __init__(self, connection: sqlite3.Connection, path: Path, on_commit: CommitObserver | None) -> None:
        self.connection = connection
        self.on_commit = on_commit
        self.loop = asyncio.get_running_loop()
        # Operations waiting for the next batch: durable ones, and those answered at their commit.
        self.durable: list[_Pending] = []
        self.fast: list[_Pending] = []
        # Operations answered at their commit that ride along with the next batch (`submit(ride=True)`),
        # or commit on their own after RIDE_ALONG_DELAY.
        self.riders: list[_Pending] = []
        self.riders_timer: asyncio.TimerHandle | None = None
        self.scheduled = False
        # The checkpoint running, if any: BACKGROUND (batches go on) or RESTART (batches wait: the WAL is
        # being started over).
        self.checkpoint: str | None = None
        # Committed batches waiting for an fsync, oldest first: (commit number, size, started, results).
        self.unsynced: deque[tuple[int, int, float, list[_Result]]] = deque()
        self.commits = 0
        self.checkpointed_at = 0
        self.broken: str | None = None  # why the store refuses every operation (a failed fsync)
        self.closed = False
        # When the RESTART checkpoint running (batches wait for it) began.
        self.restart_started: float | None = None
        # Since when the store has waited for an fsync that is now overdue (FSYNC_TIMEOUT): durable operations
        # are refused until it answers (and, while batches wait for a checkpoint, every operation).
        self.overdue_since: float | None = None
        # Whether `submit` must look before it queues (broken, closed or an fsync overdue): one check for the
        # three on the hot path.
        self.refusing = False
        # Looks at the oldest fsync every FSYNC_TIMEOUT at most while the store waits for one (_watch_fsync).
        self.fsync_watch: asyncio.TimerHandle | None = None
        # Another process's write lock (_wait_for_lock): since when batches have found it taken, when one
        # last did, and how long the next waits before it tries again.
        self.busy_since: float | None = None
        self.busy_seen = 0.0
        self.busy_delay = BUSY_RETRY_FIRST
        self.idle = asyncio.Event()
        self.idle.set()
        # SQLite keeps the WAL next to the real file when the database's path is a symlink.
        real = Path(os.path.realpath(path))
        self.wal = Path(f"{real}-wal")
        self.checkpoint_connection = _checkpoint_connection(path)
        try:
            self.syncer = _WalSyncer(self.wal, real.parent, self.loop, self._synced)
        except BaseException:
            self.checkpoint_connection.close()
            raise
        self.checkpointer = DaemonThread("hookyard-sqlite-checkpoint")

    def submit(self, operation: Operation, durable: bool, ride: bool = False) -> asyncio.Future[Any]:
        """Queue `operation` for a batch. Durable: answered once its commit is on disk. Otherwise at its
        commit, which is the next batch; with `ride`, the next batch that something else starts, or a
        batch of its own after RIDE_ALONG_DELAY."""
        future = self.loop.create_future()
        if self.refusing:
            refusal = self._refusal_of(durable)
            if refusal is not None:
                future.set_exception(refusal)
                return future
        self.idle.clear()
        if ride and not durable:
            self.riders.append((operation, future, durable))
            if self.riders_timer is None:
                self.riders_timer = self.loop.call_later(RIDE_ALONG_DELAY, self._riders_due)
            return future
        (self.durable if durable else self.fast).append((operation, future, durable))
        self._schedule()
        return future

    def _riders_due(self) -> None:
        self._take_riders()
        self._schedule()

    def _take_riders(self) -> None:
        """The riders join the next batch: they go first, and their own timer is no longer needed."""
        self.fast[:0], self.riders = self.riders, []
        if self.riders_timer is not None:
            self.riders_timer.cancel()
            self.riders_timer = None

    def _refusal_of(self, durable: bool) -> StorageUnavailable | None:
        if self.broken is not None:
            return self._refusal()
        if self.closed:
            return StorageUnavailable("storage is closed")
        if self.overdue_since is not None and (durable or self.checkpoint == RESTART):
            return StorageUnavailable(f"sqlite: {self._overdue()}")
        return None

    async def close(self, deadline: float, after: asyncio.Future[Any] | None = None) -> None:
        """Close once nothing is in progress, by `deadline` (on the loop's clock) at most: an fsync or a
        checkpoint on a disk that stopped answering must not hold a shutdown for ever (Kubernetes would kill
        the process at the end of its grace period anyway). Past that, what still waits is answered as for
        an overdue fsync, and the fsync or checkpoint is left to finish if it ever does: everything answered
        as stored was fsynced before its answer, and what the WAL holds beyond that SQLite recovers at the
        next start. `after`: the reader's close, waited for once the writer is idle, so that the writer's
        connection is the last one closed, but no later than a fifth of FSYNC_TIMEOUT before the deadline:
        that much is the writer's own close's."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self.idle.wait()
        if after is not None and self.idle.is_set():
            # Not into the time the writer's own close needs: with nothing of its own in progress, a read
            # stuck on the disk must not leave that close no time and have it reported as an fsync unconfirmed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline - FSYNC_TIMEOUT / 5):
                    await asyncio.shield(after)
        # From here on nothing could be synced: refuse, never leave a caller waiting.
        self.closed = self.refusing = True
        if self.fsync_watch is not None:
            self.fsync_watch.cancel()
        unfinished = None if self.idle.is_set() else self._give_up()
        # An fsync still asked for: the helper exits once it has answered, and is not waited for.
        self.syncer.stop(wait=not self.unsynced)
        # Closing the last connection checkpoints the WAL, with its fsyncs: never on the loop. On the
        # checkpoints' thread, after a checkpoint still running there (one connection, one thread at a time).
        closing = self.loop.run_in_executor(self.checkpointer, self._close_connections)
        self.checkpointer.shutdown(wait=False)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(closing)
        if unfinished is None and not closing.done():
            unfinished = f"closing the database has not finished in {FSYNC_TIMEOUT:g} s"
        if unfinished is not None:
            log.error("the store is closed with an fsync unconfirmed", extra={"error": unfinished})

    def _give_up(self) -> str | None:
        """close() found something still in progress at its deadline: what has not been written is refused,
        and what was committed but whose fsync has not answered is answered Unconfirmed, with its result.
        The fsync or checkpoint that has not finished, if any."""
        since = self._waiting_for_disk_since()
        self._refuse_waiting("the store is closed")
        if since is not None:
            unfinished = self._no_fsync_since(since)
            self._answer_unconfirmed(f"the store closed first ({unfinished})")
            return unfinished
        # Else a checkpoint in the background, or batches that waited for another process's write lock
        # (refused: their callers say so).
        return "a checkpoint has not finished" if self.checkpoint is not None else None

    def _close_connections(self) -> None:
        self.checkpoint_connection.close()
        self.connection.close()

    def _schedule(self) -> None:
        if self.scheduled or self.checkpoint == RESTART:
            return
        if not self.fast and not (self.durable and not self.unsynced):
            return  # nothing, or only durable operations while an fsync runs: commit when it is done
        self.scheduled = True
        # Not at once: operations submitted in this same loop iteration join the batch.
        self.loop.call_soon(self._run_batch)

    def _run_batch(self) -> None:
        self.scheduled = False
        if self.checkpoint == RESTART:
            return
        if self.broken is not None:
            self._refuse_waiting()
            self._maybe_idle()  # close() may be waiting
            return
        self._take_riders()
        batch, self.fast = self.fast[:MAX_BATCH], self.fast[MAX_BATCH:]
        if not self.unsynced:
            room = MAX_BATCH - len(batch)
            batch, self.durable = batch + self.durable[:room], self.durable[room:]
        if not batch:
            self._maybe_idle()  # what waited for the lock was all cancelled (_wait_for_lock): close() may wait
            return
        started = time.perf_counter()
        try:
            try:
                results = self._execute(batch, isolated=False)
            except _OperationFailed:
                # One operation failed and the others may have been fine: run them again, each in a
                # savepoint, so the failure undoes only its own writes. Rare, so the fast path needs none.
                results = self._execute(batch, isolated=True)
        except sqlite3.Error as exc:
            message = f"sqlite: {exc}"
            # An error _execute raised itself (an operation failed after SQLite rolled back) has no code.
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == sqlite3.SQLITE_BUSY:
                held = self._wait_for_lock(batch, started)
                if held is None:
                    return  # queued again, nothing of it written: the timer runs it
                message += f" (by another process, for {held:.1f} s)"
            failure = StorageUnavailable(message)
            _settle([(future, None, failure, durable) for _, future, durable in batch])
        else:
            self.busy_since = None  # the lock was free: the next wait for it starts afresh
            if any(durable for *_, durable in results):
                self.commits += 1
                self.unsynced.append((self.commits, len(batch), started, results))
                self.syncer.request(self.commits)
                if self.fsync_watch is None:  # at most once per FSYNC_TIMEOUT (_watch_fsync)
                    self.fsync_watch = self.loop.call_later(FSYNC_TIMEOUT, self._watch_fsync)
                _settle([result for result in results if not result[3]])
            else:
                _settle(results)
                self._observe(len(batch), started)
        if self.checkpoint is None and self._wal_size() > WAL_SIZE_LIMIT:
            self._start_checkpoint(RESTART)  # what waits now runs once it is done (_checkpointed)
        else:
            if self.checkpoint is None and self.commits - self.checkpointed_at >= CHECKPOINT_COMMITS:
                self._start_checkpoint(BACKGROUND)
            self._schedule()
        self._maybe_idle()

    def _wait_for_lock(self, batch: list[_Pending], now: float) -> float | None:
        """The batch found another process's write lock taken, and nothing of it is written: queue it again,
        ahead of what came since, for a timer to try again; None. Once the lock has been found taken for
        BUSY_TIMEOUT (since the last batch that got it), give up instead: how long that was. Each batch then
        tries once more and is refused at once if it is still taken, rather than make its callers wait
        again."""
        if self.busy_since is None or now - self.busy_seen > BUSY_TIMEOUT:
            # A new wait (the last one found the lock taken long ago: it was free since, if nothing wrote).
            self.busy_since, self.busy_delay = now, BUSY_RETRY_FIRST
        self.busy_seen = now
        held = now - self.busy_since
        if held >= BUSY_TIMEOUT:
            return held
        # The riders are in the batch (_take_riders), so they go back with the operations answered at commit.
        # Not those whose caller stopped waiting (a start cancelled by SIGTERM): they would hold up a close
        # until the lock was given up on.
        batch = [pending for pending in batch if not pending[1].cancelled()]
        self.fast[:0] = [pending for pending in batch if not pending[2]]
        self.durable[:0] = [pending for pending in batch if pending[2]]
        # As if a batch were scheduled (and it is): what is submitted meanwhile waits for the timer's batch.
        self.scheduled = True
        self.loop.call_later(self.busy_delay, self._run_batch)
        self.busy_delay = min(self.busy_delay * 2, BUSY_RETRY_MAX)
        return None

    def _execute(self, batch: list[_Pending], *, isolated: bool) -> list[_Result]:
        """One transaction for the batch. Raises sqlite3.Error when the transaction failed as a whole, and
        _OperationFailed (everything rolled back) when one operation failed and `isolated` is False."""
        conn = self.connection
        results: list[_Result] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for operation, future, durable in batch:
                if isolated:
                    conn.execute("SAVEPOINT op")
                try:
                    result = operation(conn)
                except Exception as exc:
                    _release_cursors(exc)
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (disk full, I/O error): the batch fails.
                        if isinstance(exc, sqlite3.Error):
                            raise
                        raise sqlite3.OperationalError(str(exc)) from exc
                    if not isolated:
                        raise _OperationFailed from exc
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    # A database error is the store's failure, never the caller's: 503, not 500.
                    failed = StorageUnavailable(f"sqlite: {exc}") if isinstance(exc, sqlite3.Error) else exc
                    results.append((future, None, failed, durable))
                else:
                    if isolated:
                        conn.execute("RELEASE op")
                    results.append((future, result, None, durable))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return results

    def _synced(self, number: int, error: OSError | None) -> None:
        """On the loop: the WAL is on disk up to commit `number` (or the fsync failed)."""
        if error is not None:
            # After a failed fsync the kernel may have dropped dirty pages that SQLite believes are
            # written: from now on nothing this process stores can be called durable, and a retry of one
            # of these events would be answered "duplicate" from a row that may be gone. So the store
            # refuses everything until a restart recovers it from what is really on disk. The same when
            # the helper is gone, even if nothing was waiting for it: nothing could be made durable again.
            self._break(f"fsync of the WAL failed ({error})")
        while self.unsynced and self.unsynced[0][0] <= number:
            _number, size, started, results = self.unsynced.popleft()
            durable = [result for result in results if result[3]]
            if self.broken is None:
                _settle(durable)
                self._observe(size, started)
            else:
                _settle([(future, None, self._refusal(), True) for future, *_ in durable])
        if self.overdue_since is not None:
            self._maybe_caught_up()
        if self.broken is not None:
            # What waited for this fsync must not be committed and answered by the next one.
            self._refuse_waiting()
        self._schedule()
        self._maybe_idle()

    def _waiting_for_disk_since(self) -> float | None:
        """When the oldest fsync the store waits for began: the oldest commit's waiting for the helper, or
        the RESTART checkpoint's that batches wait for. (A BACKGROUND checkpoint holds nothing up.)"""
        oldest = self.restart_started
        if self.unsynced and (oldest is None or self.unsynced[0][2] < oldest):
            oldest = self.unsynced[0][2]
        return oldest

    def _watch_fsync(self) -> None:
        """Whether the oldest fsync the store waits for has taken FSYNC_TIMEOUT; if not, look again when it
        would have. Idle once nothing waits: the next durable commit or RESTART starts it again."""
        self.fsync_watch = None
        since = self._waiting_for_disk_since()
        if since is None or self.overdue_since is not None:
            return
        waited = time.perf_counter() - since
        if waited < FSYNC_TIMEOUT:
            self.fsync_watch = self.loop.call_later(FSYNC_TIMEOUT - waited, self._watch_fsync)
        else:
            self._fsync_overdue(since)

    def _fsync_overdue(self, since: float) -> None:
        """An fsync has not answered within FSYNC_TIMEOUT (a disk that stopped answering): stop waiting for it.
        Durable operations waiting uncommitted behind it are refused: nothing of theirs is written (nor of
        any operation while batches wait for a checkpoint). Those its batch committed may still reach the
        disk when it answers (or be lost with the OS's cache if the machine goes down first), so they are
        neither answered as stored nor as not written: Unconfirmed, with their result. A webhook is refused
        (its sender sends it again, and is told `duplicate` if it did reach the disk); the engine runs the
        deliveries its commit leased, as if it were stored. New durable operations are refused until the
        fsync answers; a failed one breaks the store as always."""
        self.overdue_since = since
        self.refusing = True
        reason = self._overdue()
        log.error(
            "an fsync has not finished in time; durable writes are refused until it does",
            extra={"error": reason},
        )
        waiting, self.durable = self.durable, []
        if self.checkpoint == RESTART:
            self._take_riders()
            waiting, self.fast = self.fast + waiting, []
        _settle(
            [
                (future, None, StorageUnavailable(f"sqlite: {reason}"), durable)
                for _, future, durable in waiting
            ]
        )
        self._answer_unconfirmed(reason)
        self._maybe_idle()

    def _answer_unconfirmed(self, reason: str) -> None:
        """The durable operations of committed batches whose fsync has not answered are answered Unconfirmed,
        with their result: they may still reach the disk, or be lost."""
        unconfirmed = f"sqlite: committed, but {reason}: it may still be stored"
        committed, self.unsynced = self.unsynced, deque()
        for number, size, started, results in committed:
            _settle(
                (future, None, Unconfirmed(unconfirmed, result) if failed is None else failed, durable)
                for future, result, failed, durable in results
                if durable
            )
            # Answered: when the fsync does finish, only the commit is observed (_synced).
            self.unsynced.append((number, size, started, []))

    def _overdue(self) -> str:
        assert self.overdue_since is not None
        return self._no_fsync_since(self.overdue_since)

    @staticmethod
    def _no_fsync_since(since: float) -> str:
        return f"no fsync has finished for {time.perf_counter() - since:.1f} s"

    def _maybe_caught_up(self) -> None:
        """After an fsync or a checkpoint: an overdue fsync that has finished ends the refusals."""
        if self.overdue_since is not None and self._waiting_for_disk_since() is None:
            log.warning(
                "the overdue fsync has finished; durable writes are taken again",
                extra={"waited_s": round(time.perf_counter() - self.overdue_since, 3)},
            )
            self.overdue_since = None
            self.refusing = self.broken is not None or self.closed

    def fsync_wait(self) -> float:
        """How long the oldest fsync the store waits for has run; 0 when it waits for none."""
        since = self._waiting_for_disk_since()
        return 0.0 if since is None else time.perf_counter() - since

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.refusing = True
            self.broken = f"{reason}; restart hookyard to recover"
            log.error("the store refuses every write until a restart", extra={"error": self.broken})

    def _refusal(self, reason: str | None = None) -> StorageUnavailable:
        return StorageUnavailable(f"sqlite: {reason or self.broken}")

    def _refuse_waiting(self, reason: str | None = None) -> None:
        """Refuse every operation that waits for a batch: the store broke, or `reason`."""
        self._take_riders()
        waiting, self.fast, self.durable = self.fast + self.durable, [], []
        _settle([(future, None, self._refusal(reason), durable) for _, future, durable in waiting])

    def _maybe_idle(self) -> None:
        busy = self.fast or self.durable or self.riders or self.unsynced or self.scheduled
        if not (busy or self.checkpoint is not None):
            self.idle.set()

    def _observe(self, size: int, started: float) -> None:
        if self.on_commit is not None:
            self.on_commit(size, time.perf_counter() - started)

    def _wal_size(self) -> int:
        try:
            return self.wal.stat().st_size
        except OSError:
            return 0

    def _start_checkpoint(self, kind: str) -> None:
        """In the BACKGROUND, batches go on committing. For a RESTART they wait (the writer's connection is
        busy on the other thread) and then form one large batch: that delays answers by the checkpoint's
        length, it does not block the loop."""
        self.checkpointed_at = self.commits
        self.checkpoint = kind
        if kind == BACKGROUND:
            done = self.loop.run_in_executor(self.checkpointer, self._checkpoint_in_background)
            done.add_done_callback(self._checkpointed_in_background)
        else:
            self.restart_started = time.perf_counter()
            if self.fsync_watch is None:
                self.fsync_watch = self.loop.call_later(FSYNC_TIMEOUT, self._watch_fsync)
            self.loop.run_in_executor(self.checkpointer, self._checkpoint).add_done_callback(
                self._checkpointed
            )

    def _checkpoint_in_background(self) -> bool:
        """Copy what is committed into the database file; True when that was all of the WAL."""
        try:
            busy, frames, copied = self.checkpoint_connection.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()
        except sqlite3.Error as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return False
            raise
        return not busy and frames > 0 and frames == copied

    def _checkpointed_in_background(self, done: asyncio.Future[bool]) -> None:
        if done.exception() is not None:
            self._checkpointed(done)  # a failed checkpoint stops the store, whichever connection ran it
            return
        self.checkpoint = None
        if done.result() and not self.closed:
            # All of it is in the database file: start the WAL over now, off the loop, before a commit on
            # the loop does (and fsyncs the new header there).
            self._start_checkpoint(RESTART)
        self._maybe_idle()

    def _checkpoint(self) -> None:
        # No other writer exists while it runs, so it copies the rest of the WAL (background checkpoints
        # did most of it) and the next commit starts the file over from its beginning. PASSIVE keeps the
        # file's size, which spares later fsyncs an update of its length; once it has grown large,
        # TRUNCATE gives the space back.
        mode = "TRUNCATE" if self._wal_size() > WAL_SIZE_LIMIT else "PASSIVE"
        conn = self.connection
        try:
            # The writer's busy timeout is 0 (it waits for no lock: BUSY_TIMEOUT), and so this waits for
            # nothing either. TRUNCATE would wait for readers on an older snapshot to finish, for as long as
            # the busy timeout: one holding its snapshot (a backup, a shell's open transaction) keeps the WAL
            # from starting over however long it waits, and batches wait for this. Without waiting, it
            # copies what it can and the WAL starts over once that reader is done.
            conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
            # The first commit after a checkpoint starts the WAL over and fsyncs its new header, whatever
            # `synchronous` says: make that commit here, on this thread, not on the event loop. (Another
            # process holding the write lock makes it fail, and the WAL starts over at a later commit.)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA user_version = {conn.execute('PRAGMA user_version').fetchone()[0]}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise

    def _checkpointed(self, done: asyncio.Future[Any]) -> None:
        self.checkpoint = None
        self.restart_started = None
        failure = done.exception()
        if failure is not None:
            if _fsync_failed(failure):
                self._break(f"a checkpoint failed ({failure})")
                self._refuse_waiting()
            else:
                # A write refused (read-only, disk full): nothing is lost, the WAL still holds it all.
                # The next checkpoint copies it once the disk takes writes again.
                log.warning("a checkpoint failed; trying again later", extra={"error": str(failure)})
        self._maybe_caught_up()
        self._schedule()
        self._maybe_idle()


def _fsync_failed(failure: BaseException) -> bool:
    """Whether a checkpoint's failure may have lost data the OS had accepted. A checkpoint fsyncs the WAL
    and the database through SQLite's own descriptors: an fsync error it saw is one the fsync helper may
    never see again, so it means the same as a failed fsync. So does anything SQLite did not name."""
    name = getattr(failure, "sqlite_errorname", None)
    if name is None or "FSYNC" in name:
        return True
    # A write refused or failed (read-only, disk full, EIO on a write): the pages are still in the WAL.
    return not name.startswith(("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_READONLY"))


_Pending = tuple[Operation, asyncio.Future[Any], bool]
_Result = tuple[asyncio.Future[Any], Any, BaseException | None, bool]


class _OperationFailed(Exception):
    """One operation of a batch raised while the transaction was still alive."""


def _release_cursors(failure: BaseException | None) -> None:
    """Clear the frames a failure (and those it was raised from) went through. They may hold a cursor whose
    statement is still in progress, one that failed to read a row (text that is not UTF-8): the savepoint's
    release, or the next batch's, would fail on it ("SQL statements in progress") for as long as it lives."""
    seen: set[int] = set()
    while failure is not None and id(failure) not in seen:
        seen.add(id(failure))
        traceback.clear_frames(failure.__traceback__)
        failure = failure.__cause__ or failure.__context__


def _settle(results: Iterable[_Result]) -> None:
    for future, result, failed, _durable in results:
        if future.cancelled():
            continue
        if failed is None:
            future.set_result(result)
        else:
            future.set_exception(failed)


def _checkpoint_connection(path: Path) -> sqlite3.Connection:
    """The background checkpoints' own connection: they run while the writer's connection commits."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # NORMAL: a checkpoint fsyncs the WAL before copying it and the database file after.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    # It reads no rows, only copies pages: a page cache would only add to the process's memory.
    conn.execute("PRAGMA cache_size = -64")
    return conn


class _WalSyncer:
    """Makes the WAL durable for the loop: a helper process (fsync_helper.py) fdatasyncs it whenever commits
    wait for that, and answers how far the file is on disk. A sync covers every commit made before it began.

    A process, not a thread: a thread would have to take the GIL back from the event loop after every
    fdatasync, and the two threads handing the GIL to each other cost the loop about a fifth of its time
    under load (measured with perf: futex wake-ups on every GIL release). The helper shares nothing with
    the loop but two pipes; its replies are read by the loop like any other socket.

    If the helper goes away (killed, out of memory), nobody can say whether the last fsync happened: that is
    a failed fsync, and the store refuses everything until a restart, as for a disk error."""

    def __init__(
        self,
        wal: Path,
        directory: Path,
        loop: asyncio.AbstractEventLoop,
        synced: Callable[[int, OSError | None], None],
    ) -> None:
        self.loop = loop
        self.synced = synced
        self.requested = 0  # the highest commit number asked for
        self.syncs = 0  # replies received: fsyncs made
        self._buffer = b""
        self._gone = False
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_FSYNC_HELPER), str(wal), str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            # Its own session: a Ctrl-C in the terminal must not end it before the gateway's last commits.
            start_new_session=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._input = self.process.stdin
        self._output = self.process.stdout
        os.set_blocking(self._output.fileno(), False)
        loop.add_reader(self._output.fileno(), self._read_replies)

    def request(self, number: int) -> None:
        self.requested = number
        self._send(number)

    def stop(self, *, wait: bool = True) -> None:
        """End the helper (at close): at the end of its input it exits, once it has made the fsyncs asked for
        before. With none asked for, that is at once, and it is waited for. Otherwise (`wait` False: one has
        not answered, on a disk that stopped answering) it is not: a daemon thread reaps it if it ever
        does. Killing it would not help: a process in the kernel's uninterruptible wait for the disk
        ignores even SIGKILL."""
        if not self._gone:
            self._gone = True
            self.loop.remove_reader(self._output.fileno())
        self._input.close()  # end of input: the helper exits
        if not wait:
            threading.Thread(target=self._reap, name="hookyard-fsync-reaper", daemon=True).start()
            return
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._output.close()

    def _reap(self) -> None:
        # Its answers' pipe stays open until it has exited: its last answer must not fail on a closed pipe.
        self.process.wait()
        self._output.close()

    def _send(self, number: int) -> None:
        if self._gone:
            # Asked after it went away (in the same turn of the loop): that commit fails the same way.
            self.loop.call_soon(self._report_lost, "the fsync helper is gone")
            return
        try:
            # Eight bytes into a pipe the helper keeps draining: never blocks, never split (PIPE_BUF).
            os.write(self._input.fileno(), REQUEST.pack(number))
        except OSError as exc:
            self._lost(f"cannot reach the fsync helper: {exc}")

    def _read_replies(self) -> None:
        try:
            data = os.read(self._output.fileno(), 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"cannot read from the fsync helper: {exc}")
            return
        if not data:
            self._lost(f"the fsync helper exited (status {self.process.poll()})")
            return
        buffer = self._buffer + data
        size = REPLY.size
        whole = len(buffer) - len(buffer) % size
        self._buffer = buffer[whole:]
        for number, errno in REPLY.iter_unpack(buffer[:whole]):
            self.syncs += 1
            self.synced(number, OSError(errno, os.strerror(errno)) if errno else None)

    def _lost(self, why: str) -> None:
        if self._gone:
            return
        self._gone = True
        self.loop.remove_reader(self._output.fileno())
        self.process.poll()  # reap it if it has exited
        # Later, not from inside the batch that was asking for a sync.
        self.loop.call_soon(self._report_lost, why)

    def _report_lost(self, why: str) -> None:
        # Every commit asked for until now, read when this runs: none of them can be called durable.
        self.synced(max(self.requested, 1), OSError(why))


def _file_size(path: Path) -> int:
    """The size of the file, 0 when there is none (the WAL of a database not written to yet)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StorageUnavailable(f"cannot read the size of {path}: {exc}") from exc


_FSYNC_HELPER = Path(__file__).with_name("fsync_helper.py")


def _room_needed(room: int, page_size: int, free_pages: int) -> int:
    """The free space a webhook of `room` bytes (body and headers) needs on the volume: its pages go to the
    write-ahead log first, a frame each, then a checkpoint copies them into the database file, which grows
    by those that its free pages cannot hold. Never less than READY_FREE_BYTES."""
    pages = -(-room // (page_size - OVERFLOW_POINTER)) + READY_ROW_PAGES
    wal = pages * (page_size + WAL_FRAME_HEADER)
    database = max(0, pages - free_pages) * page_size
    return max(READY_FREE_BYTES, wal + database)


class SQLiteStorage(Storage):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._writer: _GroupCommit | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_thread: DaemonThread | None = None  # the reader's: one query at a time, off the loop
        self._serving_lock: IO[str] | None = None
        self.on_commit: CommitObserver | None = None

    @classmethod
    def from_url(cls, url: str) -> SQLiteStorage:
        # sqlite:///relative.db and sqlite:////absolute.db, as in SQLAlchemy.
        try:
            return cls(sqlite_path(url))
        except ValueError as exc:
            raise ValueError(f"storage.url: {exc}") from None

    async def open(self, *, create: bool = True) -> None:
        if not create and not self.path.exists():
            raise StorageUnavailable(
                f"no database at {self.path.absolute()} (a relative storage.url is relative to the working "
                "directory): run this where the gateway runs, or give --admin-url"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL: a COMMIT does not fsync; _GroupCommit fsyncs the WAL itself, off the event loop, and
            # answers a durable write only after that (see its docstring).
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            # Not serving yet: the schema may wait for another process's lock in SQLite, on the loop.
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            conn.executescript(SCHEMA)
            _add_missing_columns(conn)
            # From here on the loop waits for no lock: _GroupCommit tries a batch again from a timer.
            conn.execute("PRAGMA busy_timeout = 0")
        except (OSError, sqlite3.Error) as exc:
            raise StorageUnavailable(f"cannot open {self.path}: {exc}") from exc
        try:
            # Autocommit: each query is a short read transaction, which never keeps a checkpoint from
            # emptying the WAL.
            reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            reader.execute("PRAGMA query_only = ON")
            # Its queries scan (the statistics every 2 s, an operator's listing): a page cache would only add to
            # the process's memory.
            reader.execute("PRAGMA cache_size = -256")
            # Its listings show what is stored, a row whose text is not UTF-8 too (see _LENIENT_TEXT).
            reader.text_factory = _LENIENT_TEXT
        except sqlite3.Error as exc:
            conn.close()
            raise StorageUnavailable(f"cannot open {self.path}: {exc}") from exc
        try:
            self._writer = _GroupCommit(conn, self.path, self.on_commit)
        except (OSError, sqlite3.Error) as exc:  # the checkpoint connection, or the fsync helper
            conn.close()
            reader.close()
            raise StorageUnavailable(f"cannot open {self.path}: {exc}") from exc
        self._reader = reader
        self._reader_thread = DaemonThread("hookyard-sqlite-read")

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        # One bound for the whole close: on a disk that stopped answering a read and an fsync are stuck
        # alike, and the reader's close and the writer's wait for them side by side.
        deadline = loop.time() + FSYNC_TIMEOUT
        reader_closed = None
        if self._reader is not None:
            # Not open from here on: a read asked for meanwhile (the ops listener serves the whole shutdown)
            # is refused as unavailable, not failed by the thread that no longer takes work.
            reader, self._reader = self._reader, None
            assert self._reader_thread is not None
            # Closed on its thread, after a read under way there: a scan of a large queue, or a read stuck on
            # a disk that stopped answering, waited for until the deadline at most (a daemon thread, it does
            # not keep the process from exiting), as an fsync is.
            reader_closed = loop.run_in_executor(self._reader_thread, reader.close)
            self._reader_thread.shutdown(wait=False)
        if self._writer is not None:
            await self._writer.close(deadline, after=reader_closed)
            self._writer = None
        if reader_closed is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(reader_closed)
            if not reader_closed.done():
                log.error(
                    "the store is closed with a read unfinished",
                    extra={"error": f"a read has not finished in {FSYNC_TIMEOUT:g} s"},
                )
        if self._serving_lock is not None:
            self._serving_lock.close()
            self._serving_lock = None

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only query on the reader connection, on its own thread: it sees what is committed
        and never waits for (nor holds up) a batch."""
        if self._reader is None or self._reader_thread is None:
            raise StorageUnavailable("storage is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader_thread, query, self._reader)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"sqlite: {exc}") from exc

    async def _run(
        self, operation: Callable[[sqlite3.Connection], T], *, durable: bool = True, ride: bool = False
    ) -> T:
        """Run `operation` in the next batch. Durable (the default): answered once its commit is on disk;
        otherwise at its commit (reads, leases: losing them to a power cut loses nothing). `ride`: in the
        next batch something else starts, within RIDE_ALONG_DELAY (_GroupCommit.submit)."""
        result: T = await self._submit(operation, durable, ride)
        return result

    def _submit(
        self, operation: Callable[[sqlite3.Connection], T], durable: bool, ride: bool = False
    ) -> asyncio.Future[T]:
        if self._writer is None:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            future.set_exception(StorageUnavailable("storage is not open"))
            return future
        return self._writer.submit(operation, durable, ride)

    # -- ingest ---------------------------------------------------------------------------------------

    async def ingest(self, event: Event, deliveries: list[NewDelivery]) -> bool:
        return (await self.begin_ingest(event, deliveries)).new

    def begin_ingest(
        self, event: Event, deliveries: list[NewDelivery], lease: Lease | None = None
    ) -> asyncio.Future[Ingested]:
        return self._submit(lambda conn: _insert_event(conn, event, deliveries, lease), True)

    # -- delivery -------------------------------------------------------------------------------------

    async def claim(
        self,
        now: float,
        limit: int,
        lease: float,
        owner: str,
        *,
        running: Collection[int] = (),
        limited: Mapping[tuple[str, str], int] | None = None,
    ) -> list[Claim]:
        left_out = _id_list(running)
        rooms = dict(limited) if limited else None  # read when called, as `running` is

        def claim(conn: sqlite3.Connection) -> tuple[list[Claim], list[DeliveryRecord], list[Unreadable]]:
            return _claim(conn, now, limit, now + lease, owner, left_out, rooms)

        try:
            claims, skipped, unreadable = await self._run(_strict(claim), durable=False)
        except _NotText:
            # A due delivery, or its event, has text that is not UTF-8 (a row written by hand, or by another
            # version): that claim was rolled back. Claimed again reading text leniently, which ends those
            # deliveries dead on their own (_claim). Only then: the lenient reads cost every text value a call.
            claims, skipped, unreadable = await self._run(_lenient(claim), durable=False)
        self._tell_skipped(skipped)
        if unreadable and self.on_unreadable is not None:
            self.on_unreadable(unreadable)
        return claims

    def _tell_skipped(self, skipped: list[DeliveryRecord]) -> None:
        if skipped and self.on_skipped is not None:
            self.on_skipped(skipped)

    async def finish(
        self,
        delivery: DeliveryRecord,
        attempt: Attempt,
        state: str,
        due_at: float | None,
        now: float,
        *,
        waited_for: bool = False,
        unfollowed: str | None = None,
    ) -> Finished:
        def finish(conn: sqlite3.Connection) -> Finished:
            return _finish(conn, delivery, attempt, state, due_at, now, unfollowed)

        # Not durable: an attempt whose record a power cut loses is made again (at-least-once). Unless the
        # engine waits for it, it rides along with the next batch: nothing else does.
        try:
            return await self._run(_strict(finish), durable=False, ride=not waited_for)
        except _NotText:
            # A dependent's text is not UTF-8 (as in claim): read leniently, it runs (and its claim ends it
            # dead) or is skipped, rather than this result never being recorded, and the attempt made again
            # each time its lease ran out.
            finished = await self._run(_lenient(finish), durable=False, ride=not waited_for)
            return _shown_finished(finished)

    async def release(
        self, delivery_ids: list[int], now: float, owner: str, *, attempted: bool = True
    ) -> None:
        def release(conn: sqlite3.Connection) -> None:
            # `lease_owner = ?`: a task cancelled as the engine stops may have had its result committed
            # already (a retry, due after its backoff, with no lease): that stands.
            conn.executemany(
                "UPDATE deliveries SET due_at = ?, lease_owner = NULL, attempts = max(attempts - ?, 0) "
                "WHERE id = ? AND state = 'pending' AND lease_owner = ?",
                [(now, 0 if attempted else 1, delivery_id, owner) for delivery_id in delivery_ids],
            )

        await self._run(release, durable=False)

    async def renew(self, delivery_ids: list[int], until: float, owner: str) -> None:
        def renew(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE deliveries SET due_at = ? WHERE id = ? AND state = 'pending' AND lease_owner = ?",
                [(until, delivery_id, owner) for delivery_id in delivery_ids],
            )

        if delivery_ids:
            await self._run(renew, durable=False)

    def lock_for_serving(self) -> None:
        """One serving process per file: a second one would release the first one's leases at start-up
        and deliver its in-flight work twice. The lock goes with the process, however it ends."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = lock_path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StorageUnavailable(f"{self.path} is already served by another hookyard process") from None
        self._serving_lock = handle

    async def release_all_leases(self, now: float) -> int:
        """Only one process serves a SQLite file (lock_for_serving), so at start-up every lease is a dead
        process's."""

        def release(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE deliveries SET due_at = min(due_at, ?), lease_owner = NULL "
                "WHERE state = 'pending' AND lease_owner IS NOT NULL",
                (now,),
            )
            return cursor.rowcount

        return await self._run(release, durable=False)

    async def next_due_at(
        self, *, running: Collection[int] = (), full: Collection[tuple[str, str]] = ()
    ) -> float | None:
        left_out = _id_list(running)
        full_actions = _key_list(full)

        def next_due(conn: sqlite3.Connection) -> float | None:
            if full_actions is not None:
                row = conn.execute(NEXT_DUE_LIMITED, (left_out or "[]", full_actions)).fetchone()
            elif left_out is None:
                row = conn.execute(NEXT_OF_ALL_DUE).fetchone()
            else:
                row = conn.execute(NEXT_DUE, (left_out,)).fetchone()
            return None if row[0] is None else float(row[0])

        # Rides along: the claim loop only sets its sleep by it, and whatever falls due sooner wakes it.
        return await self._run(next_due, durable=False, ride=True)

    async def queue_stats(self, now: float) -> QueueStats:
        # On the reader: counting a large queue visits every pending delivery, which must not hold up the
        # event loop or the next batch (at 1 M queued it takes about half a second).
        def stats(conn: sqlite3.Connection) -> QueueStats:
            counts = {"due": 0, "scheduled": 0, "in_flight": 0, "waiting": 0}
            oldest: float | None = None
            for bucket, count, since in conn.execute(QUEUE_STATS, {"now": now}):
                counts[bucket] = count
                if since is not None and (oldest is None or since < oldest):
                    oldest = since
            counts["waiting"] = conn.execute(
                "SELECT count(*) FROM deliveries WHERE state = 'waiting'"
            ).fetchone()[0]
            # A leased delivery's due_at is its lease's end, so only deliveries waiting for a worker count
            # (one whose lease has run out among them).
            due = conn.execute(
                "SELECT min(due_at) FROM deliveries WHERE state = 'pending' AND due_at <= ?", (now,)
            ).fetchone()[0]
            return QueueStats(
                counts, None if oldest is None else float(oldest), None if due is None else float(due)
            )

        return await self._read(stats)

    async def size_on_disk(self) -> int:
        # On the reader's thread too, not the loop's: a stat() on a disk that stopped answering never
        # returns, and that thread does one read at a time, so a stuck one never piles up more.
        wal = self.path.with_name(self.path.name + "-wal")
        return await self._read(lambda _conn: _file_size(self.path) + _file_size(wal))

    def fsync_wait(self) -> float:
        return 0.0 if self._writer is None else self._writer.fsync_wait()

    def needs_restart(self) -> str | None:
        broken = None if self._writer is None else self._writer.broken
        return None if broken is None else f"sqlite: {broken}"

    async def check_writable(self, *, room: int = 0) -> None:
        # Durable: while an fsync is overdue it is refused at once, and until then it waits for an fsync
        # FSYNC_TIMEOUT at most, and for another process's write lock BUSY_TIMEOUT at most.
        def probe(conn: sqlite3.Connection) -> tuple[int, int]:
            # A real write that the batch commits: proves the file and the disk take writes right now.
            conn.execute("PRAGMA user_version = 1")
            # That write never needs a new page; an insert would, so a database at its size limit with no
            # free page left is not ready either.
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            limit = conn.execute("PRAGMA max_page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            if pages >= limit and free == 0:
                raise StorageUnavailable("the database is at its size limit")
            return conn.execute("PRAGMA page_size").fetchone()[0], free

        page_size, free = await self._run(probe)
        try:
            stat = os.statvfs(self.path.parent)
        except OSError as exc:
            raise StorageUnavailable(f"cannot read the free space of {self.path.parent}: {exc}") from exc
        # Not counting the blocks the file system keeps for root: the image does not run as root, and a
        # container's root lacks the capability to use them.
        available = stat.f_bavail * stat.f_frsize
        needed = _room_needed(room, page_size, free)
        if available < needed:
            raise StorageUnavailable(
                f"sqlite: database or disk is full ({available} bytes free, {needed} needed)"
            )

    # -- inspection and replay ------------------------------------------------------------------------

    async def list_events(
        self,
        *,
        state: str | None = None,
        source: str | None = None,
        type: str | None = None,
        route: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[EventSummary]:
        def list_events(conn: sqlite3.Connection) -> list[EventSummary]:
            clauses: list[str] = ["1 = 1"]
            params: list[Any] = []
            for clause, value in (
                ("e.source = ?", source),
                ("e.type = ?", type),
                ("e.received_at >= ?", since),
                ("e.received_at < ?", until),
                ("e.seq < ?", before),
                ("EXISTS (SELECT 1 FROM deliveries r WHERE r.event_seq = e.seq AND r.route = ?)", route),
            ):
                if value is not None:
                    clauses.append(clause)
                    params.append(value)
            sql = (
                "SELECT * FROM (SELECT e.seq, e.source, e.event_id, e.type, e.received_at, "
                f"{_EVENT_STATE} AS state FROM events e WHERE {' AND '.join(clauses)}) "
                f"{'WHERE state = ?' if state else ''} ORDER BY seq DESC LIMIT ?"
            )
            if state:
                params.append(state)
            params.append(limit)
            return [EventSummary(*map(_shown, row)) for row in conn.execute(sql, params)]

        # On the reader: filtered by state or route it walks every event until it has a page (seconds in a
        # large database), which in a batch would hold up the event loop, and, in the CLI, the file's write
        # lock, which the serving process's batches then wait for.
        return await self._read(list_events)

    async def get_event(
        self, event_id: str, source: str | None = None, now: float | None = None
    ) -> list[EventDetail]:
        # A lease that has run out is a crashed process's (released at the next start) or a worker's that
        # missed its renewals: no attempt of it is running, and the delivery is due at the lease's end.
        leased_until = time.time() if now is None else now

        def get_event(conn: sqlite3.Connection) -> list[EventDetail]:
            sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ?"
            params: list[Any] = [event_id]
            if source is not None:
                sql += " AND source = ?"
                params.append(source)
            details = []
            for row in conn.execute(sql + " ORDER BY seq DESC", params).fetchall():
                deliveries, in_flight = [], set()
                for *columns, leased in conn.execute(
                    f"SELECT {_DELIVERY_COLUMNS}, lease_owner IS NOT NULL AND due_at > ? FROM deliveries "
                    "WHERE event_seq = ? ORDER BY id",
                    (leased_until, row[0]),
                ):
                    deliveries.append(_shown_delivery(_delivery(tuple(columns))))
                    if leased:
                        in_flight.add(deliveries[-1].id)
                attempts: dict[int, list[Attempt]] = {d.id: [] for d in deliveries}
                for delivery_id, *fields in conn.execute(
                    "SELECT a.delivery_id, a.number, a.started_at, a.duration, a.outcome, a.status_code, a.error "
                    "FROM attempts a JOIN deliveries d ON d.id = a.delivery_id WHERE d.event_seq = ? "
                    "ORDER BY a.id",
                    (row[0],),
                ):
                    attempts[delivery_id].append(Attempt(*map(_shown, fields)))
                event, unreadable = _read_event(row)
                details.append(
                    EventDetail(event, row[0], deliveries, attempts, unreadable, frozenset(in_flight))
                )
            return details

        # Shows a row whose text is not UTF-8 too, as the listings do (see _LENIENT_TEXT).
        return await self._run(_lenient(get_event), durable=False)

    async def replay_event(
        self, seq: int, action: str | None = None, now: float = 0.0, *, route: str | None = None
    ) -> int | None:
        def replay(conn: sqlite3.Connection) -> int | None:
            if conn.execute("SELECT 1 FROM events WHERE seq = ?", (seq,)).fetchone() is None:
                return None  # pruned since the caller read it: no delivery is left to run, or pending
            sql = (
                "SELECT id FROM deliveries WHERE event_seq = ? AND state IN ('delivered', 'dead', 'skipped')"
            )
            params: list[Any] = [seq]
            if action is None:
                sql += " AND parent_id IS NULL"
            else:
                sql += " AND action = ?"
                params.append(action)
            if route is not None:
                sql += " AND route = ?"
                params.append(route)
            ids = [row[0] for row in conn.execute(sql, params)]
            return _reset(conn, ids, now)

        return await self._run(replay)

    async def dead_delivery_ids(
        self,
        *,
        since: float | None,
        until: float | None = None,
        source: str | None = None,
        route: str | None = None,
        action: str | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[int]:
        def select(conn: sqlite3.Connection) -> list[int]:
            sql = (
                "SELECT d.id FROM deliveries d JOIN events e ON e.seq = d.event_seq "
                "WHERE d.state = 'dead' AND d.id > ?"
            )
            params: list[Any] = [after]
            for clause, value in (
                ("d.finished_at >= ?", since),
                ("d.finished_at < ?", until),
                ("e.source = ?", source),
                ("d.route = ?", route),
                ("d.action = ?", action),
            ):
                if value is not None:
                    sql += f" AND {clause}"
                    params.append(value)
            sql += " ORDER BY d.id"
            if limit is not None:
                sql += " LIMIT ?"
                params.append(limit)
            return [row[0] for row in conn.execute(sql, params)]

        # On the reader, as list_events: narrowed to a rare source, it walks a window's dead deliveries.
        return await self._read(select)

    async def reset_deliveries(self, delivery_ids: list[int], now: float) -> int:
        def reset(conn: sqlite3.Connection) -> int:
            placeholders = ",".join("?" * len(delivery_ids))
            final = [
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM deliveries WHERE id IN ({placeholders}) "
                    "AND state IN ('delivered', 'dead', 'skipped')",
                    delivery_ids,
                )
            ]
            return _reset(conn, final, now)

        return await self._run(reset) if delivery_ids else 0

    async def events_page(
        self,
        *,
        since: float | None,
        until: float | None = None,
        source: str | None = None,
        after: int = 0,
        limit: int = 500,
    ) -> list[StoredEvent]:
        def page(conn: sqlite3.Connection) -> list[StoredEvent]:
            sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ?"
            params: list[Any] = [after]
            for clause, value in (
                ("received_at >= ?", since),
                ("received_at < ?", until),
                ("source = ?", source),
            ):
                if value is not None:
                    sql += f" AND {clause}"
                    params.append(value)
            rows = conn.execute(sql + " ORDER BY seq LIMIT ?", [*params, limit]).fetchall()
            deliveries: dict[int, dict[tuple[str, str], DeliveryRecord]] = {row[0]: {} for row in rows}
            if rows:
                placeholders = ",".join("?" * len(rows))
                for delivery_row in conn.execute(
                    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE event_seq IN ({placeholders})",
                    [row[0] for row in rows],
                ):
                    delivery = _shown_delivery(_delivery(delivery_row))
                    deliveries[delivery.event_seq][(delivery.route, delivery.action)] = delivery
            stored = []
            for row in rows:
                event, unreadable = _read_event(row)
                stored.append(StoredEvent(row[0], event, deliveries[row[0]], unreadable))
            return stored

        # On the reader, as list_events: narrowed to a rare source, it walks a window's events. What it
        # read may be stale by the time a replay acts on it: add_deliveries and reset_deliveries look again.
        return await self._read(page)

    async def add_deliveries(self, seq: int, deliveries: list[NewDelivery], now: float) -> int:
        def add(conn: sqlite3.Connection) -> tuple[int, list[DeliveryRecord]]:
            if conn.execute("SELECT 1 FROM events WHERE seq = ?", (seq,)).fetchone() is None:
                # Pruned since the caller read it: deliveries of no event would fail every claim of them.
                return 0, []
            existing = {
                (route, action): (delivery_id, state)
                for delivery_id, route, action, state in conn.execute(
                    "SELECT id, route, action, state FROM deliveries WHERE event_seq = ?", (seq,)
                )
            }
            # What the caller found missing was read earlier: another replay may have created some since
            # (two at once over the same window). Created twice, they would be delivered twice.
            missing = [d for d in deliveries if (d.route, d.action) not in existing]
            skipped: list[DeliveryRecord] = []
            return _insert_deliveries(conn, seq, missing, now, existing, skipped=skipped), skipped

        # Read leniently: a stored delivery whose route or action is not UTF-8 names none of the config's,
        # and would otherwise fail the replay (on every try) at this event. Those inserted are the config's.
        created, skipped = await self._run(_lenient(add))
        self._tell_skipped(skipped)
        return created

    async def prune(self, before: float, *, after: PruneCursor | None = None, limit: int = 100) -> Pruned:
        # Through the writer, in a batch of its own like any other operation: ingest waits for it no longer
        # than for the batch itself. Not durable: what a power cut takes back, the next run deletes again.
        return await self._run(lambda conn: _prune(conn, before, after, limit), durable=False)


_EVENT_STATE = """CASE
    WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND d.state = 'dead') THEN 'dead'
    WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND d.state IN ('pending', 'waiting'))
        THEN 'pending'
    WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq) THEN 'delivered'
    ELSE 'unrouted' END"""


def _insert_event(
    conn: sqlite3.Connection, event: Event, deliveries: list[NewDelivery], lease: Lease | None
) -> Ingested:
    cursor = conn.execute(
        "INSERT INTO events (source, event_id, type, occurred_at, received_at, verified, headers, body) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, event_id) DO NOTHING",
        (
            event.source,
            event.id,
            event.type,
            event.occurred_at,
            event.received_at,
            1 if event.verified else 0,  # as the bool adapter binds it, without the adapter
            orjson.dumps(event.headers),
            event.body,
        ),
    )
    if cursor.rowcount == 0:
        return DUPLICATE
    if not deliveries:
        return STORED
    assert cursor.lastrowid is not None
    leased: list[DeliveryRecord] = []
    _insert_deliveries(conn, cursor.lastrowid, deliveries, event.received_at, {}, lease, leased)
    if not leased:
        return STORED
    # The first shares the ingress's event (read-only, as plugins are told); its siblings get their own.
    first, *siblings = leased
    return Ingested(
        True, (Claim(first, event), *[Claim(delivery, _own_event(event)) for delivery in siblings])
    )


# sqlite3 binds a None (a bool, bytes) through its adapters (see the top of this module): a tuple, a dict
# lookup and a call per parameter. The statements that every webhook's deliveries and every delivered
# attempt run write what is NULL, or always the same, into their text instead.
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (event_seq, route, action, parent_id, run_when, state, attempts, due_at, "
    "lease_owner, pending_since, created_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ROOT = (
    "INSERT INTO deliveries (event_seq, route, action, parent_id, run_when, state, attempts, due_at, "
    "lease_owner, pending_since, created_at, finished_at) "
    "VALUES (?, ?, ?, NULL, NULL, 'pending', ?, ?, ?, ?, ?, NULL)"
)


def _insert_deliveries(
    conn: sqlite3.Connection,
    seq: int,
    deliveries: list[NewDelivery],
    now: float,
    existing: dict[tuple[str, str], tuple[int, str]],
    lease: Lease | None = None,
    leased: list[DeliveryRecord] | None = None,
    *,
    skipped: list[DeliveryRecord] | None = None,
) -> int:
    """Insert an event's deliveries. A dependent waits for its parent, or, when the parent (created
    earlier, e.g. before a replay of missing deliveries) is already final, is decided at once. With a
    `lease`, up to `lease.limit` deliveries without a parent are inserted leased, their first attempt
    counted, and appended to `leased`, as `_claim` would return them. A dependent whose parent is neither
    in `existing` nor before it in `deliveries` is refused (ValueError): inserted without one, it would run
    as if it had none, its `when` ignored. Those skipped at once (a parent final already, whose result
    they do not run on) are appended to `skipped`."""
    known = dict(existing)
    for delivery in deliveries:
        parent = None
        if delivery.after:
            parent = known.get((delivery.route, delivery.after))
            if parent is None:
                raise ValueError(
                    f"delivery {delivery.action!r} of route {delivery.route!r} runs after "
                    f"{delivery.after!r}, which the event has no delivery of"
                )
        state: str = "pending"
        due_at: float | None = now
        owner, attempts = None, 0
        if parent is not None:
            parent_state = parent[1]
            outcome = RESULT_OF.get(parent_state)
            if parent_state in ("pending", "waiting"):
                state, due_at = "waiting", None
            elif outcome is not None and delivery.when in ("always", outcome):
                state = "pending"
            else:
                state, due_at = "skipped", None
        elif (
            lease is not None
            and leased is not None
            and len(leased) < lease.limit
            and (not lease.skip or (delivery.route, delivery.action) not in lease.skip)
        ):
            due_at, owner, attempts = lease.until, lease.owner, 1
        if parent is None and delivery.when is None:
            # Every delivery of a new event but a dependent's: pending, its lease (if any) all it has of
            # what may be NULL.
            row = conn.execute(
                _INSERT_ROOT, (seq, delivery.route, delivery.action, attempts, due_at, owner, now, now)
            )
        else:
            row = conn.execute(
                _INSERT_DELIVERY,
                (
                    seq,
                    delivery.route,
                    delivery.action,
                    parent[0] if parent else None,
                    delivery.when,
                    state,
                    attempts,
                    due_at,
                    owner,
                    now if state == "pending" else None,
                    now,
                    now if state == "skipped" else None,
                ),
            )
        delivery_id = row.lastrowid
        assert delivery_id is not None
        known[(delivery.route, delivery.action)] = (delivery_id, state)
        if state == "skipped":
            # Why, as for one its parent's result skips (_settle_dependents). Never at ingest, where every
            # parent is new: not a column of the insert above, which every webhook's deliveries run.
            conn.execute("UPDATE deliveries SET last_error = ? WHERE id = ?", (SKIPPED_REASON, delivery_id))
            if skipped is not None:
                skipped.append(
                    DeliveryRecord(
                        delivery_id,
                        seq,
                        delivery.route,
                        delivery.action,
                        state,
                        0,
                        None,
                        created_at=now,
                        parent_id=parent[0] if parent else None,
                        when=delivery.when,
                        last_error=SKIPPED_REASON,
                        finished_at=now,
                    )
                )
        if owner is not None:
            assert leased is not None
            leased.append(
                DeliveryRecord(
                    delivery_id,
                    seq,
                    delivery.route,
                    delivery.action,
                    state,
                    attempts,
                    due_at,
                    created_at=now,
                    when=delivery.when,
                    pending_since=now,
                )
            )
    return len(deliveries)


# The deliveries the engine runs itself are left out of its claims and of when the next falls due, whatever
# their lease says: if one's lease ran out under its running attempt (renewals failed, the loop stalled),
# claiming it would count an attempt that fences out the running one's result and sends it again. They
# come as one JSON array, so each statement keeps one text (prepared once, from sqlite3's cache); both stay
# a walk of deliveries_due in due order, the array read once into a list to look ids up in. With nothing to
# leave out (the usual case: the engine passes its ids only once a lease may have run out), the statements
# without the array run, at half the cost.
CLAIM_DUE = (
    "SELECT id FROM deliveries WHERE state = 'pending' AND due_at <= ? "
    "AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY due_at, id LIMIT ?"
)
CLAIM_ALL_DUE = (
    "SELECT id FROM deliveries WHERE state = 'pending' AND due_at <= ? ORDER BY due_at, id LIMIT ?"
)
NEXT_DUE = (
    "SELECT min(due_at) FROM deliveries WHERE state = 'pending' "
    "AND id NOT IN (SELECT value FROM json_each(?))"
)
NEXT_OF_ALL_DUE = "SELECT min(due_at) FROM deliveries WHERE state = 'pending'"
# With actions at their `concurrency` (a JSON array of [route, action]), whose deliveries stay in the queue:
# the walk of deliveries_due passes over theirs, as many as are due. Only while some action is full.
_NOT_FULL = (
    "AND (route, action) NOT IN "
    "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)) "
)
CLAIM_DUE_LIMITED = (
    "SELECT id, route, action FROM deliveries WHERE state = 'pending' AND due_at <= ? "
    f"AND id NOT IN (SELECT value FROM json_each(?)) {_NOT_FULL}ORDER BY due_at, id LIMIT ?"
)
NEXT_DUE_LIMITED = (
    "SELECT min(due_at) FROM deliveries WHERE state = 'pending' "
    f"AND id NOT IN (SELECT value FROM json_each(?)) {_NOT_FULL}"
)


# Retention. The events received before a time (a delivery ends after its event is received, so every event
# whose deliveries ended before it is among them), oldest first after a cursor (received_at, seq), each with
# its body's size and whether a delivery keeps it: one not final, or one that ended at or after that time. A
# walk of events_received and, per event, a seek in deliveries_event: the same few steps per batch however
# large the database. A final delivery without finished_at (none is written so) keeps nothing: the event
# then goes by its received_at, as one with no delivery does.
# With each event one is free to delete, the rows that deletes: its deliveries, and its attempts counted up
# to :rows only (the count walks as many entries of attempts_delivery). The rows are made as they are read,
# so a batch that stops early counts no further.
PRUNE_CANDIDATES = (
    "SELECT seq, received_at, size, kept, "
    "CASE WHEN kept THEN 0 ELSE (SELECT count(*) FROM deliveries d WHERE d.event_seq = c.seq) END, "
    "CASE WHEN kept THEN 0 ELSE (SELECT count(*) FROM (SELECT 1 FROM deliveries d "
    "JOIN attempts a ON a.delivery_id = d.id WHERE d.event_seq = c.seq LIMIT :rows)) END "
    "FROM (SELECT e.seq, e.received_at, length(e.body) AS size, EXISTS (SELECT 1 FROM deliveries d "
    "WHERE d.event_seq = e.seq AND (d.state NOT IN ('delivered', 'dead', 'skipped') OR d.finished_at >= :before)) "
    "AS kept FROM events e WHERE e.received_at < :before AND (e.received_at, e.seq) > (:at, :last) "
    "ORDER BY e.received_at, e.seq LIMIT :limit) AS c"
)
# The newest event and the event of the newest delivery are kept, whatever their age: SQLite gives a new row
# the largest rowid plus one, so deleting them would hand their seq or id to the next event or delivery, and
# a replay or a cursor still holding the old one would act on the new one.
PRUNE_NEWEST = (
    "SELECT (SELECT max(seq) FROM events), "
    "(SELECT event_seq FROM deliveries WHERE id = (SELECT max(id) FROM deliveries))"
)
# Up to ? of the attempts of one event, one with more rows than a batch deletes.
PRUNE_SOME_ATTEMPTS = (
    "DELETE FROM attempts WHERE id IN (SELECT a.id FROM deliveries d JOIN attempts a ON a.delivery_id = d.id "
    "WHERE d.event_seq = ? LIMIT ?)"
)
PRUNE_ATTEMPTS = (
    "DELETE FROM attempts WHERE delivery_id IN "
    "(SELECT id FROM deliveries WHERE event_seq IN (SELECT value FROM json_each(?)))"
)
PRUNE_DEAD = (
    "SELECT count(*) FROM deliveries WHERE event_seq IN (SELECT value FROM json_each(?)) AND state = 'dead'"
)
PRUNE_DELIVERIES = "DELETE FROM deliveries WHERE event_seq IN (SELECT value FROM json_each(?))"
PRUNE_EVENTS = "DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?))"


def _prune(conn: sqlite3.Connection, before: float, after: PruneCursor | None, limit: int) -> Pruned:
    at, last = after if after is not None else (float("-inf"), 0)
    newest = set(conn.execute(PRUNE_NEWEST).fetchone())
    candidates = conn.execute(
        PRUNE_CANDIDATES,
        {"before": before, "at": at, "last": last, "limit": max(limit, PRUNE_SCAN), "rows": PRUNE_ROWS + 1},
    )
    doomed: list[int] = []
    size = rows = looked_at = 0
    cursor: PruneCursor | None = None
    full = False
    try:
        for seq, received_at, length, kept, its_deliveries, its_attempts in candidates:
            looked_at += 1
            if kept or seq in newest:
                cursor = (received_at, seq)
                continue
            its_rows = its_deliveries + its_attempts
            if doomed and (size + length > PRUNE_BYTES or rows + its_rows > PRUNE_ROWS):
                full = True  # the next batch starts with this one
                break
            if its_rows > PRUNE_ROWS and its_attempts:
                # More than a batch on its own: a batch's worth of its attempts goes, and the next batch
                # starts with it again, from the key just below its own (no other event's lies between).
                candidates.close()
                conn.execute(PRUNE_SOME_ATTEMPTS, (seq, PRUNE_ROWS))
                return Pruned(0, 0, (received_at, seq - 1))
            cursor = (received_at, seq)
            doomed.append(seq)
            size += length
            rows += its_rows
            if len(doomed) == limit:
                full = True  # the next batch starts after this one
                break
        else:
            full = looked_at == max(limit, PRUNE_SCAN)
    finally:
        candidates.close()
    deliveries = dead = 0
    if doomed:
        seqs = orjson.dumps(doomed).decode()
        conn.execute(PRUNE_ATTEMPTS, (seqs,))
        dead = conn.execute(PRUNE_DEAD, (seqs,)).fetchone()[0]
        deliveries = conn.execute(PRUNE_DELIVERIES, (seqs,)).rowcount
        conn.execute(PRUNE_EVENTS, (seqs,))
    return Pruned(len(doomed), deliveries, cursor if full else None, dead)


def _id_list(ids: Collection[int]) -> str | None:
    """Delivery ids as the JSON array CLAIM_DUE and NEXT_DUE take, None for none (read when called: the
    caller's set may change before the statement runs)."""
    return orjson.dumps(list(ids)).decode() if ids else None


def _key_list(keys: Iterable[tuple[str, str]]) -> str | None:
    """(route, action) pairs as the JSON array of _NOT_FULL, None for none."""
    listed = [list(key) for key in keys]
    return orjson.dumps(listed).decode() if listed else None


def _claim(
    conn: sqlite3.Connection,
    now: float,
    limit: int,
    lease_until: float,
    owner: str,
    running: str | None,
    rooms: dict[tuple[str, str], int] | None = None,
) -> tuple[list[Claim], list[DeliveryRecord], list[Unreadable]]:
    """The claims, the deliveries skipped instead (with their dependents), their parent's result not one
    they run on, and those ended dead instead, their event not readable (see _end_unreadable)."""
    if rooms:
        # Some actions have a `concurrency`: none of a full one, and no more of the others than they have
        # room for. What is passed over stays due, and goes first once its action has room.
        full = _key_list(key for key, room in rooms.items() if room <= 0)
        left = dict(rooms)  # counted down here: a batch that fails runs this again
        due = []
        for delivery_id, route, action in conn.execute(
            CLAIM_DUE_LIMITED, (now, running or "[]", full or "[]", limit)
        ):
            room = left.get((route, action))
            if room is not None:
                if room <= 0:
                    continue
                left[(route, action)] = room - 1
            due.append(delivery_id)
    else:
        selected = (
            conn.execute(CLAIM_ALL_DUE, (now, limit))
            if running is None
            else conn.execute(CLAIM_DUE, (now, running, limit))
        )
        due = [row[0] for row in selected]
    if not due:
        return [], [], []
    placeholders = ",".join("?" * len(due))
    leased = {
        row[0]: _delivery(row)
        for row in conn.execute(
            f"UPDATE deliveries SET due_at = ?, lease_owner = ?, attempts = attempts + 1 "
            f"WHERE id IN ({placeholders}) RETURNING {_DELIVERY_COLUMNS}",
            (lease_until, owner, *due),
        )
    }
    deliveries = [leased[delivery_id] for delivery_id in due]  # oldest due first
    events = _by_key(
        conn, f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq IN", {d.event_seq for d in deliveries}
    )
    parent_ids = {d.parent_id for d in deliveries if d.parent_id is not None}
    parents = _by_key(conn, f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id IN", parent_ids)
    claims = []
    unready: list[int] = []
    skipped = Finished()
    unreadable: list[Unreadable] = []
    for delivery in deliveries:
        parent = None
        if delivery.parent_id is not None and delivery.parent_id in parents:
            p = _delivery(parents[delivery.parent_id])
            if p.state not in FINAL_STATES:
                # Its parent has no final result (it runs again: replayed while this one was pending, in a
                # database replayed by an earlier version). Waiting for the new result, not running on one
                # made up.
                unready.append(delivery.id)
                continue
            result = RESULT_OF.get(p.state)
            # Dead as its action was removed, nothing sent: no result, as a skipped parent's.
            gone = p.state == "dead" and p.last_error == no_longer_configured(p.route, p.action)
            if gone or result is None or delivery.when not in ("always", result):
                # Replayed on its own below a skipped or removed parent, or one whose result its `when` does
                # not ask for: skipped again, as it was then, and its own dependents with it, rather than
                # run on a result it does not follow (or told of a failure that never happened).
                row = conn.execute(
                    "UPDATE deliveries SET state = 'skipped', due_at = NULL, lease_owner = NULL, "
                    "attempts = attempts - 1, finished_at = ?, last_error = ? WHERE id = ? "
                    f"RETURNING {_DELIVERY_COLUMNS}",
                    (now, f"parent {p.last_error}" if gone else SKIPPED_REASON, delivery.id),
                ).fetchone()
                skipped.skipped.append(_shown_delivery(_delivery(row)))
                _settle_dependents(conn, delivery.id, None, now, skipped)
                continue
            outcome: Literal["delivered", "dead"] = "delivered" if p.state == "delivered" else "dead"
            parent = ParentResult(_shown(p.action), outcome, p.attempts, p.last_status, _shown(p.last_error))
        event, reason = _read_event(events.get(delivery.event_seq), delivery)
        not_text = _not_text(delivery)
        if not_text is not None:  # the event may be fine: it is the delivery that cannot be run
            event = dataclasses.replace(event, payload=None, headers={})
            reason = unreadable_event(not_text)
        if reason is not None:
            unreadable.append(_end_unreadable(conn, delivery, event, reason, now))
            continue
        if delivery.last_error is not None and not delivery.last_error.isascii():
            delivery = _shown_delivery(delivery)
        claims.append(Claim(delivery, event, parent))
    if unready:
        placeholders = ",".join("?" * len(unready))
        conn.execute(
            "UPDATE deliveries SET state = 'waiting', due_at = NULL, lease_owner = NULL, attempts = 0, "
            f"attempts_before = {_RECORDED} WHERE id IN ({placeholders})",
            unready,
        )
    return claims, skipped.skipped, unreadable


def _end_unreadable(
    conn: sqlite3.Connection, delivery: DeliveryRecord, event: Event, reason: str, now: float
) -> Unreadable:
    """A claimed delivery whose event cannot be read back, ended dead with an attempt that sent nothing,
    its dependents settled as for any dead delivery. Leased and sent to the engine, it would fail every
    claim it came in, and with it the claim of every other due delivery, for as long as it stayed due."""
    row = conn.execute(
        "UPDATE deliveries SET state = 'dead', due_at = NULL, lease_owner = NULL, last_status = NULL, "
        f"last_error = ?, finished_at = ? WHERE id = ? RETURNING {_DELIVERY_COLUMNS}",
        (reason, now, delivery.id),
    ).fetchone()
    conn.execute(_INSERT_ATTEMPT, (delivery.id, delivery.attempt_number, now, 0.0, "dead", None, reason))
    finished = Finished()
    _settle_dependents(conn, delivery.id, RESULT_OF["dead"], now, finished)
    # Read leniently, its text may not be UTF-8, nor its dependents': told as shown, as the listings do.
    return Unreadable(_shown_delivery(_delivery(row)), event, _shown_finished(finished))


def _by_key(conn: sqlite3.Connection, select: str, keys: Iterable[int]) -> dict[int, tuple[Any, ...]]:
    keys = list(keys)
    if not keys:
        return {}
    placeholders = ",".join("?" * len(keys))
    return {row[0]: row for row in conn.execute(f"{select} ({placeholders})", keys)}


_WAITING_CHILDREN = (
    "SELECT id, route, action, run_when FROM deliveries WHERE parent_id = ? AND state = 'waiting'"
)
# An attempt's result; for a delivered one, with what is NULL or always the same in its text (see
# _INSERT_ROOT).
_FINISH = (
    "UPDATE deliveries SET state = ?, due_at = ?, lease_owner = NULL, last_status = ?, last_error = ?, "
    "finished_at = ? WHERE id = ? AND attempts = ? AND pending_since IS ? AND state = 'pending'"
)
_FINISH_DELIVERED = (
    "UPDATE deliveries SET state = 'delivered', due_at = NULL, lease_owner = NULL, last_status = ?, "
    "last_error = NULL, finished_at = ? WHERE id = ? AND attempts = ? AND pending_since IS ? "
    "AND state = 'pending'"
)
# The same, for a delivery that no dependent waits for (most): it then has none to settle, and the SELECT
# of its waiting children is left out. The check inside the UPDATE costs one index seek, where a statement
# of its own costs a cursor, a bind and a fetch. Read in the UPDATE's transaction, so a dependent that a
# replay of missing deliveries added meanwhile (from any process) is seen.
_FINISH_DELIVERED_CHILDLESS = (
    f"{_FINISH_DELIVERED} AND NOT EXISTS (SELECT 1 FROM deliveries AS child WHERE child.parent_id = ?3 "
    "AND child.state = 'waiting')"
)
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (delivery_id, number, started_at, duration, outcome, status_code, error) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ATTEMPT_OK = (
    "INSERT INTO attempts (delivery_id, number, started_at, duration, outcome, status_code, error) "
    "VALUES (?, ?, ?, ?, ?, ?, NULL)"
)


def _finish(
    conn: sqlite3.Connection,
    delivery: DeliveryRecord,
    attempt: Attempt,
    state: str,
    due_at: float | None,
    now: float,
    unfollowed: str | None = None,
) -> Finished:
    final = state in ("delivered", "dead", "skipped")
    # `attempts = ?` (the round's count the attempt was claimed with, not its number) fences out a worker
    # whose lease expired and whose delivery was claimed again since: its late result changes nothing.
    # `pending_since` fences out an attempt of the round before a replay sent the delivery back to wait (a
    # dependent whose parent was replayed): the count started over, and the new round's may be the same.
    since = delivery.pending_since
    recorded = (
        delivery.id,
        attempt.number,
        attempt.started_at,
        attempt.duration,
        attempt.outcome,
        attempt.status_code,
    )
    if state == "delivered" and due_at is None and attempt.error is None:  # most results
        parameters = (attempt.status_code, now, delivery.id, delivery.attempts, since)
        if conn.execute(_FINISH_DELIVERED_CHILDLESS, parameters).rowcount:
            # Final, and no dependent waits for it: nothing to settle.
            conn.execute(_INSERT_ATTEMPT_OK, recorded)
            return Finished()
        # Fenced out, or a dependent waits: the statement without the check tells which.
        updated = conn.execute(_FINISH_DELIVERED, parameters)
    else:
        updated = conn.execute(
            _FINISH,
            (
                state,
                due_at,
                attempt.status_code,
                attempt.error,
                now if final else None,
                delivery.id,
                delivery.attempts,
                since,
            ),
        )
    if updated.rowcount == 0:
        return Finished(recorded=False)
    finished = Finished()
    if attempt.error is None:
        conn.execute(_INSERT_ATTEMPT_OK, recorded)
    else:
        conn.execute(_INSERT_ATTEMPT, (*recorded, attempt.error))
    if not final:
        return finished
    if unfollowed is not None:
        _settle_dependents(conn, delivery.id, None, now, finished, reason=unfollowed)
    else:
        _settle_dependents(conn, delivery.id, RESULT_OF.get(state), now, finished)
    return finished


def _settle_dependents(
    conn: sqlite3.Connection,
    parent_id: int,
    outcome: str | None,
    now: float,
    finished: Finished,
    *,
    reason: str = SKIPPED_REASON,
) -> None:
    """The waiting dependents of a parent that reached `outcome` (success, failure, or None for skipped) run
    when their `when` matches it, otherwise they (and theirs) are skipped; `finished` collects both. Those
    skipped say `reason` (below them, theirs say that their parent was skipped)."""
    parents = [parent_id]
    while parents:
        # One statement, always the same text: sqlite3 finds it prepared in its cache, where an IN list
        # built for each call is a new text to hash and look up each time (this runs for every delivery).
        children = conn.execute(_WAITING_CHILDREN, (parents[0],)).fetchall()
        for parent in parents[1:]:  # below a skipped dependent: rare
            children += conn.execute(_WAITING_CHILDREN, (parent,)).fetchall()
        parents = []
        for child_id, route, action, when in children:
            if outcome is not None and when in ("always", outcome):
                conn.execute(
                    "UPDATE deliveries SET state = 'pending', due_at = ?, pending_since = ? WHERE id = ?",
                    (now, now, child_id),
                )
                finished.activated.append((route, action))
            else:
                skipped = conn.execute(
                    "UPDATE deliveries SET state = 'skipped', finished_at = ?, last_error = ? WHERE id = ? "
                    f"RETURNING {_DELIVERY_COLUMNS}",
                    (now, reason, child_id),
                ).fetchone()
                finished.skipped.append(_delivery(skipped))
                parents.append(child_id)
        outcome, reason = None, SKIPPED_REASON  # below a skipped dependent, everything is skipped


# A delivery's attempts recorded so far, for the rounds after a replay to number theirs on from (one
# rewritten in an UPDATE of deliveries). The highest number, not a count: a database replayed by an earlier
# version, which numbered each round from 1, numbers on past every attempt it holds.
_RECORDED = "(SELECT coalesce(max(number), 0) FROM attempts WHERE attempts.delivery_id = deliveries.id)"
# What a replay numbers a delivery's next round on from: past its recorded attempts, and past those its
# round claimed that have no record, an attempt still in flight (its result fenced out, but sent with its
# number) or one a shutdown cut off, whose number is skipped as it is within a round.
_NUMBERED_ON = f"max(attempts_before + attempts, {_RECORDED})"


def _reset(conn: sqlite3.Connection, ids: list[int], now: float) -> int:
    """Replay: the given deliveries run again with a fresh attempt count (their numbers go on from those
    recorded), and their dependents wait again, with a fresh count too, whatever their state: a dependent
    still pending (due, retrying or in flight) acted on the parent's old result, and follows its new one.
    An attempt of it in flight is fenced out (the delivery is no longer pending): its result is discarded.
    A delivery whose parent (or any ancestor) is replayed too waits for it instead of running at once."""
    replayed = set(ids)
    roots = [delivery_id for delivery_id in ids if not _has_ancestor_in(conn, delivery_id, replayed)]
    changed = set(roots)
    for delivery_id in roots:
        conn.execute(
            "UPDATE deliveries SET state = 'pending', due_at = ?, pending_since = ?, attempts = 0, "
            f"attempts_before = {_NUMBERED_ON}, lease_owner = NULL, finished_at = NULL WHERE id = ?",
            (now, now, delivery_id),
        )
        descendants = [delivery_id]
        while descendants:
            placeholders = ",".join("?" * len(descendants))
            descendants = [
                row[0]
                for row in conn.execute(
                    "UPDATE deliveries SET state = 'waiting', due_at = NULL, attempts = 0, "
                    f"attempts_before = {_NUMBERED_ON}, finished_at = NULL, lease_owner = NULL "
                    f"WHERE parent_id IN ({placeholders}) AND state != 'waiting' RETURNING id",
                    descendants,
                )
            ]
            changed.update(replayed.intersection(descendants))
    return len(changed)


def _has_ancestor_in(conn: sqlite3.Connection, delivery_id: int, ids: set[int]) -> bool:
    parent = conn.execute("SELECT parent_id FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
    while parent is not None and parent[0] is not None:
        if parent[0] in ids:
            return True
        parent = conn.execute("SELECT parent_id FROM deliveries WHERE id = ?", (parent[0],)).fetchone()
    return False


def _delivery(row: tuple[Any, ...]) -> DeliveryRecord:
    return DeliveryRecord(*row)


def _own_event(event: Event) -> Event:
    """The event as `_event` reads it back, for one delivery: its payload parsed again from the body and
    its own headers, so no delivery sees what a sibling's plugin changed."""
    return dataclasses.replace(event, payload=stored_payload(event.body), headers=dict(event.headers))


def _read_event(
    row: tuple[Any, ...] | None, delivery: DeliveryRecord | None = None
) -> tuple[Event, str | None]:
    """The event of a row, and None; or, when its body or headers cannot be read back, or its source, id or
    type is not UTF-8 (read with _LENIENT_TEXT), or (for a `delivery`) the row is gone, what could be read of
    it, with no payload and no headers (and U+FFFD for the bytes that are not UTF-8), and why."""
    if row is None:
        assert delivery is not None
        missing = Event("", "", "", delivery.created_at, b"", None)
        return missing, unreadable_event(f"event {delivery.event_seq} is missing")
    _seq, source, event_id, type_, occurred_at, received_at, verified, _headers, body = row
    if source.isascii() and event_id.isascii() and type_.isascii():  # a call each, what nearly all rows are
        not_text = None
    else:
        not_text = _not_utf8(("source", source), ("event id", event_id), ("type", type_))
    if not_text is None:
        try:
            return _event(row), None
        except Exception as exc:  # whatever a damaged row makes orjson (or the bytes checks) raise
            not_text = f"{type(exc).__name__}: {exc}"
    event = Event(
        _shown(source),
        _shown(event_id),
        _shown(type_),
        received_at,
        body,
        None,
        occurred_at,
        {},
        bool(verified),
    )
    return event, unreadable_event(not_text)


def _event(row: tuple[Any, ...]) -> Event:
    _seq, source, event_id, type_, occurred_at, received_at, verified, headers, body = row
    return Event(
        source=source,
        id=event_id,
        type=type_,
        occurred_at=occurred_at,
        received_at=received_at,
        body=body,
        payload=stored_payload(body),
        headers=orjson.loads(headers),
        verified=bool(verified),
    )


# Text as read where a row's text may not be UTF-8 (a row written by hand, `CAST(x'ff' AS TEXT)`, or by
# another version): sqlite3 would fail the whole statement, and with it every other row. The bytes that are
# not UTF-8 come back as lone surrogates (which valid UTF-8 never gives), told from the rest by _is_utf8,
# and shown with U+FFFD by _shown: never sent, never written back (sqlite3 refuses a lone surrogate), nor
# put in a log line or a metric label. Each text value costs a call, so the claims read so only once a
# strict read failed (SQLiteStorage.claim).
_LENIENT_TEXT = functools.partial(str, encoding="utf-8", errors="surrogateescape")
_NOT_UTF8 = "Could not decode to UTF-8"  # how sqlite3 fails a read of such text


class _NotText(Exception):
    """An operation read text that is not UTF-8, strictly: everything it did is rolled back."""


def _strict(operation: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    def strict(conn: sqlite3.Connection) -> T:
        try:
            return operation(conn)
        except sqlite3.OperationalError as exc:
            if _NOT_UTF8 not in str(exc):
                raise
            raise _NotText(str(exc)) from None  # not a database error: the batch gives it back as it is

    return strict


def _lenient(operation: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """`operation`, run with the connection reading text with _LENIENT_TEXT."""

    def lenient(conn: sqlite3.Connection) -> T:
        conn.text_factory = _LENIENT_TEXT
        try:
            return operation(conn)
        finally:
            conn.text_factory = str

    return lenient


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: bytes _LENIENT_TEXT could not decode
        return False
    return True


def _not_utf8(*named: tuple[str, str | None]) -> str | None:
    """Which of these texts are not UTF-8, and what they read as; None when all are."""
    bad = [
        f"its {name} is not UTF-8 ({_shown(text)!r})" for name, text in named if text and not _is_utf8(text)
    ]
    return ", ".join(bad) or None


def _not_text(delivery: DeliveryRecord) -> str | None:
    """Why a delivery read with _LENIENT_TEXT cannot run (its route or action names none that could be
    configured), None when it can."""
    if delivery.route.isascii() and delivery.action.isascii() and (delivery.when or "").isascii():
        return None
    return _not_utf8(("route", delivery.route), ("action", delivery.action), ("when", delivery.when))


def _shown(value: Any) -> Any:
    """A text read with _LENIENT_TEXT as it can be shown (U+FFFD for each byte that is not UTF-8); any
    other value as it is."""
    if type(value) is not str or _is_utf8(value):
        return value
    return value.encode(errors="surrogateescape").decode(errors="replace")


def _shown_delivery(delivery: DeliveryRecord) -> DeliveryRecord:
    return dataclasses.replace(
        delivery,
        route=_shown(delivery.route),
        action=_shown(delivery.action),
        when=_shown(delivery.when),
        last_error=_shown(delivery.last_error),
    )


def _shown_finished(finished: Finished) -> Finished:
    finished.activated = [(_shown(route), _shown(action)) for route, action in finished.activated]
    finished.skipped = [_shown_delivery(skipped) for skipped in finished.skipped]
    return finished
