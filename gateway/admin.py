"""The admin API, on the ops listener only (never on the webhook port): list and inspect events, replay.

Auth: `Authorization: Bearer <ops.admin_token>`. The config requires a token unless the ops listener is
bound to loopback, where the API answers without one. The OpenAPI document is generated from the endpoints'
docstrings.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match, Route
from starlette.schemas import SchemaGenerator
from starlette.types import Scope

from gateway import __version__
from gateway.config import is_loopback
from gateway.operations import OperationError, Operations
from gateway.storage import StorageUnavailable

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("hookyard.admin")

Endpoint = Callable[[Request], Awaitable[Response]]

schemas = SchemaGenerator(
    {
        "openapi": "3.0.3",
        "info": {
            "title": "Hookyard admin API",
            "version": __version__,
            "description": "Each path is matched as written: with a slash after it, it is another path, "
            "answered 404. Nothing is redirected.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                },
                "EventSummary": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "source": {"type": "string"},
                        "type": {"type": "string"},
                        "received_at": {"type": "string", "format": "date-time"},
                        "state": {"type": "string", "enum": ["pending", "delivered", "dead", "unrouted"]},
                        "cursor": {"type": "integer", "description": "where a page ending here ends"},
                    },
                    "required": ["id", "source", "type", "received_at", "state", "cursor"],
                },
                "EventPage": {
                    "type": "object",
                    "properties": {
                        "events": {"type": "array", "items": {"$ref": "#/components/schemas/EventSummary"}},
                        "next_cursor": {"type": "integer", "nullable": True},
                    },
                    "required": ["events", "next_cursor"],
                },
                "Attempt": {
                    "type": "object",
                    "properties": {
                        "number": {"type": "integer"},
                        "at": {"type": "string", "format": "date-time"},
                        "duration_ms": {"type": "number"},
                        "outcome": {"type": "string"},
                        "status_code": {"type": "integer", "nullable": True},
                        "error": {"type": "string", "nullable": True},
                    },
                    "required": ["number", "at", "duration_ms", "outcome", "status_code", "error"],
                },
                "Delivery": {
                    "type": "object",
                    "properties": {
                        "route": {"type": "string"},
                        "action": {"type": "string"},
                        "state": {"type": "string"},
                        "attempts": {"type": "array", "items": {"$ref": "#/components/schemas/Attempt"}},
                        "last_error": {"type": "string", "nullable": True},
                        "next_attempt_at": {"type": "string", "format": "date-time", "nullable": True},
                        "in_flight": {"type": "boolean", "description": "an attempt is under way"},
                    },
                    "required": [
                        "route",
                        "action",
                        "state",
                        "attempts",
                        "last_error",
                        "next_attempt_at",
                        "in_flight",
                    ],
                },
                "Event": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "source": {"type": "string"},
                        "type": {"type": "string"},
                        "occurred_at": {"type": "string", "format": "date-time", "nullable": True},
                        "received_at": {"type": "string", "format": "date-time"},
                        "verified": {"type": "boolean"},
                        "payload": {"description": "the body as parsed JSON", "nullable": True},
                        "deliveries": {"type": "array", "items": {"$ref": "#/components/schemas/Delivery"}},
                        "unreadable": {
                            "type": "string",
                            "description": "why payload is null (or shown as text in body)",
                        },
                        "body": {"type": "string"},
                    },
                    "required": [
                        "id",
                        "source",
                        "type",
                        "occurred_at",
                        "received_at",
                        "verified",
                        "payload",
                        "deliveries",
                    ],
                },
                "ReplayPage": {
                    "type": "object",
                    "properties": {
                        "replayed": {"type": "integer"},
                        "created": {"type": "integer"},
                        "next_cursor": {"type": "integer", "nullable": True},
                    },
                    "required": ["replayed", "created", "next_cursor"],
                },
                "EventReplayPage": {
                    "allOf": [
                        {"$ref": "#/components/schemas/ReplayPage"},
                        {
                            "type": "object",
                            "properties": {
                                "pending": {
                                    "type": "integer",
                                    "description": "deliveries the replay matched but left alone: not "
                                    "final yet (in flight, due, or waiting for their parent)",
                                },
                            },
                            "required": ["pending"],
                        },
                    ]
                },
                "BulkReplayPage": {
                    "allOf": [
                        {"$ref": "#/components/schemas/ReplayPage"},
                        {
                            "type": "object",
                            "description": "the window this page ran on, in epoch seconds: give it to "
                            "the next pages",
                            "properties": {
                                "pending": {
                                    "type": "integer",
                                    "description": "deliveries the page matched but left alone: not final "
                                    "yet (in flight, due, or waiting for their parent); 0 for mode dead",
                                },
                                "since": {"type": "number", "nullable": True},
                                "until": {"type": "number"},
                            },
                            "required": ["pending", "since", "until"],
                        },
                    ]
                },
            },
        },
        "security": [{"bearer": []}],
    }
)


# How the router's 404 under /admin begins: the CLI tells it from an endpoint's own 404 (no such event).
NO_ENDPOINT = "no admin endpoint"

# An admin request's body is a few fields: one past this is refused as it comes, not held in memory whole.
MAX_BODY_BYTES = 64 * 1024

LIST_FILTERS = ("source", "type", "state", "route", "since", "until", "cursor", "limit")
BULK_REPLAY_FIELDS = ("mode", "since", "until", "source", "route", "action", "cursor", "limit")


def admin_routes(gateway: Gateway) -> list[Route]:
    def operations() -> Operations:
        # Looked up per request: a hot reload swaps the route table, and replays use the current one.
        return Operations(gateway.storage, gateway.table, wake=gateway.engine.wake, counted=count)

    def count(mode: str, deliveries: int) -> None:
        gateway.metrics.replays.labels(mode).inc(deliveries)

    def guarded(endpoint: Callable[[Request, Operations], Awaitable[Any]]) -> Endpoint:
        async def handle(request: Request) -> Response:
            ops = gateway.config.ops
            if ops.admin_token:
                # The scheme is case-insensitive (RFC 9110 11.1): `bearer x` is as good as `Bearer x`.
                scheme, _, offered = request.headers.get("authorization", "").partition(" ")
                # Header bytes arrive decoded as latin-1: back to bytes, against the token's UTF-8.
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    offered.strip().encode("latin-1"), ops.admin_token.encode()
                ):
                    return _error(401, "missing or wrong bearer token", {"www-authenticate": "Bearer"})
            elif request.client is None or not is_loopback(request.client.host):
                # The config refuses a token-less listener off loopback; a reload that drops the token and
                # moves ops.host to loopback takes effect only at the restart, so check the peer too.
                return _error(
                    403, "the admin API needs ops.admin_token when the ops listener is not on loopback"
                )
            elif _from_a_web_page(request):
                return _error(
                    403,
                    "without ops.admin_token the admin API answers local programs only, not a web page's "
                    "request (Origin, Sec-Fetch-Site) nor one for a host name that is not loopback",
                )
            try:
                return JSONResponse(await endpoint(request, operations()))
            except OperationError as exc:
                return _error(exc.status, str(exc))
            except StorageUnavailable as exc:
                # The store's failure, not the caller's: try again later, as /readyz says.
                return _error(503, f"storage unavailable: {exc}", {"retry-after": "5"})
            except Exception:
                # A bug: answered in the shape a tool reads (uvicorn's would be `500` text/plain), its
                # text left to the log, which may hold paths and data the caller has no use for.
                log.exception(
                    "an admin request failed", extra={"method": request.method, "path": request.url.path}
                )
                return _error(500, "internal error")

        handle.__doc__ = endpoint.__doc__
        handle.__name__ = endpoint.__name__
        return handle

    async def list_events(request: Request, ops: Operations) -> Any:
        """
        summary: List events, newest first
        parameters:
          - {name: source, in: query, schema: {type: string}}
          - name: type
            in: query
            description: "the canonical type, or a name or code as a route's events: takes it (101)"
            schema: {type: string}
          - {name: state, in: query, schema: {type: string, enum: [pending, delivered, dead, unrouted]}}
          - {name: route, in: query, schema: {type: string}}
          - name: since
            in: query
            description: "2h, ISO 8601 (UTC without an offset) or epoch seconds"
            schema: {type: string}
          - {name: until, in: query, description: as since, schema: {type: string}}
          - name: cursor
            in: query
            description: next_cursor of the previous page (0 or none for the first)
            schema: {type: integer, minimum: 0}
          - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 500, default: 50}}
        responses:
          200:
            description: a page of events
            content: {application/json: {schema: {$ref: "#/components/schemas/EventPage"}}}
          400: {description: a bad filter}
          401: {description: missing or wrong bearer token (ops.admin_token is set)}
          403: {description: "without ops.admin_token: a caller that is not a local program (a web page)"}
          409: {description: "without source: the sources' providers read the type as different types"}
          500: {description: "a fault in Hookyard, logged with its traceback"}
          503: {description: the store cannot be read or written right now}
        """
        query = _query(request, LIST_FILTERS)
        return await ops.list_events(
            source=query.get("source"),
            type=query.get("type"),
            state=query.get("state"),
            route=query.get("route"),
            since=query.get("since"),
            until=query.get("until"),
            cursor=_int(query.get("cursor"), "cursor"),
            limit=_default(_int(query.get("limit"), "limit"), 50),
        )

    async def show_event(request: Request, ops: Operations) -> Any:
        """
        summary: One event with its deliveries and every attempt
        parameters:
          - {name: event_id, in: path, required: true, schema: {type: string}}
          - {name: source, in: query, schema: {type: string}}
        responses:
          200:
            description: the event
            content: {application/json: {schema: {$ref: "#/components/schemas/Event"}}}
          400: {description: a bad parameter}
          401: {description: missing or wrong bearer token (ops.admin_token is set)}
          403: {description: "without ops.admin_token: a caller that is not a local program (a web page)"}
          404: {description: no such event}
          409: {description: the id exists in several sources; give source}
          500: {description: "a fault in Hookyard, logged with its traceback"}
          503: {description: the store cannot be read or written right now}
        """
        query = _query(request, ("source",))
        return await ops.show_event(request.path_params["event_id"], query.get("source"))

    async def replay_event(request: Request, ops: Operations) -> Any:
        """
        summary: Replay an event's deliveries (all, or one action's)
        parameters:
          - {name: event_id, in: path, required: true, schema: {type: string}}
        requestBody:
          content:
            application/json:
              schema:
                type: object
                description: a field that is null is one not given
                additionalProperties: false
                properties:
                  source: {type: string, nullable: true}
                  route: {type: string, nullable: true}
                  action: {type: string, nullable: true}
        responses:
          200:
            description: >
              how many deliveries will run again (replayed; created is 0, next_cursor null), and how many
              it matched but left alone because they are not final yet (pending)
            content: {application/json: {schema: {$ref: "#/components/schemas/EventReplayPage"}}}
          400: {description: a bad body}
          401: {description: missing or wrong bearer token (ops.admin_token is set)}
          403: {description: "without ops.admin_token: a caller that is not a local program (a web page)"}
          404: {description: "no such event, or no delivery of that route or action"}
          409: {description: the id exists in several sources; give source}
          413: {description: the body is longer than 64 KiB}
          500: {description: "a fault in Hookyard, logged with its traceback"}
          503: {description: the store cannot be read or written right now}
        """
        body = _known(await _json(request), ("source", "route", "action"))
        return await ops.replay_event(
            request.path_params["event_id"], _str(body, "source"), _str(body, "action"), _str(body, "route")
        )

    async def bulk_replay(request: Request, ops: Operations) -> Any:
        """
        summary: Bulk replay, one page at a time
        description: >
          mode dead replays deliveries that ended dead in the window; mode missing replays every event
          received in the window that has not been delivered for an action the current config routes it to
          (dead deliveries run again; deliveries that never existed are created, and with action set to a
          dependent whose parent never existed either, that parent too). Call again with cursor =
          next_cursor until next_cursor is null, and with the since and until the answer gives: the window
          as the first call fixed it by the gateway's clock, `2h` read then and until at most that time.
        requestBody:
          required: true
          content:
            application/json:
              schema:
                type: object
                description: a field other than mode that is null is one not given
                required: [mode]
                additionalProperties: false
                properties:
                  mode: {type: string, enum: [dead, missing]}
                  since:
                    description: 2h, ISO 8601 (UTC without an offset) or epoch seconds; next pages, the since answered
                    oneOf: [{type: string, minLength: 1}, {type: number, nullable: true}]
                  until:
                    description: as since; the next pages, the until answered
                    oneOf: [{type: string, minLength: 1}, {type: number, nullable: true}]
                  source: {type: string, nullable: true}
                  route: {type: string, nullable: true}
                  action: {type: string, nullable: true}
                  cursor: {type: integer, minimum: 0, nullable: true}
                  limit: {type: integer, minimum: 1, maximum: 500, default: 500, nullable: true}
        responses:
          200:
            description: this page's counts
            content: {application/json: {schema: {$ref: "#/components/schemas/BulkReplayPage"}}}
          400: {description: a bad request}
          401: {description: missing or wrong bearer token (ops.admin_token is set)}
          403: {description: "without ops.admin_token: a caller that is not a local program (a web page)"}
          413: {description: the body is longer than 64 KiB}
          500: {description: "a fault in Hookyard, logged with its traceback"}
          503: {description: the store cannot be read or written right now}
        """
        body = _known(await _json(request), BULK_REPLAY_FIELDS)
        mode = _str(body, "mode")
        if not mode:
            raise OperationError(400, "mode: required, one of dead, missing")
        for name in ("since", "until"):
            if body.get(name) == "":
                # A script's unset variable: read as no window, every dead delivery in the store would run.
                raise OperationError(400, f"{name}: empty: give a time, e.g. 2h, or leave it out")
        return await ops.replay(
            mode=mode,
            since=_str(body, "since"),
            until=_str(body, "until"),
            source=_str(body, "source"),
            route=_str(body, "route"),
            action=_str(body, "action"),
            cursor=_default(_int(body.get("cursor"), "cursor"), 0),
            limit=_default(_int(body.get("limit"), "limit"), 500),
        )

    async def openapi(request: Request) -> Response:
        document = schemas.get_schema(routes=request.app.routes)
        if not gateway.config.ops.admin_token:
            # On loopback without a token the API answers without one: a client built from the document
            # would ask its user for a token that does not exist.
            document["security"] = []
        # Every error an endpoint answers is {"error": "..."}: said once here, not in each docstring.
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    if int(status) >= 400 and "content" not in response:
                        response["content"] = {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        }
        return JSONResponse(document)

    return [
        AdminRoute("/admin/events", guarded(list_events), methods=["GET"]),
        # `:path`: an event id may hold a `/` (the client sends it as %2F, which arrives decoded).
        EventRoute("/admin/events/{event_id:path}", guarded(show_event), methods=["GET"]),
        AdminRoute("/admin/events/{event_id:path}/replay", guarded(replay_event), methods=["POST"]),
        AdminRoute("/admin/replay", guarded(bulk_replay), methods=["POST"]),
        AdminRoute("/admin/openapi.json", openapi, methods=["GET"], include_in_schema=False),
    ]


class AdminRoute(Route):
    """A route that matches the whole decoded path, line feeds (%0A) included. Starlette's pattern ends in
    `$`, which matches before a final line feed too, and its `:path` is `.*`, which stops at one: the event
    `msg_1` was shown for `/admin/events/msg_1%0A`, and an id holding a line feed had no replay endpoint."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
        super().__init__(path, endpoint, **options)
        self.path_regex = re.compile(self.path_regex.pattern.removesuffix("$") + r"\Z", re.DOTALL)


