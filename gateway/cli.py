"""The `hookyard` command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import click
import pluggy
from click.core import ParameterSource

from gateway import __version__
from gateway.config import (
    CONFIG_ENV_VAR,
    Config,
    ConfigError,
    OpsListener,
    default_config_path,
    json_schema,
    load_config_for,
)
from gateway.http_client import header_control_character
from gateway.plugins import PluginError, Registry, plugin_manager
from gateway.providers import Provider
from gateway.routing import RouteTable, load_routes
from gateway.storage import StorageUnavailable, open_storage
from gateway.tasks import cancel_and_wait

T = TypeVar("T")
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _together(*decorators: Decorator) -> Decorator:
    """One decorator for several, applied as if stacked in this order above the command (so their options
    are listed in this order in its --help)."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Path to routes.yaml (default: $HOOKYARD_CONFIG or ./routes.yaml).",
)


def _plugins() -> pluggy.PluginManager:
    """The plugin manager; a plugin that cannot be loaded as it is (a misspelt hook, an `async def`
    observer, a wrapper on startup) ends the command with one line naming it, not a traceback."""
    try:
        return plugin_manager()
    except (pluggy.PluginValidationError, PluginError) as exc:
        click.echo(f"hookyard: {exc}", err=True)
        raise SystemExit(1) from None


def _registry() -> Registry:
    try:
        return Registry.collect(_plugins())
    except PluginError as exc:  # a name registered twice, a hook that raised or returned no class
        click.echo(f"hookyard: {exc}", err=True)
        raise SystemExit(1) from None


def _config_errors(path: Path, exc: ConfigError, *, given: bool = True) -> SystemExit:
    """Print a ConfigError's lines on stderr, each naming the file: what to raise. given: False when no -c
    named the file, so that a file that cannot be read says where its path came from."""
    for line in exc.errors:
        line = line if line.startswith(str(path)) else f"{path}: {line}"
        if not given and line.startswith(f"{path}: cannot read: "):
            line += (
                f" (the file ${CONFIG_ENV_VAR} names)"
                if os.environ.get(CONFIG_ENV_VAR)
                else f" (no -c PATH nor ${CONFIG_ENV_VAR} was given, so ./{path} in {Path.cwd()} was read): "
                "give the config with -c PATH"
            )
        click.echo(line, err=True)
    return SystemExit(1)


def _load(config_path: Path | None) -> tuple[Config, RouteTable]:
    path = config_path or default_config_path()
    registry = _registry()
    try:
        return load_routes(path, registry)
    except ConfigError as exc:
        raise _config_errors(path, exc, given=config_path is not None) from None


def _load_for(config_path: Path | None, needs: Collection[str]) -> Config:
    """The config as far as the sections in `needs` go, for the commands that need no more: a ${VAR} unset
    outside them (a secret, the admin token, a chat webhook's URL, which an operator's shell need not hold)
    is named in one line on stderr, not an error. Its value, were one set, is never shown."""
    return _load_for_unset(config_path, needs)[0]


def _load_for_unset(config_path: Path | None, needs: Collection[str]) -> tuple[Config, dict[str, str]]:
    """_load_for's config, and the variables left unset, each with its place: defaults stand in for a
    section that holds one."""
    path = config_path or default_config_path()
    try:
        config, unset = load_config_for(path, needs)
    except ConfigError as exc:
        raise _config_errors(path, exc, given=config_path is not None) from None
    if unset:
        named = ", ".join(f"{name} ({place})" for name, place in unset.items())
        click.echo(f"hookyard: not set, and not needed by this command: {named}", err=True)
    return config, unset


def _load_source(
    config_path: Path | None, source: str, *, needs_listen: bool
) -> tuple[RouteTable, OpsListener | None]:
    """The table of one source, for `send` and `sign`: they need its provider and secrets, and `listen:`
    where no --url is given, not the routes or the rest of the config (see _load_for). With it the ops
    listener as the file has it, where `send` may look its event up; None if a variable it holds is unset
    (the admin token, most often), which leaves defaults in its place."""
    needs = [f"sources.{source}", *(["listen"] if needs_listen else [])]
    config, unset = _load_for_unset(config_path, needs)
    ops = None if any(place.split(".")[0] == "ops" for place in unset.values()) else config.ops
    if source not in config.sources:
        known = ", ".join(sorted(config.sources))
        raise click.BadParameter(f"unknown source {source!r}; known: {known}", param_hint="SOURCE")
    alone = config.model_copy(update={"sources": {source: config.sources[source]}, "routes": []})
    try:
        return RouteTable.build(alone, _registry()), ops
    except ConfigError as exc:  # its provider unknown, or one that cannot take its options
        raise _config_errors(config_path or default_config_path(), exc) from None


