"""The delivery engine: claim due deliveries with a lease, run their actions, record every attempt, and
schedule retries. A new event's deliveries are leased in the event's own commit while slots are free
(`lease`, `ingested`), so they start without being claimed. At-least-once: a delivery is final only once
an attempt's result is committed; a worker that dies leaves a lease that expires (or, with SQLite, is
released at the next start)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial
from typing import Any

import pluggy

from gateway.actions import Action, Job, Outcome, Resources, dead, retry, skipped
from gateway.backoff import next_delay
from gateway.config import DeliveryEngine as EngineSettings
from gateway.events import Event
from gateway.limits import ConcurrencyLimit
from gateway.metrics import Metrics
from gateway.plugins import PluginError, Registry, plugin_of, raised_by
from gateway.routing import PlannedAction, RouteTable
from gateway.storage import (
    Attempt,
    Claim,
    DeliveryRecord,
    Finished,
    Ingested,
    Lease,
    NewDelivery,
    Storage,
    StorageUnavailable,
    Unconfirmed,
    Unreadable,
    no_longer_configured,
)
from gateway.tasks import cancel_and_wait, wait_unless_hurried

log = logging.getLogger("hookyard.delivery")


def _roots(deliveries: list[NewDelivery]) -> int:
    """How many of an event's deliveries can start at once: those that wait for no parent."""
    roots = 0
    for delivery in deliveries:  # not sum() over a generator: this runs twice for every webhook
        if delivery.after is None:
            roots += 1
    return roots


NONE_FULL: frozenset[tuple[str, str]] = frozenset()


_METRIC_OUTCOME = {"delivered": "delivered", "retry": "retried", "dead": "dead", "skipped": "skipped"}
_LOG_LEVEL = {"delivered": logging.DEBUG, "skipped": logging.INFO, "retry": logging.INFO}


@dataclass(slots=True)
class RunnableAction:
    plan: PlannedAction
    action: Action
    limit: ConcurrencyLimit | None


async def build_actions(
    table: RouteTable, registry: Registry, resources: Resources
) -> dict[tuple[str, str], RunnableAction]:
    """The table's actions, built. Suspends only when one cannot be built: the actions built before it are
    closed then (what their constructors opened, a file or a client), as none of them will ever run; a
    reload refused again and again would otherwise leave more of them open each time."""
    runnable: dict[tuple[str, str], RunnableAction] = {}
    for key, plan in table.actions.items():
        try:
            action = registry.actions[plan.use](plan.options, resources)
        except Exception as exc:
            await _close_built(runnable.values())
            # A plugin's constructor (a file it opens, a client it prepares): named, for serve or a reload
            # to say in one line which action of which route could not start.
            raise PluginError(
                f"route {plan.route!r}, action {plan.key!r}: the {plan.use} action "
                f"({registry.origin(registry.actions[plan.use])}) could not be set up: {type(exc).__name__}: {exc}"
            ) from exc
        limit = ConcurrencyLimit(plan.concurrency) if plan.concurrency else None
        runnable[key] = RunnableAction(plan, action, limit)
    return runnable


def _running_delivery(delivery_id: int, task: asyncio.Task[None]) -> dict[str, Any]:
    """The delivery a task runs (Engine._deliver), as an operator would replay it: its source, event
    id, route and action. Read from the suspended coroutine's own arguments, only when a shutdown gives up
    on it, so that starting a delivery keeps nothing more for this; the id alone if it cannot be read."""
    frame = getattr(task.get_coro(), "cr_frame", None)
    claim = frame.f_locals.get("claim") if frame is not None else None
    if not isinstance(claim, Claim):
        return {"delivery": delivery_id}
    return {
        "source": claim.event.source,
        "event_id": claim.event.id,
        "route": claim.delivery.route,
        "action": claim.delivery.action,
        "delivery": delivery_id,
    }


async def _close_built(actions: Collection[RunnableAction]) -> None:
    await _close_within_bound([asyncio.ensure_future(_close(actions))])


async def _close_within_bound(
    closing: list[asyncio.Future[None]], hurried: asyncio.Event | None = None
) -> None:
    """Wait for actions' closes ACTION_CLOSE_TIMEOUT at most (until `hurried` is set, if sooner: a shutdown
    cut short), then cancel them. Cancelled meanwhile (a shutdown cancels a reload's watcher), they are
    cancelled too, not left running past the loop's end."""
    try:
        await wait_unless_hurried(closing, ACTION_CLOSE_TIMEOUT, hurried)
    except asyncio.CancelledError:
        await cancel_and_wait(closing)
        raise
    late = [future for future in closing if not future.done()]
    if late:
        log.warning("actions still closing; given up", extra={"timeout_s": ACTION_CLOSE_TIMEOUT})
        await cancel_and_wait(late)


def _limits(actions: dict[tuple[str, str], RunnableAction]) -> dict[tuple[str, str], ConcurrencyLimit]:
    return {key: runnable.limit for key, runnable in actions.items() if runnable.limit is not None}


