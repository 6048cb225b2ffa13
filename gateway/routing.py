"""The compiled configuration: which provider answers each path, which routes match an event, and which
actions each matched route runs. Built once per config load; everything that needs plugins is checked here."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from gateway.addresses import Network, parse_networks
from gateway.config import (
    ActionConfig,
    Config,
    ConfigError,
    RetryPolicy,
    Route,
    Source,
    did_you_mean,
    format_validation_errors,
    in_file_order,
    load_config_tree,
)
from gateway.events import UNSTORED_HEADERS, Event
from gateway.filters import FilterError, Predicate, compile_filter
from gateway.plugins import Registry
from gateway.providers import Provider, unknown_type
from gateway.storage import NewDelivery


@dataclass(frozen=True, slots=True)
class PlannedAction:
    """One action of a route, with its defaults resolved and its `with:` validated."""

    route: str
    key: str
    use: str
    options: BaseModel
    retry: RetryPolicy
    timeout: float
    concurrency: int | None
    after: str | None
    when: str | None


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    source: str
    matches_type: Callable[[str], bool]
    predicate: Predicate | None
    actions: tuple[PlannedAction, ...]
    # A matched event's delivery of each action, in order: the same for every event, so made once here
    # rather than for every webhook (plan_deliveries).
    deliveries: tuple[NewDelivery, ...]

    def matches(self, event: Event) -> bool:
        return self.matches_type(event.type) and (self.predicate is None or self.predicate(event))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A source as the ingress sees it."""

    name: str
    path: str
    provider: Provider
    insecure: bool
    log_only: bool = False
    allow: tuple[Network, ...] = ()
    # The source's routes in the same config: a webhook is routed by the config its source was found in,
    # though a reload swaps the table while its body is still coming.
    routes: tuple[CompiledRoute, ...] = field(default=(), compare=False, repr=False)

    def match(self, event: Event) -> list[CompiledRoute]:
        return [route for route in self.routes if route.matches(event)]


@dataclass
class RouteTable:
    config: Config
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # by path
    routes: dict[str, list[CompiledRoute]] = field(default_factory=dict)  # by source name
    actions: dict[tuple[str, str], PlannedAction] = field(default_factory=dict)  # by (route, key)
    trusted_proxies: tuple[Network, ...] = ()

    def match(self, event: Event) -> list[CompiledRoute]:
        return [route for route in self.routes.get(event.source, ()) if route.matches(event)]

    @classmethod
    def build(
        cls,
        config: Config,
        registry: Registry,
        *,
        route_places: Sequence[int] | None = None,
        unchecked_sources: Collection[str] = (),
    ) -> RouteTable:
        """Compile the config; raises ConfigError with every problem found, each naming its place.

        route_places: the index in the file of each of config.routes (when some routes were left out).
        unchecked_sources: sources of the file left out of config; routes naming them are checked, not built.
        """
        table = cls(config, trusted_proxies=parse_networks(config.listen.trusted_proxies))
        errors: list[str] = []
        for name, source in config.sources.items():
            place = f"sources.{name}"
            if source.path in table.endpoints:
                errors.append(
                    f"{place}.path: {source.path} is already the path of {table.endpoints[source.path].name}"
                )
                continue
            provider_cls = registry.providers.get(source.provider)
            if provider_cls is None:
                errors.append(
                    f"{place}.provider: {_unknown('provider', source.provider, registry.providers)}"
                )
                continue
            if provider_cls.needs_secret and not source.secrets:
                errors.append(
                    f"{place}.secrets: at least one secret is required (all configured ones are empty)"
                )
                continue
            if not provider_cls.needs_secret and not source.insecure:
                errors.append(
                    f"{place}: provider {source.provider!r} verifies nothing; say `insecure: true` to allow it"
                )
                continue
            try:
                provider = provider_cls(name, source)
            except ValidationError as exc:
                errors.extend(
                    format_validation_errors(exc, (*place.split("."), "options"), provider_cls.Options)
                )
                continue
            except ValueError as exc:
                errors.append(f"{place}.{_secret_in_the_file(str(exc), source)}")
                continue
            except Exception as exc:
                # A plugin's bug as it prepares its keys: an error of the config, not a traceback from check.
                errors.append(
                    f"{place}.provider: the {source.provider} provider ({registry.origin(provider_cls)}) could "
                    f"not be set up: {type(exc).__name__}: {exc}"
                )
                continue
            table.endpoints[source.path] = Endpoint(
                name,
                source.path,
                provider,
                source.insecure,
                log_only=source.verify == "log-only",
                allow=parse_networks(source.allow_ips),
            )

        providers = {endpoint.name: endpoint.provider for endpoint in table.endpoints.values()}
        seen_routes: set[str] = set()
        for index, route in enumerate(config.routes):
            place = f"routes[{index if route_places is None else route_places[index]}]"
            if route.name in seen_routes:
                errors.append(f"{place}.name: a route named {route.name!r} already exists")
            seen_routes.add(route.name)
            if route.source not in config.sources and route.source not in unchecked_sources:
                errors.append(
                    f"{place}.source: "
                    f"{_unknown('source', route.source, {**config.sources, **dict.fromkeys(unchecked_sources)})}"
                )
                continue
            # Without a provider (its own error is reported above) the route is still checked, not built.
            compiled = _compile_route(route, place, providers.get(route.source), config, registry, errors)
            if compiled is not None:
                table.routes.setdefault(route.source, []).append(compiled)
                for action in compiled.actions:
                    table.actions[(route.name, action.key)] = action
        if errors:
            raise ConfigError(errors)
        for path, endpoint in table.endpoints.items():
            table.endpoints[path] = replace(endpoint, routes=tuple(table.routes.get(endpoint.name, ())))
        return table


