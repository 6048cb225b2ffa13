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



def test_check_reports_a_config_that_is_not_utf8_instead_of_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(yaml.safe_dump(config_dict(tmp_path)).encode() + "# café\n".encode("latin-1"))
    result = run_cli("check", "-c", path)
    assert result.exit_code == 1
    assert not isinstance(result.exception, UnicodeDecodeError), result.exception
    assert "UTF-8" in result.stderr and str(path) in result.stderr


def test_a_reload_of_a_config_that_is_not_utf8_is_refused_and_watching_goes_on(
    tmp_path: Path, downstream: Downstream
) -> None:
    config = users_config(tmp_path, downstream)
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path) as gw:
        path.write_bytes(yaml.safe_dump(config).encode() + "# café\n".encode("latin-1"))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1, timeout=5)
        # The watcher is still alive: a fixed file is picked up.
        config["routes"][0]["name"] = "renamed"
        path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1, timeout=5)