def _run(coro: Awaitable[T], *, exit_with_what_is_left: bool = False) -> T:
    """Run coro to its end on a new event loop (uvloop's where it is installed), as asyncio.run does, but
    wait for the tasks still running then CANCELLED_GRACE at most once cancelled: asyncio.run waits for
    ever for one that ignores its cancellation (a plugin's, or one the shutdown gave up on), and the process
    would never exit. exit_with_what_is_left: if such a task is left once coro has returned, end the process
    there, with status 0 (see _exit_now)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is an optional speed-up
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    returned = False
    try:
        result = loop.run_until_complete(coro)
        returned = True
        return result
    finally:
        try:
            still = loop.run_until_complete(cancel_and_wait(asyncio.all_tasks(loop)))
            if still:
                logging.getLogger("hookyard").warning(
                    "tasks still running at exit; given up", extra={"count": len(still)}
                )
                if returned and exit_with_what_is_left:
                    _exit_now()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _exit_now() -> None:
    """End the process with status 0, what still runs with it. Closing the loop would destroy the tasks
    given up on: asyncio logs each as an error ("Task was destroyed but it is pending"), and a coroutine
    closed so runs its `except` and `finally` blocks, whose awaits fail with more tracebacks."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(0)


# Where a command keeps what a Ctrl-C leaves done by then (see _if_interrupted), in its click context's meta,
# which the contexts of one invocation share.
_INTERRUPTED = "hookyard.interrupted"


def _if_interrupted(note: str | Callable[[], str] | None) -> None:
    """What to say if Ctrl-C ends the command from now on: what is done, or may be, by then (a request
    the other end may have acted on before it could answer), or what makes it up then. None: nothing (a
    listing changes nothing)."""
    click.get_current_context().meta[_INTERRUPTED] = note


class _Commands(click.Group):
    """The `hookyard` group. A command ended by Ctrl-C exits with status 130, as shells expect of one the
    user interrupted (128 + SIGINT), and says what it may have done: click's `Aborted!` and status 1 read
    as a failure, and as if nothing had been done. (`serve` and `sink` stop on Ctrl-C by themselves.)"""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if note := ctx.meta.get(_INTERRUPTED):
                click.echo(f"hookyard: interrupted: {note() if callable(note) else note}", err=True)
            raise click.exceptions.Exit(130) from None


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="hookyard")
def main() -> None:
    """Hookyard: verify, persist, route and deliver webhooks."""


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Serve the webhook and ops listeners until SIGTERM or Ctrl-C."""
    from gateway.app import Gateway
    from gateway.logs import configure_logging

    config, _ = _load(config_path)
    configure_logging(config.log.level, config.log.format)
    try:
        gateway = Gateway(config, config_path=config_path or default_config_path())
        _run(gateway.serve(freeze_startup_objects=True), exit_with_what_is_left=True)
    except (StorageUnavailable, OSError) as exc:
        click.echo(f"hookyard: {_reason(exc)}", err=True)
        raise SystemExit(1) from None
    except PluginError as exc:  # a startup hook, or an action's constructor, failed
        click.echo(f"hookyard: {exc}", err=True)
        raise SystemExit(1) from None


def _reason(exc: Exception) -> str:
    # An OSError made with an errno reads `[Errno 98] cannot listen on ...`: its message is what to say.
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror and exc.filename is None:
        return exc.strerror
    return str(exc)


@main.command()
@config_option
def check(config_path: Path | None) -> None:
    """Validate a config file: exit 1 listing every error."""
    from gateway.routing import never_matched

    config, table = _load(config_path)
    routes = sum(len(routes) for routes in table.routes.values())
    click.echo(f"ok: {_counted(len(config.sources), 'source')}, {_counted(routes, 'route')}")
    # Not errors: a provider may start sending a type it did not list.
    for warning in never_matched(config, table):
        click.echo(f"hookyard: warning: {warning}", err=True)


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


@main.command()
def schema() -> None:
    """Print the JSON Schema of routes.yaml (for editors)."""
    click.echo(json.dumps(json_schema(), indent=2))


@main.command("plugins")
def list_plugins() -> None:
    """List loaded plugins with the providers and actions they register."""
    pm = _plugins()
    _registry()  # a plugin that registers what the gateway would refuse is named, as `check` names it
    distributions = {
        id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()
    }
    for name, plugin in pm.list_name_plugin():
        providers = [p.name for p in _registered(pm, plugin, "register_providers")]
        actions = [a.name for a in _registered(pm, plugin, "register_actions")]
        parts = [f"providers: {', '.join(providers)}"] if providers else []
        parts += [f"actions: {', '.join(actions)}"] if actions else []
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        distribution = distributions.get(id(plugin))
        origin = f" [{distribution}]" if distribution else ""
        click.echo(f"{name}{origin}  ({'; '.join(parts) or 'hooks: ' + ', '.join(hooks)})")


def _registered(pm: pluggy.PluginManager, plugin: Any, hook: str) -> list[Any]:
    """What `plugin` registers through `hook`, as the gateway collects it: from its implementation of the
    hook whatever the function is named (`specname`), a None answer being none (pluggy drops it)."""
    registered: list[Any] = []
    for impl in getattr(pm.hook, hook).get_hookimpls():
        if impl.plugin is plugin:
            answer = impl.function()
            registered += answer if answer is not None else []
    return registered


# The options the commands on stored events share. Where one means something else to each command, its
# help is the command's own.
operator_options = _together(
    config_option,
    click.option(
        "--admin-url",
        envvar="HOOKYARD_ADMIN_URL",
        help="Talk to a running gateway's admin API (e.g. http://127.0.0.1:9000) instead of the database; "
        "the token comes from $HOOKYARD_ADMIN_TOKEN.",
    ),
)


class _Text(click.types.StringParamType):
    """Text as the store and the admin API hold it: UTF-8. Python reads an argument that is not (`$'ev\\xff'`
    in bash) with a lone surrogate for each byte it cannot decode, which neither sqlite3 nor a URL or JSON
    can carry: refused as a usage error, not left to end the command on a traceback."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text: str = super().convert(value, param, ctx)
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError:
                self.fail(f"{text!r} is not UTF-8, and names nothing stored", param, ctx)
        return text


