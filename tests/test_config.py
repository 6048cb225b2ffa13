"""routes.yaml parsing: ${VAR} interpolation, durations, unknown and missing keys (each error naming its place),
YAML errors, and the JSON Schema offered to editors."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.config import (
    Config,
    ConfigError,
    format_location,
    json_schema,
    load_config,
    parse_config,
    parse_duration,
)

REPO_ROUTES = Path(__file__).resolve().parent.parent / "routes.yaml"


def config_errors(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={} if environ is None else environ)
    assert caught.value.errors, "a ConfigError must list at least one problem"
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


def one_source(**fields: Any) -> str:
    source = {"path": "/hooks/x", "provider": "consignly", "secrets": ["s3cret"], **fields}
    return yaml.safe_dump({"sources": {"x": source}})


def one_route(**action: Any) -> str:
    route = {"name": "r", "source": "x", "actions": [{"use": "forward", **action}]}
    return yaml.safe_dump({"routes": [route]})


# -- ${VAR} interpolation ------------------------------------------------------------------------------


def test_variable_is_replaced_by_its_value() -> None:
    config = parse_config(
        'sources: {x: {path: /x, provider: svix, secrets: ["${SECRET}"]}}',
        environ={"SECRET": "whsec_abc"},
    )
    assert config.sources["x"].secrets == ["whsec_abc"]


def test_default_is_used_when_the_variable_is_unset() -> None:
    text = 'routes: [{name: r, source: x, actions: [{use: forward, with: {url: "${APP_URL:-http://127.0.0.1:3000}/hooks"}}]}]'
    config = parse_config(text, environ={})
    assert config.routes[0].actions[0].with_ == {"url": "http://127.0.0.1:3000/hooks"}


def test_value_wins_over_the_default_when_the_variable_is_set() -> None:
    text = 'routes: [{name: r, source: x, actions: [{use: forward, with: {url: "${APP_URL:-http://127.0.0.1:3000}/hooks"}}]}]'
    config = parse_config(text, environ={"APP_URL": "https://app.internal"})
    assert config.routes[0].actions[0].with_ == {"url": "https://app.internal/hooks"}


def test_default_may_contain_colons_and_slashes() -> None:
    config = parse_config('ops: {admin_token: "${TOKEN:-a:b//c@d:5432/x}"}', environ={})
    assert config.ops.admin_token == "a:b//c@d:5432/x"


def test_several_variables_in_one_string_and_surrounding_text_are_kept() -> None:
    config = parse_config(
        'storage: {url: "sqlite:///${DIR}/${NAME:-hy}.db"}', environ={"DIR": "/data", "NAME": "main"}
    )
    assert config.storage.url == "sqlite:////data/main.db"


def test_empty_default_gives_an_empty_string() -> None:
    config = parse_config('ops: {admin_token: "x${TOKEN:-}y"}', environ={})
    assert config.ops.admin_token == "xy"


def test_a_set_but_empty_variable_takes_the_default_as_in_the_shell() -> None:
    config = parse_config('ops: {admin_token: "x${TOKEN:-fallback}"}', environ={"TOKEN": ""})
    assert config.ops.admin_token == "xfallback"


def test_set_but_empty_variable_without_default_is_empty() -> None:
    config = parse_config('ops: {admin_token: "a${TOKEN}b"}', environ={"TOKEN": ""})
    assert config.ops.admin_token == "ab"


def test_interpolated_numbers_and_booleans_are_coerced_by_the_schema() -> None:
    text = 'listen: {port: "${PORT}"}\nsources: {x: {path: /x, provider: none, insecure: "${INSECURE}"}}'
    config = parse_config(text, environ={"PORT": "8181", "INSECURE": "true"})
    assert config.listen.port == 8181
    assert config.sources["x"].insecure is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "listen: {port: true}",
            "listen.port: the boolean true (as YAML reads yes, no, on and off), not a number",
        ),
        (
            "defaults: {retry: {jitter: no, retry_on: [500, on]}}",
            "defaults.retry.jitter: the boolean false (as YAML reads yes, no, on and off), not a number\n"
            # Not "quote it": a quoted 'on' is no status family either.
            "defaults.retry.retry_on[1]: the boolean true (as YAML reads yes, no, on and off), not a number, "
            "'5xx' or '4xx'",
        ),
        (
            "routes: [{name: r, source: x, events: [user.created, yes], actions: [{use: forward}]}]",
            "routes[0].events[1]: the boolean true (as YAML reads yes, no, on and off), not a number or text: "
            "quote it",
        ),
        ("reload: {watch: 1}", "reload.watch: the number 1, not a boolean: write true or false"),
    ],
    ids=["port", "retry", "events", "watch"],
)
def test_a_value_yaml_reads_as_another_kind_is_refused_not_converted(text: str, expected: str) -> None:
    # pydantic's lax mode took `port: true` as 1, `events: [yes]` as [1] and `watch: 1` as true.
    assert config_errors(text) == expected.split("\n")


def test_a_boolean_in_a_list_does_not_hide_the_other_entries_errors() -> None:
    # The boolean was reported alone; 1.5 only once it was fixed, one round of `check` later.
    text = "routes: [{name: r, source: x, events: [1.5, yes, {a: 1}], actions: [{use: forward}]}]"
    assert config_errors(text) == [
        "routes[0].events[0]: must be text or an integer, not a number",
        "routes[0].events[1]: the boolean true (as YAML reads yes, no, on and off), not a number or text: "
        "quote it",
        "routes[0].events[2]: must be text or an integer, not a mapping",
    ]


def test_numbers_durations_and_booleans_of_their_own_kind_still_load() -> None:
    text = (
        "listen: {port: 8181}\nreload: {watch: false, interval: 1}\n"
        "defaults: {retry: {jitter: 0, schedule: [1, 2s, 0.5], retry_on: [503, 5xx]}, timeout: 5s}\n"
        "sources: {x: {path: /x, provider: none, insecure: true}}\n"
        'routes: [{name: r, source: x, events: [112, "yes"], actions: [{use: forward}]}]'
    )
    config = parse_config(text)
    assert (config.listen.port, config.reload.watch, config.reload.interval) == (8181, False, 1.0)
    assert config.defaults.retry.schedule == [1.0, 2.0, 0.5] and config.defaults.retry.retry_on == [
        503,
        "5xx",
    ]
    assert config.routes[0].events == [112, "yes"]


def test_a_value_never_changes_the_yaml_structure() -> None:
    hostile = "x\nstorage: {url: 'sqlite:///evil'}"
    config = parse_config(
        'sources: {a: {path: /a, provider: svix, secrets: ["${SECRET}"]}}', environ={"SECRET": hostile}
    )
    assert config.sources["a"].secrets == [hostile]
    assert config.storage.url == "sqlite:///./var/hookyard.db"


def test_values_are_not_expanded_again() -> None:
    config = parse_config('ops: {admin_token: "${A}"}', environ={"A": "${B}", "B": "leak"})
    assert config.ops.admin_token == "${B}"


def test_text_that_is_not_a_variable_is_left_alone() -> None:
    config = parse_config(
        'ops: {admin_token: "$HOME ${1X} $${} {Y}"}', environ={"HOME": "/root", "1X": "no", "Y": "no"}
    )
    assert config.ops.admin_token == "$HOME ${1X} $${} {Y}"


@pytest.mark.parametrize("text", ["${HOOKYARD_ADMIN_TOKEN", "x-${TOKEN:-fallback", "${A} ${B and more"])
def test_an_unclosed_variable_reference_is_refused_without_showing_the_value(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f'ops: {{admin_token: "{text}"}}', environ={"A": "a", "B": "b"})
    [error] = caught.value.errors
    assert error.startswith("ops.admin_token: a ${NAME} reference is not closed with }")
    assert text not in error


@pytest.mark.parametrize(
    "text", ["${TOKEN-fallback}", "${TOKEN:?required}", "${TOKEN:=x}", "Bearer ${TOKEN:x}", "${TOKEN.x}"]
)
def test_a_shell_form_of_variable_reference_is_refused_not_kept_as_text(text: str) -> None:
    # Kept as written, `${TOKEN:?required}` was the admin token itself: text anyone can read in the docs.
    with pytest.raises(ConfigError) as caught:
        parse_config(f'ops: {{admin_token: "{text}"}}', environ={"TOKEN": "t"})
    [error] = caught.value.errors
    assert error.startswith("ops.admin_token: only ${NAME} and ${NAME:-default} are supported")
    assert text not in error


@pytest.mark.parametrize("text", ["${TOKEN:-${FALLBACK}}", "${TOKEN:-${FALLBACK:-x}}", "Bearer ${A:-x${B}}"])
def test_a_nested_default_is_refused_not_kept_as_text(text: str) -> None:
    # The shell's `${TOKEN:-${FALLBACK}}` made the admin token the text `${FALLBACK}`, set or not.
    with pytest.raises(ConfigError) as caught:
        parse_config(f'ops: {{admin_token: "{text}"}}', environ={"FALLBACK": "f", "B": "b"})
    [error] = caught.value.errors
    assert error == (
        "ops.admin_token: the default of a ${NAME:-default} cannot hold another ${NAME} (nested defaults "
        "are not supported): give the value of the one in the default as the default itself"
    )


def test_a_dollar_before_a_template_expression_is_still_text() -> None:
    config = parse_config('ops: {admin_token: "${{ total }} ${A}"}', environ={"A": "a"})
    assert config.ops.admin_token == "${{ total }} a"


def test_mapping_keys_are_not_interpolated() -> None:
    config = parse_config(
        'sources: {"${NAME}": {path: /x, provider: svix, secrets: [whsec_abc]}}', environ={"NAME": "other"}
    )
    assert list(config.sources) == ["${NAME}"]


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKYARD_TEST_TOKEN", "from-env")
    config = parse_config('ops: {admin_token: "${HOOKYARD_TEST_TOKEN}"}')
    assert config.ops.admin_token == "from-env"


def test_an_explicit_environ_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKYARD_TEST_TOKEN", "from-env")
    config = parse_config('ops: {admin_token: "${HOOKYARD_TEST_TOKEN:-fallback}"}', environ={})
    assert config.ops.admin_token == "fallback"


def test_missing_variable_is_an_error_naming_its_place() -> None:
    errors = config_errors('sources: {x: {path: /x, provider: svix, secrets: ["${NOPE}"]}}')
    assert len(errors) == 1
    assert errors[0].startswith("sources.x.secrets[0]: environment variable NOPE is not set")


@pytest.mark.parametrize(
    ("text", "place"),
    [('storage: {url: "${NOPE}"}', "storage.url"), ('listen: {port: "${NOPE}"}', "listen.port")],
)
def test_a_missing_variable_is_the_only_error_about_its_value(text: str, place: str) -> None:
    """The empty text left in its place is no sqlite:/// URL, nor a port: saying so would point away from
    the cause."""
    assert config_errors(text) == [f"{place}: environment variable NOPE is not set (and has no default)"]


def test_missing_variable_deep_in_a_route_names_the_with_key() -> None:
    text = """
