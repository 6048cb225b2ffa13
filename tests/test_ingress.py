"""The webhook listener against a real uvicorn server and a real downstream receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import yaml

from tests.support import (
    CONSIGNLY_SECRETS,
    SVIX_SECRET,
    Downstream,
    GatewayProcess,
    RunningGateway,
    consignly_body,
    consignly_headers,
    free_port,
    gateway_config,
    plugins_with,
    svix_request,
    wait_until,
)


@pytest.fixture
def gw(tmp_path, downstream: Downstream):
    with RunningGateway(gateway_config(tmp_path, downstream.url)) as running:
        yield running


def test_svix_signed_request_is_accepted_and_forwarded(gw: RunningGateway, downstream: Downstream) -> None:
    body, headers = svix_request(msg_id="msg_forward_1")
    response = gw.post("/webhooks/consignease", body, headers)
    assert response.status_code == 200
    assert response.json() == {"id": "msg_forward_1", "status": "accepted"}

    [forwarded] = downstream.wait_for(1, "/hooks/users")
    assert forwarded.method == "POST"
    assert forwarded.body == body
    assert forwarded.headers["content-type"] == "application/json"
    assert forwarded.headers["idempotency-key"] == "msg_forward_1"
    assert forwarded.headers["x-hookyard-event-id"] == "msg_forward_1"
    assert forwarded.headers["x-hookyard-source"] == "consignease"
    assert forwarded.headers["x-hookyard-type"] == "user.created"
    assert gw.metric("hookyard_webhooks_received_total", source="consignease", outcome="accepted") == 1


def test_json_after_a_byte_order_mark_is_forwarded_as_it_came_and_deliveries_go_on(
    gw: RunningGateway, downstream: Downstream
) -> None:
    # Accepted at the door, the event's payload was parsed again from its stored body when its delivery was
    # claimed for a retry, without the mark allowed for: every claim of deliveries failed, this one's and
    # all others' with it.
    from svix.webhooks import Webhook

    downstream.answer("/hooks/users", 503)  # the first attempt fails: the retry is claimed from the store
    plain, headers = svix_request(msg_id="msg_with_a_mark")
    body = b"\xef\xbb\xbf" + plain
    timestamp = datetime.fromtimestamp(int(headers["svix-timestamp"]), tz=UTC)
    headers["svix-signature"] = Webhook(SVIX_SECRET).sign("msg_with_a_mark", timestamp, body.decode())
    assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
    downstream.wait_for(1, "/hooks/users")  # its first attempt, refused
    after, after_headers = svix_request(msg_id="msg_after_the_mark")
    assert gw.post("/webhooks/consignease", after, after_headers).json()["status"] == "accepted"
    forwarded = {r.headers["idempotency-key"]: r.body for r in downstream.wait_for(3, "/hooks/users")}
    assert forwarded == {"msg_with_a_mark": body, "msg_after_the_mark": after}


def test_same_request_twice_is_a_duplicate_and_forwarded_once(
    gw: RunningGateway, downstream: Downstream
) -> None:
    body, headers = svix_request(msg_id="msg_dup")
    assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
    downstream.wait_for(1, "/hooks/users")
    again = gw.post("/webhooks/consignease", body, headers)
    assert again.status_code == 200
    assert again.json() == {"id": "msg_dup", "status": "duplicate"}

    # A later event is delivered after the duplicate would have been: by then a second copy would show.
    marker_body, marker_headers = svix_request(msg_id="msg_marker")
    gw.post("/webhooks/consignease", marker_body, marker_headers)
    received = downstream.wait_for(2, "/hooks/users")
    assert [r.headers["idempotency-key"] for r in received] == ["msg_dup", "msg_marker"]
    assert gw.metric("hookyard_webhooks_received_total", source="consignease", outcome="duplicate") == 1


def _tampered() -> tuple[bytes, dict[str, str]]:
    body, headers = svix_request()
    return body.replace(b"Ada", b"Eve"), headers


def _wrong_secret() -> tuple[bytes, dict[str, str]]:
    return svix_request(secret="whsec_" + "A" * 43 + "=")


def _old() -> tuple[bytes, dict[str, str]]:
    return svix_request(timestamp=datetime.now(tz=UTC) - timedelta(minutes=6))


@pytest.mark.parametrize(
    ("make_request", "reason"),
    [
        (_tampered, "invalid_signature"),
        (_wrong_secret, "invalid_signature"),
        (_old, "timestamp_out_of_tolerance"),
    ],
    ids=["tampered-body", "wrong-secret", "old-timestamp"],
)
def test_bad_svix_requests_are_401_and_counted_by_reason(
    gw: RunningGateway, downstream: Downstream, make_request, reason: str
) -> None:
    body, headers = make_request()
    response = gw.post("/webhooks/consignease", body, headers)
    assert response.status_code == 401
    assert response.json()["error"] == reason
    assert gw.metric("hookyard_webhook_rejections_total", source="consignease", reason=reason) == 1
    assert gw.metric("hookyard_webhooks_received_total", source="consignease", outcome="rejected") == 1
    assert SVIX_SECRET_FRAGMENT not in response.text


SVIX_SECRET_FRAGMENT = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_a_flood_of_refused_webhooks_is_logged_once_a_minute_per_source_and_reason(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    # Anyone who can reach the listener can send a request with no signature or a wrong one, or one that is
    # not HTTP: a line for each would let them write the log as fast as they send. The metric counts each.
    caplog.set_level(logging.INFO)
    body, headers = svix_request(msg_id="msg_flood", secret="whsec_" + "A" * 43 + "=")
    for _ in range(20):
        assert gw.post("/webhooks/consignease", body, headers).status_code == 401
    unsigned = {"content-type": "application/json"}
    for _ in range(5):
        assert gw.post("/webhooks/consignease", body, unsigned).status_code == 401
    for _ in range(5):
        with socket.create_connection(gw.ingress_sock.getsockname()) as conn:
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 400 ")

    def logged(message: str) -> list[dict[str, Any]]:
        return [vars(record) for record in caplog.records if record.getMessage() == message]

    refusals = [(r["source"], r["reason"], r["suppressed"]) for r in logged("webhook rejected")]
    assert refusals == [
        ("consignease", "invalid_signature", 0),
        ("consignease", "missing_signature", 0),
    ]
    assert [r["suppressed"] for r in logged("Invalid HTTP request received.")] == [0]
    assert (
        gw.metric("hookyard_webhook_rejections_total", source="consignease", reason="invalid_signature") == 20
    )


def test_a_refusal_logged_after_the_interval_says_how_many_went_unlogged(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gw.gateway.ingress.log_throttle.interval = 1.0
    body, headers = svix_request(msg_id="msg_unlogged", secret="whsec_" + "A" * 43 + "=")
    for _ in range(10):
        assert gw.post("/webhooks/consignease", body, headers).status_code == 401
    time.sleep(1.1)  # one interval since the last line at the latest: the next refusal is logged
    assert gw.post("/webhooks/consignease", body, headers).status_code == 401
    lines = [vars(record) for record in caplog.records if record.getMessage() == "webhook rejected"]
    # Each refusal was logged, or counted in the line after it.
    assert len(lines) + sum(line["suppressed"] for line in lines) == 11
    assert lines[0]["suppressed"] == 0 and 1 <= len(lines) < 11


@pytest.mark.parametrize("secret", CONSIGNLY_SECRETS, ids=["client-secret", "signing-key-1", "signing-key-2"])
def test_consignly_request_is_accepted_with_any_configured_secret(
    gw: RunningGateway, downstream: Downstream, secret: str
) -> None:
    body = consignly_body(event_id=f"evt_{secret}")
    # Signed exactly as the Consignly docs describe: hex HMAC-SHA256 of the raw body, prefixed sha256=.
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    response = gw.post(
        "/webhooks/consignly", body, {"content-type": "application/json", "X-Consignly-Signature": signature}
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "accepted"
    [forwarded] = downstream.wait_for(1, "/hooks/consignments")
    assert forwarded.headers["x-hookyard-type"] == "consignment.created"


def test_consignly_unknown_secret_is_rejected(gw: RunningGateway) -> None:
    body = consignly_body()
    response = gw.post("/webhooks/consignly", body, consignly_headers(body, secret="not-a-configured-secret"))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_signature"


def test_unknown_path_is_404(gw: RunningGateway) -> None:
    response = gw.post("/webhooks/nope", b"{}", {})
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_path"


def raw_post(url: str, target: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """POST to `target` exactly as written (httpx would normalise it), on a connection of its own: the
    status and the JSON answer."""
    host, port = url.removeprefix("http://").split(":")
    head = f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("target", ["/webhooks%2Fconsignly", "/webhooks%2fconsignly"])
def test_an_encoded_slash_is_no_path_separator(gw: RunningGateway, target: str) -> None:
    """`/webhooks%2Fconsignly` was taken as `/webhooks/consignly`: the path decoded, its %2F read as a `/`.
    A path whose segments differ from the source's is another path, answered as any unknown one."""
    body = consignly_body(event_id="evt_encoded_slash")
    assert raw_post(gw.url, target, body, consignly_headers(body)) == (
        404,
        {"error": "unknown_path", "detail": "no source listens on this path"},
    )
    assert gw.metric("hookyard_webhook_rejections_total", source="", reason="unknown_path") == 1
    assert gw.metric("hookyard_webhooks_received_total", source="", outcome="rejected") == 1
    stored = asyncio.run_coroutine_threadsafe(gw.gateway.storage.get_event("evt_encoded_slash"), gw.loop)
    assert stored.result(10) == []
    # Another character escaped is the same character: the source's own path.
    assert raw_post(gw.url, "/webhooks/consign%6Cy", body, consignly_headers(body))[0] == 200


