"""Compiling a config into a RouteTable with the built-in plugins: event matching (globs, Consignly codes and
names), filters, planned actions with their defaults, and every error, collected at once with its place."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, model_validator

from gateway import Action, hookimpl
from gateway.config import ConfigError, load_config, parse_config
from gateway.events import Event
from gateway.http_client import shown_url, shown_url_with_path
from gateway.plugins import Registry, new_plugin_manager
from gateway.routing import PlannedAction, RouteTable
from plugins.consignly import ConsignlyProvider
from plugins.insecure import NoVerification
from plugins.svix import SvixProvider
from tests.support import CONSIGNLY_SECRETS, SVIX_SECRET

REPO_ROUTES = Path(__file__).resolve().parent.parent / "routes.yaml"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.collect(new_plugin_manager(load_entry_points=False))


def base_config(routes: list[dict[str, Any]] | None = None, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "sources": {
            "consignease": {"path": "/webhooks/consignease", "provider": "svix", "secrets": [SVIX_SECRET]},
            "consignly": {
                "path": "/webhooks/consignly",
                "provider": "consignly",
                "secrets": CONSIGNLY_SECRETS,
            },
        },
        "routes": routes if routes is not None else [],
    }
    config.update(overrides)
    return config


def forward(url: str = "http://127.0.0.1:3000/hooks", **fields: Any) -> dict[str, Any]:
    return {"use": "forward", "with": {"url": url}, **fields}


def route(name: str, source: str, *actions: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": name, "source": source, "actions": list(actions) or [forward(id="app")], **fields}


def build(registry: Registry, config: dict[str, Any]) -> RouteTable:
    return RouteTable.build(parse_config(yaml.safe_dump(config), environ={}), registry)


def build_errors(registry: Registry, config: dict[str, Any]) -> list[str]:
    parsed = parse_config(yaml.safe_dump(config), environ={})
    with pytest.raises(ConfigError) as caught:
        RouteTable.build(parsed, registry)
    assert caught.value.errors
    return caught.value.errors


def make_event(source: str, event_type: str, data: dict[str, Any] | None = None) -> Event:
    return Event(
        source=source,
        id="evt_1",
        type=event_type,
        received_at=0.0,
        body=b"{}",
        payload={"id": "evt_1", "type": event_type, "data": data or {}},
    )


def matched(table: RouteTable, source: str, event_type: str, data: dict[str, Any] | None = None) -> list[str]:
    return [compiled.name for compiled in table.match(make_event(source, event_type, data))]


# -- endpoints ---------------------------------------------------------------------------------------


def test_the_repo_routes_yaml_builds(registry: Registry) -> None:
    table = RouteTable.build(load_config(REPO_ROUTES, environ={}), registry)
    assert set(table.endpoints) == {"/webhooks/consignease", "/webhooks/consignly"}
    assert isinstance(table.endpoints["/webhooks/consignease"].provider, SvixProvider)
    assert isinstance(table.endpoints["/webhooks/consignly"].provider, ConsignlyProvider)
    assert matched(table, "consignease", "user.created") == ["users"]
    assert matched(table, "consignly", "consignment.created", {"status": 1}) == ["consignments"]
    assert matched(table, "consignly", "consignment.tracking_updated", {"status": 2}) == ["consignments"]
    assert matched(table, "consignly", "consignment.status_updated", {"status": 2}) == ["consignments"]
    assert matched(table, "consignly", "consignment.created", {"status": 3}) == []
    assert matched(table, "consignly", "consignment.deleted", {"status": 1}) == []
    # Its dependent actions: `when` defaults to always once `after` is given.
    assert table.actions[("consignments", "app")].when is None
    assert table.actions[("consignments", "ack")].after == "app"
    assert table.actions[("consignments", "ack")].when == "always"
    assert table.actions[("consignments", "alert")].when == "failure"


def test_endpoints_are_keyed_by_path(registry: Registry) -> None:
    table = build(registry, base_config())
    endpoint = table.endpoints["/webhooks/consignly"]
    assert endpoint.name == "consignly"
    assert endpoint.path == "/webhooks/consignly"
    assert isinstance(endpoint.provider, ConsignlyProvider)
    assert endpoint.provider.source_name == "consignly"
    assert endpoint.insecure is False
    assert endpoint.log_only is False
    assert endpoint.allow == ()


def test_log_only_and_allow_ips_reach_the_endpoint(registry: Registry) -> None:
    config = base_config()
    config["sources"]["consignly"].update(verify="log-only", allow_ips=["10.0.0.0/8", "127.0.0.1"])
    endpoint = build(registry, config).endpoints["/webhooks/consignly"]
    assert endpoint.log_only is True
    assert len(endpoint.allow) == 2


def test_a_config_without_sources_builds_empty(registry: Registry) -> None:
    table = build(registry, {})
    assert table.endpoints == {}
    assert table.routes == {}
    assert table.match(make_event("x", "y")) == []


# -- event matching ----------------------------------------------------------------------------------


def test_glob_patterns(registry: Registry) -> None:
    table = build(registry, base_config([route("users", "consignease", events=["user.*"])]))
    assert matched(table, "consignease", "user.created") == ["users"]
    assert matched(table, "consignease", "user.email.updated") == ["users"]
    assert matched(table, "consignease", "organization.created") == []
    assert matched(table, "consignease", "user") == []
    assert matched(table, "consignease", "User.created") == []
    assert matched(table, "consignease", "superuser.created") == []


def test_question_mark_and_character_class_globs(registry: Registry) -> None:
    table = build(
        registry,
        base_config([route("r", "consignease", events=["v?.ping", "[ab].created", "[!x]y.z"])]),
    )
    assert matched(table, "consignease", "v1.ping") == ["r"]
    assert matched(table, "consignease", "v10.ping") == []
    assert matched(table, "consignease", "a.created") == ["r"]
    assert matched(table, "consignease", "c.created") == []
    assert matched(table, "consignease", "ay.z") == ["r"]
    assert matched(table, "consignease", "xy.z") == []


def test_exact_names_match_exactly(registry: Registry) -> None:
    table = build(registry, base_config([route("r", "consignease", events=["user.created"])]))
    assert matched(table, "consignease", "user.created") == ["r"]
    assert matched(table, "consignease", "user.created.extra") == []
    assert matched(table, "consignease", "xuser.created") == []


def test_an_empty_events_list_is_an_error_not_match_everything() -> None:
    # In the config's words, not pydantic's `List should have at least 1 item after validation, not 0`.
    with pytest.raises(ConfigError) as error:
        parse_config("routes: [{name: r, source: s, events: [], actions: [{use: forward}]}]")
    assert error.value.errors == [
        "routes[0].events: an empty list matches no event: leave events out to match every event, "
        "or list the types to match"
    ]


def test_a_route_with_an_empty_actions_list_is_told_to_give_one() -> None:
    # In the config's words, not pydantic's `List should have at least 1 item after validation, not 0`.
    with pytest.raises(ConfigError) as error:
        parse_config("routes: [{name: r, source: s, actions: []}]")
    assert error.value.errors == ["routes[0].actions: an empty list: give at least one"]


@pytest.mark.parametrize("events", [None, ["*"], ["user.created", "*"]])
def test_every_event_matches_by_default_or_star(registry: Registry, events: list[str] | None) -> None:
    fields = {} if events is None else {"events": events}
    table = build(registry, base_config([route("all", "consignly", **fields)]))
    assert matched(table, "consignly", "consignment.created") == ["all"]
    assert matched(table, "consignly", "anything.at_all") == ["all"]


def test_consignly_codes_and_names_map_to_dotted_types(registry: Registry) -> None:
    table = build(registry, base_config([route("c", "consignly", events=[112, "ConsignmentCreated"])]))
    assert matched(table, "consignly", "consignment.tracking_updated") == ["c"]
    assert matched(table, "consignly", "consignment.created") == ["c"]
    assert matched(table, "consignly", "consignment.updated") == []
    # The catalog is applied to the route's patterns, not to event types at match time.
    assert matched(table, "consignly", "ConsignmentCreated") == []
    assert matched(table, "consignly", "112") == []


def test_consignly_code_as_a_string_and_dotted_types(registry: Registry) -> None:
    table = build(
        registry, base_config([route("c", "consignly", events=["101", "consignment.status_updated", 304, 0])])
    )
    assert matched(table, "consignly", "consignment.created") == ["c"]
    assert matched(table, "consignly", "consignment.status_updated") == ["c"]
    assert matched(table, "consignly", "job.connection_action_manual_trigger") == ["c"]
    assert matched(table, "consignly", "webhook.test") == ["c"]


def test_consignly_globs_skip_the_catalog(registry: Registry) -> None:
    table = build(registry, base_config([route("c", "consignly", events=["consignment.*", "Manifest*"])]))
    assert matched(table, "consignly", "consignment.delivered") == ["c"]
    assert matched(table, "consignly", "manifest.closed") == []


def test_unknown_entries_never_match_but_are_not_errors(registry: Registry) -> None:
    table = build(registry, base_config([route("c", "consignly", events=[999, "NoSuchEvent"])]))
    assert matched(table, "consignly", "consignment.created") == []
    assert matched(table, "consignly", "no_such_event") == []


def test_svix_has_no_catalog(registry: Registry) -> None:
    table = build(registry, base_config([route("u", "consignease", events=["ConsignmentCreated", 112])]))
    assert matched(table, "consignease", "consignment.created") == []
    assert matched(table, "consignease", "ConsignmentCreated") == ["u"]
    assert matched(table, "consignease", "112") == ["u"]


def test_several_routes_match_one_event_in_config_order(registry: Registry) -> None:
    table = build(
        registry,
        base_config(
            [
                route("all-consignly", "consignly"),
                route("users", "consignease", events=["user.*"]),
                route("created", "consignly", events=["ConsignmentCreated"]),
                route("tracking", "consignly", events=[112]),
                route("consignments", "consignly", events=["consignment.*"]),
            ]
        ),
    )
    assert matched(table, "consignly", "consignment.created") == ["all-consignly", "created", "consignments"]
    assert matched(table, "consignly", "consignment.tracking_updated") == [
        "all-consignly",
        "tracking",
        "consignments",
    ]
    assert matched(table, "consignly", "manifest.closed") == ["all-consignly"]


def test_routes_only_see_events_of_their_own_source(registry: Registry) -> None:
    table = build(registry, base_config([route("users", "consignease", events=["user.*"])]))
    assert matched(table, "consignly", "user.created") == []
    assert matched(table, "unknown", "user.created") == []
    assert [r.name for r in table.routes["consignease"]] == ["users"]
    assert "consignly" not in table.routes


def test_filter_is_applied(registry: Registry) -> None:
    table = build(
        registry,
        base_config(
            [
                route(
                    "active",
                    "consignly",
                    events=["ConsignmentCreated"],
                    filter={"data.status": {"in": [1, 2]}},
                ),
                route("any-created", "consignly", events=["ConsignmentCreated"]),
            ]
        ),
    )
    assert matched(table, "consignly", "consignment.created", {"status": 1}) == ["active", "any-created"]
    assert matched(table, "consignly", "consignment.created", {"status": 3}) == ["any-created"]
    assert matched(table, "consignly", "consignment.created", {}) == ["any-created"]
    # The type must match too: the filter alone is not enough.
    assert matched(table, "consignly", "consignment.updated", {"status": 1}) == []


def test_a_filter_on_type_names_events_as_events_does(registry: Registry) -> None:
    # `events: [ConsignmentDeleted]` matched consignment.deleted, but a filter compared the canonical type
    # with the name or code itself: `not: {type: ConsignmentDeleted}` let deleted consignments through,
    # `type: {in: [101, "304"]}` let nothing through, and `hookyard check` said ok.
    table = build(
        registry,
        base_config(
            [
                route("not-deleted", "consignly", filter={"not": {"type": "ConsignmentDeleted"}}),
                route("created-or-trigger", "consignly", filter={"type": {"in": [101, "304"]}}),
                route("not-a-test", "consignly", filter={"any": [{"type": {"ne": 0}}]}),
                route("dotted", "consignly", filter={"type": "consignment.created"}),
                route("raw", "consignly", filter={"payload.type": 101}),
            ]
        ),
    )
    assert matched(table, "consignly", "consignment.deleted") == ["not-a-test"]
    assert matched(table, "consignly", "consignment.created") == [
        "not-deleted",
        "created-or-trigger",
        "not-a-test",
        "dotted",
    ]
    assert matched(table, "consignly", "job.connection_action_manual_trigger") == [
        "not-deleted",
        "created-or-trigger",
        "not-a-test",
    ]
    assert matched(table, "consignly", "webhook.test") == ["not-deleted"]
    # A provider without a catalog compares the type as text, as `events:` does.
    table = build(registry, base_config([route("u", "consignease", filter={"type": {"in": [112]}})]))
    assert matched(table, "consignease", "112") == ["u"]


def test_compiled_route_fields(registry: Registry) -> None:
    table = build(registry, base_config([route("r", "consignly", forward(id="app"), filter={"type": "x"})]))
    (compiled,) = table.routes["consignly"]
    assert compiled.name == "r"
    assert compiled.source == "consignly"
    assert compiled.predicate is not None
    assert [a.key for a in compiled.actions] == ["app"]


# -- planned actions ---------------------------------------------------------------------------------


def test_planned_actions_take_the_defaults(registry: Registry) -> None:
    config = base_config(
        [
            route(
                "r",
                "consignly",
                forward(id="app"),
                forward("http://audit.internal/x", id="audit", after="app"),
            )
        ],
        defaults={"retry": {"schedule": ["1s", "2s"], "jitter": 0, "retry_on": [503]}, "timeout": "7s"},
    )
    table = build(registry, config)
    app = table.actions[("r", "app")]
    assert isinstance(app, PlannedAction)
    assert app.route == "r"
    assert app.use == "forward"
    assert app.retry.schedule == [1.0, 2.0]
    assert app.retry.jitter == 0
    assert app.retry.retry_on == [503]
    assert app.timeout == 7.0
    assert app.concurrency is None
    assert app.after is None
    assert app.when is None
    assert app.options.url == "http://127.0.0.1:3000/hooks"  # type: ignore[attr-defined]
    assert app.options.method == "POST"  # type: ignore[attr-defined]
    audit = table.actions[("r", "audit")]
    assert audit.after == "app"
    assert audit.when == "always"
    assert audit.timeout == 7.0
    assert audit.retry == app.retry


def test_builtin_defaults_when_none_are_configured(registry: Registry) -> None:
    action = build(registry, base_config([route("r", "consignly")])).actions[("r", "app")]
    assert action.timeout == 30.0
    assert action.retry.schedule == [5.0, 30.0, 120.0, 600.0, 3600.0]
    assert action.retry.retry_on == [408, 429, "5xx"]


def test_an_action_overrides_retry_timeout_and_concurrency(registry: Registry) -> None:
    config = base_config(
        [
            route(
                "r",
                "consignly",
                forward(id="app", timeout="250ms", concurrency=4, retry={"schedule": ["10s"]}),
                forward(id="short", timeout="1ms"),
            )
        ],
        defaults={"retry": {"schedule": ["1s", "2s"], "jitter": 0.5}, "timeout": "7s"},
    )
    table = build(registry, config)
    app = table.actions[("r", "app")]
    assert app.timeout == 0.25
    assert app.concurrency == 4
    assert app.retry.schedule == [10.0]
    # An action's own policy replaces the default as a whole: keys it leaves out take the built-in values.
    assert app.retry.jitter == 0.1
    assert table.actions[("r", "short")].timeout == 0.001


@pytest.mark.parametrize("when", ["success", "failure", "always"])
def test_explicit_when_is_kept(registry: Registry, when: str) -> None:
    config = base_config(
        [route("r", "consignly", forward(id="app"), forward(id="b", after="app", when=when))]
    )
    assert build(registry, config).actions[("r", "b")].when == when


def test_action_key_defaults_to_use(registry: Registry) -> None:
    table = build(registry, base_config([route("r", "consignly", forward())]))
    assert list(table.actions) == [("r", "forward")]
    assert table.actions[("r", "forward")].key == "forward"


def test_actions_of_different_routes_are_kept_apart(registry: Registry) -> None:
    table = build(
        registry,
        base_config(
            [
                route("a", "consignly", forward("http://a/x", id="app")),
                route("b", "consignly", forward("http://b/x", id="app")),
            ]
        ),
    )
    assert table.actions[("a", "app")].options.url == "http://a/x"  # type: ignore[attr-defined]
    assert table.actions[("b", "app")].options.url == "http://b/x"  # type: ignore[attr-defined]


def test_after_may_chain(registry: Registry) -> None:
    config = base_config(
        [
            route(
                "r",
                "consignly",
                forward(id="a"),
                forward(id="b", after="a"),
                forward(id="c", after="b", when="failure"),
            )
        ]
    )
    table = build(registry, config)
    assert table.actions[("r", "b")].after == "a"
    assert table.actions[("r", "c")].after == "b"
    assert table.actions[("r", "c")].when == "failure"


def test_a_route_plans_its_deliveries_once_for_every_event_it_matches(registry: Registry) -> None:
    from gateway.ingress import plan_deliveries
    from gateway.storage import NewDelivery

    config = base_config(
        [
            route("r", "consignly", forward(id="a"), forward(id="b", after="a", when="failure")),
            route("s", "consignly", forward(id="c")),
        ]
    )
    table = build(registry, config)
    routes = table.match(make_event("consignly", "consignment.created"))
    planned = plan_deliveries(routes)
    assert planned == [
        NewDelivery("r", "a", None, None),
        NewDelivery("r", "b", "a", "failure"),
        NewDelivery("s", "c", None, None),
    ]
    # Made when the config is compiled: every event gets the same records, in a list of its own.
    again = plan_deliveries(routes)
    assert again == planned and again is not planned
    assert all(mine is theirs for mine, theirs in zip(planned, again, strict=True))


def test_acknowledge_after_an_action(registry: Registry) -> None:
    ack = {
        "use": "acknowledge",
        "after": "app",
        "with": {"base_url": "https://api.example.test", "token": "t"},
    }
    table = build(registry, base_config([route("r", "consignly", forward(id="app"), ack)]))
    assert table.actions[("r", "acknowledge")].after == "app"
    assert table.actions[("r", "acknowledge")].when == "always"


# -- errors: sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "hint"), [("consignlee", " (did you mean consignly?)"), ("xyzzy", "")], ids=["typo", "far"]
)
def test_unknown_provider_names_the_closest_and_lists_the_known_ones(
    registry: Registry, written: str, hint: str
) -> None:
    config = base_config()
    config["sources"]["consignly"]["provider"] = written
    errors = build_errors(registry, config)
    known = ", ".join(sorted(registry.providers))
    assert errors == [f"sources.consignly.provider: unknown provider {written!r}{hint}; known: {known}"]
    assert {"svix", "consignly", "none"} <= set(registry.providers)


def test_provider_none_needs_insecure(registry: Registry) -> None:
    config = base_config()
    config["sources"]["scratch"] = {"path": "/webhooks/scratch", "provider": "none"}
    errors = build_errors(registry, config)
    assert errors == ["sources.scratch: provider 'none' verifies nothing; say `insecure: true` to allow it"]


def test_provider_none_is_accepted_with_insecure(registry: Registry) -> None:
    config = base_config([route("scratch", "scratch", events=["test.*"])])
    config["sources"]["scratch"] = {"path": "/webhooks/scratch", "provider": "none", "insecure": True}
    table = build(registry, config)
    endpoint = table.endpoints["/webhooks/scratch"]
    assert isinstance(endpoint.provider, NoVerification)
    assert endpoint.insecure is True
    assert matched(table, "scratch", "test.ping") == ["scratch"]


def test_svix_source_with_a_non_whsec_secret(registry: Registry) -> None:
    secret = "whsec_not*base64!very-secret-value"
    config = base_config()
    config["sources"]["consignease"]["secrets"] = [secret, SVIX_SECRET]
    errors = build_errors(registry, config)
    assert errors == [
        "sources.consignease.secrets[0] is not a whsec_ secret: the part after whsec_ must be base64"
    ]
    assert not any("very-secret-value" in error or secret in error for error in errors)


def test_svix_secret_index_names_the_bad_one(registry: Registry) -> None:
    config = base_config()
    config["sources"]["consignease"]["secrets"] = [SVIX_SECRET, "whsec_%%%"]
    errors = build_errors(registry, config)
    assert len(errors) == 1
    assert errors[0].startswith("sources.consignease.secrets[1] ")
    assert "%%%" not in errors[0]


@pytest.mark.parametrize(
    ("provider", "secrets", "error"),
    [
        ("svix", ["${KEY_1:-}", "", "whsec_%%%"], "secrets[2] is not a whsec_ secret"),
        ("token", ["  ", "a b"], "secrets[1] cannot be sent in the authorization header"),
        ("basic", ["${OLD:-}", "user:p", "user:"], "secrets[2] has an empty password"),
    ],
)
def test_a_bad_secret_is_named_by_its_index_in_the_file(
    registry: Registry, provider: str, secrets: list[str], error: str
) -> None:
    # Empty entries are dropped before the provider reads the rest: it said secrets[0] for the file's third.
    config = base_config()
    config["sources"]["x"] = {"path": "/x", "provider": provider, "secrets": secrets}
    errors = build_errors(registry, config)
    assert len(errors) == 1 and errors[0].startswith(f"sources.x.{error}"), errors


@pytest.mark.parametrize("provider", ["svix", "consignly"])
def test_a_verifying_provider_needs_a_secret(registry: Registry, provider: str) -> None:
    config = base_config()
    config["sources"]["x"] = {"path": "/x", "provider": provider, "secrets": ["", "  "]}
    errors = build_errors(registry, config)
    assert errors == ["sources.x.secrets: at least one secret is required (all configured ones are empty)"]


def test_two_sources_on_one_path(registry: Registry) -> None:
    config = base_config()
    config["sources"]["other"] = {"path": "/webhooks/consignly", "provider": "consignly", "secrets": ["k"]}
    errors = build_errors(registry, config)
    assert errors == ["sources.other.path: /webhooks/consignly is already the path of consignly"]


def test_provider_options_are_validated_by_the_provider(registry: Registry) -> None:
    config = base_config()
    config["sources"]["consignly"]["options"] = {"bogus": 1}
    errors = build_errors(registry, config)
    assert errors == ["sources.consignly.options.bogus: unknown key"]


def test_a_number_where_a_provider_option_takes_text_says_to_quote_it(registry: Registry) -> None:
    config = base_config()
    config["sources"]["acme"] = {
        "path": "/acme",
        "provider": "hmac",
        "secrets": ["k"],
        "options": {"header": 7},
    }
    errors = build_errors(registry, config)
    assert errors == ["sources.acme.options.header: a number, not text: quote it"]


# -- errors: routes and actions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "hint"), [("consignyl", " (did you mean consignly?)"), ("xyzzy", "")], ids=["typo", "far"]
)
def test_unknown_source_names_the_closest_and_lists_the_known_ones(
    registry: Registry, written: str, hint: str
) -> None:
    errors = build_errors(registry, base_config([route("r", written)]))
    assert errors == [f"routes[0].source: unknown source {written!r}{hint}; known: consignease, consignly"]


@pytest.mark.parametrize(
    ("written", "hint"), [("forwrd", " (did you mean forward?)"), ("xyzzy", "")], ids=["typo", "far"]
)
def test_unknown_action_names_the_closest_and_lists_the_known_ones(
    registry: Registry, written: str, hint: str
) -> None:
    errors = build_errors(registry, base_config([route("r", "consignly", {"use": written})]))
    known = ", ".join(sorted(registry.actions))
    assert errors == [f"routes[0].actions[0].use: unknown action {written!r}{hint}; known: {known}"]
    assert "forward" in known


def test_duplicate_route_names(registry: Registry) -> None:
    errors = build_errors(
        registry,
        base_config([route("users", "consignease"), route("x", "consignly"), route("users", "consignly")]),
    )
    assert errors == ["routes[2].name: a route named 'users' already exists"]


def test_duplicate_action_ids_in_a_route(registry: Registry) -> None:
    errors = build_errors(
        registry, base_config([route("r", "consignly", forward(id="app"), forward(id="app"))])
    )
    assert errors == [
        "routes[0].actions[1].id: 'app' is used by an earlier action of this route; give each an id"
    ]


def test_two_actions_with_the_same_use_need_ids(registry: Registry) -> None:
    errors = build_errors(registry, base_config([route("r", "consignly", forward(), forward("http://b/x"))]))
    assert errors == [
        "routes[0].actions[1].id: 'forward' is used by an earlier action of this route; give each an id"
    ]


def test_the_same_action_id_in_different_routes_is_fine(registry: Registry) -> None:
    table = build(registry, base_config([route("a", "consignly"), route("b", "consignly")]))
    assert set(table.actions) == {("a", "app"), ("b", "app")}


@pytest.mark.parametrize("after", ["later", "itself", "nope"])
def test_after_must_name_an_earlier_action(registry: Registry, after: str) -> None:
    config = base_config(
        [route("r", "consignly", forward(id="first"), forward(id="itself", after=after), forward(id="later"))]
    )
    errors = build_errors(registry, config)
    assert errors == [
        f"routes[0].actions[1].after: {after!r} is not the id of an earlier action in this route"
    ]


def test_after_may_not_cross_routes(registry: Registry) -> None:
    config = base_config(
        [route("a", "consignly", forward(id="app")), route("b", "consignly", forward(id="x", after="app"))]
    )
    assert build_errors(registry, config) == [
        "routes[1].actions[0].after: 'app' is not the id of an earlier action in this route"
    ]


def test_when_without_after(registry: Registry) -> None:
    errors = build_errors(registry, base_config([route("r", "consignly", forward(id="app", when="failure"))]))
    assert errors == ["routes[0].actions[0].when: only meaningful together with after"]


def test_an_action_that_needs_a_parent_needs_after(registry: Registry) -> None:
    ack = {"use": "acknowledge", "with": {"base_url": "https://api.example.test", "token": "t"}}
    errors = build_errors(registry, base_config([route("r", "consignly", forward(id="app"), ack)]))
    assert len(errors) == 1
    assert errors[0].startswith(
        "routes[0].actions[1].after: 'acknowledge' reports on another action's result"
    )


def test_forward_without_url(registry: Registry) -> None:
    errors = build_errors(registry, base_config([route("r", "consignly", {"use": "forward"})]))
    assert errors == ["routes[0].actions[0].with.url: field required"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ftp://x", "ftp://x"),
        ("file:///etc/passwd", "file:///…"),
        ("127.0.0.1:3000/hooks", "127.0.0.1:3000/…"),
        ("http://", "http://"),
    ],
)
def test_forward_needs_an_http_url(registry: Registry, url: str, shown: str) -> None:
    errors = build_errors(registry, base_config([route("r", "consignly", forward(url))]))
    assert errors == [f"routes[0].actions[0].with.url: {shown!r} is not an http(s) URL"]


@pytest.mark.parametrize(
    ("url", "shown", "host"),
    [
        ("http://exa mple.com/hooks", "http://exa mple.com/…", "exa mple.com"),
        ("https://app<1>/", "https://app<1>/", "app<1>"),
        ("http://a..b:3000/hooks", "http://a..b:3000/…", "a..b"),
        ("http://ex%20a.com/", "http://ex%20a.com/", "ex%20a.com"),
    ],
)
@pytest.mark.parametrize("use", ["forward", "notify"])
def test_a_url_whose_host_no_host_can_be_is_refused(
    registry: Registry, use: str, url: str, shown: str, host: str
) -> None:
    # Both passed `hookyard check`; then every attempt failed to resolve the name, through the whole schedule.
    action = {"use": use, "with": {"url": url}}
    errors = build_errors(registry, base_config([route("r", "consignly", action)]))
    assert errors == [f"routes[0].actions[0].with.url: {shown!r}: {host!r} is not a host name"]


CONTROL = ": a URL cannot hold a control character"


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        (r'"http://127.0.0.1:8080/ho\tok"', "a tab ('\\t') at character 25" + CONTROL),
        (r'"http://127.0.0.1:8080/ho\nok"', "a line feed ('\\n') at character 25" + CONTROL),
        (r'"http://12\r7.0.0.1/hooks"', "a carriage return ('\\r') at character 10" + CONTROL),
        (r'"http://127.0.0.1/\x7f"', "a control character ('\\x7f') at character 18" + CONTROL),
        (
            r'"http://127.0.0.1/hooks\n"',
            "begins or ends with whitespace, such as a newline kept from a file: remove it",
        ),
        (
            r'" http://127.0.0.1/hooks"',
            "begins or ends with whitespace, such as a newline kept from a file: remove it",
        ),
    ],
)
@pytest.mark.parametrize("use", ["forward", "notify"])
def test_a_url_with_a_control_character_or_whitespace_at_an_end_is_refused(
    registry: Registry, use: str, written: str, problem: str
) -> None:
    # urlsplit drops tabs and line breaks, and what is before the scheme, without a word: forward took
    # "…/ho\tok" (a YAML escape) and sent every event to /hook; notify said only "not a valid URL".
    url = yaml.safe_load(written)
    action = {"use": use, "with": {"url": url}}
    errors = build_errors(registry, base_config([route("r", "consignly", action)]))
    assert errors == [f"routes[0].actions[0].with.url: {shown_url(url)!r}: {problem}"]


@pytest.mark.parametrize("url", ["http://[v1.x]/hooks", "http://[V1.x]:3000/", "http://[127.0.0.1]/"])
@pytest.mark.parametrize("use", ["forward", "notify"])
def test_a_host_in_brackets_that_is_no_ipv6_address_is_refused(
    registry: Registry, use: str, url: str
) -> None:
    # urlsplit took the IPvFuture literal [v1.x] and gave it out as the name v1.x, which nothing can resolve.
    action = {"use": use, "with": {"url": url}}
    errors = build_errors(registry, base_config([route("r", "consignly", action)]))
    assert errors == [
        f"routes[0].actions[0].with.url: {shown_url(url)!r}: its host cannot be read "
        "(a name, an IPv4 address, or an IPv6 address in brackets)"
    ]


def test_a_url_urlsplit_cannot_read_is_refused_without_its_password(registry: Registry) -> None:
    # A fullwidth number sign reads as # once normalised (NFKC); urlsplit's own message repeats the whole
    # user:password@host.
    url = "http://ops:hunter2\uff03@app/x"
    errors = build_errors(registry, base_config([route("r", "consignly", forward(url))]))
    assert errors == [
        "routes[0].actions[0].with.url: 'http://app/…': its host cannot be read "
        "(a name, an IPv4 address, or an IPv6 address in brackets)"
    ]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@app:8080/hook", "http://app:8080/…"),
        ("http://[::1]:8080/x", "http://[::1]:8080/…"),
        ("http://ops@[::1]:8080/", "http://[::1]:8080/"),
        ("http://app/hook?to=ops@example.com", "http://app/…"),
        ("http://app:80a/x", "http://app:80a/…"),  # no @ anywhere: nothing in it can be a credential
        # A '/', '?' or '#' left unencoded in a password ends what urlsplit reads as the host early.
        ("http://user:pa/ss@host:8080/hook", "http://host:8080/…"),
        ("http://user:pa/ss@host:8080", "http://host:8080"),
        ("http://user:p/a@ss@host/x", "http://host/…"),
        ("user:pa/ss@host:3000/hooks", "host:3000/…"),
        ("http://user:pa?ss@host/x", "http://…"),
        ("http://user:pa#ss@host/x", "http://…"),
        ("http://user:pa/ss@ho:st/x", "http://…"),
        # What is before the first '/' may be a host, or a user name or digits of a password with a '/'.
        ("http://deploy:2024/pass@host/x", "http://…"),
        ("http://user/name@host/x", "http://…"),
        # A '?' or '#' in a password, before an '@' of its own, or after a '/': each '@' may end it.
        ("http://user:@pa?ss@host/x", "http://…"),
        ("http://user:pa@ss?x@host/x", "http://…"),
        ("http://user:p/a@b?c@host/x", "http://…"),
        ("http://ops:pa@app/x?to=a@b", "http://…"),
        # "://" in a password is no scheme's: `user:pa` is none.
        ("user:pa://ss@host:3000/hooks", "host:3000/…"),
    ],
)
def test_a_shown_url_holds_no_part_of_a_password(url: str, shown: str) -> None:
    assert shown_url(url) == shown


# A password's letters are upper case, and nothing else in the URL has one: none may be shown.
PASSWORD = st.text(alphabet="PQRS/?#@:%.[]", min_size=1, max_size=10).map(lambda text: f"P{text}")


@settings(max_examples=500, database=None, deadline=None)
@given(
    scheme=st.sampled_from(["http://", "https://", ""]),
    user=st.sampled_from(["", "ops", "a.b", "a/b"]),
    password=PASSWORD,
    host=st.sampled_from(["app", "app:8080", "[::1]:9000", "10.0.0.1", "ho:st"]),
    after=st.sampled_from(["", "/", "/hook", "/a@b", "?to=a@b", "/p?q=1#f", "#f@g"]),
)
def test_a_shown_url_holds_no_part_of_any_password(
    scheme: str, user: str, password: str, host: str, after: str
) -> None:
    url = f"{scheme}{user}:{password}@{host}{after}"
    for shown in (shown_url(url), shown_url_with_path(url)):
        assert not any(char in "PQRS" for char in shown), (url, shown)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8080/gateway/webhooks/x?a=1", "http://127.0.0.1:8080/gateway/webhooks/x?a=1"),
        ("http://user:secret@app:8080/gateway", "http://app:8080/gateway"),
        ("https://ops:p@ss@[::1]:9000/hookyard/", "https://[::1]:9000/hookyard/"),
        ("app:8080/gateway", "app:8080/gateway"),
        # Which '@' ends the password is ambiguous: all before the last one is left out.
        ("http://user:pa/ss@host:8080/gateway", "http://…@host:8080/gateway"),
        ("http://user:pa?ss@host/x", "http://…@host/x"),
        ("http://app/hook?to=ops@example.com", "http://…@example.com"),
    ],
)
def test_a_url_shown_with_its_path_holds_no_part_of_a_password(url: str, shown: str) -> None:
    assert shown_url_with_path(url) == shown


PORT = "its port is not a number from 1 to 65535"


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://app:70000/x", f"'http://app:70000/…': {PORT}"),
        ("http://app:80a/x", f"'http://app:80a/…': {PORT}"),
        # urlsplit reads `user:pa` as a host and a port; its own words were "... integer value as 'pa'".
        (
            "http://user:pa/ss@host:8080/hook",
            f"'http://host:8080/…': {PORT}, or a '/', '?' or '#' in a password ended the host early",
        ),
    ],
)
@pytest.mark.parametrize("use", ["forward", "notify"])
def test_a_port_that_cannot_be_read_is_refused_without_repeating_it(
    registry: Registry, use: str, url: str, error: str
) -> None:
    action = {"use": use, "with": {"url": url}}
    errors = build_errors(registry, base_config([route("r", "consignly", action)]))
    assert errors == [f"routes[0].actions[0].with.url: {error}"]


def test_forward_with_an_unknown_key(registry: Registry) -> None:
    action = {"use": "forward", "with": {"url": "http://a/x", "retries": 3}}
    errors = build_errors(registry, base_config([route("r", "consignly", forward(id="ok"), action)]))
    assert errors == ["routes[0].actions[1].with.retries: unknown key"]


def test_a_typo_in_an_action_s_or_a_provider_s_options_names_the_key_meant(registry: Registry) -> None:
    ack = {
        "use": "acknowledge",
        "after": "app",
        "with": {
            "base_url": "http://a",
            "oauth": {"token_url": "http://a/t", "client_id": "c", "client_secrt": "s"},
        },
    }
    app = {"id": "app", "use": "forward", "with": {"url": "http://a", "hedaers": {}}}
    config = base_config([route("r", "consignly", app, ack)])
    config["sources"]["hooks"] = {
        "path": "/hooks",
        "provider": "token",
        "secrets": ["t"],
        "options": {"haeder": "X"},
    }
    assert build_errors(registry, config) == [
        "sources.hooks.options.haeder: unknown key (did you mean header?)",
        "routes[0].actions[0].with.hedaers: unknown key (did you mean headers?)",
        "routes[0].actions[1].with.oauth.client_secret: field required",
        "routes[0].actions[1].with.oauth.client_secrt: unknown key (did you mean client_secret?)",
    ]


def test_forward_method_is_checked(registry: Registry) -> None:
    errors = build_errors(
        registry,
        base_config(
            [route("r", "consignly", {"use": "forward", "with": {"url": "http://a/x", "method": "GET"}})]
        ),
    )
    assert errors == ["routes[0].actions[0].with.method: method 'GET' must be POST, PUT or PATCH"]


@pytest.mark.parametrize(
    "name",
    [
        "Idempotency-Key",
        "content-type",
        "Content-Type",
        "X-Hookyard-Event-Id",
        "x-hookyard-attempt",
        "User-Agent",
    ],
)
def test_forward_static_headers_may_not_replace_its_own(registry: Registry, name: str) -> None:
    action = {"use": "forward", "with": {"url": "http://a/x", "headers": {"Authorization": "t", name: "x"}}}
    errors = build_errors(registry, base_config([route("r", "consignly", forward(id="ok"), action)]))
    assert errors == [
        f"routes[0].actions[1].with.headers: {name!r} cannot be set: "
        "forward sets Content-Type, Idempotency-Key, User-Agent and X-Hookyard-* itself"
    ]


@pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding", "Host", "Connection", "Upgrade"])
def test_forward_static_headers_may_not_frame_the_request(registry: Registry, name: str) -> None:
    action = {"use": "forward", "with": {"url": "http://a/x", "headers": {name: "3"}}}
    errors = build_errors(registry, base_config([route("r", "consignly", action)]))
    assert errors == [
        f"routes[0].actions[0].with.headers: {name!r} cannot be set: the HTTP client frames each request itself"
    ]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-App": "a\r\nX-Injected: 1"},
        {"X-App": "a\nb"},
        {"X App": "a"},
        {"X:App": "a"},
        {"": "a"},
        {"X-Tëam": "a"},
        {"X(App)": "a"},
        {"X-App": "a\x01b"},
        {"X-App": "a\x7f"},
    ],
)
def test_forward_static_headers_must_be_headers(registry: Registry, headers: dict[str, str]) -> None:
    action = {"use": "forward", "with": {"url": "http://a/x", "headers": headers}}
    [error] = build_errors(registry, base_config([route("r", "consignly", action)]))
    assert error.startswith("routes[0].actions[0].with.headers: ") and "not a header" in error


def test_a_number_or_boolean_where_an_action_option_takes_text_says_to_quote_it(registry: Registry) -> None:
    # pydantic said `Input should be a valid string`, as it does for a value at the top level.
    action = {"use": "forward", "with": {"url": "http://a/x", "headers": {"X-A": 1, "X-B": True}}}
    errors = build_errors(registry, base_config([route("r", "consignly", action)]))
    assert errors == [
        "routes[0].actions[0].with.headers.X-A: a number, not text: quote it",
        "routes[0].actions[0].with.headers.X-B: the boolean true (as YAML reads yes, no, on and off), not text: "
        "quote it",
    ]


SIGNING = {"secret": "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"}


@pytest.mark.parametrize("name", ["webhook-id", "Webhook-Timestamp", "WEBHOOK-SIGNATURE"])
def test_forward_static_headers_may_not_replace_the_signature_when_signing(
    registry: Registry, name: str
) -> None:
    signed = {"use": "forward", "with": {"url": "http://a/x", "sign": SIGNING, "headers": {name: "x"}}}
    errors = build_errors(registry, base_config([route("r", "consignly", signed)]))
    assert errors == [
        f"routes[0].actions[0].with.headers: {name!r} cannot be set together with sign: "
        "it sets webhook-id, webhook-timestamp and webhook-signature"
    ]
    # Without sign: the app may use those names for its own purposes.
    unsigned = {"use": "forward", "with": {"url": "http://a/x", "headers": {name: "x"}}}
    [planned] = build(registry, base_config([route("r", "consignly", unsigned)])).actions.values()
    assert planned.options.headers == {name: "x"}  # type: ignore[attr-defined]


def test_forward_lists_every_refused_header(registry: Registry) -> None:
    headers = {"Idempotency-Key": "x", "Authorization": "t", "X-Hookyard-Source": "y"}
    action = {"use": "forward", "with": {"url": "http://a/x", "headers": headers}}
    [error] = build_errors(registry, base_config([route("r", "consignly", action)]))
    assert error.startswith(
        "routes[0].actions[0].with.headers: 'Idempotency-Key', 'X-Hookyard-Source' cannot"
    )


def test_a_bad_filter_names_its_place(registry: Registry) -> None:
    errors = build_errors(
        registry,
        base_config([route("r", "consignly"), route("s", "consignly", filter={"data.status": {"in": 1}})]),
    )
    assert errors == ["routes[1].filter.data.status.in: in takes a list"]


def test_a_filter_on_the_header_a_token_source_reads_its_secret_from_is_a_config_error(
    registry: Registry,
) -> None:
    # The header holds the secret itself and is never kept with the event: the route never matched.
    token = {
        "path": "/webhooks/gitlab",
        "provider": "token",
        "secrets": ["t0ken"],
        "options": {"header": "X-Gitlab-Token"},
    }
    config = base_config(
        [
            route("r", "gitlab", filter={"headers.X-Gitlab-Token": {"exists": True}}),
            route("s", "gitlab", filter={"headers.x-gitlab-event": "Push Hook"}),
            route("t", "consignly", filter={"headers.x-gitlab-token": {"exists": True}}),
        ]
    )
    config["sources"]["gitlab"] = token
    assert build_errors(registry, config) == [
        "routes[0].filter.headers.X-Gitlab-Token: the X-Gitlab-Token header is never kept with an event (it "
        "may hold a credential), so a filter cannot see it"
    ]


def test_a_non_string_path_inside_a_filter_is_a_config_error(registry: Registry) -> None:
    # YAML reads `1:` as an integer key; inside `any:` the schema does not see it.
    config = base_config([route("r", "consignly", filter={"any": [{1: "x"}]})])
    errors = build_errors(registry, config)
    assert len(errors) == 1
    assert errors[0].startswith("routes[0].filter.any[0]")


def test_every_error_is_collected_at_once(registry: Registry) -> None:
    config = base_config(
        [
            route(
                "users",
                "consignly",
                forward("ftp://x"),
                forward(id="alert", when="failure"),
                forward("http://b/x", after="nope"),
                filter={"data.status": {"between": [1, 2]}},
            ),
            route("users", "nowhere"),
            route("r3", "consignly", {"use": "teleport"}),
        ]
    )
    config["sources"]["consignease"]["provider"] = "svx"
    config["sources"]["dupe"] = {"path": "/webhooks/consignly", "provider": "consignly", "secrets": ["k"]}
    errors = build_errors(registry, config)
    expected_starts = [
        "sources.consignease.provider: unknown provider 'svx'",
        "sources.dupe.path: /webhooks/consignly is already the path of consignly",
        "routes[0].filter.data.status.between: unknown operator 'between'",
        "routes[0].actions[0].with.url: 'ftp://x' is not an http(s) URL",
        "routes[0].actions[1].when: only meaningful together with after",
        "routes[0].actions[2].id: 'forward' is used by an earlier action of this route",
        "routes[0].actions[2].after: 'nope' is not the id of an earlier action in this route",
        "routes[1].name: a route named 'users' already exists",
        "routes[1].source: unknown source 'nowhere'; known: consignease, consignly, dupe",
        "routes[2].actions[0].use: unknown action 'teleport'",
    ]
    assert len(errors) == len(expected_starts), errors
    for error, start in zip(errors, expected_starts, strict=True):
        assert error.startswith(start), (error, start)


def test_a_route_of_a_broken_source_is_still_checked(registry: Registry) -> None:
    config = base_config([route("r", "consignease", forward("ftp://x"))])
    config["sources"]["consignease"]["secrets"] = ["whsec_***"]
    errors = build_errors(registry, config)
    assert errors[0].startswith("sources.consignease.secrets[0] is not a whsec_ secret")
    assert errors[1] == "routes[0].actions[0].with.url: 'ftp://x' is not an http(s) URL"
    assert len(errors) == 2


def test_build_does_not_mutate_the_config(registry: Registry) -> None:
    raw = base_config([route("r", "consignly", events=[112])])
    parsed = parse_config(yaml.safe_dump(raw), environ={})
    before = copy.deepcopy(parsed.model_dump())
    RouteTable.build(parsed, registry)
    assert parsed.model_dump() == before


def test_a_provider_whose_constructor_raises_other_than_valueerror_is_a_config_error() -> None:
    # A plugin's bug when it prepares its keys: an error of `hookyard check` naming the source and the
    # plugin whose code raised, not a traceback.
    class Keyed(SvixProvider):
        name = "keyed"

        def __init__(self, source_name: str, source: Any) -> None:
            super().__init__(source_name, source)
            raise KeyError("kid")

    config = base_config()
    config["sources"]["consignease"]["provider"] = "keyed"
    errors = build_errors(registry_with(providers=[Keyed]), config)
    assert errors == [
        "sources.consignease.provider: the keyed provider (plugin acme_keys) could not be set up: KeyError: 'kid'"
    ]


class _RaisingOptions(BaseModel):
    # A validator with a bug: pydantic passes on what is not a ValueError.
    @model_validator(mode="after")
    def _check(self) -> _RaisingOptions:
        raise KeyError("region")


def test_a_provider_whose_options_model_raises_names_its_source_provider_and_plugin() -> None:
    class Regional(SvixProvider):
        name = "regional"
        Options = _RaisingOptions

    config = base_config()
    config["sources"]["consignease"]["provider"] = "regional"
    errors = build_errors(registry_with(providers=[Regional]), config)
    assert errors == [
        "sources.consignease.provider: the regional provider (plugin acme_keys) could not be set up: "
        "KeyError: 'region'"
    ]


def test_an_action_whose_options_model_raises_is_a_config_error_naming_its_plugin() -> None:
    class Spool(Action):
        name = "spool"
        Options = _RaisingOptions

        async def deliver(self, job: Any) -> Any:
            raise AssertionError("never run")

    # As a packaged plugin lays it out: the class in a module of its own, not the plugin's. The plugin was
    # found by module, and this one was named `plugin acme_hook.actions`.
    Spool.__module__ = "acme_hook.actions"
    errors = build_errors(
        registry_with(actions=[Spool]), base_config([route("r", "consignly", {"id": "s", "use": "spool"})])
    )
    assert errors == [
        "routes[0].actions[0].with: the spool action's options (plugin acme_keys) could not be read: "
        "KeyError: 'region'"
    ]


def registry_with(*, providers: Sequence[type] = (), actions: Sequence[type] = ()) -> Registry:
    """The built-in plugins' registry, with a plugin `acme_keys` that registers providers and actions."""

    class AcmeKeys:
        @hookimpl
        def register_providers(self) -> list[type]:
            return list(providers)

        @hookimpl
        def register_actions(self) -> list[type]:
            return list(actions)

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(AcmeKeys(), name="acme_keys")
    return Registry.collect(pm)