routes:
  - {name: a, source: x, actions: [{use: forward}]}
  - name: b
    source: x
    actions: [{use: forward}, {use: forward, with: {url: "${APP_URL}/x"}}]
"""
    errors = config_errors(text)
    assert errors == [
        "routes[1].actions[1].with.url: environment variable APP_URL is not set (and has no default)"
    ]


def test_every_missing_variable_is_reported_with_the_shape_still_available() -> None:
    text = 'sources: {x: {path: /x, provider: svix, secrets: ["${ONE}", "${TWO:-ok}", "${THREE}"]}}'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    errors = caught.value.errors
    assert len(errors) == 2
    assert errors[0].startswith("sources.x.secrets[0]: environment variable ONE is not set")
    assert errors[1].startswith("sources.x.secrets[2]: environment variable THREE is not set")
    # Only interpolation failed: the whole validated config is attached for further checks.
    partial = caught.value.partial
    assert partial is not None and isinstance(partial.config, Config)
    assert partial.config.sources["x"].secrets == ["ok"]
    assert partial.unchecked_sources == frozenset()


def test_missing_variable_and_schema_errors_are_reported_together() -> None:
    text = 'sources: {x: {path: /x, provider: svix, secrets: ["${NOPE}"], bogus: 1}}'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    errors = caught.value.errors
    assert any(e.startswith("sources.x.secrets[0]: environment variable NOPE") for e in errors)
    assert "sources.x.bogus: unknown key" in errors
    # The source's shape is invalid: it is left out of what later checks see, but known to exist.
    partial = caught.value.partial
    assert partial is not None
    assert partial.config.sources == {}
    assert partial.unchecked_sources == {"x"}


def test_the_valid_parts_of_an_invalid_config_are_attached_with_their_places() -> None:
    text = """