def test_wrong_method_is_405(gw: RunningGateway) -> None:
    response = gw.client.get(gw.url + "/webhooks/consignly")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert (
        gw.metric("hookyard_webhook_rejections_total", source="consignly", reason="method_not_allowed") == 1
    )


def test_body_over_the_limit_is_413_by_content_length_and_while_streaming(tmp_path, downstream) -> None:
    config = gateway_config(tmp_path, downstream.url, limits={"max_body_bytes": 1000})
    with RunningGateway(config) as gw:
        big = consignly_body(padding="x" * 2000)
        response = gw.post("/webhooks/consignly", big, consignly_headers(big))
        assert response.status_code == 413
        assert response.json()["error"] == "body_too_large"

        def chunks():
            for _ in range(20):
                yield b"x" * 100

        # No Content-Length: the limit is enforced while reading, before the body is all in memory.
        streamed = gw.client.post(
            gw.url + "/webhooks/consignly", content=chunks(), headers=consignly_headers(big)
        )
        assert streamed.status_code == 413
        assert (
            gw.metric("hookyard_webhook_rejections_total", source="consignly", reason="body_too_large") == 2
        )


def test_signed_body_that_is_not_json_is_400(gw: RunningGateway) -> None:
    body = b"this is not json"
    response = gw.post("/webhooks/consignly", body, consignly_headers(body))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_json"


