"""The Gateway: one config, one store, the webhook listener, the ops listener and the delivery engine,
wired together and run in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import inspect
import logging
import os
import resource
import signal
import socket
import ssl
import time
from collections.abc import Callable, Collection, Generator
from pathlib import Path
from typing import Any

import pluggy
import uvicorn

from gateway import __version__
from gateway.actions import Resources
from gateway.config import TLS, Config, ConfigError
from gateway.delivery import Engine, build_actions
from gateway.http_client import HttpClient, default_ssl_context
from gateway.ingress import Ingress
from gateway.launch import sigterm_caught
from gateway.logs import serving_listener
from gateway.metrics import Metrics
from gateway.ops import connections_shed, ops_app
from gateway.plugins import HookTrace, PluginError, Registry, check_implementations, plugin_manager
from gateway.protocol import (
    LINGERING_AT_MOST,
    OPS_MAX_CONNECTIONS,
    cut_off,
    ops_protocol,
    tls_protocol,
    webhook_protocol,
)
from gateway.retention import Retention
from gateway.routing import RouteTable, load_routes, never_matched
from gateway.stalls import StallWatch, plugin_sources
from gateway.storage import Storage, open_storage
from gateway.storage.sqlite import FSYNC_TIMEOUT
from gateway.tasks import CANCELLED_GRACE, DaemonThread, cancel_and_wait, wait_unless_hurried

log = logging.getLogger("hookyard")

# On SIGTERM, how long each listener waits for the requests in progress once it stops taking connections.
# A webhook is verified, stored and answered in milliseconds, and a sender cut off without an answer
# sends again; probes, scrapes and admin calls are as short. Together with delivery.shutdown_timeout
# (8 s by default) the whole shutdown is bounded: listen.drain_delay + 5 + 8 + 1 s, about 15 s with the
# defaults, well inside Kubernetes' default 30 s grace period, which a native sidecar shares with the
# app it serves (it gets SIGTERM only once the app has exited).
INGRESS_DRAIN_TIMEOUT = 5  # seconds
OPS_DRAIN_TIMEOUT = 1
# How long the ops listener keeps a connection open after an answer, for the next request (uvicorn's
# default). The kubelet opens a connection per probe; Prometheus keeps its scrape connection, and one
# closed between two scrapes (15 s to 1 min apart) is seen closed and dialled again, without an error.
OPS_IDLE_TIMEOUT = 5  # seconds
# How long the plugins' shutdown hooks may take, all of them together: one waiting on a service that stopped
# answering (a flush with no timeout of its own) is cancelled then, and the store is closed all the same.
# One that does not end on its cancellation (or blocks its thread) is left running CANCELLED_GRACE later.
SHUTDOWN_HOOKS_TIMEOUT = 5.0
# How long closing the HTTP clients that the actions share may take (then cancelled, given CANCELLED_GRACE).
# aiohttp's close waits for every connection still in use to close, and one still sending a body to a
# receiver that stopped reading (an upload an action left running) never does.
CLIENTS_CLOSE_TIMEOUT = 1.0
# How long a start that an exit cancelled (SIGTERM while starting) is waited for: the sum of the bounds of
# its clean-up (the shutdown hooks of the plugins started, the HTTP clients, closing the store). A startup
# hook that catches its cancellation and goes on is given up on then, and the process exits all the same.
START_CANCEL_BOUND = (
    SHUTDOWN_HOOKS_TIMEOUT + CANCELLED_GRACE + CLIENTS_CLOSE_TIMEOUT + CANCELLED_GRACE + FSYNC_TIMEOUT
)

# The collector looks at the youngest objects once this many more have been made than freed (Python's
# default: 700). Under load, the objects of the webhooks and deliveries in progress pass 700 every 30 or
# so forwarded webhooks, and are walked, though their reference counts free them all moments later; at
# 10,000 that hardly happens, and what a reference cycle keeps waits a little longer: a few MB at most.
GC_YOUNG_THRESHOLD = 10_000

# How long a changed config file must stay the same before the watcher loads it: an editor's save or a
# `cat >` writes a file in a few milliseconds, and a half-written one read meanwhile could still be valid.
CONFIG_SETTLE = 0.5  # seconds

# The files a gateway keeps open besides its webhook listener's connections: about 30 at rest (the store's
# database, WAL and lock, the fsync helper's pipes, both listening sockets, the event loop's own, stdio);
# the ops listener's connections (probes, scrapes and admin calls: OPS_MAX_CONNECTIONS at most); and the
# webhook listener's connections closed after their answer, for the moment they linger (LINGERING_AT_MOST).
# Deliveries add up to two per worker (delivery.concurrency): the forward action's keep-alive connections
# and aiohttp's pool.
FILES_RESERVED = 32 + OPS_MAX_CONNECTIONS + LINGERING_AT_MOST


def collect_less() -> None:
    """For a process that serves one gateway for its whole life (`hookyard serve`), once it has started.
    What exists then (modules, config, plugins: some 60,000 objects) is moved out of the collector's sight
    (gc.freeze): a full collection would otherwise walk all of it, about 17 ms here, holding up every
    webhook in progress (with a forward route, ingest p99 under load went from 28 to 11 ms without them).
    And the youngest objects are collected less often (GC_YOUNG_THRESHOLD).
    Not for a process that starts many gateways (tests): what is frozen is never collected (nor is a
    reference cycle among frozen objects that a config reload later drops: a little memory per reload,
    no more)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the Gateway, which runs two of them, and whose log lines
    name its listener (`webhook` or `ops`)."""

    def __init__(self, config: uvicorn.Config, listener: str) -> None:
        super().__init__(config)
        self.listener = listener

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # Set in the server's own task (each is one, see Gateway.serve): the other listener's keep theirs.
        serving_listener.set(self.listener)
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Gateway:
    """Parameters:
    config: a validated Config (see gateway.config.load_config).
    pm: the plugin manager; the process-wide one by default.
    storage: a Storage; by default one is opened from config.storage.url.
    config_path: the file the config came from; watched and re-read for hot reload.
    """

    def __init__(
        self,
        config: Config,
        *,
        pm: pluggy.PluginManager | None = None,
        storage: Storage | None = None,
        config_path: str | Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.pm = pm or plugin_manager()
        check_implementations(self.pm)  # again: a manager built by hand may hold plugins registered since
        self.registry = Registry.collect(self.pm)
        self.table = RouteTable.build(config, self.registry)
        self.metrics = Metrics()
        self.storage = storage or open_storage(config.storage.url)
        self.storage.on_commit = self.metrics.observe_commit
        self.storage.on_skipped = self.metrics.skipped
        self.metrics.storage_fsync_wait.set_function(self.storage.fsync_wait)
        self.ingress = Ingress(self)
        self.ops = ops_app(self)
        self.metrics.webhook_max_connections.set_function(lambda: self.ingress.max_connections)
        self.ready = False
        # Skip the hook call on the hot path when no plugin listens.
        self.observes_events = bool(self.pm.hook.event_accepted.get_hookimpls())
        self._watched = self._read_watched() if self.config_path else None
        self._resources: Resources | None = None
        self._engine: Engine | None = None
        self._retention: Retention | None = None
        self._ingress_server: _Server | None = None
        self._tls: ssl.SSLContext | None = None  # the webhook listener's, with listen.tls
        self._exit = asyncio.Event()
        self._shutting_down = False
        self._hurry = asyncio.Event()  # set once the shutdown is cut short: it waits no more
        self._reloads: set[asyncio.Task[bool]] = set()  # asked for by SIGHUP, held until done
        # One reload at a time: one refused pauses to close what it built, and a SIGHUP's meanwhile would
        # otherwise apply first, then be taken for refused (the metric, the files last seen).
        self._reloading = asyncio.Lock()
        # The plugins whose startup hook has returned: if the start fails after that, theirs is the
        # shutdown to call, as a context manager's exit runs only once its enter has finished.
        self._started_plugins: list[str] = []

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the gateway is not started")
        return self._engine

    async def start(self) -> None:
        await self.storage.open()
        try:
            await self._start_on_open_storage()
        except BaseException:
            # A startup hook, an action's constructor or the lock failed: leave no pool, thread or lock behind,
            # and let the plugins that started close what they opened.
            if self._started_plugins:
                await _call_each(
                    self.pm, "shutdown", SHUTDOWN_HOOKS_TIMEOUT, only=self._started_plugins, gateway=self
                )
            await self._close_clients()
            await self.storage.close()
            raise

    async def _start_on_open_storage(self) -> None:
        lock = getattr(self.storage, "lock_for_serving", None)
        if lock is not None:
            lock()
        release = getattr(self.storage, "release_all_leases", None)
        if release is not None:
            released = await release(time.time())
            if released:
                log.warning(
                    "resuming deliveries left in flight by the previous run", extra={"count": released}
                )
        # Shared by every action: keep-alive connections to the app make delivering cheap. The lean client
        # that forward sends each event with, and aiohttp's pool (also under httpx's API) for the others.
        user_agent = f"hookyard/{__version__}"
        ssl_context = default_ssl_context()
        client = HttpClient(ssl_context=ssl_context, user_agent=user_agent, keepalive=30)
        self._resources = Resources(
            client=client,
            user_agent=user_agent,
            ssl_context=ssl_context,
            pool=self.config.delivery.concurrency,
        )
        actions = await build_actions(self.table, self.registry, self._resources)
        self._engine = Engine(self.storage, actions, self.config.delivery, self.metrics, self.pm)
        self.storage.on_unreadable = self._engine.unreadable
        await self._start_plugins()
        self._engine.start()
        self._retention = Retention(self.storage, self.config.storage.retention, self.metrics)
        self._retention.start()
        self._warn_insecure()
        self.ready = True
        self.metrics.ready.set(1)
        # Opening the store and releasing the leases wrote to it; every /readyz checks again.
        self.metrics.storage_writable.set(1)
        log.info(
            "hookyard ready",
            extra={"sources": len(self.table.endpoints), "routes": sum(map(len, self.table.routes.values()))},
        )

    async def _start_plugins(self) -> None:
        """Each startup hook in pluggy's order, one at a time: a plugin's awaitable has finished before the
        next plugin starts, and after one raises no other is called."""
        arguments = {"gateway": self}
        trace = HookTrace(self.pm)
        for impl in reversed(self.pm.hook.startup.get_hookimpls()):
            trace.call("startup", impl.plugin_name, arguments)
            try:
                result = impl.function(*(arguments[name] for name in impl.argnames))
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                # The traceback is for the plugin's author, in the log; serve ends with one line naming it.
                log.error("a startup hook failed", exc_info=True, extra={"plugin": impl.plugin_name})
                raise PluginError(
                    f"plugin {impl.plugin_name}: startup raised {type(exc).__name__}: {exc}"
                ) from exc
            trace.finish("startup", impl.plugin_name, result)
            self._started_plugins.append(impl.plugin_name)

    async def stop(self) -> None:
        """Stop delivering (running deliveries get delivery.shutdown_timeout), then close storage."""
        self.ready = False
        self.metrics.ready.set(0)
        try:
            if self._retention is not None:
                await self._retention.stop()
            if self._engine is not None:
                await self._engine.stop(self.config.delivery.shutdown_timeout)
            await _call_each(self.pm, "shutdown", SHUTDOWN_HOOKS_TIMEOUT, hurried=self._hurry, gateway=self)
        finally:
            # Whatever failed above, the pools, the store's threads and its serving lock are let go.
            await self._close_clients()
            await self.storage.close()

    async def _close_clients(self) -> None:
        resources, self._resources = self._resources, None
        if resources is None:
            return
        closing = asyncio.ensure_future(resources.aclose())
        await wait_unless_hurried([closing], CLIENTS_CLOSE_TIMEOUT, self._hurry)
        if not closing.done():
            log.warning("HTTP clients still closing; given up", extra={"timeout_s": CLIENTS_CLOSE_TIMEOUT})
            await cancel_and_wait([closing])
        elif not closing.cancelled() and closing.exception() is not None:
            log.error("cannot close the HTTP clients", exc_info=closing.exception())

    def request_exit(self) -> None:
        """Shut down, as serve says (SIGTERM, SIGINT). Asked for while a shutdown of the serving gateway is
        already asked for or under way (a second Ctrl-C), the shutdown is cut short (_cut_short). While
        the gateway starts, it is not: the start's cancellation waits for no work in progress."""
        if self.exit_requested and self._ingress_server is not None:
            self._cut_short()
        self._exit.set()

    @property
    def exit_requested(self) -> bool:
        """Whether a shutdown has been asked for (request_exit) or is under way."""
        return self._exit.is_set() or self._shutting_down

    def _cut_short(self) -> None:
        """Wait no more for the work in progress, as if each wait's time were up: the rest of
        listen.drain_delay, the webhook requests in progress (cut off unanswered: their senders send them
        again) and the running deliveries (cancelled and released: due at once at the next start); and the
        closes that follow are given up on at once, as at the end of their time: the actions' closes, the
        plugins' shutdown hooks and the shared HTTP clients. The store's close still gets its own bound: it
        makes what was answered durable, and nothing answered is lost."""
        if self._hurry.is_set():
            return
        self._hurry.set()
        log.warning("shutdown cut short: not waiting for the work in progress")
        if self._engine is not None:
            self._engine.hurry()
        if self._ingress_server is not None:
            self._ingress_server.force_exit = True  # uvicorn stops waiting for the requests in progress

    # -- hot reload -------------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file. A new config is validated in full before anything is swapped; an
        invalid one is logged and counted, and the old one keeps serving."""
        if self.config_path is None:
            return False
        async with self._reloading:
            return await self._reload(self.config_path)

    async def _reload(self, config_path: Path) -> bool:
        if self._shutting_down:
            # A SIGHUP or a file change as the gateway stops: new actions on a stopping engine would never
            # run, and those swapped in after it stopped would never be closed.
            log.info("config reload skipped: shutting down")
            return False
        engine, resources = self._engine, self._resources
        # Read before the config is: should the files change from here on (a write in place that was not
        # finished), the next look sees it, and loads what they end up holding.
        watched = self._read_watched()
        try:
            config, table = load_routes(config_path, self.registry, allow_empty=False)
            # Built before anything is swapped: an action's constructor may raise too (a plugin's file or
            # client it prepares), and then nothing of the new config may apply. Built without a pause (one
            # comes only with a failure), so that no webhook sees a config half swapped.
            actions = (
                await build_actions(table, self.registry, resources)
                if engine is not None and resources is not None
                else None
            )
        except Exception as exc:
            # Whatever failed (a plugin's check may raise anything), the running config stays and the
            # watcher goes on: a reload never ends hot reloading.
            if isinstance(exc, ConfigError):
                errors = exc.errors
            else:
                errors = [
                    str(exc) if isinstance(exc, OSError | PluginError) else f"{type(exc).__name__}: {exc}"
                ]
            # The certificate is not the config's to hold back: a renewal that comes while a bad update
            # waits to be fixed is served at once, from the running config's paths, not once the file is
            # fixed, which may be after the old certificate has expired.
            certificate_renewed = self._watched is not None and watched[1:] != self._watched[1:]
            # Not tried again until the files change (or SIGHUP): one error per bad update, not per poll.
            self._watched = watched
            if certificate_renewed:
                self._reload_certificate()
            self.metrics.config_reloads.labels("error").inc()
            self.metrics.config_last_reload_successful.set(0)
            log.error("config reload refused; keeping the running config", extra={"errors": errors})
            return False
        # Everything else applies at once; these are bound at start-up.
        old = self.config
        waiting = False
        for name, before, after in (
            ("listen address", (old.listen.host, old.listen.port), (config.listen.host, config.listen.port)),
            ("ops address", (old.ops.host, old.ops.port), (config.ops.host, config.ops.port)),
            # The listener speaks HTTP or HTTPS from its start; only a new certificate applies at once.
            ("listen.tls", old.listen.tls is None, config.listen.tls is None),
            ("storage", old.storage, config.storage),
            ("delivery", old.delivery, config.delivery),
            ("log", old.log, config.log),
            ("reload.watch", old.reload.watch, config.reload.watch),
        ):
            if before != after:
                log.warning("%s changed; it takes effect at the next restart", name)
                waiting = True
        # The running config keeps what it started with, so this compares the file with what is in effect.
        self.metrics.config_restart_required.set(int(waiting))
        config = keep_restart_only(old, config)
        self.config = config
        table.config = config
        self.table = table
        # New certificate paths are watched from now on, as read now (the certificate is loaded below).
        self._watched = watched if config.listen.tls == old.listen.tls else self._read_watched()
        if engine is not None and actions is not None:
            # Deliveries already running finish with the actions they started with.
            engine.swap_actions(actions)
        self._reload_certificate()
        self._fit_connections()
        self.metrics.keep_only_configured(config.sources.keys(), table.actions.keys())
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_reload_successful.set(1)
        log.info("config reloaded", extra={"sources": len(table.endpoints)})
        _warn_never_matched(config, table)
        self._warn_insecure()
        return True

    def _reload_soon(self) -> None:
        task = asyncio.create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def _read_watched(self) -> tuple[bytes, ...]:
        """The config file and the TLS files it names, by content."""
        assert self.config_path is not None
        tls = self.config.listen.tls
        paths = [self.config_path, *((Path(tls.cert), Path(tls.key)) if tls else ())]
        return tuple(_read_or_empty(path) for path in paths)

    async def _watch_config(self) -> None:
        """Poll the files' content: a ConfigMap or Secret update swaps a symlink and never rewrites a file
        in place, so watching the content by path sees it whatever the kubelet does. A renewed certificate
        is picked up the same way."""
        while True:
            await asyncio.sleep(self.config.reload.interval)
            watched = self._read_watched()
            # An unreadable file (mid-swap, or gone for a moment) reads as empty: the reload then refuses
            # it and keeps the running config until the file is back.
            if watched == self._watched:
                continue
            # A file written in place (an editor's save, `cat > routes.yaml`) can be read half way, and
            # half a config may be valid: cut between two routes, it would apply without them, and their
            # pending deliveries would end dead. Load only what has stayed the same for a moment.
            await asyncio.sleep(CONFIG_SETTLE)
            if self._read_watched() != watched:
                continue
            assert self.config_path is not None  # watched only then
            async with self._reloading:
                # Unless a SIGHUP's reload has read the same files meanwhile (one refused pauses to close
                # the actions it built): the same bad update would be refused, and counted, twice.
                if watched != self._watched:
                    await self._reload(self.config_path)

    def _reload_certificate(self) -> None:
        context, tls = self._tls, self.config.listen.tls
        if context is None or tls is None:
            return
        try:
            # New handshakes use the new certificate; open connections keep theirs.
            context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot load the TLS certificate; keeping the old one", extra={"error": str(exc)})

    def _fit_connections(self) -> None:
        # The delivery pool is the one the gateway started with: a new `delivery` needs a restart.
        pool = self._resources.pool if self._resources is not None else self.config.delivery.concurrency
        self.ingress.max_connections = fit_connections(
            self.config.listen.max_connections, FILES_RESERVED + 2 * pool
        )

    def _warn_insecure(self) -> None:
        for name, source in self.config.sources.items():
            if source.insecure and not self.registry.providers[source.provider].needs_secret:
                log.warning(
                    "source %s accepts unverified webhooks (insecure: true)", name, extra={"source": name}
                )

    # -- serving ----------------------------------------------------------------------------------------

    async def serve(
        self,
        ingress_sockets: list[socket.socket] | None = None,
        ops_sockets: list[socket.socket] | None = None,
        *,
        freeze_startup_objects: bool = False,
    ) -> None:
        """Run until SIGTERM/SIGINT (or request_exit), then shut down without losing anything:
        /readyz turns 503; after listen.drain_delay the webhook listener stops taking connections and
        finishes the requests in progress; running deliveries get delivery.shutdown_timeout; storage is
        closed; the ops listener stops last, so probes and scrapes see the whole shutdown. A second
        SIGTERM/SIGINT meanwhile ends the waits for the work in progress at once (_cut_short).

        freeze_startup_objects: for a process that serves this one gateway for its whole life (`hookyard
        serve`): see collect_less."""
        listen, ops_config = self.config.listen, self.config.ops
        # Bind first: a port that is taken is a clean error before anything else starts.
        ingress_sockets = ingress_sockets or [listening_socket(listen.host, listen.port)]
        ops_sockets = ops_sockets or [listening_socket(ops_config.host, ops_config.port)]
        if listen.tls is not None:
            # Loaded now, like the sockets bound: a certificate that cannot be loaded stops the start.
            self._tls = tls_context(listen.tls)
        loop = asyncio.get_running_loop()
        hups: list[int] = []
        with contextlib.suppress(NotImplementedError, RuntimeError):
            # Before the start, which may take a while (another process's write lock, a plugin's startup
            # hook): a signal left at its default ends the process mid-start, or, for PID 1 in a container,
            # is ignored by the kernel and lost. SIGHUP's default is to end the process too: one sent while
            # starting is kept for once started.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_exit)
            loop.add_signal_handler(signal.SIGHUP, hups.append, signal.SIGHUP)
        if sigterm_caught():  # while `hookyard serve` was still importing: see gateway.launch
            self.request_exit()
        if not await self._start_unless_exit():
            log.info("stopped")
            return
        if freeze_startup_objects:
            collect_less()
        self._fit_connections()
        ingress_config = self._uvicorn_config(self.ingress, listen.host, listen.port, INGRESS_DRAIN_TIMEOUT)
        ingress_config.http = protocol = webhook_protocol(self.ingress)
        if self._tls is not None:
            # The handshake is the listener's, not asyncio's: see tls_protocol.
            ingress_config.http = tls_protocol(protocol, self.ingress, self._tls)
        ingress = self._ingress_server = _Server(ingress_config, "webhook")
        connections = ingress.server_state.connections  # read at each scrape: nothing per connection
        self.metrics.webhook_connections.set_function(lambda: len(connections))
        ops_uvicorn = self._uvicorn_config(self.ops, ops_config.host, ops_config.port, OPS_DRAIN_TIMEOUT)
        # uvicorn's, but what its drain cuts off gets no answer, and its connections are bounded.
        ops_uvicorn.http = ops_protocol(connections_shed(self))
        ops_uvicorn.timeout_keep_alive = OPS_IDLE_TIMEOUT
        ops = _Server(ops_uvicorn, "ops")
        ops_connections = ops.server_state.connections
        self.metrics.ops_connections.set_function(lambda: len(ops_connections))
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
        if hups:
            self._reload_soon()
        servers = [
            asyncio.create_task(ingress.serve(ingress_sockets), name="hookyard-ingress"),
            asyncio.create_task(ops.serve(ops_sockets), name="hookyard-ops"),
        ]
        # uvicorn names no address when it is handed bound sockets: the addresses bound, a port 0 resolved.
        scheme = "https" if self._tls is not None else "http"
        log.info(
            "listening",
            extra={
                "webhook": [f"{scheme}://{socket_address(sock)}" for sock in ingress_sockets],
                "ops": [f"http://{socket_address(sock)}" for sock in ops_sockets],
            },
        )
        _warn_never_matched(self.config, self.table)
        watcher = None
        if self.config_path is not None and self.config.reload.watch:
            watcher = asyncio.create_task(self._watch_config(), name="hookyard-config-watch")
        exit_requested = asyncio.create_task(self._exit.wait())
        stalls = StallWatch(
            loop,
            plugin_sources(self.pm, [*self.registry.providers.values(), *self.registry.actions.values()]),
        )
        stalls.start()
        try:
            try:
                # A listener that stops on its own ends the wait as surely as a signal does.
                await asyncio.wait([exit_requested, *servers], return_when=asyncio.FIRST_COMPLETED)
            finally:
                exit_requested.cancel()
                if watcher is not None:
                    watcher.cancel()
                self.ready = False
                self._shutting_down = True
                self.metrics.ready.set(0)
                log.info("shutting down")
                if self.config.listen.drain_delay and not servers[0].done():
                    hurried = asyncio.create_task(self._hurry.wait())
                    await asyncio.wait([hurried], timeout=self.config.listen.drain_delay)
                    hurried.cancel()
                ingress.should_exit = True
                await asyncio.gather(servers[0], return_exceptions=True)
                cut_off(connections)
                protocol.lingering.close_all()
                try:
                    await self.stop()
                finally:
                    ops.should_exit = True
                    await asyncio.gather(servers[1], return_exceptions=True)
                log.info("stopped")
        finally:
            # However the drain ends (cancelled, or failing), the watching thread does not outlive serve.
            stalls.stop()

    async def _start_unless_exit(self) -> bool:
        """Start, unless an exit is asked for first (SIGTERM while the start waits): then the start is
        cancelled, which closes what it opened (the store, the pools, the plugins started), and waited for
        START_CANCEL_BOUND at most. Whether it started."""
        if self._exit.is_set():
            # Asked for before the start began (a SIGTERM while `hookyard serve` was still importing): a start
            # that needs no wait would otherwise finish in its first step, before the exit is seen.
            return False
        starting = asyncio.create_task(self.start(), name="hookyard-start")
        exit_requested = asyncio.create_task(self._exit.wait())
        try:
            await asyncio.wait([starting, exit_requested], return_when=asyncio.FIRST_COMPLETED)
        finally:
            exit_requested.cancel()
            if not starting.done():
                log.info("shutting down while starting")
                if await cancel_and_wait([starting], grace=START_CANCEL_BOUND):
                    log.warning("the start did not end on its cancellation; given up")
        if not starting.done() or starting.cancelled():
            return False
        starting.result()  # a failed start raises here
        return True

    def _uvicorn_config(self, app: Any, host: str, port: int, drain_timeout: int) -> uvicorn.Config:
        return uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            # Webhooks are plain HTTP requests: an Upgrade is answered by Hookyard, not a WebSocket stack.
            ws="none",
            # Requests still running this long after the listener stopped are cancelled.
            timeout_graceful_shutdown=drain_timeout,
        )


def keep_restart_only(running: Config, new: Config) -> Config:
    """`new`, with the settings that take effect only at a restart as the gateway runs them: what reads
    the running config (the shutdown, the certificate's reload, a plugin's gateway.config) sees what is in
    effect, and each reload says again what still waits for the restart.

    The engine runs with the `delivery` it started with, and stop() gives running deliveries its
    shutdown_timeout: the new file's would hold a SIGTERM past the grace period set for the running one.
    The listeners stay bound where they were, and speak HTTP or HTTPS as they started: with listen.tls
    still on, the certificate keeps being reloaded (from the new file's paths, if it names any)."""
    listen = new.listen.model_copy(update={"host": running.listen.host, "port": running.listen.port})
    if (new.listen.tls is None) != (running.listen.tls is None):
        listen = listen.model_copy(update={"tls": running.listen.tls})
    return new.model_copy(
        update={
            "listen": listen,
            "ops": new.ops.model_copy(update={"host": running.ops.host, "port": running.ops.port}),
            "storage": running.storage,
            "delivery": running.delivery,
            "log": running.log,
            "reload": new.reload.model_copy(update={"watch": running.reload.watch}),
        }
    )


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def fit_connections(wanted: int, reserved: int) -> int:
    """The webhook listener's limit of open connections: `wanted` (listen.max_connections) if the process
    may open that many files and `reserved` more. Past its open-file limit (RLIMIT_NOFILE) accept() fails
    with EMFILE, and so does everything else that opens a file: the store, the ops listener, deliveries.

    The soft limit is raised as far as needed when the hard limit allows it, as Go programs do: its usual
    1024 is there for select(), which asyncio does not use. If even the hard limit is too low, the limit is
    lowered to fit, with a warning: refused 503 too_many_connections, a flood leaves the rest working."""
    needed = wanted + reserved
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # macOS refuses a soft limit past kern.maxfilesperproc, even under an unlimited hard one
        else:
            log.info(
                "open-file limit raised from %d to %d for listen.max_connections",
                soft,
                target,
                extra={"max_connections": wanted},
            )
            soft = target
    if soft >= needed:
        return wanted
    fitted = max(1, soft - reserved)
    log.warning(
        "listen.max_connections lowered from %d to %d: the open-file limit is %d (hard limit %s), and %d of "
        "them are kept for the store, the ops listener and deliveries; raise the limit (ulimit -n, "
        "LimitNOFILE=, the container's nofile ulimit) or lower listen.max_connections",
        wanted,
        fitted,
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
        reserved,
        extra={"max_connections": fitted},
    )
    return fitted


def tls_context(tls: TLS) -> ssl.SSLContext:
    """The webhook listener's TLS context; OSError names the files that cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except OSError as exc:  # ssl.SSLError included
        reason = exc.strerror if exc.strerror else str(exc)
        raise OSError(f"cannot load listen.tls ({tls.cert}, {tls.key}): {reason}") from None
    return context


def socket_address(sock: socket.socket) -> str:
    """HOST:PORT of a bound socket, an IPv6 host in brackets as in a URL."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; OSError (say, the port is taken, or the host is not a name) names the
    address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # Looked up first: create_server's error for a name that does not resolve has a negative errno,
        # for which os.strerror has no words ("Unknown error -2").
        socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    except UnicodeError as exc:
        # A name IDNA cannot encode (an empty label, as in a..b; one over 63 characters), refused before
        # any resolver is asked; its reason is the codec's, without "encoding with 'idna' codec failed".
        reason = exc.__cause__ or exc
        raise OSError(errno.EINVAL, f"cannot listen on {host}:{port}: not a host name ({reason})") from None
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
        # Accepted connections inherit it: small answers are not held back by Nagle's algorithm.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {os.strerror(exc.errno or 0)}") from None


async def _call_each(
    pm: pluggy.PluginManager,
    name: str,
    timeout: float,
    only: Collection[str] | None = None,
    *,
    hurried: asyncio.Event | None = None,
    **kwargs: Any,
) -> None:
    """Call every implementation of the hook `name` in pluggy's order (or those of the plugins named in
    `only`), one at a time, awaiting what it returns, for `timeout` seconds at most all together. One that
    raises, or is still running then, is logged and the others still run: pluggy would stop at the first
    failure, and a plugin whose shutdown fails must not keep another one from closing what it opened.

    A plain (not async) implementation runs on a thread of its own, so that one that blocks (a socket with
    no timeout, time.sleep) can be given up on too. At the end of the time, the one still running is
    cancelled, and those called after it are cancelled as soon as they wait; all of them together get
    CANCELLED_GRACE more to end. One still running then (it catches its cancellation, or its thread blocks)
    is left running: a task, or a daemon thread, that ends with the process.

    Once `hurried` is set (a shutdown cut short by a second signal), the time is up at once: the hook running
    then is cancelled, as are those after it as soon as they wait, and CANCELLED_GRACE from then is all they
    get together.

    Each call, and what it returned, is traced as pluggy traces the hooks it calls (HookTrace)."""
    hook = getattr(pm.hook, name)
    trace = HookTrace(pm)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    give_up_at = deadline + CANCELLED_GRACE
    for impl in reversed(hook.get_hookimpls()):
        if only is not None and impl.plugin_name not in only:
            continue
        trace.call(name, impl.plugin_name, kwargs)
        call = asyncio.ensure_future(_call(impl.function, [kwargs[arg] for arg in impl.argnames]))
        try:
            # Its first step runs before this wait ends, even past the deadline: what it does before it
            # first waits is done.
            await wait_unless_hurried([call], max(deadline - loop.time(), 0), hurried)
            if hurried is not None and hurried.is_set():
                deadline = min(deadline, loop.time())
                give_up_at = min(give_up_at, loop.time() + CANCELLED_GRACE)
            if not call.done():
                await cancel_and_wait([call], max(give_up_at - loop.time(), 0))
        except asyncio.CancelledError:
            call.cancel()  # the caller is cancelled: so is the hook, rather than left behind unasked
            raise
        if not call.done() or call.cancelled():
            log.error(
                "a %s hook did not finish in time; given up",
                hook.name,
                extra={"plugin": impl.plugin_name, "timeout_s": timeout, "left_running": not call.done()},
            )
        elif call.exception() is not None:
            log.error(
                "a %s hook failed", hook.name, exc_info=call.exception(), extra={"plugin": impl.plugin_name}
            )
        else:
            trace.finish(name, impl.plugin_name, call.result())


async def _call(function: Callable[..., Any], arguments: list[Any]) -> Any:
    """What `function` returns, or what that returns once awaited."""
    if inspect.iscoroutinefunction(function):
        result = function(*arguments)
    else:
        running = _on_daemon_thread(function, arguments)
        try:
            result = await asyncio.shield(running)
        except asyncio.CancelledError:
            # A thread cannot be cancelled: it is waited for all the same, for as long as the caller waits
            # (a second cancellation ends the wait).
            result = await running
    if inspect.isawaitable(result):
        result = await result
    return result


def _on_daemon_thread(function: Callable[..., Any], arguments: list[Any]) -> asyncio.Future[Any]:
    """What `function` returns, called on a thread of its own. A daemon: one that never returns does not
    keep the process from exiting, as asyncio's threads (to_thread) would."""
    thread = DaemonThread("hookyard-hook")
    try:
        return asyncio.get_running_loop().run_in_executor(thread, function, *arguments)
    finally:
        thread.shutdown(wait=False)  # it ends once the call has returned


def _warn_never_matched(config: Config, table: RouteTable) -> None:
    """What `hookyard check` warns of, in the log of a gateway that starts or reloads a file never checked:
    a route's `events:` entry that its provider never sends (a typo, most often), so the route never
    matches it."""
    for warning in never_matched(config, table):
        log.warning("a route's event type is never sent", extra={"warning": warning})