def load_routes(
    path: str | Path, registry: Registry, *, allow_empty: bool = True
) -> tuple[Config, RouteTable]:
    """Load a config file and compile it; raises one ConfigError with every problem found, those that
    need the plugins included even when the file's shape is invalid too (`hookyard check` and a hot
    reload report the same list)."""
    try:
        config, tree = load_config_tree(path, allow_empty=allow_empty)
    except ConfigError as exc:
        errors = exc.errors
        if exc.partial is not None:  # the parts that are valid on their own: report their errors too
            try:
                RouteTable.build(
                    exc.partial.config,
                    registry,
                    route_places=exc.partial.route_places,
                    unchecked_sources=exc.partial.unchecked_sources,
                )
            except ConfigError as more:
                errors = errors + [error for error in more.errors if not exc.follows_from_unexpanded(error)]
        raise ConfigError(errors if exc.tree is None else in_file_order(errors, exc.tree)) from None
    try:
        return config, RouteTable.build(config, registry)
    except ConfigError as exc:
        raise ConfigError(in_file_order(exc.errors, tree)) from None


def _compile_route(
    route: Route, place: str, provider: Provider | None, config: Config, registry: Registry, errors: list[str]
) -> CompiledRoute | None:
    before = len(errors)
    predicate = None
    if route.filter is not None:
        try:
            event_type = provider.event_type if provider is not None else None
            unseen = UNSTORED_HEADERS | (provider.secret_headers if provider is not None else frozenset())
            predicate = compile_filter(route.filter, f"{place}.filter", event_type, unseen)
        except FilterError as exc:
            errors.extend(exc.errors)
    actions: list[PlannedAction] = []
    keys: set[str] = set()
    for index, action in enumerate(route.actions):
        planned = _plan_action(
            route.name, action, f"{place}.actions[{index}]", keys, config, registry, errors
        )
        keys.add(action.key)
        if planned is not None:
            actions.append(planned)
    if len(errors) > before or provider is None:
        return None
    return CompiledRoute(
        name=route.name,
        source=route.source,
        matches_type=type_matcher([_event_pattern(provider, pattern) for pattern in route.events]),
        predicate=predicate,
        actions=tuple(actions),
        deliveries=tuple(
            NewDelivery(route.name, action.key, action.after, action.when) for action in actions
        ),
    )


