"""The ops listener: health, readiness and metrics. Never exposed to providers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin import Endpoint, admin_routes, http_error
from gateway.logs import Throttle
from gateway.protocol import OPS_MAX_CONNECTIONS
from gateway.storage import StorageUnavailable

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("hookyard.ops")

# A flood of connections comes as fast as anyone sends it: the log says so once a minute per outcome, the
# metric counts each one.
_SHED_LOG_INTERVAL = 60.0  # seconds
# A fault in answering a probe or a scrape comes back at each one: logged once a minute per path, counted each time.
_FAULT_LOG_INTERVAL = 60.0  # seconds
_SHED = {
    "closed": "the ops listener has %d connections open: the oldest with no request being answered is closed "
    "for each new one",
    "refused": "the ops listener has %d connections open, each with a request being answered: new ones are "
    "refused 503",
}


def connections_shed(gateway: Gateway) -> Callable[[str], None]:
    """What the ops listener calls for each connection it closes or refuses once it has OPS_MAX_CONNECTIONS
    open (see gateway.protocol.OpsProtocol): counted, and said in the log at most once a minute."""
    throttle = Throttle(_SHED_LOG_INTERVAL)

    def shed(outcome: str) -> None:
        gateway.metrics.ops_connections_shed.labels(outcome).inc()
        suppressed = throttle.admit(outcome)
        if suppressed is not None:
            log.warning(
                _SHED[outcome],
                OPS_MAX_CONNECTIONS,
                extra={"max_connections": OPS_MAX_CONNECTIONS, "suppressed": suppressed},
            )

    return shed


def faults_reported(gateway: Gateway) -> Callable[[Request], None]:
    """What answering_faults calls, handling the exception, for each fault: counted by path, and logged with
    its traceback at most once a minute per path. A probe or a scraper asks every few seconds, and a fault
    that stays would otherwise fill the log with the same traceback."""
    throttle = Throttle(_FAULT_LOG_INTERVAL)

    def report(request: Request) -> None:
        path = request.url.path  # one of the three routes answering_faults wraps: a bounded label
        gateway.metrics.ops_request_faults.labels(path).inc()
        suppressed = throttle.admit(path)
        if suppressed is not None:
            log.exception(
                "an ops request failed",
                extra={"method": request.method, "path": path, "suppressed": suppressed},
            )

    return report


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
        # Read at each check, so that a reload's limits apply. The headers are stored as JSON, where a byte
        # past ASCII (a header is read as latin-1) takes two.
        limits = gateway.config.limits
        room = limits.max_body_bytes + 2 * limits.max_header_bytes
        try:
            await gateway.storage.check_writable(room=room)
        except StorageUnavailable as exc:
            # Out of the load balancer now, so no webhook is refused for it either: the gauge is what
            # shows it.
            gateway.metrics.storage_writable.set(0)
            return JSONResponse({"status": "not ready", "reason": f"storage: {exc}"}, status_code=503)
        except Exception:
            # A bug in the check: the test write did not succeed either, so the gauge says so, as the
            # answer does (see answering_faults).
            gateway.metrics.storage_writable.set(0)
            raise
        gateway.metrics.storage_writable.set(1)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    report = faults_reported(gateway)
    app = Starlette(
        routes=[
            Route(
                "/healthz",
                answering_faults(healthz, report, 500, {"status": "error"}),
                include_in_schema=False,
            ),
            # /readyz answers 200 or 503 (docs/operations.md), and a check that failed proved nothing.
            Route(
                "/readyz",
                answering_faults(readyz, report, 503, {"status": "not ready"}),
                include_in_schema=False,
            ),
            Route("/metrics", answering_faults(metrics, report, 500), include_in_schema=False),
            *admin_routes(gateway),
        ],
        exception_handlers={HTTPException: http_error},
    )
    # A path is the one written, as on the webhook listener: `/metrics/` is no endpoint (404), where
    # Starlette would redirect it (307) to `/metrics`. A probe or a scraper set up with the slash sees it at
    # once, and a POST is never redirected, for a client to send again or not.
    app.router.redirect_slashes = False
    return app


def answering_faults(
    endpoint: Endpoint,
    report: Callable[[Request], None],
    status_code: int,
    shape: dict[str, str] | None = None,
) -> Endpoint:
    """`endpoint`, whose bugs (a plugin's collector that raises, a store's check) are answered `status_code`
    in JSON, as the admin API's are: `{"error": "internal error"}`, or with `shape`, the health endpoints'
    own fields and `"reason": "internal error"`, and told to `report` (faults_reported). Starlette's answer
    is `500` in plain text, and uvicorn logs the traceback without naming the path. The exception's text
    stays in the log: it may hold paths and data that a probe or a scraper has no use for."""
    body = {**shape, "reason": "internal error"} if shape is not None else {"error": "internal error"}

    async def handle(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception:
            report(request)
            return JSONResponse(body, status_code=status_code)

    return handle
