"""The svix and consignly providers, called directly: signatures made by the real svix library (and as
Consignly documents them) are accepted, everything else is Rejected with the documented status and reason,
and no header value makes verify raise anything but Rejected. Then properties of every provider: a valid
request is always accepted, and any change to its signature, signed id or signed timestamp is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook, WebhookVerificationError

from gateway.config import Source
from gateway.plugins import registry
from gateway.providers import Provider, Rejected, hmac_digest
from plugins.consignly import BY_CODE, BY_NAME, CATALOG, ConsignlyProvider, dotted_type
from plugins.hmac_generic import MAX_SIGNATURES, require_signature, signature_entries
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


@pytest.mark.parametrize("id_prefix", ["svix-", "webhook-"])
@pytest.mark.parametrize("timestamp_prefix", ["svix-", "webhook-"])
@pytest.mark.parametrize("signature_prefix", ["svix-", "webhook-"])
def test_each_header_falls_back_to_its_webhook_name_alone_as_the_svix_library_reads_it(
    id_prefix: str, timestamp_prefix: str, signature_prefix: str
) -> None:
    # The svix library takes each of the id, the timestamp and the signature from its svix-* header when
    # that is there, else from its webhook-* one: a request mixing the two sets verifies.
    body, headers = svix_request()
    now = float(headers["svix-timestamp"])
    mixed = {
        f"{id_prefix}id": headers["svix-id"],
        f"{timestamp_prefix}timestamp": headers["svix-timestamp"],
        f"{signature_prefix}signature": headers["svix-signature"],
    }
    assert Webhook(SVIX_SECRET).verify(body, mixed) is None
    svix_provider().verify(mixed, body, now)
    assert svix_provider().parse(mixed, body, json.loads(body), now).id == headers["svix-id"]
    # Where both names are there, the svix-* one is read, even when its webhook-* twin would pass.
    for name, wrong in (("timestamp", "1"), ("signature", "v1,AAAA")):
        bad = {**mixed, f"webhook-{name}": headers[f"svix-{name}"], f"svix-{name}": wrong}
        with pytest.raises(WebhookVerificationError):
            Webhook(SVIX_SECRET).verify(body, bad)
        assert rejected(svix_provider(), bad, body, now).status == 401


def test_an_empty_svix_id_is_refused_as_the_svix_library_refuses_it_and_the_answer_says_why() -> None:
    body, headers = signed()
    request = {**as_webhook_headers(headers), "svix-id": ""}
    # The svix library reads svix-id whenever it is there, even empty, and refuses the empty id: the
    # webhook-* headers beside it are not looked at.
    with pytest.raises(WebhookVerificationError):
        Webhook(SVIX_SECRET).verify(body, request)
    error = rejected(svix_provider(), request, body)
    assert (error.status, error.reason) == (401, "missing_signature")
    assert error.detail == "empty svix-id header (webhook-id is read only when there is no svix-id)"
    # Without it, the webhook-* headers are read; one of them missing is named as such.
    del request["svix-id"], request["webhook-signature"]
    assert rejected(svix_provider(), request, body).detail == "missing webhook-signature header"


@pytest.mark.parametrize("zeros", ["0", "00"])
@pytest.mark.parametrize(("name", "prefix"), [("svix", "svix-"), ("standard-webhooks", "webhook-")])
def test_a_timestamp_with_leading_zeros_is_signed_as_its_number_as_the_libraries_sign_it(
    zeros: str, name: str, prefix: str
) -> None:
    # Both libraries read the timestamp header as a number and sign that number: `01700000000` is signed
    # as `1700000000`. A request signed over the header's own text was accepted, one they refuse; one
    # signed as they sign was refused.
    body, headers = svix_request()
    number = headers["svix-timestamp"]
    written = zeros + number
    provider = make_svix_like(name)
    for signed_over, accepted in ((number, True), (written, False)):
        request = {
            f"{prefix}id": MSG_ID,
            f"{prefix}timestamp": written,
            f"{prefix}signature": v1(SVIX_SECRET, MSG_ID, signed_over, body),
        }
        assert library_accepts(name, body, request) is accepted, signed_over
        if accepted:
            provider.verify(request, body, float(number))
        else:
            assert rejected(provider, request, body, float(number)).reason == "invalid_signature"
    # The zeros do not count towards the 12 digits either: the libraries read the number.
    request = {
        f"{prefix}id": MSG_ID,
        f"{prefix}timestamp": "0" * 12 + number,
        f"{prefix}signature": v1(SVIX_SECRET, MSG_ID, number, body),
    }
    assert library_accepts(name, body, request)
    provider.verify(request, body, float(number))
    # And where the payload has no time of its own, the event's is the header's number all the same.
    untimed = {key: value for key, value in json.loads(body).items() if key != "timestamp"}
    event = provider.parse(request, json.dumps(untimed).encode(), untimed, float(number))
    assert event.occurred_at == float(number)


def make_svix_like(name: str) -> Provider:
    source = Source(path="/p", provider=name, secrets=[SVIX_SECRET], tolerance=TOLERANCE)
    return registry().providers[name]("consignease", source)


def library_accepts(name: str, body: bytes, headers: dict[str, str]) -> bool:
    """Whether the provider's own library verifies the request (at the current time, as it reads it)."""
    try:
        if name == "svix":
            Webhook(SVIX_SECRET).verify(body, headers)
        else:
            StandardWebhook(SVIX_SECRET).verify(body, headers)
    except WebhookVerificationError:  # svix's is standardwebhooks' own
        return False
    return True


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


