"""Hookyard: verify, persist, route and deliver webhooks."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("hookyard")

__all__ = ["__version__", "hookimpl"]