listen: {bogus: 1}
ops: {port: 9100}
defaults: {timeout: 7s}
sources:
  good: {path: /good, provider: svix, secrets: [s]}
  bad: {path: no-slash, provider: svix, secrets: [s]}
routes:
  - {name: first, actions: [{use: forward}]}
  - {name: second, source: good, actions: [{use: forward}]}
  - {name: third, source: bad, actions: [{use: forward}], colour: blue}
  - {name: fourth, source: bad, actions: [{use: forward}]}
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    assert set(caught.value.errors) >= {
        "listen.bogus: unknown key",
        "sources.bad.path: path 'no-slash' must start with /",
        "routes[0].source: field required",
        "routes[2].colour: unknown key",
    }
    partial = caught.value.partial
    assert partial is not None
    # Invalid sections fall back to their defaults; valid ones are kept.
    assert partial.config.listen == Config().listen
    assert partial.config.ops.port == 9100
    assert partial.config.defaults.timeout == 7.0
    assert list(partial.config.sources) == ["good"]
    assert partial.unchecked_sources == {"bad"}
    assert [route.name for route in partial.config.routes] == ["second", "fourth"]
    assert partial.route_places == (1, 3)


@pytest.mark.parametrize("sources", ["[not, a, mapping]", "5"])
def test_routes_naming_sources_of_an_invalid_sources_section_are_unchecked(sources: str) -> None:
    text = f"sources: {sources}\nroutes: [{{name: r, source: s, actions: [{{use: forward}}]}}]\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    partial = caught.value.partial
    assert partial is not None
    assert partial.config.sources == {}
    assert partial.unchecked_sources == {"s"}
    assert partial.route_places == (0,)


# -- secrets ---------------------------------------------------------------------------------------------


def test_empty_and_blank_secrets_are_dropped() -> None:
    config = parse_config(one_source(secrets=["", "  ", "key-1", "\t", "key-2"]), environ={})
    assert config.sources["x"].secrets == ["key-1", "key-2"]


def test_unset_optional_secret_slots_are_dropped() -> None:
    text = 'sources: {x: {path: /x, provider: consignly, secrets: ["${A:-fallback}", "${B:-}", "${C:-}"]}}'
    assert parse_config(text, environ={}).sources["x"].secrets == ["fallback"]
    both = parse_config(text, environ={"B": "key-b"})
    assert both.sources["x"].secrets == ["fallback", "key-b"]


def test_source_defaults() -> None:
    source = parse_config(one_source(), environ={}).sources["x"]
    assert source.tolerance == 300.0
    assert source.insecure is False
    assert source.verify == "enforce"
    assert source.allow_ips == []
    assert source.options == {}


def test_source_path_must_be_absolute() -> None:
    assert config_errors(one_source(path="hooks/x")) == ["sources.x.path: path 'hooks/x' must start with /"]
    for path in ("/hooks/x?tenant=a", "/hooks/a%20b", "/hooks/x#top"):
        assert config_errors(one_source(path=path)) == [
            f"sources.x.path: path {path!r}: write it without ?, # or %-escapes"
        ]


