"""The plugin manager: built-in plugins and third-party ones are loaded the same way."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import os
import reprlib
import sys
from collections.abc import Iterator
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
        _import_entry_points()
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


class PluginError(Exception):
    """A plugin that cannot be used as it is; the message is one line for the operator, naming it."""


def _import_entry_points() -> None:
    """Import the module of each entry point of the group before pluggy does (it is imported once), so that
    one that cannot be imported (a dependency missing, a syntax error) is named, not left to a traceback."""
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {entry_point.name}: {entry_point.value} cannot be imported: {type(exc).__name__}: {exc}"
            ) from exc


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


class DuplicateName(PluginError):
    pass


@dataclass
class Registry:
    """Everything the plugins registered, by name."""

    providers: dict[str, type[Provider]] = field(default_factory=dict)
    actions: dict[str, type[Action]] = field(default_factory=dict)
    # Each class's plugin, as `hookyard plugins` lists it: errors of its code name whose code it is.
    origins: dict[type, str] = field(default_factory=dict)

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> Registry:
        from gateway.actions import Action
        from gateway.providers import Provider

        registry = cls()
        for provider in _registered(pm, "register_providers", Provider):
            _add(registry.providers, provider.name, provider, "provider")
        for action in _registered(pm, "register_actions", Action):
            _add(registry.actions, action.name, action, "action")
        distributions = _distributions(pm)
        for registered in [*registry.providers.values(), *registry.actions.values()]:
            name = plugin_of(pm, registered)
            registry.origins[registered] = (
                f"{name} [{distributions[name]}]" if name in distributions else name
            )
        return registry

    def origin(self, cls: type) -> str:
        """`plugin NAME [DISTRIBUTION VERSION]` for the plugin that registered cls (a provider or an action),
        for the error its code raised; the module that defines cls when it came from no plugin manager."""
        return f"plugin {self.origins.get(cls, cls.__module__)}"


def _distributions(pm: pluggy.PluginManager) -> dict[str, str]:
    """`PROJECT VERSION` of each plugin installed from a distribution (an entry point), by plugin name."""
    return {
        name: f"{dist.project_name} {dist.version}"
        for plugin, dist in pm.list_plugin_distinfo()
        if (name := pm.get_name(plugin)) is not None
    }


def _registered(pm: pluggy.PluginManager, hook: str, base: type) -> Iterator[Any]:
    """The classes a register_* hook returned, each checked as far as it can be before a config uses it: a
    wrong one would fail only as a traceback, when the config is compiled or a webhook comes in."""
    caller = getattr(pm.hook, hook)
    try:
        batches = caller()
    except Exception as exc:
        raise PluginError(f"{_raised_in(caller, exc)}{hook} raised {type(exc).__name__}: {exc}") from exc
    for batch in batches:
        if not isinstance(batch, list | tuple):
            raise PluginError(
                f"{_returned_by(pm, caller, batch)}{hook} returned {_shown(batch)}, "
                f"not a list of {base.__name__} classes"
            )
        for cls in batch:
            problem = _class_problem(cls, base)
            if problem:
                raise PluginError(f"{_returned_by(pm, caller, cls)}{hook} returned {problem}")
            yield cls


def _class_problem(cls: Any, base: type) -> str | None:
    """What makes cls no registrable subclass of base (Provider, Action), or None."""
    from pydantic import BaseModel

    kind = base.__name__
    if not isinstance(cls, type):
        return f"{_shown(cls)}, not a {kind} subclass (return the class itself, not an instance)"
    if not issubclass(cls, base):
        return f"{_shown(cls)}, not a {kind} subclass"
    named = f"{kind} {cls.__module__}.{cls.__qualname__}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        given = "not set" if name is None else f"{_shown(name)}"
        return f"{named}, whose name is {given}: set `name` to the non-empty string routes.yaml uses"
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        return f"{named} ({name!r}), which does not implement {missing}"
    options = getattr(cls, "Options", None)
    if not isinstance(options, type) or not issubclass(options, BaseModel):
        return f"{named} ({name!r}), whose Options is {_shown(options)}, not a pydantic model (a BaseModel subclass)"
    return None


def _shown(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    article = "an" if type(value).__name__[0] in "aeiouAEIOU" else "a"
    return f"{reprlib.repr(value)} ({article} {type(value).__name__})"


def _raised_in(caller: Any, exc: BaseException) -> str:
    """`plugin NAME: ` for the implementation the traceback passes through, or nothing."""
    name = raised_by(caller, exc)
    return f"plugin {name}: " if name is not None else ""


def raised_by(caller: Any, exc: BaseException) -> str | None:
    """The plugin whose implementation of the hook (`pm.hook.NAME`) the traceback passes through, or None."""
    codes: dict[Any, str] = {
        getattr(impl.function, "__code__", None): impl.plugin_name for impl in caller.get_hookimpls()
    }
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            return codes[tb.tb_frame.f_code]
        tb = tb.tb_next
    return None


def _returned_by(pm: pluggy.PluginManager, caller: Any, value: Any) -> str:
    """`plugin NAME: ` for the plugin that returned value, or nothing. Only on the way to an error: each
    implementation is called again (register_* hooks are free of side effects), and failing that the plugin
    is the module that defines value's class."""
    for impl in caller.get_hookimpls():
        if impl.wrapper or impl.hookwrapper:
            continue
        with contextlib.suppress(Exception):
            returned = impl.function()
            if returned is value or returned == value or value in returned:
                return f"plugin {impl.plugin_name}: "
    module = value.__module__ if isinstance(value, type) else type(value).__module__
    for name, plugin in pm.list_name_plugin():
        if getattr(plugin, "__name__", None) == module:
            return f"plugin {name}: "
    return ""


def plugin_of(pm: pluggy.PluginManager, cls: type) -> str:
    """The name of the plugin that registered cls (a provider or an action), as `hookyard plugins` lists it,
    for error messages: the plugin whose register_providers or register_actions returns it (called again:
    those hooks are free of side effects); failing that, the plugin whose module or package defines it (a
    packaged plugin's classes are in modules of their own); else the module's own name."""
    for hook in ("register_providers", "register_actions"):
        for impl in getattr(pm.hook, hook).get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                continue
            with contextlib.suppress(Exception):
                if cls in (impl.function() or ()):
                    return str(impl.plugin_name)
    for name, plugin in pm.list_name_plugin():
        module = plugin.__name__ if inspect.ismodule(plugin) else type(plugin).__module__
        if cls.__module__ == module or cls.__module__.startswith(f"{module}."):
            return name
    return cls.__module__


def _add(table: dict[str, type], name: str, cls: type, kind: str) -> None:
    if name in table and table[name] is not cls:
        raise DuplicateName(
            f"{kind} {name!r} is registered twice: by {table[name].__module__} and {cls.__module__}"
        )
    table[name] = cls


def registry(pm: pluggy.PluginManager | None = None) -> Registry:
    return Registry.collect(pm or plugin_manager())
