"""The Gateway: one config, one store, the webhook listener, the ops listener and the delivery engine,
wired together and run in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import socket
import time
from collections.abc import Generator
from typing import Any

import httpx
import pluggy
import uvicorn
from httpx_aiohttp import AiohttpTransport

from gateway import __version__
from gateway.actions import Resources
from gateway.config import Config
from gateway.delivery import Engine, build_actions
from gateway.ingress import Ingress
from gateway.metrics import Metrics
from gateway.ops import ops_app
from gateway.plugins import Registry, plugin_manager
from gateway.routing import RouteTable
from gateway.storage import Storage, open_storage

log = logging.getLogger("hookyard")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the Gateway, which runs two of them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Gateway:
    """Parameters:
    config: a validated Config (see gateway.config.load_config).
    pm: the plugin manager; the process-wide one by default.
    storage: a Storage; by default one is opened from config.storage.url.
    """

    def __init__(
        self, config: Config, *, pm: pluggy.PluginManager | None = None, storage: Storage | None = None
    ) -> None:
        self.config = config
        self.pm = pm or plugin_manager()
        self.registry = Registry.collect(self.pm)
        self.table = RouteTable.build(config, self.registry)
        self.metrics = Metrics()
        self.storage = storage or open_storage(config.storage.url)
        self.storage.on_commit = self.metrics.observe_commit
        self.ingress = Ingress(self)
        self.ops = ops_app(self)
        self.ready = False
        # Skip the hook call on the hot path when no plugin listens.
        self.observes_events = bool(self.pm.hook.event_accepted.get_hookimpls())
        self._http: httpx.AsyncClient | None = None
        self._engine: Engine | None = None
        self._servers: list[_Server] = []

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the gateway is not started")
        return self._engine

    async def start(self) -> None:
        await self.storage.open()
        release = getattr(self.storage, "release_all_leases", None)
        if release is not None:
            released = await release(time.time())
            if released:
                log.warning(
                    "resuming deliveries left in flight by the previous run", extra={"count": released}
                )
        # One pool for every action: keep-alive connections to the app make forwarding cheap. httpx's API
        # over aiohttp's connection pool: httpcore's pool costs several times more CPU per request.
        limits = httpx.Limits(max_connections=self.config.delivery.concurrency, keepalive_expiry=30)
        self._http = httpx.AsyncClient(
            transport=AiohttpTransport(limits=limits),
            follow_redirects=False,
            headers={"user-agent": f"hookyard/{__version__}"},
        )
        actions = build_actions(self.table, self.registry, Resources(http=self._http))
        self._engine = Engine(self.storage, actions, self.config.delivery, self.metrics, self.pm)
        await _await_all(self.pm.hook.startup(gateway=self))
        self._engine.start()
        for name, source in self.config.sources.items():
            if source.insecure:
                log.warning(
                    "source %s accepts unverified webhooks (insecure: true)", name, extra={"source": name}
                )
        self.ready = True
        self.metrics.ready.set(1)
        log.info(
            "hookyard ready",
            extra={"sources": len(self.table.endpoints), "routes": sum(map(len, self.table.routes.values()))},
        )

    async def stop(self, timeout: float = 10.0) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self._engine is not None:
            await self._engine.stop(timeout)
        await _await_all(self.pm.hook.shutdown(gateway=self))
        if self._http is not None:
            await self._http.aclose()
        await self.storage.close()

    def request_exit(self) -> None:
        for server in self._servers:
            server.should_exit = True

    async def serve(
        self,
        ingress_sockets: list[socket.socket] | None = None,
        ops_sockets: list[socket.socket] | None = None,
    ) -> None:
        """Run until SIGTERM/SIGINT (or request_exit): start, serve both listeners, then stop cleanly."""
        await self.start()
        ingress = _Server(
            self._uvicorn_config(self.ingress, self.config.listen.host, self.config.listen.port)
        )
        ops = _Server(self._uvicorn_config(self.ops, self.config.ops.host, self.config.ops.port))
        self._servers = [ingress, ops]
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_exit)
        try:
            await asyncio.gather(ingress.serve(ingress_sockets), ops.serve(ops_sockets))
        finally:
            await self.stop()

    def _uvicorn_config(self, app: Any, host: str, port: int) -> uvicorn.Config:
        return uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=10,
        )


async def _await_all(results: list[Any]) -> None:
    """Hook implementations may return awaitables; await those, keep the rest."""
    for result in results:
        if inspect.isawaitable(result):
            await result