# -- durations -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("0.5s", 0.5),
        (" 10 s ", 10.0),
        ("42", 42.0),
        (7, 7.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_durations(written: Any, seconds: float) -> None:
    assert parse_duration(written) == pytest.approx(seconds)
    config = parse_config(yaml.safe_dump({"delivery": {"shutdown_timeout": written}}), environ={})
    assert config.delivery.shutdown_timeout == pytest.approx(seconds)


def test_durations_in_lists_and_nested_places() -> None:
    text = """
defaults:
  retry: {schedule: [250ms, 5s, 2m, 1h]}
  timeout: 10s
sources: {x: {path: /x, provider: svix, secrets: [whsec_abc], tolerance: 5m}}
limits: {read_timeout: 1500ms}
routes: [{name: r, source: x, actions: [{use: forward, timeout: 3s}]}]
"""
    config = parse_config(text, environ={})
    assert config.defaults.retry.schedule == [0.25, 5.0, 120.0, 3600.0]
    assert config.defaults.timeout == 10.0
    assert config.sources["x"].tolerance == 300.0
    assert config.limits.read_timeout == 1.5
    assert config.routes[0].actions[0].timeout == 3.0


def test_duration_from_a_variable() -> None:
    config = parse_config('defaults: {timeout: "${TIMEOUT:-5s}"}', environ={"TIMEOUT": "2m"})
    assert config.defaults.timeout == 120.0


@pytest.mark.parametrize("written", ["5x", "soon", "", "5 s s", "1e3s", "s", "5sec", "-5s", "1,5s", "0x10"])
def test_bad_duration_strings_are_rejected_with_a_clear_message(written: str) -> None:
    with pytest.raises(ValueError, match=re.escape("is not a duration; use e.g. 500ms, 5s, 2m, 1h")):
        parse_duration(written)
    errors = config_errors(yaml.safe_dump({"defaults": {"timeout": written}}))
    assert errors == [
        f"defaults.timeout: {written!r} is not a duration; use e.g. 500ms, 5s, 2m, 1h or a number of seconds"
    ]


def test_negative_duration_number_is_rejected() -> None:
    assert config_errors(one_source(tolerance=-5)) == [
        "sources.x.tolerance: -5 is not a finite, non-negative duration"
    ]


@pytest.mark.parametrize(
    "where",
    [
        {"defaults": {"timeout": "{}"}},
        {"limits": {"read_timeout": "{}"}},
        {"limits": {"idle_timeout": "{}"}},
        {"delivery": {"lease": "{}"}},
        {"delivery": {"poll_interval": "{}"}},
        {"reload": {"interval": "{}"}},
        {"routes": [{"name": "r", "source": "x", "actions": [{"use": "forward", "timeout": "{}"}]}]},
    ],
    ids=["timeout", "read_timeout", "idle_timeout", "lease", "poll_interval", "reload", "action_timeout"],
)
@pytest.mark.parametrize("written", [0, "0s", "0ms"])
def test_timeouts_leases_and_intervals_must_be_longer_than_zero(where: dict[str, Any], written: Any) -> None:
    # Each of these expires at once when it is 0, every time: a lease of 0 made the engine claim, run and
    # claim again in a loop that took a whole core.
    text = yaml.safe_dump(where).replace("'{}'", json.dumps(written))
    errors = [error for error in config_errors(text) if "longer than 0" in error]
    assert len(errors) == 1 and errors[0].endswith(f"{written!r}: must be longer than 0"), errors


@pytest.mark.parametrize("written", [True, False, None, [5], {"s": 5}])
def test_non_scalar_and_boolean_durations_are_rejected(written: Any) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(written)


def test_boolean_duration_in_config_names_its_place() -> None:
    # In the words of the other boolean errors, not Python's `True is not a duration`.
    assert config_errors(one_source(tolerance=True)) == [
        "sources.x.tolerance: the boolean true (as YAML reads yes, no, on and off), not a duration"
    ]


def test_bad_duration_in_a_schedule_names_its_index() -> None:
    errors = config_errors("defaults: {retry: {schedule: [1s, soon, 2m]}}")
    assert errors == [
        "defaults.retry.schedule[1]: 'soon' is not a duration; use e.g. 500ms, 5s, 2m, 1h or a number of seconds"
    ]


def test_bad_action_timeout_names_its_place() -> None:
    errors = config_errors(one_route(timeout="5x", **{"with": {"url": "http://a"}}))
    assert errors == [
        "routes[0].actions[0].timeout: '5x' is not a duration; use e.g. 500ms, 5s, 2m, 1h or a number of seconds"
    ]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_durations_are_rejected(value: float) -> None:
    # With a NaN tolerance every `abs(now - timestamp) > tolerance` would be false: replay protection off.
    with pytest.raises(ValueError, match="is not a finite, non-negative duration"):
        parse_duration(value)


@pytest.mark.parametrize("written", [".nan", ".inf", "-.inf"])
def test_non_finite_durations_in_the_config_name_their_place(written: str) -> None:
    errors = config_errors(f"sources: {{x: {{path: /x, provider: svix, tolerance: {written}}}}}")
    assert len(errors) == 1
    assert errors[0].startswith("sources.x.tolerance: ")
    assert errors[0].endswith("is not a finite, non-negative duration")


# -- unknown keys and missing fields ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("bogus: 1", "bogus: unknown key"),
        # A typo names the key meant, in every section and at every depth (the alias `with` too).
        ("limts: {max_body_bytes: 10}", "limts: unknown key (did you mean limits?)"),
        ("listen: {host: 0.0.0.0, prot: 80}", "listen.prot: unknown key (did you mean port?)"),
        ("listen: {tls: {cert: c, key: k, chain: x}}", "listen.tls.chain: unknown key"),
        (
            "defaults: {retry: {schedul: [1s]}}",
            "defaults.retry.schedul: unknown key (did you mean schedule?)",
        ),
        (
            "sources: {x: {path: /x, provider: svix, secret: whsec_abc}}",
            "sources.x.secret: unknown key (did you mean secrets?)",
        ),
        (
            "routes: [{name: a, source: x, actions: [{use: forward}]},"
            " {name: b, source: x, actions: [{use: forward}, {use: forward, wiht: {}}]}]",
            "routes[1].actions[1].wiht: unknown key (did you mean with?)",
        ),
        (
            "routes: [{name: a, source: x, event: [a], actions: [{use: forward}]}]",
            "routes[0].event: unknown key (did you mean events?)",
        ),
        (
            "routes: [{name: a, source: x, actions: [{use: forward, retry: {retry_onn: [500]}}]}]",
            "routes[0].actions[0].retry.retry_onn: unknown key (did you mean retry_on?)",
        ),
        ("delivery: {retries: 3}", "delivery.retries: unknown key"),
    ],
)
def test_unknown_keys_are_rejected_at_their_place(text: str, error: str) -> None:
    assert config_errors(text) == [error]


def test_an_unknown_key_under_a_bare_typing_mapping_is_reported_without_a_guess() -> None:
    # A plugin's Options typed with a bare Dict (no arguments) in a union: looking for the keys to suggest
    # raised IndexError, and `check` and a reload showed that instead of the config's own error.
    from typing import Dict  # noqa: UP035 - as a plugin may write it

    from pydantic import BaseModel, ConfigDict, ValidationError

    from gateway.config import format_validation_errors

    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        limit: int = 0

    class Options(BaseModel):
        x: Dict | list[Inner]  # noqa: UP006

    with pytest.raises(ValidationError) as caught:
        Options.model_validate({"x": [{"limt": 1}]})
    errors = format_validation_errors(caught.value, ("with",), Options)
    assert any(error.startswith("with.x") and "unknown key" in error for error in errors), errors


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "routes: [{name: a, source: x, actions: [{use: forward}]}, {name: b, source: x, actions: [{id: y}]}]",
            "routes[1].actions[0].use: field required",
        ),
        ("routes: [{source: x, actions: [{use: forward}]}]", "routes[0].name: field required"),
        ("routes: [{name: a, actions: [{use: forward}]}]", "routes[0].source: field required"),
        ("routes: [{name: a, source: x}]", "routes[0].actions: field required"),
        ("sources: {x: {provider: svix}}", "sources.x.path: field required"),
        ("sources: {x: {path: /x}}", "sources.x.provider: field required"),
        ("listen: {tls: {cert: c}}", "listen.tls.key: field required"),
    ],
)
def test_missing_fields_are_reported_as_field_required(text: str, error: str) -> None:
    assert config_errors(text) == [error]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        # pydantic said `Input should be a valid integer, unable to parse string as an integer`.
        ("listen: {port: eighty}", "listen.port: must be an integer; the text given does not read as one"),
        ("listen: {port: [8080]}", "listen.port: must be an integer, not a list"),
        (
            "limits: {max_headers: 1.5}",
            "limits.max_headers: must be an integer, not a number with a fraction",
        ),
        (
            "defaults: {retry: {jitter: lots}}",
            "defaults.retry.jitter: must be a number; the text given does not read as one",
        ),
        (
            "reload: {watch: maybe}",
            "reload.watch: must be true or false; the text given does not read as either",
        ),
        ("reload: {watch: {a: 1}}", "reload.watch: must be true or false, not a mapping"),
    ],
)
def test_a_value_of_the_wrong_kind_says_which_kind_the_key_takes(text: str, error: str) -> None:
    assert config_errors(text) == [error]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("routes: [x]", "routes[0]: must be a mapping (key: value), not text"),
        ("listen:", "listen: must be a mapping (key: value), not empty"),
        ("sources: [x]", "sources: must be a mapping (key: value), not a list"),
        ("defaults: {retry: {schedule: 5s}}", "defaults.retry.schedule: must be a list, not text"),
        # The value is not shown: it may be a secret.
        (one_source(secrets="s3cret"), "sources.x.secrets: must be a list, not text"),
    ],
)
def test_a_value_of_the_wrong_shape_says_what_is_expected(text: str, error: str) -> None:
    # pydantic said `routes[0]: Input should be a valid dictionary or instance of Route`: a class of the code.
    assert config_errors(text) == [error]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "defaults: {retry: {retry_on: [5XX]}}",
            "defaults.retry.retry_on[0]: must be an integer, '5xx' or '4xx'",
        ),
        (
            "routes: [{name: r, source: x, events: [1.5], actions: [{use: forward}]}]",
            "routes[0].events[0]: must be text or an integer, not a number",
        ),
        (
            "routes: [{name: r, source: x, events: [{a: 1}], actions: [{use: forward}]}]",
            "routes[0].events[0]: must be text or an integer, not a mapping",
        ),
    ],
)
def test_a_value_that_is_none_of_the_kinds_a_key_takes_is_one_error(text: str, error: str) -> None:
    # pydantic says it once per kind: `retry_on[0]: Input should be a valid integer, unable to parse string as
    # an integer`, then `retry_on[0]: Input should be '5xx' or '4xx'`, each line wrong on its own.
    assert config_errors(text) == [error]


