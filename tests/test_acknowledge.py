"""The `acknowledge` action against a fake Consignly API: a real HTTP server on loopback that checks what a
real one would (bearer token, method, path, body) and issues OAuth tokens that expire."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx
import pytest
import yaml

from gateway.actions import Resources
from gateway.config import ConfigError, parse_config
from gateway.http_client import HttpClient, default_ssl_context
from gateway.plugins import registry
from gateway.routing import RouteTable
from gateway.storage import Attempt, EventDetail
from plugins.acknowledge import (
    AcknowledgeOptions,
    ClientCredentials,
    OAuthOptions,
    TokenUnavailable,
    _expires_in,
)
from tests.support import (
    Downstream,
    RunningGateway,
    ServerThread,
    TcpProxy,
    consignly_headers,
    gateway_config,
    raw_server,
    read_body,
    wait_until,
)

CLIENT_ID = "hookyard-integration"
CLIENT_SECRET = "cs_9f8e7d&6c5b=4a"  # characters that form encoding must escape
STATIC_TOKEN = "static-api-token"
CONSIGNMENT_ID = "550e8400-e29b-41d4-a716-446655440000"
_PATH = re.compile(r"^/v1/consignments/([^/]+)/connection-result$")


@dataclass
class ApiCall:
    method: str
    raw_path: str
    consignment_id: str | None
    token: str | None
    body: Any
    status: int


@dataclass
class FakeConsignly:
    """The connection-result endpoint and an OAuth2 token endpoint (client credentials)."""

    url: str = ""
    expires_in: Any = 3600
    # Issued tokens end with this (a broken token endpoint's trailing newline, say).
    token_suffix: str = ""
    # Seconds the token endpoint takes to answer: lets concurrent deliveries pile up behind one fetch.
    token_delay: float = 0.0
    # Statuses the token endpoint answers with before it issues tokens again.
    token_failures: list[int] = field(default_factory=list)
    # Every bearer token is refused, as when the integration was disconnected.
    refuse_all: bool = False
    # Answers the connection-result endpoint gives before it works again, as when the API is overloaded or
    # being deployed: a status, or a (status, headers) pair.
    outages: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    # What the connection-result endpoint answers when it refuses: a content type and a body.
    refusal: tuple[str, bytes] = ("application/json", b'{"message": "rejected"}')
    issued: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=lambda: {STATIC_TOKEN})
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    calls: list[ApiCall] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def revoke(self) -> None:
        with self.lock:
            self.valid.clear()

    def acknowledged(self) -> list[ApiCall]:
        with self.lock:
            return [call for call in self.calls if call.status == 200]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        extra: dict[str, str] = {}
        content_type = "application/json"
        if scope["path"] == "/oauth/token":
            status, answer = await self.token_endpoint(scope["method"], headers, body)
            content = json.dumps(answer).encode()
        else:
            status, extra = self.connection_result(scope, headers, body)
            content = b"{}" if status == 200 else self.refusal[1]
            content_type = "application/json" if status == 200 else self.refusal[0]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type.encode())]
                + [(k.encode(), v.encode()) for k, v in extra.items()],
            }
        )
        await send({"type": "http.response.body", "body": content})

    async def token_endpoint(self, method: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        form = {key: values[0] for key, values in parse_qs(body.decode()).items()}
        with self.lock:
            self.token_requests.append({"headers": headers, "form": form})
            if self.token_failures:
                return self.token_failures.pop(0), {"error": "temporarily_unavailable"}
        if method != "POST" or headers.get("content-type") != "application/x-www-form-urlencoded":
            return 400, {"error": "invalid_request"}
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        if "authorization" in headers:  # client_secret_basic
            scheme, _, encoded = headers["authorization"].partition(" ")
            user, _, password = base64.b64decode(encoded).decode().partition(":")
            client = (unquote(user.replace("+", " ")), unquote(password.replace("+", " ")))
            if scheme != "Basic" or "client_secret" in form:
                return 400, {"error": "invalid_request"}
        else:  # client_secret_post
            client = (form.get("client_id", ""), form.get("client_secret", ""))
        if client != (CLIENT_ID, CLIENT_SECRET):
            return 401, {"error": "invalid_client"}
        with self.lock:
            token = f"tok-{len(self.issued) + 1}"
            if self.token_suffix:
                token, self.token_suffix = token + self.token_suffix, ""  # the next one is fine
            self.issued.append(token)
            self.valid.add(token)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}

    def connection_result(
        self, scope: dict[str, Any], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str]]:
        raw_path = scope["raw_path"].decode("ascii")
        match = _PATH.match(raw_path)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        extra: dict[str, str] = {}
        with self.lock:
            if match is None:
                status = 404
            elif self.outages:
                outage = self.outages.pop(0)
                status, extra = outage if isinstance(outage, tuple) else (outage, {})
            elif scope["method"] != "PUT":
                status = 405
            elif scheme != "Bearer" or token not in self.valid or self.refuse_all:
                status = 401
            elif (
                headers.get("content-type") != "application/json"
                or not isinstance(payload, dict)
                or set(payload) != {"operationId", "result"}
                or payload["result"] not in (1, 2)
                or not payload["operationId"]
            ):
                status = 400
            else:
                status = 200
            consignment_id = unquote(match.group(1)) if match else None
            self.calls.append(
                ApiCall(scope["method"], raw_path, consignment_id, token or None, payload, status)
            )
        return status, extra


@pytest.fixture
def consignly_api() -> Iterator[FakeConsignly]:
    api = FakeConsignly()
    with ServerThread(api) as server:
        api.url = f"http://127.0.0.1:{server.port}"
        yield api


def oauth(api: FakeConsignly, **extra: Any) -> dict[str, Any]:
    return {
        "oauth": {
            "token_url": f"{api.url}/oauth/token",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            **extra,
        }
    }


def consignments_route(downstream: Downstream, api: FakeConsignly, **auth: Any) -> dict[str, Any]:
    return {
        "name": "consignments",
        "source": "consignly",
        "events": ["ConsignmentCreated"],
        "actions": [
            {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}},
            {"id": "ack", "use": "acknowledge", "after": "app", "with": {"base_url": api.url, **auth}},
        ],
    }


_MISSING = object()


def consignly_event(
    event_id: str, operation_id: Any = _MISSING, consignment_id: Any = CONSIGNMENT_ID
) -> bytes:
    payload: dict[str, Any] = {
        "id": event_id,
        "type": "consignment.created",
        "created": "2026-11-22T10:00:00Z",
        "data": {"consignmentId": consignment_id, "status": 1},
        "operationId": f"op-{event_id}" if operation_id is _MISSING else operation_id,
    }
    if payload["data"]["consignmentId"] is None:
        del payload["data"]["consignmentId"]
    if payload["operationId"] is None:
        del payload["operationId"]
    return json.dumps(payload).encode()


def send(gw: RunningGateway, body: bytes) -> None:
    assert gw.post("/webhooks/consignly", body, consignly_headers(body)).status_code == 200


def event_detail(gw: RunningGateway, event_id: str) -> EventDetail:
    [detail] = asyncio.run_coroutine_threadsafe(gw.gateway.storage.get_event(event_id), gw.loop).result(10)
    return detail


def delivery_states(gw: RunningGateway, event_id: str) -> dict[str, str]:
    return {d.action: d.state for d in event_detail(gw, event_id).deliveries}


# -- results ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app_status", "app_state", "result"),
    [(200, "delivered", 1), (400, "dead", 2)],
    ids=["delivered", "dead"],
)
def test_reports_the_parent_result_with_a_static_token(
    tmp_path: Path,
    downstream: Downstream,
    consignly_api: FakeConsignly,
    app_status: int,
    app_state: str,
    result: int,
) -> None:
    downstream.answer("/app", app_status)
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        # An id that is not a plain path segment: it must stay one segment, not reach another endpoint.
        send(gw, consignly_event("evt_1", "op-42", consignment_id="CN/2026 #7?x=1"))
        wait_until(lambda: delivery_states(gw, "evt_1") == {"app": app_state, "ack": "delivered"})
        [call] = consignly_api.calls
        assert call.method == "PUT"
        # One path segment (the fake API matched it as such) that decodes to the id; `=` may stay as it is.
        assert call.raw_path.startswith("/v1/consignments/CN%2F2026%20%237%3Fx")
        assert call.consignment_id == "CN/2026 #7?x=1"
        assert call.token == STATIC_TOKEN
        assert call.body == {"operationId": "op-42", "result": result}
        assert call.status == 200
        assert consignly_api.token_requests == []


@pytest.mark.parametrize("consignment_id", ["..", ".", "..;", ".;x", "..;jsessionid=1"])
def test_a_dot_segment_consignment_id_ends_dead_without_a_request(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly, consignment_id: str
) -> None:
    # Percent-encoding leaves dots as they are, and a URL resolves `..` and `.`: the PUT would go to
    # /v1/connection-result or /v1/consignments/connection-result instead. So does a servlet container
    # for `..;x`, whose `;x` it reads as a parameter of the segment: the client sends `;` as it is.
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_dots", consignment_id=consignment_id))
        wait_until(lambda: delivery_states(gw, "evt_dots") == {"app": "delivered", "ack": "dead"})
        ack = next(d for d in event_detail(gw, "evt_dots").deliveries if d.action == "ack")
        assert ack.last_error == f"data.consignmentId {consignment_id!r} is not a consignment id"
        assert consignly_api.calls == []
        assert [request.path for request in downstream.received()] == ["/app"]


def test_a_refused_static_token_ends_dead_without_retries(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    route = consignments_route(downstream, consignly_api, token="not-the-token")
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_refused"))
        wait_until(lambda: delivery_states(gw, "evt_refused") == {"app": "delivered", "ack": "dead"})
        # A static token cannot be renewed: the 401 is final.
        assert [call.status for call in consignly_api.calls] == [401]
        ack = next(d for d in event_detail(gw, "evt_refused").deliveries if d.action == "ack")
        assert (ack.last_status, ack.last_error) == (401, "HTTP 401: rejected")


def test_a_409_ends_dead_and_is_not_taken_for_already_recorded(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    consignly_api.outages = [409]
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_conflict"))
        wait_until(lambda: delivery_states(gw, "evt_conflict") == {"app": "delivered", "ack": "dead"})
        assert [call.status for call in consignly_api.calls] == [409]
        ack = next(d for d in event_detail(gw, "evt_conflict").deliveries if d.action == "ack")
        assert (ack.last_status, ack.last_error) == (409, "HTTP 409: rejected")


@pytest.mark.parametrize(
    ("status", "refusal", "error"),
    [
        # An RFC 9457 problem: its detail says which operation, not only that there was a conflict.
        (
            409,
            (
                "application/problem+json",
                b'{"type": "about:blank", "title": "Conflict", "status": 409,'
                b' "detail": "operation op-1 already has result 2"}',
            ),
            "HTTP 409: operation op-1 already has result 2",
        ),
        (400, ("application/problem+json", b'{"title": "Unknown operation"}'), "HTTP 400: Unknown operation"),
        # Text, on one line, however many it had.
        (
            403,
            ("text/plain", b"token lacks scope\r\nconsignments:write\n"),
            "HTTP 403: token lacks scope consignments:write",
        ),
        # Nothing to say, or a proxy's page: the status alone.
        (404, ("application/json", b""), "HTTP 404"),
        (403, ("text/html", b"<html><body><h1>403 Forbidden</h1></body></html>"), "HTTP 403"),
        # JSON nested deeper than the parser goes says nothing either: the refusal stays a refusal.
        (409, ("application/json", b"[" * 5000), "HTTP 409"),
        (409, ("application/json", b'{"detail": ' * 5000), "HTTP 409"),
    ],
)
def test_a_refusal_carries_what_the_api_answered(
    tmp_path: Path,
    downstream: Downstream,
    consignly_api: FakeConsignly,
    status: int,
    refusal: tuple[str, bytes],
    error: str,
) -> None:
    consignly_api.outages = [status]
    consignly_api.refusal = refusal
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_refusal"))
        wait_until(lambda: delivery_states(gw, "evt_refusal") == {"app": "delivered", "ack": "dead"})
        # The reason is told, and the status still decides: none of these is retried.
        assert [(a.outcome, a.status_code, a.error) for a in ack_history(gw, "evt_refusal")] == [
            ("dead", status, error)
        ]


def test_a_refusal_that_repeats_a_secret_does_not_show_it(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    consignly_api.refusal = (
        "application/json",
        json.dumps({"error": "unknown token not-the-token"}).encode(),
    )
    route = consignments_route(downstream, consignly_api, token="not-the-token")
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_echo"))
        wait_until(lambda: delivery_states(gw, "evt_echo") == {"app": "delivered", "ack": "dead"})
        ack = next(d for d in event_detail(gw, "evt_echo").deliveries if d.action == "ack")
        assert (ack.last_status, ack.last_error) == (401, "HTTP 401: unknown token …")


def test_an_oauth_refusal_does_not_show_the_access_token_or_the_client_secret(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    consignly_api.refuse_all = True
    consignly_api.refusal = (
        "text/plain",
        f"token tok-2 (client secret {CLIENT_SECRET}) is not allowed here".encode(),
    )
    route = consignments_route(downstream, consignly_api, **oauth(consignly_api))
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_oauth_echo"))
        wait_until(lambda: delivery_states(gw, "evt_oauth_echo") == {"app": "delivered", "ack": "dead"})
        # tok-1 was refused, renewed once, and tok-2 refused too: its 401 is the verdict.
        assert [call.token for call in consignly_api.calls] == ["tok-1", "tok-2"]
        ack = next(d for d in event_detail(gw, "evt_oauth_echo").deliveries if d.action == "ack")
        assert (ack.last_status, ack.last_error) == (
            401,
            "HTTP 401: token … (client secret …) is not allowed here",
        )


def test_events_without_an_operation_are_skipped(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hookyard.delivery")
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_no_op", operation_id=None))
        send(gw, consignly_event("evt_no_consignment", consignment_id=None))
        send(gw, consignly_event("evt_blank_op", operation_id=""))
        for event_id in ("evt_no_op", "evt_no_consignment", "evt_blank_op"):
            wait_until(lambda: delivery_states(gw, event_id) == {"app": "delivered", "ack": "skipped"})  # noqa: B023
        reasons = {
            event_id: next(d for d in event_detail(gw, event_id).deliveries if d.action == "ack").last_error
            for event_id in ("evt_no_op", "evt_no_consignment", "evt_blank_op")
        }
        assert reasons == {
            "evt_no_op": "the event has no operationId",
            "evt_no_consignment": "the event has no data.consignmentId",
            "evt_blank_op": "the event has no operationId",
        }
        assert consignly_api.calls == []
        assert (
            gw.metric("hookyard_deliveries_total", route="consignments", action="ack", outcome="skipped") == 3
        )
    # One log line per skipped acknowledgement, at INFO, naming the event and the reason (the JSON log's
    # fields are the record's extra attributes).
    skips = [
        record
        for record in caplog.records
        if record.name == "hookyard.delivery" and getattr(record, "action", None) == "ack"
    ]
    assert sorted(
        (r.levelname, r.getMessage(), getattr(r, "event_id", None), getattr(r, "error", None)) for r in skips
    ) == [
        ("INFO", "delivery skipped", "evt_blank_op", "the event has no operationId"),
        ("INFO", "delivery skipped", "evt_no_consignment", "the event has no data.consignmentId"),
        ("INFO", "delivery skipped", "evt_no_op", "the event has no operationId"),
    ]


@pytest.mark.parametrize(
    ("operation_id", "consignment_id", "error"),
    [
        (1.5, CONSIGNMENT_ID, "the event's operationId is the number 1.5, not text or an integer"),
        (True, CONSIGNMENT_ID, "the event's operationId is true, not text or an integer"),
        ({"id": "op-1"}, CONSIGNMENT_ID, "the event's operationId is an object, not text or an integer"),
        ("op-1", ["CN-1"], "the event's data.consignmentId is an array, not text or an integer"),
    ],
    ids=["fraction", "boolean", "object", "array"],
)
def test_an_id_of_the_wrong_kind_ends_dead_saying_so(
    tmp_path: Path,
    downstream: Downstream,
    consignly_api: FakeConsignly,
    operation_id: Any,
    consignment_id: Any,
    error: str,
) -> None:
    # The event belongs to an operation that waits for its result, which cannot be sent: not "the event has
    # no operationId" and skipped, as for an event without one, which hid the failure.
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_odd_id", operation_id, consignment_id=consignment_id))
        wait_until(lambda: delivery_states(gw, "evt_odd_id") == {"app": "delivered", "ack": "dead"})
        ack = next(d for d in event_detail(gw, "evt_odd_id").deliveries if d.action == "ack")
        assert (ack.attempts, ack.last_error) == (1, error)
        assert consignly_api.calls == []


def test_ids_that_are_integers_past_64_bits_are_reported_with_all_their_digits(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    # orjson reads such an integer as a float: the delivery ended dead, as if the id were
    # "the number 1.2345678901234568e+29".
    operation_id, consignment_id = 123456789012345678901234567891, 98765432109876543210987654321
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_big_ids", operation_id, consignment_id=consignment_id))
        wait_until(lambda: delivery_states(gw, "evt_big_ids") == {"app": "delivered", "ack": "delivered"})
        [call] = consignly_api.calls
        assert call.consignment_id == str(consignment_id)
        assert call.body == {"operationId": operation_id, "result": 1}


# -- the API's own failures -------------------------------------------------------------------------------


def ack_history(gw: RunningGateway, event_id: str) -> list[Attempt]:
    detail = event_detail(gw, event_id)
    ack = next(d for d in detail.deliveries if d.action == "ack")
    return detail.attempts[ack.id]


def test_api_outages_are_retried_until_acknowledged(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    consignly_api.outages = [503, 503]
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_api_down", "op-7"))
        wait_until(lambda: delivery_states(gw, "evt_api_down") == {"app": "delivered", "ack": "delivered"})
        assert [(a.number, a.outcome, a.status_code, a.error) for a in ack_history(gw, "evt_api_down")] == [
            (1, "retry", 503, "HTTP 503: rejected"),
            (2, "retry", 503, "HTTP 503: rejected"),
            (3, "delivered", 200, None),
        ]
        ack = next(d for d in event_detail(gw, "evt_api_down").deliveries if d.action == "ack")
        assert (ack.attempts, ack.last_status, ack.last_error) == (3, 200, None)
        # The same report every time, and only the acknowledgement is retried: the app got the event once.
        assert [(call.status, call.token, call.body) for call in consignly_api.calls] == [
            (503, STATIC_TOKEN, {"operationId": "op-7", "result": 1}),
            (503, STATIC_TOKEN, {"operationId": "op-7", "result": 1}),
            (200, STATIC_TOKEN, {"operationId": "op-7", "result": 1}),
        ]
        assert len(downstream.received("/app")) == 1
        labels = {"route": "consignments", "action": "ack"}
        assert gw.metric("hookyard_deliveries_total", **labels, outcome="retried") == 2
        assert gw.metric("hookyard_deliveries_total", **labels, outcome="delivered") == 1


def test_consignlys_retry_during_a_slow_delivery_is_a_duplicate_reported_once(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    downstream.delay = 1.0  # the app is still taking the event when Consignly sends it again
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        body = consignly_event("evt_resent", "op-3")
        send(gw, body)
        wait_until(lambda: downstream.in_flight == 1)
        again = gw.post("/webhooks/consignly", body, consignly_headers(body))
        assert (again.status_code, again.json()) == (200, {"id": "evt_resent", "status": "duplicate"})
        wait_until(lambda: delivery_states(gw, "evt_resent") == {"app": "delivered", "ack": "delivered"})
        # A later event is acknowledged after a second copy of the first would have been.
        send(gw, consignly_event("evt_after", "op-4"))
        wait_until(lambda: delivery_states(gw, "evt_after") == {"app": "delivered", "ack": "delivered"})
        assert len(downstream.received("/app")) == 2
        assert [call.body for call in consignly_api.calls] == [
            {"operationId": "op-3", "result": 1},
            {"operationId": "op-4", "result": 1},
        ]


def test_a_dead_acknowledgement_replayed_on_its_own_reports_the_recorded_result(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    # The API is down through the acknowledgement's whole schedule (4 attempts), then comes back.
    consignly_api.outages = [503] * 4
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_ack_dead", "op-5"))
        wait_until(lambda: delivery_states(gw, "evt_ack_dead") == {"app": "delivered", "ack": "dead"})
        replay = gw.client.post(
            gw.ops_url + "/admin/replay", json={"mode": "dead", "since": "1h", "action": "ack"}
        )
        assert replay.json()["replayed"] == 1
        wait_until(lambda: delivery_states(gw, "evt_ack_dead") == {"app": "delivered", "ack": "delivered"})
        # The app's recorded result, sent once more; the app is not sent the event again.
        assert [(call.status, call.body) for call in consignly_api.calls] == [
            *[(503, {"operationId": "op-5", "result": 1})] * 4,
            (200, {"operationId": "op-5", "result": 1}),
        ]
        assert len(downstream.received("/app")) == 1


def test_a_429_is_retried_after_its_retry_after(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    # The schedule's 50 ms would retry at once; the API asks for a second.
    consignly_api.outages = [(429, {"Retry-After": "1"})]
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_throttled"))
        wait_until(lambda: delivery_states(gw, "evt_throttled") == {"app": "delivered", "ack": "delivered"})
        first, second = ack_history(gw, "evt_throttled")
        assert (first.outcome, first.status_code, first.error) == ("retry", 429, "HTTP 429: rejected")
        assert (second.outcome, second.status_code) == ("delivered", 200)
        assert second.started_at - (first.started_at + first.duration) >= 0.99
        assert [call.status for call in consignly_api.calls] == [429, 200]


def test_a_replay_while_the_acknowledgement_retries_reports_the_new_result_only(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    downstream.answer("/app", 200, 503, 503, 200)  # after the replay, app fails twice before it is delivered
    consignly_api.outages = [503]  # the acknowledgement is retrying when the event is replayed
    route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
    config = gateway_config(tmp_path, routes=[route])
    config["defaults"]["retry"] = {"schedule": ["1s"] * 4, "jitter": 0}
    with RunningGateway(config) as gw:
        send(gw, consignly_event("evt_replayed", "op-9"))
        wait_until(lambda: consignly_api.calls)
        replay = gw.client.post(gw.ops_url + "/admin/events/evt_replayed/replay", json={})
        assert replay.json()["replayed"] == 1
        assert delivery_states(gw, "evt_replayed")["ack"] == "waiting"
        wait_until(
            lambda: delivery_states(gw, "evt_replayed") == {"app": "delivered", "ack": "delivered"},
            timeout=15,
        )
        # The acknowledgement's retry waited for app's new result: Consignly was never told it failed.
        assert [(call.status, call.body) for call in consignly_api.calls] == [
            (503, {"operationId": "op-9", "result": 1}),
            (200, {"operationId": "op-9", "result": 1}),
        ]
        assert len(downstream.received("/app")) == 4
        # It started over after the replay: its history keeps the attempt before it, and numbers on.
        assert [(a.number, a.outcome, a.status_code) for a in ack_history(gw, "evt_replayed")] == [
            (1, "retry", 503),
            (2, "delivered", 200),
        ]


def test_a_2xx_whose_body_is_cut_short_is_acknowledged_once(tmp_path: Path, downstream: Downstream) -> None:
    # The status decides: Consignly took the result. The attempt failed reading the rest of the body, and
    # the result was sent again with every retry, then recorded dead although Consignly had it.
    requests: list[bytes] = []

    def answer(conn: socket.socket) -> None:
        requests.append(b"PUT")
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{}")

    with raw_server(answer) as url:
        route = consignments_route(downstream, FakeConsignly(url=url), token=STATIC_TOKEN)
        with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
            send(gw, consignly_event("evt_cut_short"))
            wait_until(lambda: delivery_states(gw, "evt_cut_short")["ack"] in ("delivered", "dead"))
            history = ack_history(gw, "evt_cut_short")
    assert [(a.outcome, a.status_code, a.error) for a in history] == [("delivered", 200, None)]
    assert len(requests) == 1


def test_a_refused_connection_is_retried(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    host, _, port = consignly_api.url.removeprefix("http://").partition(":")
    with TcpProxy(host, int(port)) as proxy:
        proxy.cut()  # nothing listens on the proxy's port: connections are refused
        route = consignments_route(downstream, consignly_api, token=STATIC_TOKEN)
        route["actions"][1]["with"]["base_url"] = f"http://127.0.0.1:{proxy.port}"
        # Enough room for the refused attempts until the API is reachable again.
        route["actions"][1]["retry"] = {"schedule": ["100ms"] * 30, "jitter": 0}
        with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
            send(gw, consignly_event("evt_unreachable"))
            wait_until(lambda: ack_history(gw, "evt_unreachable"))
            proxy.restore()
            wait_until(
                lambda: delivery_states(gw, "evt_unreachable") == {"app": "delivered", "ack": "delivered"}
            )
            *refused, last = ack_history(gw, "evt_unreachable")
    assert refused
    for attempt in refused:
        assert (attempt.outcome, attempt.status_code) == ("retry", None)
        assert (attempt.error or "").startswith("cannot connect"), attempt.error
    assert (last.number, last.outcome, last.status_code) == (len(refused) + 1, "delivered", 200)
    # The refused attempts never reached the API.
    assert [call.status for call in consignly_api.calls] == [200]


# -- OAuth ------------------------------------------------------------------------------------------------


def test_one_token_serves_several_acknowledgements(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    # A slow token endpoint: deliveries that start meanwhile must wait for that fetch, not start their own.
    consignly_api.token_delay = 0.3
    route = consignments_route(downstream, consignly_api, **oauth(consignly_api, scope="connections"))
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        for index in range(3):
            send(gw, consignly_event(f"evt_many_{index}"))
        wait_until(lambda: len(consignly_api.acknowledged()) == 3)
        assert consignly_api.issued == ["tok-1"]
        assert {call.token for call in consignly_api.calls} == {"tok-1"}
        assert sorted(call.body["operationId"] for call in consignly_api.calls) == [
            "op-evt_many_0",
            "op-evt_many_1",
            "op-evt_many_2",
        ]
        [request] = consignly_api.token_requests
        # client_secret_post: the credentials travel in the form body.
        assert request["form"] == {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scope": "connections",
        }
        assert "authorization" not in request["headers"]


def test_the_token_is_renewed_before_it_expires(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    # 31 s with the 30 s safety margin: the gateway treats the token as valid for about one second.
    consignly_api.expires_in = 31
    route = consignments_route(downstream, consignly_api, **oauth(consignly_api))
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_early"))
        wait_until(lambda: len(consignly_api.acknowledged()) == 1)
        time.sleep(1.1)
        send(gw, consignly_event("evt_late"))
        wait_until(lambda: len(consignly_api.acknowledged()) == 2)
        assert consignly_api.issued == ["tok-1", "tok-2"]
        assert [call.token for call in consignly_api.calls] == ["tok-1", "tok-2"]
        # Renewed ahead of time: the API never saw the old token after its expiry.
        assert all(call.status == 200 for call in consignly_api.calls)


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [(3600, 3600.0), ("3600", 3600.0), ("3599.5", 3599.5), (float("inf"), None), ("NaN", None), (True, None)],
)
def test_expires_in_is_read_as_a_finite_number_of_seconds(expires_in: Any, lifetime: float | None) -> None:
    assert _expires_in({"expires_in": expires_in}) == lifetime


@pytest.mark.parametrize(
    ("suffix", "error"),
    [
        ("\n", "token endpoint: the access_token holds a line feed ('\\n'), which no header can carry"),
        # Any control character but the tab (RFC 9110 5.5): aiohttp refused the header on every attempt, a
        # ValueError and its traceback each time, for as long as the token was kept.
        (
            "\x01",
            "token endpoint: the access_token holds a control character ('\\x01'), which no header can carry",
        ),
        # httpx sends headers as ASCII: kept for its hour, the token made every attempt end in a
        # UnicodeEncodeError, and every acknowledgement dead, Consignly never told.
        ("é", "token endpoint: the access_token holds a character beyond ASCII"),
    ],
    ids=["line-break", "control-character", "beyond-ascii"],
)
def test_a_token_that_no_header_can_carry_is_not_kept(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly, suffix: str, error: str
) -> None:
    consignly_api.token_suffix = suffix
    route = consignments_route(downstream, consignly_api, **oauth(consignly_api))
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_bad_token"))
        wait_until(lambda: delivery_states(gw, "evt_bad_token") == {"app": "delivered", "ack": "delivered"})
        detail = event_detail(gw, "evt_bad_token")
        ack = detail.attempts[next(d.id for d in detail.deliveries if d.action == "ack")]
        assert [a.outcome for a in ack] == ["retry", "delivered"]
        assert ack[0].error == error
        assert consignly_api.issued == [f"tok-1{suffix}", "tok-2"]
        assert [call.token for call in consignly_api.calls] == ["tok-2"]


def test_a_401_renews_the_token_once_and_sends_again(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    route = consignments_route(downstream, consignly_api, **oauth(consignly_api))
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_before"))
        wait_until(lambda: delivery_states(gw, "evt_before") == {"app": "delivered", "ack": "delivered"})
        # The API forgets the token long before its announced expiry (revoked, server restarted).
        consignly_api.revoke()
        send(gw, consignly_event("evt_revoked"))
        wait_until(lambda: delivery_states(gw, "evt_revoked") == {"app": "delivered", "ack": "delivered"})
        assert [(call.token, call.status) for call in consignly_api.calls] == [
            ("tok-1", 200),
            ("tok-1", 401),
            ("tok-2", 200),
        ]
        ack = next(d for d in event_detail(gw, "evt_revoked").deliveries if d.action == "ack")
        assert ack.attempts == 1  # renewed and sent again within the same attempt

        # Refused even with a fresh token: one renewal only, then the 401 is the answer (not retryable).
        consignly_api.refuse_all = True
        send(gw, consignly_event("evt_disconnected"))
        wait_until(lambda: delivery_states(gw, "evt_disconnected") == {"app": "delivered", "ack": "dead"})
        assert [(call.token, call.status) for call in consignly_api.calls[3:]] == [
            ("tok-2", 401),
            ("tok-3", 401),
        ]
        assert consignly_api.issued == ["tok-1", "tok-2", "tok-3"]


def test_a_refused_token_is_not_used_again_when_its_renewal_fails(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    route = consignments_route(downstream, consignly_api, **oauth(consignly_api))
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_first"))
        wait_until(lambda: delivery_states(gw, "evt_first") == {"app": "delivered", "ack": "delivered"})
        # The token is revoked, and the token endpoint fails the renewal once.
        consignly_api.revoke()
        consignly_api.token_failures = [503]
        send(gw, consignly_event("evt_renewal_failed"))
        wait_until(
            lambda: delivery_states(gw, "evt_renewal_failed") == {"app": "delivered", "ack": "delivered"}
        )
        assert [(a.outcome, a.error) for a in ack_history(gw, "evt_renewal_failed")] == [
            ("retry", "token endpoint: HTTP 503 temporarily_unavailable"),
            ("delivered", None),
        ]
        # The next attempt asked for a new token first: the API was not sent the refused one again.
        assert [(call.token, call.status) for call in consignly_api.calls] == [
            ("tok-1", 200),
            ("tok-1", 401),
            ("tok-2", 200),
        ]


def test_token_endpoint_failures_are_retried(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    consignly_api.token_failures = [503]
    route = consignments_route(downstream, consignly_api, **oauth(consignly_api))
    with RunningGateway(gateway_config(tmp_path, routes=[route])) as gw:
        send(gw, consignly_event("evt_token_down"))
        wait_until(lambda: delivery_states(gw, "evt_token_down") == {"app": "delivered", "ack": "delivered"})
        detail = event_detail(gw, "evt_token_down")
        ack = next(d for d in detail.deliveries if d.action == "ack")
        assert [(a.outcome, a.error) for a in detail.attempts[ack.id]] == [
            ("retry", "token endpoint: HTTP 503 temporarily_unavailable"),
            ("delivered", None),
        ]
        assert [call.token for call in consignly_api.calls] == ["tok-1"]


def test_a_token_answer_past_64_kib_is_not_read_on(
    tmp_path: Path, downstream: Downstream, consignly_api: FakeConsignly
) -> None:
    # httpx read an answer whole, into memory, for as long as it came: a token endpoint that sent an endless
    # body took the gateway's memory (a gigabyte in 3 s on loopback) until the attempt timed out.
    def answer(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\n\r\n"
        )
        with contextlib.suppress(OSError):  # until the client closes the connection
            conn.sendall(b'{"access_token": "tok-endless", "padding": "')
            while True:
                conn.sendall(b"x" * 65536)
                time.sleep(0.01)

    route = consignments_route(downstream, consignly_api, **oauth(consignly_api))
    route["actions"][1]["retry"] = {"schedule": [], "jitter": 0}
    config = gateway_config(tmp_path, routes=[route], defaults={"timeout": "20s"})
    with raw_server(answer) as url:
        route["actions"][1]["with"]["oauth"]["token_url"] = f"{url}/oauth/token"
        with RunningGateway(config) as gw:
            send(gw, consignly_event("evt_endless_token"))
            wait_until(lambda: delivery_states(gw, "evt_endless_token")["ack"] == "dead", timeout=30)
            [attempt] = ack_history(gw, "evt_endless_token")
    assert attempt.error == "gave up after 1 attempt: token endpoint: the answer is longer than 64 KiB"
    assert attempt.duration < 10  # the limit, not the action's 20 s timeout
    assert consignly_api.calls == []


# -- the token cache on its own ---------------------------------------------------------------------------


def test_client_secret_basic_and_concurrent_callers(consignly_api: FakeConsignly) -> None:
    options = OAuthOptions.model_validate(
        {
            "token_url": f"{consignly_api.url}/oauth/token",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "auth_method": "client_secret_basic",
        }
    )
    consignly_api.token_delay = 0.2

    async def scenario() -> list[str]:
        async with httpx.AsyncClient() as http:
            credentials = ClientCredentials(options, http)
            return await asyncio.gather(*(credentials.token(5) for _ in range(5)))

    assert asyncio.run(scenario()) == ["tok-1"] * 5
    [request] = consignly_api.token_requests
    assert request["form"] == {"grant_type": "client_credentials"}
    assert request["headers"]["authorization"].startswith("Basic ")


def test_wrong_client_credentials_are_a_retryable_token_failure(consignly_api: FakeConsignly) -> None:
    options = OAuthOptions.model_validate(
        {"token_url": f"{consignly_api.url}/oauth/token", "client_id": CLIENT_ID, "client_secret": "wrong"}
    )

    async def scenario() -> TokenUnavailable:
        async with httpx.AsyncClient() as http:
            with pytest.raises(TokenUnavailable) as raised:
                await ClientCredentials(options, http).token(5)
            return raised.value

    failure = asyncio.run(scenario())
    assert (failure.outcome.kind, failure.outcome.error) == (
        "retry",
        "token endpoint: HTTP 401 invalid_client",
    )
    # The secret never shows in the options' repr.
    assert "wrong" not in repr(options)


@pytest.mark.parametrize("auth_method", ["client_secret_post", "client_secret_basic"])
def test_a_token_refusal_that_repeats_the_client_credentials_does_not_show_them(auth_method: str) -> None:
    # The `error` of a token endpoint's refusal goes into the delivery's error, which the admin API and the
    # log show: one that repeats what it was sent (the form, the Basic header) must not show the secret,
    # and one line, however long the answer, as every other refusal's reason is.
    async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = (await read_body(receive)).decode()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        said = f"invalid_client\r\nsent {body} {headers.get('authorization', '')} {unquote(body)}" + "x" * 500
        content = json.dumps({"error": said}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": content})

    async def scenario(url: str) -> TokenUnavailable:
        options = OAuthOptions.model_validate(
            {
                "token_url": f"{url}/oauth/token",
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "auth_method": auth_method,
            }
        )
        async with httpx.AsyncClient() as http:
            with pytest.raises(TokenUnavailable) as raised:
                await ClientCredentials(options, http).token(5)
            return raised.value

    with ServerThread(echo) as server:
        failure = asyncio.run(scenario(f"http://127.0.0.1:{server.port}"))
    error = failure.outcome.error or ""
    assert failure.outcome.kind == "retry"
    assert error.startswith("token endpoint: HTTP 401 invalid_client sent ")
    form_encoded = "cs_9f8e7d%266c5b%3D4a"
    basic = base64.b64encode(f"{CLIENT_ID}:{form_encoded}".encode()).decode()
    secrets = [CLIENT_SECRET, form_encoded, basic]
    assert not any(secret in error for secret in secrets), error
    assert "\r" not in error and "\n" not in error
    assert len(error) <= len("token endpoint: HTTP 401 ") + 200


@pytest.mark.parametrize(
    ("status", "error"),
    [(200, "token endpoint: the answer has no access_token"), (400, "token endpoint: HTTP 400")],
)
def test_a_token_answer_nested_past_the_json_parser_is_a_retryable_token_failure(
    status: int, error: str
) -> None:
    # Well within the 64 KiB that is read, and deeper than Python's json goes: its RecursionError failed the
    # attempt as an exception of the action, with a traceback in the log.
    nested = b"[" * 5000

    def answer(conn: socket.socket) -> None:
        conn.sendall(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(nested)}\r\n\r\n".encode()
            + nested
        )

    async def scenario(url: str) -> TokenUnavailable:
        options = OAuthOptions.model_validate(
            {"token_url": f"{url}/oauth/token", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        )
        async with httpx.AsyncClient() as http:
            with pytest.raises(TokenUnavailable) as raised:
                await ClientCredentials(options, http).token(5)
            return raised.value

    with raw_server(answer) as url:
        failure = asyncio.run(scenario(url))
    assert (failure.outcome.kind, failure.outcome.error) == ("retry", error)


def gzip_answer(status: int, content: bytes) -> Any:
    """A raw server's answer: `content` gzip-compressed, as a server sends it to a client that accepts it."""
    body = gzip.compress(content, 9)

    def answer(conn: socket.socket) -> None:
        conn.sendall(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )

    return answer


