"""The example plugin distribution in examples/, loaded through the real entry-point machinery."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.plugins import new_plugin_manager, plugin_manager
from tests.support import RunningGateway, gateway_config, wait_until

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hookyard-example"


@pytest.fixture
def installed_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What `pip install examples/hookyard-example` leaves behind: the module on the path and a
    dist-info with its `hookyard` entry point, found by importlib.metadata like any installed package."""
    site = tmp_path / "site"
    dist_info = site / "hookyard_example-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: hookyard-example\nVersion: 0.1.0\n")
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    lines = [f"{name} = {target}" for name, target in project["entry-points"]["hookyard"].items()]
    (dist_info / "entry_points.txt").write_text("[hookyard]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    plugin_manager.cache_clear()
    yield
    plugin_manager.cache_clear()


def test_entry_point_plugin_is_loaded_and_listed(installed_example: None) -> None:
    pm = new_plugin_manager()
    assert "example" in dict(pm.list_name_plugin())
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "example [hookyard-example 0.1.0]  (providers: acme; actions: jsonl)" in result.output


def archive_config(tmp_path: Path, archive: Path) -> Path:
    """A gateway whose one route archives every event of the example's acme source to `archive`."""
    return gateway_config(
        tmp_path,
        sources={"acme": {"path": "/webhooks/acme", "provider": "acme", "secrets": ["acme-secret"]}},
        routes=[
            {
                "name": "archive",
                "source": "acme",
                "actions": [{"use": "jsonl", "with": {"path": str(archive)}}],
            }
        ],
    )


def test_event_flows_through_the_example_provider_and_action(installed_example: None, tmp_path: Path) -> None:
    archive = tmp_path / "archive.jsonl"
    config = archive_config(tmp_path, archive)
    with RunningGateway(config, pm=new_plugin_manager()) as gw:
        provider = gw.gateway.table.endpoints["/webhooks/acme"].provider
        body = json.dumps({"id": "acme_1", "type": "invoice.paid", "data": {"amount": 42}}).encode()
        headers = provider.sign(body, "acme_1", time.time())
        assert gw.post("/webhooks/acme", body, headers).json() == {"id": "acme_1", "status": "accepted"}
        tampered = gw.post("/webhooks/acme", body.replace(b"42", b"43"), headers)
        assert tampered.status_code == 401
        # A latin-1 byte that str.isdigit() takes for a digit: refused, never a 500.
        odd = [(b"x-acme-signature", b"t=\xb2,sha512=" + b"0" * 128)]
        refused = gw.client.post(gw.url + "/webhooks/acme", content=body, headers=odd)
        assert (refused.status_code, refused.json()["error"]) == (401, "invalid_timestamp")
        wait_until(lambda: archive.exists() and archive.read_text().count("\n") == 1)
    line = json.loads(archive.read_text())
    assert line == {
        "id": "acme_1",
        "source": "acme",
        "type": "invoice.paid",
        "payload": {"id": "acme_1", "type": "invoice.paid", "data": {"amount": 42}},
    }


def test_the_example_action_retries_a_failed_write_with_its_own_error(
    installed_example: None, tmp_path: Path
) -> None:
    # The plugin imports `retry` from `gateway`, as the guide shows, and the engine has imported its own
    # modules by then: it must still get the helper, not a module of the same name.
    archive = tmp_path / "archive.jsonl"
    archive.mkdir()  # where the file should be: every append fails
    config = archive_config(tmp_path, archive)
    with RunningGateway(config, pm=new_plugin_manager()) as gw:
        provider = gw.gateway.table.endpoints["/webhooks/acme"].provider
        body = json.dumps({"id": "acme_2", "type": "invoice.paid"}).encode()
        assert gw.post("/webhooks/acme", body, provider.sign(body, "acme_2", time.time())).status_code == 200

        def history() -> list[tuple[str, str | None]]:
            stored = asyncio.run_coroutine_threadsafe(gw.gateway.storage.get_event("acme_2"), gw.loop).result(
                10
            )
            [attempts] = stored[0].attempts.values() if stored and stored[0].attempts else [[]]
            return [(attempt.outcome, attempt.error) for attempt in attempts]

        wait_until(lambda: len(history()) == 4)
        attempts = history()
    assert [outcome for outcome, _ in attempts] == ["retry", "retry", "retry", "dead"]
    assert all(f"cannot write {archive}: Is a directory" in (error or "") for _, error in attempts), attempts


# A provider that would do, for the plugins below that register it wrong.
PROVIDER = """from gateway import Provider, hookimpl

class Acme(Provider):
    name = "acme"

    def __init__(self, *args):
        pass

    def verify(self, headers, body, now):
        pass
"""


@pytest.mark.parametrize(
    ("source", "error"),
    [
        # A hook's name misspelt: pluggy's check_pending.
        (
            "from gateway import hookimpl\n\n\n@hookimpl\ndef event_acepted(event):\n    pass\n",
            "unknown hook 'event_acepted'",
        ),
        # An observer that would never run.
        (
            "from gateway import hookimpl\n\n\n@hookimpl\nasync def event_accepted(event):\n    pass\n",
            "event_accepted is an async def",
        ),
        # A module that cannot be imported: a dependency missing.
        (
            "import hookyard_no_such_dependency\n",
            "broken_plugin cannot be imported: ModuleNotFoundError: No module named 'hookyard_no_such_dependency'",
        ),
        (
            PROVIDER + "\n@hookimpl\ndef register_providers():\n    raise RuntimeError('no key')\n",
            "register_providers raised RuntimeError: no key",
        ),
        (
            PROVIDER + "\n@hookimpl\ndef register_providers():\n    return Acme\n",
            "register_providers returned the class broken_plugin.Acme, not a list of Provider classes",
        ),
        (
            PROVIDER + "\n@hookimpl\ndef register_providers():\n    return [Acme('acme', None)]\n",
            "not a Provider subclass (return the class itself, not an instance)",
        ),
        (
            PROVIDER + "\nAcme.name = 5\n\n@hookimpl\ndef register_providers():\n    return [Acme]\n",
            "register_providers returned Provider broken_plugin.Acme, whose name is 5 (an int)",
        ),
        (
            "from gateway import Provider, hookimpl\n\nclass Acme(Provider):\n    name = 'acme'\n\n"
            "@hookimpl\ndef register_providers():\n    return [Acme]\n",
            "Provider broken_plugin.Acme ('acme'), which does not implement verify",
        ),
        (
            "from gateway import Action, hookimpl\n\nclass Log(Action):\n    name = 'log'\n    Options = dict\n\n"
            "    async def deliver(self, job):\n        pass\n\n"
            "@hookimpl\ndef register_actions():\n    return [Log]\n",
            "Action broken_plugin.Log ('log'), whose Options is the class builtins.dict, not a pydantic model",
        ),
    ],
    ids=[
        "misspelt_hook",
        "async_observer",
        "import_error",
        "register_raises",
        "a_class_not_a_list",
        "an_instance",
        "name_not_a_string",
        "abstract_provider",
        "options_not_a_model",
    ],
)
@pytest.mark.parametrize("command", [["serve"], ["check"], ["plugins"]])
def test_a_plugin_refused_at_load_is_one_line_of_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, error: str, command: list[str]
) -> None:
    site = tmp_path / "site"
    dist_info = site / "broken_plugin-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text("[hookyard]\nbroken = broken_plugin\n")
    (site / "broken_plugin.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
    plugin_manager.cache_clear()
    config = tmp_path / "routes.yaml"
    config.write_text(json.dumps(gateway_config(tmp_path)))
    arguments = command if command == ["plugins"] else [*command, "-c", str(config)]
    try:
        result = CliRunner().invoke(main, arguments)
    finally:
        plugin_manager.cache_clear()
        sys.modules.pop("broken_plugin", None)  # the next case's module has the same name
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stderr.startswith("hookyard: plugin broken: ") and error in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output, result.output


def test_no_module_of_the_gateway_package_has_the_name_of_what_it_exports() -> None:
    # Importing gateway.<name> binds that module as the package's attribute, over the helper of that name,
    # and `from gateway import <name>` then gives a plugin the module.
    import gateway

    package = Path(gateway.__file__).parent
    modules = {path.stem for path in package.glob("*.py")} | {
        path.name for path in package.iterdir() if path.is_dir()
    }
    assert not modules & set(gateway.__all__)
