"""Route filters: a small, validated language over event fields, compiled once into a predicate.

    filter:
      data.status: {in: [1, 2]}          # path: condition (several entries must all hold)
      type: consignment.created          # a plain value means equality
      any: [{data.a: 1}, {data.b: {exists: true}}]
      not: {headers.x-test: "1"}

Paths start with type, id, source, data, payload or headers. Operators: eq, ne, in, not_in, exists, regex,
gt, gte, lt, lte. A value compared with `type` may be one of the provider's names or codes, as in a route's
`events:` (101 means consignment.created).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from gateway.events import UNSTORED_HEADERS, Event, holds_lost_digits, lost_digits

Predicate = Callable[[Event], bool]
# A provider's event_type: a name or code of its catalog -> the canonical type.
Canonical = Callable[[str | int], str]

ROOTS = ("type", "id", "source", "data", "payload", "headers")
_ABSENT = object()


class FilterError(ValueError):
    """A filter that does not compile; `errors` has one line per problem, each naming its place."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class _Context:
    """What a filter is compiled for: its source's provider."""

    event_type: Canonical | None
    unseen_headers: frozenset[str]


class _BadOperand(ValueError):
    """One operator's operand is wrong; collected into the FilterError."""

    def __init__(self, place: str, message: str) -> None:
        super().__init__(f"{place}: {message}")


def compile_filter(
    spec: Any,
    place: str = "filter",
    event_type: Canonical | None = None,
    unseen_headers: Collection[str] = UNSTORED_HEADERS,
) -> Predicate:
    """Compile a filter, or raise FilterError listing every bad entry (not only the first). `event_type`
    makes the values compared with `type` canonical, as the route's `events:` entries are. `unseen_headers`
    (lower case) are never kept with the source's events: a path to one is refused, as it never matches."""
    errors: list[str] = []
    predicate = _compile(spec, place, errors, _Context(event_type, frozenset(unseen_headers)))
    if errors or predicate is None:
        raise FilterError(errors)
    return predicate


def _compile(spec: Any, place: str, errors: list[str], context: _Context) -> Predicate | None:
    if not isinstance(spec, dict) or not spec:
        errors.append(f"{place}: a filter is a non-empty mapping of paths to conditions")
        return None
    parts = [_compile_entry(key, value, f"{place}.{key}", errors, context) for key, value in spec.items()]
    checked = [part for part in parts if part is not None]
    if len(checked) < len(parts):
        return None
    if len(checked) == 1:
        return checked[0]
    return lambda event: all(part(event) for part in checked)


def _compile_entry(
    key: Any, value: Any, place: str, errors: list[str], context: _Context
) -> Predicate | None:
    if not isinstance(key, str):  # YAML reads `1:` or `true:` as non-strings
        errors.append(f"{place}: a path must be a string, not {key!r}")
        return None
    if key in ("any", "all"):
        if not isinstance(value, list) or not value:
            errors.append(f"{place}: {key} takes a non-empty list of filters")
            return None
        parts = [_compile(item, f"{place}[{index}]", errors, context) for index, item in enumerate(value)]
        checked = [part for part in parts if part is not None]
        if len(checked) < len(parts):
            return None
        combine = any if key == "any" else all
        return lambda event: combine(part(event) for part in checked)
    if key == "not":
        inner = _compile(value, place, errors, context)
        if inner is None:
            return None
        return lambda event: not inner(event)
    root, _, rest = key.partition(".")
    if root not in ROOTS:
        errors.append(f"{place}: unknown path {key!r}; paths start with one of {', '.join(ROOTS)}")
        return None
    # Paths that are valid but never lead to a value: the route would never match, without a word.
    if root in ("type", "id", "source") and rest:
        errors.append(f"{place}: {root} is a text with nothing below it; write {root}")
        return None
    if root == "headers" and rest.lower() in context.unseen_headers:
        errors.append(
            f"{place}: the {rest} header is never kept with an event (it may hold a credential), so a "
            "filter cannot see it"
        )
        return None
    if key == "type" and context.event_type is not None:
        value = _canonical_types(value, context.event_type)
    test = _compile_condition(value, place, errors)
    if test is None:
        return None
    whole = _compares_whole(value)

    def check(event: Event) -> bool:
        value = event.lookup(key, _ABSENT)
        if value.__class__ is float:
            if lost_digits(value):
                value = _exact_lookup(event, key, value)
        elif whole and value.__class__ in (list, dict) and holds_lost_digits(value):
            value = _exact_lookup(event, key, value)
        return test(value)

    return check


def _compares_whole(condition: Any) -> bool:
    """Whether the condition may compare a list or an object as a whole (a plain value, eq, ne, in,
    not_in): only then are the lists and objects it looks at walked for a number whose digits orjson lost."""
    return not isinstance(condition, dict) or not condition.keys().isdisjoint(("eq", "ne", "in", "not_in"))


def _exact_lookup(event: Event, path: str, value: Any) -> Any:
    """The value at `path` read again from the body, where orjson's payload holds a float that may have
    been an integer past 64 bits (the value, or one in it): only then, so that the common event's body is
    parsed once."""
    exact = event.exact_payload()
    return value if exact is None else replace(event, payload=exact).lookup(path, _ABSENT)


