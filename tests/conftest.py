from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import Downstream, downstream_server


def pytest_configure(config: pytest.Config) -> None:
    # Tests run with the repo's own routes.yaml far away: never let the environment pick a config.
    os.environ.pop("HOOKYARD_CONFIG", None)


@pytest.fixture
def downstream() -> Iterator[Downstream]:
    with downstream_server() as server:
        yield server
