"""Route filters: every operator, path and combinator evaluated on real Event objects, and every compile error
raised as a FilterError that names its place."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml

from gateway.config import parse_config
from gateway.events import Event
from gateway.filters import FilterError, compile_filter


def make_event(
    data: Any = None,
    *,
    payload: Any = None,
    headers: dict[str, str] | None = None,
    event_type: str = "consignment.created",
    event_id: str = "evt_1",
    source: str = "consignly",
) -> Event:
    if payload is None:
        payload = {
            "id": event_id,
            "type": event_type,
            "operationId": "op-42",
            "data": {} if data is None else data,
        }
    return Event(
        source=source,
        id=event_id,
        type=event_type,
        received_at=1_700_000_000.0,
        body=b"{}",
        payload=payload,
        headers={"content-type": "application/json", "x-test": "1"} if headers is None else headers,
    )


def holds(spec: Any, event: Event) -> bool:
    result = compile_filter(spec)(event)
    assert isinstance(result, bool)
    return result


def compile_error(spec: Any, place: str = "filter") -> str:
    with pytest.raises(FilterError) as caught:
        compile_filter(spec, place)
    return str(caught.value)


# -- equality ----------------------------------------------------------------------------------------


def test_plain_value_is_equality() -> None:
    event = make_event({"status": 1, "carrier": "Example Freight"})
    assert holds({"data.status": 1}, event)
    assert not holds({"data.status": 2}, event)
    assert holds({"data.carrier": "Example Freight"}, event)
    assert not holds({"data.carrier": "example freight"}, event)


def test_eq_operator_is_the_same_as_a_plain_value() -> None:
    event = make_event({"status": 1})
    assert holds({"data.status": {"eq": 1}}, event)
    assert not holds({"data.status": {"eq": 3}}, event)


def test_number_equality_is_json_like() -> None:
    assert holds({"data.weight": 1}, make_event({"weight": 1.0}))
    assert holds({"data.weight": 1.0}, make_event({"weight": 1}))


def test_strings_do_not_equal_numbers() -> None:
    assert not holds({"data.status": "1"}, make_event({"status": 1}))
    assert not holds({"data.status": 1}, make_event({"status": "1"}))


@pytest.mark.parametrize(
    ("expected", "actual"), [(True, 1), (1, True), (False, 0), (0, False), (True, 1.0), (1.0, True)]
)
def test_a_boolean_only_equals_a_boolean(expected: Any, actual: Any) -> None:
    event = make_event({"flag": actual})
    assert not holds({"data.flag": expected}, event)
    assert not holds({"data.flag": {"eq": expected}}, event)
    assert not holds({"data.flag": {"in": [expected]}}, event)
    assert holds({"data.flag": {"ne": expected}}, event)
    assert holds({"data.flag": {"not_in": [expected]}}, event)


def test_booleans_equal_booleans() -> None:
    assert holds({"data.flag": True}, make_event({"flag": True}))
    assert holds({"data.flag": False}, make_event({"flag": False}))
    assert not holds({"data.flag": True}, make_event({"flag": False}))


def test_null_equals_null_but_not_an_absent_value() -> None:
    assert holds({"data.ref": None}, make_event({"ref": None}))
    assert not holds({"data.ref": None}, make_event({}))
    assert not holds({"data.ref": None}, make_event({"ref": 0}))


def test_a_list_value_is_compared_as_a_whole() -> None:
    event = make_event({"tags": ["a", "b"]})
    assert holds({"data.tags": ["a", "b"]}, event)
    assert not holds({"data.tags": ["b", "a"]}, event)
    assert not holds({"data.tags": "a"}, event)


def test_an_absent_value_equals_nothing() -> None:
    event = make_event({})
    assert not holds({"data.missing": 1}, event)
    assert not holds({"data.missing": ""}, event)
    assert not holds({"data.missing": False}, event)


# -- ne, in, not_in ----------------------------------------------------------------------------------


def test_ne() -> None:
    assert holds({"data.status": {"ne": 9}}, make_event({"status": 1}))
    assert not holds({"data.status": {"ne": 1}}, make_event({"status": 1}))
    assert holds({"data.status": {"ne": None}}, make_event({"status": 1}))


def test_ne_fails_on_an_absent_value() -> None:
    assert not holds({"data.status": {"ne": 9}}, make_event({}))


def test_ne_on_null_is_present() -> None:
    assert holds({"data.status": {"ne": 9}}, make_event({"status": None}))


def test_in() -> None:
    spec = {"data.status": {"in": [1, 2]}}
    assert holds(spec, make_event({"status": 1}))
    assert holds(spec, make_event({"status": 2}))
    assert not holds(spec, make_event({"status": 3}))
    assert not holds(spec, make_event({"status": "1"}))
    assert not holds(spec, make_event({}))


def test_in_an_empty_list_never_holds() -> None:
    assert not holds({"data.status": {"in": []}}, make_event({"status": 1}))


def test_in_with_mixed_types() -> None:
    spec = {"data.ref": {"in": ["a", 2, None]}}
    assert holds(spec, make_event({"ref": "a"}))
    assert holds(spec, make_event({"ref": 2}))
    assert holds(spec, make_event({"ref": None}))
    assert not holds(spec, make_event({}))


def test_not_in() -> None:
    spec = {"type": {"not_in": ["consignment.deleted", "consignment.cancelled"]}}
    assert holds(spec, make_event(event_type="consignment.created"))
    assert not holds(spec, make_event(event_type="consignment.deleted"))
    assert not holds(spec, make_event(event_type="consignment.cancelled"))


def test_not_in_fails_on_an_absent_value() -> None:
    assert not holds({"data.status": {"not_in": [1]}}, make_event({}))


# -- exists ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, "", False, [], {}, "x", 1.5])
def test_exists_true_for_any_present_value(value: Any) -> None:
    event = make_event({"ref": value})
    assert holds({"data.ref": {"exists": True}}, event)
    assert not holds({"data.ref": {"exists": False}}, event)


@pytest.mark.parametrize("data", [{}, {"ref": None}])
def test_exists_false_for_absent_or_null(data: dict[str, Any]) -> None:
    event = make_event(data)
    assert holds({"data.ref": {"exists": False}}, event)
    assert not holds({"data.ref": {"exists": True}}, event)


def test_exists_on_a_header() -> None:
    assert holds({"headers.x-test": {"exists": True}}, make_event())
    assert holds({"headers.x-other": {"exists": False}}, make_event())


# -- regex -------------------------------------------------------------------------------------------


def test_regex_searches_anywhere_in_the_string() -> None:
    event = make_event({"reference": "ORDER-123"})
    assert holds({"data.reference": {"regex": "^ORDER-"}}, event)
    assert holds({"data.reference": {"regex": r"\d+$"}}, event)
    assert holds({"data.reference": {"regex": "DER"}}, event)
    assert not holds({"data.reference": {"regex": "^DER"}}, event)
    assert not holds({"data.reference": {"regex": "^order-"}}, event)


def test_regex_inline_flags() -> None:
    assert holds({"data.reference": {"regex": "(?i)^order-"}}, make_event({"reference": "ORDER-1"}))


@pytest.mark.parametrize("value", [123, None, True, ["ORDER-1"], {"a": "ORDER-1"}])
def test_regex_on_a_non_string_is_false(value: Any) -> None:
    assert not holds({"data.reference": {"regex": ".*"}}, make_event({"reference": value}))


def test_regex_on_an_absent_value_is_false() -> None:
    assert not holds({"data.reference": {"regex": ".*"}}, make_event({}))


def test_regex_on_the_type() -> None:
    spec = {"type": {"regex": r"^consignment\."}}
    assert holds(spec, make_event(event_type="consignment.created"))
    assert not holds(spec, make_event(event_type="manifest.closed"))
    assert not holds(spec, make_event(event_type="consignmentXcreated"))


# -- orderings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "value", "expected"),
    [
        ("gt", 31, True),
        ("gt", 30, False),
        ("gt", 29.5, False),
        ("gte", 30, True),
        ("gte", 30.0, True),
        ("gte", 29, False),
        ("lt", 29, True),
        ("lt", 30, False),
        ("lte", 30, True),
        ("lte", 31, False),
        ("gt", 30.5, True),
    ],
)
def test_number_orderings(operator: str, value: Any, expected: bool) -> None:
    assert holds({"data.weight": {operator: 30}}, make_event({"weight": value})) is expected


def parsed_event(body: bytes) -> Event:
    """An event whose payload is `body` parsed as the listener parses it (orjson)."""
    return Event(
        source="consignly",
        id="evt_1",
        type="consignment.created",
        received_at=1_700_000_000.0,
        body=body,
        payload=orjson.loads(body),
    )


def test_integers_past_64_bits_compare_with_all_their_digits() -> None:
    # Parsed as the listener parses a body: orjson reads such an integer as a float, and both of these were
    # 1.2345678901234568e+29, which equals neither and orders below both.
    body = b'{"data": {"amount": 123456789012345678901234567891, "debt": -123456789012345678901234567891}}'
    event = parsed_event(body)
    assert holds({"data.amount": 123456789012345678901234567891}, event)
    assert not holds({"data.amount": 123456789012345678901234567890}, event)
    assert holds({"payload.data.amount": {"in": [123456789012345678901234567891]}}, event)
    assert holds({"data.amount": {"gt": 123456789012345678901234567890}}, event)
    assert holds({"data.debt": {"lt": -123456789012345678901234567890}}, event)
    assert holds({"data.debt": {"ne": -123456789012345678901234567890}}, event)


BIG = 123456789012345678901234567891


def test_integers_past_64_bits_compare_with_all_their_digits_in_a_list_or_an_object() -> None:
    # A list or an object compared as a whole held orjson's floats: it missed the sender's number and
    # matched the float (1.2345678901234568e+29) that any integer near it is read as.
    body = (
        b'{"data": {"amounts": [7, 123456789012345678901234567891], '
        b'"total": {"due": 123456789012345678901234567891}}}'
    )
    event = parsed_event(body)
    assert holds({"data.amounts": [7, BIG]}, event)
    assert not holds({"data.amounts": [7, BIG - 1]}, event)
    assert not holds({"data.amounts": [7, float(BIG)]}, event)
    assert holds({"data.amounts": {"eq": [7, BIG]}}, event)
    assert holds({"data.amounts": {"ne": [7, BIG - 1]}}, event)
    assert holds({"data.amounts": {"in": [[7, BIG - 1], [7, BIG]]}}, event)
    assert holds({"data.amounts": {"not_in": [[7, BIG - 1], [7, float(BIG)]]}}, event)
    assert holds({"data.total": {"eq": {"due": BIG}}}, event)
    assert not holds({"data.total": {"eq": {"due": BIG + 1}}}, event)
    assert holds({"payload.data": {"ne": {"amounts": [7, BIG], "total": {"due": BIG + 1}}}}, event)


def test_integers_just_below_64_bits_compare_with_all_their_digits() -> None:
    # One below the least 64-bit integer: orjson reads it as the float -2**63, the least 64-bit integer's value.
    body = b'{"data": {"debt": -9223372036854775809}}'
    event = parsed_event(body)
    assert holds({"data.debt": -9223372036854775809}, event)
    assert not holds({"data.debt": -9223372036854775808}, event)
    assert holds({"data.debt": {"lt": -9223372036854775808}}, event)


@pytest.mark.parametrize(
    ("operator", "value", "expected"),
    [
        ("gt", "b", True),
        ("gt", "a", False),
        ("gte", "a", True),
        ("lt", "A", True),
        ("lte", "a", True),
        ("lte", "ab", False),
    ],
)
def test_string_orderings_by_code_point(operator: str, value: str, expected: bool) -> None:
    assert holds({"data.code": {operator: "a"}}, make_event({"code": value})) is expected


def test_iso_dates_compare_as_strings() -> None:
    spec = {"payload.created": {"gte": "2026-01-01"}}
    assert holds(spec, make_event(payload={"created": "2026-11-22T10:00:00Z"}))
    assert not holds(spec, make_event(payload={"created": "2025-12-31T23:59:59Z"}))


@pytest.mark.parametrize("operator", ["gt", "gte", "lt", "lte"])
@pytest.mark.parametrize("operand", ["10", "-2.5", " 1e3 ", "+7", ".5"])
def test_an_ordering_with_text_that_reads_as_a_number_is_refused(operator: str, operand: str) -> None:
    # Such text compared with text only, by code point ("9" above "10"), and never with a number: a
    # `gte: "${MIN}"`, which always expands to text, matched no numeric value without a word.
    assert compile_error({"data.weight": {operator: operand}}) == (
        f"filter.data.weight.{operator}: {operand!r} is text that reads as a number, and text compares "
        f'with text only, by code point ("9" comes after "10"): write the number unquoted ({operator}: '
        "10); a ${VAR} always expands to text, so a number to compare with cannot come from one"
    )


def test_an_ordering_with_a_variable_reading_as_a_number_is_refused_when_the_config_loads() -> None:
    # The case met in practice: the threshold from the environment, compared with a number in the payload.
    route = {
        "name": "r",
        "source": "s",
        "filter": {"data.weight": {"gte": "${MIN}"}},
        "actions": [{"use": "store"}],
    }
    spec = parse_config(yaml.safe_dump({"routes": [route]}), environ={"MIN": "10"}).routes[0].filter
    assert spec == {"data.weight": {"gte": "10"}}
    assert compile_error(spec, "routes[0].filter").startswith(
        "routes[0].filter.data.weight.gte: '10' is text that reads as a number"
    )


@pytest.mark.parametrize("operand", ["v10", "2026-01-01", "1.2.3", "ten", "", "0x10", "1_000"])
def test_an_ordering_with_text_that_is_no_number_compares_as_text(operand: str) -> None:
    assert compile_filter({"data.code": {"gte": operand}})


@pytest.mark.parametrize("operator", ["gt", "gte", "lt", "lte"])
@pytest.mark.parametrize("value", ["30", "100", None, True, False, [30], {"v": 30}])
def test_number_orderings_on_other_kinds_are_false_not_errors(operator: str, value: Any) -> None:
    assert not holds({"data.weight": {operator: 30}}, make_event({"weight": value}))


@pytest.mark.parametrize("operator", ["gt", "gte", "lt", "lte"])
@pytest.mark.parametrize("value", [1, 0.5, None, True, ["a"]])
def test_string_orderings_on_other_kinds_are_false_not_errors(operator: str, value: Any) -> None:
    assert not holds({"data.code": {operator: "a"}}, make_event({"code": value}))


@pytest.mark.parametrize("operator", ["gt", "gte", "lt", "lte"])
def test_orderings_on_an_absent_value_are_false(operator: str) -> None:
    assert not holds({"data.weight": {operator: 0}}, make_event({}))


def test_several_operators_in_one_condition_must_all_hold() -> None:
    spec = {"data.status": {"gte": 1, "lt": 5}}
    assert holds(spec, make_event({"status": 1}))
    assert holds(spec, make_event({"status": 4}))
    assert not holds(spec, make_event({"status": 5}))
    assert not holds(spec, make_event({"status": 0}))


# -- several entries and combinators -----------------------------------------------------------------


def test_every_entry_must_hold() -> None:
    spec = {"type": "consignment.created", "data.status": {"in": [1, 2]}}
    assert holds(spec, make_event({"status": 1}))
    assert not holds(spec, make_event({"status": 3}))
    assert not holds(spec, make_event({"status": 1}, event_type="consignment.updated"))


def test_any() -> None:
    spec = {"any": [{"data.status": 1}, {"data.priority": {"exists": True}}]}
    assert holds(spec, make_event({"status": 1}))
    assert holds(spec, make_event({"status": 9, "priority": "high"}))
    assert not holds(spec, make_event({"status": 9}))


def test_all() -> None:
    spec = {"all": [{"data.status": {"gte": 1}}, {"data.status": {"lte": 3}}]}
    assert holds(spec, make_event({"status": 2}))
    assert not holds(spec, make_event({"status": 4}))
    assert not holds(spec, make_event({}))


def test_not() -> None:
    spec = {"not": {"headers.x-test": "1"}}
    assert not holds(spec, make_event())
    assert holds(spec, make_event(headers={"x-test": "0"}))
    assert holds(spec, make_event(headers={}))


def test_not_of_several_entries_negates_their_conjunction() -> None:
    spec = {"not": {"data.a": 1, "data.b": 2}}
    assert not holds(spec, make_event({"a": 1, "b": 2}))
    assert holds(spec, make_event({"a": 1, "b": 3}))


def test_nested_combinators() -> None:
    spec = {
        "type": {"regex": r"^consignment\."},
        "any": [
            {"data.status": {"in": [1, 2]}},
            {"data.carrier": "Example Freight", "data.weight": {"gte": 30}},
        ],
        "not": {"payload.test": True},
    }
    assert holds(spec, make_event({"status": 2}))
    assert holds(spec, make_event({"status": 7, "carrier": "Example Freight", "weight": 30}))
    assert not holds(spec, make_event({"status": 7, "carrier": "Example Freight", "weight": 29}))
    assert not holds(spec, make_event({"status": 7, "carrier": "Other", "weight": 31}))
    assert not holds(spec, make_event({"status": 1}, event_type="manifest.closed"))
    tested = make_event(payload={"type": "consignment.created", "test": True, "data": {"status": 1}})
    assert not holds(spec, tested)


def test_any_inside_all_inside_not() -> None:
    spec = {"not": {"all": [{"any": [{"data.a": 1}, {"data.b": 1}]}, {"data.c": 1}]}}
    assert not holds(spec, make_event({"a": 1, "c": 1}))
    assert holds(spec, make_event({"a": 1, "c": 2}))
    assert holds(spec, make_event({"c": 1}))


# -- paths -------------------------------------------------------------------------------------------


def test_root_paths() -> None:
    event = make_event(event_type="consignment.created", event_id="evt_9", source="consignly")
    assert holds({"type": "consignment.created"}, event)
    assert holds({"id": "evt_9"}, event)
    assert holds({"source": "consignly"}, event)
    assert not holds({"source": "consignease"}, event)
    assert not holds({"id": "evt_1"}, event)


def test_data_paths_go_deep() -> None:
    event = make_event({"address": {"city": {"name": "Oslo"}}, "status": 1})
    assert holds({"data.address.city.name": "Oslo"}, event)
    assert holds({"data.address.city": {"exists": True}}, event)
    assert not holds({"data.address.country": {"exists": True}}, event)
    assert not holds({"data.status.deeper": {"exists": True}}, event)


def test_payload_paths() -> None:
    event = make_event({"status": 1})
    assert holds({"payload.operationId": "op-42"}, event)
    assert holds({"payload.data.status": 1}, event)
    assert holds({"payload.type": "consignment.created"}, event)


def test_data_is_absent_when_the_payload_has_none() -> None:
    event = make_event(payload={"id": "x", "type": "t"})
    assert holds({"data": {"exists": False}}, event)
    assert not holds({"data.status": {"exists": True}}, event)


def test_data_of_a_non_object_payload_is_absent() -> None:
    event = make_event(payload=[{"data": {"status": 1}}])
    assert not holds({"data.status": 1}, event)
    assert holds({"payload.0.data.status": 1}, event)


def test_headers_by_case_insensitive_name() -> None:
    event = make_event(headers={"x-test": "1", "content-type": "application/json"})
    assert holds({"headers.x-test": "1"}, event)
    assert holds({"headers.X-Test": "1"}, event)
    assert holds({"headers.Content-Type": {"regex": "json"}}, event)
    assert not holds({"headers.x-test": 1}, event)
    assert not holds({"headers.x-missing": {"exists": True}}, event)


def test_list_indexing() -> None:
    event = make_event({"items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2", "qty": 5}]})
    assert holds({"data.items.0.sku": "A-1"}, event)
    assert holds({"data.items.1.qty": {"gt": 4}}, event)
    assert holds({"data.items.-1.sku": "B-2"}, event)
    assert holds({"data.items.-2.sku": "A-1"}, event)
    assert not holds({"data.items.0.sku": "B-2"}, event)


@pytest.mark.parametrize(
    "path", ["data.items.2.sku", "data.items.-3.sku", "data.items.x.sku", "data.items.sku"]
)
def test_list_index_out_of_range_or_not_a_number_is_absent(path: str) -> None:
    event = make_event({"items": [{"sku": "A-1"}, {"sku": "B-2"}]})
    assert holds({path: {"exists": False}}, event)
    assert not holds({path: {"ne": "zzz"}}, event)


def test_a_digit_key_in_a_mapping_is_a_key() -> None:
    event = make_event({"codes": {"0": "zero"}})
    assert holds({"data.codes.0": "zero"}, event)


def test_a_filter_never_raises_on_odd_payloads() -> None:
    spec = {
        "data.a.b.c": {"gt": 1},
        "payload.x.0.y": {"regex": "z"},
        "headers.h": {"in": [1]},
    }
    for payload in [
        None,
        1,
        "s",
        [],
        {},
        {"data": "s"},
        {"data": [1, 2]},
        {"x": [None]},
        {"data": {"a": [1]}},
    ]:
        assert compile_filter(spec)(make_event(payload=payload, headers={})) is False


# -- compile errors ----------------------------------------------------------------------------------


def test_filter_error_is_a_value_error() -> None:
    assert issubclass(FilterError, ValueError)


def test_unknown_operator_names_its_place_and_the_known_ones() -> None:
    message = compile_error({"data.status": {"between": [1, 2]}})
    assert message == (
        "filter.data.status.between: unknown operator 'between'; "
        "use eq, ne, in, not_in, exists, regex, gt, gte, lt, lte"
    )


def test_errors_are_named_from_the_given_place() -> None:
    message = compile_error({"data.status": {"between": [1, 2]}}, place="routes[1].filter")
    assert message.startswith("routes[1].filter.data.status.between: unknown operator 'between'")


def test_bad_regex() -> None:
    message = compile_error({"data.reference": {"regex": "(unclosed"}})
    assert message.startswith("filter.data.reference.regex: invalid regex '(unclosed': ")


def test_regex_must_be_a_string() -> None:
    assert compile_error({"data.ref": {"regex": 5}}) == "filter.data.ref.regex: regex takes a string"


@pytest.mark.parametrize("path", ["status", "body.x", "occurred_at", "Data.status", "", "header.x"])
def test_unknown_root_path(path: str) -> None:
    message = compile_error({path: 1})
    assert message.startswith(f"filter.{path}: unknown path {path!r}; paths start with one of ")
    assert "type, id, source, data, payload, headers" in message


@pytest.mark.parametrize("path", ["type.name", "id.value", "source.name"])
def test_a_path_below_type_id_or_source_is_an_error_not_a_filter_that_never_holds(path: str) -> None:
    # They are texts: `type.name` never had a value, so the route never matched, and `not:` always held.
    root = path.partition(".")[0]
    assert (
        compile_error({"not": {path: "x"}})
        == f"filter.not.{path}: {root} is a text with nothing below it; write {root}"
    )


@pytest.mark.parametrize("header", ["authorization", "Authorization", "proxy-authorization", "Cookie"])
def test_a_header_that_is_never_kept_is_an_error_not_a_filter_that_never_holds(header: str) -> None:
    # Credentials are dropped before the event is stored and routed: a filter on one never matched.
    assert compile_error({f"headers.{header}": {"exists": True}}) == (
        f"filter.headers.{header}: the {header} header is never kept with an event (it may hold a "
        "credential), so a filter cannot see it"
    )


@pytest.mark.parametrize("spec", [{}, None, [], "type", 1, [{"type": "x"}]])
def test_a_filter_must_be_a_non_empty_mapping(spec: Any) -> None:
    assert compile_error(spec) == "filter: a filter is a non-empty mapping of paths to conditions"


def test_empty_condition() -> None:
    assert compile_error({"data.status": {}}) == "filter.data.status: an empty condition"


@pytest.mark.parametrize("operand", [1, "1", None, {"a": 1}, True])
@pytest.mark.parametrize("operator", ["in", "not_in"])
def test_in_and_not_in_take_a_list(operator: str, operand: Any) -> None:
    message = compile_error({"data.status": {operator: operand}})
    assert message == f"filter.data.status.{operator}: {operator} takes a list"


@pytest.mark.parametrize("operand", [1, 0, "true", None, []])
def test_exists_takes_a_boolean(operand: Any) -> None:
    assert (
        compile_error({"data.ref": {"exists": operand}})
        == "filter.data.ref.exists: exists takes true or false"
    )


@pytest.mark.parametrize("operand", [True, None, [1], {"a": 1}])
@pytest.mark.parametrize("operator", ["gt", "gte", "lt", "lte"])
def test_orderings_take_a_number_or_a_string(operator: str, operand: Any) -> None:
    message = compile_error({"data.weight": {operator: operand}})
    assert message == f"filter.data.weight.{operator}: {operator} takes a number or a string"


@pytest.mark.parametrize(
    ("condition", "place"),
    [
        ("2026-11-22", "filter.data.day"),
        ("{eq: 2026-11-22}", "filter.data.day.eq"),
        ("{ne: 2026-11-22}", "filter.data.day.ne"),
        ("{in: [2026-11-22, x]}", "filter.data.day.in"),
        ("{not_in: [x, 2026-11-22]}", "filter.data.day.not_in"),
        ("{gte: 2026-11-22}", "filter.data.day.gte"),
        ("[2026-11-22]", "filter.data.day"),
    ],
)
def test_an_unquoted_date_is_an_error_not_a_condition_that_never_holds(condition: str, place: str) -> None:
    # YAML reads it as a date, which no event field equals: `ne` held for that very day, `eq` for none.
    spec = {"data.day": yaml.safe_load(condition)}
    assert compile_error(spec) == f"{place}: 2026-11-22 is read by YAML as a date, not text: quote it"
    quoted = {"data.day": yaml.safe_load(condition.replace("2026-11-22", '"2026-11-22"'))}
    assert compile_filter(quoted)


@pytest.mark.parametrize("operand", [[], {}, None, {"data.a": 1}])
@pytest.mark.parametrize("combinator", ["any", "all"])
def test_any_and_all_take_a_non_empty_list(combinator: str, operand: Any) -> None:
    assert (
        compile_error({combinator: operand})
        == f"filter.{combinator}: {combinator} takes a non-empty list of filters"
    )


def test_errors_inside_combinators_name_the_index() -> None:
    message = compile_error({"any": [{"data.a": 1}, {"data.b": {"bogus": 1}}]})
    assert message.startswith("filter.any[1].data.b.bogus: unknown operator 'bogus'")
    message = compile_error({"all": [{"data.a": 1}, {}]})
    assert message == "filter.all[1]: a filter is a non-empty mapping of paths to conditions"


def test_errors_inside_not() -> None:
    assert compile_error({"not": {"nope.x": 1}}).startswith("filter.not.nope.x: unknown path 'nope.x'")
    assert (
        compile_error({"not": [{"type": "x"}]})
        == "filter.not: a filter is a non-empty mapping of paths to conditions"
    )


def test_deeply_nested_error_place() -> None:
    spec = {"not": {"any": [{"type": "a"}, {"all": [{"data.x": {"in": 3}}]}]}}
    assert compile_error(spec) == "filter.not.any[1].all[0].data.x.in: in takes a list"


@pytest.mark.parametrize(
    "spec",
    [
        {1: "x"},
        {"any": [{1: "x"}]},
        {"all": [{"type": "a"}, {True: 1}]},
        {"not": {None: 1}},
    ],
)
def test_a_non_string_path_is_a_filter_error(spec: dict[Any, Any]) -> None:
    # YAML makes `1:`, `true:` and `null:` keys non-strings; the config's schema only checks the top level,
    # so such keys inside any/all/not reach the compiler.
    with pytest.raises(FilterError):
        compile_filter(spec)


def test_every_bad_entry_is_reported_not_only_the_first() -> None:
    spec = {
        "data.a": {"between": [1, 2], "in": 3},
        "body.x": 1,
        "type": "ok",
        "any": [{"data.b": {"exists": "yes"}}, {}, {"data.c": 1}],
        "not": {"data.d": {"regex": "(unclosed"}},
    }
    with pytest.raises(FilterError) as caught:
        compile_filter(spec, "routes[1].filter")
    errors = caught.value.errors
    assert [line.split(": ", 1)[0] for line in errors] == [
        "routes[1].filter.data.a.between",
        "routes[1].filter.data.a.in",
        "routes[1].filter.body.x",
        "routes[1].filter.any[0].data.b.exists",
        "routes[1].filter.any[1]",
        "routes[1].filter.not.data.d.regex",
    ]
    assert str(caught.value) == "\n".join(errors)


@pytest.mark.parametrize(
    ("spec", "data"),
    [
        ({"data.flags": [True, False]}, {"flags": [1, 0]}),
        ({"data.flags": [1, 0]}, {"flags": [True, False]}),
        ({"data.flags": {"in": [[True]]}}, {"flags": [1]}),
        ({"data.pair": [[1], [True]]}, {"pair": [[True], [1]]}),
        ({"data.obj": {"eq": {"on": True}}}, {"obj": {"on": 1}}),
    ],
)
def test_a_boolean_inside_a_list_or_object_only_equals_a_boolean(spec: dict[str, Any], data: Any) -> None:
    assert not compile_filter(spec)(make_event(data))


def test_lists_still_compare_element_by_element() -> None:
    assert compile_filter({"data.flags": [True, 1.0, "x", None]})(make_event({"flags": [True, 1, "x", None]}))
    assert not compile_filter({"data.flags": [1, 2]})(make_event({"flags": [1, 2, 3]}))


def test_the_body_is_read_again_once_per_event_whatever_reads_its_digits() -> None:
    # Two filter leaves on two such integers, then the actions: one second parse of the body between them.
    event = parsed_event(
        b'{"data": {"a": 123456789012345678901234567891, "b": 123456789012345678901234567892}}'
    )
    assert holds({"data.a": 123456789012345678901234567891, "data.b": 123456789012345678901234567892}, event)
    exact = event.exact_payload()
    assert exact["data"]["b"] == 123456789012345678901234567892
    assert event.exact_payload() is exact
