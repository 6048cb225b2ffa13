"""`provider: none`: accepts anything. Only allowed with `insecure: true`, for local experiments."""

from __future__ import annotations

from collections.abc import Mapping

from gateway import hookimpl
from gateway.providers import Provider


class NoVerification(Provider):
    name = "none"
    description = "no verification at all (requires insecure: true)"
    needs_secret = False
    verifies = False

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        return None


@hookimpl
def register_providers() -> list[type[Provider]]:
    return [NoVerification]