def _plan_action(
    route: str,
    action: ActionConfig,
    place: str,
    earlier: set[str],
    config: Config,
    registry: Registry,
    errors: list[str],
) -> PlannedAction | None:
    if action.key in earlier:
        errors.append(
            f"{place}.id: {action.key!r} is used by an earlier action of this route; give each an id"
        )
    if action.after is not None and action.after not in earlier:
        errors.append(f"{place}.after: {action.after!r} is not the id of an earlier action in this route")
    if action.when is not None and action.after is None:
        errors.append(f"{place}.when: only meaningful together with after")
    action_cls = registry.actions.get(action.use)
    if action_cls is None:
        errors.append(f"{place}.use: {_unknown('action', action.use, registry.actions)}")
        return None
    if action_cls.needs_parent and action.after is None:
        errors.append(
            f"{place}.after: {action.use!r} reports on another action's result; name it with after:"
        )
    try:
        # The context tells an action's options what they may not share with the gateway (its store).
        options = action_cls.Options.model_validate(action.with_, context={"storage_url": config.storage.url})
    except ValidationError as exc:
        errors.extend(format_validation_errors(exc, (place, "with"), action_cls.Options))
        return None
    except Exception as exc:
        # A validator of the plugin's that raised other than ValueError (pydantic passes it on): its bug, an
        # error of the config naming it, not a traceback from check, serve or a reload.
        errors.append(
            f"{place}.with: the {action.use} action's options ({registry.origin(action_cls)}) could not be "
            f"read: {type(exc).__name__}: {exc}"
        )
        return None
    return PlannedAction(
        route=route,
        key=action.key,
        use=action.use,
        options=options,
        retry=action.retry or config.defaults.retry,
        timeout=action.timeout if action.timeout is not None else config.defaults.timeout,
        concurrency=action.concurrency,
        after=action.after,
        when=(action.when or "always") if action.after else None,
    )


def never_matched(config: Config, table: RouteTable) -> list[str]:
    """Each route's `events:` entry that no type its source's provider sends is (unknown_type), with its
    place: the route never matches it."""
    providers = {endpoint.name: endpoint.provider for endpoint in table.endpoints.values()}
    said: list[str] = []
    for index, route in enumerate(config.routes):
        provider = providers.get(route.source)
        for place, pattern in enumerate(route.events):
            if provider is not None and (warning := unknown_type(provider, pattern)) is not None:
                said.append(
                    f"routes[{index}].events[{place}] ({route.name}): {warning}; the route never matches it"
                )
    return said


def _event_pattern(provider: Provider, pattern: str | int) -> str:
    # Globs stay globs; a plain name or code goes through the provider's catalog (101 -> consignment.created).
    if isinstance(pattern, str) and any(char in pattern for char in "*?["):
        return pattern
    return provider.event_type(pattern)


def type_matcher(patterns: list[str]) -> Callable[[str], bool]:
    if "*" in patterns:
        return lambda _type: True
    regex = re.compile("|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns))
    return lambda event_type: regex.match(event_type) is not None


_SECRET_INDEX = re.compile(r"^secrets\[(\d+)\]")


def _secret_in_the_file(message: str, source: Source) -> str:
    """A provider names a secret by its index in its own secrets, which lack the file's empty entries:
    `secrets[0] ...` becomes `secrets[2] ...` where two empty ones come first in the file."""
    return _SECRET_INDEX.sub(lambda match: f"secrets[{source.secret_place(int(match[1]))}]", message, count=1)


def _unknown(kind: str, name: str, names: dict[str, Any]) -> str:
    """`unknown action 'forwrd' (did you mean forward?); known: …`: the closest name first, as a typo is
    the likeliest reason, then every name there is."""
    known = ", ".join(sorted(names)) or "(none)"
    return f"unknown {kind} {name!r}{did_you_mean(name, names)}; known: {known}"