def test_an_unpadded_whsec_secret_is_the_same_key_as_the_standard_webhooks_reference_reads() -> None:
    # The Standard Webhooks reference pads the base64 before decoding it; the secret was refused at load.
    assert OTHER_SVIX_SECRET.endswith("=")
    unpadded = OTHER_SVIX_SECRET.rstrip("=")
    body, headers = svix_request(secret=OTHER_SVIX_SECRET)
    now = float(headers["svix-timestamp"])
    assert Webhook(unpadded).verify(body, headers) is None
    svix_provider(unpadded).verify(headers, body, now)
    svix_provider(unpadded.removeprefix("whsec_")).verify(headers, body, now)


@pytest.mark.parametrize("secret", ["whsec_QUJDR", "whsec_QU=JD", "whsec_QUJD*", "whsec_"])
def test_a_whsec_secret_that_is_not_base64_even_padded_is_still_refused(secret: str) -> None:
    with pytest.raises(ValueError, match=r"^secrets\[0\] is (not a|an empty) whsec_ secret"):
        svix_provider(secret)


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
    # A leading zero is the same time, and the same signed number (see the leading zeros test below).
    svix_provider().verify({**headers, "svix-timestamp": "0" + headers["svix-timestamp"]}, body, NOW)


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


@pytest.mark.parametrize("timestamp", ["2026-11-22T09:59:30Z", "2026-11-22t09:59:30z"])
def test_svix_parse_occurred_at_from_an_iso_timestamp(timestamp: str) -> None:
    body, headers = signed()
    payload = {**json.loads(body), "timestamp": timestamp}
    event = svix_provider().parse(headers, body, payload, received_at=NOW)
    # Not the header's timestamp, NOW: approx's default tolerance, relative, would let that pass.
    assert event.occurred_at == NOW - 30


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


def test_consignly_signature_hex_and_prefix_are_read_in_any_case() -> None:
    """Hex names the same digest in either case (.NET's Convert.ToHexString writes upper case), and the
    scheme word too: `SHA256=` and upper-case hex are accepted. Other changes are refused, a comma stuck to
    the signature included. Whitespace around the value is not part of it (HTTP strips it)."""
    body = consignly_body()
    digest = consignly_digest(body)
    provider = consignly_provider()
    for spelling in (
        f"  sha256={digest}  ",
        f"sha256={digest.upper()}",
        f"SHA256={digest}",
        f"SHA256={digest.upper()}",
        f"Sha256={digest[:32]}{digest[32:].upper()}",
    ):
        provider.verify({"x-consignly-signature": spelling}, body, NOW)
    for spelling in (f"sha256={digest},", f"SHA256={digest.upper()},", f"SHA-256={digest.upper()}"):
        assert_invalid_signature(provider, {"x-consignly-signature": spelling}, body)