def token_from(url: str) -> tuple[str | TokenUnavailable, int]:
    """What the token endpoint at `url` gives through the gateway's shared client, and the most memory
    Python held at once while it was read."""

    async def scenario() -> str | TokenUnavailable:
        options = OAuthOptions.model_validate(
            {"token_url": f"{url}/oauth/token", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        )
        client = HttpClient(ssl_context=default_ssl_context(), user_agent="hookyard/test")
        resources = Resources(
            client=client, user_agent="hookyard/test", ssl_context=client.ssl_context, pool=1
        )
        http = resources.http  # made (and aiohttp loaded) before the count starts
        tracemalloc.start()
        try:
            return await ClientCredentials(options, http).token(5)
        except TokenUnavailable as exc:
            return exc
        finally:
            await resources.aclose()

    try:
        result = asyncio.run(scenario())
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_compressed_token_answer_is_read_decoded() -> None:
    answer = json.dumps({"access_token": "tok-gzip", "expires_in": 3600}).encode()
    with raw_server(gzip_answer(200, answer)) as url:
        token, _peak = token_from(url)
    assert token == "tok-gzip"


def test_a_compressed_answer_is_decoded_no_further_than_64_kib() -> None:
    # 64 MiB of zeros in 64 KiB: decoded whole chunk by chunk (16 KiB of it into 16 MiB at a time), each
    # answer of a receiver that sent it took that much memory, times the deliveries running at once.
    with raw_server(gzip_answer(200, b"0" * (64 * 1024 * 1024))) as url:
        failure, peak = token_from(url)
    assert isinstance(failure, TokenUnavailable)
    assert failure.outcome.error == "token endpoint: the answer is longer than 64 KiB"
    assert peak < 4 * 1024 * 1024


# -- config checks ----------------------------------------------------------------------------------------


def build(tmp_path: Path, *actions: dict[str, Any]) -> RouteTable:
    route = {"name": "consignments", "source": "consignly", "actions": list(actions)}
    config = gateway_config(tmp_path, routes=[route])
    return RouteTable.build(parse_config(yaml.safe_dump(config)), registry())


APP: dict[str, Any] = {"id": "app", "use": "forward", "with": {"url": "http://127.0.0.1:9/app"}}


def test_valid_acknowledge_options_load(tmp_path: Path) -> None:
    static = {"base_url": "https://api.example/", "token": STATIC_TOKEN}
    client = {
        "base_url": "https://api.example",
        "oauth": {"token_url": "https://auth.example/token", "client_id": "c", "client_secret": "s"},
    }
    table = build(
        tmp_path,
        APP,
        {"id": "ack", "use": "acknowledge", "after": "app", "with": static},
        {"id": "ack-oauth", "use": "acknowledge", "after": "app", "with": client},
    )
    options = table.actions[("consignments", "ack")].options
    assert isinstance(options, AcknowledgeOptions)
    assert options.base_url == "https://api.example"  # no double slash before /v1
    oauth_options = table.actions[("consignments", "ack-oauth")].options
    assert isinstance(oauth_options, AcknowledgeOptions) and oauth_options.oauth is not None
    assert oauth_options.oauth.auth_method == "client_secret_post"


def test_acknowledge_needs_after(tmp_path: Path) -> None:
    ack = {"id": "ack", "use": "acknowledge", "with": {"base_url": "https://api.example", "token": "t"}}
    with pytest.raises(ConfigError) as raised:
        build(tmp_path, APP, ack)
    assert raised.value.errors == [
        "routes[0].actions[1].after: 'acknowledge' reports on another action's result; name it with after:"
    ]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {
                "token": "t",
                "oauth": {"token_url": "https://auth.example/token", "client_id": "c", "client_secret": "s"},
            },
            "routes[0].actions[1].with: give either token or oauth, not both",
        ),
        (
            {},
            "routes[0].actions[1].with: give a bearer token or oauth client credentials (token_url, client_id, ...)",
        ),
        # `${CONSIGNLY_TOKEN:-}` with the variable unset counts as no token.
        (
            {"token": " "},
            "routes[0].actions[1].with: give a bearer token or oauth client credentials (token_url, client_id, ...)",
        ),
        (
            {"oauth": {"token_url": "https://auth.example/token", "client_id": "c"}},
            "routes[0].actions[1].with.oauth.client_secret: field required",
        ),
        (
            {"token": "t", "base_url": "api.example"},
            "routes[0].actions[1].with.base_url: 'api.example' is not an http(s) URL",
        ),
        (
            {"token": "t", "base_url": "https://user:pw@api.example"},
            "routes[0].actions[1].with.base_url: 'https://api.example': credentials in the URL cannot be sent; "
            "use a header or token",
        ),
        (
            {"oauth": {"token_url": "https://auth.example/token", "client_id": " ", "client_secret": ""}},
            "routes[0].actions[1].with.oauth.client_id: is empty (a ${VAR:-} whose variable is unset?)\n"
            "routes[0].actions[1].with.oauth.client_secret: is empty (a ${VAR:-} whose variable is unset?)",
        ),
        # The path would go into the query (or fragment), and the PUT to the base URL itself.
        (
            {"token": "t", "base_url": "https://api.example/consignly?tenant=a"},
            "routes[0].actions[1].with.base_url: 'https://api.example/…': a base URL cannot have a query or a "
            "fragment; /v1/consignments/... is appended to it",
        ),
        (
            {"token": "t", "base_url": "https://api.example/#top"},
            "routes[0].actions[1].with.base_url: 'https://api.example/…': a base URL cannot have a query or a "
            "fragment; /v1/consignments/... is appended to it",
        ),
    ],
    ids=[
        "both",
        "neither",
        "blank-token",
        "oauth-incomplete",
        "oauth-blank",
        "base-url",
        "base-url-credentials",
        "base-url-query",
        "base-url-fragment",
    ],
)
def test_credentials_are_checked_at_config_load(
    tmp_path: Path, options: dict[str, Any], expected: str
) -> None:
    ack = {
        "id": "ack",
        "use": "acknowledge",
        "after": "app",
        "with": {"base_url": "https://api.example", **options},
    }
    with pytest.raises(ConfigError) as raised:
        build(tmp_path, APP, ack)
    assert raised.value.errors == expected.split("\n")


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("static-api-token\n", "a line feed ('\\n')"),
        ("static-api\rtoken", "a carriage return ('\\r')"),
        ("static-api\x00token", "a NUL ('\\x00')"),
        # Not a line break, but no header may carry it either (RFC 9110 5.5): it passed `hookyard check`, then
        # aiohttp refused the header on every attempt, as below.
        ("static-api\x01token", "a control character ('\\x01')"),
        ("static-api-token\x7f", "a control character ('\\x7f')"),
    ],
    ids=["line-feed", "carriage-return", "nul", "control", "delete"],
)
def test_a_static_token_that_cannot_be_a_header_fails_at_config_load(
    tmp_path: Path, token: str, expected: str
) -> None:
    # A token read from a file keeps its trailing newline. It passed `hookyard check`; then aiohttp refused
    # the header on every attempt (a ValueError, not an httpx error: "action raised" with a traceback each
    # time) and the acknowledgement ended dead after the whole schedule, Consignly never told.
    assert static_token_errors(tmp_path, token) == [
        f"routes[0].actions[1].with.token: the token holds {expected}, which no header can carry"
    ]


def test_a_static_token_beyond_ascii_fails_at_config_load(tmp_path: Path) -> None:
    # It passed `hookyard check`; then httpx could not encode the header, and every attempt ended in a
    # UnicodeEncodeError until the acknowledgement was dead, Consignly never told.
    assert static_token_errors(tmp_path, "jeton-sécurisé") == [
        "routes[0].actions[1].with.token: the token holds a character beyond ASCII, which no bearer token has"
    ]


def static_token_errors(tmp_path: Path, token: str) -> list[str]:
    """What loading an acknowledge action with the static `token` is refused with."""
    ack = {
        "id": "ack",
        "use": "acknowledge",
        "after": "app",
        "with": {"base_url": "https://api.example", "token": token},
    }
    with pytest.raises(ConfigError) as raised:
        build(tmp_path, APP, ack)
    return raised.value.errors
