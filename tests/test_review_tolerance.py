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



def test_a_zero_tolerance_is_refused_at_load(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["sources"]["consignease"]["tolerance"] = 0
    result = run_cli("check", "-c", write_config(tmp_path, config))
    assert result.exit_code == 1
    assert "sources.consignease.tolerance" in result.stderr
