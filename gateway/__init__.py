"""Hookyard: verify, persist, route and deliver webhooks.

Everything a plugin needs is importable from here: `from gateway import hookimpl, Action, delivered`.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("hookyard")

# The plugin API, re-exported below the marker (its modules import __version__ from here).
from gateway.actions import (  # noqa: E402
    Action,
    Job,
    Outcome,
    ParentResult,
    Resources,
    dead,
    delivered,
    http_outcome,
    retry,
    skipped,
    status_outcome,
    transport_error,
)
from gateway.events import Event  # noqa: E402
from gateway.providers import Provider, Rejected, bad_request, unauthorized  # noqa: E402

__all__ = [
    "Action",
    "Event",
    "Job",
    "Outcome",
    "ParentResult",
    "Provider",
    "Rejected",
    "Resources",
    "__version__",
    "bad_request",
    "dead",
    "delivered",
    "hookimpl",
    "http_outcome",
    "retry",
    "skipped",
    "status_outcome",
    "transport_error",
    "unauthorized",
]
