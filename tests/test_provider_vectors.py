"""Known-answer tests: examples published by GitHub, Slack and Standard Webhooks, each first recomputed here
with hmac / cryptography (so a typo in a vector fails loudly instead of proving nothing), then checked
against our providers, in both directions where the provider signs."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from slack_sdk.signature import SignatureVerifier

from gateway.config import Source
from gateway.plugins import registry
from gateway.providers import Provider, Rejected


def provider(name: str, secrets: list[str], **options: Any) -> Provider:
    source = Source.model_validate({"path": "/p", "provider": name, "secrets": secrets, "options": options})
    return registry().providers[name]("vectors", source)


# -- GitHub: docs.github.com, "Validating webhook deliveries" --------------------------------------------

GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_github_documented_example() -> None:
    digest = hmac.new(GITHUB_SECRET.encode(), GITHUB_BODY, hashlib.sha256).hexdigest()
    assert f"sha256={digest}" == GITHUB_SIGNATURE

    github = provider("github", [GITHUB_SECRET])
    github.verify({"x-hub-signature-256": GITHUB_SIGNATURE}, GITHUB_BODY, 0.0)
    assert github.sign(GITHUB_BODY, "d1", 0.0)["X-Hub-Signature-256"] == GITHUB_SIGNATURE
    with pytest.raises(Rejected) as rejected:
        provider("github", ["It's a secret to everybody"]).verify(
            {"x-hub-signature-256": GITHUB_SIGNATURE}, GITHUB_BODY, 0.0
        )
    assert rejected.value.reason == "invalid_signature"


# -- Slack: docs.slack.dev, "Verifying requests from Slack" ---------------------------------------------

SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TIMESTAMP = "1531420618"
SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"


def test_slack_documented_example() -> None:
    basestring = f"v0:{SLACK_TIMESTAMP}:".encode() + SLACK_BODY
    assert "v0=" + hmac.new(SLACK_SECRET.encode(), basestring, hashlib.sha256).hexdigest() == SLACK_SIGNATURE
    # Slack's own SDK agrees.
    verifier = SignatureVerifier(SLACK_SECRET)
    assert verifier.generate_signature(timestamp=SLACK_TIMESTAMP, body=SLACK_BODY) == SLACK_SIGNATURE

    slack = provider("slack", [SLACK_SECRET])
    headers = {"x-slack-signature": SLACK_SIGNATURE, "x-slack-request-timestamp": SLACK_TIMESTAMP}
    # The example is a slash command (form-encoded): the signature covers any bytes, JSON or not.
    slack.verify(headers, SLACK_BODY, float(SLACK_TIMESTAMP) + 30)
    with pytest.raises(Rejected) as rejected:
        slack.verify(headers, SLACK_BODY, float(SLACK_TIMESTAMP) + 3600)
    assert rejected.value.reason == "timestamp_out_of_tolerance"


# -- Standard Webhooks: the reference libraries' signing tests ------------------------------------------------

MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
PAYLOAD = b'{"test": 2432232314}'
SYMMETRIC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SYMMETRIC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
ASYMMETRIC_SECRET = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk="
ASYMMETRIC_SIGNATURE = (
    "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag=="
)
SIGNED = f"{MSG_ID}.{TIMESTAMP}.".encode() + PAYLOAD


def standard_headers(prefix: str, signature: str) -> dict[str, str]:
    return {f"{prefix}id": MSG_ID, f"{prefix}timestamp": str(TIMESTAMP), f"{prefix}signature": signature}


@pytest.mark.parametrize(("name", "prefix"), [("svix", "svix-"), ("standard-webhooks", "webhook-")])
def test_standard_webhooks_symmetric_vector(name: str, prefix: str) -> None:
    key = base64.b64decode(SYMMETRIC_SECRET.removeprefix("whsec_"))
    assert "v1," + base64.b64encode(hmac.new(key, SIGNED, hashlib.sha256).digest()).decode() == (
        SYMMETRIC_SIGNATURE
    )

    chosen = provider(name, [SYMMETRIC_SECRET])
    chosen.verify(standard_headers(prefix, SYMMETRIC_SIGNATURE), PAYLOAD, TIMESTAMP)
    assert chosen.sign(PAYLOAD, MSG_ID, TIMESTAMP) == standard_headers(prefix, SYMMETRIC_SIGNATURE)


@pytest.mark.parametrize(("name", "prefix"), [("svix", "svix-"), ("standard-webhooks", "webhook-")])
def test_standard_webhooks_asymmetric_vector(name: str, prefix: str) -> None:
    seed = base64.b64decode(ASYMMETRIC_SECRET.removeprefix("whsk_"))
    private = Ed25519PrivateKey.from_private_bytes(seed)
    assert "v1a," + base64.b64encode(private.sign(SIGNED)).decode() == ASYMMETRIC_SIGNATURE
    public = "whpk_" + base64.b64encode(private.public_key().public_bytes_raw()).decode()

    # The sender's side, holding only the private key, signs exactly as the reference library does...
    signer = provider(name, [ASYMMETRIC_SECRET])
    assert signer.sign(PAYLOAD, MSG_ID, TIMESTAMP) == standard_headers(prefix, ASYMMETRIC_SIGNATURE)
    # ...and a receiver holding only the public key accepts it.
    provider(name, [public]).verify(standard_headers(prefix, ASYMMETRIC_SIGNATURE), PAYLOAD, TIMESTAMP)
    with pytest.raises(Rejected) as rejected:
        provider(name, [public]).verify(
            standard_headers(prefix, ASYMMETRIC_SIGNATURE), PAYLOAD + b" ", TIMESTAMP
        )
    assert rejected.value.reason == "invalid_signature"
