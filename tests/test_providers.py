"""The svix and consignly providers, called directly: signatures made by the real svix library (and as
Consignly documents them) are accepted, everything else is Rejected with the documented status and reason,
and no header value makes verify raise anything but Rejected."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Source
from gateway.providers import Provider, Rejected
from plugins.consignly import BY_CODE, BY_NAME, CATALOG, ConsignlyProvider, dotted_type
from plugins.svix import SvixProvider
from tests.support import CONSIGNLY_SECRETS, SVIX_SECRET, consignly_body, consignly_headers, svix_request

OTHER_SVIX_SECRET = "whsec_" + base64.b64encode(b"another-thirty-two-byte-secret!!").decode()
SENT_AT = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
NOW = SENT_AT.timestamp()
MSG_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
TOLERANCE = 300.0

PROPERTY = settings(
    max_examples=150, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def svix_provider(*secrets: str, tolerance: float = TOLERANCE) -> SvixProvider:
    source = Source(
        path="/webhooks/consignease",
        provider="svix",
        secrets=list(secrets or [SVIX_SECRET]),
        tolerance=tolerance,
    )
    return SvixProvider("consignease", source)


def consignly_provider(*secrets: str) -> ConsignlyProvider:
    source = Source(
        path="/webhooks/consignly", provider="consignly", secrets=list(secrets or CONSIGNLY_SECRETS)
    )
    return ConsignlyProvider("consignly", source)


def signed(secret: str = SVIX_SECRET, msg_id: str = MSG_ID, **kwargs: Any) -> tuple[bytes, dict[str, str]]:
    return svix_request(secret=secret, msg_id=msg_id, timestamp=SENT_AT, **kwargs)


def rejected(provider: Provider, headers: Mapping[str, str], body: bytes, now: float = NOW) -> Rejected:
    with pytest.raises(Rejected) as caught:
        provider.verify(headers, body, now)
    return caught.value


def as_webhook_headers(headers: dict[str, str]) -> dict[str, str]:
    return {name.replace("svix-", "webhook-"): value for name, value in headers.items()}


def v1(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# == svix: verify ======================================================================================


def test_svix_library_signature_is_accepted() -> None:
    body, headers = signed()
    assert svix_provider().verify(headers, body, NOW) is None


def test_svix_library_signature_is_accepted_at_the_current_time() -> None:
    body, headers = svix_request()
    svix_provider().verify(headers, body, float(headers["svix-timestamp"]))


def test_webhook_headers_are_accepted() -> None:
    body, headers = signed()
    webhook = as_webhook_headers(headers)
    assert "svix-id" not in webhook
    assert set(webhook) >= {"webhook-id", "webhook-timestamp", "webhook-signature"}
    svix_provider().verify(webhook, body, NOW)


def test_svix_headers_win_over_webhook_headers() -> None:
    body, headers = signed()
    svix_provider().verify({**headers, "webhook-id": "other", "webhook-signature": "v1,AAAA"}, body, NOW)
    # ... and then a bad svix signature is not rescued by a good webhook-* one.
    bad = {**as_webhook_headers(headers), "svix-id": MSG_ID, "svix-timestamp": headers["svix-timestamp"]}
    bad["svix-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
    assert rejected(svix_provider(), bad, body).reason == "invalid_signature"


def test_the_library_signs_what_the_provider_checks() -> None:
    body, headers = signed()
    assert headers["svix-signature"] == v1(SVIX_SECRET, MSG_ID, headers["svix-timestamp"], body)


def test_several_signatures_where_only_the_second_is_valid() -> None:
    body, headers = signed()
    wrong = v1(OTHER_SVIX_SECRET, MSG_ID, headers["svix-timestamp"], body)
    svix_provider().verify({**headers, "svix-signature": f"{wrong} {headers['svix-signature']}"}, body, NOW)


def test_several_signatures_with_garbage_entries_before_the_valid_one() -> None:
    body, headers = signed()
    garbage = "nocomma v2,AAAA v1,!!notbase64!! v1, v1a,AAAA ,"
    svix_provider().verify({**headers, "svix-signature": f"{garbage} {headers['svix-signature']}"}, body, NOW)


def test_repeated_signature_headers_joined_with_a_comma() -> None:
    body, headers = signed()
    wrong = v1(OTHER_SVIX_SECRET, MSG_ID, headers["svix-timestamp"], body)
    svix_provider().verify({**headers, "svix-signature": f"{wrong}, {headers['svix-signature']}"}, body, NOW)


def test_several_secrets_where_only_the_second_signed() -> None:
    body, headers = signed(secret=SVIX_SECRET)
    svix_provider(OTHER_SVIX_SECRET, SVIX_SECRET).verify(headers, body, NOW)
    body, headers = signed(secret=OTHER_SVIX_SECRET)
    svix_provider(SVIX_SECRET, OTHER_SVIX_SECRET).verify(headers, body, NOW)


def test_a_bare_base64_secret_is_the_same_key() -> None:
    body, headers = signed()
    svix_provider(SVIX_SECRET.removeprefix("whsec_")).verify(headers, body, NOW)


def test_only_the_first_ten_signatures_are_looked_at() -> None:
    body, headers = signed()
    wrong = v1(OTHER_SVIX_SECRET, MSG_ID, headers["svix-timestamp"], body)
    nine = " ".join([wrong] * 9 + [headers["svix-signature"]])
    svix_provider().verify({**headers, "svix-signature": nine}, body, NOW)
    ten = " ".join([wrong] * 10 + [headers["svix-signature"]])
    assert rejected(svix_provider(), {**headers, "svix-signature": ten}, body).reason == "invalid_signature"


def assert_invalid_signature(provider: Provider, headers: Mapping[str, str], body: bytes) -> None:
    error = rejected(provider, headers, body)
    assert error.status == 401
    assert error.reason == "invalid_signature"


def test_tampered_body_is_rejected() -> None:
    body, headers = signed()
    assert_invalid_signature(svix_provider(), headers, body.replace(b"Ada", b"Eve"))
    assert_invalid_signature(svix_provider(), headers, body + b" ")
    assert_invalid_signature(svix_provider(), headers, body[:-1])
    assert_invalid_signature(svix_provider(), headers, b"")


def test_wrong_secret_is_rejected() -> None:
    body, headers = signed(secret=OTHER_SVIX_SECRET)
    assert_invalid_signature(svix_provider(SVIX_SECRET), headers, body)


def test_wrong_id_is_rejected() -> None:
    body, headers = signed()
    assert_invalid_signature(svix_provider(), {**headers, "svix-id": "msg_other"}, body)
    assert_invalid_signature(svix_provider(), {**headers, "svix-id": MSG_ID + "x"}, body)


def test_changed_timestamp_is_rejected() -> None:
    body, headers = signed()
    assert_invalid_signature(svix_provider(), {**headers, "svix-timestamp": str(int(NOW) + 1)}, body)
    assert_invalid_signature(
        svix_provider(), {**headers, "svix-timestamp": "0" + headers["svix-timestamp"]}, body
    )


def test_rejection_details_never_contain_a_secret() -> None:
    body, headers = signed(secret=OTHER_SVIX_SECRET)
    error = rejected(svix_provider(SVIX_SECRET), headers, body)
    for secret in (SVIX_SECRET, OTHER_SVIX_SECRET):
        assert secret.removeprefix("whsec_") not in error.detail
        assert secret.removeprefix("whsec_") not in str(error)


# -- timestamps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [TOLERANCE + 1, TOLERANCE + 0.5, -(TOLERANCE + 1), 86_400, -86_400, NOW])
def test_timestamp_outside_tolerance(offset: float) -> None:
    # `now` moves instead of the timestamp, so the signature stays valid: only the time is wrong.
    body, headers = signed()
    error = rejected(svix_provider(), headers, body, now=NOW + offset)
    assert (error.status, error.reason) == (401, "timestamp_out_of_tolerance")


@pytest.mark.parametrize("offset", [0, 1, -1, TOLERANCE - 1, -(TOLERANCE - 1), TOLERANCE, -TOLERANCE, 0.999])
def test_timestamp_inside_tolerance(offset: float) -> None:
    body, headers = signed()
    svix_provider().verify(headers, body, NOW + offset)


def test_tolerance_comes_from_the_source() -> None:
    body, headers = signed()
    svix_provider(tolerance=10).verify(headers, body, NOW + 10)
    assert (
        rejected(svix_provider(tolerance=10), headers, body, now=NOW + 11).reason
        == "timestamp_out_of_tolerance"
    )
    svix_provider(tolerance=3600).verify(headers, body, NOW - 3000)


def test_timestamp_out_of_tolerance_is_checked_before_the_signature() -> None:
    body, headers = signed()
    error = rejected(svix_provider(), {**headers, "svix-signature": "v1,AAAA"}, body, now=NOW + 10_000)
    assert error.reason == "timestamp_out_of_tolerance"


@pytest.mark.parametrize(
    "timestamp",
    [
        "abc",
        "1.5",
        "-1",
        f" {int(NOW)}",
        f"{int(NOW)} ",
        f"{int(NOW)}.0",
        "1e9",
        "\uff11\uff12\uff13",  # fullwidth digits
        "1_000",
        "0x10",
        "1" * 13,
    ],
)
def test_non_numeric_timestamp(timestamp: str) -> None:
    body, headers = signed()
    error = rejected(svix_provider(), {**headers, "svix-timestamp": timestamp}, body)
    assert (error.status, error.reason) == (401, "invalid_timestamp")


@pytest.mark.parametrize("prefix", ["svix-", "webhook-"])
@pytest.mark.parametrize(
    ("drop", "reason"),
    [("id", "missing_signature"), ("signature", "missing_signature"), ("timestamp", "missing_timestamp")],
)
def test_missing_headers(prefix: str, drop: str, reason: str) -> None:
    body, headers = signed()
    if prefix == "webhook-":
        headers = as_webhook_headers(headers)
    del headers[prefix + drop]
    error = rejected(svix_provider(), headers, body)
    assert (error.status, error.reason) == (401, reason)


@pytest.mark.parametrize("name", ["id", "signature", "timestamp"])
def test_empty_headers_count_as_missing(name: str) -> None:
    body, headers = signed()
    error = rejected(svix_provider(), {**headers, f"svix-{name}": ""}, body)
    assert error.status == 401
    assert error.reason == ("missing_timestamp" if name == "timestamp" else "missing_signature")


def test_no_headers_at_all() -> None:
    error = rejected(svix_provider(), {}, b"{}")
    assert (error.status, error.reason) == (401, "missing_signature")


@pytest.mark.parametrize(
    "signature",
    [
        "garbage",
        "v1",
        "v1,",
        ",",
        " ",
        "v1,!!!!",
        "v1,AAAA=AAAA",
        "v1,AAA",
        "v1,é",
        "v1,\x00\x01",
        "v2,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "v0,AAAA v3,AAAA",
        "V1,AAAA",
        "v1a," + base64.b64encode(b"s" * 64).decode(),
        "v1," + base64.b64encode(b"\x00" * 32).decode(),
        "v1," + "A" * 100_000,
        "v1,AAAA " * 50_000,
        " " * 100_000,
        "," * 100_000,
        "v1," + base64.urlsafe_b64encode(b"\xff" * 32).decode(),
    ],
)
def test_garbage_signature_header_is_only_ever_rejected(signature: str) -> None:
    body, headers = signed()
    error = rejected(svix_provider(), {**headers, "svix-signature": signature}, body)
    assert (error.status, error.reason) == (401, "invalid_signature")


def test_the_valid_signature_in_another_encoding_is_rejected() -> None:
    body, headers = signed()
    digest = base64.b64decode(headers["svix-signature"].removeprefix("v1,"))
    for text in (digest.hex(), base64.urlsafe_b64encode(digest).decode().rstrip("=")):
        if text == headers["svix-signature"].removeprefix("v1,"):
            continue
        assert_invalid_signature(svix_provider(), {**headers, "svix-signature": "v1," + text}, body)


# == svix: parse =======================================================================================


def test_svix_parse() -> None:
    body, headers = signed(event_type="user.created", data={"id": "user_1"})
    provider = svix_provider()
    event = provider.parse(headers, body, json.loads(body), received_at=NOW + 2)
    assert event.source == "consignease"
    assert event.id == MSG_ID
    assert event.type == "user.created"
    assert event.occurred_at == pytest.approx(NOW)
    assert event.received_at == NOW + 2
    assert event.body == body
    assert event.payload == json.loads(body)
    assert event.data == {"id": "user_1"}
    assert event.headers == headers


def test_svix_parse_occurred_at_is_the_payloads_millisecond_timestamp() -> None:
    body, headers = signed()
    payload = {**json.loads(body), "timestamp": 1_700_000_000_123}
    event = svix_provider().parse(headers, body, payload, received_at=NOW)
    assert event.occurred_at == pytest.approx(1_700_000_000.123)


def test_svix_parse_occurred_at_from_an_iso_timestamp() -> None:
    body, headers = signed()
    payload = {**json.loads(body), "timestamp": "2026-11-22T09:59:30Z"}
    event = svix_provider().parse(headers, body, payload, received_at=NOW)
    assert event.occurred_at == pytest.approx(NOW - 30)


@pytest.mark.parametrize("timestamp", [None, "not a time", True, [1]])
def test_svix_parse_falls_back_to_the_header_timestamp(timestamp: Any) -> None:
    body, headers = signed()
    payload = json.loads(body)
    if timestamp is None:
        del payload["timestamp"]
    else:
        payload["timestamp"] = timestamp
    event = svix_provider().parse({**headers, "svix-timestamp": "1700000000"}, body, payload, received_at=NOW)
    assert event.occurred_at == 1_700_000_000.0


def test_svix_parse_with_webhook_headers() -> None:
    body, headers = signed()
    event = svix_provider().parse(as_webhook_headers(headers), body, json.loads(body), received_at=NOW)
    assert event.id == MSG_ID


def test_svix_parse_without_a_type() -> None:
    body, headers = signed()
    payload = json.loads(body)
    del payload["type"]
    with pytest.raises(Rejected) as caught:
        svix_provider().parse(headers, body, payload, received_at=NOW)
    assert (caught.value.status, caught.value.reason) == (400, "missing_event_type")


def test_svix_parse_without_an_id() -> None:
    body, headers = signed()
    del headers["svix-id"]
    with pytest.raises(Rejected) as caught:
        svix_provider().parse(headers, body, json.loads(body), received_at=NOW)
    assert (caught.value.status, caught.value.reason) == (400, "missing_event_id")


@pytest.mark.parametrize("payload", [[], "x", 1, None])
def test_svix_parse_needs_an_object(payload: Any) -> None:
    body, headers = signed()
    with pytest.raises(Rejected) as caught:
        svix_provider().parse(headers, body, payload, received_at=NOW)
    assert (caught.value.status, caught.value.reason) == (400, "invalid_payload")


# == consignly: verify =================================================================================


@pytest.mark.parametrize("secret", CONSIGNLY_SECRETS)
def test_each_consignly_secret_is_accepted(secret: str) -> None:
    body = consignly_body()
    assert consignly_provider().verify(consignly_headers(body, secret), body, NOW) is None


def test_consignly_signature_is_hmac_sha256_hex_of_the_raw_body() -> None:
    body = b'{"id":"evt_1","type":101}'
    digest = hmac.new(b"client-secret-1", body, hashlib.sha256).hexdigest()
    consignly_provider().verify({"x-consignly-signature": f"sha256={digest}"}, body, NOW)


def test_consignly_accepts_whatever_time_it_is() -> None:
    body = consignly_body()
    consignly_provider().verify(consignly_headers(body), body, 0.0)
    consignly_provider().verify(consignly_headers(body), body, NOW + 10 * 365 * 86400)


def test_consignly_uppercase_hex_and_scheme() -> None:
    body = consignly_body()
    digest = consignly_headers(body)["x-consignly-signature"].removeprefix("sha256=")
    provider = consignly_provider()
    provider.verify({"x-consignly-signature": f"sha256={digest.upper()}"}, body, NOW)
    provider.verify({"x-consignly-signature": f"SHA256={digest}"}, body, NOW)
    provider.verify({"x-consignly-signature": f"  sha256={digest}  "}, body, NOW)


def test_consignly_secret_not_configured() -> None:
    body = consignly_body()
    error = rejected(consignly_provider("client-secret-1"), consignly_headers(body, "signing-key-two"), body)
    assert (error.status, error.reason) == (401, "invalid_signature")


def test_consignly_tampered_body() -> None:
    body = consignly_body(status=1)
    headers = consignly_headers(body)
    error = rejected(consignly_provider(), headers, consignly_body(status=2))
    assert (error.status, error.reason) == (401, "invalid_signature")
    assert rejected(consignly_provider(), headers, body + b"\n").reason == "invalid_signature"


def test_consignly_missing_header() -> None:
    body = consignly_body()
    for headers in (
        {},
        {"x-consignly-signature": ""},
        {"x-signature": consignly_headers(body)["x-consignly-signature"]},
    ):
        error = rejected(consignly_provider(), headers, body)
        assert (error.status, error.reason) == (401, "missing_signature")


def consignly_digest(body: bytes) -> str:
    return consignly_headers(body)["x-consignly-signature"].removeprefix("sha256=")


@pytest.mark.parametrize(
    "make_header",
    [
        pytest.param(lambda d: f"sha1={d}", id="sha1-prefix"),
        pytest.param(lambda d: f"sha512={d}", id="sha512-prefix"),
        pytest.param(lambda d: d, id="no-prefix"),
        pytest.param(lambda d: f"sha256:{d}", id="colon"),
        pytest.param(lambda d: f"sha256 {d}", id="space"),
        pytest.param(lambda d: f"v1,{d}", id="svix-style"),
        pytest.param(lambda d: f"sha256={d[:-1]}", id="63-digits"),
        pytest.param(lambda d: f"sha256={d}0", id="65-digits"),
        pytest.param(lambda d: f"sha256={d}{d}", id="twice"),
        pytest.param(lambda d: "sha256=", id="empty-value"),
        pytest.param(lambda d: "sha256=" + "z" * 64, id="non-hex"),
        pytest.param(lambda d: "sha256=" + "é" * 64, id="non-ascii"),
        pytest.param(lambda d: "sha256=" + d[:62] + "0x", id="hex-with-x"),
        pytest.param(lambda d: "sha256=" + base64.b64encode(bytes.fromhex(d)).decode(), id="base64"),
        pytest.param(lambda d: f"sha256={d}, sha256={d}", id="repeated-header"),
        pytest.param(lambda d: "sha256=" + "0" * 64, id="zeros"),
        pytest.param(lambda d: "=" * 10_000, id="huge"),
    ],
)
def test_consignly_bad_signature_headers(make_header: Any) -> None:
    body = consignly_body()
    error = rejected(
        consignly_provider(), {"x-consignly-signature": make_header(consignly_digest(body))}, body
    )
    assert (error.status, error.reason) == (401, "invalid_signature")
    assert not any(secret in error.detail for secret in CONSIGNLY_SECRETS)


# == consignly: parse ==================================================================================


def consignly_parse(payload: Any) -> Any:
    body = json.dumps(payload).encode()
    return consignly_provider().parse(consignly_headers(body), body, payload, received_at=NOW)


@pytest.mark.parametrize(
    ("raw_type", "expected"),
    [
        (101, "consignment.created"),
        ("101", "consignment.created"),
        ("ConsignmentCreated", "consignment.created"),
        ("consignment.created", "consignment.created"),
        (112, "consignment.tracking_updated"),
        ("ConsignmentTrackingUpdated", "consignment.tracking_updated"),
        (104, "consignment.status_updated"),
        (0, "webhook.test"),
        (304, "job.connection_action_manual_trigger"),
        ("JobConnectionActionManualTrigger", "job.connection_action_manual_trigger"),
        ("ManifestClosed", "manifest.closed"),
        ("SomethingNew", "SomethingNew"),
        (999, "999"),
        ("user.created", "user.created"),
    ],
)
def test_consignly_type_as_code_name_or_dotted(raw_type: Any, expected: str) -> None:
    event = consignly_parse({"id": "evt_1", "type": raw_type, "data": {}})
    assert event.type == expected


def test_consignly_parse_fields() -> None:
    body = consignly_body("ConsignmentCreated", event_id="evt_42")
    headers = consignly_headers(body)
    payload = json.loads(body)
    event = consignly_provider().parse(headers, body, payload, received_at=NOW + 1)
    assert event.source == "consignly"
    assert event.id == "evt_42"
    assert event.type == "consignment.created"
    assert event.occurred_at == datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC).timestamp()
    assert event.received_at == NOW + 1
    assert event.body == body
    assert event.payload is payload
    assert event.payload["type"] == "ConsignmentCreated"  # the payload is kept as sent
    assert event.headers == headers
    assert event.data["consignmentId"] == "550e8400-e29b-41d4-a716-446655440000"


def test_consignly_integer_id() -> None:
    assert consignly_parse({"id": 42, "type": 101}).id == "42"


@pytest.mark.parametrize(
    "payload",
    [
        {"type": 101},
        {"id": "", "type": 101},
        {"id": None, "type": 101},
        {"id": True, "type": 101},
        {"id": [1], "type": 101},
        {"id": {"a": 1}, "type": 101},
    ],
)
def test_consignly_missing_id(payload: dict[str, Any]) -> None:
    with pytest.raises(Rejected) as caught:
        consignly_parse(payload)
    assert (caught.value.status, caught.value.reason) == (400, "missing_event_id")


@pytest.mark.parametrize(
    "payload",
    [
        {"id": "e"},
        {"id": "e", "type": ""},
        {"id": "e", "type": None},
        {"id": "e", "type": False},
        {"id": "e", "type": 1.5},
        {"id": "e", "type": ["a"]},
    ],
)
def test_consignly_missing_type(payload: dict[str, Any]) -> None:
    with pytest.raises(Rejected) as caught:
        consignly_parse(payload)
    assert (caught.value.status, caught.value.reason) == (400, "missing_event_type")


@pytest.mark.parametrize("payload", [[], "x", 1, None])
def test_consignly_parse_needs_an_object(payload: Any) -> None:
    with pytest.raises(Rejected) as caught:
        consignly_parse(payload)
    assert (caught.value.status, caught.value.reason) == (400, "invalid_payload")


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        ("2026-11-22T10:00:00Z", datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp()),
        ("2026-11-22T10:00:00.250Z", datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp() + 0.25),
        ("2026-11-22T12:00:00+02:00", datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp()),
        ("2026-11-22T10:00:00+00:00", datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp()),
        (1_795_000_000, 1_795_000_000.0),
        (1_795_000_000_500, 1_795_000_000.5),
        ("not a date", None),
        (True, None),
        (None, None),
    ],
)
def test_consignly_occurred_at_from_created(created: Any, expected: float | None) -> None:
    event = consignly_parse({"id": "e", "type": 101, "created": created})
    if expected is None:
        assert event.occurred_at is None
    else:
        assert event.occurred_at == pytest.approx(expected)


def test_consignly_occurred_at_without_created() -> None:
    assert consignly_parse({"id": "e", "type": 101}).occurred_at is None


# == the Consignly catalog =============================================================================


def test_dotted_type_rule() -> None:
    assert dotted_type("JobConnectionActionManualTrigger") == "job.connection_action_manual_trigger"
    assert dotted_type("ConsignmentCreated") == "consignment.created"
    assert dotted_type("ConsignmentStatusUpdated") == "consignment.status_updated"
    assert dotted_type("WebhookTest") == "webhook.test"
    assert dotted_type("Manifest") == "manifest"


def test_catalog_code_304() -> None:
    assert CATALOG[304] == "JobConnectionActionManualTrigger"
    assert BY_CODE[304] == "job.connection_action_manual_trigger"
    assert consignly_provider().event_type(304) == "job.connection_action_manual_trigger"


def test_catalog_codes_names_and_dotted_types_agree() -> None:
    provider = consignly_provider()
    assert len(CATALOG) == 24
    assert len(set(BY_CODE.values())) == len(CATALOG)
    for code, name in CATALOG.items():
        dotted = dotted_type(name)
        assert BY_CODE[code] == BY_NAME[name] == dotted
        assert (
            provider.event_type(code) == provider.event_type(str(code)) == provider.event_type(name) == dotted
        )
        assert provider.event_type(dotted) == dotted
        assert dotted == dotted.lower()
        assert dotted.count(".") == 1


# == properties ========================================================================================

VALID_BODY, VALID_HEADERS = signed()
VALID_TIMESTAMP = VALID_HEADERS["svix-timestamp"]
SVIX = svix_provider()
CONSIGNLY = consignly_provider()


def test_the_property_fixture_is_valid() -> None:
    SVIX.verify(VALID_HEADERS, VALID_BODY, NOW)


@PROPERTY
@given(st.data())
def test_any_single_byte_change_to_the_body_is_rejected(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(VALID_BODY) - 1), label="index")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != VALID_BODY[index]), label="byte")
    body = VALID_BODY[:index] + bytes([byte]) + VALID_BODY[index + 1 :]
    with pytest.raises(Rejected) as caught:
        SVIX.verify(VALID_HEADERS, body, NOW)
    assert caught.value.reason == "invalid_signature"


@PROPERTY
@given(st.integers(0, len(VALID_BODY)), st.binary(min_size=1, max_size=8))
def test_any_insertion_into_the_body_is_rejected(index: int, extra: bytes) -> None:
    body = VALID_BODY[:index] + extra + VALID_BODY[index:]
    with pytest.raises(Rejected) as caught:
        SVIX.verify(VALID_HEADERS, body, NOW)
    assert caught.value.reason == "invalid_signature"


@PROPERTY
@given(st.text(min_size=1).filter(lambda text: text != MSG_ID))
def test_any_change_to_the_id_is_rejected(msg_id: str) -> None:
    with pytest.raises(Rejected) as caught:
        SVIX.verify({**VALID_HEADERS, "svix-id": msg_id}, VALID_BODY, NOW)
    assert caught.value.status == 401
    assert caught.value.reason == "invalid_signature"


@PROPERTY
@given(st.integers(int(NOW - TOLERANCE), int(NOW + TOLERANCE)).filter(lambda ts: ts != int(VALID_TIMESTAMP)))
def test_any_other_timestamp_within_tolerance_is_rejected(timestamp: int) -> None:
    with pytest.raises(Rejected) as caught:
        SVIX.verify({**VALID_HEADERS, "svix-timestamp": str(timestamp)}, VALID_BODY, NOW)
    assert caught.value.reason == "invalid_signature"


@PROPERTY
@given(st.text().filter(lambda text: text != VALID_TIMESTAMP))
def test_any_change_to_the_timestamp_is_rejected(timestamp: str) -> None:
    with pytest.raises(Rejected) as caught:
        SVIX.verify({**VALID_HEADERS, "svix-timestamp": timestamp}, VALID_BODY, NOW)
    assert caught.value.status == 401


def signature_like() -> st.SearchStrategy[str]:
    entry = st.one_of(
        st.text(max_size=60),
        st.builds(
            lambda v, b: f"{v},{base64.b64encode(b).decode()}",
            st.sampled_from(["v1", "v1a", "v2", ""]),
            st.binary(max_size=70),
        ),
    )
    return st.lists(entry, max_size=14).map(" ".join)


HEADER_NAMES = [
    "svix-id",
    "svix-timestamp",
    "svix-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-consignly-signature",
    "content-type",
]


def header_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(),
        st.binary().map(lambda raw: raw.decode("latin-1")),  # what the ingress hands over
        st.integers(int(NOW - 2 * TOLERANCE), int(NOW + 2 * TOLERANCE)).map(str),
        signature_like(),
        st.text(alphabet="0123456789abcdefABCDEF=sha", max_size=80),
    )


random_headers = st.dictionaries(
    st.one_of(st.sampled_from(HEADER_NAMES), st.text(max_size=20)), header_values(), max_size=8
)


VERIFY_REASONS = {
    "missing_signature",
    "missing_timestamp",
    "invalid_timestamp",
    "timestamp_out_of_tolerance",
    "invalid_signature",
}


@PROPERTY
@given(
    random_headers,
    st.binary(max_size=200),
    st.one_of(st.just(NOW), st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=4e9)),
)
def test_random_headers_never_raise_anything_but_rejected(
    headers: dict[str, str], body: bytes, now: float
) -> None:
    for provider in (SVIX, CONSIGNLY):
        with pytest.raises(Rejected) as caught:
            provider.verify(headers, body, now)
        assert caught.value.status == 401
        assert caught.value.reason in VERIFY_REASONS


@PROPERTY
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "svix-id": st.one_of(st.just(MSG_ID), st.text()),
            "svix-timestamp": st.one_of(st.just(VALID_TIMESTAMP), st.text()),
            "svix-signature": st.one_of(st.just(VALID_HEADERS["svix-signature"]), signature_like()),
        },
    )
)
def test_partly_valid_svix_headers_never_raise_anything_but_rejected(headers: dict[str, str]) -> None:
    complete = (
        headers.get("svix-id") == MSG_ID
        and headers.get("svix-timestamp") == VALID_TIMESTAMP
        and VALID_HEADERS["svix-signature"] in headers.get("svix-signature", "").split(" ")[:10]
    )
    try:
        SVIX.verify(headers, VALID_BODY, NOW)
    except Rejected as error:
        assert error.status == 401
        assert not complete
    else:
        assert complete
