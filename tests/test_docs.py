"""The docs stay in step with the code: every hook and every metric is documented where users look, and the
README's two commands do what it says (CI runs the test command; `make run` installs only the runtime)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import importlib
import inspect
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import click
import httpx
import pluggy
import pytest
import yaml
from click.testing import CliRunner
from packaging.requirements import Requirement
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from gateway import actions, config, hookspecs, providers
from gateway.cli import main
from gateway.config import Config, Limits, parse_config
from gateway.metrics import Metrics
from gateway.plugins import Registry, new_plugin_manager
from gateway.storage.sqlite import _room_needed
from tests.support import (
    Downstream,
    GatewayProcess,
    free_port,
    gateway_config,
    svix_request,
    unavailable,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent

Function = ast.FunctionDef | ast.AsyncFunctionDef


def hook_names() -> list[str]:
    return [
        name
        for name, value in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(value, "hookyard_spec")
    ]


def test_every_hook_has_a_section_in_the_plugin_guide() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    sections = set(re.findall(r"^### (\w+)", guide, re.M))
    names = hook_names()
    assert len(names) >= 6
    missing = [name for name in names if name not in sections]
    assert not missing, f"hooks without a `### name` section in docs/plugins.md: {missing}"


def hook_sections(guide: str) -> dict[str, str]:
    """The text of each `### name` section of the plugin guide, up to the next heading outside a code block."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in guide.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            current = sections.setdefault(line[4:].strip(), []) if line.startswith("### ") else None
            continue
        if current is not None:
            current.append(line)
    return {name: "".join(lines) for name, lines in sections.items()}


def python_functions(section: str) -> list[Function]:
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)
    return [node for block in blocks for node in ast.walk(ast.parse(block)) if isinstance(node, Function)]


def decorated(function: Function, marker: str) -> bool:
    return any(isinstance(d, ast.Name) and d.id == marker for d in function.decorator_list)


def signature_of_spec(name: str) -> tuple[list[tuple[str, str]], str]:
    # hookspecs.py has `from __future__ import annotations`: the annotations are the source text.
    signature = inspect.signature(getattr(hookspecs, name))
    parameters = [(p.name, str(p.annotation)) for p in signature.parameters.values()]
    return parameters, str(signature.return_annotation)


def signature_in_docs(function: Function) -> tuple[list[tuple[str, str]], str]:
    arguments = function.args
    assert not (arguments.posonlyargs or arguments.kwonlyargs or arguments.vararg or arguments.kwarg)
    parameters = [(arg.arg, ast.unparse(arg.annotation) if arg.annotation else "") for arg in arguments.args]
    return parameters, ast.unparse(function.returns) if function.returns else ""


@pytest.mark.parametrize("name", hook_names())
def test_each_hook_section_shows_the_spec_signature_and_a_valid_example(name: str) -> None:
    section = hook_sections((ROOT / "docs" / "plugins.md").read_text())[name]
    functions = python_functions(section)
    specs = [f for f in functions if decorated(f, "hookspec")]
    assert [f.name for f in specs] == [name], f"### {name} must show exactly one `@hookspec def {name}(...)`"
    parameters, returns = signature_of_spec(name)
    assert signature_in_docs(specs[0]) == (parameters, returns)
    # Every argument is described in the section's text.
    undescribed = [arg for arg, _ in parameters if f"`{arg}`" not in section]
    assert not undescribed, f"### {name} does not describe {undescribed}"
    # The example implements this hook, with a subset of the spec's arguments (all pluggy accepts).
    examples = [f for f in functions if decorated(f, "hookimpl") and f.name == name]
    assert examples, f"### {name} has no `@hookimpl def {name}(...)` example"
    spec_arguments = [arg for arg, _ in parameters]
    for example in examples:
        arguments = [arg.arg for arg in example.args.args]
        assert set(arguments) <= set(spec_arguments), f"### {name}: the example takes {arguments}"


