"""Retention: events whose deliveries have all ended are deleted once the last ended longer ago than
storage.retention, so the database stops growing. SQLite reuses the pages they free."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gateway.metrics import Metrics
from gateway.storage import PruneCursor, Storage, StorageUnavailable

log = logging.getLogger("hookyard.storage")

# A run every minute: an event outlives its retention by a minute at most, and each run has a minute's worth
# of events to delete, whatever the traffic.
PRUNE_INTERVAL = 60.0
# Events one batch deletes, each batch one transaction of the store's writer. The kept ones it walks past
# (a delivery still pending) do not count: the store bounds those on its own (PRUNE_SCAN for SQLite).
# Between two batches of a run the loop serves webhooks for PRUNE_PAUSE: a run of many batches (the first
# one after an upgrade, or after the gateway was down) takes a small share of the loop, at up to 2,000
# events a second.
PRUNE_BATCH = 100
PRUNE_PAUSE = 0.05


class Retention:
    """Prunes the store every PRUNE_INTERVAL, in batches of PRUNE_BATCH events, while the gateway runs.

    Parameters:
    storage: the open store.
    retention: storage.retention in seconds; None (off) prunes nothing and starts no task.
    metrics: counts the events deleted (hookyard_events_pruned_total).
    """

    def __init__(self, storage: Storage, retention: float | None, metrics: Metrics) -> None:
        self.storage = storage
        self.retention = retention
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.retention is not None:
            self._task = asyncio.create_task(self._loop(), name="hookyard-retention")

    async def stop(self) -> None:
        """Ends the runs; a batch already handed to the store commits or not, either way a whole one."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run()
            except StorageUnavailable as exc:
                # A full or read-only disk: tried again at the next run.
                log.warning("cannot prune events", extra={"error": str(exc)})
            except Exception:
                # Anything else is a bug, logged with its traceback. The runs go on, and the task does not
                # end with an exception that Gateway.stop, awaiting it, would raise before the engine stops.
                log.exception("cannot prune events")
            await asyncio.sleep(PRUNE_INTERVAL)

    async def run(self) -> int:
        """One walk over the events received more than `retention` ago; how many were deleted."""
        assert self.retention is not None
        started = time.perf_counter()
        # Fixed for the whole walk: its cursor only goes forward over the same range.
        before = time.time() - self.retention
        events = deliveries = dead = 0
        after: PruneCursor | None = None
        try:
            while True:
                pruned = await self.storage.prune(before, after=after, limit=PRUNE_BATCH)
                if pruned.events:
                    events += pruned.events
                    deliveries += pruned.deliveries
                    dead += pruned.dead
                    self.metrics.events_pruned.inc(pruned.events)
                if pruned.resume_after is None:
                    break
                after = pruned.resume_after
                await asyncio.sleep(PRUNE_PAUSE)
        finally:
            # Also when the run ends early: a shutdown (stop) or a store that refuses writes may cut short
            # a long run (a backlog takes minutes), whose batches so far have deleted events all the same.
            if events:
                log.info(
                    "pruned events past storage.retention",
                    extra={
                        "events": events,
                        "deliveries": deliveries,
                        # Ended dead and gone for good: `replay --state dead` no longer finds them.
                        "dead": dead,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    },
                )
        return events