TEXT = _Text()


class _Time(_Text):
    """A --since or --until, checked here so that one that is no time is a usage error naming its option.
    The text goes on as given: a `2h` is read where the window is fixed (through --admin-url, by the
    gateway's clock), so the check reads no clock."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from gateway.operations import OperationError, parse_time

        text = super().convert(value, param, ctx)
        try:
            parse_time(text, "time", now=lambda: 0.0)
        except OperationError as exc:
            self.fail(str(exc).removeprefix("time: "), param, ctx)
        return text


def source_option(help: str) -> Decorator:
    return click.option("--source", type=TEXT, help=help)


def route_option(help: str) -> Decorator:
    return click.option("--route", type=TEXT, help=help)


def window_options(*, since: str, until: str) -> Decorator:
    return _together(
        click.option("--since", type=_Time(), help=since), click.option("--until", type=_Time(), help=until)
    )


def _check_window(since: str | None, until: str | None) -> None:
    """A window that holds no time (`--since 1h --until 2h`, the wrong way round) is a usage error naming
    both options, not an empty listing or a replay of nothing. Read by this machine's clock: the two
    durations of one window are counted back from the same moment wherever it is read."""
    from gateway.operations import OperationError, parse_window

    if since is None or until is None:
        return
    try:
        parse_window(since, until, ("--since", "--until"))
    except OperationError as exc:
        raise click.UsageError(str(exc)) from None


def json_option(help: str) -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=help)


def page_option(name: str, *, default: int, help: str) -> Decorator:
    """How many a page holds: at most 500, what the admin API answers at most (operations.MAX_PAGE, not
    imported here: the CLI loads gateway.operations only for the commands that use it)."""
    return click.option(name, type=click.IntRange(1, 500), default=default, show_default=True, help=help)


def _operate(
    config_path: Path | None,
    admin_url: str | None,
    work: Callable[[Any], Awaitable[T]],
    *,
    routes: bool = False,
    types: bool = False,
) -> T:
    """Run `work` with Operations on the database named by the config, or on a running gateway.

    routes: whether `work` routes events (a replay of missing deliveries), for which the whole config must
    load as `serve` loads it; otherwise only its storage section is needed (see _load_for).
    types: whether `work` filters by an event type, which the sources' providers read (a name or code as
    its canonical type, see operations.canonical_type)."""
    from gateway.admin_client import RemoteOperations
    from gateway.operations import OperationError, Operations

    given_as = _admin_url_given_as()
    token = os.environ.get("HOOKYARD_ADMIN_TOKEN")
    if admin_url:
        _check_admin(admin_url, given_as, token)

    async def run() -> T:
        if admin_url:
            remote = RemoteOperations(admin_url, token, given_as=given_as)
            try:
                return await work(remote)
            finally:
                await remote.aclose()
        table = _load(config_path)[1] if routes else None
        config = table.config if table else _load_for(config_path, ["storage"])
        storage = open_storage(config.storage.url)
        try:
            await storage.open(create=False)
        except StorageUnavailable as exc:
            raise OperationError(503, str(exc)) from None
        providers = _providers(config) if types and table is None else None
        try:
            return await work(Operations(storage, table, providers=providers))
        except StorageUnavailable as exc:
            # A full or read-only disk, a lock another process holds: said as the admin API says it (503),
            # not as a traceback.
            raise OperationError(503, f"storage unavailable: {exc}") from None
        finally:
            await storage.close()

    try:
        return _run(run())
    except OperationError as exc:
        # An id in several sources (409): the option that names one, which the store's words do not. A
        # 401: where the token comes from, and whether one was sent.
        hint = " with --source" if exc.status == 409 else ""
        if exc.status == 401:
            hint = (
                ": $HOOKYARD_ADMIN_TOKEN is not the gateway's ops.admin_token"
                if token and token.strip()
                else ": set $HOOKYARD_ADMIN_TOKEN to the gateway's ops.admin_token"
            )
        click.echo(f"hookyard: {exc}{hint}", err=True)
        raise SystemExit(1) from None


def _admin_url_given_as() -> str:
    """How the user gave --admin-url, to name it so in errors: the option, or the variable."""
    from_env = click.get_current_context().get_parameter_source("admin_url") == ParameterSource.ENVIRONMENT
    return "$HOOKYARD_ADMIN_URL" if from_env else "--admin-url"


def _check_admin(admin_url: str, given_as: str, token: str | None) -> None:
    """An admin URL and token that no request could be sent with are a usage error, before anything is done."""
    _check_target(admin_url, given_as, "http://127.0.0.1:9000")
    _check_no_credentials(admin_url, given_as)
    if token is not None and header_control_character(token.strip()) is not None:
        # Not shown: the HTTP library's refusal would repeat the header, token and all.
        raise click.UsageError(
            "$HOOKYARD_ADMIN_TOKEN holds a line break or another control character, which no header "
            "can carry (two lines of a file?); it is not shown"
        )


def _providers(config: Config) -> dict[str, Provider]:
    """Each source's provider, for reading a type filter through its catalog, as the gateway reads it. Made
    from the config as far as _load_for reads it: a source whose provider cannot be made so (unknown, or
    refusing its options or its secrets, a ${VAR} unset here) has none, and the type is taken as given."""
    registry = _registry()
    providers: dict[str, Provider] = {}
    for name, source in config.sources.items():
        provider_cls = registry.providers.get(source.provider)
        if provider_cls is None:
            continue
        try:
            providers[name] = provider_cls(name, source)
        except Exception:  # options refused, or a plugin's bug: `hookyard check` says what is wrong
            continue
    return providers


@main.group()
def events() -> None:
    """Inspect stored events."""


@events.command("list")
@operator_options
@click.option(
    "--state",
    type=click.Choice(["pending", "delivered", "dead", "unrouted"]),
    help="Only events with a delivery still to run (pending), all final and none dead (delivered), one "
    "dead at least (dead), or no delivery (unrouted).",
)
@source_option("Only events of this source.")
@click.option(
    "--type",
    "event_type",
    type=TEXT,
    help="Only events of this type: the canonical one (consignment.created), or a name or code as a "
    "route's events: takes it (ConsignmentCreated, 101).",
)
@route_option("Only events with a delivery for this route.")
@window_options(
    since="Only events received in this window (2h) or since a time (ISO 8601).",
    until="Only events received before this time.",
)
@page_option("--limit", default=50, help="Events per page (at most 500).")
@click.option("--cursor", type=int, help="The next page: the cursor the page before ended with.")
@json_option("One JSON object per line.")
def events_list(
    config_path: Path | None,
    admin_url: str | None,
    state: str | None,
    source: str | None,
    event_type: str | None,
    route: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: int | None,
    as_json: bool,
) -> None:
    """List events, newest first, a page at a time."""
    _check_window(since, until)
    page = _operate(
        config_path,
        admin_url,
        lambda ops: ops.list_events(
            state=state,
            source=source,
            type=event_type,
            route=route,
            since=since,
            until=until,
            cursor=cursor,
            limit=limit,
        ),
        types=bool(event_type),
    )
    if not page["events"]:
        # On stderr, as the hint below: a listing with nothing in it looks the same as one that failed.
        click.echo("no events", err=True)
    for row in page["events"]:
        if as_json:
            click.echo(json.dumps(row))
        else:
            source, event_type, event_id = (_one_line(row[name]) for name in ("source", "type", "id"))
            click.echo(f"{row['received_at']}  {row['state']:<9}  {source:<14} {event_type:<32} {event_id}")
    if page["next_cursor"] is not None:
        # On stderr: the listing on stdout stays one event per line for whatever reads it.
        click.echo(f"more: the same command with --cursor {page['next_cursor']}", err=True)


def _one_line(text: str) -> str:
    """An id or a type as the sender wrote it, its line breaks and other control characters escaped (`\\n`):
    printed as they are, they would start lines that read as events of their own."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


