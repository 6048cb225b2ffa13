"""Replay: run deliveries again. Shared by the admin API and the CLI, so both do exactly the same.

Modes:
- one event: its finished deliveries (or one action's) run again;
- dead: every delivery that ended dead in a window;
- missing: every event received in a window that has not reached `delivered` for an action the *current*
  config routes it to: dead deliveries run again, and deliveries that never existed (the event matched no
  route when it arrived, or the action was added since) are created. Narrowed to one action, a dependent
  whose parent never existed either is created with that parent (and its own), which it then waits for.
Replayed deliveries keep the event id, so Idempotency-Key dedupe downstream still works.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gateway.routing import RouteTable
from gateway.storage import FINAL_STATES, NewDelivery, Storage

PAGE = 500

log = logging.getLogger("hookyard.replay")


@dataclass
class ReplayPage:
    replayed: int = 0  # existing deliveries reset to run again
    created: int = 0  # deliveries that did not exist before
    next_cursor: int | None = None  # pass back to continue; None when done
    # Deliveries it matched but left alone, not final yet (in flight, due, or waiting for their parent):
    # without them, a count of 0 reads as a replay that found nothing to do.
    pending: int = 0


async def replay_dead_page(
    storage: Storage,
    *,
    since: float | None,
    until: float | None = None,
    source: str | None = None,
    route: str | None = None,
    action: str | None = None,
    cursor: int = 0,
    limit: int = PAGE,
) -> ReplayPage:
    ids = await storage.dead_delivery_ids(
        since=since, until=until, source=source, route=route, action=action, after=cursor, limit=limit
    )
    replayed = await storage.reset_deliveries(ids, time.time())
    return ReplayPage(replayed=replayed, next_cursor=ids[-1] if len(ids) == limit else None)


async def replay_missing_page(
    storage: Storage,
    table: RouteTable,
    *,
    since: float | None,
    until: float | None = None,
    source: str | None = None,
    route: str | None = None,
    action: str | None = None,
    cursor: int = 0,
    limit: int = PAGE,
) -> ReplayPage:
    now = time.time()
    events = await storage.events_page(since=since, until=until, source=source, after=cursor, limit=limit)
    page = ReplayPage(next_cursor=events[-1].seq if len(events) == limit else None)
    for stored in events:
        if stored.unreadable is not None:
            # No payload to route on; its dead deliveries would only die again (`replay --state dead` can
            # still run them, once the row is mended).
            log.warning(
                "event left out of the replay", extra={**stored.event.summary(), "error": stored.unreadable}
            )
            continue
        missing: list[NewDelivery] = []
        dead: list[int] = []
        for matched in table.match(stored.event):
            if route is not None and matched.name != route:
                continue
            keyed = {planned.key: planned for planned in matched.actions}
            wanted = set(keyed) if action is None else {action} & keyed.keys()
            if action in keyed and (matched.name, action) not in stored.deliveries:
                # A missing dependent needs its parent's result: a parent that is missing too is created with
                # it (and its own, up the chain), so it waits for that as it would have at ingest. (With no
                # action named, every missing one is created already.)
                parent = keyed[action].after
                while parent is not None and (matched.name, parent) not in stored.deliveries:
                    wanted.add(parent)
                    parent = keyed[parent].after
            for planned in matched.actions:  # in route order: a parent before its dependents
                if planned.key not in wanted:
                    continue
                existing = stored.deliveries.get((matched.name, planned.key))
                if existing is None:
                    missing.append(NewDelivery(matched.name, planned.key, planned.after, planned.when))
                elif existing.state == "dead":
                    dead.append(existing.id)
                elif existing.state not in FINAL_STATES:
                    page.pending += 1
        # Dead ones first: a dependent created next then waits for its parent's new result.
        page.replayed += await storage.reset_deliveries(dead, now)
        if missing:
            page.created += await storage.add_deliveries(stored.seq, missing, now)
    return page
