"""The docs stay in step with the code: every hook and every metric is documented where users look."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from gateway import hookspecs
from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


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
