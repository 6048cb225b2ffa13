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



def test_send_with_a_missing_data_file_is_a_usage_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_dict(tmp_path))
    result = run_cli(
        "send", "-c", path, "consignease", "--type", "user.created", "--data", f"@{tmp_path}/nope.json"
    )
    assert result.exit_code == 2, (result.exit_code, result.exception)
    assert "--data" in result.stderr