@events.command("show")
@operator_options
@click.argument("event_id", type=TEXT)
@source_option("The event's source (needed when the same id exists in several).")
@json_option("The event on one line (default: indented).")
def events_show(
    config_path: Path | None, admin_url: str | None, event_id: str, source: str | None, as_json: bool
) -> None:
    """Show an event with its deliveries and every attempt."""
    detail = _operate(config_path, admin_url, lambda ops: ops.show_event(event_id, source))
    click.echo(json.dumps(detail, indent=None if as_json else 2))


@main.command()
@operator_options
@click.argument("event_id", type=TEXT, required=False)
@source_option("The event's source (needed when the same id exists in several).")
@click.option("--action", type=TEXT, help="Only this action.")
@click.option(
    "--state",
    type=click.Choice(["dead", "missing"]),
    help="Bulk: every dead delivery, or every event not yet delivered for an action the current config "
    "routes it to (missing ones are created).",
)
@window_options(
    since="With --state: the window, e.g. 2h (or an ISO 8601 time).",
    until="With --state: the end of the window.",
)
@route_option("Only this route (an event's route, or with --state).")
@page_option(
    "--page-size",
    default=500,
    help="With --state: deliveries (dead) or events (missing) per page; progress is shown after each "
    "but the last.",
)
@json_option(
    "The admin API's answer on one line; with --state, the counts summed over the pages "
    '(`{"replayed": 5, "created": 3, "pending": 0}`).'
)
def replay(
    config_path: Path | None,
    admin_url: str | None,
    event_id: str | None,
    source: str | None,
    action: str | None,
    state: str | None,
    since: str | None,
    until: str | None,
    route: str | None,
    page_size: int,
    as_json: bool,
) -> None:
    """Run deliveries again: an event's (EVENT_ID), or in bulk (--state dead|missing --since 2h)."""
    if event_id is not None and state is not None:
        raise click.UsageError("give an EVENT_ID or --state dead|missing, not both")
    if event_id is None and state is None:
        raise click.UsageError("give an EVENT_ID, or --state dead|missing for a bulk replay")
    if state is not None:
        # `--since "$WINDOW"` with the variable unset: read as no window, it replayed every dead delivery in
        # the store, far wider than the window meant.
        empty = [name for name, value in (("--since", since), ("--until", until)) if value == ""]
        if empty:
            raise click.UsageError(
                f"{', '.join(empty)}: empty (a variable not set?): give a time, e.g. 2h, or leave the option out"
            )
    if state == "missing" and since is None:
        raise click.UsageError("--since is required with --state missing, e.g. --since 2h")
    if state is not None:
        _check_window(since, until)
    if event_id is not None:
        ignored = [name for name, value in (("--since", since), ("--until", until)) if value is not None]
        if click.get_current_context().get_parameter_source("page_size") != ParameterSource.DEFAULT:
            ignored.append("--page-size")
        if ignored:
            raise click.UsageError(f"{', '.join(ignored)}: only with --state, not with an EVENT_ID")
        _if_interrupted(
            f"the replay may have been done all the same (`hookyard events show {shlex.quote(_one_line(event_id))}` "
            "shows it)"
        )

        async def one(ops: Any) -> dict[str, Any]:
            answer: dict[str, Any] = await ops.replay_event(event_id, source, action, route)
            _if_interrupted(
                f"the replay was done: {_replaying(answer['replayed'], pending=answer.get('pending', 0))}"
            )
            return answer

        result = _operate(config_path, admin_url, one)
        if as_json:
            click.echo(json.dumps(result))
        else:
            # A gateway of an earlier version does not answer `pending`.
            click.echo(_replaying(result["replayed"], pending=result.get("pending", 0)))
        return

    async def bulk(ops: Any) -> tuple[int, int, int]:
        # As given for the first page, which fixes the window (`2h` before it, ending then at the latest)
        # by the clock of whoever runs it: through --admin-url, the gateway's, which wrote the deliveries'
        # times. This machine's may be behind it, and would leave out what ended dead in the last seconds.
        # The later pages carry the window the first answered (see Operations.replay).
        from gateway.operations import parse_time

        window: dict[str, Any] = {"since": since, "until": until}
        fixed_here = False
        replayed = created = pending = 0
        cursor: int | None = 0
        while cursor is not None:
            # A page is one request, which the gateway may carry out whether or not its answer is read.
            _if_interrupted(
                f"after {replayed} replayed, {created} created; the page under way may have been replayed "
                "all the same, and the same command again replays what is left"
            )
            page = await ops.replay(
                mode=state,
                **window,
                source=source,
                route=route,
                action=action,
                cursor=cursor,
                limit=page_size,
            )
            replayed, created, cursor = (
                replayed + page["replayed"],
                created + page["created"],
                page["next_cursor"],
            )
            pending += page.get("pending", 0)  # a gateway of an earlier version does not answer it
            if "since" in page:
                window = {"since": page["since"], "until": page["until"]}
            elif not fixed_here:
                # A gateway of a version before the window was answered: fixed here, by this clock, after
                # the first page (as the CLI did then), so that the later pages still keep to one window.
                ends, now = parse_time(until, "until"), time.time()
                window = {"since": parse_time(since), "until": now if ends is None else min(ends, now)}
                fixed_here = True
            if cursor is not None:  # a long replay shows its progress
                click.echo(f"... {replayed} replayed, {created} created", err=True)
        _if_interrupted(f"the replay was done: {_replaying(replayed, created, pending)}")
        return replayed, created, pending

    replayed, created, pending = _operate(config_path, admin_url, bulk, routes=state == "missing")
    if as_json:
        # The pages' sums: their cursors and window are the CLI's business, not a script's.
        click.echo(json.dumps({"replayed": replayed, "created": created, "pending": pending}))
    else:
        click.echo(_replaying(replayed, created, pending))


