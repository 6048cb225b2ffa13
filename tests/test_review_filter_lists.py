"""Filter equality is JSON-like at every depth: inside a list too, a boolean only equals a boolean."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.events import Event
from gateway.filters import compile_filter


def event(data: Any) -> Event:
    return Event("s", "evt_1", "t", 0.0, b"{}", {"data": data})


@pytest.mark.parametrize(
    ("spec", "data"),
    [
        ({"data.flags": [True, False]}, {"flags": [1, 0]}),
        ({"data.flags": [1, 0]}, {"flags": [True, False]}),
        ({"data.flags": {"in": [[True]]}}, {"flags": [1]}),
        ({"data.pair": [[1], [True]]}, {"pair": [[True], [1]]}),
    ],
)
def test_a_boolean_inside_a_list_only_equals_a_boolean(spec: dict[str, Any], data: Any) -> None:
    assert not compile_filter(spec)(event(data))


def test_lists_still_compare_element_by_element() -> None:
    assert compile_filter({"data.flags": [True, 1.0, "x", None]})(event({"flags": [True, 1, "x", None]}))
    assert not compile_filter({"data.flags": [1, 2]})(event({"flags": [1, 2, 3]}))