def test_json_nested_past_the_parser_s_limit_is_refused_saying_so(gw: RunningGateway) -> None:
    # Valid JSON all the same: "not valid JSON" would send its sender looking for a syntax error. (orjson
    # stops at the depth before it would find one.)
    deep = b"[" * 1025 + b"]" * 1025
    body = b'{"id": "evt_deep", "type": "consignment.created", "data": {"deep": ' + deep + b"}}"
    response = gw.post("/webhooks/consignly", body, consignly_headers(body))
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_json",
        "detail": "the body nests more than 1024 levels deep, more than the gateway reads",
    }
    within = b"[" * 1020 + b"]" * 1020
    body = b'{"id": "evt_ok", "type": "consignment.created", "data": {"deep": ' + within + b"}}"
    assert gw.post("/webhooks/consignly", body, consignly_headers(body)).status_code == 200


def test_unsigned_body_that_is_not_json_is_401_not_400(gw: RunningGateway) -> None:
    # Verification comes first: an unauthenticated sender learns nothing about parsing.
    response = gw.post("/webhooks/consignly", b"not json", {"x-consignly-signature": "sha256=" + "0" * 64})
    assert response.status_code == 401


@pytest.mark.parametrize(("field", "reason"), [("id", "missing_event_id"), ("type", "missing_event_type")])
def test_payload_without_id_or_type_is_400(gw: RunningGateway, field: str, reason: str) -> None:
    payload = json.loads(consignly_body())
    del payload[field]
    body = json.dumps(payload).encode()
    response = gw.post("/webhooks/consignly", body, consignly_headers(body))
    assert response.status_code == 400
    assert response.json()["error"] == reason


