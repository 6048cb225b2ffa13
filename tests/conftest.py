from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.support import Downstream, downstream_server, unavailable

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pytest_configure(config: pytest.Config) -> None:
    # Tests run with the repo's own routes.yaml far away: never let the environment pick a config.
    os.environ.pop("HOOKYARD_CONFIG", None)


@pytest.fixture
def downstream() -> Iterator[Downstream]:
    with downstream_server() as server:
        yield server


def require_service(name: str, url: str) -> None:
    """Skip when a server a test needs is unreachable, unless HOOKYARD_REQUIRE_SERVICES=1 (CI): then fail."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=2).close()
    except OSError as exc:
        unavailable(f"{name} at {parts.hostname}:{parts.port} is unreachable: {exc}")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A real PostgreSQL server: HOOKYARD_TEST_POSTGRES_URL, by default the local `test` database."""
    url = os.environ.get("HOOKYARD_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    require_service("PostgreSQL", url)
    return url
