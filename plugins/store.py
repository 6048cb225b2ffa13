"""`store` action (being written)."""

from __future__ import annotations

from gateway import hookimpl
from gateway.actions import Action


@hookimpl
def register_actions() -> list[type[Action]]:
    return []