def _replaying(replayed: int, created: int = 0, pending: int = 0) -> str:
    """`replaying 1 delivery`, `replaying 5 deliveries, created 1 missing one`, `replaying 0 deliveries; 1
    left alone: still pending (in flight, due or waiting)`."""
    text = f"replaying {replayed} {'delivery' if replayed == 1 else 'deliveries'}"
    if created:
        text += f", created {created} missing {'one' if created == 1 else 'ones'}"
    if pending:
        text += f"; {pending} left alone: still pending (in flight, due or waiting)"
    return text


# What `send` and `sign` share: which source, which event, and where to.
event_options = _together(
    config_option,
    click.argument("source"),
    click.option("--type", "event_type", required=True, help="Event type, e.g. user.created."),
    click.option("--data", help="The event's data as JSON, or @file.json (default: a realistic sample)."),
    click.option("--id", "event_id", help="Event id (default: a new random one)."),
    click.option("--url", help="Base URL of the gateway (default: from listen: in the config)."),
)


def _parse_data(data: str | None) -> Any:
    if data is None:
        return None
    try:
        text = Path(data[1:]).read_text(encoding="utf-8") if data.startswith("@") else data
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise click.BadParameter(f"cannot read {data[1:]}: {reason}", param_hint="--data") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from None
    except RecursionError:  # Python's json stops near its recursion limit
        raise click.BadParameter("nested too deeply to read", param_hint="--data") from None