# How late past its deadline an attempt may be cancelled, as a share of its timeout (see Deadlines).
LATENESS = 0.1
# How often the queue's gauges are read from the store (a scan of the deliveries that are not final).
STATS_INTERVAL = 2.0
# How long a stop waits for their last read. A read on a disk that stopped answering never returns, and
# the store's reads run one at a time: the last one would wait behind it for ever, and the store would
# never be closed. Given up on, the gauges keep their last values.
LAST_STATS_TIMEOUT = 2.0
# How long an attempt cancelled for running late may take to end before it is named in the log and cancelled
# again (then again as often): an action that catches the cancellation and goes on would otherwise keep its
# delivery in flight, and a worker slot, until the gateway stops, with nothing said.
STOP_GRACE = 1.0
# How long a stop waits for the actions to close (their pools and connections), those a reload replaced
# included: a database that stopped answering must not hold the exit for ever.
ACTION_CLOSE_TIMEOUT = 5.0
# How many of the deliveries a shutdown gives up on its log line names (for a replay); the others are counted.
NAMED_GIVEN_UP = 10


class Deadlines:
    """Cancels the attempts that run past their action's timeout, all on one timer.

    asyncio.timeout() starts a timer and cancels it for every attempt: about 3% of a forwarded webhook's
    instructions (bench part 6). Here an attempt only notes its deadline. One timer fires when some attempt
    may be late, cancels those past their deadline, and is set again for the others. An attempt is
    cancelled after its deadline and at most LATENESS of its timeout later (a 30 s timeout ends by 33 s):
    the timer is moved sooner only for an attempt whose latest moment comes before it, so at a steady rate
    it fires about once per timeout, not once per attempt."""

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm  # to name the plugin of an action that does not stop
        # task -> its deadline (on the loop's clock), and what it runs, to name it if it does not stop
        self._running: dict[asyncio.Task[Any], tuple[float, Action, Job]] = {}
        # Cancelled here, not yet told (finish): what it runs, and how many times it was cancelled.
        self._late: dict[asyncio.Task[Any], tuple[Action, Job, int]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def start(self, task: asyncio.Task[Any], action: Action, job: Job) -> None:
        loop = task.get_loop()
        seconds = job.timeout
        deadline = loop.time() + seconds
        self._running[task] = (deadline, action, job)
        latest = deadline + seconds * LATENESS
        if self._timer is None or latest < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(latest, self._cancel_late, loop)

    def finish(self, task: asyncio.Task[Any]) -> int:
        """The attempt is over: how many times it was cancelled for running late, 0 if it was not (those
        cancellations are then the caller's to take back, as asyncio.timeout does)."""
        if self._running.pop(task, None) is not None:
            return 0
        late = self._late.pop(task, None)
        return 0 if late is None else late[2]

    def _cancel_late(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now, soonest = loop.time(), None
        for task, (deadline, action, job) in list(self._running.items()):
            if deadline <= now:
                del self._running[task]
                self._late[task] = (action, job, 1)
                task.cancel()
                loop.call_later(STOP_GRACE, self._not_ended, task)
            else:
                # Its latest moment; the timeout is not kept, so allow a tenth of what is left (less slack,
                # never more, than at its start).
                latest = deadline + (deadline - now) * LATENESS
                soonest = latest if soonest is None else min(soonest, latest)
        if soonest is not None:
            self._timer = loop.call_at(soonest, self._cancel_late, loop)

    def _not_ended(self, task: asyncio.Task[Any]) -> None:
        """STOP_GRACE after an attempt was cancelled for running late: if it goes on (its action caught the
        cancellation), say so, the first time, and cancel it again."""
        late = self._late.get(task)
        if late is None or task.done():
            return
        action, job, cancelled = late
        if cancelled == 1:
            log.warning(
                "action %r of route %r did not stop within %g s of its attempt's cancellation for running "
                "past its timeout (%g s): cancelled again",
                job.action,
                job.route,
                STOP_GRACE,
                job.timeout,
                extra={
                    **job.event.summary(),
                    "route": job.route,
                    "action": job.action,
                    "plugin": _plugin_of(self.pm, action),
                },
            )
        self._late[task] = (action, job, cancelled + 1)
        task.cancel()
        task.get_loop().call_later(STOP_GRACE, self._not_ended, task)


class Engine:
    def __init__(
        self,
        storage: Storage,
        actions: dict[tuple[str, str], RunnableAction],
        settings: EngineSettings,
        metrics: Metrics,
        pm: pluggy.PluginManager,
    ) -> None:
        self.storage = storage
        self.actions = actions
        # The actions with a `concurrency`: the engine takes on no more of their deliveries than that, so
        # that those waiting for one never hold the slots the other actions' deliveries wait for.
        self._limited = _limits(actions)
        self.settings = settings
        self.metrics = metrics
        self.pm = pm
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wakeup = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        # Claims of deliveries running here, each to start once that attempt ends: the newest claim only.
        self._queued: dict[int, Claim] = {}
        self._reserved = 0  # slots held for deliveries leased in commits that have not finished yet
        # Every delivery running here is leased until at least this time: each lease taken since the last
        # renewal (or since now) lasts past it, and that renewal took those running then past it.
        self._leases_hold_until = time.time() + settings.lease
        # When the first queued delivery falls due, as the claim loop last read it; 0 once new work may
        # have been queued since (wake). A new event's deliveries are leased only before then, so they
        # never start ahead of a delivery that was due first.
        self._due_at = 0.0
        self._wakes = 0
        self._queueing = 0  # events being stored whose deliveries (some of them) go to the queue
        self._deadlines = Deadlines(pm)
        # The claim loop found no free slot, or filled every one: a slot that frees up may have work. When
        # it claimed less than it could, a free slot changes nothing, and waking the loop for it would cost
        # a claim and a read (a commit each) per delivery.
        self._wants_slots = False
        self._stopping = False
        self._hurried = asyncio.Event()  # stop() waits no more (hurry)
        self._loop_task: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # actions a reload replaced, closing once idle
        self._releases: set[asyncio.Task[None]] = set()  # leases given back as the engine stops
        self._leasing: set[asyncio.Future[Ingested]] = set()  # commits holding a lease, not done yet
        self._claiming: asyncio.Future[list[Claim]] | None = None  # the claim loop's claim in flight

    def swap_actions(self, actions: dict[tuple[str, str], RunnableAction]) -> None:
        """Run new deliveries with a reloaded config's actions; close the old ones once the deliveries
        that started with them have finished. An action that keeps a `concurrency` keeps its limit, at the
        new size: the deliveries it runs now still count against it."""
        for key, runnable in actions.items():
            previous = self.actions.get(key)
            if runnable.limit is not None and previous is not None and previous.limit is not None:
                previous.limit.resize(runnable.limit.size)
                runnable.limit = previous.limit
        old, self.actions = self.actions, actions
        self._limited = _limits(actions)
        running = list(self._running.values())

        async def close_old() -> None:
            if running:
                await asyncio.wait(running)
            await _close(old.values())

        task = asyncio.create_task(close_old())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self.wake()  # an action's `concurrency` may have changed: the queue is read anew

    def wake(self) -> None:
        """New work may be due (an event was queued, a retry scheduled, a replay asked for)."""
        self._wakes += 1
        self._due_at = 0.0
        self._wakeup.set()

    def lease(self, deliveries: list[NewDelivery]) -> Lease | None:
        """A lease for a new event's deliveries, to take in the event's own commit: as many of those that
        can run at once as there are free slots. None while older work is due or on its way into the
        queue (it goes first: oldest due first, as the claim loop takes them) or the engine stops; then
        the claim loop fetches them, as it does what the lease leaves out. Those of an action at its
        `concurrency` are never leased: they wait in the queue until it has room (see `follow`). `ingested`
        must follow."""
        skip = self._full(deliveries) if self._limited else NONE_FULL
        roots = _roots(deliveries) - len(skip)
        free = self.settings.concurrency - len(self._running) - self._reserved
        limit = min(free, roots)
        if self._wants_slots or self._stopping or self._queueing or time.time() >= self._due_at:
            limit = 0
        if limit < roots:
            # Some go to the queue: until they are in it and the claim loop has looked, none of the
            # events after this one may start ahead of them.
            self._queueing += 1
        if limit <= 0:
            return None
        self._reserved += limit
        return Lease(self.owner, time.time() + self.settings.lease, limit, skip)

    def _full(self, deliveries: list[NewDelivery]) -> frozenset[tuple[str, str]]:
        """The actions of an event's deliveries without a parent that are at their `concurrency`."""
        full = NONE_FULL
        for delivery in deliveries:
            key = (delivery.route, delivery.action)
            limit = self._limited.get(key)
            if delivery.after is None and limit is not None and limit.room <= 0:
                full |= {key}
        return full

    def follow(
        self, deliveries: list[NewDelivery], lease: Lease | None, stored: asyncio.Future[Ingested]
    ) -> None:
        """Call `ingested` once the commit of the event `lease` was asked for is done; until then, a
        stop waits for it when it holds a lease. What the lease may take of an action with a
        `concurrency` counts against it from now on (as `lease` saw it, nothing has run since)."""
        if lease is not None:
            self._leasing.add(stored)
            stored.add_done_callback(self._leasing.discard)
        roots = _roots(deliveries)
        held: list[ConcurrencyLimit] = []
        full: list[ConcurrencyLimit] = []
        if self._limited:
            skip = lease.skip if lease is not None else self._full(deliveries)
            roots -= len(skip)
            full = [self._limited[key] for key in skip]
            # The store leases the first `lease.limit` of the others, in order.
            leasable = [
                (d.route, d.action) for d in deliveries if d.after is None and (d.route, d.action) not in skip
            ]
            for key in leasable[: lease.limit if lease is not None else 0]:
                limit = self._limited.get(key)
                if limit is not None:
                    limit.taken += 1
                    held.append(limit)
        stored.add_done_callback(partial(self.ingested, roots, lease, held=held, full=full))

    def ingested(
        self,
        roots: int,
        lease: Lease | None,
        stored: asyncio.Future[Ingested],
        *,
        held: Collection[ConcurrencyLimit] = (),
        full: Collection[ConcurrencyLimit] = (),
    ) -> None:
        """The commit of a new event whose deliveries include `roots` without a parent that may start (not
        of an action at its `concurrency`) is done (or failed): start what it leased, and wake the claim
        loop for what it did not. `held` counted the leased deliveries against their actions' `concurrency`
        until now; `full` are the actions whose deliveries went to the queue as they had no room."""
        leased = lease.limit if lease is not None else 0
        if leased < roots:
            self._queueing -= 1
        self._reserved -= leased
        for limit in held:
            limit.taken -= 1  # those started below count again
        claims: tuple[Claim, ...] = ()
        ingested: Ingested | None = None
        if not stored.cancelled():
            failure = stored.exception()
            if failure is None:
                ingested = stored.result()
            elif isinstance(failure, Unconfirmed):
                # Committed, and its fsync overdue: the webhook is refused, but the event may be stored all
                # the same, its deliveries leased here. Run them as if it were: left alone they would wait
                # out their lease and be claimed with a second attempt counted. Should the disk lose the event
                # after all, its sender's retry stores it again (at least once).
                ingested = failure.result
        if ingested is not None:
            new, claims = ingested
            if new and self._stopping:
                # Too late to start: give them back, for the next start (failing that, at-least-once
                # holds: the lease expires, or a SQLite store releases every lease when it opens).
                self._release_soon([claim.delivery.id for claim in claims])
            elif new:
                for claim in claims:
                    self._start(claim)
            # An action that was full when the lease was asked for may have room by now, and the claim
            # loop may have looked for its deliveries before this one was in the queue.
            if new and (len(claims) < roots or any(limit.room > 0 for limit in full)):
                self.wake()
                return
        if len(claims) < leased and self._wants_slots:
            self._wakeup.set()  # slots held for this commit are free again, and the claim loop waits for one

    def _release_soon(self, delivery_ids: list[int]) -> None:
        if not delivery_ids:
            return

        async def release() -> None:
            with contextlib.suppress(StorageUnavailable):
                await self.storage.release(delivery_ids, time.time(), self.owner, attempted=False)

        task = asyncio.create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._claim_loop(), name="hookyard-delivery")
        self._stats_task = asyncio.create_task(self._stats_loop(), name="hookyard-queue-stats")
        self._lease_task = asyncio.create_task(self._keep_leases(), name="hookyard-leases")

    def hurry(self) -> None:
        """End stop()'s waits for the claim, the commits and the deliveries in progress now (or, called before
        it, as they begin): it goes on as when its timeout has passed. For a shutdown cut short."""
        self._hurried.set()

    async def stop(self, timeout: float) -> None:
        """Stop claiming, give running deliveries `timeout` seconds (until hurry, if sooner), then release the
        rest so they are due at once at the next start (the interrupted attempt still counts towards the
        schedule: its request may have reached the receiver)."""
        self._stopping = True
        self._wakeup.set()
        # The queue's gauges go on until the end: a scrape during a long drain shows it progress.
        await _cancel(self._loop_task, self._lease_task)
        claiming, self._claiming = self._claiming, None
        if claiming is not None:
            # The claim loop was cancelled waiting for this claim: what it leases is not run here but given
            # back, with no attempt counted, rather than left leased until the next start.
            await self._wait_for_all([claiming], timeout)
            if claiming.done() and not claiming.cancelled() and claiming.exception() is None:
                self._release_soon([claim.delivery.id for claim in claiming.result()])
        if self._leasing:
            # Their deliveries are started, or given back (stopping), as each commit finishes.
            await self._wait_for_all(list(self._leasing), timeout)
        if self._running:
            await self._wait_for_all(list(self._running.values()), timeout)
            unfinished = {delivery_id: task for delivery_id, task in self._running.items() if not task.done()}
            # An action that catches its cancellation and goes on is left running, its delivery released
            # all the same (should it still end while the store is open, its result is recorded as usual).
            left = await cancel_and_wait(unfinished.values())
            if left:
                given_up = [delivery_id for delivery_id, task in unfinished.items() if task in left]
                named = [_running_delivery(delivery_id, unfinished[delivery_id]) for delivery_id in given_up]
                log.warning(
                    "deliveries still running after their cancellation; given up",
                    extra={
                        "count": len(left),
                        "deliveries": named[:NAMED_GIVEN_UP],
                        "more": max(0, len(named) - NAMED_GIVEN_UP),
                    },
                )
            if unfinished:
                with contextlib.suppress(StorageUnavailable):
                    await self.storage.release(list(unfinished), time.time(), self.owner)
                log.warning("released unfinished deliveries", extra={"count": len(unfinished)})
        # Given back by commits that finished as it stopped (`ingested`); one that finishes later still is
        # released at the next start.
        await asyncio.gather(*self._releases, return_exceptions=True)
        await _cancel(self._stats_task)
        try:
            # What the drain left: due again at the next start, or none.
            await asyncio.wait_for(self._refresh_stats(), LAST_STATS_TIMEOUT)
        except TimeoutError:
            log.warning(
                "cannot read queue statistics", extra={"error": f"not read in {LAST_STATS_TIMEOUT:g} s"}
            )
        # With the actions a reload replaced, whose deliveries are over by now: closed while the loop and the
        # shared HTTP clients are still there, not left to a loop that is gone.
        await _close_within_bound(
            [*self._closing, asyncio.create_task(_close(self.actions.values()))], self._hurried
        )

    async def _wait_for_all(self, futures: Collection[asyncio.Future[Any]], timeout: float) -> None:
        """Until every one of futures is done, for timeout seconds at most, or until hurry."""
        await wait_unless_hurried(futures, timeout, self._hurried)

    async def _claim_loop(self) -> None:
        while not self._stopping:
            try:
                await self._claim_once()
            except Exception:
                # Whatever went wrong, the loop must live on: it is the only thing that delivers.
                log.exception("delivery loop failed; trying again")
                await asyncio.sleep(self.settings.poll_interval)

    async def _claim_once(self) -> None:
        """Claim what is due, then sleep until the next delivery falls due or something wakes us."""
        settings = self.settings
        self._wakeup.clear()
        wakes = self._wakes
        free = settings.concurrency - len(self._running) - self._reserved
        if free > 0:
            self._reserved += free  # what the claim returns takes them: no lease may meanwhile
            claims: list[Claim] | None
            now = time.time()
            rooms = {key: limit.room for key, limit in self._limited.items()} if self._limited else None
            claiming = asyncio.ensure_future(
                self.storage.claim(
                    now,
                    free,
                    settings.lease,
                    self.owner,
                    running=self._maybe_lapsed(now),
                    limited=rooms,
                )
            )
            self._claiming = claiming
            try:
                # Shielded: when a stop cancels the loop here, the claim goes on, and `stop` gives back what
                # it leased.
                claims = await asyncio.shield(claiming)
            except StorageUnavailable as exc:
                log.error("cannot claim deliveries", extra={"error": str(exc)})
                claims = None
            finally:
                self._reserved -= free
            self._claiming = None
            if claims is None:
                claims = []
                await asyncio.sleep(settings.poll_interval)
            for claim in claims:
                self._start(claim)
            if len(claims) == free:
                self._wants_slots = True
                return  # there may be more due right now
        self._wants_slots = free <= 0
        timeout = settings.poll_interval
        if free > 0:
            with contextlib.suppress(StorageUnavailable):
                # Not one of ours whose lease ran out under its attempt: it is not claimed, and waking for
                # it would only spin.
                due = await self.storage.next_due_at(
                    running=self._maybe_lapsed(time.time()),
                    # Their due deliveries wait for a delivery of theirs to finish, which wakes the loop.
                    full=[key for key, limit in self._limited.items() if limit.room <= 0],
                )
                if wakes == self._wakes:  # else what was queued since may be missing from this read
                    self._due_at = math.inf if due is None else due
                if due is not None:
                    timeout = min(timeout, max(0.0, due - time.time()))
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _maybe_lapsed(self, now: float) -> Collection[int]:
        """The deliveries running here whose lease may have run out by `now`, for the store to leave out of
        a claim: none while renewals keep up (then no lease of theirs is due by `now`), all of them once
        one failed or came late."""
        return self._running.keys() if now >= self._leases_hold_until else ()

    async def _keep_leases(self) -> None:
        """Renew the leases of deliveries still running (slow receivers, waits for a concurrency slot), so
        only a dead process's leases ever expire and nothing is sent twice while its first attempt runs."""
        interval = self.settings.lease / 3
        while True:
            await asyncio.sleep(interval)
            until = time.time() + self.settings.lease
            try:
                await self.storage.renew(list(self._running), until, self.owner)
                # Less a third: a lease taken just before this renewal, in a commit still on its way (not
                # running yet, so not renewed), lasts from a little earlier. The next renewal comes sooner.
                self._leases_hold_until = until - interval
            except Exception as exc:
                log.warning("cannot renew delivery leases", extra={"error": str(exc)})

    def _start(self, claim: Claim) -> None:
        delivery_id = claim.delivery.id
        running = self._running.get(delivery_id)
        if running is not None:
            # Claimed although it runs here: a dependent whose parent was replayed and has its new result
            # (the store fences out the running attempt of the round before), or a store that does not
            # leave out `running`, once its lease ran out under the attempt. Let that attempt finish, then
            # run this claim: left alone, its lease would hold the delivery back until it ran out. Expected
            # after a replay, so no warning: the result it fences out is logged as one.
            superseded = self._queued.get(delivery_id)
            self._queued[delivery_id] = claim
            if superseded is not None:
                # Claimed again while the claim before waited (the parent replayed once more): this one
                # fences that one out, which would only send a request whose result is discarded.
                return
            log.info(
                "delivery claimed again while an attempt of it runs; it starts when that attempt ends",
                extra={
                    "delivery": delivery_id,
                    "route": claim.delivery.route,
                    "action": claim.delivery.action,
                },
            )
            running.add_done_callback(partial(self._start_after, delivery_id))
            return
        # Looked up now, so that the delivery counts against the `concurrency` of the action it runs with.
        runnable = self.actions.get((claim.delivery.route, claim.delivery.action))
        limit = runnable.limit if runnable is not None else None
        if limit is not None:
            limit.taken += 1
        task = asyncio.get_running_loop().create_task(self._deliver(claim, runnable))
        self._running[delivery_id] = task

        def done(_task: asyncio.Task[None]) -> None:
            if self._running.get(delivery_id) is task:  # not a new attempt started after a fenced-out one
                del self._running[delivery_id]
            if limit is not None:
                limit.taken -= 1
                if limit.taken + 1 >= limit.size:
                    # It was full: the claim loop left its due deliveries in the queue, and the next one
                    # may start now, ahead of what was queued after it.
                    self.wake()
                    return
            if self._wants_slots:
                self._wakeup.set()  # a worker slot is free, and the claim loop is waiting for one

        task.add_done_callback(done)

    def _start_after(self, delivery_id: int, _previous: asyncio.Task[None]) -> None:
        """Start the newest claim that came while an attempt of the delivery ran, now that the attempt is
        over (its own `done` ran first: callbacks run in the order they were added)."""
        claim = self._queued.pop(delivery_id)
        if self._stopping:
            self._release_soon([claim.delivery.id])  # not attempted: due at the next start
        else:
            self._start(claim)

    async def _deliver(self, claim: Claim, runnable: RunnableAction | None) -> None:
        delivery, event = claim.delivery, claim.event
        number = delivery.attempt_number  # for the job and the record: a property, read once
        unfollowed = None
        if runnable is None:
            started, clock = time.time(), time.monotonic()
            where = no_longer_configured(delivery.route, delivery.action)
            # Dead, for `replay --state dead` to find once the action is back. Its dependents are skipped:
            # nothing failed (an `acknowledge` would report a failure to the provider), nor succeeded.
            outcome = dead(where)
            unfollowed = f"parent {where}"
            policy = None
        else:
            policy = runnable.plan.retry
            # By position, in Job's order (event, route, action, attempt, timeout, retry, parent): no keywords
            # to match for every delivery.
            job = Job(
                event,
                delivery.route,
                delivery.action,
                number,
                runnable.plan.timeout,
                policy,
                claim.parent,
            )
            if runnable.limit is None:  # most actions: no context manager to enter and leave per attempt
                started, clock = time.time(), time.monotonic()
                outcome = await self._attempt(runnable.action, job)
            else:
                async with runnable.limit:
                    started, clock = time.time(), time.monotonic()
                    outcome = await self._attempt(runnable.action, job)
        finished_at = time.time()
        # Timed on the monotonic clock, stamped on the wall clock: across a step of the wall clock (NTP, a
        # VM resumed) an attempt's duration would read an hour, or minus one.
        duration = time.monotonic() - clock

        state, due_at = "pending", None
        if outcome.kind == "retry":
            delay = next_delay(policy, delivery.attempts, outcome.retry_after) if policy else None
            if delay is None:
                outcome = dead(
                    f"gave up after {delivery.attempts} attempt{'s' if delivery.attempts > 1 else ''}: "
                    f"{outcome.error}",
                    outcome.status_code,
                )
                state = "dead"
            else:
                due_at = finished_at + delay
        else:
            state = outcome.kind

        # Numbered on from the rounds before a replay; the schedule above counts this round's only.
        attempt = Attempt(number, started, duration, outcome.kind, outcome.status_code, outcome.error)
        finished: Finished | None
        try:
            # While the claim loop waits for a free slot, this record's commit is what frees one.
            finished = await self.storage.finish(
                delivery,
                attempt,
                state,
                due_at,
                finished_at,
                waited_for=self._wants_slots,
                unfollowed=unfollowed,
            )
        except StorageUnavailable as exc:
            log.error("cannot record attempt; trying again", extra={**event.summary(), "error": str(exc)})
            finished = await self._record_once_taken(claim, attempt, state, due_at, finished_at, unfollowed)
        except Exception as exc:
            # The lease stays: once it expires the delivery is attempted again (at-least-once).
            log.error("cannot record attempt", extra={**event.summary(), "error": str(exc)})
            return
        if finished is None:
            return
        if not finished.recorded:
            # Fenced out: the delivery was claimed again or replayed while this attempt ran, so this result
            # is not the delivery's and no metric or hook counts it. The delivery may be due now. At info:
            # a replay (a dependent's, whose parent was replayed) is what makes this happen, and what the
            # operator asked for; a lease lost while the attempt ran is logged where its renewal failed.
            log.info(
                "attempt result discarded, as expected after a replay: the delivery was replayed or claimed "
                "again while the attempt ran",
                extra={
                    **event.summary(),
                    "route": delivery.route,
                    "action": delivery.action,
                    "attempt": delivery.attempt_number,
                },
            )
            # No longer ours to run: out of `_running` before the claim loop wakes, or it would leave the
            # delivery out of its claim and of when the next falls due, and sleep a whole poll_interval.
            self._running.pop(delivery.id, None)
            self.wake()
            return

        self.metrics.delivery_finished(
            delivery.route,
            delivery.action,
            _METRIC_OUTCOME[outcome.kind],
            duration,
            finished_at - event.received_at,
        )
        self.metrics.skipped(finished.skipped)
        if finished.activated or due_at is not None:
            self.wake()  # something falls due that the claim loop's sleep may not have counted on

        level = _LOG_LEVEL.get(outcome.kind, logging.WARNING)
        if log.isEnabledFor(level):  # a delivered one is logged at DEBUG: skip building its fields
            fields = {
                **event.summary(),
                "route": delivery.route,
                "action": delivery.action,
                "attempt": delivery.attempt_number,
                "outcome": outcome.kind,
                "status_code": outcome.status_code,
                "error": outcome.error,
                "duration_ms": round(duration * 1000, 1),
            }
            if due_at is not None:
                fields["retry_in_s"] = round(due_at - finished_at, 3)
            log.log(level, "delivery %s", outcome.kind, extra=fields)
        delivery.state = state
        self._tell_hooks(event, delivery, outcome, state != "pending", finished)

    def _tell_hooks(
        self, event: Event, delivery: DeliveryRecord, outcome: Outcome, final: bool, finished: Finished
    ) -> None:
        if not self.pm.hook.delivery_finished.get_hookimpls():
            return
        # The skipped dependents finished too, without an attempt of their own.
        finals = [(delivery, outcome, final)]
        finals += [(dependent, skipped(dependent.last_error or ""), True) for dependent in finished.skipped]
        hook = self.pm.hook.delivery_finished
        for record, result, is_final in finals:
            try:
                hook(delivery=record, outcome=result, final=is_final)
            except BaseException as exc:  # a SystemExit too: it would end `serve`
                log.error(
                    "a delivery_finished hook failed",
                    exc_info=exc,
                    extra={**event.summary(), "plugin": raised_by(hook, exc)},
                )

    def unreadable(self, deliveries: list[Unreadable]) -> None:
        """Deliveries a claim ended dead as their event could not be read back (Storage.on_unreadable):
        counted, logged and told to plugins as any dead delivery, though no attempt ran here."""
        for delivery, event, finished in deliveries:
            self.metrics.deliveries.labels(delivery.route, delivery.action, "dead").inc()
            self.metrics.skipped(finished.skipped)
            log.error(
                "delivery dead",
                extra={
                    **event.summary(),
                    "route": delivery.route,
                    "action": delivery.action,
                    "attempt": delivery.attempt_number,
                    "outcome": "dead",
                    "error": delivery.last_error,
                },
            )
            self._tell_hooks(event, delivery, dead(delivery.last_error or ""), True, finished)
            if finished.activated:
                self.wake()  # its dependents that run on a failure are due

    async def _record_once_taken(
        self,
        claim: Claim,
        attempt: Attempt,
        state: str,
        due_at: float | None,
        now: float,
        unfollowed: str | None,
    ) -> Finished | None:
        """An attempt's result the store refused (an fsync that has not answered, a full disk), tried again
        every poll_interval until it is taken: the attempt was made, and left to its lease the delivery would
        be attempted again once the lease ran out. Meanwhile the delivery stays running here, so its lease
        is renewed and claims leave it out. A refusal writes nothing, so the result is recorded once. A stop
        cuts the tries short: the delivery is released, and attempted again at the next start. None for a
        failure of another kind, as for the first try."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                return await self.storage.finish(
                    claim.delivery,
                    attempt,
                    state,
                    due_at,
                    now,
                    waited_for=self._wants_slots,
                    unfollowed=unfollowed,
                )
            except StorageUnavailable:
                continue
            except Exception as exc:
                log.error("cannot record attempt", extra={**claim.event.summary(), "error": str(exc)})
                return None

    async def _attempt(self, action: Action, job: Job) -> Outcome:
        task = asyncio.current_task()
        assert task is not None
        self._deadlines.start(task, action, job)
        try:
            try:
                outcome = await action.deliver(job)
            finally:
                # Cancelled here for running late? Then that cancellation is taken back below, whatever
                # the action made of it, as asyncio.timeout does.
                late = self._deadlines.finish(task)
        except asyncio.CancelledError:
            if late and _uncancel(task, late) == 0:  # and by nobody else (a shutdown): the attempt timed out
                return retry(f"timeout after {job.timeout:g}s")
            raise
        except Exception as exc:
            _still_cancelled(task, late, exc)
            # A plugin bug or an unexpected failure: retried like any other, and logged with its traceback.
            log.exception("action raised", extra={**job.event.summary(), "action": job.action})
            return retry(f"{type(exc).__name__}: {exc}")
        except GeneratorExit:
            raise  # the coroutine is being closed: it must end
        except BaseException as exc:
            # KeyboardInterrupt, SystemExit or a plugin's own BaseException (a sys.exit() in a library, say):
            # raised out of the task it would end `serve`, or leave the delivery leased with nothing recorded.
            # Real signals never raise here (serve handles them on the loop), so it is the plugin's: a failed
            # attempt, retried on the schedule like any other.
            _still_cancelled(task, late, exc)
            log.error(
                "action raised %s, which is not an Exception; counted as a failed attempt",
                type(exc).__name__,
                exc_info=True,
                extra={**job.event.summary(), "action": job.action, "plugin": _plugin_of(self.pm, action)},
            )
            return retry(f"{type(exc).__name__}{f': {exc}' if str(exc) else ''} (raised by the action)")
        if late:
            _uncancel(task, late)  # the action finished all the same: its outcome stands
        if not isinstance(outcome, Outcome):
            # A plugin bug that would otherwise fail the engine after the attempt, with the delivery never
            # recorded: claimed again each time its lease ran out, for ever. Retried like a raised error.
            log.error(
                "action returned %r, not an Outcome",
                type(outcome).__name__,
                extra={**job.event.summary(), "action": job.action},
            )
            return retry(f"the action returned {type(outcome).__name__}, not an Outcome")
        return outcome

    async def _stats_loop(self) -> None:
        while True:
            await self._refresh_stats()
            await asyncio.sleep(STATS_INTERVAL)

    async def _refresh_stats(self) -> None:
        await self._refresh_queue()
        await self._refresh_size()

    async def _refresh_queue(self) -> None:
        now = time.time()
        try:
            stats = await self.storage.queue_stats(now)
        except Exception as exc:
            log.warning("cannot read queue statistics", extra={"error": str(exc)})
            return
        for state, count in stats.counts.items():
            self.metrics.delivery_queue.labels(state).set(count)
        due, pending = stats.oldest_due_at, stats.oldest_pending_since
        self.metrics.delivery_lag.set(0.0 if due is None else max(0.0, now - due))
        self.metrics.oldest_pending.set(0.0 if pending is None else max(0.0, now - pending))

    async def _refresh_size(self) -> None:
        try:
            size = await self.storage.size_on_disk()
        except Exception as exc:
            log.warning("cannot read the store's size", extra={"error": str(exc)})
            return
        self.metrics.storage_bytes.set(size)


async def _close(actions: Collection[RunnableAction]) -> None:
    """Close the actions side by side: one that fails to close, or is still closing when a stop gives up on
    it (a pool whose server stopped answering), keeps none of the others open."""
    await asyncio.gather(*(_close_one(runnable) for runnable in actions))


async def _close_one(runnable: RunnableAction) -> None:
    try:
        await runnable.action.aclose()
    except Exception:
        log.exception(
            "an action failed to close", extra={"route": runnable.plan.route, "action": runnable.plan.key}
        )


async def _cancel(*tasks: asyncio.Task[None] | None) -> None:
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _plugin_of(pm: pluggy.PluginManager | None, action: Action) -> str:
    """The plugin that registered action's class, as `hookyard plugins` lists it (its module without a plugin
    manager), for the log line that tells of its bug."""
    return plugin_of(pm, type(action)) if pm is not None else type(action).__module__


def _uncancel(task: asyncio.Task[Any], times: int) -> int:
    """Take back the deadline's cancellations of task (times of them): the cancellations left, someone
    else's (a shutdown's)."""
    left = task.cancelling()
    for _ in range(times):
        left = task.uncancel()
    return left


def _still_cancelled(task: asyncio.Task[Any], late: int, exc: BaseException) -> None:
    """After an action raised exc, which is not a CancelledError: take back the deadline's cancellations if
    it was late, and raise CancelledError if someone else (a shutdown) cancelled the task too, whose
    cancellation the action turned into exc: the attempt is cut off, not a failure to record."""
    _uncancel(task, late)
    if task.cancelling():
        raise asyncio.CancelledError from exc
