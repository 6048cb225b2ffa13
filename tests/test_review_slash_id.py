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



def test_admin_api_shows_and_replays_an_event_whose_id_has_a_slash(
    tmp_path: Path, downstream: Downstream
) -> None:
    with RunningGateway(users_config(tmp_path, downstream)) as gw:
        send(gw, "msg/with/slash")
        wait_until(lambda: len(downstream.received("/audit")) == 1)
        shown = admin(gw, "GET", "/admin/events/msg%2Fwith%2Fslash")
        assert shown.status_code == 200, shown.text
        assert shown.json()["id"] == "msg/with/slash"
        replayed = admin(gw, "POST", "/admin/events/msg%2Fwith%2Fslash/replay")
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["replayed"] == 1
        # The CLI through the admin API too.
        from tests.test_admin import TOKEN

        result = CliRunner(env={"HOOKYARD_ADMIN_TOKEN": TOKEN}).invoke(
            main, ["events", "show", "--admin-url", gw.ops_url, "msg/with/slash"]
        )
        assert result.exit_code == 0, result.output