@pytest.mark.parametrize("secret", CONSIGNLY_SECRETS)
def test_each_consignly_secret_is_accepted_in_upper_case_hex(secret: str) -> None:
    body = consignly_body()
    digest = consignly_headers(body, secret)["x-consignly-signature"].removeprefix("sha256=")
    consignly_provider().verify({"x-consignly-signature": f"SHA256={digest.upper()}"}, body, NOW)


def test_consignly_upper_case_hex_of_another_digest_is_refused() -> None:
    body = consignly_body(status=1)
    other = consignly_digest(consignly_body(status=2)).upper()
    error = rejected(consignly_provider(), {"x-consignly-signature": f"sha256={other}"}, body)
    assert (error.status, error.reason, error.detail) == (401, "invalid_signature", "no signature matches")


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
        pytest.param(lambda d: "SHA256=" + "Z" * 64, id="upper-case-non-hex"),
        pytest.param(lambda d: "sha256=" + " ".join(d[i : i + 2] for i in range(0, 64, 2)), id="spaced-hex"),
        pytest.param(lambda d: f"sha256= {d}", id="space-after-prefix"),
        pytest.param(lambda d: f"sha256={d[:-1]}\u0660", id="arabic-indic-digit"),
        pytest.param(lambda d: f"sha256={d[:-1].upper()}", id="63-upper-case-digits"),
        pytest.param(lambda d: "sha256=" + "é" * 64, id="non-ascii"),
        pytest.param(lambda d: "sha256=" + d[:62] + "0x", id="hex-with-x"),
        pytest.param(lambda d: "sha256=" + base64.b64encode(bytes.fromhex(d)).decode(), id="base64"),
        pytest.param(lambda d: f"sha256={d}, sha256={d}", id="repeated-header"),
        pytest.param(lambda d: f"SHA256={d.upper()}, SHA256={d.upper()}", id="repeated-upper-case"),
        pytest.param(lambda d: "sha256=" + "0" * 64, id="zeros"),
        pytest.param(lambda d: "=" * 10_000, id="huge"),
    ],
)
def test_consignly_bad_signature_headers(make_header: Any) -> None:
    body = consignly_body()
    header = make_header(consignly_digest(body))
    error = rejected(consignly_provider(), {"x-consignly-signature": header}, body)
    assert (error.status, error.reason) == (401, "invalid_signature")
    assert not any(secret in error.detail for secret in CONSIGNLY_SECRETS)
    # A header written another way says so: "no signature matches" would send the sender after its secret.
    # Only a well-formed signature that no secret made is "no signature matches".
    well_formed = re.fullmatch(r"sha256=[0-9a-f]{64}", header, flags=re.ASCII | re.IGNORECASE)
    assert error.detail == (
        "no signature matches"
        if well_formed
        else "X-Consignly-Signature must be sha256=<64 hex digits>, once"
    )


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
        # RFC 3339 (section 5.6) allows the T and the Z in lower case.
        ("2026-11-22t10:00:00z", datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp()),
        ("2026-11-22T10:00:00.250z", datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp() + 0.25),
        ("2026-11-22t12:00:00+02:00", datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp()),
        ("2026-11-22T10:00:00zz", None),
        ("2026-11-22T10:00:00Z+01:00", None),
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
        assert event.occurred_at == pytest.approx(expected, abs=1e-3)  # relative, the default is ~30 min


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
        and VALID_HEADERS["svix-signature"] in signature_entries(headers.get("svix-signature", ""))
    )
    try:
        SVIX.verify(headers, VALID_BODY, NOW)
    except Rejected as error:
        assert error.status == 401
        assert not complete
    else:
        assert complete


# == every provider: properties ========================================================================
#
# Each scheme is signed here by hand, as its provider documents it (independently of the provider's own
# sign()); requests signed by the providers' libraries are in test_providers_more.py and
# test_provider_vectors.py.