def test_a_route_needs_at_least_one_action() -> None:
    errors = config_errors("routes: [{name: a, source: x, actions: []}]")
    assert len(errors) == 1
    assert errors[0].startswith("routes[0].actions: ")


def test_every_problem_is_reported_at_once() -> None:
    text = """
bogus: 1
listen: {port: 70000}
sources: {x: {provider: svix}}
routes: [{name: a, source: x, actions: [{with: {}}]}]
"""
    errors = config_errors(text)
    assert "bogus: unknown key" in errors
    assert "sources.x.path: field required" in errors
    assert "routes[0].actions[0].use: field required" in errors
    assert any(error.startswith("listen.port: ") for error in errors)
    assert len(errors) == 4


def test_errors_come_in_the_order_of_the_file() -> None:
    # pydantic reports a mapping's fields in the order the model declares them, unknown keys last, and
    # ${VAR} errors came before all of those: a long list did not follow the file a reader walks down.
    text = """
sources:
  x:
    verify: sometimes
    tolerance: 0s
    zzz: 1
    secrets: ["${NOPE}"]
    path: relative
routes:
  - actions: [{use: forward, concurrency: 0, with: {}, timeout: never}]
    name: a
    source: x
    bogus: 1
"""
    assert [error.partition(": ")[0] for error in config_errors(text)] == [
        "sources.x.verify",
        "sources.x.tolerance",
        "sources.x.zzz",
        "sources.x.secrets[0]",
        "sources.x.path",
        # A key that is missing is not in the file: after those that are, of its mapping.
        "sources.x.provider",
        "routes[0].actions[0].concurrency",
        "routes[0].actions[0].timeout",
        "routes[0].bogus",
    ]


def test_format_location() -> None:
    assert format_location(("routes", 1, "actions", 0, "with_", "url")) == "routes[1].actions[0].with.url"
    assert format_location(("sources", "x", "secrets", 0)) == "sources.x.secrets[0]"
    assert format_location(()) == ""


# -- YAML and the top level ------------------------------------------------------------------------------


def test_invalid_yaml_is_an_error_naming_the_origin() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("sources: {x: [", environ={}, origin="conf/routes.yaml")
    assert len(caught.value.errors) == 1
    assert caught.value.errors[0].startswith("conf/routes.yaml: not valid YAML: ")


@pytest.mark.parametrize(
    ("text", "place"),
    [
        ("listen:\n\tport: 8080\n", "line 2, column 1"),  # indented with a tab
        ("listen:\n  port: 8080\n  \thost: 0.0.0.0\n", "line 3, column 3"),  # a tab after spaces
        ("listen:\n  port:\t8080\n", "line 2, column 8"),  # a tab after the colon
    ],
)
def test_a_tab_where_yaml_takes_spaces_is_named_as_a_tab(text: str, place: str) -> None:
    # PyYAML said `found character '\t' that cannot start any token`, of a character most editors hide.
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={}, origin="routes.yaml")
    assert caught.value.errors == [
        f"routes.yaml: not valid YAML: {place}: a tab, where YAML takes only spaces (to indent, and after a "
        "key's colon): replace it with spaces"
    ]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string", "42"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    assert caught.value.errors == ["<config>: the top level must be a mapping"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_file_is_the_default_config(text: str) -> None:
    config = parse_config(text, environ={})
    assert config == Config()
    assert config.listen.port == 8080
    assert config.ops.port == 9000
    assert config.defaults.timeout == 30.0
    assert config.defaults.retry.schedule == [5.0, 30.0, 120.0, 600.0, 3600.0]
    assert config.sources == {}
    assert config.routes == []


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text('sources: {x: {path: /x, provider: svix, secrets: ["${S}"]}}\n', encoding="utf-8")
    config = load_config(path, environ={"S": "whsec_abc"})
    assert config.sources["x"].secrets == ["whsec_abc"]


