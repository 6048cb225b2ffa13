"""The github, stripe, slack, shopify, hmac, token, basic and standard-webhooks providers, and svix's ed25519
(v1a) signatures: requests signed by the providers' own libraries (or by hand, as their docs describe)
are accepted and parsed; anything else is refused with Rejected and nothing but Rejected."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import standardwebhooks
import stripe
import yaml
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from slack_sdk.signature import SignatureVerifier
from svix.webhooks import Webhook as SvixWebhook

from gateway.cli import main
from gateway.config import ConfigError, Source, parse_config
from gateway.events import Event
from gateway.plugins import registry
from gateway.providers import Provider, Rejected
from gateway.routing import RouteTable
from gateway.sender import build_request
from plugins.hmac_generic import hex_digest
from tests.support import (
    SVIX_SECRET,
    Downstream,
    RunningGateway,
    downstream_server,
    gateway_config,
    wait_until,
)

NOW = 1_700_000_000.0
SOURCE = "src"


def make_provider(name: str, secrets: list[str], tolerance: float = 300, **options: Any) -> Provider:
    source = Source.model_validate(
        {"path": "/p", "provider": name, "secrets": secrets, "tolerance": tolerance, "options": options}
    )
    return registry().providers[name](SOURCE, source)


def lower(headers: dict[str, str]) -> dict[str, str]:
    """As the ingress hands headers to a provider."""
    return {name.lower(): value for name, value in headers.items()}


def rejection(call: Callable[[], object]) -> Rejected:
    with pytest.raises(Rejected) as raised:
        call()
    return raised.value


def reason_of(call: Callable[[], object]) -> str:
    return rejection(call).reason


def hex_hmac(secret: str, content: bytes, algorithm: str = "sha256") -> str:
    return hmac.new(secret.encode(), content, algorithm).hexdigest()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- each provider's requests, signed as its sender does (its own library where it has one) -------------


def svix_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    signature = SvixWebhook(secret).sign("msg_svix_1", datetime.fromtimestamp(now, UTC), body.decode())
    return {"svix-id": "msg_svix_1", "svix-timestamp": str(int(now)), "svix-signature": signature}


def standard_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    signer = standardwebhooks.Webhook(secret)
    signature = signer.sign("msg_std_1", datetime.fromtimestamp(now, UTC), body.decode())
    return {"webhook-id": "msg_std_1", "webhook-timestamp": str(int(now)), "webhook-signature": signature}


def github_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    return {
        "X-GitHub-Event": "issues",
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "X-Hub-Signature-256": "sha256=" + hex_hmac(secret, body),
    }


def stripe_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=int(now))
    return {"Stripe-Signature": header}


def slack_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    timestamp = str(int(now))
    signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    assert signature is not None
    return {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature}


def shopify_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    return {
        "X-Shopify-Topic": "orders/create",
        "X-Shopify-Hmac-Sha256": b64(hmac.new(secret.encode(), body, hashlib.sha256).digest()),
        "X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
        "X-Shopify-Event-Id": "98880550-7158-44d4-b7cd-2c97c8a091b5",
        "X-Shopify-Triggered-At": "2023-11-14T22:13:20.123456789Z",
    }


ACME_OPTIONS = {
    "header": "X-Acme-Signature",
    "prefix": "sha256=",
    "timestamp_header": "X-Acme-Timestamp",
    "signed_content": "{timestamp}.{body}",
    "id_from": "header:X-Acme-Delivery",
    "type_from": "json:event.type",
}


def acme_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    timestamp = str(int(now))
    return {
        "X-Acme-Delivery": "del_1",
        "X-Acme-Timestamp": timestamp,
        "X-Acme-Signature": "sha256=" + hex_hmac(secret, f"{timestamp}.".encode() + body),
    }


def token_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def basic_headers(secret: str, body: bytes, now: float) -> dict[str, str]:
    return {"Authorization": "Basic " + b64(secret.encode())}


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


@dataclass
class Case:
    provider: str
    secrets: list[str]
    wrong_secret: str
    signer: Callable[[str, bytes, float], dict[str, str]]
    body: bytes
    event_id: str
    event_type: str
    options: dict[str, Any] = field(default_factory=dict)
    timestamped: bool = True
    # token and basic send the secret itself: nothing ties it to the body.
    binds_body: bool = True

    def __str__(self) -> str:
        return self.provider

    def make(self, tolerance: float = 300) -> Provider:
        return make_provider(self.provider, self.secrets, tolerance, **self.options)

    def headers(
        self, secret: str | None = None, body: bytes | None = None, now: float = NOW
    ) -> dict[str, str]:
        return lower(self.signer(secret or self.secrets[0], self.body if body is None else body, now))


CASES = [
    Case(
        "svix",
        [SVIX_SECRET, "whsec_" + b64(b"second svix key for rotation")],
        "whsec_" + b64(b"not the configured key"),
        svix_headers,
        dumps({"type": "user.created", "timestamp": "2023-11-14T22:13:20Z", "data": {"id": "user_1"}}),
        "msg_svix_1",
        "user.created",
    ),
    Case(
        "standard-webhooks",
        ["whsec_" + b64(b"standard webhooks key one"), "whsec_" + b64(b"standard webhooks key two")],
        "whsec_" + b64(b"not the configured key"),
        standard_headers,
        dumps({"type": "invoice.paid", "timestamp": "2023-11-14T22:13:20Z", "data": {"id": "in_1"}}),
        "msg_std_1",
        "invoice.paid",
    ),
    Case(
        "github",
        ["gh-secret-one", "gh-secret-two"],
        "gh-secret-wrong",
        github_headers,
        dumps({"action": "opened", "issue": {"number": 1347}, "repository": {"full_name": "octo/hello"}}),
        "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "issues",
        timestamped=False,
    ),
    Case(
        "stripe",
        ["whsec_stripe_one", "whsec_stripe_two"],
        "whsec_stripe_wrong",
        stripe_headers,
        dumps(
            {
                "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
                "object": "event",
                "type": "payment_intent.succeeded",
                "created": 1699999990,
                "data": {"object": {"id": "pi_1", "amount": 2000}},
            }
        ),
        "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "payment_intent.succeeded",
    ),
    Case(
        "slack",
        ["8f742231b10e8888abcd99yyyzzz85a5", "0123456789abcdef0123456789abcdef"],
        "ffffffffffffffffffffffffffffffff",
        slack_headers,
        dumps(
            {
                "token": "XXYYZZ",
                "team_id": "T123ABC456",
                "type": "event_callback",
                "event": {"type": "app_mention", "text": "<@U0LAN0Z89> hi", "event_ts": "1699999990.000200"},
                "event_id": "Ev08MFMKH6",
                "event_time": 1699999990,
            }
        ),
        "Ev08MFMKH6",
        "app_mention",
    ),
    Case(
        "shopify",
        ["shpss_client_secret_one", "shpss_client_secret_two"],
        "shpss_wrong",
        shopify_headers,
        dumps({"id": 820982911946154508, "email": "jon@example.com", "total_price": "9.99"}),
        "98880550-7158-44d4-b7cd-2c97c8a091b5",
        "orders/create",
        timestamped=False,
    ),
    Case(
        "hmac",
        ["acme-secret-one", "acme-secret-two"],
        "acme-wrong",
        acme_headers,
        dumps({"event": {"type": "order.shipped"}, "data": {"order": 42}}),
        "del_1",
        "order.shipped",
        options=ACME_OPTIONS,
    ),
    Case(
        "token",
        ["tok_first", "tok_second"],
        "tok_wrong",
        token_headers,
        dumps({"id": "evt_token_1", "type": "build.finished"}),
        "evt_token_1",
        "build.finished",
        timestamped=False,
        binds_body=False,
    ),
    Case(
        "basic",
        ["alice:first password", "bob:s3cret:with:colons"],
        "alice:wrong",
        basic_headers,
        dumps({"id": "evt_basic_1", "type": "build.finished"}),
        "evt_basic_1",
        "build.finished",
        timestamped=False,
        binds_body=False,
    ),
]
CASE = {case.provider: case for case in CASES}
SIGNING = [case for case in CASES if case.binds_body]
TIMESTAMPED = [case for case in CASES if case.timestamped]
PROVIDERS = {case.provider: case.make() for case in CASES}
VALID = {case.provider: case.headers() for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_valid_request_is_accepted_with_any_configured_secret(case: Case) -> None:
    provider = case.make()
    for secret in case.secrets:
        headers = case.headers(secret)
        provider.verify(headers, case.body, NOW)
        event = provider.parse(headers, case.body, json.loads(case.body), NOW)
        assert (event.source, event.id, event.type) == (SOURCE, case.event_id, case.event_type)
        assert event.body == case.body and event.received_at == NOW


@pytest.mark.parametrize("case", SIGNING, ids=str)
def test_a_tampered_body_is_rejected(case: Case) -> None:
    tampered = case.body.replace(b"}", b', "extra": 1}', 1)
    error = rejection(lambda: case.make().verify(case.headers(), tampered, NOW))
    assert (error.status, error.reason) == (401, "invalid_signature")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_wrong_secret_is_rejected_without_naming_any_secret(case: Case) -> None:
    error = rejection(lambda: case.make().verify(case.headers(case.wrong_secret), case.body, NOW))
    assert (error.status, error.reason) == (401, "invalid_signature")
    said = f"{error} {error.detail} {error.reason}"
    for secret in [*case.secrets, case.wrong_secret]:
        # basic's secrets are user:password; neither half may show.
        assert all(part not in said for part in secret.split(":") if part)


@pytest.mark.parametrize("case", TIMESTAMPED, ids=str)
@pytest.mark.parametrize("offset", [-301, 301, -86400])
def test_a_timestamp_out_of_tolerance_is_rejected(case: Case, offset: int) -> None:
    headers = case.headers(now=NOW + offset)
    error = rejection(lambda: case.make(tolerance=300).verify(headers, case.body, NOW))
    assert (error.status, error.reason) == (401, "timestamp_out_of_tolerance")
    # Within tolerance the very same request is fine.
    case.make(tolerance=abs(offset) + 1).verify(headers, case.body, NOW)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_no_headers_is_a_missing_signature(case: Case) -> None:
    error = rejection(lambda: case.make().verify({"content-type": "application/json"}, case.body, NOW))
    assert (error.status, error.reason) == (401, "missing_signature")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_what_the_sender_signs_the_receiver_accepts(case: Case) -> None:
    """`hookyard send`: sample_payload + sign, then verify + parse on the other side."""
    provider = case.make()
    payload = provider.sample_payload(case.event_type, "evt_sent_1", {"id": "obj_1", "n": 1}, NOW)
    body = orjson.dumps(payload)
    headers = lower(provider.sign(body, "evt_sent_1", NOW))
    provider.verify(headers, body, NOW)
    event = provider.parse(headers, body, orjson.loads(body), NOW)
    assert (event.id, event.type) == ("evt_sent_1", case.event_type)
    if case.binds_body:
        with pytest.raises(Rejected):
            provider.verify(headers, body + b" ", NOW)


# -- properties -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SIGNING, ids=str)
@settings(max_examples=30, deadline=None, database=None)
@given(data=st.data())
def test_any_single_byte_change_of_the_body_is_rejected(case: Case, data: st.DataObject) -> None:
    body = bytearray(case.body)
    index = data.draw(st.integers(0, len(body) - 1), label="index")
    body[index] = (body[index] + data.draw(st.integers(1, 255), label="delta")) % 256
    error = rejection(lambda: PROVIDERS[case.provider].verify(VALID[case.provider], bytes(body), NOW))
    assert error.reason == "invalid_signature"


FRAGMENTS = [
    "v1,", "v1a,", "v0=", "v1=", "sha256=", "t=", ",", ", ", " ", "=", "==", "Bearer ", "Basic ", "whsec_",
    "1700000000", "1700000000000", "-1", "9" * 20, "0x1f", "\x00", "\t", "é", "\u2603", "\ud800", "AAAA",
    "ZmFrZQ==", "deadbeef" * 8, "%", "\r\n",
]  # fmt: skip
garbage = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join),
    st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
)


@pytest.mark.parametrize("case", CASES, ids=str)
@settings(max_examples=40, deadline=None, database=None)
@given(data=st.data())
def test_random_header_values_raise_nothing_but_rejected(case: Case, data: st.DataObject) -> None:
    headers = dict(VALID[case.provider])
    names = [*headers, "authorization", "x-unrelated"]
    for name in data.draw(
        st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True), label="names"
    ):
        if data.draw(st.booleans(), label="drop"):
            headers.pop(name, None)
        else:
            headers[name] = data.draw(garbage, label=name)
    body = data.draw(st.one_of(st.just(case.body), st.binary(max_size=64)), label="body")
    try:
        PROVIDERS[case.provider].verify(headers, body, NOW)
    except Rejected as error:
        assert error.status == 401
    try:
        PROVIDERS[case.provider].parse(headers, body, json.loads(case.body), NOW)
    except Rejected as error:
        assert error.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
# Keys the parsers look at, so that random payloads reach them.
payloads = json_values | st.fixed_dictionaries(
    {},
    optional={
        key: json_values for key in ("id", "type", "event", "event_id", "event_time", "created", "timestamp")
    },
)


@pytest.mark.parametrize("case", CASES, ids=str)
@settings(max_examples=40, deadline=None, database=None)
@given(payload=payloads)
def test_random_payloads_parse_or_raise_a_400(case: Case, payload: Any) -> None:
    try:
        event = PROVIDERS[case.provider].parse(VALID[case.provider], case.body, payload, NOW)
    except Rejected as error:
        assert error.status == 400
    else:
        assert event.id and event.type


# -- svix / Standard Webhooks: ed25519 (v1a) ----------------------------------------------------------------


def ed25519_pair() -> tuple[Ed25519PrivateKey, str, str]:
    private = Ed25519PrivateKey.generate()
    return (
        private,
        "whsk_" + b64(private.private_bytes_raw()),
        "whpk_" + b64(private.public_key().public_bytes_raw()),
    )


def v1a(private: Ed25519PrivateKey, msg_id: str, timestamp: int, body: bytes) -> str:
    return "v1a," + b64(private.sign(f"{msg_id}.{timestamp}.".encode() + body))


ED_BODY = dumps({"type": "user.created", "data": {"id": "user_1"}})


def ed_headers(signature: str, prefix: str = "svix-", msg_id: str = "msg_ed_1") -> dict[str, str]:
    return {f"{prefix}id": msg_id, f"{prefix}timestamp": str(int(NOW)), f"{prefix}signature": signature}


def test_v1a_is_accepted_with_the_whpk_key_beside_whsec_secrets() -> None:
    private, _, public = ed25519_pair()
    other, _, other_public = ed25519_pair()
    provider = make_provider("svix", [SVIX_SECRET, public, other_public])
    provider.verify(ed_headers(v1a(private, "msg_ed_1", int(NOW), ED_BODY)), ED_BODY, NOW)
    provider.verify(ed_headers(v1a(other, "msg_ed_1", int(NOW), ED_BODY)), ED_BODY, NOW)
    # The whsec_ secret of the same source still verifies v1, and both kinds may share one header.
    provider.verify(lower(svix_headers(SVIX_SECRET, ED_BODY, NOW)), ED_BODY, NOW)
    v1 = SvixWebhook(SVIX_SECRET).sign("msg_ed_1", datetime.fromtimestamp(NOW, UTC), ED_BODY.decode())
    garbage_v1a = "v1a," + b64(b"\x00" * 64)
    provider.verify(ed_headers(f"{garbage_v1a} {v1}"), ED_BODY, NOW)
    provider.verify(
        ed_headers(f"v1,{b64(b'x' * 32)} {v1a(private, 'msg_ed_1', int(NOW), ED_BODY)}"), ED_BODY, NOW
    )


def test_v1a_rejections() -> None:
    private, _, public = ed25519_pair()
    stranger, _, _ = ed25519_pair()
    provider = make_provider("svix", [SVIX_SECRET, public])
    good = v1a(private, "msg_ed_1", int(NOW), ED_BODY)
    cases = {
        "tampered body": (ed_headers(good), ED_BODY + b"\n"),
        "other id": (ed_headers(good, msg_id="msg_ed_2"), ED_BODY),
        "unknown key": (ed_headers(v1a(stranger, "msg_ed_1", int(NOW), ED_BODY)), ED_BODY),
        "v1a under v1": (ed_headers(good.replace("v1a,", "v1,")), ED_BODY),
        "truncated": (ed_headers(good[:-8]), ED_BODY),
        "short": (ed_headers("v1a," + b64(b"abc")), ED_BODY),
    }
    for label, (headers, body) in cases.items():
        assert reason_of(lambda h=headers, b=body: provider.verify(h, b, NOW)) == "invalid_signature", label


def test_v1a_beyond_the_signature_cap_is_not_checked() -> None:
    private, _, public = ed25519_pair()
    provider = make_provider("svix", [public])
    good = v1a(private, "msg_ed_1", int(NOW), ED_BODY)
    junk = " ".join(["v1a," + b64(bytes([n]) * 64) for n in range(9)])
    provider.verify(ed_headers(f"{junk} {good}"), ED_BODY, NOW)
    error = rejection(lambda: provider.verify(ed_headers(f"{junk} v1,AAAA {good}"), ED_BODY, NOW))
    assert error.reason == "invalid_signature"


def test_a_private_whsk_key_signs_v1a_for_holders_of_the_public_key() -> None:
    _, private_secret, public = ed25519_pair()
    for name, prefix in (("svix", "svix-"), ("standard-webhooks", "webhook-")):
        headers = make_provider(name, [private_secret]).sign(ED_BODY, "msg_1", NOW)
        assert headers[f"{prefix}signature"].startswith("v1a,")
        make_provider(name, [public]).verify(headers, ED_BODY, NOW)
        # With a whsec_ secret configured too, the sender signs v1 (what every receiver understands).
        both = make_provider(name, [private_secret, SVIX_SECRET]).sign(ED_BODY, "msg_1", NOW)
        assert both[f"{prefix}signature"].startswith("v1,")
    with pytest.raises(ValueError, match="whsk_"):
        make_provider("svix", [public]).sign(ED_BODY, "msg_1", NOW)


def test_ed25519_keys_without_their_base64_padding_are_read_as_whsec_secrets_are() -> None:
    private, private_secret, public = ed25519_pair()
    assert public.endswith("=") and private_secret.endswith("=")  # 32 bytes: one `=` of padding
    signature = v1a(private, "msg_ed_1", int(NOW), ED_BODY)
    make_provider("svix", [public.rstrip("=")]).verify(ed_headers(signature), ED_BODY, NOW)
    headers = make_provider("svix", [private_secret.rstrip("=")]).sign(ED_BODY, "msg_1", NOW)
    make_provider("svix", [public]).verify(headers, ED_BODY, NOW)
    for broken in (public.rstrip("=") + "A", public[:-3], "whpk_" + "A" * 42 + "*"):
        with pytest.raises(ValueError, match="whpk_ ed25519 key"):
            make_provider("svix", [broken])


def test_standard_webhooks_reads_only_webhook_headers() -> None:
    private, _, public = ed25519_pair()
    provider = make_provider("standard-webhooks", [public])
    signature = v1a(private, "msg_ed_1", int(NOW), ED_BODY)
    provider.verify(ed_headers(signature, prefix="webhook-"), ED_BODY, NOW)
    error = rejection(lambda: provider.verify(ed_headers(signature, prefix="svix-"), ED_BODY, NOW))
    assert (error.reason, error.detail) == (
        "missing_signature",
        "missing webhook-id/webhook-signature headers",
    )
    # svix reads both families.
    make_provider("svix", [public]).verify(ed_headers(signature, prefix="webhook-"), ED_BODY, NOW)


# -- stripe -----------------------------------------------------------------------------------------------


def stripe_accepts(body: bytes, header: str, secret: str) -> bool:
    try:
        stripe.Webhook.construct_event(body.decode(), header, secret)
    except stripe.SignatureVerificationError:
        return False
    return True


def test_we_accept_exactly_the_stripe_signature_headers_stripe_python_accepts() -> None:
    secret = "whsec_agreement"
    body = CASE["stripe"].body
    now = int(time.time())

    def v1(content: bytes, key: str = secret) -> str:
        return hex_hmac(key, content)

    good = v1(f"{now}.".encode() + body)
    headers = {
        "valid": f"t={now},v1={good}",
        "rotation: a wrong v1 first": f"t={now},v1={v1(b'x')},v1={good}",
        "with v0": f"t={now},v1={good},v0={v1(b'legacy')}",
        "only v0": f"t={now},v0={good}",
        "wrong secret": f"t={now},v1={v1(f'{now}.'.encode() + body, 'whsec_other')}",
        "keyed without whsec_": f"t={now},v1={v1(f'{now}.'.encode() + body, 'agreement')}",
        "other timestamp": f"t={now - 1},v1={good}",
        "too old": f"t={now - 1000},v1={v1(f'{now - 1000}.'.encode() + body)}",
        "no timestamp": f"v1={good}",
        # stripe-python reads every entry: ten others before them do not hide t= and v1=.
        "t and v1 past ten entries": ",".join([f"v0={v1(b'legacy')}"] * 10 + [f"t={now}", f"v1={good}"]),
        "v1 past ten entries": ",".join([f"t={now}"] + [f"v1={v1(b'x')}"] * 10 + [f"v1={good}"]),
        "timestamp not a number": f"t=soon,v1={good}",
        # stripe-python reads t= as a number and signs that number, not the header's text.
        "t= with leading zeros, signed as its number": f"t=00{now},v1={good}",
        "t= with leading zeros, signed as written": f"t=00{now},v1={v1(f'00{now}.'.encode() + body)}",
        "truncated": f"t={now},v1={good[:-2]}",
        "empty": "",
        "garbage": "garbage",
    }
    provider = make_provider("stripe", [secret])
    for label, header in headers.items():
        try:
            provider.verify({"stripe-signature": header}, body, time.time())
            ours = True
        except Rejected:
            ours = False
        assert ours == stripe_accepts(body, header, secret), label
    assert stripe_accepts(body, headers["valid"], secret)


def test_stripe_future_timestamps_are_refused_unlike_stripe_python() -> None:
    secret = CASE["stripe"].secrets[0]
    later = time.time() + 3600
    header = stripe_headers(secret, CASE["stripe"].body, later)["Stripe-Signature"]
    assert stripe_accepts(CASE["stripe"].body, header, secret)
    error = rejection(
        lambda: make_provider("stripe", [secret]).verify(
            {"stripe-signature": header}, CASE["stripe"].body, time.time()
        )
    )
    assert error.reason == "timestamp_out_of_tolerance"


def test_a_stripe_signature_with_two_different_timestamps_is_refused_as_ambiguous() -> None:
    # stripe-python reads the first t=, stripe-node the last: which one was signed cannot be told.
    secret = "whsec_two_timestamps"
    body = CASE["stripe"].body
    now = int(time.time())
    good = hex_hmac(secret, f"{now}.".encode() + body)
    provider = make_provider("stripe", [secret])
    for header in (
        f"t={now},v1={good},t={now - 60}",
        f"t={now - 60},t={now},v1={good}",
        f"t={now},v1={good}, t={now + 1},v1={good}",  # the header on two lines, joined
        ",".join([f"t={now}", f"v1={good}"] + [f"v0={good}"] * 10 + [f"t={now - 60}"]),
    ):
        error = rejection(lambda h=header: provider.verify({"stripe-signature": h}, body, time.time()))
        assert (error.status, error.reason) == (400, "repeated_header"), header
        assert "t=" in error.detail
    # The same t= twice (a proxy that repeats the header) names one timestamp, and is read as before.
    provider.verify({"stripe-signature": f"t={now},v1={good}, t={now},v1={good}"}, body, time.time())


def test_stripe_event_fields_and_keying() -> None:
    case = CASE["stripe"]
    provider = case.make()
    headers = case.headers()
    event = provider.parse(headers, case.body, json.loads(case.body), NOW)
    assert event.occurred_at == 1699999990.0
    # Keyed by the whole whsec_ string, not its base64-decoded bytes as Standard Webhooks would.
    digest = hex_hmac("whsec_stripe_one", f"{int(NOW)}.".encode() + case.body)
    assert headers["stripe-signature"] == f"t={int(NOW)},v1={digest}"
    error = rejection(lambda: provider.parse(headers, case.body, {"type": "x"}, NOW))
    assert error.reason == "missing_event_id"


# -- slack ---------------------------------------------------------------------------------------------------


def test_slack_payloads_without_event_id_are_identified_by_their_bytes() -> None:
    slack = PROVIDERS["slack"]
    challenge = dumps(
        {
            "token": "XXYYZZ",
            "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
            "type": "url_verification",
        }
    )
    first = slack.parse({}, challenge, json.loads(challenge), NOW)
    again = slack.parse({}, challenge, json.loads(challenge), NOW + 60)
    assert first.type == "url_verification" and first.occurred_at is None
    assert first.id == again.id == "sha256:" + hashlib.sha256(challenge).hexdigest()
    limited = dumps(
        {
            "token": "XXYYZZ",
            "team_id": "T1",
            "minute_rate_limited": 1518467820,
            "api_app_id": "A1",
            "type": "app_rate_limited",
        }
    )
    assert slack.parse({}, limited, json.loads(limited), NOW).type == "app_rate_limited"


def test_slack_event_callback_fields() -> None:
    case = CASE["slack"]
    event = PROVIDERS["slack"].parse(case.headers(), case.body, json.loads(case.body), NOW)
    assert (event.id, event.type, event.occurred_at) == ("Ev08MFMKH6", "app_mention", 1699999990.0)
    broken = {"type": "event_callback", "event_id": "Ev1", "event": "not an object"}
    error = rejection(lambda: PROVIDERS["slack"].parse({}, b"{}", broken, NOW))
    assert (error.status, error.reason) == (400, "missing_event_type")


# -- github and shopify -----------------------------------------------------------------------------------------


def test_github_signature_entries_are_capped() -> None:
    case = CASE["github"]
    good = case.headers()["x-hub-signature-256"]
    junk = ", ".join(f"sha256={n:064x}" for n in range(9))
    PROVIDERS["github"].verify({"x-hub-signature-256": f"{junk}, {good}"}, case.body, NOW)
    error = rejection(
        lambda: PROVIDERS["github"].verify(
            {"x-hub-signature-256": f"{junk}, sha256=00, {good}"}, case.body, NOW
        )
    )
    assert error.reason == "invalid_signature"


def test_github_hex_is_read_in_any_case_with_each_secret() -> None:
    case = CASE["github"]
    for secret in case.secrets:
        digest = hex_hmac(secret, case.body)
        for spelling in (
            f"sha256={digest.upper()}",
            f"SHA256={digest}",
            f"sha256=00, SHA256={digest.upper()}",
        ):
            PROVIDERS["github"].verify({"x-hub-signature-256": spelling}, case.body, NOW)
    wrong = hex_hmac(case.secrets[0], case.body + b" ").upper()
    error = rejection(
        lambda: PROVIDERS["github"].verify({"x-hub-signature-256": f"SHA256={wrong}"}, case.body, NOW)
    )
    assert (error.status, error.reason) == (401, "invalid_signature")


def test_github_sha1_alone_is_not_enough_and_headers_name_the_event() -> None:
    case = CASE["github"]
    sha1 = {"x-hub-signature": "sha1=" + hex_hmac(case.secrets[0], case.body, "sha1")}
    assert reason_of(lambda: PROVIDERS["github"].verify(sha1, case.body, NOW)) == "missing_signature"
    headers = case.headers()
    event = PROVIDERS["github"].parse(headers, case.body, json.loads(case.body), NOW)
    assert event.payload["action"] == "opened" and event.occurred_at is None
    for header, reason in (
        ("x-github-delivery", "missing_event_id"),
        ("x-github-event", "missing_event_type"),
    ):
        without = {name: value for name, value in headers.items() if name != header}
        error = rejection(lambda h=without: PROVIDERS["github"].parse(h, case.body, {}, NOW))
        assert (error.status, error.reason) == (400, reason)


@pytest.mark.parametrize(
    ("header", "reason", "named"),
    [
        ("x-github-delivery", "missing_event_id", "the X-GitHub-Delivery header"),
        ("x-github-event", "missing_event_type", "the X-GitHub-Event header"),
    ],
)
def test_github_headers_too_long_to_send_on_are_refused(header: str, reason: str, named: str) -> None:
    # The id and the type are sent on in headers and the id is indexed by the store action: past the limit,
    # every delivery of the event would be dead.
    case = CASE["github"]
    headers = {**case.headers(), header: "f" * 513}
    error = rejection(lambda: PROVIDERS["github"].parse(headers, case.body, json.loads(case.body), NOW))
    assert (error.status, error.reason) == (400, reason)
    assert error.detail == f"{named} is 513 bytes long; the limit is 512 bytes of UTF-8"
    headers[header] = "f" * 512
    assert PROVIDERS["github"].parse(headers, case.body, json.loads(case.body), NOW)


def test_a_standard_webhooks_id_too_long_to_send_on_is_refused() -> None:
    case = CASE["standard-webhooks"]
    msg_id = "msg_" + "x" * 509
    timestamp = datetime.fromtimestamp(NOW, UTC)
    signature = standardwebhooks.Webhook(case.secrets[0]).sign(msg_id, timestamp, case.body)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(NOW)), "webhook-signature": signature}
    provider = PROVIDERS["standard-webhooks"]
    provider.verify(headers, case.body, NOW)
    error = rejection(lambda: provider.parse(headers, case.body, json.loads(case.body), NOW))
    assert (error.status, error.reason) == (400, "missing_event_id")
    assert error.detail == "the webhook-id header is 513 bytes long; the limit is 512 bytes of UTF-8"


def test_github_sender_shorthand_splits_the_action() -> None:
    provider = make_provider("github", ["s"])
    body = orjson.dumps(provider.sample_payload("issues.opened", "d-1", {"issue": {"number": 1}}, NOW))
    headers = provider.sign(body, "d-1", NOW)
    assert headers["X-GitHub-Event"] == "issues" and orjson.loads(body)["action"] == "opened"
    assert headers["X-Hub-Signature"] == "sha1=" + hex_hmac("s", body, "sha1")


def test_shopify_fields() -> None:
    case = CASE["shopify"]
    headers = case.headers()
    event = PROVIDERS["shopify"].parse(headers, case.body, json.loads(case.body), NOW)
    assert event.occurred_at == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC).timestamp()
    # The event id is the same on every delivery of the event; an older delivery without it has the webhook id.
    del headers["x-shopify-event-id"]
    assert (
        PROVIDERS["shopify"].parse(headers, case.body, {}, NOW).id == "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"
    )
    del headers["x-shopify-topic"]
    assert reason_of(lambda: PROVIDERS["shopify"].parse(headers, case.body, {}, NOW)) == "missing_event_type"


# -- hmac ----------------------------------------------------------------------------------------------------


def test_hmac_variants() -> None:
    body = dumps({"id": "evt_9", "type": "thing.done"})
    sha1 = make_provider("hmac", ["k1"], header="X-Sig", algorithm="sha1", encoding="base64")
    sha1.verify({"x-sig": b64(hmac.new(b"k1", body, "sha1").digest())}, body, NOW)
    assert sha1.parse({}, body, json.loads(body), NOW).id == "evt_9"
    assert reason_of(lambda: sha1.verify({"x-sig": hex_hmac("k1", body, "sha1")}, body, NOW)) == (
        "invalid_signature"
    )

    signed = make_provider(
        "hmac",
        ["k2"],
        header="X-Sig",
        algorithm="sha512",
        timestamp_header="X-Time",
        signed_content="v1:{id}:{timestamp}:{body}",
        id_from="header:X-Id",
        type_from="header:X-Type",
    )
    millis = str(int(NOW * 1000))
    headers = {
        "x-id": "id-7",
        "x-type": "thing.done",
        "x-time": millis,
        "x-sig": hex_hmac("k2", f"v1:id-7:{millis}:".encode() + body, "sha512"),
    }
    signed.verify(headers, body, NOW)
    event = signed.parse(headers, body, "not even an object", NOW)
    assert (event.id, event.type, event.occurred_at) == ("id-7", "thing.done", NOW)
    assert reason_of(lambda: signed.verify({**headers, "x-id": "id-8"}, body, NOW)) == "invalid_signature"
    no_id = {name: value for name, value in headers.items() if name != "x-id"}
    assert reason_of(lambda: signed.verify(no_id, body, NOW)) == "missing_signature"
    assert reason_of(lambda: signed.verify(headers, body, NOW + 400)) == "timestamp_out_of_tolerance"
    assert reason_of(lambda: signed.verify({**headers, "x-time": "soon"}, body, NOW)) == "invalid_timestamp"
    # The sender's side puts id and type in the configured headers.
    sent = orjson.dumps(signed.sample_payload("thing.done", "id-9", {"a": 1}, NOW))
    sent_headers = lower(signed.sign(sent, "id-9", NOW))
    assert (sent_headers["x-id"], sent_headers["x-type"]) == ("id-9", "thing.done")
    signed.verify(sent_headers, sent, NOW)


def test_hmac_prefix_with_a_space() -> None:
    """`Authorization: HMAC <hex>`: a prefix with a space in it. Entries are separated by whitespace, so
    such a header holds one signature, compared whole; what `hookyard send` signs is accepted."""
    provider = make_provider("hmac", ["k"], header="Authorization", prefix="HMAC ")
    body = dumps({"id": "evt_1", "type": "thing.done"})
    provider.verify({"authorization": "HMAC " + hex_hmac("k", body)}, body, NOW)
    provider.verify(lower(provider.sign(body, "evt_1", NOW)), body, NOW)
    for value in (hex_hmac("k", body), "HMAC  " + hex_hmac("k", body), "HMAC " + hex_hmac("k", body + b" ")):
        assert reason_of(lambda v=value: provider.verify({"authorization": v}, body, NOW)) == (
            "invalid_signature"
        )


def test_hex_signature_prefixes_are_matched_in_either_case_over_ascii_only() -> None:
    digest = hashlib.sha256(b"x").digest()
    assert hex_digest("SHA256=" + digest.hex().upper(), "sha256=") == digest
    # Unicode's lower() maps the Kelvin sign to `k` and `İ` to `i̇`: neither is the same text as ASCII.
    assert hex_digest("k=" + digest.hex(), "\u212a=") is None
    assert hex_digest("\u212a=" + digest.hex(), "k=") is None
    assert hex_digest("\u0130=" + digest.hex(), "i=") is None


def test_hmac_missing_payload_fields_are_400s() -> None:
    acme = PROVIDERS["hmac"]
    headers = VALID["hmac"]
    assert reason_of(lambda: acme.parse(headers, b"[]", [1], NOW)) == "invalid_payload"
    error = rejection(lambda: acme.parse(headers, b"{}", {"event": {}}, NOW))
    assert (error.status, error.reason, error.detail) == (
        400,
        "missing_event_type",
        "no event type at json:event.type",
    )


@pytest.mark.parametrize("index", ["--1", "²", "-²", "+0"])
def test_hmac_a_path_part_that_only_looks_like_an_index_finds_nothing(index: str) -> None:
    # str.isdigit() is true for "²", and "--1" is digits once its dashes are stripped, yet int() refuses
    # both: reading such a path through a list raised ValueError, a 500 for every webhook of the source.
    acme = make_provider("hmac", ["s"], header="X-Sig", id_from=f"json:items.{index}")
    payload = {"items": ["evt_1"], "type": "t"}
    error = rejection(lambda: acme.parse({}, b"{}", payload, NOW))
    assert (error.status, error.reason) == (400, "missing_event_id")
    assert make_provider("hmac", ["s"], header="X-Sig", id_from="json:items.-1").parse(
        {}, b"{}", payload, NOW
    ).id == ("evt_1")


# -- token and basic -------------------------------------------------------------------------------------------


def test_token_in_a_custom_header_is_never_stored() -> None:
    provider = make_provider(
        "token", ["glpat-secret", "glpat-next"], header="X-Gitlab-Token", type_from="header:X-Gitlab-Event"
    )
    body = dumps({"id": 5, "object_kind": "push"})
    headers = {"x-gitlab-token": "glpat-next", "x-gitlab-event": "Push Hook"}
    provider.verify(headers, body, NOW)
    event = provider.parse(headers, body, json.loads(body), NOW)
    assert (event.id, event.type) == ("5", "Push Hook")
    # The ingress leaves the provider's secret headers out of what it stores (tests/test_ingress.py).
    assert provider.secret_headers == {"x-gitlab-token"}
    assert reason_of(lambda: provider.verify({"x-gitlab-token": "Bearer glpat-next"}, body, NOW)) == (
        "invalid_signature"
    )
    assert provider.sign(body, "5", NOW)["x-gitlab-token"] == "glpat-secret"


def test_token_and_basic_schemes() -> None:
    token, basic = PROVIDERS["token"], PROVIDERS["basic"]
    body = CASE["token"].body
    token.verify({"authorization": "bearer   tok_second "}, body, NOW)
    for value in ("Basic tok_first", "Bearer", "Bearer tok_first tok_second", "tok_first", "Bearer tok_firs"):
        assert reason_of(lambda v=value: token.verify({"authorization": v}, body, NOW)) == "invalid_signature"
    basic.verify({"authorization": "basic " + b64(b"bob:s3cret:with:colons")}, body, NOW)
    for value in ("Bearer " + b64(b"alice:first password"), "Basic not-base64!", "Basic " + b64(b"alice:")):
        assert reason_of(lambda v=value: basic.verify({"authorization": v}, body, NOW)) == "invalid_signature"
    # Nothing binds the body to these schemes: a changed body is not noticed (hence the docs' warning).
    token.verify(CASE["token"].headers(), body + b" ", NOW)


def test_basic_refuses_a_secret_with_an_empty_password(tmp_path: Path) -> None:
    """`user:${PASSWORD_NEXT:-}` with the variable unset (or set but empty) leaves `user:`: a credential
    anyone can send. It is refused when the config loads, not accepted as an empty password."""
    config = gateway_config(tmp_path)
    config["sources"]["erp"] = {
        "path": "/webhooks/erp",
        "provider": "basic",
        "secrets": ["hookyard:${ERP_WEBHOOK_PASSWORD}", "hookyard:${ERP_WEBHOOK_PASSWORD_NEXT:-}"],
    }
    parsed = parse_config(yaml.safe_dump(config), environ={"ERP_WEBHOOK_PASSWORD": "s3cret"})
    with pytest.raises(ConfigError) as raised:
        RouteTable.build(parsed, registry())
    assert raised.value.errors == [
        "sources.erp.secrets[1] has an empty password: anyone could send it "
        "(an unset ${VAR:-} leaves `user:`)"
    ]
    assert not any("s3cret" in error for error in raised.value.errors)


# -- configuration errors name their place ------------------------------------------------------------------------


def config_errors(tmp_path: Path, **source: Any) -> list[str]:
    config = gateway_config(tmp_path)
    config["sources"]["acme"] = {"path": "/webhooks/acme", **source}
    with pytest.raises(ConfigError) as raised:
        RouteTable.build(parse_config(yaml.safe_dump(config)), registry())
    return raised.value.errors


HMAC = {"provider": "hmac"}
MISCONFIGURED: dict[str, tuple[dict[str, Any], str]] = {
    "hmac-algorithm": (
        {**HMAC, "options": {"header": "X-Sig", "algorithm": "md5"}},
        "sources.acme.options.algorithm: Input should be 'sha1', 'sha256' or 'sha512'",
    ),
    "hmac-no-header": (
        {**HMAC, "options": {"algorithm": "sha1"}},
        "sources.acme.options.header: field required",
    ),
    "hmac-header-name": (
        {**HMAC, "options": {"header": "X Sig"}},
        "sources.acme.options.header: 'X Sig' is not an HTTP header name",
    ),
    "hmac-encoding": (
        {**HMAC, "options": {"header": "X-Sig", "encoding": "base32"}},
        "sources.acme.options.encoding: Input should be 'hex' or 'base64'",
    ),
    "hmac-unknown-option": (
        {**HMAC, "options": {"header": "X-Sig", "digest": "sha1"}},
        "sources.acme.options.digest: unknown key",
    ),
    "hmac-unsigned-body": (
        {**HMAC, "options": {"header": "X-Sig", "signed_content": "{timestamp}"}},
        "sources.acme.options.signed_content: must include {body}: otherwise the body is not signed",
    ),
    "hmac-placeholder": (
        {**HMAC, "options": {"header": "X-Sig", "signed_content": "{body}{nonce}"}},
        "sources.acme.options.signed_content: unknown placeholder {nonce}; use {body}, {timestamp} or {id}",
    ),
    "hmac-timestamp-without-header": (
        {**HMAC, "options": {"header": "X-Sig", "signed_content": "{timestamp}.{body}"}},
        "sources.acme.options: signed_content uses {timestamp} exactly when timestamp_header is set",
    ),
    "hmac-id-from-body": (
        {**HMAC, "options": {"header": "X-Sig", "signed_content": "{id}.{body}"}},
        "sources.acme.options: signed_content uses {id}: set id_from to header:<Name>",
    ),
    "hmac-prefix-not-ascii": (
        # U+212A KELVIN SIGN: Unicode's lower() makes it `k`, so it matched a `k=` it does not say.
        {**HMAC, "options": {"header": "X-Sig", "prefix": "\u212a="}},
        "sources.acme.options.prefix: '\u212a=' is not ASCII: a signature's prefix is ASCII text, such as sha256=",
    ),
    "hmac-id-from": (
        {**HMAC, "options": {"header": "X-Sig", "id_from": "xpath:/id"}},
        "sources.acme.options.id_from: 'xpath:/id' must be header:<Header-Name> or json:<dotted.path>",
    ),
    "token-secret": (
        {"provider": "token", "secrets": ["has a space"]},
        "sources.acme.secrets[0] cannot be sent in the authorization header",
    ),
    "token-header": (
        {"provider": "token", "options": {"header": "X:Token"}},
        "sources.acme.options.header: 'X:Token' is not an HTTP header name",
    ),
    "token-scheme": (
        {"provider": "token", "options": {"scheme": "Bear er"}},
        "sources.acme.options: scheme 'Bear er' must be one word",
    ),
    "token-scheme-not-ascii": (
        # U+212A KELVIN SIGN: Unicode's lower() makes it `k`, so `Token` matched a scheme it does not say.
        {"provider": "token", "options": {"scheme": "\u212aey"}},
        "sources.acme.options: scheme '\u212aey' is not printable ASCII",
    ),
    "basic-no-user": (
        {"provider": "basic", "secrets": ["ok:fine", "just-a-password"]},
        "sources.acme.secrets[1] must be user:password",
    ),
    "basic-empty-user": (
        {"provider": "basic", "secrets": [":no-user"]},
        "sources.acme.secrets[0] must be user:password",
    ),
    "basic-options": (
        {"provider": "basic", "options": {"header": "X-Auth"}},
        "sources.acme.options.header: unknown key",
    ),
    "svix-whpk": (
        {"provider": "svix", "secrets": [SVIX_SECRET, "whpk_c2hvcnQ="]},
        "sources.acme.secrets[1] is not a whpk_ ed25519 key",
    ),
    "standard-webhooks-whsk": (
        {"provider": "standard-webhooks", "secrets": ["whsk_!!"]},
        "sources.acme.secrets[0] is not a whsk_ ed25519 key",
    ),
}


@pytest.mark.parametrize(("source", "expected"), MISCONFIGURED.values(), ids=MISCONFIGURED.keys())
def test_misconfigured_sources_name_the_place(tmp_path: Path, source: dict[str, Any], expected: str) -> None:
    source = {"secrets": ["configured-secret"], **source}
    errors = config_errors(tmp_path, **source)
    assert len(errors) == 1 and errors[0].startswith(expected), errors
    assert not any(secret in errors[0] for secret in source["secrets"])


# -- the copy-paste snippets of docs/providers.md ----------------------------------------------------------------

PROVIDERS_DOC = Path(__file__).resolve().parent.parent / "docs" / "providers.md"
SNIPPETS = [
    block
    for block in re.findall(r"```yaml\n(.*?)```", PROVIDERS_DOC.read_text(), re.DOTALL)
    if block.startswith("sources:")
]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[block.split("\n")[1].strip(" :") for block in SNIPPETS])
def test_documented_routes_yaml_snippets_load_and_verify(snippet: str, tmp_path: Path) -> None:
    """Each snippet is a valid routes.yaml, and its source accepts what `hookyard send` signs for it."""
    environ = {
        name: SVIX_SECRET if name.startswith(("CONSIGNEASE", "BILLING")) else f"secret-{name.lower()}"
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", snippet)
    }
    config = parse_config(f"storage: {{url: 'sqlite:///{tmp_path}/db.sqlite'}}\n{snippet}", environ=environ)
    table = RouteTable.build(config, registry())
    assert table.endpoints
    for endpoint in table.endpoints.values():
        _, body, headers = build_request(table, endpoint.name, "order.created", {"id": "o-1"})
        now = time.time()
        endpoint.provider.verify(lower(headers), body, now)
        endpoint.provider.parse(lower(headers), body, orjson.loads(body), now)


def test_the_basic_snippet_is_documented() -> None:
    assert any("provider: basic" in snippet for snippet in SNIPPETS)


# -- through the real ingress, as `hookyard send` sends ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningGateway, Downstream]]:
    tmp_path = tmp_path_factory.mktemp("providers")
    with downstream_server() as downstream:
        config = gateway_config(tmp_path, downstream.url)
        for case in CASES:
            config["sources"][case.provider] = {
                "path": f"/webhooks/{case.provider}",
                "provider": case.provider,
                "secrets": case.secrets,
                "options": case.options,
            }
        config["sources"]["none"] = {"path": "/webhooks/none", "provider": "none", "insecure": True}
        config["routes"].append(
            {
                "name": "opened-issues",
                "source": "github",
                "events": ["issues"],
                "filter": {"payload.action": "opened"},
                "actions": [
                    {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/hooks/github"}}
                ],
            }
        )
        with RunningGateway(config) as running:
            yield running, downstream


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hookyard_send_requests_are_accepted_by_the_gateway(
    gw: tuple[RunningGateway, Downstream], case: Case
) -> None:
    running, _ = gw
    path, body, headers = build_request(
        running.gateway.table, case.provider, case.event_type, event_id=f"evt-{case.provider}"
    )
    first = running.post(path, body, headers)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "accepted"
    again = running.post(path, body, headers)
    assert again.json() == {"id": first.json()["id"], "status": "duplicate"}
    tampered = running.post(path, body.replace(b"}", b" }", 1), headers)
    if case.binds_body:
        assert (tampered.status_code, tampered.json()["error"]) == (401, "invalid_signature")


# Providers whose event id comes from a header (svix-id, webhook-id, X-GitHub-Delivery, X-Shopify-Event-Id,
# and hmac's id_from: header:X-Acme-Delivery).
HEADER_IDS = ["svix", "standard-webhooks", "github", "shopify", "hmac"]


@pytest.mark.parametrize("provider", HEADER_IDS)
def test_an_id_sent_in_a_header_as_utf8_is_that_text(
    gw: tuple[RunningGateway, Downstream], provider: str
) -> None:
    # The listener reads a header one byte a character (latin-1): the id "évt_事件" sent in UTF-8 was
    # stored, answered and sent on (Idempotency-Key, in UTF-8) as "Ã©vt_äº\x8bä»¶", an id its sender never
    # wrote, that the app could not match with the provider's.
    running, _ = gw
    event_id = f"évt_事件_{provider}"
    path, body, headers = build_request(
        running.gateway.table, provider, CASE[provider].event_type, event_id=event_id
    )
    response = running.client.post(
        running.url + path, content=body, headers=[(name, value.encode()) for name, value in headers.items()]
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"id": event_id, "status": "accepted"}
    assert stored(running, event_id, provider).id == event_id


def test_a_route_on_the_plain_github_event_with_an_action_filter(
    gw: tuple[RunningGateway, Downstream],
) -> None:
    running, downstream = gw
    case = CASE["github"]
    for action, delivery in (("closed", "gh-closed"), ("opened", "gh-opened")):
        body = dumps({"action": action, "issue": {"number": 1}})
        headers = {**github_headers(case.secrets[1], body, NOW), "X-GitHub-Delivery": delivery}
        assert running.post("/webhooks/github", body, headers).json()["status"] == "accepted"
    [forwarded] = downstream.wait_for(1, "/hooks/github")
    assert json.loads(forwarded.body)["action"] == "opened"


# (source, event type) for `hookyard send` and `hookyard sign`: one source per provider. `consignly` and
# `consignease` (svix) come from gateway_config; `none` is the insecure source added above.
SEND = [(case.provider, case.event_type) for case in CASES] + [
    ("consignly", "consignment.created"),
    ("none", "test.ping"),
]


def test_send_covers_every_provider(gw: tuple[RunningGateway, Downstream]) -> None:
    running, _ = gw
    providers = {running.gateway.config.sources[source].provider for source, _ in SEND}
    assert providers == set(registry().providers)


def write_config(running: RunningGateway, path: Path, **source_changes: dict[str, Any]) -> Path:
    """The running gateway's config as a file for the CLI, with some sources changed."""
    config = running.gateway.config.model_dump(mode="json", by_alias=True)
    for name, changes in source_changes.items():
        config["sources"][name].update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