def _canonical_types(condition: Any, event_type: Canonical) -> Any:
    """A condition on `type` whose names and codes are made canonical (ConsignmentDeleted, 103 ->
    consignment.deleted), in a plain value and in eq, ne, in and not_in: the event's type is the canonical
    one, which a name or a code never equals."""

    def canonical(value: Any) -> Any:
        return event_type(value) if isinstance(value, str | int) and not isinstance(value, bool) else value

    if not isinstance(condition, dict):
        return canonical(condition)
    made = dict(condition)
    for name in ("eq", "ne"):
        if name in made:
            made[name] = canonical(made[name])
    for name in ("in", "not_in"):
        if isinstance(made.get(name), list):
            made[name] = [canonical(item) for item in made[name]]
    return made


def _compile_condition(condition: Any, place: str, errors: list[str]) -> Callable[[Any], bool] | None:
    if not isinstance(condition, dict):
        try:
            _check_json(condition, place)
        except _BadOperand as exc:
            errors.append(str(exc))
            return None
        return lambda value: _equal(value, condition)
    if not condition:
        errors.append(f"{place}: an empty condition")
        return None
    tests = []
    for name, operand in condition.items():
        try:
            tests.append(_compile_operator(name, operand, f"{place}.{name}"))
        except _BadOperand as exc:
            errors.append(str(exc))
    if len(tests) < len(condition):
        return None
    return lambda value: all(test(value) for test in tests)


_ORDERINGS = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}
# Text a reader takes for a number: what JSON or YAML would read as one, with a sign or a leading dot.
_NUMBER_TEXT = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")


def _compile_operator(name: str, operand: Any, place: str) -> Callable[[Any], bool]:
    if name in ("eq", "ne", "in", "not_in", *_ORDERINGS):
        _check_json(operand, place)
    if name == "eq":
        return lambda value: _equal(value, operand)
    if name == "ne":
        return lambda value: value is not _ABSENT and not _equal(value, operand)
    if name in ("in", "not_in"):
        if not isinstance(operand, list):
            raise _BadOperand(place, f"{name} takes a list")
        if name == "in":
            return lambda value: any(_equal(value, item) for item in operand)
        return lambda value: value is not _ABSENT and not any(_equal(value, item) for item in operand)
    if name == "exists":
        if not isinstance(operand, bool):
            raise _BadOperand(place, "exists takes true or false")
        return lambda value: (value is not _ABSENT and value is not None) is operand
    if name == "regex":
        if not isinstance(operand, str):
            raise _BadOperand(place, "regex takes a string")
        try:
            pattern = re.compile(operand)
        except re.error as exc:
            raise _BadOperand(place, f"invalid regex {operand!r}: {exc}") from None
        return lambda value: isinstance(value, str) and pattern.search(value) is not None
    if name in _ORDERINGS:
        compare = _ORDERINGS[name]
        if isinstance(operand, bool) or not isinstance(operand, int | float | str):
            raise _BadOperand(place, f"{name} takes a number or a string")
        if isinstance(operand, str) and _NUMBER_TEXT.fullmatch(operand):
            # Such text would compare with text only, by code point, and never with a number: most often
            # a `${VAR}` (always text) meant as a number, which would match nothing without a word.
            raise _BadOperand(
                place,
                f"{operand!r} is text that reads as a number, and text compares with text only, by code "
                f'point ("9" comes after "10"): write the number unquoted ({name}: 10); a ${{VAR}} always '
                "expands to text, so a number to compare with cannot come from one",
            )
        return lambda value: _comparable(value, operand) and compare(value, operand)
    raise _BadOperand(
        place, f"unknown operator {name!r}; use eq, ne, in, not_in, exists, regex, gt, gte, lt, lte"
    )


def _check_json(operand: Any, place: str) -> None:
    """Refuse an operand no event field can ever be: YAML reads an unquoted 2026-11-22 as a date (and
    `!!binary` as bytes), which equals no JSON value, so `eq` would never hold and `ne` always would."""
    if isinstance(operand, list):
        for item in operand:
            _check_json(item, place)
    elif isinstance(operand, dict):
        for item in operand.values():
            _check_json(item, place)
    elif not isinstance(operand, str | int | float | type(None)):
        raise _BadOperand(
            place, f"{operand} is read by YAML as a {type(operand).__name__}, not text: quote it"
        )


def _equal(value: Any, expected: Any) -> bool:
    # True == 1 in Python; in a filter a boolean only equals a boolean, at every depth ([true] is not [1]).
    if isinstance(value, bool) or isinstance(expected, bool):
        return type(value) is type(expected) and value == expected
    if isinstance(value, list) and isinstance(expected, list):
        return len(value) == len(expected) and all(map(_equal, value, expected))
    if isinstance(value, dict) and isinstance(expected, dict):
        return value.keys() == expected.keys() and all(_equal(value[key], expected[key]) for key in value)
    return bool(value == expected)


def _comparable(value: Any, operand: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(operand, str):
        return isinstance(value, str)
    return isinstance(value, int | float)
