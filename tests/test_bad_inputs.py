"""A corpus of bad (and tricky but valid) webhook requests against a real server: each gets the status
docs/errors.md gives its reason (read from the table there, so docs and behaviour cannot drift), nothing
answers 5xx but a 501 for a transfer coding the listener does not understand, and every rejection is
counted in hookyard_webhook_rejections_total{source, reason}. And each is answered alike by both of the
listener's doors: its fast path and the ASGI app."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Source
from gateway.plugins import registry
from gateway.providers import Provider
from tests.support import (
    CONSIGNLY_SECRETS,
    SVIX_SECRET,
    RunningGateway,
    gateway_config,
)

SVIX_KEY = base64.b64decode(SVIX_SECRET.removeprefix("whsec_"))
LIMIT = 4096


@dataclass
class Request:
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    version: str = "1.1"
    # Header lines sent as they are, after `headers`: a name may repeat (httpx sends each pair as a line).
    lines: list[tuple[str, str]] = field(default_factory=list)

    def header_lines(self) -> list[tuple[str, str]]:
        return [*self.headers.items(), *self.lines]


def repeated(request: Request, name: str, *values: str) -> Request:
    """The request with `name` sent as one header line per value, instead of its single one."""
    del request.headers[name]
    request.lines += [(name, value) for value in values]
    return request


# Sources of the other providers, signed by each provider's own sender side (`hookyard send`).
OTHER_SOURCES: dict[str, dict[str, Any]] = {
    "github": {"provider": "github", "secrets": ["github-secret"]},
    "shopify": {"provider": "shopify", "secrets": ["shopify-secret"]},
    "slack": {"provider": "slack", "secrets": ["slack-secret"]},
    "stripe": {"provider": "stripe", "secrets": ["whsec_stripe-secret"]},
    "hmac": {
        "provider": "hmac",
        "secrets": ["hmac-secret"],
        "options": {
            "header": "X-Signature",
            "timestamp_header": "X-Timestamp",
            "signed_content": "{id}.{timestamp}.{body}",
            "id_from": "header:X-Event-Id",
            "type_from": "header:X-Event-Type",
        },
    },
    "hmac-one": {
        "provider": "hmac",
        "secrets": ["hmac-secret"],
        "options": {"header": "X-Signature", "prefix": "HMAC "},
    },
    "token": {"provider": "token", "secrets": ["token-secret"]},
    "basic": {"provider": "basic", "secrets": ["user:basic-secret"]},
}
for _name, _source in OTHER_SOURCES.items():
    _source["path"] = f"/webhooks/{_name}"

SOURCES = {
    "/webhooks/consignease": "consignease",
    "/webhooks/consignly": "consignly",
    **{source["path"]: name for name, source in OTHER_SOURCES.items()},
}
SIGNERS: dict[str, Provider] = {
    name: registry().providers[source["provider"]](name, Source.model_validate(source))
    for name, source in OTHER_SOURCES.items()
}


def signed(source: str, event_id: str | None = None) -> Request:
    """A valid request to one of OTHER_SOURCES, as its provider's sender would send it."""
    provider = SIGNERS[source]
    event_id = event_id or f"evt_{uuid.uuid4().hex}"
    now = time.time()
    body = json.dumps(provider.sample_payload("test.event", event_id, {"n": 1}, now)).encode()
    headers = {name.lower(): value for name, value in provider.sign(body, event_id, now).items()}
    return Request(OTHER_SOURCES[source]["path"], body, {"content-type": "application/json", **headers})


def twice(request: Request, name: str) -> Request:
    """The request with its `name` header sent on two lines, the same value on each."""
    return repeated(request, name, request.headers[name], request.headers[name])


def svix_body(**overrides: object) -> bytes:
    payload = {
        "data": {"id": "user_1"},
        "object": "event",
        "type": "user.created",
        "timestamp": int(time.time() * 1000),
        "instance_id": "ins_1",
    }
    payload.update(overrides)
    return json.dumps(payload).encode()