HMAC_ID_OPTIONS = {
    "header": "X-Acme-Signature",
    "prefix": "sha256=",
    "timestamp_header": "X-Acme-Timestamp",
    "signed_content": "{id}.{timestamp}.{body}",
    "id_from": "header:X-Acme-Delivery",
}
HMAC_BASE64_OPTIONS = {"header": "X-Signature", "algorithm": "sha512", "encoding": "base64"}


def mac(secret: str | bytes, content: bytes, algorithm: str = "sha256") -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, content, algorithm).digest()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def sign_svix(prefix: str) -> Any:
    def sign(secret: str, body: bytes, event_id: str, timestamp: str) -> dict[str, str]:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        signature = "v1," + b64(mac(key, f"{event_id}.{timestamp}.".encode() + body))
        return {f"{prefix}id": event_id, f"{prefix}timestamp": timestamp, f"{prefix}signature": signature}

    return sign


def with_stripe_timestamp(headers: dict[str, str], timestamp: str) -> dict[str, str]:
    _, _, signatures = headers["stripe-signature"].partition(",")
    return {"stripe-signature": f"t={timestamp},{signatures}"}


@dataclass(frozen=True)
class Scheme:
    """How a provider's requests are signed, and which parts of them are signed."""

    name: str
    provider: str
    secrets: st.SearchStrategy[str]
    sign: Callable[[str, bytes, str, str], dict[str, str]]  # (secret, body, id, timestamp) -> headers
    signature_header: str
    # Where the signature's text starts in that header: after `Bearer ` / `Basic `, whose scheme word is
    # matched without regard to case (RFC 9110 section 11.1).
    signature_from: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    id_header: str | None = None  # a signed id
    # Where, in the signature header's text, a hex digest and its scheme word (`sha256=`) begin: from there
    # on the case of a letter does not matter. None where the signature is not hex.
    any_case_from: Callable[[str], int] | None = None
    retime: Callable[[dict[str, str], str], dict[str, str]] | None = None  # put another signed timestamp

    def __str__(self) -> str:
        return self.name

    def make(self, *secrets: str) -> Provider:
        source = Source.model_validate(
            {"path": "/p", "provider": self.provider, "secrets": list(secrets), "tolerance": TOLERANCE}
            | {"options": self.options}
        )
        return PROVIDER_CLASSES[self.provider]("src", source)


PROVIDER_CLASSES = registry().providers
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
whsec_secrets = st.binary(min_size=1, max_size=64).map(lambda key: "whsec_" + b64(key))
# Secrets are used as their UTF-8 bytes; YAML cannot hold lone surrogates, blank ones are dropped, and
# whitespace at either end is refused when the config loads (a newline kept from a file).
text_secrets = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40).filter(
    lambda secret: secret.strip() == secret
)
token_secrets = st.text(PRINTABLE, min_size=1, max_size=40)
basic_secrets = st.builds(
    "{}:{}".format,
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"), min_size=1),
    # An empty password is refused when the config loads (anyone could send it).
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30).filter(
        lambda password: password.strip() == password
    ),
)

