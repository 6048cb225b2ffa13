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



@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_time_that_is_not_finite_is_a_bad_parameter(
    tmp_path: Path, downstream: Downstream, value: str
) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        response = admin(gw, "GET", "/admin/events", params={"since": value})
        assert response.status_code == 400, response.text