def test_load_config_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("routes: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.errors[0].startswith(f"{path}: not valid YAML")


def test_load_config_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert len(caught.value.errors) == 1
    assert caught.value.errors[0].startswith(f"{path}: cannot read: ")


def test_the_repo_routes_yaml_loads() -> None:
    config = load_config(REPO_ROUTES, environ={})
    assert set(config.sources) == {"consignease", "consignly"}
    assert config.sources["consignly"].secrets == ["demo-client-secret"]
    assert config.defaults.retry.schedule == [5.0, 30.0, 120.0, 600.0, 3600.0]
    assert config.routes[1].events == ["ConsignmentCreated", 112, "consignment.status_updated"]


# -- JSON Schema -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_json_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "Hookyard routes.yaml"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_json_schema_accepts_the_repo_routes_yaml(validator: jsonschema.Draft202012Validator) -> None:
    document = yaml.safe_load(REPO_ROUTES.read_text(encoding="utf-8"))
    assert list(validator.iter_errors(document)) == []


def test_json_schema_rejects_an_unknown_top_level_key(validator: jsonschema.Draft202012Validator) -> None:
    document = yaml.safe_load(REPO_ROUTES.read_text(encoding="utf-8"))
    document["bogus"] = 1
    errors = list(validator.iter_errors(document))
    assert len(errors) == 1
    assert "bogus" in errors[0].message


def test_json_schema_uses_the_with_alias(validator: jsonschema.Draft202012Validator) -> None:
    route = {"name": "r", "source": "x", "actions": [{"use": "forward", "with": {"url": "http://a"}}]}
    assert validator.is_valid({"routes": [route]})
    misspelt = {"name": "r", "source": "x", "actions": [{"use": "forward", "with_": {"url": "http://a"}}]}
    assert not validator.is_valid({"routes": [misspelt]})


@pytest.mark.parametrize(
    ("tolerance", "valid"), [("5m", True), ("250ms", True), (30, True), ("5x", False), (-1, False)]
)
def test_json_schema_checks_durations(
    validator: jsonschema.Draft202012Validator, tolerance: Any, valid: bool
) -> None:
    document = {"sources": {"x": {"path": "/x", "provider": "svix", "tolerance": tolerance}}}
    assert validator.is_valid(document) is valid


def test_json_schema_requires_route_fields(validator: jsonschema.Draft202012Validator) -> None:
    assert not validator.is_valid({"routes": [{"name": "r", "actions": [{"use": "forward"}]}]})
    assert not validator.is_valid({"routes": [{"name": "r", "source": "x", "actions": [{"id": "a"}]}]})


TWO_SOURCES_ONE_NAME = """
sources:
  consignease: {path: /webhooks/a, provider: svix, secrets: [whsec_abc]}
  consignease: {path: /webhooks/b, provider: svix, secrets: [whsec_abc]}
"""


def test_a_duplicate_key_is_refused_with_its_line() -> None:
    # YAML keys are unique; PyYAML would keep the last one without a word.
    with pytest.raises(ConfigError) as caught:
        parse_config(TWO_SOURCES_ONE_NAME, origin="routes.yaml")
    [error] = caught.value.errors
    assert error.startswith("routes.yaml: not valid YAML")
    assert "duplicate key 'consignease'" in error and "line 4" in error


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (
            "!!binary d2hzZWNfYWJj",
            "the tag !!binary makes bytes, which no setting takes: write the text it encodes",
        ),
        (
            "!!timestamp 2026-01-01",
            "the tag !!timestamp makes a date, which no setting takes: write the date as quoted text",
        ),
        ("!!set {a, b}", "the tag !!set makes a set, which no setting takes: write a list"),
        ("!!omap [a: 1]", "the tag !!omap makes a list of pairs, which no setting takes: write a mapping"),
        ("!!pairs [a: 1]", "the tag !!pairs makes a list of pairs, which no setting takes: write a mapping"),
    ],
)
@pytest.mark.parametrize(
    "place", ["secrets: [{value}]", "secrets: [whsec_abc], options: {{region: {value}}}"]
)
def test_a_tag_that_makes_what_no_setting_takes_is_refused_with_its_line(
    value: str, said: str, place: str
) -> None:
    # PyYAML made them all: a !!binary secret was taken as the text it decodes to, a !!set as a list in no
    # order, and in a plugin's options (which are not checked until the plugin reads them) anything went.
    text = (
        f"listen: {{port: 8080}}\nsources:\n  s: {{path: /w, provider: svix, {place.format(value=value)}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={}, origin="routes.yaml")
    column = text.splitlines()[2].index("!!") + 1
    assert caught.value.errors == [f"routes.yaml: not valid YAML: line 3, column {column}: {said}"]


def test_the_tags_that_make_text_numbers_and_collections_are_taken() -> None:
    text = "listen: {port: !!int '8080'}\nsources:\n  s: {path: !!str /w, provider: svix, secrets: !!seq [whsec_abc]}\n"
    config = parse_config(text, environ={})
    assert (config.listen.port, config.sources["s"].path, config.sources["s"].secrets) == (
        8080,
        "/w",
        ["whsec_abc"],
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            TWO_SOURCES_ONE_NAME,
            "duplicate key 'consignease' (first written at line 3, column 3)",
        ),
        ("sources:\n  x: {path: /x\n", "line 3, column 1: "),
        ("listen: {port: 1}\nroutes: [\n", "line 3, column 1: "),
        ("a: b: c\n", "line 1, column 5: mapping values are not allowed here"),
        ('a: "x\\q"\n', "line 1, column 7: found unknown escape character 'q'"),
        ("a: 1\nb: [1,\n  \x00]\n", "line 3, column 3: character #x0000 is not allowed in YAML"),
    ],
)
def test_invalid_yaml_is_one_line_naming_the_line_and_column(text: str, expected: str) -> None:
    # `hookyard check` prints one error a line; PyYAML's own text spans several, quotes the file's lines
    # and names the file `<unicode string>`.
    with pytest.raises(ConfigError) as caught:
        parse_config(text, origin="routes.yaml")
    [error] = caught.value.errors
    assert error.startswith("routes.yaml: not valid YAML: line ")
    assert expected in error
    assert "\n" not in error and "unicode string" not in error


def test_merge_keys_may_still_be_overridden() -> None:
    config = parse_config(
        """
sources:
  a: &base {path: /webhooks/a, provider: svix, secrets: [whsec_abc]}
  b:
    <<: *base
    path: /webhooks/b
"""
    )
    assert config.sources["b"].path == "/webhooks/b"


@pytest.mark.parametrize(
    ("listen", "ops", "refused"),
    [
        ({"port": 9000}, {"port": 9000}, True),  # 0.0.0.0 holds 127.0.0.1:9000 too
        ({"port": 8080, "host": "127.0.0.1"}, {"port": 8080, "host": "0.0.0.0", "admin_token": "t"}, True),
        ({"port": 9000, "host": "127.0.0.1"}, {"port": 9000, "host": "127.0.0.2"}, False),
        ({"port": 0}, {"port": 0}, False),  # each gets a free port
        # localhost is 127.0.0.1 and ::1, and an address may be written in other ways: `serve` could bind
        # only one of the two.
        ({"port": 9000, "host": "127.0.0.1"}, {"port": 9000, "host": "localhost"}, True),
        ({"port": 9000, "host": "::1"}, {"port": 9000, "host": "localhost"}, True),
        ({"port": 9000, "host": "::1"}, {"port": 9000, "host": "0:0:0:0:0:0:0:1"}, True),
        ({"port": 9000, "host": "::1"}, {"port": 9000, "host": "127.0.0.1"}, False),
        ({"port": 9000, "host": "0:0:0:0:0:0:0:0"}, {"port": 9000, "host": "::1"}, True),
    ],
)
def test_listen_and_ops_cannot_share_a_port(
    listen: dict[str, Any], ops: dict[str, Any], refused: bool
) -> None:
    text = yaml.safe_dump({"listen": listen, "ops": ops})
    if not refused:
        parse_config(text)
        return
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    # Named at ops.port, as every error names its place: it said `listen and ops both use ...` on its own.
    assert caught.value.errors == [
        f"ops.port: listen and ops both use port {listen['port']} on {listen.get('host', '0.0.0.0')} and "
        f"{ops.get('host', '127.0.0.1')}: give ops another port"
    ]


