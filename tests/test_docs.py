"""The docs stay in step with the code: every hook and every metric is documented where users look."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from gateway import hookspecs
from gateway.metrics import Metrics

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


def test_every_metric_is_documented() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    names = {metric.name for metric in Metrics().registry.collect()}
    missing = sorted(name for name in names if name not in operations)
    assert not missing, f"metrics missing from docs/operations.md: {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make run" in readme and "make test" in readme
    assert re.search(r"^make test\b", ci, re.M)