SCHEMES = [
    Scheme(
        "svix", "svix", whsec_secrets, sign_svix("svix-"), "svix-signature", id_header="svix-id",
        retime=lambda headers, ts: {**headers, "svix-timestamp": ts},
    ),
    Scheme(
        "standard-webhooks", "standard-webhooks", whsec_secrets, sign_svix("webhook-"), "webhook-signature",
        id_header="webhook-id", retime=lambda headers, ts: {**headers, "webhook-timestamp": ts},
    ),
    Scheme(
        "consignly", "consignly", text_secrets,
        lambda secret, body, _id, _ts: {"x-consignly-signature": "sha256=" + mac(secret, body).hex()},
        "x-consignly-signature", any_case_from=lambda _text: 0,
    ),
    Scheme(
        "github", "github", text_secrets,
        lambda secret, body, _id, _ts: {"x-hub-signature-256": "sha256=" + mac(secret, body).hex()},
        "x-hub-signature-256", any_case_from=lambda _text: 0,
    ),
    Scheme(
        "stripe", "stripe", text_secrets,
        lambda secret, body, _id, ts: {
            "stripe-signature": f"t={ts},v1=" + mac(secret, f"{ts}.".encode() + body).hex()
        },
        "stripe-signature", retime=with_stripe_timestamp,
        # The digest after v1=: Stripe's entry names (t, v1) are matched as written.
        any_case_from=lambda text: text.index(",v1=") + len(",v1="),
    ),
    Scheme(
        "slack", "slack", text_secrets,
        lambda secret, body, _id, ts: {
            "x-slack-request-timestamp": ts,
            "x-slack-signature": "v0=" + mac(secret, f"v0:{ts}:".encode() + body).hex(),
        },
        "x-slack-signature", retime=lambda headers, ts: {**headers, "x-slack-request-timestamp": ts},
        any_case_from=lambda _text: 0,
    ),
    Scheme(
        "shopify", "shopify", text_secrets,
        lambda secret, body, _id, _ts: {"x-shopify-hmac-sha256": b64(mac(secret, body))},
        "x-shopify-hmac-sha256",
    ),
    Scheme(
        "hmac-id-timestamp", "hmac", text_secrets,
        lambda secret, body, event_id, ts: {
            "x-acme-delivery": event_id,
            "x-acme-timestamp": ts,
            "x-acme-signature": "sha256=" + mac(secret, f"{event_id}.{ts}.".encode() + body).hex(),
        },
        "x-acme-signature", options=HMAC_ID_OPTIONS, id_header="x-acme-delivery",
        retime=lambda headers, ts: {**headers, "x-acme-timestamp": ts}, any_case_from=lambda _text: 0,
    ),
    Scheme(
        "hmac-base64-sha512", "hmac", text_secrets,
        lambda secret, body, _id, _ts: {"x-signature": b64(mac(secret, body, "sha512"))},
        "x-signature", options=HMAC_BASE64_OPTIONS,
    ),
    Scheme(
        "token", "token", token_secrets,
        lambda secret, _body, _id, _ts: {"authorization": f"Bearer {secret}"},
        "authorization", signature_from=len("Bearer "),
    ),
    Scheme(
        "basic", "basic", basic_secrets,
        lambda secret, _body, _id, _ts: {"authorization": "Basic " + b64(secret.encode())},
        "authorization", signature_from=len("Basic "),
    ),
]  # fmt: skip
SIGNED_IDS = [scheme for scheme in SCHEMES if scheme.id_header]
HEX_SCHEMES = [scheme for scheme in SCHEMES if scheme.any_case_from]
SIGNED_TIMESTAMPS = [scheme for scheme in SCHEMES if scheme.retime]
FAST = settings(max_examples=60, database=None, deadline=None)

bodies = st.binary(max_size=200)
# Ids that a header can carry: printable ASCII, without the whitespace HTTP strips from a value's ends.
event_ids = st.text(PRINTABLE, min_size=1, max_size=40)
in_tolerance = st.integers(int(NOW - TOLERANCE), int(NOW + TOLERANCE)).map(str)


def test_the_property_schemes_cover_every_verifying_provider() -> None:
    verifying = {name for name, cls in PROVIDER_CLASSES.items() if cls.needs_secret}
    assert verifying == {scheme.provider for scheme in SCHEMES}
    assert {scheme.provider for scheme in SIGNED_TIMESTAMPS} == {
        "svix", "standard-webhooks", "stripe", "slack", "hmac"
    }  # fmt: skip
    assert {scheme.provider for scheme in SIGNED_IDS} == {"svix", "standard-webhooks", "hmac"}


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@FAST
@given(data=st.data(), body=bodies, event_id=event_ids, timestamp=in_tolerance)
def test_valid_requests_are_always_accepted(
    scheme: Scheme, data: st.DataObject, body: bytes, event_id: str, timestamp: str
) -> None:
    secret = data.draw(scheme.secrets, label="secret")
    other = data.draw(scheme.secrets, label="another configured secret")
    for secrets in ((secret,), (other, secret)):  # alone, and second during a rotation
        scheme.make(*secrets).verify(scheme.sign(secret, body, event_id, timestamp), body, NOW)