class _Signed(NamedTuple):
    table: RouteTable
    ops: OpsListener | None  # as _load_source reads it
    path: str
    body: bytes
    headers: dict[str, str]


def _signed_request(
    config_path: Path | None,
    source: str,
    event_type: str,
    data: str | None,
    event_id: str | None,
    url: str | None,
) -> _Signed:
    """The source's request, signed; a --type its provider never sends is said on stderr first (a typo
    would leave the event unrouted without a word), and the request is made all the same."""
    import orjson

    from gateway.providers import unknown_type
    from gateway.sender import build_request, find_endpoint

    table, ops = _load_source(config_path, source, needs_listen=not url)
    if (warning := unknown_type(find_endpoint(table, source).provider, event_type)) is not None:
        click.echo(f"hookyard: warning: {warning}", err=True)
    try:
        path, body, headers = build_request(table, source, event_type, _parse_data(data), event_id)
    except orjson.JSONEncodeError as exc:  # nested past 254 levels, an integer past 64 bits
        raise click.BadParameter(f"cannot be written as JSON: {exc}", param_hint="--data") from None
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="SOURCE") from None
    except ValueError as exc:  # e.g. a source with only public keys cannot sign
        raise click.UsageError(f"cannot sign for {source}: {exc}") from None
    except PluginError as exc:  # its provider's sign or sample_payload failed: a bug of the plugin's
        raise click.ClickException(f"cannot sign for {source}: {exc}") from None
    return _Signed(table, ops, path, body, headers)