def test_a_value_that_yaml_reads_as_no_text_says_so() -> None:
    # pydantic said `Input should be a valid string`. The value is not shown: it may be a secret.
    text = "listen: {host: 127}\nsources: {x: {path: /a, provider: svix, secrets: [12345, 2026-01-01, off]}}"
    assert config_errors(text) == [
        "listen.host: a number, not text: quote it",
        "sources.x.secrets[0]: a number, not text: quote it",
        "sources.x.secrets[1]: a date, not text: quote it",
        "sources.x.secrets[2]: the boolean false (as YAML reads yes, no, on and off), not text: quote it",
    ]


@pytest.mark.parametrize(
    ("name", "read_as"),
    [
        ("no", "the boolean false (as YAML reads yes, no, on and off)"),
        ("on", "the boolean true (as YAML reads yes, no, on and off)"),
        ("123", "the number 123"),
        ("2026-01-01", "a date (2026-01-01)"),
        ("~", "null (~, null, or nothing before the colon)"),
    ],
)
def test_a_source_name_that_yaml_reads_as_no_text_says_so(name: str, read_as: str) -> None:
    # pydantic said `sources[0].[key]: Input should be a valid string` for `no:`.
    assert config_errors(f"sources: {{{name}: {{path: /a, provider: none, insecure: true}}}}") == [
        f"sources: a name that YAML reads as {read_as}, not text: quote it"
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "listen: {on: 8080}",
            "listen: a name that YAML reads as the boolean true (as YAML reads yes, no, on and off), "
            "not text: quote it",
        ),
        ("listen: {1: 2}", "listen: a name that YAML reads as the number 1, not text: quote it"),
        ("1: x", "a name that YAML reads as the number 1, not text: quote it"),
        ("~: x", "a name that YAML reads as null (~, null, or nothing before the colon), not text: quote it"),
    ],
)
def test_a_key_of_a_section_that_yaml_reads_as_no_text_says_so(text: str, error: str) -> None:
    # pydantic said `listen[1]: Keys should be strings`: the key as an index, in its words.
    assert config_errors(text) == [error]


def test_y_and_n_are_text_to_yaml_not_booleans() -> None:
    # The message above said YAML reads y and n as booleans too: PyYAML (YAML 1.1 as it implements it) does not.
    config = parse_config(
        "sources: {y: {path: /y, provider: none, insecure: true}, n: {path: /n, provider: none, insecure: true}}"
    )
    assert list(config.sources) == ["y", "n"]


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_source_or_route_name_is_refused(name: str) -> None:
    # Both were taken; a source named "" counted its requests under `source=""`, the label of unknown paths.
    source = yaml.safe_dump({"sources": {name: {"path": "/a", "provider": "none", "insecure": True}}})
    assert config_errors(source) == ["sources: a source name is empty: give each source a name"]
    route = yaml.safe_dump({"routes": [{"name": name, "source": "x", "actions": [{"use": "forward"}]}]})
    assert config_errors(route) == ["routes[0].name: is empty: give the route a name"]


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_action_id_is_refused(name: str) -> None:
    # `id: ""` was taken as no id: the action was keyed by its `use` name without a word, which a later
    # `after:` or `replay --action` naming what was meant would not find.
    route = {"name": "r", "source": "x", "actions": [{"use": "store"}, {"id": name, "use": "forward"}]}
    assert config_errors(yaml.safe_dump({"routes": [route]})) == [
        "routes[0].actions[1].id: is empty: give the action an id, or leave id out to key it by its use"
    ]


def test_a_retry_on_status_no_failed_attempt_answers_is_refused() -> None:
    # 200 is delivered before retry_on is read, and 5003 is no status: both were taken, and never matched.
    text = "defaults: {retry: {retry_on: [429, 5003, 200, '5xx']}}"
    assert config_errors(text) == [
        "defaults.retry.retry_on[1]: 5003: not a status an attempt fails with; give 300 to 599, '4xx' or '5xx'",
        "defaults.retry.retry_on[2]: 200: not a status an attempt fails with; give 300 to 599, '4xx' or '5xx'",
    ]
    assert parse_config("defaults: {retry: {retry_on: [307, 599, '4xx']}}").defaults.retry.retry_on == [
        307,
        599,
        "4xx",
    ]


@pytest.mark.parametrize("place", ["defaults.retry", "routes[0].actions[0].retry"])
def test_a_word_in_retry_on_does_not_hide_a_status_out_of_range(place: str) -> None:
    # 600 was reported only once 5XY was fixed: a wrong word kept the range of the others from being read.
    retry = {"retry_on": ["5XY", 600, 503, "on"]}
    text = (
        one_route(retry=retry)
        if place.startswith("routes")
        else yaml.safe_dump({"defaults": {"retry": retry}})
    )
    assert config_errors(text) == [
        f"{place}.retry_on[0]: must be an integer, '5xx' or '4xx'",
        f"{place}.retry_on[1]: 600: not a status an attempt fails with; give 300 to 599, '4xx' or '5xx'",
        f"{place}.retry_on[3]: must be an integer, '5xx' or '4xx'",
    ]


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite:////", "sqlite:///./var/", "sqlite:///./var/.."])
def test_a_storage_url_without_a_file_is_refused(url: str) -> None:
    # `serve` and `events list` failed on it with a traceback (or `cannot open /`) after `check` said ok.
    assert config_errors(f"storage: {{url: {url!r}}}") == [
        f"storage.url: {url!r} names no file: sqlite:///relative/path.db or sqlite:////absolute/path.db"
    ]


