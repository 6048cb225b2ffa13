"""Provider module (being written)."""

from __future__ import annotations

from gateway import hookimpl
from gateway.providers import Provider


@hookimpl
def register_providers() -> list[type[Provider]]:
    return []
