"""The ops listener: health, readiness and metrics. Never exposed to providers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin import admin_routes, http_error
from gateway.storage import StorageUnavailable

if TYPE_CHECKING:
    from gateway.app import Gateway


def ops_app(gateway: Gateway) -> Starlette:
    async def healthz(request: Request) -> Response:
        # Liveness: the process and its event loop answer. Storage trouble is readiness, not liveness:
        # restarting the pod would not bring a full disk back. Except for a store that refuses every write
        # until a restart (a failed fsync): only a restart recovers it, so the kubelet is asked for one.
        broken = gateway.storage.needs_restart()
        if broken is not None:
            return JSONResponse({"status": "broken", "reason": f"storage: {broken}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not gateway.ready:
            return JSONResponse({"status": "not ready", "reason": "starting or stopping"}, status_code=503)
        try:
            await gateway.storage.check_writable()
        except StorageUnavailable as exc:
            # Out of the load balancer now, so no webhook is refused for it either: the gauge is what
            # shows it.
            gateway.metrics.storage_writable.set(0)
            return JSONResponse({"status": "not ready", "reason": f"storage: {exc}"}, status_code=503)
        gateway.metrics.storage_writable.set(1)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz, include_in_schema=False),
            Route("/readyz", readyz, include_in_schema=False),
            Route("/metrics", metrics, include_in_schema=False),
            *admin_routes(gateway),
        ],
        exception_handlers={HTTPException: http_error},
    )