@main.command()
@event_options
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Send this many events (each its own id).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Requests in flight at once with --count.",
)
@click.option(
    "--admin-url",
    envvar="HOOKYARD_ADMIN_URL",
    help="The gateway's ops listener, where the event is looked up to say if no route matched it "
    "(default: from ops: in the config, without --url); the token comes from $HOOKYARD_ADMIN_TOKEN.",
)
def send(
    config_path: Path | None,
    source: str,
    event_type: str,
    data: str | None,
    event_id: str | None,
    url: str | None,
    count: int,
    concurrency: int,
    admin_url: str | None,
) -> None:
    """Send a test event, signed exactly as SOURCE's provider signs it, and print the answer."""
    import httpx

    from gateway import sender
    from gateway.http_client import shown_url_with_path
    from gateway.sender import build_request, listen_url, send_many, source_url
    from gateway.sender import send as post

    table, ops, path, body, headers = _signed_request(config_path, source, event_type, data, event_id, url)
    target = source_url(url or listen_url(table), path)
    _check_target(target)
    lookup = _lookup_for(admin_url, None if url else ops) if count == 1 else None
    if count > 1:
        if event_id is not None:
            raise click.UsageError("--id names one event; leave it out with --count")
        parsed = _parse_data(data)
        requests = [build_request(table, source, event_type, parsed)[1:] for _ in range(count)]
        statuses: Counter[str] = Counter()
        _if_interrupted(lambda: _sent_so_far(statuses, count))
        summary = _run(send_many(target, requests, concurrency, statuses))
        _if_interrupted(None)
        click.echo(summary.describe())
        if set(summary.statuses) == {"ConnectError"}:  # nothing listens there, as for one event below
            click.echo(
                f"hookyard: cannot reach {shown_url_with_path(target)}: none of the {count} requests could "
                f"connect{_NOT_LISTENING}",
                err=True,
            )
        raise SystemExit(0 if summary.all_succeeded else 1)
    _if_interrupted("the event may have been taken all the same (`hookyard events list` shows it if it was)")
    try:
        response = post(target, body, headers)
    except (httpx.ReadTimeout, httpx.WriteTimeout):
        # Reached, but not answered: a gateway whose store is locked holds the webhook until its commit is
        # on disk, and may answer 200 after this. Not `cannot reach`, which would say it never got there.
        click.echo(
            f"hookyard: {shown_url_with_path(target)} did not answer within {sender.SEND_TIMEOUT:g} s; the "
            "event may have been taken all the same (`hookyard events list` shows it if it was)",
            err=True,
        )
        raise SystemExit(1) from None
    except Exception as exc:
        # Where it was sent, path and all (--url may have a path of its own), without the credentials.
        reason = f"hookyard: cannot reach {shown_url_with_path(target)}: {exc}"
        if isinstance(exc, httpx.ConnectError):  # nothing listens there: most often, no gateway yet
            reason += _NOT_LISTENING
        click.echo(reason, err=True)
        raise SystemExit(1) from None
    click.echo(f"{response.status_code} {response.text}")
    _if_interrupted(None)  # its answer, printed, says what was done
    if not response.is_success:
        raise SystemExit(1)
    if lookup is not None:
        _say_if_unrouted(lookup, source, response)


def _sent_so_far(statuses: Counter[str], count: int) -> str:
    """What `send --count` says when Ctrl-C ends it: the answers so far, and that those under way may have
    been taken all the same."""
    answered = sum(statuses.values())
    seen = "".join(f", {status}: {number}" for status, number in sorted(statuses.items()))
    return (
        f"{answered} of {count} sent and answered{seen}; those under way may have been taken all the same "
        "(`hookyard events list` shows those that were)"
    )


class _Lookup(NamedTuple):
    """Where `send` looks its event up: an admin API, and how to name it in errors."""

    url: str
    token: str | None
    given_as: str


# How long `send` waits for the admin API's answer on its event: a look-up, not what was asked for.
LOOKUP_TIMEOUT = 3.0


def _lookup_for(admin_url: str | None, ops: OpsListener | None) -> _Lookup | None:
    """The admin API `send` looks its event up on: --admin-url ($HOOKYARD_ADMIN_URL), checked as the
    operator commands check it; else the ops listener of the config whose `listen:` it sends to (`ops`,
    None with --url), with the config's admin token if the environment has none; else none."""
    from gateway.sender import listener_url

    token = os.environ.get("HOOKYARD_ADMIN_TOKEN")
    if admin_url:
        given_as = _admin_url_given_as()
        _check_admin(admin_url, given_as, token)
        return _Lookup(admin_url, token, given_as)
    if ops is None or ops.port == 0:  # port 0: chosen at start, so not known here
        return None
    return _Lookup(listener_url(ops), token if token is not None else ops.admin_token, "ops:")


def _say_if_unrouted(lookup: _Lookup, source: str, response: Any) -> None:
    """Say on stderr when the event the gateway took matched no route: nothing will be delivered, and a
    typo'd --type, or a type no route lists, is otherwise told apart from a slow receiver only by looking.
    An admin API that cannot be reached is said nothing of; any other failure to look is one line."""
    from gateway.admin_client import RemoteOperations
    from gateway.operations import OperationError

    try:
        event_id = response.json()["id"]
    except (ValueError, KeyError, TypeError):  # not the gateway's answer: nothing to look up
        return
    if not isinstance(event_id, str):
        return

    async def look() -> dict[str, Any]:
        remote = RemoteOperations(lookup.url, lookup.token, timeout=LOOKUP_TIMEOUT, given_as=lookup.given_as)
        try:
            return await remote.show_event(event_id, source)
        finally:
            await remote.aclose()

    try:
        detail = _run(look())
    except OperationError as exc:
        if exc.status != 503:  # 503: nothing answers there (no ops listener, or not this host's)
            click.echo(f"hookyard: cannot tell whether a route matched the event: {exc}", err=True)
        return
    if not detail["deliveries"]:
        click.echo(
            f"hookyard: no route matched type {_one_line(detail['type'])} from source {_one_line(source)}: "
            "nothing will be delivered",
            err=True,
        )


