"""The plugin manager: built-in plugins and third-party ones are loaded the same way."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import pluggy

from gateway import hookspecs

if TYPE_CHECKING:
    from gateway.actions import Action
    from gateway.providers import Provider

# Built-ins are ordinary plugins, registered exactly like third-party ones.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.svix",
    "plugins.consignly",
    "plugins.github",
    "plugins.stripe",
    "plugins.slack",
    "plugins.shopify",
    "plugins.hmac_generic",
    "plugins.shared_secret",
    "plugins.insecure",
    "plugins.forward",
    "plugins.store",
    "plugins.notify",
    "plugins.acknowledge",
)

ENTRY_POINT_GROUP = "hookyard"

# Hooks whose results are used as they are returned: the registries are read at once, and the observers are
# called on the hot path. An `async def` implementation returns a coroutine that nobody awaits, so its body
# would never run.
SYNC_HOOKS: tuple[str, ...] = (
    "register_providers",
    "register_actions",
    "event_accepted",
    "delivery_finished",
)

# Hooks whose implementations Hookyard calls itself, one at a time, rather than through pluggy: each awaited
# before the next starts, and a shutdown one on a thread of its own and given up on after a while (see
# Gateway._start_plugins and app._call_each). A wrapper (wrapper=True, hookwrapper=True) runs around the
# others only in pluggy's own call; called here, its generator would be dropped and its body never run.
CALLED_ONE_AT_A_TIME: tuple[str, ...] = ("startup", "shutdown")


def new_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the built-in plugins and, optionally, installed entry points."""
    pm = pluggy.PluginManager("hookyard")
    pm.add_hookspecs(hookspecs)
    for dotted in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(dotted), name=dotted)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    try:
        # Typos in hook names fail here instead of silently never being called.
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # named as the other refusals are (check_implementations)
        raise pluggy.PluginValidationError(exc.plugin, f"plugin {pm.get_name(exc.plugin)}: {exc}") from None
    check_implementations(pm)
    if os.environ.get("HOOKYARD_TRACE_HOOKS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


def check_implementations(pm: pluggy.PluginManager) -> None:
    """Refuse an implementation that, like a typo in a hook's name, would silently never run: an `async def`
    one of a hook in SYNC_HOOKS, and a wrapper on a hook in CALLED_ONE_AT_A_TIME."""
    for name in CALLED_ONE_AT_A_TIME:
        for impl in getattr(pm.hook, name).get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                style = "wrapper=True" if impl.wrapper else "hookwrapper=True"
                raise pluggy.PluginValidationError(
                    impl.plugin,
                    f"plugin {impl.plugin_name}: {name} is a hook wrapper ({style}), but Hookyard calls each "
                    f"{name} implementation itself, one at a time, and a wrapper's body would never run; make "
                    "it a plain hook (tryfirst=True or trylast=True to run before or after the others)",
                )
    for name in SYNC_HOOKS:
        for impl in getattr(pm.hook, name).get_hookimpls():
            if inspect.iscoroutinefunction(impl.function):
                raise pluggy.PluginValidationError(
                    impl.plugin,
                    f"plugin {impl.plugin_name}: {name} is an async def, but its result is not awaited; "
                    "make it a plain def (start a task for slow work)",
                )


class HookTrace:
    """Traces the calls of the hooks in CALLED_ONE_AT_A_TIME as pluggy traces those it calls itself (see
    HOOKYARD_TRACE_HOOKS): the call with its arguments, then what it returned, one implementation at a time.
    Nothing is written when the manager's tracing is off."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._trace = pm.trace.root.get("hook")

    def call(self, hook: str, plugin: str, kwargs: dict[str, Any]) -> None:
        self._write(f"{hook} of {plugin}", kwargs)

    def finish(self, hook: str, plugin: str, result: Any) -> None:
        self._write("finish", f"{hook} of {plugin}", "-->", result)

    def _write(self, *args: Any) -> None:
        # Indented one level, as pluggy's are while the call runs; set back at once, as this one's may await.
        self._trace.root.indent += 1
        try:
            self._trace(*args)
        finally:
            self._trace.root.indent -= 1


@cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, built on first use."""
    return new_plugin_manager()


class DuplicateName(Exception):
    pass


@dataclass
class Registry:
    """Everything the plugins registered, by name."""

    providers: dict[str, type[Provider]] = field(default_factory=dict)
    actions: dict[str, type[Action]] = field(default_factory=dict)

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> Registry:
        registry = cls()
        for batch in pm.hook.register_providers():
            for provider in batch:
                _add(registry.providers, provider.name, provider, "provider")
        for batch in pm.hook.register_actions():
            for action in batch:
                _add(registry.actions, action.name, action, "action")
        return registry


def _add(table: dict[str, type], name: str, cls: type, kind: str) -> None:
    if name in table and table[name] is not cls:
        raise DuplicateName(
            f"{kind} {name!r} is registered twice: by {table[name].__module__} and {cls.__module__}"
        )
    table[name] = cls


def registry(pm: pluggy.PluginManager | None = None) -> Registry:
    return Registry.collect(pm or plugin_manager())