def hookyard(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def stored(running: RunningGateway, event_id: str, source: str) -> Event:
    details = asyncio.run_coroutine_threadsafe(
        running.gateway.storage.get_event(event_id, source), running.loop
    ).result(10)
    assert len(details) == 1, (event_id, source)
    return details[0].event


@pytest.mark.parametrize(("source", "event_type"), SEND, ids=[source for source, _ in SEND])
def test_hookyard_send_command_round_trip(
    gw: tuple[RunningGateway, Downstream], source: str, event_type: str, tmp_path: Path
) -> None:
    """`hookyard send SOURCE` signs as the provider would, using the configured secret."""
    running, _ = gw
    config_path = write_config(running, tmp_path / "routes.yaml")
    event_id = f"evt-send-{source}"
    result = hookyard(
        "send", source, "--type", event_type, "--id", event_id, "-c", config_path, "--url", running.url
    )
    assert result.exit_code == 0, result.output
    assert result.output == f'200 {{"id":"{event_id}","status":"accepted"}}\n'
    event = stored(running, event_id, source)
    assert event.type == event_type
    # Only `provider: none` checks nothing: its events are kept marked as unverified.
    assert event.verified is (source != "none")


@pytest.mark.parametrize("source", HEADER_IDS)
def test_hookyard_send_an_id_that_is_not_ascii(
    gw: tuple[RunningGateway, Downstream], source: str, tmp_path: Path
) -> None:
    # Sent in a header, the id was refused by httpx's ASCII encoding: "cannot reach URL: 'ascii' codec can't
    # encode character", of a gateway that was there. It goes in UTF-8, as the gateway reads it.
    running, _ = gw
    config_path = write_config(running, tmp_path / "routes.yaml")
    event_id = f"évt_送_{source}"
    event_type = CASE[source].event_type
    result = hookyard(
        "send", source, "--type", event_type, "--id", event_id, "-c", config_path, "--url", running.url
    )
    assert result.exit_code == 0, result.output
    assert result.output == f'200 {{"id":"{event_id}","status":"accepted"}}\n'
    assert stored(running, event_id, source).id == event_id


@pytest.mark.parametrize(("source", "event_type"), SEND, ids=[source for source, _ in SEND])
def test_hookyard_sign_prints_a_curl_command_that_is_accepted(
    gw: tuple[RunningGateway, Downstream], source: str, event_type: str, tmp_path: Path
) -> None:
    running, _ = gw
    config_path = write_config(running, tmp_path / "routes.yaml")
    event_id = f"evt-sign-{source}"
    result = hookyard(
        "sign", source, "--type", event_type, "--id", event_id, "-c", config_path, "--url", running.url
    )
    assert result.exit_code == 0, result.output
    # Read the command as a shell would, then send exactly what it says.
    command = shlex.split(result.stdout)
    assert command[:5] == ["curl", "-sS", "-X", "POST", f"{running.url}/webhooks/{source}"]
    options = list(zip(command[5::2], command[6::2], strict=True))
    headers = [tuple(value.split(": ", 1)) for option, value in options if option == "-H"]
    [body] = [value for option, value in options if option == "--data-binary"]
    assert ("content-type", "application/json") in headers
    response = httpx.post(command[4], content=body.encode(), headers=headers)
    assert (response.status_code, response.json()) == (200, {"id": event_id, "status": "accepted"})
    assert stored(running, event_id, source).body == body.encode()


def test_send_count_and_concurrency(gw: tuple[RunningGateway, Downstream], tmp_path: Path) -> None:
    running, _ = gw
    config_path = write_config(running, tmp_path / "routes.yaml")
    accepted = running.metric("hookyard_webhooks_received_total", source="consignly", outcome="accepted")
    result = hookyard(
        "send", "consignly", "--type", "101", "--count", "12", "--concurrency", "4", "-c", config_path,
        "--url", running.url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        r"sent 12 in \d+\.\d\ds \(\d+/s\); 200: 12; latency p50 \d+\.\d ms, p99 \d+\.\d ms\n", result.output
    ), result.output
    # Twelve events, each with its own id: none was a duplicate of another.
    after = running.metric("hookyard_webhooks_received_total", source="consignly", outcome="accepted")
    assert after - accepted == 12


def test_send_count_exits_1_unless_every_answer_is_2xx(
    gw: tuple[RunningGateway, Downstream], tmp_path: Path
) -> None:
    running, _ = gw
    # Signed with a secret the gateway does not have: every answer is a 401.
    config_path = write_config(running, tmp_path / "routes.yaml", consignly={"secrets": ["not-configured"]})
    result = hookyard(
        "send", "consignly", "--type", "101", "--count", "3", "--concurrency", "2", "-c", config_path,
        "--url", running.url,
    )  # fmt: skip
    assert result.exit_code == 1
    assert re.match(r"sent 3 in .*; 401: 3; latency ", result.output), result.output
    single = hookyard("send", "consignly", "--type", "101", "-c", config_path, "--url", running.url)
    assert single.exit_code == 1 and single.output.startswith("401 "), single.output
    both = hookyard("send", "consignly", "--type", "101", "--count", "2", "--id", "x", "-c", config_path)
    assert both.exit_code == 2 and "--id names one event" in both.output


def test_send_data_as_json_and_from_a_file(gw: tuple[RunningGateway, Downstream], tmp_path: Path) -> None:
    running, _ = gw
    config_path = write_config(running, tmp_path / "routes.yaml")
    data = {"consignmentId": "c-42", "status": 2, "note": "Zoë 🚚"}
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(data), encoding="utf-8")
    for event_id, argument in (("evt-data-json", json.dumps(data)), ("evt-data-file", f"@{data_file}")):
        result = hookyard(
            "send", "consignly", "--type", "ConsignmentCreated", "--data", argument, "--id", event_id,
            "-c", config_path, "--url", running.url,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert stored(running, event_id, "consignly").payload["data"] == data
    bad = hookyard("send", "consignly", "--type", "101", "--data", "{not json", "-c", config_path)
    assert bad.exit_code == 2 and "--data" in bad.output and "not JSON" in bad.output


def test_sample_payloads_for_consignease_and_consignly(
    gw: tuple[RunningGateway, Downstream], tmp_path: Path
) -> None:
    """Without --data, user.created and consignment.created carry a realistic sample, shaped as each
    provider sends it (docs/providers.md, `hookyard send`), and reach the app through the demo routes."""
    running, downstream = gw
    config_path = write_config(running, tmp_path / "routes.yaml")
    for source, event_type in (("consignease", "user.created"), ("consignly", "consignment.created")):
        result = hookyard(
            "send", source, "--type", event_type, "--id", f"evt-sample-{source}", "-c", config_path,
            "--url", running.url,
        )  # fmt: skip
        assert result.exit_code == 0, result.output

    user = stored(running, "evt-sample-consignease", "consignease")
    assert user.type == "user.created"
    assert set(user.payload) == {"data", "object", "type", "timestamp", "instance_id"}
    assert (user.payload["object"], user.payload["type"]) == ("event", "user.created")
    assert isinstance(user.payload["timestamp"], int) and user.payload["timestamp"] > 10**12  # milliseconds
    person = user.payload["data"]
    assert person["id"].startswith("user_") and person["object"] == "user"
    assert person["first_name"] and person["last_name"]
    assert "@" in person["email_addresses"][0]["email_address"]
    [forwarded] = [r for r in downstream.wait_for(1, "/hooks/users") if r.json()["data"] == person]
    assert forwarded.headers["x-hookyard-event-id"] == "evt-sample-consignease"

    consignment = stored(running, "evt-sample-consignly", "consignly")
    assert consignment.type == "consignment.created"
    assert set(consignment.payload) == {"id", "type", "created", "data", "operationId"}
    assert consignment.payload["id"] == "evt-sample-consignly"
    assert consignment.payload["type"] == "consignment.created"
    assert consignment.occurred_at is not None  # `created` is an ISO 8601 time
    shipment = consignment.payload["data"]
    assert str(uuid.UUID(shipment["consignmentId"])) == shipment["consignmentId"]
    assert isinstance(shipment["status"], int) and shipment["consignmentNumber"] and shipment["carrier"]
    wait_until(
        lambda: any(
            r.headers["x-hookyard-event-id"] == "evt-sample-consignly"
            for r in downstream.received("/hooks/consignments")
        )
    )


@pytest.mark.parametrize("event_type", ["ConsignmentStatusUpdated", "112", "consignment.delivered"])
def test_every_consignment_sample_names_its_consignment(
    gw: tuple[RunningGateway, Downstream], tmp_path: Path, event_type: str
) -> None:
    """Every consignment event Consignly sends carries data.consignmentId, which `acknowledge` reports on:
    a sample without it would be skipped there, as no real delivery is."""
    running, _ = gw
    config_path = write_config(running, tmp_path / "routes.yaml")
    event_id = f"evt-sample-{event_type}"
    result = hookyard(
        "send", "consignly", "--type", event_type, "--id", event_id, "-c", config_path, "--url", running.url
    )
    assert result.exit_code == 0, result.output
    shipment = stored(running, event_id, "consignly").payload["data"]
    assert str(uuid.UUID(shipment["consignmentId"])) == shipment["consignmentId"]