def svix_signature(msg_id: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(SVIX_KEY, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def svix(
    body: bytes | None = None,
    *,
    prefix: str = "svix-",
    ts_offset: int = 0,
    timestamp: str | None = None,
    signature: str | None = None,
    drop: str | None = None,
    extra: dict[str, str] | None = None,
    sign_body: bytes | None = None,
) -> Request:
    body = svix_body() if body is None else body
    msg_id = f"msg_{uuid.uuid4().hex}"
    timestamp = timestamp if timestamp is not None else str(int(time.time()) + ts_offset)
    headers = {
        "content-type": "application/json",
        f"{prefix}id": msg_id,
        f"{prefix}timestamp": timestamp,
        f"{prefix}signature": signature
        if signature is not None
        else svix_signature(msg_id, timestamp, body if sign_body is None else sign_body),
    }
    if drop:
        del headers[f"{prefix}{drop}"]
    headers.update(extra or {})
    return Request("/webhooks/consignease", body, headers)


def consignly_payload(**overrides: object) -> bytes:
    payload: dict[str, object] = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": "consignment.created",
        "created": "2026-11-22T10:00:00Z",
        "data": {"consignmentId": "c1", "status": 1},
        "operationId": "op-1",
    }
    payload.update(overrides)
    return json.dumps({k: v for k, v in payload.items() if v is not DROP}).encode()


DROP = object()


def consignly(
    body: bytes | None = None,
    *,
    header: str | None = None,
    transform: Callable[[str], str] = lambda h: h,
    sign_body: bytes | None = None,
) -> Request:
    body = consignly_payload() if body is None else body
    digest = hmac.new(
        CONSIGNLY_SECRETS[1].encode(), body if sign_body is None else sign_body, hashlib.sha256
    ).hexdigest()
    value = header if header is not None else transform(f"sha256={digest}")
    return Request(
        "/webhooks/consignly", body, {"content-type": "application/json", "x-consignly-signature": value}
    )


def with_method(request: Request, method: str) -> Request:
    request.method = method
    return request


def many_garbage_then_valid() -> Request:
    request = svix()
    valid = request.headers["svix-signature"]
    request.headers["svix-signature"] = " ".join(["v1,AAAA"] * 10 + [valid])
    return request


CASES: list[tuple[str, Callable[[], Request], int, str]] = [
    # valid, and tricky-but-valid
    ("svix valid", lambda: svix(), 200, "accepted"),
    ("standard webhooks headers", lambda: svix(prefix="webhook-"), 200, "accepted"),
    ("unicode body", lambda: svix(svix_body(data={"name": "Zoë 🚚 東京"})), 200, "accepted"),
    ("trailing newline signed", lambda: svix(svix_body() + b"\n"), 200, "accepted"),
    (
        "wrong content type, valid signature",
        lambda: svix(extra={"content-type": "text/plain"}),
        200,
        "accepted",
    ),
    (
        "second of two signatures valid",
        lambda: (
            lambda r: (
                r.headers.__setitem__("svix-signature", "v1,bm90IHRoaXMgb25l " + r.headers["svix-signature"]),
                r,
            )[1]
        )(svix()),
        200,
        "accepted",
    ),
    ("clock skew inside tolerance", lambda: svix(ts_offset=-240), 200, "accepted"),
    ("consignly valid", lambda: consignly(), 200, "accepted"),
    (
        "consignly upper-case hex and SHA256=",  # .NET writes hex in upper case: the same digest
        lambda: consignly(transform=lambda h: h.upper()),
        200,
        "accepted",
    ),
    (
        "double space between signatures",
        lambda: (
            lambda r: (
                r.headers.__setitem__(
                    "svix-signature", "v1,bm90IHRoaXMgb25l  " + r.headers["svix-signature"]
                ),
                r,
            )[1]
        )(svix()),
        200,
        "accepted",
    ),
    ("consignly type by code", lambda: consignly(consignly_payload(type=101)), 200, "accepted"),
    (
        # Content-Type is not checked (docs/errors.md): a body that is JSON is accepted whatever it says.
        "no content type, valid signature",
        lambda: (lambda r: (r.headers.pop("content-type"), r)[1])(svix()),
        200,
        "accepted",
    ),
    (
        "two signature header lines, the second valid",
        lambda: (lambda r: repeated(r, "svix-signature", "v1,bm90IHRoaXMgb25l", r.headers["svix-signature"]))(
            svix()
        ),
        200,
        "accepted",
    ),
    # what the body says
    ("empty body", lambda: svix(b""), 400, "invalid_json"),
    ("malformed json", lambda: svix(b'{"type": "user.created",'), 400, "invalid_json"),
    ("json array", lambda: svix(b"[1, 2]"), 400, "invalid_payload"),
    ("json string", lambda: svix(b'"hello"'), 400, "invalid_payload"),
    ("payload without type", lambda: svix(b'{"data": {}}'), 400, "missing_event_type"),
    ("payload with null type", lambda: svix(svix_body(type=None)), 400, "missing_event_type"),
    ("consignly without id", lambda: consignly(consignly_payload(id=DROP)), 400, "missing_event_id"),
    ("consignly id is an object", lambda: consignly(consignly_payload(id={"a": 1})), 400, "missing_event_id"),
    ("consignly without type", lambda: consignly(consignly_payload(type=DROP)), 400, "missing_event_type"),
    ("consignly empty body", lambda: consignly(b""), 400, "invalid_json"),
    # signature headers
    ("missing svix-id", lambda: svix(drop="id"), 401, "missing_signature"),
    ("missing svix-signature", lambda: svix(drop="signature"), 401, "missing_signature"),
    ("missing svix-timestamp", lambda: svix(drop="timestamp"), 401, "missing_timestamp"),
    ("signature without a comma", lambda: svix(signature="v1bm90YXNpZw=="), 401, "invalid_signature"),
    ("signature not base64", lambda: svix(signature="v1,not base64!!"), 401, "invalid_signature"),
    (
        "signature wrong version",
        lambda: (
            lambda r: (
                r.headers.__setitem__("svix-signature", r.headers["svix-signature"].replace("v1,", "v2,")),
                r,
            )[1]
        )(svix()),
        401,
        "invalid_signature",
    ),
    ("signature only a version", lambda: svix(signature="v1,"), 401, "invalid_signature"),
    (
        "tampered body",
        lambda: svix(svix_body(data={"id": "evil"}), sign_body=svix_body()),
        401,
        "invalid_signature",
    ),
    (
        "newline added after signing",
        lambda: (lambda b: svix(b + b"\n", sign_body=b))(svix_body()),
        401,
        "invalid_signature",
    ),
    ("ten garbage signatures then a valid one", many_garbage_then_valid, 401, "invalid_signature"),
    ("timestamp not a number", lambda: svix(timestamp="yesterday"), 401, "invalid_timestamp"),
    ("timestamp fractional", lambda: svix(timestamp=f"{int(time.time())}.5"), 401, "invalid_timestamp"),
    ("timestamp negative", lambda: svix(timestamp="-5"), 401, "invalid_timestamp"),
    ("timestamp absurdly large", lambda: svix(timestamp="9" * 20), 401, "invalid_timestamp"),
    ("timestamp in the future", lambda: svix(ts_offset=600), 401, "timestamp_out_of_tolerance"),
    ("timestamp ancient", lambda: svix(timestamp="0"), 401, "timestamp_out_of_tolerance"),
    (
        "consignly missing header",
        lambda: (lambda r: (r.headers.pop("x-consignly-signature"), r)[1])(consignly()),
        401,
        "missing_signature",
    ),
    ("consignly empty digest", lambda: consignly(header="sha256="), 401, "invalid_signature"),
    (
        "consignly sha1 prefix",
        lambda: consignly(transform=lambda h: h.replace("sha256", "sha1")),
        401,
        "invalid_signature",
    ),
    ("consignly no prefix", lambda: consignly(transform=lambda h: h[7:]), 401, "invalid_signature"),
    ("consignly non-hex", lambda: consignly(header="sha256=" + "zz" * 32), 401, "invalid_signature"),
    ("consignly short digest", lambda: consignly(transform=lambda h: h[:-2]), 401, "invalid_signature"),
    (
        "consignly uppercase hex of another body",  # hex is read in any case, but the digest must match
        lambda: consignly(consignly_payload(), sign_body=b"{}", transform=lambda h: h.upper()),
        401,
        "invalid_signature",
    ),
    (
        "consignly tampered body",
        lambda: consignly(consignly_payload(), sign_body=b"{}"),
        401,
        "invalid_signature",
    ),
    (
        "consignly duplicated header",
        lambda: consignly(transform=lambda h: f"{h}, {h}"),
        401,
        "invalid_signature",
    ),
    (
        "consignly two signature header lines",  # X-Consignly-Signature holds one signature
        lambda: twice(consignly(), "x-consignly-signature"),
        400,
        "repeated_header",
    ),
    (
        "two signature header lines, neither valid",
        lambda: repeated(svix(), "svix-signature", "v1,bm90IHRoaXMgb25l", "v1,bm9yIHRoaXMgb25l"),
        401,
        "invalid_signature",
    ),
    (
        "signature with a comma stuck to it",
        lambda: (
            lambda r: (r.headers.__setitem__("svix-signature", r.headers["svix-signature"] + ","), r)[1]
        )(svix()),
        401,
        "invalid_signature",
    ),
    # a header that holds one value, sent twice: refused naming it, rather than read as "a, a"
    ("two svix-id lines", lambda: twice(svix(), "svix-id"), 400, "repeated_header"),
    (
        "two different svix-id lines",
        lambda: (lambda r: repeated(r, "svix-id", r.headers["svix-id"], "msg_other"))(svix()),
        400,
        "repeated_header",
    ),
    ("two svix-timestamp lines", lambda: twice(svix(), "svix-timestamp"), 400, "repeated_header"),
    ("two webhook-id lines", lambda: twice(svix(prefix="webhook-"), "webhook-id"), 400, "repeated_header"),
    (
        "two webhook-timestamp lines",
        lambda: twice(svix(prefix="webhook-"), "webhook-timestamp"),
        400,
        "repeated_header",
    ),
    (
        "two webhook-signature lines, the second valid",  # a list of signatures, as svix-signature is
        lambda: (
            lambda r: repeated(r, "webhook-signature", "v1,bm90IHRoaXMgb25l", r.headers["webhook-signature"])
        )(svix(prefix="webhook-")),
        200,
        "accepted",
    ),
    ("github valid", lambda: signed("github"), 200, "accepted"),
    (
        "two X-GitHub-Delivery lines",
        lambda: twice(signed("github"), "x-github-delivery"),
        400,
        "repeated_header",
    ),
    ("two X-GitHub-Event lines", lambda: twice(signed("github"), "x-github-event"), 400, "repeated_header"),
    (
        "two X-Hub-Signature-256 lines, the second valid",  # several signatures may come, as in one line
        lambda: (
            lambda r: repeated(
                r, "x-hub-signature-256", "sha256=" + "0" * 64, r.headers["x-hub-signature-256"]
            )
        )(signed("github")),
        200,
        "accepted",
    ),
    ("shopify valid", lambda: signed("shopify"), 200, "accepted"),
    (
        "two X-Shopify-Event-Id lines",
        lambda: twice(signed("shopify"), "x-shopify-event-id"),
        400,
        "repeated_header",
    ),
    (
        "two X-Shopify-Webhook-Id lines",
        lambda: twice(signed("shopify"), "x-shopify-webhook-id"),
        400,
        "repeated_header",
    ),
    (
        "two X-Shopify-Topic lines",
        lambda: twice(signed("shopify"), "x-shopify-topic"),
        400,
        "repeated_header",
    ),
    (
        "two X-Shopify-Triggered-At lines",
        lambda: twice(signed("shopify"), "x-shopify-triggered-at"),
        400,
        "repeated_header",
    ),
    ("slack valid", lambda: signed("slack"), 200, "accepted"),
    (
        "two X-Slack-Request-Timestamp lines",
        lambda: twice(signed("slack"), "x-slack-request-timestamp"),
        400,
        "repeated_header",
    ),
    ("stripe valid", lambda: signed("stripe"), 200, "accepted"),
    (
        "Stripe-Signature split over two lines",  # a comma-separated list: RFC 9110 joins it back as sent
        lambda: (lambda r: repeated(r, "stripe-signature", *r.headers["stripe-signature"].split(",", 1)))(
            signed("stripe")
        ),
        200,
        "accepted",
    ),
    (
        "Stripe-Signature on two lines with different t=",  # which one was signed cannot be told
        lambda: (lambda r: repeated(r, "stripe-signature", r.headers["stripe-signature"], "t=1"))(
            signed("stripe")
        ),
        400,
        "repeated_header",
    ),
    ("hmac valid", lambda: signed("hmac"), 200, "accepted"),
    ("two hmac id header lines", lambda: twice(signed("hmac"), "x-event-id"), 400, "repeated_header"),
    ("two hmac type header lines", lambda: twice(signed("hmac"), "x-event-type"), 400, "repeated_header"),
    ("two hmac timestamp header lines", lambda: twice(signed("hmac"), "x-timestamp"), 400, "repeated_header"),
    (
        "two hmac signature header lines, the second valid",
        lambda: (lambda r: repeated(r, "x-signature", "0" * 64, r.headers["x-signature"]))(signed("hmac")),
        200,
        "accepted",
    ),
    ("hmac with one signature valid", lambda: signed("hmac-one"), 200, "accepted"),
    (
        "two signature lines where the prefix makes one signature",
        lambda: twice(signed("hmac-one"), "x-signature"),
        400,
        "repeated_header",
    ),
    ("token valid", lambda: signed("token"), 200, "accepted"),
    ("two token header lines", lambda: twice(signed("token"), "authorization"), 400, "repeated_header"),
    ("basic valid", lambda: signed("basic"), 200, "accepted"),
    ("two basic header lines", lambda: twice(signed("basic"), "authorization"), 400, "repeated_header"),
    # method, path, size
    ("GET", lambda: with_method(svix(), "GET"), 405, "method_not_allowed"),
    ("PUT", lambda: with_method(svix(), "PUT"), 405, "method_not_allowed"),
    ("unknown path", lambda: Request("/webhooks/unknown", b"{}"), 404, "unknown_path"),
    ("path with trailing slash", lambda: Request("/webhooks/consignease/", svix_body()), 404, "unknown_path"),
    ("body over the limit", lambda: svix(svix_body(data={"pad": "x" * LIMIT})), 413, "body_too_large"),
    ("too many headers", lambda: svix(extra={f"x-h{i}": "1" for i in range(120)}), 431, "headers_too_large"),
    ("one huge header", lambda: svix(extra={"x-big": "a" * 20000}), 431, "headers_too_large"),
    # a compressed body would fail its signature or the JSON parse, which names the wrong cause
    ("gzip body", lambda: svix(extra={"content-encoding": "gzip"}), 415, "unsupported_encoding"),
    ("br body", lambda: svix(extra={"content-encoding": "br"}), 415, "unsupported_encoding"),
    ("identity encoding", lambda: svix(extra={"content-encoding": "identity"}), 200, "accepted"),
    # RFC 8259 lets a parser ignore a UTF-8 byte order mark, which some senders write first
    ("JSON after a byte order mark", lambda: svix(b"\xef\xbb\xbf" + svix_body()), 200, "accepted"),
    ("a byte order mark, then not JSON", lambda: svix(b"\xef\xbb\xbfid=1"), 400, "invalid_json"),
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp_path = tmp_path_factory.mktemp("bad-inputs")
    config = gateway_config(tmp_path, limits={"max_body_bytes": LIMIT})
    config["sources"].update(OTHER_SOURCES)
    with RunningGateway(config) as running:
        yield running


def documented_statuses() -> dict[str, int]:
    """reason -> status, from the table in docs/errors.md."""
    table = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    rows = re.findall(r"^\| (\d{3}) \| `([a-z_]+)`", table, re.MULTILINE)
    statuses = {reason: int(status) for status, reason in rows}
    assert len(statuses) == len(rows), "a reason appears twice in docs/errors.md"
    return statuses


DOCUMENTED = documented_statuses()


def test_corpus_is_large() -> None:
    assert len(CASES) >= 40
    assert len({name for name, *_ in CASES}) == len(CASES)


def test_the_documented_table_is_read() -> None:
    assert DOCUMENTED["accepted"] == 200
    assert DOCUMENTED["invalid_signature"] == 401
    assert DOCUMENTED["storage_unavailable"] == 503
    assert len(DOCUMENTED) >= 20


@pytest.mark.parametrize(
    ("make", "status", "reason"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(gw: RunningGateway, make: Callable[[], Request], status: int, reason: str) -> None:
    assert DOCUMENTED.get(reason) == status, f"docs/errors.md gives {reason!r} another status"
    request = make()
    source = SOURCES.get(request.path, "")
    rejections = gw.metric("hookyard_webhook_rejections_total", source=source, reason=reason)
    response = gw.client.request(
        request.method, gw.url + request.path, content=request.body, headers=request.header_lines()
    )
    assert response.status_code == status, response.text
    key = "status" if status == 200 else "error"
    assert response.json()[key] == reason
    counted = gw.metric("hookyard_webhook_rejections_total", source=source, reason=reason) - rejections
    assert counted == (0 if status == 200 else 1)


def raw_request(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        return sock.recv(65536)


@pytest.mark.parametrize(
    "header",
    [b"svix-id: a\rb", b"svix-id: a\x00b", b"svix id: spaces in a name", b"\x7fbad: x"],
    ids=["bare CR", "NUL", "space in name", "DEL in name"],
)
def test_header_injection_is_refused_by_the_parser(gw: RunningGateway, header: bytes) -> None:
    request = (
        b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + header + b"\r\n\r\n{}"
    )
    answer = raw_request(gw.url, request)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]


@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"], ids=["fast path", "asgi path"])
def test_a_transfer_coding_other_than_chunked_is_refused_501(gw: RunningGateway, expect: bytes) -> None:
    body = svix()
    head = "".join(f"{name}: {value}\r\n" for name, value in body.headers.items()).encode()
    request = (
        b"POST /webhooks/consignease HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
        + expect
        + head
        + b"\r\n"
        + f"{len(body.body):x}\r\n".encode()
        + body.body
        + b"\r\n0\r\n\r\n"
    )
    rejections = gw.metric(
        "hookyard_webhook_rejections_total", source="consignease", reason="unsupported_transfer_encoding"
    )
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        # Refused before the body is asked for: no 100 Continue, just the answer.
        while b"}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 501 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "unsupported_transfer_encoding"
    counted = gw.metric(
        "hookyard_webhook_rejections_total", source="consignease", reason="unsupported_transfer_encoding"
    )
    assert counted == rejections + 1


# -- the same request through both doors ------------------------------------------------------------------
#
# A POST to a source's path is taken by the listener's fast path, straight from the HTTP parser; one whose
# sender expects `100 Continue` by the ASGI app. A sender must not be able to tell them apart: the same
# status, reason, headers and metrics.

# Answer headers a sender may act on.
_COMPARED_HEADERS = ("content-type", "retry-after", "allow", "connection")
# Counters of what the listener did with a request, every label included.
_COUNTERS = (
    "hookyard_webhooks_received_total",
    "hookyard_webhook_rejections_total",
    "hookyard_webhooks_unverified_total",
    "hookyard_ingest_duration_seconds_count",
)


def counters(gw: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    exposition = gw.client.get(gw.ops_url + "/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name in _COUNTERS
    }


def through_door(
    gw: RunningGateway, request: Request, expect: bool, chunked: bool = False
) -> tuple[Any, ...]:
    """Send `request` on a connection of its own (with `Expect: 100-continue`: its body only once asked
    for, if it is); what a sender sees of the answer, and what the metrics counted."""
    body = request.body
    if chunked:
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    lines = [
        *request.header_lines(),
        ("transfer-encoding", "chunked") if chunked else ("content-length", str(len(body))),
    ]
    if expect:
        lines.append(("expect", "100-continue"))
    head = f"{request.method} {request.path} HTTP/{request.version}\r\nHost: x\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in lines) + "\r\n"
    before = counters(gw)
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock, sock.makefile("rb") as reader:
        # In HTTP/1.0, which has no 1xx answers, the body goes at once.
        sock.sendall(head.encode() if expect and request.version != "1.0" else head.encode() + body)
        status, headers = read_head(reader)
        continued = status == 100 and request.version != "1.0"  # an HTTP/1.0 client reads it as the answer
        if continued:
            sock.sendall(body)
            status, headers = read_head(reader)
        elif expect and body and request.version != "1.0" and "connection" not in dict(lines):
            # Refused before its body was asked for: the connection is closed, so that what the sender
            # sends next is never read as that body. The fast path, which has the body, keeps it.
            assert headers.pop("connection", None) == "close"
        length = 0 if request.method == "HEAD" else int(headers.get("content-length", "0"))
        answer = json.loads(reader.read(length)) if length else None
    if isinstance(answer, dict):
        answer.pop("id", None)  # each request has an id of its own
    after = counters(gw)
    counted = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    shown = {name: value for name, value in headers.items() if name in _COMPARED_HEADERS}
    return status, shown, answer, counted


def read_head(reader: Any) -> tuple[int, dict[str, str]]:
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def duplicate() -> Request:
    return svix(svix_body(data={"id": "user_duplicate"}), extra={"svix-id": "msg_sent_twice"})


@pytest.mark.parametrize("expect", [False, True], ids=["fast path", "asgi path"])
def test_an_id_header_sent_twice_is_refused_naming_it_and_stores_nothing(
    gw: RunningGateway, expect: bool
) -> None:
    # Read joined, `x, x` was stored as an event of its own: a later send of x was no duplicate of it.
    event_id = f"{uuid.uuid4()}"
    status, _, answer, counted = through_door(
        gw, twice(signed("github", event_id), "x-github-delivery"), expect
    )
    assert (status, answer["error"]) == (400, "repeated_header")
    assert "x-github-delivery" in answer["detail"]
    rejections = ("hookyard_webhook_rejections_total", (("reason", "repeated_header"), ("source", "github")))
    assert counted[rejections] == 1
    status, _, answer, _ = through_door(gw, signed("github", event_id), expect)
    assert (status, answer["status"]) == (200, "accepted")


# Requests besides the corpus: framing, connection and path, and a duplicate.
DOOR_CASES: dict[str, tuple[Callable[[], Request], bool]] = {
    "chunked": (lambda: svix(), True),
    "chunked over the limit": (lambda: svix(svix_body(data={"pad": "x" * LIMIT})), True),
    "chunked, empty": (lambda: svix(b""), True),
    "connection close": (lambda: svix(extra={"connection": "close"}), False),
    "connection close, refused": (lambda: svix(signature="v1,", extra={"connection": "close"}), False),
    "a query string": (lambda: (lambda r: (setattr(r, "path", r.path + "?tenant=a"), r)[1])(svix()), False),
    "percent-encoded path": (
        lambda: (lambda r: (setattr(r, "path", "/webhooks/%63onsignease"), r)[1])(svix()),
        False,
    ),
    "HTTP/1.0": (lambda: (lambda r: (setattr(r, "version", "1.0"), r)[1])(svix()), False),
    "HTTP/1.0, refused": (
        lambda: (lambda r: (setattr(r, "version", "1.0"), r)[1])(svix(signature="v1,")),
        False,
    ),
    "HEAD": (lambda: with_method(Request("/webhooks/consignease", b""), "HEAD"), False),
    "OPTIONS": (lambda: with_method(Request("/webhooks/consignease", b""), "OPTIONS"), False),
    "duplicate": (duplicate, False),
}
DOOR_CASES.update({name: (make, False) for name, make, _, _ in CASES})


@pytest.mark.parametrize(("make", "chunked"), DOOR_CASES.values(), ids=DOOR_CASES)
def test_the_fast_path_and_the_asgi_app_answer_a_request_alike(
    gw: RunningGateway, make: Callable[[], Request], chunked: bool
) -> None:
    if make is duplicate:
        through_door(gw, make(), expect=False, chunked=chunked)  # stored before
    fast = through_door(gw, make(), expect=False, chunked=chunked)
    asgi = through_door(gw, make(), expect=True, chunked=chunked)
    assert fast == asgi
