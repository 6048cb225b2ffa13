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



def test_admin_api_takes_the_bearer_scheme_in_any_case(tmp_path: Path, downstream: Downstream) -> None:
    from tests.test_admin import TOKEN

    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        response = gw.client.get(gw.ops_url + "/admin/events", headers={"authorization": f"bearer {TOKEN}"})
        assert response.status_code == 200, response.text
