"""What operators do with stored events — list, show, replay — as JSON-ready views. The admin API serves
these over HTTP and the CLI calls them directly (or through the admin API): one implementation for both."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from gateway.config import parse_duration
from gateway.events import SHOWN_DEPTH, holds_lost_digits, nesting_depth
from gateway.providers import Provider, iso_datetime
from gateway.replay import PAGE, ReplayPage, replay_dead_page, replay_missing_page
from gateway.routing import RouteTable
from gateway.storage import FINAL_STATES, EventDetail, EventSummary, Storage

MAX_PAGE = 500
# The epoch seconds a time can be: those of the years 1 to 9999, what a datetime (and an ISO time) holds.
EARLIEST = datetime(1, 1, 1, tzinfo=UTC).timestamp()
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC).timestamp()
# Why an id, a source, a route or an action as listed may name nothing: the store shows text that is not
# UTF-8 (a row edited by hand, a damaged page) with U+FFFD for each byte that is not, and looks up the bytes.
NOT_NAMEABLE = "text shown with U+FFFD is stored as bytes that are not UTF-8, and cannot be named"


class OperationError(Exception):
    """A request an operator made that cannot be done; `status` is the HTTP status the admin API uses."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object, name: str = "since", now: Callable[[], float] | None = None) -> float | None:
    """`2h` (that long ago), an ISO 8601 time, or seconds since the epoch. now: the clock a duration is
    counted back from, if not time.time."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise OperationError(400, f"{name}: {value!r} is not a time")
    number: float | None
    try:
        # A bare number is a time, never a duration: `2h` or `90s` say "ago" with their unit.
        number = float(value)
    except (ValueError, OverflowError):  # not a number, or an integer past what a float holds
        number = math.nan if not isinstance(value, str) else None
    if number is not None:
        # nan, inf or 1e999 would compare false with every time: an empty answer instead of an error.
        if not math.isfinite(number):
            raise OperationError(400, f"{name}: {value!r} is not a finite time")
        if not EARLIEST <= number < LATEST:
            # Likely epoch milliseconds (JavaScript's Date.now()): as seconds, the year 58000 or so, after
            # every event or before none of them, an empty answer rather than an error.
            raise OperationError(
                400, f"{name}: {value!r} is outside the years 1 to 9999: epoch milliseconds? give seconds"
            )
        if isinstance(value, str) and len(value) == 8 and value.isdigit() and _is_basic_date(value):
            # 20261202 reads as a date (ISO 8601's basic form) and as epoch seconds in August 1970.
            raise OperationError(
                400,
                f"{name}: {value!r} could be a date or epoch seconds (in 1970); "
                f"write the date as {value[:4]}-{value[4:6]}-{value[6:]}",
            )
        return number
    assert isinstance(value, str)
    try:
        # No further back than the year 1, where epoch seconds are taken from: a bulk replay answers its
        # window for the next pages to send, and `1000000d` (everything) must come back as a time they can.
        return max(EARLIEST, (now or time.time)() - parse_duration(value))
    except ValueError:
        pass
    try:
        parsed = iso_datetime(value)
    except ValueError:
        raise OperationError(
            400, f"{name}: {value!r} is neither a duration (2h), an ISO time nor epoch seconds"
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def parse_window(
    since: object, until: object, names: tuple[str, str] = ("since", "until")
) -> tuple[float | None, float | None]:
    """since and until as parse_time reads them, a duration in either counted back from one reading of the
    clock. A window that ends where it starts or before (since 1h, until 2h) holds no time: refused, naming
    both as `names` says, rather than answered with nothing, as if nothing were there."""
    read: list[float] = []

    def now() -> float:  # read once, and only for a duration
        if not read:
            read.append(time.time())
        return read[0]

    starts = parse_time(since, names[0], now=now)
    ends = parse_time(until, names[1], now=now)
    if starts is not None and ends is not None and starts >= ends:
        raise OperationError(
            400,
            f"{names[0]} {since!r} is not before {names[1]} {until!r}: the window holds no time (a duration "
            f"is counted back from now: {names[0]} 2h, {names[1]} 1h is the hour before the last)",
        )
    return starts, ends


def canonical_type(name: str, source: str | None, providers: Mapping[str, Provider]) -> str:
    """A type as a route's `events:` takes it, a provider's name or code (ConsignmentCreated, 101), as the
    canonical type events are stored with (consignment.created): read through the catalog of the source's
    provider, or without a source through those of every source, which must agree (409 otherwise, naming
    what it is in each). A canonical type, or one no catalog knows, stays as it is."""
    if source is not None:
        provider = providers.get(source)
        return name if provider is None else provider.event_type(name)
    readings = {
        source: read for source, provider in providers.items() if (read := provider.event_type(name)) != name
    }
    if len(set(readings.values())) > 1:
        named = ", ".join(f"{read} in {source}" for source, read in sorted(readings.items()))
        raise OperationError(409, f"type: {name!r} is {named}; give the canonical type, or the source")
    return next(iter(readings.values()), name)


def _is_basic_date(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def summary_view(row: EventSummary) -> dict[str, Any]:
    return {
        "id": row.id,
        "source": row.source,
        "type": row.type,
        "received_at": iso(row.received_at),
        "state": row.state,
        "cursor": row.seq,
    }


def detail_view(detail: EventDetail) -> dict[str, Any]:
    event = detail.event
    view: dict[str, Any] = {
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "occurred_at": iso(event.occurred_at),
        "received_at": iso(event.received_at),
        "verified": event.verified,
        "payload": event.payload,
        "deliveries": [
            {
                "route": d.route,
                "action": d.action,
                "state": d.state,
                "attempts": [
                    {
                        "number": a.number,
                        "at": iso(a.started_at),
                        "duration_ms": round(a.duration * 1000, 1),
                        "outcome": a.outcome,
                        "status_code": a.status_code,
                        "error": a.error,
                    }
                    for a in detail.attempts.get(d.id, [])
                ],
                "last_error": d.last_error,
                # While an attempt is under way, due_at is when its lease runs out: its result decides
                # whether there is a next attempt, and when.
                "next_attempt_at": (
                    iso(d.due_at) if d.state == "pending" and d.id not in detail.in_flight else None
                ),
                "in_flight": d.id in detail.in_flight,
            }
            for d in detail.deliveries
        ],
    }
    if detail.unreadable is not None:
        view["unreadable"] = detail.unreadable  # its payload is null: the body cannot be read back
    elif nesting_depth(event.payload) > SHOWN_DEPTH:
        # Python's json cannot write (or read back) the payload: shown as the text that came instead.
        view["payload"] = None
        view["unreadable"] = (
            f"the payload is nested more than {SHOWN_DEPTH} levels deep: shown as text in body"
        )
        view["body"] = event.body.decode(errors="replace")
    elif holds_lost_digits(event.payload) and (exact := event.exact_payload()) is not None:
        # orjson reads an integer past 64 bits as a float: shown as its sender wrote it, every digit.
        view["payload"] = exact
    return view


def _check_page(cursor: int | None, limit: int) -> None:
    # A cursor is a next_cursor (an event's seq, from 1) or 0 for the first page: below 0, a list found
    # nothing before it and answered an empty page, as if there were no events.
    if cursor is not None and cursor < 0:
        raise OperationError(400, "cursor: must be 0 or more (the next_cursor of the page before)")
    if cursor is not None and cursor >= 2**63:  # past what SQLite holds: its OverflowError, a traceback
        raise OperationError(400, "cursor: out of range")
    if not 1 <= limit <= MAX_PAGE:
        raise OperationError(400, f"limit: must be between 1 and {MAX_PAGE}")


class Operations:
    """Operator actions against a store, routed with a config's table (for replays of missing deliveries:
    without one, they are refused)."""

    def __init__(
        self,
        storage: Storage,
        table: RouteTable | None,
        wake: Callable[[], None] | None = None,
        counted: Callable[[str, int], None] | None = None,
        providers: Mapping[str, Provider] | None = None,
    ) -> None:
        self.storage = storage
        self.table = table
        # Each source's provider, whose catalog reads a type filter (canonical_type): the table's, if none
        # are given.
        if providers is None and table is not None:
            providers = {endpoint.name: endpoint.provider for endpoint in table.endpoints.values()}
        self.providers = providers or {}
        self.wake = wake or (lambda: None)
        # Told (mode, number of deliveries) after each replay: the metrics.
        self.counted = counted or (lambda mode, count: None)

    async def list_events(
        self,
        *,
        source: str | None = None,
        type: str | None = None,
        state: str | None = None,
        route: str | None = None,
        since: str | float | None = None,
        until: str | float | None = None,
        cursor: int | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        # An empty filter is one not given, as the admin API reads `?source=` (`--source "$SOURCE"`, the
        # variable unset): the CLI then lists the same on the database as through it.
        source, type, route = source or None, type or None, route or None
        if state is not None and state not in ("pending", "delivered", "dead", "unrouted"):
            raise OperationError(400, f"state: {state!r} is not one of pending, delivered, dead, unrouted")
        _check_page(cursor, limit)
        starts, ends = parse_window(since, until)
        rows = await self.storage.list_events(
            state=state,
            source=source,
            type=type and canonical_type(type, source, self.providers),
            route=route,
            since=starts,
            until=ends,
            # 0 is where a bulk replay's cursor starts: here too, the first page (no event has seq 0).
            before=cursor or None,
            # One more than the page: whether there is a next one, rather than a cursor to an empty page
            # whenever the last page happens to be full.
            limit=limit + 1,
        )
        page = rows[:limit]
        return {
            "events": [summary_view(row) for row in page],
            "next_cursor": page[-1].seq if len(rows) > limit else None,
        }

    async def _one(self, event_id: str, source: str | None) -> EventDetail:
        details = await self.storage.get_event(event_id, source)
        if not details:
            message = f"no event {event_id!r}" + (f" from {source}" if source else "")
            if "\ufffd" in event_id + (source or ""):
                message += f" (if it was listed so: {NOT_NAMEABLE})"
            raise OperationError(404, message)
        if len(details) > 1:
            sources = ", ".join(d.event.source for d in details)
            raise OperationError(
                409, f"event {event_id!r} exists in several sources ({sources}); give the source"
            )
        return details[0]

    async def show_event(self, event_id: str, source: str | None = None) -> dict[str, Any]:
        # An empty source is none given, as the admin API reads `?source=` (see list_events).
        return detail_view(await self._one(event_id, source or None))

    async def replay_event(
        self,
        event_id: str,
        source: str | None = None,
        action: str | None = None,
        route: str | None = None,
    ) -> dict[str, Any]:
        detail = await self._one(event_id, source)
        deliveries = [d for d in detail.deliveries if route is None or d.route == route]
        if route is not None and not deliveries:
            raise OperationError(404, f"event {event_id!r} has no delivery for route {route!r}")
        if action is not None and action not in {d.action for d in deliveries}:
            where = "" if route is None else f" in route {route!r}"
            raise OperationError(404, f"event {event_id!r} has no delivery for action {action!r}{where}")
        # What the store replays, as it matches them: the action's deliveries, or the roots.
        matched = [d for d in deliveries if d.action == action or (action is None and d.parent_id is None)]
        count = await self.storage.replay_event(detail.seq, action, time.time(), route=route)
        if count is None:
            # Read just before, then deleted by a batch of retention's that ran in between: without this,
            # its deliveries would be answered as left alone, still pending.
            raise OperationError(
                404, f"no event {event_id!r}: deleted by retention (storage.retention) as it was replayed"
            )
        # A final delivery is shown by that name, yet none is stored by it: its text is not UTF-8.
        if (
            count == 0
            and "\ufffd" in (route or "") + (action or "")
            and any(d.state in FINAL_STATES for d in matched)
        ):
            named = [f"{name} {value!r}" for name, value in (("route", route), ("action", action)) if value]
            raise OperationError(
                404,
                f"event {event_id!r} has no delivery for {' and '.join(named)} as stored: {NOT_NAMEABLE}",
            )
        self.counted("event", count)
        self.wake()
        # Those it matched but left alone, not final yet (in flight, due, waiting): without them, an answer
        # of 0 reads as a replay that matched nothing. Read just before the replay: one that finished since
        # and was replayed all the same is counted once, as replayed.
        pending = max(0, len(matched) - count)
        return asdict(ReplayPage(replayed=count, pending=pending))

    async def replay(
        self,
        *,
        mode: str,
        since: str | float | None = None,
        until: str | float | None = None,
        source: str | None = None,
        route: str | None = None,
        action: str | None = None,
        cursor: int = 0,
        limit: int = PAGE,
    ) -> dict[str, Any]:
        """One page of a bulk replay; call again with next_cursor until it is null, and with the since and
        until this page answers.

        The window is fixed here, by this process's clock (the gateway's, through the admin API, where the
        deliveries' times were written), and answered as epoch seconds for the next pages to carry: `2h`
        read again on each page would slide forward and skip what lies near its start. It ends now at the
        latest: a delivery a page makes run again may end dead again before the last page is read, and
        one with a later id (a dependent, waiting for its parent again) would be replayed twice."""
        _check_page(cursor, limit)
        starts, ends = parse_window(since, until)
        now = time.time()
        window: dict[str, Any] = {
            "since": starts,
            "until": now if ends is None else min(ends, now),
            "source": source,
            "route": route,
            "action": action,
            "cursor": cursor,
            "limit": limit,
        }
        if mode == "dead":
            page = await replay_dead_page(self.storage, **window)
        elif mode == "missing":
            if self.table is None:  # pragma: no cover - the CLI loads the routes for this mode
                raise OperationError(500, "mode missing needs the config's routes")
            if window["since"] is None:
                raise OperationError(400, "since: required for mode missing (e.g. 2h)")
            # What the current config routes to, the only thing this mode creates: a typo would replay
            # nothing, and say so only as a count of 0.
            keys = self.table.actions.keys()
            if route is not None and all(name != route for name, _ in keys):
                raise OperationError(400, f"route: {route!r} is not a route of the current config")
            if action is not None and all(key != action or route not in (None, name) for name, key in keys):
                where = "any route" if route is None else f"route {route!r}"
                raise OperationError(
                    400, f"action: {action!r} is not an action of {where} in the current config"
                )
            page = await replay_missing_page(self.storage, self.table, **window)
        else:
            raise OperationError(400, f"mode: {mode!r} is not one of dead, missing")
        if page.replayed or page.created:
            self.counted(mode, page.replayed + page.created)
            self.wake()
        return {**asdict(page), "since": window["since"], "until": window["until"]}