def test_a_storage_url_s_scheme_is_read_in_any_case() -> None:
    # As the store action's url is: a URL's scheme is not case-sensitive.
    assert parse_config('storage: {url: "SQLITE:///./var/hy.db"}').storage.url == "SQLITE:///./var/hy.db"


def test_a_storage_url_with_a_control_character_is_refused() -> None:
    # It named a file with a tab in it: a YAML escape ("\t") where a path was meant.
    assert config_errors(r'storage: {url: "sqlite:///./var/hook\tyard.db"}') == [
        "storage.url: a tab ('\\t') at character 21: a URL cannot hold a control character"
    ]


def test_storage_retention_is_seven_days_unless_given() -> None:
    assert parse_config("").storage.retention == 7 * 86400
    assert parse_config("storage: {retention: 30d}").storage.retention == 30 * 86400
    assert parse_config("storage: {retention: 90}").storage.retention == 90


@pytest.mark.parametrize(
    ("text", "environ"),
    [
        ("storage: {retention: off}", {}),  # YAML reads off (no, false) as a boolean
        ("storage: {retention: false}", {}),
        ('storage: {retention: "off"}', {}),
        ('storage: {retention: "${RETENTION}"}', {"RETENTION": "off"}),
    ],
)
def test_storage_retention_off_keeps_every_event(text: str, environ: dict[str, str]) -> None:
    assert parse_config(text, environ=environ).storage.retention is None


@pytest.mark.parametrize(
    ("written", "error"),
    [
        ("0", "0 would delete events as soon as their deliveries end; give a duration such as 7d, or off"),
        (
            "0s",
            "'0s' would delete events as soon as their deliveries end; give a duration such as 7d, or off",
        ),
        (
            "on",
            "the boolean true (as YAML reads yes, no, on and off), not a duration; give one such as 7d, or "
            "off to keep every event",
        ),
        # YAML's null (`retention:` with nothing after it), not Python's None.
        ("null", "empty (null), not a duration; use e.g. 500ms, 5s, 2m, 1h or a number of seconds"),
        ("7 days", "'7 days' is not a duration; use e.g. 500ms, 5s, 2m, 1h or a number of seconds"),
    ],
)
def test_a_storage_retention_that_is_no_duration_or_0_is_refused(written: str, error: str) -> None:
    [refused] = config_errors(f"storage: {{retention: {written}}}")
    assert refused.startswith(f"storage.retention: {error}"), refused


@pytest.mark.parametrize(("section", "key"), [("storage", "retention"), ("delivery", "lease")])
def test_a_duration_too_large_for_a_float_is_refused_naming_its_key(section: str, key: str) -> None:
    # YAML reads 310 digits as one integer, past the largest float: float() raises OverflowError.
    huge = 10**309
    [refused] = config_errors(f"{section}: {{{key}: {huge}}}")
    assert refused == f"{section}.{key}: {huge} is not a finite, non-negative duration", refused


@pytest.mark.parametrize(
    ("retention", "valid"),
    [
        ("7d", True),
        (3600, True),
        ("1ms", True),  # the shortest it takes
        (False, True),
        ("off", True),
        (0, False),
        # Written as text, 0 is refused when the config loads, as the number is: an editor says so too.
        ("0s", False),
        ("0.000ms", False),
        ("00", False),
    ],
)
def test_json_schema_checks_storage_retention(
    validator: jsonschema.Draft202012Validator, retention: Any, valid: bool
) -> None:
    assert validator.is_valid({"storage": {"retention": retention}}) is valid


@pytest.mark.parametrize(("lease", "valid"), [("1ms", True), ("0.5s", True), (0, False), ("0s", False)])
def test_json_schema_refuses_0_for_a_duration_that_must_be_longer(
    validator: jsonschema.Draft202012Validator, lease: Any, valid: bool
) -> None:
    # What the config refuses when it loads, as a lease of 0 would expire at once, every time.
    text = f"delivery: {{lease: {lease}}}"
    if valid:
        parse_config(text)
    else:
        assert config_errors(text)
    assert validator.is_valid({"delivery": {"lease": lease}}) is valid


@pytest.mark.parametrize("secret", ["whsec_abc\n", " whsec_abc", "whsec_abc\t"])
def test_a_secret_with_whitespace_at_either_end_is_refused_without_showing_it(secret: str) -> None:
    # Read from a file with its newline, it would make every webhook invalid_signature without a word.
    # Each such entry is named by its index on a line of its own, as every other error in a list is.
    secrets = ["", secret, "whsec_ok", f"{secret} "]
    text = yaml.safe_dump({"sources": {"a": {"path": "/a", "provider": "svix", "secrets": secrets}}})
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.errors == [
        f"sources.a.secrets[{index}]: begins or ends with whitespace, such as a newline kept from a file: remove it"
        for index in (1, 3)
    ]
    assert not any("whsec_abc" in error for error in caught.value.errors)


@pytest.mark.parametrize(
    ("token", "refused"),
    [
        # From a Secret's file with its newline, the admin API would answer every call 401 without a word.
        *(
            (token, "begins or ends with whitespace, such as a newline kept from a file: remove it")
            for token in ("admin-token\n", " admin-token", "admin-token\t")
        ),
        # Two lines of a file: no client can send it in a header (httpx refuses a line break, and the ops
        # listener any other control character), so every call would be 401.
        *(
            (
                token,
                "holds a line break or another control character, which no request header can carry: remove it",
            )
            for token in ("admin\ntoken", "admin\r\ntoken", "admin\x01token")
        ),
    ],
)
def test_an_admin_token_no_header_can_carry_is_refused_without_showing_it(token: str, refused: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('ops: {admin_token: "${TOKEN}"}', environ={"TOKEN": token})
    assert caught.value.errors == [f"ops.admin_token: {refused}"]


def test_a_yaml_alias_inside_what_it_names_is_a_config_error_not_a_recursion_error() -> None:
    assert config_errors("sources: &s\n  x: *s\n") == [
        "<config>: a YAML alias is used inside what it names: the config never ends"
    ]


def test_yaml_aliases_that_expand_past_the_limit_are_refused_before_anything_walks_them() -> None:
    # Nine levels, each nine aliases of the one before: 387 million values from a few hundred bytes.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 9)]
    text = "\n".join(levels) + "\nsources: {}\n"
    started = time.monotonic()
    assert config_errors(text) == ["<config>: more than 100,000 values once its YAML aliases are expanded"]
    assert time.monotonic() - started < 5  # refused at once, not after walking them