@pytest.mark.parametrize(
    ("value", "described"),
    [(1.5, "the number 1.5"), (True, "true"), ([101], "an array"), ({"code": 101}, "an object")],
)
@pytest.mark.parametrize("source", ["consignly", "consignease"])
def test_a_type_that_is_no_string_or_integer_is_refused_saying_what_it_is(
    gw: RunningGateway, source: str, value: Any, described: str
) -> None:
    if source == "consignly":
        payload = json.loads(consignly_body())
        payload["type"] = value
        body = json.dumps(payload).encode()
        headers = consignly_headers(body)
    else:
        body, headers = svix_request(event_type=value)
    response = gw.post(f"/webhooks/{source}", body, headers)
    assert response.status_code == 400
    # The reason is the label it always was; the detail says what came instead of a type.
    assert response.json() == {
        "error": "missing_event_type",
        "detail": f"the payload's type is {described}, not a string or an integer",
    }


@pytest.mark.parametrize(("field", "reason"), [("id", "missing_event_id"), ("type", "missing_event_type")])
# The second is one below the least 64-bit integer, which the parser reads as that integer's value, -2**63.
@pytest.mark.parametrize("number", [b"12345678901234567890123", b"-9223372036854775809"])
def test_an_integer_past_64_bits_is_refused_saying_so(
    gw: RunningGateway, field: str, reason: str, number: bytes
) -> None:
    # The JSON parser reads an integer past 64 bits as a float: the detail said "the payload's id is the
    # number 1.2345678901234568e+22, not a string or an integer" of the integer its sender wrote.
    payload = json.loads(consignly_body())
    payload[field] = "BIG"
    body = json.dumps(payload).encode().replace(b'"BIG"', number)
    response = gw.post("/webhooks/consignly", body, consignly_headers(body))
    assert response.status_code == 400
    assert response.json() == {
        "error": reason,
        "detail": f"the payload's {field} is an integer past 64 bits, which the gateway cannot read "
        "exactly: send it as a string",
    }


def _send_consignly_with(gw: RunningGateway, field: str, value: str) -> httpx.Response:
    """A signed Consignly webhook whose payload's `field` is `value`."""
    payload = json.loads(consignly_body())
    payload[field] = value
    body = json.dumps(payload).encode()
    return gw.post("/webhooks/consignly", body, consignly_headers(body))


@pytest.mark.parametrize(
    ("field", "value", "reason", "named"),
    [
        ("id", "evt_1\nx", "missing_event_id", "the payload's id holds a line feed"),
        ("id", "evt_1\x00", "missing_event_id", "the payload's id holds a NUL"),
        ("type", "consignment.created\r\nx-injected: 1", "missing_event_type", "the payload's type holds a"),
        ("type", "consignment.created\x07", "missing_event_type", "the payload's type holds a control"),
        # HTTP strips spaces and tabs from both ends of a header's value (RFC 9110 §5.5): sent on, "evt_1 "
        # arrived as the Idempotency-Key of another event, evt_1, and a receiver deduping on it dropped one.
        ("id", "evt_1 ", "missing_event_id", "the payload's id ends with a space, which HTTP strips"),
        ("id", "\tevt_1", "missing_event_id", "the payload's id begins with a tab, which HTTP strips"),
        ("id", " ", "missing_event_id", "the payload's id begins with a space"),
        ("type", " consignment.created", "missing_event_type", "the payload's type begins with a space"),
    ],
)
def test_an_id_or_type_no_header_can_carry_is_refused_not_accepted_then_dead(
    gw: RunningGateway, downstream: Downstream, field: str, value: str, reason: str, named: str
) -> None:
    # Both are sent on in headers (Idempotency-Key, X-Hookyard-Event-Id, X-Hookyard-Type): accepted, such an
    # event had every delivery dead at its first attempt, and the sender was told all was well.
    response = _send_consignly_with(gw, field, value)
    assert response.status_code == 400
    assert response.json()["error"] == reason
    assert response.json()["detail"].startswith(named)
    assert gw.metric("hookyard_webhook_rejections_total", source="consignly", reason=reason) == 1
    assert _run(gw, gw.gateway.storage.get_event(value if field == "id" else "evt_1")) == []