class EventRoute(AdminRoute):
    """/admin/events/{id}, but not a path whose last segment is `replay` after the id's: that is the replay
    endpoint's path whatever the method, so a GET there is its 405, not the event `x/replay` shown. An id's
    own `/` arrives as %2F, and is told apart by the raw path. The id `replay` alone (any sender chooses its
    ids) is no replay endpoint's path, and is shown."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        raw = scope.get("raw_path") or scope["path"].encode()
        before, _, last = raw.rpartition(b"/")
        if (
            match is not Match.NONE
            and before != b"/admin/events"
            and unquote(last.decode("latin-1")) == "replay"
        ):
            return Match.NONE, {}
        return match, child


async def http_error(request: Request, exc: Exception) -> Response:
    """The router's 404 and 405: under /admin, JSON as every admin error (with 405's Allow); elsewhere
    (/healthz, /readyz, /metrics) the plain text they have always had."""
    assert isinstance(exc, HTTPException)
    # As it was matched: the URL's text drops a line feed (%0A), and `/admin/events` would be named as the
    # path that is no endpoint.
    path = request.scope["path"]
    if path != "/admin" and not path.startswith("/admin/"):
        return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {path}; allowed: {allowed}"
    elif exc.status_code == 404:
        message = f"{NO_ENDPOINT} {request.method} {path}; see /admin/openapi.json"
    else:
        message = exc.detail
    return _error(exc.status_code, message, dict(exc.headers or {}))


def _from_a_web_page(request: Request) -> bool:
    """A request a browser on this host sent for a web page: any site's script or form can reach a loopback
    address, and a DNS name of its own made to resolve to 127.0.0.1 (rebinding) lets it read the answers.
    Without a token, nothing else stops such a page from reading the events or replaying them. Browsers
    say where a request comes from (Origin, Sec-Fetch-Site) and always name the host they asked for; the
    CLI, curl and scripts send neither header and ask for the loopback address itself."""
    headers = request.headers
    if "origin" in headers or headers.get("sec-fetch-site", "none") != "none":
        return True  # `none`: typed into the address bar by the user
    host = headers.get("host")
    if host is None:
        return False
    # `127.0.0.1:9000`, `localhost`, `[::1]:9000`
    name = host[1 : host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
    return not is_loopback(name)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _json(request: Request) -> dict[str, Any]:
    too_long = OperationError(
        413, f"the body is longer than {MAX_BODY_BYTES // 1024} KiB; an admin request's body is a few fields"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_long
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:  # chunked, with no length declared
                raise too_long
    except ClientDisconnect:
        # The caller left mid-body, or the listener closed a malformed one: no fault, and no one to answer.
        raise OperationError(400, "the body was cut short") from None
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise OperationError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise OperationError(400, "the body must be a JSON object")
    # orjson keeps the last of a name written twice: `{"since": "1h", "since": "30d"}` would run a bulk
    # replay wider than one of them asked, unseen. Refused, as a query parameter given twice is. (Read
    # again only when flat: a nested value is refused by its field, and json recurses where orjson does not.)
    if not any(isinstance(value, dict | list) for value in body.values()):
        names = [name for name, _ in json.loads(raw, object_pairs_hook=lambda pairs: pairs)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise OperationError(
                400, f"{', '.join(map(repr, repeated))} given more than once; give each once"
            )
    return body


def _query(request: Request, known: tuple[str, ...]) -> dict[str, str]:
    """The query's parameters, each given once: of `?state=dead&state=pending`, either could be the one
    meant (a plain dict keeps the last). An empty one (`?source=`) is one not given, as forms and scripts
    send them."""
    given = [(name, value) for name, value in request.query_params.multi_items() if value]
    query = _known(dict(given), known)
    names = [name for name, _ in given]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise OperationError(400, f"{', '.join(map(repr, repeated))} given more than once; give each once")
    return query


def _known(fields: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """Refuse a name the endpoint does not know: a misspelt filter would otherwise be left out unseen, and
    a bulk replay with `sinse` for `since` would run every dead delivery ever stored again."""
    unknown = sorted(name for name in fields if name not in known)
    if unknown:
        raise OperationError(400, f"unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return fields


def _str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and name in ("since", "until"):
        return str(value)
    raise OperationError(400, f"{name}: must be a string")


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


_INTEGER = re.compile(r"-?[0-9]+")


def _int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    # int() cuts 2.7 to 2: a number the caller did not give (a whole one written 2.0 is the number).
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise OperationError(400, f"{name}: must be an integer")
    # As written, in ASCII digits: int() would also read "+5", " 5", "1_0" and other scripts' digits.
    if isinstance(value, str) and not _INTEGER.fullmatch(value):
        raise OperationError(400, f"{name}: must be an integer")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise OperationError(400, f"{name}: must be an integer") from None
    if not -(2**63) <= number < 2**63:  # what the database can hold
        raise OperationError(400, f"{name}: out of range")
    return number
