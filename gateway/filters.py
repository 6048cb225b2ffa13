"""Route filters: a small, validated language over event fields, compiled once into a predicate.

    filter:
      data.status: {in: [1, 2]}          # path: condition (several entries must all hold)
      type: consignment.created          # a plain value means equality
      any: [{data.a: 1}, {data.b: {exists: true}}]
      not: {headers.x-test: "1"}

Paths start with type, id, source, data, payload or headers. Operators: eq, ne, in, not_in, exists, regex,
gt, gte, lt, lte.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

from gateway.events import Event

Predicate = Callable[[Event], bool]

ROOTS = ("type", "id", "source", "data", "payload", "headers")
_ABSENT = object()


class FilterError(ValueError):
    def __init__(self, place: str, message: str) -> None:
        super().__init__(f"{place}: {message}")


def compile_filter(spec: Any, place: str = "filter") -> Predicate:
    if not isinstance(spec, dict) or not spec:
        raise FilterError(place, "a filter is a non-empty mapping of paths to conditions")
    parts = [_compile_entry(key, value, f"{place}.{key}") for key, value in spec.items()]
    if len(parts) == 1:
        return parts[0]
    return lambda event: all(part(event) for part in parts)


def _compile_entry(key: Any, value: Any, place: str) -> Predicate:
    if not isinstance(key, str):  # YAML reads `1:` or `true:` as non-strings
        raise FilterError(place, f"a path must be a string, not {key!r}")
    if key in ("any", "all"):
        if not isinstance(value, list) or not value:
            raise FilterError(place, f"{key} takes a non-empty list of filters")
        parts = [compile_filter(item, f"{place}[{index}]") for index, item in enumerate(value)]
        combine = any if key == "any" else all
        return lambda event: combine(part(event) for part in parts)
    if key == "not":
        inner = compile_filter(value, place)
        return lambda event: not inner(event)
    root = key.split(".", 1)[0]
    if root not in ROOTS:
        raise FilterError(place, f"unknown path {key!r}; paths start with one of {', '.join(ROOTS)}")
    test = _compile_condition(value, place)
    return lambda event: test(event.lookup(key, _ABSENT))


def _compile_condition(condition: Any, place: str) -> Callable[[Any], bool]:
    if not isinstance(condition, dict):
        return lambda value: _equal(value, condition)
    if not condition:
        raise FilterError(place, "an empty condition")
    tests = [_compile_operator(name, operand, f"{place}.{name}") for name, operand in condition.items()]
    return lambda value: all(test(value) for test in tests)


_ORDERINGS = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def _compile_operator(name: str, operand: Any, place: str) -> Callable[[Any], bool]:
    if name == "eq":
        return lambda value: _equal(value, operand)
    if name == "ne":
        return lambda value: value is not _ABSENT and not _equal(value, operand)
    if name in ("in", "not_in"):
        if not isinstance(operand, list):
            raise FilterError(place, f"{name} takes a list")
        if name == "in":
            return lambda value: any(_equal(value, item) for item in operand)
        return lambda value: value is not _ABSENT and not any(_equal(value, item) for item in operand)
    if name == "exists":
        if not isinstance(operand, bool):
            raise FilterError(place, "exists takes true or false")
        return lambda value: (value is not _ABSENT and value is not None) is operand
    if name == "regex":
        if not isinstance(operand, str):
            raise FilterError(place, "regex takes a string")
        try:
            pattern = re.compile(operand)
        except re.error as exc:
            raise FilterError(place, f"invalid regex {operand!r}: {exc}") from None
        return lambda value: isinstance(value, str) and pattern.search(value) is not None
    if name in _ORDERINGS:
        compare = _ORDERINGS[name]
        if isinstance(operand, bool) or not isinstance(operand, int | float | str):
            raise FilterError(place, f"{name} takes a number or a string")
        return lambda value: _comparable(value, operand) and compare(value, operand)
    raise FilterError(
        place, f"unknown operator {name!r}; use eq, ne, in, not_in, exists, regex, gt, gte, lt, lte"
    )


def _equal(value: Any, expected: Any) -> bool:
    # True == 1 in Python; in a filter a boolean only equals a boolean.
    if isinstance(value, bool) or isinstance(expected, bool):
        return type(value) is type(expected) and value == expected
    return bool(value == expected)


def _comparable(value: Any, operand: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(operand, str):
        return isinstance(value, str)
    return isinstance(value, int | float)