@pytest.mark.parametrize(
    ("field", "value", "reason", "detail"),
    [
        ("id", "e" * 100_000, "missing_event_id", "the payload's id is 100000 bytes long"),
        ("id", "\u00e9" * 256 + "x", "missing_event_id", "the payload's id is 513 bytes long"),
        ("type", "t" * 100_000, "missing_event_type", "the payload's type is 100000 bytes long"),
    ],
)
def test_an_id_or_type_too_long_to_send_on_is_refused_not_accepted_then_dead(
    gw: RunningGateway, field: str, value: str, reason: str, detail: str
) -> None:
    # Both are sent on in headers (Idempotency-Key, X-Hookyard-Event-Id, X-Hookyard-Type), which receivers
    # refuse past a few KB (431), and the store action indexes the id: such an event was answered 200, then
    # every delivery of it was dead.
    response = _send_consignly_with(gw, field, value)
    assert response.status_code == 400
    assert response.json() == {"error": reason, "detail": f"{detail}; the limit is 512 bytes of UTF-8"}
    assert gw.metric("hookyard_webhook_rejections_total", source="consignly", reason=reason) == 1
    assert _run(gw, gw.gateway.storage.get_event(value if field == "id" else "evt_1")) == []


def test_an_id_of_512_bytes_is_accepted(gw: RunningGateway) -> None:
    event_id = "\u00e9" * 256  # 256 characters, 512 bytes of UTF-8
    body = consignly_body(event_id=event_id)
    response = gw.post("/webhooks/consignly", body, consignly_headers(body))
    assert response.status_code == 200
    assert response.json() == {"id": event_id, "status": "accepted"}


def test_a_header_id_too_long_to_send_on_is_refused(gw: RunningGateway) -> None:
    # The id from svix-id goes the same way as one from the payload.
    msg_id = "msg_" + "x" * 600
    body, headers = svix_request(msg_id=msg_id)
    response = gw.post("/webhooks/consignease", body, headers)
    assert response.status_code == 400
    assert response.json() == {
        "error": "missing_event_id",
        "detail": "the svix-id header is 604 bytes long; the limit is 512 bytes of UTF-8",
    }
    assert (
        gw.metric("hookyard_webhook_rejections_total", source="consignease", reason="missing_event_id") == 1
    )
    assert _run(gw, gw.gateway.storage.get_event(msg_id)) == []


def test_event_matching_no_route_is_stored_but_not_delivered(
    gw: RunningGateway, downstream: Downstream
) -> None:
    body, headers = svix_request(event_type="session.created", msg_id="msg_unrouted")
    assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
    marker, marker_headers = svix_request(msg_id="msg_after_unrouted")
    gw.post("/webhooks/consignease", marker, marker_headers)
    received = downstream.wait_for(1, "/hooks/users")
    assert [r.headers["idempotency-key"] for r in received] == ["msg_after_unrouted"]
    details = _run(gw, gw.gateway.storage.get_event("msg_unrouted"))
    assert details[0].deliveries == []


def _run(gw: RunningGateway, coroutine):
    return asyncio.run_coroutine_threadsafe(coroutine, gw.loop).result(10)


def test_storage_that_cannot_write_answers_503_never_2xx(gw: RunningGateway, downstream: Downstream) -> None:
    storage = gw.gateway.storage
    _run(gw, storage._run(lambda conn: conn.execute("PRAGMA query_only = ON")))
    try:
        body, headers = svix_request(msg_id="msg_while_readonly")
        response = gw.post("/webhooks/consignease", body, headers)
        assert response.status_code == 503
        assert response.json()["error"] == "storage_unavailable"
        assert response.headers["retry-after"]
        assert gw.client.get(gw.ops_url + "/readyz").status_code == 503
        assert (
            gw.metric("hookyard_webhook_rejections_total", source="consignease", reason="storage_unavailable")
            == 1
        )
    finally:
        # Not through the writer: with query_only on, even its BEGIN IMMEDIATE fails.
        storage._writer.connection.execute("PRAGMA query_only = OFF")
    # Nothing was stored, so the provider's retry of the same request is accepted, not a duplicate.
    retried = gw.post("/webhooks/consignease", body, headers)
    assert retried.json() == {"id": "msg_while_readonly", "status": "accepted"}
    assert gw.client.get(gw.ops_url + "/readyz").status_code == 200
    downstream.wait_for(1, "/hooks/users")


