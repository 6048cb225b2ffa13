"""Every hook a Hookyard plugin can implement.

Implementations may accept any subset of a spec's arguments, so specs can grow without breaking plugins.
Hooks are always called with keyword arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gateway.actions import Action, Outcome
    from gateway.events import Event
    from gateway.providers import Provider
    from gateway.storage import DeliveryRecord

hookspec = pluggy.HookspecMarker("hookyard")


@hookspec
def register_providers() -> list[type[Provider]]:  # type: ignore[empty-body]
    """Return a list of Provider classes; each verifies and parses one signature scheme."""


@hookspec
def register_actions() -> list[type[Action]]:  # type: ignore[empty-body]
    """Return a list of Action classes; each delivers events somewhere (HTTP, a database, a chat)."""


@hookspec
def startup(gateway: Any) -> Any:
    """Called once the gateway has loaded its config and opened storage; may return an awaitable."""


@hookspec
def shutdown(gateway: Any) -> Any:
    """Called as the gateway stops, after deliveries have drained (a plain function on a thread of its own);
    may return an awaitable."""


@hookspec
def event_accepted(event: Event, routes: list[str]) -> None:
    """Called after a new event and its deliveries were committed, with the names of the routes it matched:
    once durably stored, or once its fsync did not answer in time (answered 503, its deliveries run)."""


@hookspec
def delivery_finished(delivery: DeliveryRecord, outcome: Outcome, final: bool) -> None:
    """Called after every delivery attempt, and for each dependent it skips; final is True once the delivery
    is delivered, dead or skipped."""