# Not whitespace: HTTP strips it from both ends of a value, and inside a value it separates entries.
# Characters of hex and base64 digests and of their separators come up often, the rest of Unicode too.
mutation_characters = st.one_of(
    st.sampled_from(",;:=+/-_ABCDEFabcdef0189"), st.characters(exclude_categories=["Zs", "Zl", "Zp", "Cc"])
)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@FAST
@given(data=st.data(), body=bodies, event_id=event_ids, timestamp=in_tolerance)
def test_any_change_to_the_signature_text_is_rejected(
    scheme: Scheme, data: st.DataObject, body: bytes, event_id: str, timestamp: str
) -> None:
    """Replacing, inserting or deleting one character anywhere in the signature is refused, including
    changes that decode to the same bytes (other unused base64 padding bits, a comma), but for the case of
    a hex digest's letters and of its scheme word: those name the same signature and are accepted."""
    secret = data.draw(scheme.secrets, label="secret")
    headers = scheme.sign(secret, body, event_id, timestamp)
    text = headers[scheme.signature_header]
    index = data.draw(st.integers(scheme.signature_from, len(text)), label="index")
    kind = data.draw(st.sampled_from(["replace", "insert", "delete", "swapcase"]), label="kind")
    if kind == "swapcase":  # upper-case hex is the same digest
        mutated = text[: scheme.signature_from] + text[scheme.signature_from :].swapcase()
        assume(mutated != text)
    elif kind == "insert" or index == len(text):
        mutated = text[:index] + data.draw(mutation_characters, label="inserted") + text[index:]
    elif kind == "delete":
        mutated = text[:index] + text[index + 1 :]
    else:
        replacement = data.draw(mutation_characters.filter(lambda char: char != text[index]), label="with")
        mutated = text[:index] + replacement + text[index + 1 :]
    if same_in_any_case(scheme, text, mutated):
        scheme.make(secret).verify({**headers, scheme.signature_header: mutated}, body, NOW)
        return
    with pytest.raises(Rejected) as caught:
        scheme.make(secret).verify({**headers, scheme.signature_header: mutated}, body, NOW)
    assert caught.value.status == 401
    if scheme.provider != "stripe":  # Stripe's header also holds the timestamp, which has its own reasons
        assert caught.value.reason == "invalid_signature"


def same_in_any_case(scheme: Scheme, text: str, other: str) -> bool:
    """Whether other is the signature text with only the case of ASCII letters changed, where the scheme
    reads them in any case (a hex digest and its scheme word)."""
    if scheme.any_case_from is None or len(other) != len(text):
        return False
    start = scheme.any_case_from(text)
    return (
        other[:start] == text[:start]
        and other[start:].isascii()
        and other[start:].lower() == text[start:].lower()
    )


@pytest.mark.parametrize("scheme", HEX_SCHEMES, ids=str)
def test_hex_signatures_and_their_scheme_word_are_read_in_any_case(scheme: Scheme) -> None:
    secret = "It's a Secret to Everybody"
    body, timestamp = b'{"id": "evt_1", "type": "thing.done"}', str(int(NOW))
    headers = scheme.sign(secret, body, MSG_ID, timestamp)
    provider = scheme.make("another secret", secret)
    text = headers[scheme.signature_header]
    start = scheme.any_case_from(text) if scheme.any_case_from else 0
    for spelling in (text[start:].upper(), text[start:].swapcase()):
        provider.verify({**headers, scheme.signature_header: text[:start] + spelling}, body, NOW)
    # Upper case does not make a wrong digest right.
    wrong = scheme.sign(secret, body + b" ", MSG_ID, timestamp)[scheme.signature_header]
    error = rejected(
        provider, {**headers, scheme.signature_header: text[:start] + wrong[start:].upper()}, body
    )
    assert (error.status, error.reason) == (401, "invalid_signature")


BASE64_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
FIXED_SECRETS = {
    "svix": SVIX_SECRET,
    "standard-webhooks": SVIX_SECRET,
    "token": "mF_9.B5f-4.1JqM",
    "basic": "Aladdin:open sesame",
}


