"""Durable storage of events, deliveries and attempts, behind one small interface.

The ingress, the delivery engine, the CLI and the ops endpoints only talk to `Storage`; the embedded default
is SQLite (gateway.storage.sqlite). A backend shared by several replicas implements the same methods.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from gateway.actions import ParentResult
from gateway.config import is_sqlite_url
from gateway.events import Event

DeliveryState = Literal["waiting", "pending", "delivered", "dead", "skipped"]
FINAL_STATES = ("delivered", "dead", "skipped")
EventState = Literal["pending", "delivered", "dead", "unrouted"]


def no_longer_configured(route: str, action: str) -> str:
    """The error a delivery ends dead with, nothing sent, when a reload removed its action: no result its
    dependents follow. A store knows such a parent by it: a dependent that a replay runs (or creates)
    below it on its own is skipped, as its dependents were when it ended (Storage.finish, `unfollowed`)."""
    return f"action {action!r} of route {route!r} is no longer configured"


class StorageUnavailable(Exception):
    """The store could not durably write (disk full, read-only, I/O error, database down)."""


class Unconfirmed(StorageUnavailable):
    """Written, but not confirmed durable in time (a disk that stopped answering its fsync): it may still be
    stored, or be lost. Its caller is answered as for a write that failed, but must not act as if nothing was
    written: `result` is what the write returned (an ingest's leased deliveries, say)."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


# The records made for every delivery (NewDelivery, Lease, Attempt) are NamedTuples: immutable, as the
# frozen dataclasses they were, which set each field with a call of object.__setattr__ (under callgrind an
# Attempt took 10,400 instructions to make as one, 4,000 as a NamedTuple).


class NewDelivery(NamedTuple):
    """A delivery to create with its event: one per action of every matched route."""

    route: str
    action: str
    after: str | None = None  # key of the parent action in the same route
    when: str | None = None  # success | failure | always, for dependents


@dataclass(slots=True)
class DeliveryRecord:
    id: int
    event_seq: int
    route: str
    action: str
    state: str
    attempts: int
    due_at: float | None
    created_at: float
    parent_id: int | None = None
    when: str | None = None
    last_status: int | None = None
    last_error: str | None = None
    finished_at: float | None = None
    # When it last became pending (created, released by its parent, replayed). With `attempts` it names
    # one attempt: a replay starts the count over, so a count alone may be an attempt of the round before.
    pending_since: float | None = None
    # The attempts made in the rounds before this one (replays), one whose result a replay fenced out too.
    # `attempts` counts this round's only, and drives the retry schedule, which a replay starts over; the
    # numbering goes on.
    attempts_before: int = 0

    @property
    def attempt_number(self) -> int:
        """The number of its current attempt in its whole history, as the attempt is recorded and the
        action told (`Job.attempt`): unique among its attempts, whatever the replays."""
        return self.attempts_before + self.attempts


class Attempt(NamedTuple):
    number: int
    started_at: float
    duration: float
    outcome: str
    status_code: int | None = None
    error: str | None = None


@dataclass(slots=True)
class Claim:
    """A delivery leased to one worker, with what it needs to run."""

    delivery: DeliveryRecord
    event: Event
    parent: ParentResult | None = None


class Lease(NamedTuple):
    """Up to `limit` of a new event's deliveries leased to the engine `owner` until `until` in the event's
    own transaction, for it to start once the commit is durable: they skip the queue, and the claim that
    would otherwise fetch each one back from the store. Those of the actions (route, action) in `skip`
    (at their `concurrency`) are never leased: they go to the queue."""

    owner: str
    until: float
    limit: int
    skip: frozenset[tuple[str, str]] = frozenset()


class Ingested(NamedTuple):
    """What storing an event did: `new` is False when (source, id) was already stored (nothing written);
    `claims` are the deliveries leased in the same transaction (see Lease)."""

    new: bool
    claims: tuple[Claim, ...] = ()


# Immutable, so the two answers most webhooks get are made once, not per webhook.
STORED = Ingested(True)  # stored, nothing leased
DUPLICATE = Ingested(False)


def unreadable_event(reason: object) -> str:
    """The error a delivery ends dead with, nothing sent, when its stored event cannot be read back (a body
    or headers that are not JSON, text that is not UTF-8: a database edited by hand, a row of another
    version, a damaged page)."""
    return f"the stored event cannot be read: {reason}"


@dataclass(slots=True)
class Finished:
    """What recording an attempt did: the dependents whose parent reached a final state, those that now run
    and those skipped. `recorded` is False when nothing was written because the attempt was fenced out: its
    delivery was claimed again or replayed while it ran, so its result is not the delivery's."""

    activated: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[DeliveryRecord] = field(default_factory=list)
    recorded: bool = True


class Unreadable(NamedTuple):
    """A claimed delivery ended dead in its claim, nothing sent, as its event could not be read back (see
    Storage.on_unreadable). `event` holds what could be read (id, source, type, times), no payload and no
    headers; `finished` has its dependents, settled as for any dead delivery."""

    delivery: DeliveryRecord
    event: Event
    finished: Finished


@dataclass(slots=True)
class QueueStats:
    counts: dict[str, int]  # due, scheduled, in_flight, waiting
    # When the longest-pending delivery became pending (due, waiting for a retry, or in flight).
    oldest_pending_since: float | None
    # When the delivery that has waited longest for a worker fell due (None: nothing is due).
    oldest_due_at: float | None = None


# Where a prune walk stands: the (received_at, seq) of the last event it looked at.
PruneCursor = tuple[float, int]


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one batch of a prune deleted. `resume_after` is where the next batch of the same walk starts,
    None once the walk has looked at every event received before its time. `dead`: how many of the
    deliveries were dead, which no replay can bring back now."""

    events: int
    deliveries: int
    resume_after: PruneCursor | None
    dead: int = 0


@dataclass(slots=True)
class EventSummary:
    seq: int
    source: str
    id: str
    type: str
    received_at: float
    state: str


@dataclass(slots=True)
class StoredEvent:
    """An event with its deliveries by (route, action): what replaying missing deliveries looks at.
    `unreadable` says why its body or headers cannot be read back (the event then has neither), else None."""

    seq: int
    event: Event
    deliveries: dict[tuple[str, str], DeliveryRecord]
    unreadable: str | None = None


@dataclass(slots=True)
class EventDetail:
    event: Event
    seq: int
    deliveries: list[DeliveryRecord]
    attempts: dict[int, list[Attempt]]  # by delivery id
    unreadable: str | None = None  # as StoredEvent's
    # The deliveries with an attempt under way (leased to a worker, the lease not run out), by id: their
    # due_at is when the lease ends, not when they are tried next.
    in_flight: frozenset[int] = frozenset()


class Storage(ABC):
    # Told the size and duration of every commit, when the backend batches them (group commit).
    on_commit: Callable[[int, float], None] | None = None
    # Told, once committed, of the dependents skipped without an attempt, their parent's result not one
    # they run on, by anything but an attempt's result (whose `Finished` has its own): a claim of one
    # replayed on its own, or a replay that creates one below a parent that is final already.
    on_skipped: Callable[[list[DeliveryRecord]], None] | None = None
    # Told, once committed, of the deliveries a claim ended dead instead of leasing them, their event not
    # readable from the store: one such row must not fail every claim, and with it every delivery.
    on_unreadable: Callable[[list[Unreadable]], None] | None = None

    @abstractmethod
    async def open(self, *, create: bool = True) -> None:
        """Create the schema if missing and get ready to serve. With create=False (the operator's commands,
        which only read and replay what a gateway stored) a store that does not exist yet is refused with
        StorageUnavailable, not created empty: a command run from the wrong directory, or with the wrong
        config, then says so instead of listing nothing."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ingest(self, event: Event, deliveries: list[NewDelivery]) -> bool:
        """Durably store the event and its deliveries in one transaction. False when (source, id) was
        already stored: then nothing is written. Raises StorageUnavailable when it could not commit."""

    def begin_ingest(
        self, event: Event, deliveries: list[NewDelivery], lease: Lease | None = None
    ) -> asyncio.Future[Ingested]:
        """`ingest` as a future, for the listener's hot path, which answers from a callback rather than a
        task. With a `lease`, up to `lease.limit` of the deliveries that can run at once (those with no
        parent) are leased in the same transaction and returned as claims, their attempt counted; a store
        may lease none, and the engine then claims them as usual. A store that can queue the write
        without a coroutine overrides this."""

        async def ingest() -> Ingested:
            return STORED if await self.ingest(event, deliveries) else DUPLICATE

        return asyncio.ensure_future(ingest())

    @abstractmethod
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
        """Lease up to `limit` due deliveries, oldest due first, counting an attempt for each. Deliveries in
        `running` (the caller is running them itself) are left out, whatever their lease says: one of them
        whose lease ran out while its attempt runs (missed renewals) is not attempted beside it.

        limited: how many more deliveries each of these actions (route, action) may start (its
        `concurrency` less those the caller has of it). No more than that are leased, and none of one at 0:
        leased, they would wait for the action while holding the caller's slots, which the other actions'
        due deliveries wait for.

        A delivery whose event cannot be read back, or whose text (its own route or action, its event's
        source, id or type) is not UTF-8, is not leased but ended dead in the same transaction
        (`unreadable_event`), its dependents settled, and told to `on_unreadable` once committed: one bad
        row must not fail every claim, and with it every delivery."""

    @abstractmethod
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
        """Record an attempt and the delivery's next state (pending again at due_at, or final). A final
        state releases or skips the delivery's dependents in the same transaction. Nothing is written, and
        the answer's `recorded` is False, when the delivery was claimed again (its `attempts` moved on) or
        is no longer pending (replayed) since this attempt was claimed, or was made pending again since
        (its `pending_since` moved on: a round after a replay, whose count started over).

        waited_for: something waits for this record to go on (the engine, for the slot it frees), so a
        store that holds such records back to write them with others must not.

        unfollowed: the final state is no result its dependents follow (its action was removed from the
        config): they are skipped, whatever their `when`, with this reason."""

    @abstractmethod
    async def release(
        self, delivery_ids: list[int], now: float, owner: str, *, attempted: bool = True
    ) -> None:
        """Give back the leases `owner` still holds on these deliveries (graceful shutdown), so they are due
        again at once; one whose result is recorded already is left as it is, a retry's backoff included.
        attempted=False: they never started (leased at ingest as the engine stopped), so their counted
        attempt is taken back."""

    @abstractmethod
    async def renew(self, delivery_ids: list[int], until: float, owner: str) -> None:
        """Extend the leases `owner` holds on these deliveries: they are still being worked on."""

    @abstractmethod
    async def next_due_at(
        self, *, running: Collection[int] = (), full: Collection[tuple[str, str]] = ()
    ) -> float | None:
        """When the next pending delivery (or lease) falls due, leaving out those in `running` and those of
        the actions (route, action) in `full` (as `claim` does, those of an action it may start none of)."""

    @abstractmethod
    async def queue_stats(self, now: float) -> QueueStats: ...

    @abstractmethod
    async def size_on_disk(self) -> int:
        """How many bytes the store takes on disk: what an operator watches before a disk fills (retention
        deletes old events, a receiver down for days grows the queue). A backend in a database it may share
        counts its own tables only. Read with the queue statistics, off the event loop."""

    @abstractmethod
    async def check_writable(self, *, room: int = 0) -> None:
        """Raise StorageUnavailable unless a write would succeed now, and one more webhook of `room` bytes
        (its body and headers at their limits) would fit."""

    def fsync_wait(self) -> float:
        """How long the oldest fsync that commits wait for has run, in seconds; 0 when they wait for none, or
        when the backend cannot tell. Read at every scrape: cheap."""
        return 0.0

    def needs_restart(self) -> str | None:
        """Why the store refuses every write until the process restarts (a failed fsync), or None while it
        can still recover by itself (a full disk, another process's lock, a slow fsync). /healthz fails on
        it, so that Kubernetes restarts the process. Read at every liveness probe: cheap."""
        return None

    @abstractmethod
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
        """Events newest first; `before` is the seq of the last one of the previous page."""

    @abstractmethod
    async def get_event(
        self, event_id: str, source: str | None = None, now: float | None = None
    ) -> list[EventDetail]:
        """Every stored event with that id (one per source), newest first. A delivery is in flight while
        its lease runs past `now` (default: the clock's time)."""

    @abstractmethod
    async def replay_event(
        self, seq: int, action: str | None = None, now: float = 0.0, *, route: str | None = None
    ) -> int | None:
        """Make an event's finished deliveries (all root ones, or one action's; of every route, or of
        `route`) run again, their dependents waiting again; returns how many were reset, or None when no
        event `seq` is stored (retention deleted it since the caller read it)."""

    @abstractmethod
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
        """Ids of dead deliveries that finished in [since, until), id > after, in id order."""

    @abstractmethod
    async def reset_deliveries(self, delivery_ids: list[int], now: float) -> int:
        """Make these deliveries (those in a final state) run again, their dependents waiting again."""

    @abstractmethod
    async def events_page(
        self,
        *,
        since: float | None,
        until: float | None = None,
        source: str | None = None,
        after: int = 0,
        limit: int = 500,
    ) -> list[StoredEvent]:
        """Events received in [since, until) with seq > after, oldest first, with their deliveries."""

    @abstractmethod
    async def add_deliveries(self, seq: int, deliveries: list[NewDelivery], now: float) -> int:
        """Create deliveries for a stored event (replay of missing ones), leaving out those it has by then;
        returns how many were created (none for an event pruned since it was read)."""

    @abstractmethod
    async def prune(self, before: float, *, after: PruneCursor | None = None, limit: int = 100) -> Pruned:
        """One batch of retention: look at the events received before `before`, oldest first, from after
        `after`, and delete, with their deliveries and attempts, up to `limit` of those whose deliveries
        are all final (delivered, dead, skipped) and finished before `before` (one with no delivery: received
        before it). An event with a delivery pending or waiting, or one finished since, stays, and does not
        count against `limit`. A store may look at a bounded number of events only, delete fewer than `limit`,
        or only some of the attempts of an event it would delete (to bound the batch's work); `resume_after`
        says where to go on."""


def open_storage(url: str) -> Storage:
    """A Storage for a URL: sqlite:///relative/path.db, sqlite:////absolute/path.db."""
    if is_sqlite_url(url):
        from gateway.storage.sqlite import SQLiteStorage

        return SQLiteStorage.from_url(url)
    scheme = url.split(":", 1)[0]
    raise ValueError(f"storage.url: unsupported scheme {scheme!r}; supported: sqlite")