# What `send` adds where nothing listens at its URL: most often, the gateway is not started yet.
_NOT_LISTENING = (
    ": is the gateway running there? Start it with `hookyard serve`, or give its address with --url"
)


def _check_target(target: str, option: str = "--url", example: str = "http://127.0.0.1:8080") -> None:
    """A URL that could never be sent to is a usage error, not a traceback (--count, --admin-url) or a
    failed request."""
    import httpx

    from gateway.http_client import shown_url_with_path

    try:
        parsed = httpx.URL(target)
    except httpx.InvalidURL as exc:
        # httpx's words repeat what it read (`Invalid port: 'pa'`), which, in `user:pa/ss@host`, is the start
        # of a password.
        problem = str(exc)
        if "@" in target:
            problem = (
                "it cannot be read; a '/', '?' or '#' in a user name or password must be percent-encoded"
            )
        raise click.BadParameter(f"{shown_url_with_path(target)!r}: {problem}", param_hint=option) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise click.BadParameter(
            f"{shown_url_with_path(target)!r} is not an http(s) URL, e.g. {example}", param_hint=option
        )


def _check_no_credentials(admin_url: str, given_as: str) -> None:
    """The admin API takes a bearer token only: httpx would send a URL's `user:pass@` as Basic auth in its
    place, and the gateway's 401 would then say the token is wrong, though $HOOKYARD_ADMIN_TOKEN holds the
    right one. Shown without them."""
    import httpx

    from gateway.http_client import shown_url_with_path

    if httpx.URL(admin_url).userinfo:
        raise click.BadParameter(
            f"{shown_url_with_path(admin_url)!r}: credentials in the URL are not used; the admin token "
            "comes from $HOOKYARD_ADMIN_TOKEN",
            param_hint=given_as,
        )


@main.command()
@event_options
def sign(
    config_path: Path | None,
    source: str,
    event_type: str,
    data: str | None,
    event_id: str | None,
    url: str | None,
) -> None:
    """Print a curl command that sends a signed test event (the signature's timestamp starts now)."""
    import shlex

    from gateway.sender import listen_url, source_url

    table, _, path, body, headers = _signed_request(config_path, source, event_type, data, event_id, url)
    target = source_url(url or listen_url(table), path)
    parts = ["curl", "-sS", "-X", "POST", shlex.quote(target)]
    for name, value in headers.items():
        parts += ["-H", shlex.quote(f"{name}: {value}")]
    parts += ["--data-binary", shlex.quote(body.decode())]
    click.echo(" ".join(parts))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=3000, show_default=True)
@click.option(
    "--status",
    type=click.IntRange(100, 599),
    default=200,
    show_default=True,
    help="Status code to answer with.",
)
@click.option(
    "--answer",
    "answers",
    multiple=True,
    metavar="PREFIX=STATUS",
    help="Answer STATUS to paths starting with PREFIX, e.g. --answer /hooks/consignments=400.",
)
def sink(host: str, port: int, status: int, answers: tuple[str, ...]) -> None:
    """Receive HTTP requests and print each as a JSON line (a stand-in app for trying routes), until
    Ctrl-C."""
    import uvicorn

    from gateway.app import listening_socket
    from gateway.sink import Sink

    by_prefix = {}
    for answer in answers:
        prefix, _, code = answer.rpartition("=")
        if not prefix.startswith("/") or not code.isdigit():
            raise click.BadParameter(
                f"{answer!r} is not PREFIX=STATUS, e.g. /hooks/consignments=400", param_hint="--answer"
            )
        if not 100 <= int(code) <= 599:  # what an HTTP answer can carry
            raise click.BadParameter(f"{answer!r}: the status must be 100 to 599", param_hint="--answer")
        by_prefix[prefix] = int(code)
    try:
        # Bound as serve binds its listeners, so a port that is taken is said the same way, not as
        # uvicorn's `ERROR: [Errno 98] …` with exit status 3.
        sock = listening_socket(host, port)
    except OSError as exc:
        click.echo(f"hookyard: {_reason(exc)}", err=True)
        raise SystemExit(1) from None
    config = uvicorn.Config(Sink(status, answers=by_prefix), log_level="warning", access_log=False)
    with sock, contextlib.suppress(KeyboardInterrupt):
        # Ctrl-C is how the sink is stopped: uvicorn shuts down on it, then raises it again, which click
        # would report as `Aborted!` with status 1, as for a command that failed. It ends with 0, as serve.
        uvicorn.Server(config).run(sockets=[sock])