def same_digest_spellings(text: str, start: int) -> set[str]:
    """Other texts for the signature in text[start:]: the same digest with its letters' case swapped, the
    same base64 bytes with an unused padding bit set, and the signature with a comma before or after it."""
    signature = text[start:]
    spellings = {text + ",", text[:start] + "," + signature, text[:start] + signature.swapcase()}
    encoded = signature.rpartition(",")[2]  # svix: v1,<base64>
    data = encoded.rstrip("=")
    if data != encoded:
        flipped = data[:-1] + BASE64_ALPHABET[BASE64_ALPHABET.index(data[-1]) ^ 1] + encoded[len(data) :]
        assert base64.b64decode(flipped) == base64.b64decode(encoded)  # the same bytes, another text
        spellings.add(text[: len(text) - len(encoded)] + flipped)
    return spellings - {text}


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_other_spellings_of_a_valid_signature_are_rejected_but_hex_in_another_case(scheme: Scheme) -> None:
    secret = FIXED_SECRETS.get(scheme.provider, "It's a Secret to Everybody")
    body, timestamp = b'{"id": "evt_1", "type": "thing.done"}', str(int(NOW))
    headers = scheme.sign(secret, body, MSG_ID, timestamp)
    provider = scheme.make(secret)
    provider.verify(headers, body, NOW)
    text = headers[scheme.signature_header]
    spellings = same_digest_spellings(text, scheme.signature_from)
    assert len(spellings) >= 3
    for spelling in spellings:
        if same_in_any_case(scheme, text, spelling):  # hex, whose case does not matter
            provider.verify({**headers, scheme.signature_header: spelling}, body, NOW)
            continue
        error = rejected(provider, {**headers, scheme.signature_header: spelling}, body)
        assert error.status == 401, spelling


@pytest.mark.parametrize("scheme", SIGNED_IDS, ids=str)
@FAST
@given(data=st.data(), body=bodies, event_id=event_ids, timestamp=in_tolerance, other_id=event_ids)
def test_any_change_to_a_signed_id_is_rejected(
    scheme: Scheme, data: st.DataObject, body: bytes, event_id: str, timestamp: str, other_id: str
) -> None:
    assume(other_id != event_id)
    secret = data.draw(scheme.secrets, label="secret")
    assert scheme.id_header is not None
    headers = {**scheme.sign(secret, body, event_id, timestamp), scheme.id_header: other_id}
    with pytest.raises(Rejected) as caught:
        scheme.make(secret).verify(headers, body, NOW)
    assert caught.value.reason == "invalid_signature"


@pytest.mark.parametrize("scheme", SIGNED_TIMESTAMPS, ids=str)
@FAST
@given(data=st.data(), body=bodies, event_id=event_ids, timestamp=in_tolerance)
def test_any_change_to_a_signed_timestamp_is_rejected(
    scheme: Scheme, data: st.DataObject, body: bytes, event_id: str, timestamp: str
) -> None:
    """Another time within tolerance, or, where the timestamp is signed as text, the same time written
    differently (a leading zero): either is refused as a bad signature. The svix and Stripe libraries sign
    the number the header holds, so there a leading zero changes nothing."""
    as_number = ("svix", "standard-webhooks", "stripe")
    rewritten = [] if scheme.provider in as_number else [st.just("0" + timestamp)]
    other = data.draw(st.one_of(in_tolerance, *rewritten), label="other timestamp")
    assume(other != timestamp)
    secret = data.draw(scheme.secrets, label="secret")
    assert scheme.retime is not None
    headers = scheme.retime(scheme.sign(secret, body, event_id, timestamp), other)
    with pytest.raises(Rejected) as caught:
        scheme.make(secret).verify(headers, body, NOW)
    assert caught.value.reason == "invalid_signature"


# What signature_entries means: split on an optional comma and a run of whitespace, at most MAX_SIGNATURES.
ENTRY_SEPARATOR = re.compile(r",?\s+")


