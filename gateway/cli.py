"""The `hookyard` command."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from gateway import __version__
from gateway.config import Config, ConfigError, default_config_path, json_schema, load_config, parse_duration
from gateway.plugins import Registry, plugin_manager
from gateway.routing import RouteTable
from gateway.storage import EventDetail, Storage, StorageUnavailable, open_storage

T = TypeVar("T")

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Path to routes.yaml (default: $HOOKYARD_CONFIG or ./routes.yaml).",
)


def _load(config_path: Path | None) -> tuple[Config, RouteTable]:
    path = config_path or default_config_path()
    registry = Registry.collect(plugin_manager())
    try:
        config = load_config(path)
        table = RouteTable.build(config, registry)
    except ConfigError as exc:
        errors = exc.errors
        if exc.config is not None:  # report the later checks' errors in the same run
            try:
                RouteTable.build(exc.config, registry)
            except ConfigError as more:
                errors = errors + more.errors
        for line in errors:
            click.echo(line if line.startswith(str(path)) else f"{path}: {line}", err=True)
        raise SystemExit(1) from None
    return config, table


def _run(coro: Awaitable[T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is an optional speed-up
        return asyncio.run(coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def _with_storage(config: Config, work: Callable[[Storage], Awaitable[T]]) -> T:
    async def run() -> T:
        storage = open_storage(config.storage.url)
        try:
            await storage.open()
        except StorageUnavailable as exc:
            click.echo(f"hookyard: {exc}", err=True)
            raise SystemExit(1) from None
        try:
            return await work(storage)
        finally:
            await storage.close()

    return _run(run())


@click.group()
@click.version_option(__version__, prog_name="hookyard")
def main() -> None:
    """Hookyard: verify, persist, route and deliver webhooks."""


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Serve the webhook and ops listeners until SIGTERM."""
    from gateway.app import Gateway
    from gateway.logs import configure_logging

    config, _ = _load(config_path)
    configure_logging(config.log.level, config.log.format)
    try:
        _run(Gateway(config, config_path=config_path or default_config_path()).serve())
    except (StorageUnavailable, OSError) as exc:
        click.echo(f"hookyard: {exc}", err=True)
        raise SystemExit(1) from None


@main.command()
@config_option
def check(config_path: Path | None) -> None:
    """Validate a config file: exit 1 listing every error."""
    config, table = _load(config_path)
    routes = sum(len(routes) for routes in table.routes.values())
    click.echo(f"ok: {len(config.sources)} sources, {routes} routes")


@main.command()
def schema() -> None:
    """Print the JSON Schema of routes.yaml (for editors)."""
    click.echo(json.dumps(json_schema(), indent=2))


@main.command("plugins")
def list_plugins() -> None:
    """List loaded plugins with the providers and actions they register."""
    pm = plugin_manager()
    distributions = {
        id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()
    }
    for name, plugin in pm.list_name_plugin():
        providers = [p.name for batch in _call(plugin, "register_providers") for p in batch]
        actions = [a.name for batch in _call(plugin, "register_actions") for a in batch]
        parts = [f"providers: {', '.join(providers)}"] if providers else []
        parts += [f"actions: {', '.join(actions)}"] if actions else []
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        distribution = distributions.get(id(plugin))
        origin = f" [{distribution}]" if distribution else ""
        click.echo(f"{name}{origin}  ({'; '.join(parts) or 'hooks: ' + ', '.join(hooks)})")


def _call(plugin: Any, hook: str) -> list[Any]:
    impl = getattr(plugin, hook, None)
    return [impl()] if callable(impl) else []


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return time.time() - parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None


def _time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@main.group()
def events() -> None:
    """Inspect stored events."""