def guide_sections(level: str) -> dict[str, str]:
    """The text of each heading of one level (`##`, `###`) of the plugin guide, up to the next of its level."""
    guide = (ROOT / "docs" / "plugins.md").read_text()
    parts = re.split(rf"^{level} (.+)$", guide, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def table_members(section: str) -> dict[str, str]:
    """The first column of a section's tables: each row's member name, with its cell as written."""
    cells = re.findall(r"^\| `([^`]+)`", section, re.M)
    return {re.sub(r"^async ", "", cell).split("(")[0]: cell for cell in cells}


def public_members(cls: type) -> list[str]:
    """What a plugin's subclass sets or overrides: the class's own public names, and its constructor."""
    names = [*cls.__annotations__, *(name for name in vars(cls) if not name.startswith("_"))]
    return sorted({"__init__", *names} - {"model_config"})


def attributes_set_by_init(cls: type) -> list[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
    ]


def documented_call(cell: str) -> tuple[bool, list[str]]:
    """`async deliver(job) -> Outcome`: whether it is a coroutine, and its arguments."""
    arguments = cell.split("(", 1)[1].split(")", 1)[0]
    return cell.startswith("async "), [name.strip() for name in arguments.split(",") if name.strip()]


def actual_call(function: Any) -> tuple[bool, list[str]]:
    parameters = list(inspect.signature(function).parameters)[1:]  # not self
    return inspect.iscoroutinefunction(function), parameters


@pytest.mark.parametrize(
    ("heading", "cls"),
    [("Writing a provider", "gateway.providers.Provider"), ("Writing an action", "gateway.actions.Action")],
)
def test_every_member_of_the_plugin_base_classes_is_in_the_guide_as_it_is_called(
    heading: str, cls: str
) -> None:
    module, name = cls.rsplit(".", 1)
    base = getattr(importlib.import_module(module), name)
    section = guide_sections("##")[heading]
    members = table_members(section.split("\n### ", 1)[0])
    missing = sorted(set(public_members(base)) - set(members))
    assert not missing, f"the table under ## {heading} lacks {missing}"
    # Any other row is an attribute the constructor sets (secret_headers).
    unknown = sorted(set(members) - set(public_members(base)) - set(attributes_set_by_init(base)))
    assert not unknown, f"the table under ## {heading} has {unknown}, which {name} does not"
    for member, cell in members.items():
        if "(" in cell:
            assert documented_call(cell) == actual_call(getattr(base, member)), f"## {heading}: {cell}"


@pytest.mark.parametrize(
    ("heading", "cls"), [("Event", "gateway.events.Event"), ("Job", "gateway.actions.Job")]
)
def test_every_field_of_event_and_job_is_in_the_guide(heading: str, cls: str) -> None:
    module, name = cls.rsplit(".", 1)
    # A private field (Event's cache of exact_payload()) is no plugin's to read or set.
    fields = [
        f.name
        for f in dataclasses.fields(getattr(importlib.import_module(module), name))
        if not f.name.startswith("_")
    ]
    assert list(table_members(guide_sections("###")[heading])) == fields, f"the table under ### {heading}"


def test_the_guide_imports_exactly_the_plugin_api_of_the_gateway_package() -> None:
    import gateway

    guide = (ROOT / "docs" / "plugins.md").read_text()
    imported = re.findall(r"^from gateway import (.+?)(?:  #.*)?$", guide.split("\n- [", 1)[0], re.M)
    names = sorted(name.strip() for line in imported for name in line.split(","))
    assert names == sorted(["hookimpl", *gateway._EXPORTS])


def test_every_metric_is_documented() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    names = {metric.name for metric in Metrics().registry.collect()}
    missing = sorted(name for name in names if name not in operations)
    assert not missing, f"metrics missing from docs/operations.md: {missing}"


def test_the_room_readiness_asks_for_is_stated_as_the_store_computes_it() -> None:
    """The free space /readyz needs with the default limits, in both guides, is the store's own figure."""
    limits = Limits()
    room = limits.max_body_bytes + 2 * limits.max_header_bytes
    empty, reused = _room_needed(room, 4096, 0), _room_needed(room, 4096, 10_000)
    operations = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    kubernetes = " ".join((ROOT / "docs" / "kubernetes.md").read_text().split())
    assert f"{empty:,} bytes (2.2 MiB) on a database file with no free pages, {reused:,} bytes" in operations
    assert f"{empty:,} bytes (2.2 MiB) with the default limits" in kubernetes
    assert f"{empty:,} bytes with the default limits, {reused:,} once" in kubernetes


def readme_commands() -> list[list[str]]:
    """The commands of the README's quick start, as words (comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```sh\n(.*?)```", quick_start, re.S)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def runs_exactly(line: str, command: list[str]) -> bool:
    """`line` runs `command` itself: optionally under `timeout`, followed by make variables only."""
    words = shlex.split(line, comments=True)
    for start in range(len(words) - len(command) + 1):
        if words[start : start + len(command)] != command:
            continue
        wrapper, rest = words[:start], words[start + len(command) :]
        if (not wrapper or wrapper[0] == "timeout") and all(_MAKE_VARIABLE.match(word) for word in rest):
            return True
    return False


_MAKE_VARIABLE = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def test_ci_runs_the_readme_test_command() -> None:
    commands = readme_commands()
    assert ["make", "run"] in commands
    [test_command] = [words for words in commands if words[:1] == ["make"] and words[1].startswith("test")]
    assert test_command == ["make", "test"]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    runs = [index for index, line in enumerate(ci_lines) if runs_exactly(line, test_command)]
    assert runs, f"{' '.join(test_command)!r} is not run by .ci/run"
    # With every service required, a test needing a server fails in CI instead of skipping.
    exports = [index for index, line in enumerate(ci_lines) if line == "export HOOKYARD_REQUIRE_SERVICES=1"]
    assert exports and exports[0] < runs[-1], "HOOKYARD_REQUIRE_SERVICES=1 is not exported before the tests"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("make test", True),
        ('timeout --kill-after=30 1800 make test PYTEST_ARGS="-p no:cacheprovider"', True),
        ("make test-slow", False),
        ("timeout 1800 make test-slow PYTEST_ARGS=-q", False),
        ("make test lint", False),
        ("# make test", False),
        ("echo make test", False),
    ],
)
def test_runs_exactly_tells_the_test_command_from_its_neighbours(line: str, expected: bool) -> None:
    assert runs_exactly(line, ["make", "test"]) is expected


def test_every_dependency_has_a_compatible_upper_bound() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        requirement for extra in project["optional-dependencies"].values() for requirement in extra
    ]
    unbounded = [
        requirement
        for requirement in requirements
        if not any(spec.operator in ("<", "<=", "~=", "==") for spec in Requirement(requirement).specifier)
    ]
    assert not unbounded, f"no upper bound: {unbounded}"


def make_dry_run(tmp_path: Path, target: str) -> list[str]:
    """What `make TARGET` would run in a fresh clone (no .venv yet)."""
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    # Not the outer make's flags or a PYTHON of the caller's: what a fresh clone's `make` does.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        ["make", "-n", target], cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_installs_only_the_runtime_package_and_make_test_the_test_extra(tmp_path: Path) -> None:
    run = make_dry_run(tmp_path, "run")
    installs = [line for line in run if " install " in line and "--upgrade pip" not in line]
    assert installs == [".venv/bin/pip install --quiet -e ."], run
    assert run[0] == "python3 -m venv .venv"  # a fresh clone gets its own virtual environment
    assert run[-1] == ".venv/bin/hookyard serve -c routes.yaml"

    test = make_dry_run(tmp_path, "test")
    installs = [line for line in test if " install " in line and "--upgrade pip" not in line]
    assert installs == [".venv/bin/pip install --quiet -e .", ".venv/bin/pip install --quiet -e '.[test]'"]
    assert test[0] == "python3 -m venv .venv"
    assert test[-1].startswith(".venv/bin/pytest ")


def rejection_statuses() -> set[tuple[int, str]]:
    """(status, reason) of every refusal of the listener and the built-in providers, read from their source."""
    calls = re.compile(
        r'(?:Rejected\(\s*(\d{3}),|_closing_answer\(\s*(\d{3}),|(unauthorized)\(|bad_request\()\s*"([a-z_]+)"'
    )
    sources = [*(ROOT / "gateway").glob("*.py"), *(ROOT / "plugins").glob("*.py")]
    return {
        (int(status or closing or (401 if unauthorized else 400)), reason)
        for path in sources
        for status, closing, unauthorized, reason in calls.findall(path.read_text())
    }


def rejection_reasons() -> set[str]:
    """Every reason the listener and the built-in providers refuse a webhook with, read from their source."""
    return {reason for _, reason in rejection_statuses()}


def test_every_rejection_reason_is_documented() -> None:
    reasons = rejection_reasons()
    assert {"unknown_path", "invalid_signature", "internal_error", "storage_unavailable"} <= reasons
    for page in ("errors.md", "providers.md"):
        text = (ROOT / "docs" / page).read_text()
        missing = sorted(reason for reason in reasons if f"`{reason}`" not in text)
        assert not missing, f"rejection reasons missing from docs/{page}: {missing}"
    operations = (ROOT / "docs" / "operations.md").read_text()
    [row] = [
        line for line in operations.splitlines() if line.startswith("| `hookyard_webhook_rejections_total`")
    ]
    missing = sorted(reason for reason in reasons if f"`{reason}`" not in row)
    assert not missing, f"reasons missing from the rejections metric in docs/operations.md: {missing}"


def config_keys(model: type[BaseModel], place: str = "") -> list[str]:
    """Every key of routes.yaml, as `section.key`, down through nested sections, sources and routes."""
    keys = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        keys.append(f"{place}{key}")
        for inner in _models(field.annotation):
            keys += config_keys(inner, f"{place}{key}.")
    return keys


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _models(argument)]


def check_examples(page: str) -> list[tuple[str, str, list[str]]]:
    """The `hookyard check -c FILE` examples of a docs page: (FILE, the YAML block shown before the
    command, or "" for routes.yaml, the lines the command prints)."""
    text = (ROOT / "docs" / page).read_text()
    examples = []
    for match in re.finditer(r"```console\n\$ \.venv/bin/hookyard check -c (\S+)\n(.*?)```", text, re.S):
        blocks = re.findall(r"```yaml\n(.*?)```", text[: match.start()], re.S)
        config = "" if match[1] == "routes.yaml" else blocks[-1]
        examples.append((match[1], config, match[2].splitlines()))
    return examples


@pytest.mark.parametrize(("name", "config", "printed"), check_examples("configuration.md"))
def test_hookyard_check_prints_what_the_docs_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, config: str, printed: list[str]
) -> None:
    path = ROOT / "routes.yaml"
    if config:
        path = tmp_path / name
        path.write_text(config)
        # The example's variables are unset, as its text says.
        for variable in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", config):
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(path.parent)
    result = CliRunner().invoke(main, ["check", "-c", name], catch_exceptions=False)
    assert result.output.splitlines() == printed


def test_the_kubernetes_guide_exports_what_send_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide's `hookyard send` through the Service: the variables it exports are the ones `send`
    needs from the base routes.yaml (the source's secret), no more."""
    from tests.support import SVIX_SECRET

    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    exported = [
        word.partition("=")[0]
        for line in re.findall(r"^export (.*)$", guide, re.M)
        for word in shlex.split(line)
    ]
    assert exported
    config = ROOT / "deploy" / "kustomize" / "base" / "routes.yaml"
    for variable in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", config.read_text()):
        monkeypatch.delenv(variable, raising=False)
    for variable in exported:
        monkeypatch.setenv(variable, SVIX_SECRET)  # consignease is a svix source
    result = CliRunner().invoke(
        main,
        [
            "sign",
            "consignease",
            "--type",
            "user.created",
            "-c",
            str(config),
            "--url",
            "http://127.0.0.1:8080",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("hookyard: not set, and not needed by this command: "), result.stderr
    assert not [variable for variable in exported if variable in result.stderr], result.stderr


def test_the_readme_names_the_demo_ports_and_every_variable_that_moves_the_sink() -> None:
    readme = (ROOT / "README.md").read_text()
    text = (ROOT / "routes.yaml").read_text()
    config = parse_config(text, environ={})
    [sink_port] = [p.default for p in main.commands["sink"].params if p.name == "port"]
    for address in (
        f"127.0.0.1:{config.listen.port}",
        f"127.0.0.1:{config.ops.port}",
        f"127.0.0.1:{sink_port}",
    ):
        assert f"`{address}`" in readme, f"the README does not name {address}"
    assert f"localhost:{config.ops.port}/metrics" in readme
    # A user whose port 3000 is taken moves every URL of the demo that points at the sink.
    variables = sorted(set(re.findall(rf"\$\{{(\w+):-http://127\.0\.0\.1:{sink_port}\b", text)))
    assert len(variables) >= 3
    missing = [name for name in variables if f"{name}=http://127.0.0.1:PORT" not in readme]
    assert not missing, f"the README's paragraph on ports taken does not set {missing}"


# -- the configuration reference: every key of every model, with its type, default and range -----------------


@dataclasses.dataclass(frozen=True)
class Table:
    """Where a model's keys are documented: the `index`th table of the section under `heading` of `page`."""

    page: str
    heading: str
    model: type[BaseModel]
    index: int = 0


CONFIG_TABLES = [
    Table("docs/configuration.md", "## Top level", config.Config),
    Table("docs/configuration.md", "## `listen`", config.IngressListener),
    Table("docs/configuration.md", "## `ops`", config.OpsListener),
    Table("docs/configuration.md", "## `storage`", config.StorageConfig),
    Table("docs/configuration.md", "## `limits`", config.Limits),
    Table("docs/configuration.md", "## `defaults`", config.Defaults),
    Table("docs/configuration.md", "## `defaults`", config.RetryPolicy, 1),
    Table("docs/configuration.md", "## `delivery`", config.DeliveryEngine),
    Table("docs/configuration.md", "## `log`", config.LogConfig),
    Table("docs/configuration.md", "## `reload`", config.Reload),
    Table("docs/configuration.md", "## `sources`", config.Source),
    Table("docs/configuration.md", "## `routes`", config.Route),
    Table("docs/configuration.md", "### Actions", config.ActionConfig),
]
# The providers whose options have a table in docs/providers.md, by the heading it is under.
PROVIDER_TABLES = {"hmac": "## `hmac`", "token": "## `token`"}
# basic's options are token's id_from and type_from: its paragraph names them.
PROVIDER_PARAGRAPHS = {"basic": ("## `token`", "**`basic`**")}
# A model that a table names in its type column rather than as a mapping.
KIND_NAMES = {config.RetryPolicy: "retry policy"}


def built_in_registry() -> Registry:
    return Registry.collect(new_plugin_manager(load_entry_points=False))


def plugin_tables() -> list[Table]:
    """The `with:` table of each built-in action and the `options:` table of each built-in provider that
    takes any."""
    registry = built_in_registry()
    tables = [
        Table("docs/configuration.md", f"## The `{name}` action", action.Options)
        for name, action in sorted(registry.actions.items())
        if action.Options is not actions.NoOptions
    ]
    for name, provider in sorted(registry.providers.items()):
        if provider.Options is providers.NoOptions or name in PROVIDER_PARAGRAPHS:
            continue
        assert name in PROVIDER_TABLES, f"{name} takes options: give them a table in docs/providers.md"
        tables.append(Table("docs/providers.md", PROVIDER_TABLES[name], provider.Options))
    return tables


ALL_TABLES = [*CONFIG_TABLES, *plugin_tables()]


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def table_rows(table: Table) -> dict[str, tuple[str, str, str]]:
    """Each key of a table: (its type cell, "" in a table without one; its default cell; its row). A row of
    several keys (`id_from`, `type_from`) gives each its own default, in the order written."""
    text = re.sub(r"^```.*?^```", "", section(table.page, table.heading), flags=re.M | re.S)
    header, _, *lines = re.findall(r"(?:^\|.*\n)+", text, re.M)[table.index].splitlines()
    typed = _cells(header)[1] == "type"
    rows = {}
    for line in lines:
        cells = _cells(line)
        names = re.findall(r"`([^`]+)`", cells[0])
        kind, default = (cells[1], cells[2]) if typed else ("", cells[1])
        defaults = re.findall(r"`[^`]*`", default) if len(names) > 1 else [default]
        assert len(defaults) == len(names), f"{table.heading}: a default for each of {names}"
        for name, cell in zip(names, defaults, strict=True):
            rows[name] = (kind, cell, line)
    return rows


def _members(annotation: Any) -> list[Any]:
    """`A | Annotated[B, …] | None` -> [A, B]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [member for argument in typing.get_args(annotation) for member in _members(argument)]
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    return [] if annotation is type(None) else [annotation]


def _validators(field: FieldInfo) -> set[Any]:
    """The functions that read a field's value itself (a duration's parser), on it or on its type."""
    annotations = [field.annotation, *typing.get_args(field.annotation)]
    metadata = [*field.metadata, *(item for a in annotations for item in getattr(a, "__metadata__", ()))]
    return {getattr(item, "func", None) for item in metadata}


def _choices(annotation: Any) -> list[Any]:
    """The values a Literal takes, through unions, lists and Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if origin not in (typing.Union, types.UnionType, list, typing.Annotated):
        return []
    # An Annotated type's metadata is not a type: only what it annotates.
    arguments = typing.get_args(annotation)[: 1 if origin is typing.Annotated else None]
    return [choice for argument in arguments for choice in _choices(argument)]


DURATION_PARSERS = {config.parse_duration, config.parse_positive_duration, config.parse_retention}


def kind_words(field: FieldInfo) -> tuple[str, ...]:
    """The words, any of which a type cell says of a field's kind; none for a choice of words, whose
    choices the cell lists instead."""
    if _validators(field) & DURATION_PARSERS:
        return ("duration",)
    [kind, *_] = _members(field.annotation)
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return ()
    if origin in (list, dict):
        return {list: ("list",), dict: ("mapping",)}[origin]
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return ("mapping", *([KIND_NAMES[kind]] if kind in KIND_NAMES else []))
    return {
        int: ("integer",),
        float: ("number",),
        bool: ("boolean",),
        str: ("string",),
        SecretStr: ("string",),
    }[kind]


def range_text(field: FieldInfo) -> str | None:
    """How a table writes the bounds of a number: `0\N{EN DASH}65535`, `> 0`, `\N{GREATER-THAN OR EQUAL TO} 1`."""
    ge = next((item.ge for item in field.metadata if isinstance(item, annotated_types.Ge)), None)
    le = next((item.le for item in field.metadata if isinstance(item, annotated_types.Le)), None)
    gt = next((item.gt for item in field.metadata if isinstance(item, annotated_types.Gt)), None)
    if ge is not None and le is not None:
        return f"{ge}\N{EN DASH}{le}"
    if gt is not None:
        return f"> {gt}"
    if ge is not None:
        return f"\N{GREATER-THAN OR EQUAL TO} {ge}"
    return None


def documents_default(field: FieldInfo, cell: str) -> bool:
    """Whether a default cell says the default the field has. A value is written in `code`, perhaps with a
    note in brackets (`1048576` (1 MiB)) and as the config reads it (`5m`, `7d`); a section of its own
    (see …) holds a nested model's; a default in words (`a built-in message`), by another key
    (`defaults.retry`) or with a condition (`always` when `after` is set) is None, worked out where it is
    used."""
    default = field.get_default(call_default_factory=True)
    if cell.startswith("see "):
        return any(table.model in _members(field.annotation) for table in CONFIG_TABLES)
    if re.match(r"none\b", cell):
        return default is None
    code = re.fullmatch(r"`([^`]*)`(?: \(.*\))?", cell)
    if code is None or code[1] in config_keys(Config):
        return default is None
    adapter: TypeAdapter[Any] = TypeAdapter(
        typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    )
    for written in (yaml.safe_load(code[1]), code[1]):  # `{body}` is text, not a YAML mapping
        try:
            if adapter.validate_python(written) == default:
                return True
        except ValidationError:
            continue
    return False


@pytest.mark.parametrize("table", ALL_TABLES, ids=lambda table: f"{table.model.__name__}")
def test_each_key_is_in_its_table_with_its_type_range_and_default(table: Table) -> None:
    rows = table_rows(table)
    fields = {field.alias or name: field for name, field in table.model.model_fields.items()}
    where = f"{table.page}, the table under {table.heading}"
    assert sorted(rows) == sorted(fields), f"{where}: its keys are not {table.model.__name__}'s"
    for key, field in fields.items():
        kind, default, row = rows[key]
        required = field.is_required()
        assert ("**required**" in default) == required, (
            f"{where}: `{key}` is {'' if required else 'not '}required"
        )
        if not required:
            value = field.get_default(call_default_factory=True)
            assert documents_default(field, default), (
                f"{where}: `{key}` defaults to {value!r}, not {default!r}"
            )
        if kind:
            words = kind_words(field)
            listed = re.fullmatch(r"`[^`]+`(?:(?:, | or )`[^`]+`)*", kind) is not None
            assert not words or listed or any(word in kind for word in words), (
                f"{where}: `{key}` is a {words[0]}"
            )
            written = {span.strip("\"'") for span in re.findall(r"`([^`]+)`", kind)}
            missing = [choice for choice in _choices(field.annotation) if str(choice) not in written]
            assert not missing, f"{where}: `{key}` also takes {missing}"
            bounds = range_text(field)
            assert bounds is None or bounds in kind, f"{where}: `{key}` is {bounds}"
        # A nested mapping without a table of its own has its keys told in its row.
        for inner in _models(field.annotation):
            if not any(other.model is inner for other in CONFIG_TABLES):
                spans = " ".join(re.findall(r"`([^`]+)`", row))
                untold = [name for name in inner.model_fields if not re.search(rf"\b{name}\b", spans)]
                assert not untold, f"{where}: the row of `{key}` does not name {untold}"


def config_fields(model: type[BaseModel], place: str = "") -> list[tuple[str, FieldInfo]]:
    """Every key of routes.yaml with its field, as `section.key`, down through nested sections."""
    fields = []
    for name, field in model.model_fields.items():
        key = f"{place}{field.alias or name}"
        fields.append((key, field))
        for inner in _models(field.annotation):
            fields += config_fields(inner, f"{key}.")
    return fields


def test_the_durations_section_names_every_duration_that_must_be_longer_than_zero() -> None:
    text = " ".join(section("docs/configuration.md", "## Durations").split())
    [sentence] = [part for part in text.split(". ") if "must be longer than 0" in part]
    named = set(re.findall(r"`([\w.]+)`", sentence))
    positive = {
        key for key, field in config_fields(Config) if config.parse_positive_duration in _validators(field)
    }
    assert {"limits.read_timeout", "routes.actions.timeout"} <= positive
    # A key of every section that has one (`timeout`: defaults' and each action's) is named bare.
    unnamed = sorted(key for key in positive if key not in named and key.rpartition(".")[2] not in named)
    assert not unnamed, f"docs/configuration.md, ## Durations: {unnamed} must be longer than 0 too"
    wrong = sorted(
        name for name in named if not any(key == name or key.endswith(f".{name}") for key in positive)
    )
    assert not wrong, f"docs/configuration.md, ## Durations: {wrong} may be 0"


def test_the_providers_that_take_options_are_named_where_their_options_are() -> None:
    registry = built_in_registry()
    taking = sorted(
        name for name, provider in registry.providers.items() if provider.Options is not providers.NoOptions
    )
    assert taking == sorted([*PROVIDER_TABLES, *PROVIDER_PARAGRAPHS])
    # The sources table's `options` row names them, and says the others take none.
    [sources] = [table for table in CONFIG_TABLES if table.model is config.Source]
    row = table_rows(sources)["options"][2]
    [sentence] = [part for part in row.split(". ") if "take options" in part]
    assert sorted(re.findall(r"`([\w-]+)`", sentence)) == taking
    for name, (heading, start) in PROVIDER_PARAGRAPHS.items():
        text = section("docs/providers.md", heading)
        paragraph = text[text.index(start) :].split("\n\n", 1)[0]
        untold = [key for key in registry.providers[name].Options.model_fields if f"`{key}`" not in paragraph]
        assert not untold, f"docs/providers.md: the paragraph on {name} does not name {untold}"


_EXPORTED_SUFFIX = {"info": "_info", "counter": "_total"}  # what prometheus_client adds to a family's name


def metric_labels() -> dict[str, tuple[str, list[str]]]:
    """Every metric as it is exported: its name, its type and its labels (declared, or on its samples)."""
    metrics: dict[str, tuple[str, list[str]]] = {}
    registry = Metrics().registry
    for collector in list(registry._collector_to_names):
        declared = getattr(collector, "labelnames", None) or getattr(collector, "_labelnames", ())
        for family in collector.collect():
            name = family.name + _EXPORTED_SUFFIX.get(family.type, "")
            sampled = {label for sample in family.samples for label in sample.labels if label != "le"}
            metrics[name] = (family.type, sorted({*declared, *sampled}))
    return metrics


def test_each_metric_is_documented_with_its_type_and_labels() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    table = re.findall(r"^\| `(hookyard_\w+)` \| ([^|]+?) \|([^|]*)\|", operations, re.M)
    rows = {name: (kind.split()[0], sorted(re.findall(r"`(\w+)`", labels))) for name, kind, labels in table}
    exported = metric_labels()
    assert "hookyard_build_info" in exported and len(exported) >= 20
    for name, (kind, labels) in exported.items():
        assert name in rows, f"no row for {name} in the metrics table of docs/operations.md"
        # An info metric is a gauge of 1 with its labels, and the table says so.
        documented = ({"info": "gauge"}.get(kind, kind), labels)
        assert rows[name] == documented, f"{name}: a {kind} labelled {labels}"


def test_the_consignly_catalog_in_the_provider_guide_is_the_providers() -> None:
    from plugins.consignly import CATALOG, dotted_type

    providers = (ROOT / "docs" / "providers.md").read_text()
    catalog = providers.split("### Consignly event catalog", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| `([\w.]+)` \|$", catalog, re.M)
    assert rows == [(str(code), name, dotted_type(name)) for code, name in CATALOG.items()]


def test_the_reliability_guide_names_only_tests_that_exist() -> None:
    guide = (ROOT / "docs" / "reliability.md").read_text()
    names = set(re.findall(r"`(test_\w+?)(?:_…)?`", guide))
    assert len(names) >= 10
    suite = "".join(path.read_text() for path in (ROOT / "tests" / "reliability").glob("test_*.py"))
    defined = set(re.findall(r"^(?:async )?def (test_\w+)", suite, re.M))
    missing = sorted(name for name in names if not any(test.startswith(name) for test in defined))
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_the_readme_links_every_page_of_the_docs_and_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    documentation = readme.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    pages = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
    linked = sorted(re.findall(r"\]\(docs/([\w-]+\.md)\)", documentation))
    assert linked == pages, "the README's Documentation list"
    layout = readme.split("## Project layout", 1)[1]
    modules = sorted(path.name for path in (ROOT / "gateway").glob("*.py") if not path.name.startswith("_"))
    missing = [name for name in modules if not re.search(rf"(?<![\w.]){re.escape(name)}\b", layout)]
    assert not missing, f"the README's Project layout does not name {missing}"


def example_configs(page: str) -> list[str]:
    """The YAML blocks of a docs page that are whole configs (sources, routes), but for those whose
    errors the page shows (see check_examples)."""
    shown = {config for _, config, _ in check_examples(page)}
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)
    return [
        block
        for block in blocks
        if block not in shown
        and isinstance(data := yaml.safe_load(block), dict)
        and "sources" in data
        and set(data) <= set(Config.model_fields)
    ]


@pytest.mark.parametrize(
    "config", [*example_configs("configuration.md"), *example_configs("providers.md")], ids=lambda c: c[:40]
)
def test_each_example_config_passes_hookyard_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str
) -> None:
    # Each variable set to a value of its kind: a URL, or a secret that every provider takes.
    for variable in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", config):
        value = (
            "http://127.0.0.1:3000" if variable.endswith("_URL") else "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        )
        monkeypatch.setenv(variable, value)
    (tmp_path / "routes.yaml").write_text(config)
    result = CliRunner().invoke(main, ["check", "-c", str(tmp_path / "routes.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_each_rejection_is_documented_with_its_status() -> None:
    pairs = rejection_statuses()
    assert (401, "invalid_signature") in pairs and (503, "storage_unavailable") in pairs
    tables = {
        "errors.md": r"^\| (\d{3}) \| `([a-z_]+)` \|",  # status | reason
        "providers.md": r"^\| (?:\d+|any) \| (\d{3}) \| `([a-z_]+)` \|",  # # | status | reason
    }
    for page, row in tables.items():
        documented = {
            (int(status), reason)
            for status, reason in re.findall(row, (ROOT / "docs" / page).read_text(), re.M)
        }
        wrong = sorted(pairs - documented)
        assert not wrong, f"docs/{page} gives these another status, or none: {wrong}"


def section(page: str, heading: str) -> str:
    """The text under the heading of a page (README.md or docs/…) that begins with `heading`, up to the next
    heading of its level or above, outside code blocks."""
    text = (ROOT / page).read_text()
    level = heading.split(" ", 1)[0]
    lines, inside, fenced = [], False, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) ", line)):
            if inside and len(match[1]) <= len(level):
                break
            inside = inside or line.startswith(heading)
        if inside:
            lines.append(line)
    assert lines, f"no heading {heading!r} in {page}"
    return "".join(lines)


def cli_commands() -> dict[tuple[str, ...], click.Command]:
    """Every command the `hookyard` command runs, by its words (`events list`)."""
    commands: dict[tuple[str, ...], click.Command] = {}

    def walk(group: click.Group, words: tuple[str, ...]) -> None:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                walk(command, (*words, name))
            else:
                commands[(*words, name)] = command

    walk(main, ())
    return commands


def long_options(command: click.Command) -> list[str]:
    return [opt for param in command.params for opt in param.opts if opt.startswith("--")]


def described_options(text: str) -> set[str]:
    """The options that code in `text` names (`--since 2h`, `hookyard replay ID --action KEY`). A synopsis's
    `[--json]` lists an option without saying what it does, and does not count."""
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return {
        opt
        for span in spans
        for opt in re.findall(r"(?<![\w\[-])--[a-z][\w-]*", re.sub(r"\[[^]]*\]", "", span))
    }


# Where each command's options are described. `--config` and `--admin-url` are described once for every
# command that takes them (see the tests below).
CLI_SECTIONS = {
    ("serve",): ("docs/configuration.md", "# Configuration"),
    ("check",): ("docs/configuration.md", "## Checking a config"),
    ("schema",): ("docs/configuration.md", "## Editor integration"),
    ("plugins",): ("docs/plugins.md", "## How plugins are loaded"),
    ("events", "list"): ("docs/operations.md", "### `hookyard events list`"),
    ("events", "show"): ("docs/operations.md", "### `hookyard events show`"),
    ("replay",): ("docs/operations.md", "### Replay"),
    ("send",): ("docs/providers.md", "## Test events"),
    ("sign",): ("docs/providers.md", "## Test events"),
    ("sink",): ("README.md", "## A short tour"),
}
SHARED_OPTIONS = {"--config", "--admin-url"}


def test_every_cli_option_is_described_where_its_command_is() -> None:
    commands = cli_commands()
    assert sorted(commands) == sorted(CLI_SECTIONS), "a command with no section in CLI_SECTIONS"
    for words, command in commands.items():
        named = described_options(section(*CLI_SECTIONS[words]))
        missing = [opt for opt in long_options(command) if opt not in SHARED_OPTIONS and opt not in named]
        assert not missing, f"hookyard {' '.join(words)}: {missing} not in {CLI_SECTIONS[words]}"
    # `-c/--config`: the configuration reference names every command that takes it, in its first lines.
    intro = (ROOT / "docs" / "configuration.md").read_text().split("\n\n", 2)[1]
    assert "`-c/--config PATH`" in intro
    takes_config = {words[0] for words, command in commands.items() if "--config" in long_options(command)}
    assert sorted(name for name in takes_config if f"`{name}`" not in intro) == []
    # `--admin-url`: the operator commands' page says what it does, for the commands that take it.
    operator = section("docs/operations.md", "## Operator CLI and admin API").split("\n### ", 1)[0]
    assert "`--admin-url`" in operator and "`$HOOKYARD_ADMIN_URL`" in operator
    assert {words[0] for words, command in commands.items() if "--admin-url" in long_options(command)} == {
        "events",
        "replay",
        "send",
    }


def test_the_test_events_section_names_the_options_sign_does_not_take() -> None:
    commands = cli_commands()
    lacking = [
        opt for opt in long_options(commands[("send",)]) if opt not in long_options(commands[("sign",)])
    ]
    assert lacking, "sign takes every option of send: the section may say `the same options`"
    text = section("docs/providers.md", "## Test events")
    [paragraph] = [part for part in text.split("\n\n") if part.startswith("`hookyard sign`")]
    missing = [opt for opt in lacking if f"`{opt}`" not in paragraph]
    assert not missing, f"the paragraph on `hookyard sign` does not say it lacks {missing}"


def admin_parameters() -> dict[str, dict[str, dict[str, Any]]]:
    """`METHOD /path` of each admin endpoint, as the admin table writes it, and its query and body
    parameters, each with its schema: what /admin/openapi.json says of them."""
    from gateway.admin import admin_routes, schemas

    # The routes call on the gateway only when a request comes.
    document = schemas.get_schema(routes=admin_routes(typing.cast(Any, None)))
    endpoints = {}
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            parameters = {
                p["name"]: p["schema"] for p in operation.get("parameters", []) if p["in"] == "query"
            }
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            parameters.update(body.get("schema", {}).get("properties", {}))
            endpoints[f"{method.upper()} {path.replace('{event_id}', '{id}')}"] = parameters
    return endpoints


def test_every_admin_endpoint_is_in_the_table_with_its_parameters_and_their_bounds() -> None:
    text = section("docs/operations.md", "### Admin API")
    rows = dict(re.findall(r"^\| `((?:GET|POST) /admin/[^`]+)` \| (.+) \|$", text, re.M))
    endpoints = admin_parameters()
    assert "GET /admin/events" in endpoints and "POST /admin/replay" in endpoints
    documented = sorted(set(rows) - {"GET /admin/openapi.json"})
    assert documented == sorted(endpoints), "the endpoints of the admin table in docs/operations.md"
    for endpoint, parameters in endpoints.items():
        row = rows[endpoint]
        # Named in code (`cursor`, `?source=`) or as a JSON key ("action").
        code = re.findall(r"`([^`]+)`", row) + re.findall(r'"(\w+)"', row)
        named = {word for text in code for word in re.findall(r"\w+", text)}
        missing = [name for name in parameters if name not in named]
        assert not missing, f"{endpoint}: {missing} not in its row"
        for name, schema in parameters.items():
            if "minimum" in schema and "maximum" in schema:
                bounds = f"{schema['minimum']}\N{EN DASH}{schema['maximum']}"  # as the docs write a range
                assert bounds in row, f"{endpoint}: `{name}` takes {bounds}, which its row does not say"
            if "default" in schema:
                assert f"default {schema['default']}" in row, (
                    f"{endpoint}: `{name}` defaults to {schema['default']}"
                )


_LOG_LEVELS = {"debug", "info", "warning", "error", "exception"}


def log_calls() -> list[tuple[str, str, str]]:
    """(file, level, message) of every log call of the gateway and the built-in plugins whose message is
    written out (`log.warning("cannot prune events", …)`), read from their source."""
    calls = []
    for path in sorted([*(ROOT / "gateway").rglob("*.py"), *(ROOT / "plugins").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LOG_LEVELS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                calls.append((path.relative_to(ROOT).as_posix(), node.func.attr, node.args[0].value))
    return calls


def _as_pattern(message: str) -> str:
    # `%s`, `%d`, `%g` and `%r` stand for what the docs write as NAME or N.
    return ".+?".join(re.escape(part) for part in re.split(r"%[sdgr]", message))


def logged_as(message: str, code: str) -> bool:
    """Whether `code` in the logs table writes `message`; one ending in `…` may leave out its end."""
    if code.endswith("…"):
        shown = code.removesuffix("…").rstrip()
        return any(re.fullmatch(_as_pattern(message[:end]), shown) for end in range(len(message) + 1))
    return re.fullmatch(_as_pattern(message), code) is not None


def test_every_log_message_is_in_the_logs_table_with_its_level() -> None:
    text = section("docs/operations.md", "## Structured logs")
    rows = re.findall(r"^\| `[\w.]+` \| (.+?) \| (.+?) \|", text, re.M)
    calls = log_calls()
    assert len(calls) >= 50 and ("gateway/app.py", "info", "hookyard ready") in calls
    for path, level, message in calls:
        found = [
            levels
            for cell, levels in rows
            if any(logged_as(message, code) for code in re.findall(r"`([^`]+)`", cell))
        ]
        assert found, f"{path}: {message!r} is not in the logs table of docs/operations.md"
        # An exception is logged at error level, with its traceback.
        word = "error" if level == "exception" else level
        assert any(word in levels for levels in found), f"{path}: {message!r} is logged at {level}"


def commands_that_load_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The commands that build the plugin manager (and so call register_providers), found by running each
    on a config whose store exists; `serve` compiles the config as `check` does, and `sink` needs none."""
    import gateway.cli
    from gateway.storage import open_storage

    config = tmp_path / "routes.yaml"
    config.write_text(
        f'storage: {{url: "sqlite:///{tmp_path}/hookyard.db"}}\n'
        "sources: {hooks: {path: /hooks, provider: token, secrets: [s3cret]}}\n"
        "routes: [{name: r, source: hooks, actions: [{use: forward, with: {url: 'http://127.0.0.1:9/'}}]}]\n"
    )

    async def create() -> None:
        storage = open_storage(f"sqlite:///{tmp_path}/hookyard.db")
        await storage.open()
        await storage.close()

    asyncio.run(create())
    loading: list[str] = []
    plugins = gateway.cli._plugins

    def counted() -> pluggy.PluginManager:
        loading.append(name)  # the command running, in the loop below
        return plugins()

    monkeypatch.setattr(gateway.cli, "_plugins", counted)
    runs = {
        "check": ["check"],
        "send": ["send", "hooks", "--type", "t", "--url", "http://127.0.0.1:9"],
        "sign": ["sign", "hooks", "--type", "t"],
        "plugins": ["plugins"],
        "schema": ["schema"],
        "events list": ["events", "list"],
        "events show": ["events", "show", "evt_none"],
        "replay ID": ["replay", "evt_none"],
        "replay --state dead": ["replay", "--state", "dead", "--since", "1h"],
        "replay --state missing": ["replay", "--state", "missing", "--since", "1h"],
    }
    for name, words in runs.items():
        arguments = words if words[0] in ("plugins", "schema") else [*words, "-c", str(config)]
        result = CliRunner().invoke(main, arguments, catch_exceptions=False)
        # Done, or refused for what it was asked (no such event, no gateway to send to), not for the config.
        assert result.exit_code in (0, 1) and "routes.yaml:" not in result.output, (name, result.output)
    return {"serve", *loading}


def test_the_guide_names_the_commands_that_call_register_providers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    called = hook_sections((ROOT / "docs" / "plugins.md").read_text())["register_providers"]
    [bullet] = [item for item in called.split("\n- ") if item.startswith("**Called**")]
    # Its first sentence names them; the next ones may name those that do not.
    first = " ".join(bullet.split()).split(". ", 1)[0]
    named = {name.removeprefix("hookyard ") for name in re.findall(r"`([^`]+)`", first)}
    loaded = commands_that_load_plugins(tmp_path, monkeypatch)
    assert loaded >= {"check", "send", "plugins"}
    assert named == loaded, f"### register_providers is called by {sorted(loaded)}"


def backup_commands() -> list[str]:
    """The commands of the Backups section of docs/operations.md, as an operator would paste them."""
    block = re.search(r"```sh\n(.*?)```", section("docs/operations.md", "## Backups"), re.S)
    assert block is not None, "no sh block in the Backups section of docs/operations.md"
    return [line for line in block[1].splitlines() if line.strip() and not line.startswith("#")]


PRELOADED = 600


@pytest.mark.parametrize("command", backup_commands())
def test_the_documented_backup_ends_under_load_and_restores_every_answered_webhook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, downstream: Downstream, command: str
) -> None:
    if command.startswith("sqlite3 ") and shutil.which("sqlite3") is None:
        unavailable("the sqlite3 shell is not installed")
    # Every delivery waits at the receiver: the copy holds them in flight or queued, none delivered.
    downstream.hold = threading.Event()
    ingress, ops = free_port(), free_port()
    served = tmp_path / "served"
    (served / "var").mkdir(parents=True)

    def configured(directory: Path, ingress: int, ops: int) -> Path:
        config = gateway_config(
            directory,
            downstream.url,
            storage={"url": "sqlite:///var/hookyard.db"},  # relative, as the documented commands are
            listen={"host": "127.0.0.1", "port": ingress},
            ops={"host": "127.0.0.1", "port": ops},
            delivery={"concurrency": 4, "lease": "10m", "poll_interval": "200ms"},
        )
        path = directory / "routes.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    process = GatewayProcess(configured(served, ingress, ops), f"http://127.0.0.1:{ops}")
    answered: list[str] = []
    stop = threading.Event()

    def send(client: httpx.Client, index: int, pad: int) -> None:
        body, headers = svix_request(msg_id=f"msg_backup_{index:06}", data={"pad": "x" * pad})
        response = client.post(
            f"http://127.0.0.1:{ingress}/webhooks/consignease", content=body, headers=headers
        )
        if response.status_code == 200:
            answered.append(response.json()["id"])

    def load(first: int) -> None:
        # Small webhooks, one after the other, for as long as the backup runs (a minute at most).
        with httpx.Client(timeout=10) as client:
            for index in range(first, first + 100_000):
                if stop.is_set():
                    return
                send(client, index, 100)

    monkeypatch.chdir(served)  # the gateway's, whose store is relative to where it runs
    try:
        process.start()
        with httpx.Client(timeout=10) as client:
            for index in range(PRELOADED):  # a store of some 60 MB: a copy of it takes many steps
                send(client, index, 100_000)
        # Two writers, so that the gateway commits without a pause while either waits for its answer.
        writers = [threading.Thread(target=load, args=(first,), daemon=True) for first in (10**5, 2 * 10**5)]
        for writer in writers:
            writer.start()
        wait_until(lambda: len(answered) >= PRELOADED + 100, 30)
        before = set(answered)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        try:
            backup = subprocess.run(command, shell=True, cwd=served, env=env, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command!r} did not end within 60 s while webhooks kept coming")
        finally:
            stop.set()
            for writer in writers:
                writer.join(15)
        assert backup.returncode == 0, backup.stderr
    finally:
        process.kill()
    # What the killed gateway had in flight is answered now, and left out of what the copy delivers.
    downstream.hold.set()
    wait_until(lambda: downstream.in_flight == 0, 35)
    with downstream.lock:
        downstream.requests.clear()

    copy = served / "var" / "hookyard-backup.db"
    with contextlib.closing(sqlite3.connect(copy)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {row[0] for row in db.execute("SELECT event_id FROM events")}
    assert before <= stored

    # Restored as the docs say, in a directory of its own: the copy in place of hookyard.db, no WAL beside it.
    restored = tmp_path / "restored"
    (restored / "var").mkdir(parents=True)
    shutil.copyfile(copy, restored / "var" / "hookyard.db")
    ingress, ops = free_port(), free_port()
    process = GatewayProcess(configured(restored, ingress, ops), f"http://127.0.0.1:{ops}")
    monkeypatch.chdir(restored)
    try:
        process.start()
        # Every webhook answered before the backup began is delivered from the copy.
        wait_until(lambda: {r.headers["idempotency-key"] for r in downstream.received()} >= before, 60)
        # And the copy's ids are known: a provider's resend of one is a duplicate.
        with httpx.Client(timeout=10) as client:
            body, headers = svix_request(msg_id=min(before), data={"pad": "x" * 100_000})
            resent = client.post(
                f"http://127.0.0.1:{ingress}/webhooks/consignease", content=body, headers=headers
            )
        assert resent.json()["status"] == "duplicate"
    finally:
        process.kill()