@settings(max_examples=500, deadline=None)
@given(
    header=st.lists(
        st.one_of(
            st.sampled_from(
                ["v1,abc=", "v1a,x", ",", ",,", " ", "  ", "\t", ", ", "\u00a0", "\x1c", "\u2003"]
            ),
            st.text(max_size=6),
        ),
        max_size=30,
    ).map("".join)
)
def test_signature_entries_split_as_the_separator_says(header: str) -> None:
    expected = ENTRY_SEPARATOR.split(header.strip(), MAX_SIGNATURES)[:MAX_SIGNATURES]
    assert signature_entries(header) == expected


def test_require_signature_reads_hex_in_any_case_and_base64_as_written() -> None:
    keys = [b"first-secret", b"second-secret"]
    for key in keys:
        digest = mac(key, b"body")
        for entry in (
            f"sha256={digest.hex()}",
            f"SHA256={digest.hex().upper()}",
            f"Sha256={digest.hex().title()}",
        ):
            require_signature(keys, b"body", ["junk", entry], prefix="sha256=")
        require_signature(keys, b"body", [b64(digest)], encoding="base64")
    digest = mac(keys[0], b"body")
    for entry in (
        f"sha256={digest.hex().upper()},",  # a comma stuck to it
        f"sha256={' '.join(f'{byte:02X}' for byte in digest)}",  # bytes.fromhex() would skip the spaces
        f"sha256={digest.hex()[:-1]}",  # an odd number of digits
        f"sha256={mac(b'other', b'body').hex().upper()}",
        f"sha-256={digest.hex()}",
    ):
        with pytest.raises(Rejected) as caught:
            require_signature(keys, b"body", [entry], prefix="sha256=")
        assert (caught.value.status, caught.value.reason) == (401, "invalid_signature"), entry
    with pytest.raises(Rejected) as caught:
        require_signature(keys, b"body", [b64(digest).swapcase()], encoding="base64")
    assert caught.value.reason == "invalid_signature"


def test_hmac_digest_with_prepared_keys_is_hmac_digest_call_after_call() -> None:
    # Each key is prepared once and copied for each message: no message may leave anything in it.
    for algorithm in ("sha1", "sha256", "sha512"):
        for key in (b"first-secret", b"second-secret", b""):
            for content in (b"", b"a", b"b" * 1000, b"a"):
                assert hmac_digest(key, content, algorithm) == hmac.digest(key, content, algorithm)


@pytest.mark.parametrize("timestamp", ["\u00b2", "\u00b9\u00b3", "1" * 25])
def test_svix_parse_ignores_an_unreadable_timestamp_header(timestamp: str) -> None:
    # With `verify: log-only` a request whose timestamp failed verification still reaches parse. A header
    # is decoded as latin-1, so "²" (0xB2) arrives as a str that isdigit() accepts but float() refuses: the
    # request was answered 500 internal_error. 25 digits became an occurred_at far beyond the year 9999.
    body = json.dumps({"type": "user.created", "data": {"id": "u1"}}).encode()
    headers = {"svix-id": MSG_ID, "svix-timestamp": timestamp, "svix-signature": "v1,AAAA"}
    event = svix_provider().parse(headers, body, json.loads(body), NOW)
    assert event.occurred_at is None
    # A readable header is still used when the payload has no timestamp.
    headers["svix-timestamp"] = str(int(NOW))
    assert svix_provider().parse(headers, body, json.loads(body), NOW).occurred_at == int(NOW)


def test_log_only_svix_request_with_a_superscript_timestamp_is_accepted(tmp_path: Any) -> None:
    from tests.support import RunningGateway, gateway_config

    config = gateway_config(tmp_path)
    config["sources"]["consignease"]["verify"] = "log-only"
    body = json.dumps({"type": "user.created", "data": {"id": "u1"}}).encode()
    with RunningGateway(config) as gw:
        headers = {"content-type": "application/json", "svix-id": "msg_sup", "svix-signature": "v1,AAAA"}
        answer = gw.client.post(
            gw.url + "/webhooks/consignease", content=body, headers={**headers, "svix-timestamp": b"\xb2"}
        )
    assert (answer.status_code, answer.json()["status"]) == (200, "accepted")