@events.command("list")
@config_option
@click.option("--state", type=click.Choice(["pending", "delivered", "dead", "unrouted"]))
@click.option("--source")
@click.option("--since", help="Only events received in this window, e.g. 2h.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events_list(
    config_path: Path | None,
    state: str | None,
    source: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List events, newest first."""
    config, _ = _load(config_path)
    rows = _with_storage(
        config, lambda s: s.list_events(state=state, source=source, since=_since(since), limit=limit)
    )
    for row in rows:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "id": row.id,
                        "source": row.source,
                        "type": row.type,
                        "received_at": _time(row.received_at),
                        "state": row.state,
                    }
                )
            )
        else:
            click.echo(f"{_time(row.received_at)}  {row.state:<9}  {row.source:<14} {row.type:<32} {row.id}")


@events.command("show")
@config_option
@click.argument("event_id")
@click.option("--source")
@click.option("--json", "as_json", is_flag=True)
def events_show(config_path: Path | None, event_id: str, source: str | None, as_json: bool) -> None:
    """Show an event with its deliveries and every attempt."""
    config, _ = _load(config_path)
    details = _with_storage(config, lambda s: s.get_event(event_id, source))
    if not details:
        click.echo(f"no event {event_id!r}", err=True)
        raise SystemExit(1)
    for detail in details:
        click.echo(json.dumps(_describe(detail), indent=None if as_json else 2))


def _describe(detail: EventDetail) -> dict[str, Any]:
    event = detail.event
    return {
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "occurred_at": _time(event.occurred_at),
        "received_at": _time(event.received_at),
        "verified": event.verified,
        "payload": event.payload,
        "deliveries": [
            {
                "route": d.route,
                "action": d.action,
                "state": d.state,
                "attempts": [
                    {
                        "number": a.number,
                        "at": _time(a.started_at),
                        "duration_ms": round(a.duration * 1000, 1),
                        "outcome": a.outcome,
                        "status_code": a.status_code,
                        "error": a.error,
                    }
                    for a in detail.attempts.get(d.id, [])
                ],
                "next_attempt_at": _time(d.due_at) if d.state == "pending" else None,
            }
            for d in detail.deliveries
        ],
    }


@main.command()
@config_option
@click.argument("event_id", required=False)
@click.option("--source", help="The event's source, when the same id exists in several.")
@click.option("--action", help="Replay only this action of the event.")
@click.option("--state", type=click.Choice(["dead"]), help="Replay every delivery in this state.")
@click.option("--since", help="With --state: only deliveries that finished in this window, e.g. 2h.")
def replay(
    config_path: Path | None,
    event_id: str | None,
    source: str | None,
    action: str | None,
    state: str | None,
    since: str | None,
) -> None:
    """Run an event's deliveries again, or every dead delivery (--state dead)."""
    if (event_id is None) == (state is None):
        raise click.UsageError("give an EVENT_ID or --state dead, not both")
    config, _ = _load(config_path)

    async def run(storage: Storage) -> int:
        now = time.time()
        if state is not None:
            return await storage.replay_dead(since=_since(since), source=source, now=now)
        assert event_id is not None
        details = await storage.get_event(event_id, source)
        if not details:
            click.echo(f"no event {event_id!r}", err=True)
            raise SystemExit(1)
        if len(details) > 1:
            sources = ", ".join(d.event.source for d in details)
            click.echo(f"event {event_id!r} exists in several sources ({sources}); pass --source", err=True)
            raise SystemExit(1)
        return await storage.replay_event(details[0].seq, action, now)

    count = _with_storage(config, run)
    click.echo(f"replaying {count} deliveries")
    if count == 0:
        sys.exit(0)


def _event_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """What `send` and `sign` share: which source, which event."""
    for option in reversed(
        [
            config_option,
            click.argument("source"),
            click.option("--type", "event_type", required=True, help="Event type, e.g. user.created."),
            click.option(
                "--data", help="The event's data as JSON, or @file.json (default: a realistic sample)."
            ),
            click.option("--id", "event_id", help="Event id (default: a new random one)."),
        ]
    ):
        command = option(command)
    return command


def _parse_data(data: str | None) -> Any:
    if data is None:
        return None
    text = Path(data[1:]).read_text() if data.startswith("@") else data
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from None


def _signed_request(
    config_path: Path | None, source: str, event_type: str, data: str | None, event_id: str | None
) -> tuple[RouteTable, str, bytes, dict[str, str]]:
    from gateway.sender import build_request

    _, table = _load(config_path)
    try:
        path, body, headers = build_request(table, source, event_type, _parse_data(data), event_id)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="SOURCE") from None
    return table, path, body, headers


@main.command()
@_event_options
@click.option("--url", help="Base URL of the gateway (default: from listen: in the config).")
@click.option("--count", default=1, show_default=True, help="Send this many events (each its own id).")
@click.option("--concurrency", default=1, show_default=True, help="Requests in flight at once with --count.")
def send(
    config_path: Path | None,
    source: str,
    event_type: str,
    data: str | None,
    event_id: str | None,
    url: str | None,
    count: int,
    concurrency: int,
) -> None:
    """Send a test event, signed exactly as SOURCE's provider signs it, and print the answer."""
    from gateway.sender import build_request, listen_url, send_many
    from gateway.sender import send as post

    table, path, body, headers = _signed_request(config_path, source, event_type, data, event_id)
    target = (url or listen_url(table)).rstrip("/") + path
    if count > 1:
        if event_id is not None:
            raise click.UsageError("--id names one event; leave it out with --count")
        parsed = _parse_data(data)
        requests = [build_request(table, source, event_type, parsed)[1:] for _ in range(count)]
        summary = _run(send_many(target, requests, concurrency))
        click.echo(summary.describe())
        raise SystemExit(0 if summary.all_succeeded else 1)
    try:
        response = post(target, body, headers)
    except Exception as exc:
        click.echo(f"cannot reach {target}: {exc}", err=True)
        raise SystemExit(1) from None
    click.echo(f"{response.status_code} {response.text}")
    if not response.is_success:
        raise SystemExit(1)


@main.command()
@_event_options
@click.option("--url", help="Base URL of the gateway (default: from listen: in the config).")
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

    from gateway.sender import listen_url

    table, path, body, headers = _signed_request(config_path, source, event_type, data, event_id)
    target = (url or listen_url(table)).rstrip("/") + path
    parts = ["curl", "-sS", "-X", "POST", shlex.quote(target)]
    for name, value in headers.items():
        parts += ["-H", shlex.quote(f"{name}: {value}")]
    parts += ["--data-binary", shlex.quote(body.decode())]
    click.echo(" ".join(parts))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True)
@click.option("--status", default=200, show_default=True, help="Status code to answer with.")
def sink(host: str, port: int, status: int) -> None:
    """Receive HTTP requests and print each as a JSON line (a stand-in app for trying routes)."""
    import uvicorn

    from gateway.sink import Sink

    uvicorn.run(Sink(status), host=host, port=port, log_level="warning", access_log=False)
