"""Defects found in review: each test fails before its fix."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from gateway.cli import main
from tests.support import Downstream, RunningGateway, wait_until
from tests.test_admin import admin, send, states, users_config
from tests.test_cli import APP, config_dict, finish, make_event, with_storage, write_config


def run_cli(*args: str | Path) -> Any:
    # catch_exceptions=True: a traceback shows up as result.exception instead of a clean exit.
    return CliRunner().invoke(main, [str(arg) for arg in args])



async def _dead_near_the_edge(storage: Any) -> None:
    """Three dead deliveries that ended 2 h minus 5 s ago."""
    now = time.time()
    for index in range(3):
        await storage.ingest(make_event(f"evt_edge_{index}", now - 7300), [APP])
    for claim in await storage.claim(now - 7300, 10, 60, "w"):
        await finish(storage, claim, "dead", now - 7195, 410)


def test_a_bulk_replay_keeps_its_window_fixed_across_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--since 2h` means 2 h before the replay started, on every page: a window that slides forward
    with each page skips the deliveries near its start."""
    path = write_config(tmp_path, config_dict(tmp_path))
    with_storage(tmp_path / "db.sqlite", _dead_near_the_edge)
    import gateway.operations

    real = time.time

    class Clock:
        calls = 0

        @staticmethod
        def time() -> float:
            Clock.calls += 1
            return real() + 10 * (Clock.calls - 1)  # each page a little later, as on a large replay

    monkeypatch.setattr(gateway.operations, "time", Clock)
    monkeypatch.setattr("gateway.cli.time", Clock, raising=False)
    result = run_cli("replay", "-c", path, "--state", "dead", "--since", "2h", "--page-size", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "replaying 3 deliveries\n"
