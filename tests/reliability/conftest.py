"""The reliability suite's fixtures and its end-of-run summary of figures (see docs/reliability.md)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import FIGURES, RestartableDownstream
from tests.support import Downstream

SEED_VARIABLE = "HOOKYARD_RELIABILITY_SEED"
FIGURES_VARIABLE = "HOOKYARD_RELIABILITY_FIGURES"


@pytest.fixture
def seed() -> int:
    """The seed of a scenario's random choices (kill moments, client backoff): random unless
    HOOKYARD_RELIABILITY_SEED is set, and always printed so that a failing run can be repeated."""
    value = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(1, 2**31))
    print(f"[reliability] {SEED_VARIABLE}={value}")
    return value


@pytest.fixture
def app() -> Iterator[Downstream]:
    """A recording downstream app (tests.support.Downstream) on a loopback port, answering without Nagle's
    delay."""
    with RestartableDownstream() as server:
        yield server.app


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for scenario, figures in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{scenario}: {json.dumps(figures, sort_keys=True)}")
    target = os.environ.get(FIGURES_VARIABLE)
    if target:
        Path(target).write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")
        terminalreporter.write_line(f"written to {target}")
