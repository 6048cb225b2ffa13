"""Hookyard: verify, persist, route and deliver webhooks.

Everything a plugin needs is importable from here: `from gateway import hookimpl, Action, delivered`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("hookyard")

# The plugin API, re-exported from the modules that define it, each imported on first use: `hookyard serve`
# imports this package first, and it must be cheap, so that the command's entry point can install its early
# SIGTERM handler a few milliseconds after start (see gateway.launch).
_EXPORTS = {
    "Action": "gateway.actions",
    "Job": "gateway.actions",
    "Outcome": "gateway.actions",
    "ParentResult": "gateway.actions",
    "Resources": "gateway.actions",
    "dead": "gateway.actions",
    "delivered": "gateway.actions",
    "http_outcome": "gateway.actions",
    "retry": "gateway.actions",
    "skipped": "gateway.actions",
    "status_outcome": "gateway.actions",
    "transport_error": "gateway.actions",
    "Event": "gateway.events",
    "Provider": "gateway.providers",
    "Rejected": "gateway.providers",
    "bad_request": "gateway.providers",
    "unauthorized": "gateway.providers",
}

if TYPE_CHECKING:
    from gateway.actions import (
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
    from gateway.events import Event
    from gateway.providers import Provider, Rejected, bad_request, unauthorized


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value


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