def test_ops_endpoints(gw: RunningGateway) -> None:
    assert gw.client.get(gw.ops_url + "/healthz").json() == {"status": "ok"}
    assert gw.client.get(gw.ops_url + "/readyz").json() == {"status": "ready"}
    metrics = gw.client.get(gw.ops_url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'hookyard_build_info{version="' in metrics.text
    # The ops endpoints are not on the webhook listener.
    assert httpx.get(gw.url + "/metrics").status_code == 404


def test_credentials_in_headers_are_never_stored(tmp_path, downstream: Downstream) -> None:
    sources = {
        "gitlab": {
            "path": "/webhooks/gitlab",
            "provider": "token",
            "secrets": ["glpat-secret"],
            "options": {"header": "X-Gitlab-Token", "type_from": "header:X-Gitlab-Event"},
        }
    }
    with RunningGateway(gateway_config(tmp_path, downstream.url, sources=sources, routes=[])) as gw:
        body = json.dumps({"id": "push-1", "object_kind": "push"}).encode()
        headers = {
            "x-gitlab-token": "glpat-secret",
            "x-gitlab-event": "Push Hook",
            "authorization": "Bearer something",
            "proxy-authorization": "Basic c29tZW9uZQ==",
            "cookie": "session=1",
            "content-type": "application/json",
        }
        assert gw.post("/webhooks/gitlab", body, headers).json() == {"id": "push-1", "status": "accepted"}
        [detail] = _run(gw, gw.gateway.storage.get_event("push-1"))
        stored = detail.event.headers
        assert stored["x-gitlab-event"] == "Push Hook"
        assert not {"x-gitlab-token", "authorization", "proxy-authorization", "cookie"} & set(stored)
        assert stored["content-type"] == "application/json"


def test_slack_url_verification_gets_its_challenge_back(tmp_path, downstream: Downstream) -> None:
    from gateway.sender import build_request

    sources = {
        "slack": {
            "path": "/webhooks/slack",
            "provider": "slack",
            "secrets": ["8f742231b10e8888abcd99yyyzzz85a5"],
        }
    }
    with RunningGateway(gateway_config(tmp_path, downstream.url, sources=sources, routes=[])) as gw:
        path, body, headers = build_request(gw.gateway.table, "slack", "url_verification", event_id="abc")
        answer = gw.post(path, body, headers).json()
        assert answer["challenge"] == json.loads(body)["challenge"]
        assert answer["status"] == "accepted"


def test_slack_url_verification_whose_challenge_is_no_text_is_accepted_without_an_echo(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    # Slack's challenge is text. One nested past the 254 levels orjson writes (the gateway reads 1024) was
    # stored, then answered 500 with a traceback in the log, and its retry `duplicate`.
    secret = "8f742231b10e8888abcd99yyyzzz85a5"
    sources = {"slack": {"path": "/webhooks/slack", "provider": "slack", "secrets": [secret]}}
    with RunningGateway(gateway_config(tmp_path, downstream.url, sources=sources, routes=[])) as gw:
        for event_id, challenge in (("Ev1", "[" * 300 + "]" * 300), ("Ev2", '{"a":[1]}')):
            body = f'{{"type":"url_verification","event_id":"{event_id}","challenge":{challenge}}}'.encode()
            timestamp = str(int(time.time()))
            signature = hmac.new(secret.encode(), f"v0:{timestamp}:".encode() + body, hashlib.sha256)
            headers = {
                "x-slack-request-timestamp": timestamp,
                "x-slack-signature": f"v0={signature.hexdigest()}",
            }
            answer = gw.post("/webhooks/slack", body, headers)
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"id": event_id, "status": "accepted"}
    assert "could not be written" not in caplog.text


@pytest.mark.parametrize("answer", ["raises", "a_list"])
def test_a_provider_reply_that_fails_answers_the_stored_event_accepted_without_it(
    tmp_path, downstream: Downstream, caplog: pytest.LogCaptureFixture, answer: str
) -> None:
    # The event is stored and its deliveries run: it was answered 500 "could not be stored", and every retry
    # of the sender's the same, though the event was there.
    from plugins.svix import SvixProvider

    class Replying(SvixProvider):
        name = "replying"

        def reply(self, event: Any) -> Any:
            if answer == "raises":
                raise RuntimeError("no challenge")
            return ["challenge"]

    pm = plugins_with(providers=[Replying])
    config = gateway_config(tmp_path, downstream.url)
    config["sources"]["consignease"]["provider"] = "replying"
    with RunningGateway(config, pm=pm) as gw:
        body, headers = svix_request(msg_id="msg_reply")
        first = gw.post("/webhooks/consignease", body, headers)
        assert (first.status_code, first.json()) == (200, {"id": "msg_reply", "status": "accepted"})
        again = gw.post("/webhooks/consignease", body, headers)
        assert (again.status_code, again.json()) == (200, {"id": "msg_reply", "status": "duplicate"})
        downstream.wait_for(1, "/hooks/users")
    assert "a provider's reply failed" in caplog.text and "could not be stored" not in caplog.text


def test_one_serving_process_per_database(tmp_path, downstream: Downstream) -> None:
    from gateway.app import Gateway
    from gateway.config import parse_config
    from gateway.storage import StorageUnavailable

    config = gateway_config(tmp_path, downstream.url)
    with RunningGateway(config):
        second = Gateway(parse_config(json.dumps(config)))
        with pytest.raises(StorageUnavailable, match="already served"):
            asyncio.run(second.start())


def test_a_failed_start_leaves_nothing_behind(tmp_path, downstream: Downstream) -> None:
    from gateway import hookimpl
    from gateway.app import Gateway
    from gateway.config import parse_config
    from gateway.plugins import PluginError, new_plugin_manager

    calls: list[str] = []

    class Broken:
        @hookimpl
        def startup(self, gateway):  # type: ignore[no-untyped-def]
            calls.append("broken starts")
            raise RuntimeError("a plugin cannot start")

        @hookimpl
        def shutdown(self, gateway):  # type: ignore[no-untyped-def]
            calls.append("broken stops")

    class Pool:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        async def startup(self, gateway):  # type: ignore[no-untyped-def]
            calls.append(f"{self.name} starts")

        @hookimpl
        async def shutdown(self, gateway):  # type: ignore[no-untyped-def]
            calls.append(f"{self.name} stops")

    config = parse_config(json.dumps(gateway_config(tmp_path, downstream.url)))
    pm = new_plugin_manager(load_entry_points=False)
    # pluggy calls the last registered first: "first" starts, then "broken" fails before "never" starts.
    pm.register(Pool("never"), name="never")
    pm.register(Broken(), name="broken")
    pm.register(Pool("first"), name="first")
    threads = threading.active_count()
    with pytest.raises(
        PluginError, match=r"^plugin broken: startup raised RuntimeError: a plugin cannot start$"
    ):
        asyncio.run(Gateway(config, pm=pm).start())
    # The plugin that started is told to close what it opened; the one that failed and the one never
    # started are not.
    assert calls == ["first starts", "broken starts", "first stops"]
    # The database's serving lock, its helper threads and the HTTP pool are gone: another start works. (A
    # helper thread ends on its own once its last work is done, which may be just after the close returned.)
    wait_until(lambda: threading.active_count() == threads, 5)

    async def start_and_stop() -> None:
        gateway = Gateway(config)
        await gateway.start()
        await gateway.stop()

    asyncio.run(start_and_stop())


def test_ingest_duration_is_observed_for_every_answered_webhook(gw: RunningGateway) -> None:
    def observed() -> float:
        return gw.metric("hookyard_ingest_duration_seconds_count", source="consignease")

    assert observed() == 0
    body, headers = svix_request(msg_id="msg_timed")
    assert gw.post("/webhooks/consignease", body, headers).status_code == 200
    wait_until(lambda: observed() == 1)  # observed just after the answer is sent
    assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "duplicate"
    wait_until(lambda: observed() == 2)
    assert gw.metric("hookyard_ingest_duration_seconds_sum", source="consignease") > 0
    # The other source's series did not move.
    assert gw.metric("hookyard_ingest_duration_seconds_count", source="consignly") == 0


# -- what the server writes to its log (a real `hookyard serve` process, JSON lines on stderr) ----------


def serve_process(tmp_path, config: dict[str, Any]) -> tuple[GatewayProcess, str]:
    ingress, ops = free_port(), free_port()
    config = {
        **config,
        "listen": {"host": "127.0.0.1", "port": ingress},
        "ops": {"host": "127.0.0.1", "port": ops},
    }
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    return GatewayProcess(path, f"http://127.0.0.1:{ops}"), f"http://127.0.0.1:{ingress}"


def log_lines(process: GatewayProcess) -> list[dict[str, Any]]:
    lines = [line for line in process.log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(record, dict) for record in records), lines
    return records


def test_an_insecure_source_is_warned_about_at_start(tmp_path, downstream: Downstream) -> None:
    sources = {
        "consignease": gateway_config(tmp_path)["sources"]["consignease"],
        "scratch": {"path": "/webhooks/scratch", "provider": "none", "insecure": True},
    }
    config = gateway_config(tmp_path, downstream.url, sources=sources, routes=[], log={"level": "info"})
    process, webhook_url = serve_process(tmp_path, config)
    process.start()
    try:
        records = log_lines(process)
    finally:
        exit_code = process.terminate()
    assert exit_code == 0  # a clean shutdown on SIGTERM
    warnings = [record for record in records if record["level"] == "WARNING"]
    assert [(record["source"], record["message"]) for record in warnings] == [
        ("scratch", "source scratch accepts unverified webhooks (insecure: true)")
    ]
    ready = [record for record in records if record["message"] == "hookyard ready"]
    assert len(ready) == 1 and records.index(warnings[0]) < records.index(ready[0])
    # Where it listens, as bound: uvicorn names no address for sockets it is handed.
    [listening] = [record for record in records if record["message"] == "listening"]
    assert listening["webhook"] == [webhook_url] and listening["ops"] == [process.ops_url]
    assert records.index(ready[0]) < records.index(listening)


def test_json_logs_name_the_event_and_source_and_never_a_secret_or_the_body(
    tmp_path, downstream: Downstream
) -> None:
    downstream.answer("/app", 500, 200)
    marker = "BODY-MARKER-7f3a"
    app_token = "Bearer app-token-0c9d"
    signing_secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
    route = {
        "name": "users",
        "source": "consignease",
        "actions": [
            {
                "id": "app",
                "use": "forward",
                "with": {
                    "url": f"{downstream.url}/app",
                    "headers": {"Authorization": app_token},
                    "sign": {"secret": signing_secret},
                },
            }
        ],
    }
    # debug: the most a log ever says.
    config = gateway_config(
        tmp_path, downstream.url, routes=[route], log={"level": "debug", "format": "json"}
    )
    process, url = serve_process(tmp_path, config)
    body, headers = svix_request(data={"note": marker}, msg_id="msg_logged")
    forged, forged_headers = svix_request(data={"note": marker}, msg_id="msg_forged", secret=signing_secret)
    process.start()
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.post("/webhooks/consignease", content=body, headers=headers).status_code == 200
            rejected = client.post("/webhooks/consignease", content=forged, headers=forged_headers)
            assert rejected.status_code == 401
        downstream.wait_for(2, "/app")
        # The retry is logged; the delivery after it at debug level.
        wait_until(lambda: any(r.get("message") == "delivery delivered" for r in log_lines(process)))
    finally:
        exit_code = process.terminate()
    assert exit_code == 0  # a clean shutdown on SIGTERM
    records = log_lines(process)
    text = process.log_path.read_text()

    about_the_event = [record for record in records if record.get("event_id") == "msg_logged"]
    messages = [record["message"] for record in about_the_event]
    assert "delivery retry" in messages and "delivery delivered" in messages, messages
    for record in about_the_event:
        assert record["source"] == "consignease", record
    [refusal] = [record for record in records if record["message"] == "webhook rejected"]
    assert (refusal["source"], refusal["reason"], refusal["status"]) == (
        "consignease",
        "invalid_signature",
        401,
    )

    secrets = [
        SVIX_SECRET,
        SVIX_SECRET.removeprefix("whsec_"),
        signing_secret.removeprefix("whsec_"),
        app_token,
    ]
    secrets += [headers["svix-signature"], forged_headers["svix-signature"]]
    secrets += [request.headers["webhook-signature"] for request in downstream.received("/app")]
    for secret in secrets:
        assert secret not in text, f"a secret is in the log: {secret[:12]}..."
    assert marker not in text, "the body is in the log"
    assert body.decode() not in text
