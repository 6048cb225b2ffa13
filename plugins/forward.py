"""`forward`: POST the event's raw body to an HTTP endpoint (usually the app next to the sidecar)."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from gateway import hookimpl
from gateway.actions import Action, Job, Outcome, dead, retry, status_outcome
from gateway.http_client import (
    HeaderError,
    RequestError,
    Target,
    check_configured_headers,
    check_framing_headers,
)
from plugins.svix import decode_secret, sign

# How much of the receiver's answer is read, and for how long: enough to keep its connection for the next
# request. Neither bounds the status, which is all that decides the outcome.
RESPONSE_BODY_LIMIT = 64 * 1024
ANSWER_READ_TIMEOUT = 1.0


class Signing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A whsec_ secret (or its bare base64): the app verifies Hookyard's requests with any Standard Webhooks
    # library.
    secret: str

    @field_validator("secret")
    @classmethod
    def _valid(cls, secret: str) -> str:
        decode_secret(secret)
        return secret


# Set by forward itself on every request; a static header must not change them (the app dedupes and
# routes on them). The client writes User-Agent itself: a second one would make the header repeated.
OWN_HEADERS = ("content-type", "idempotency-key", "user-agent")
OWN_PREFIX = "x-hookyard-"
SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class ForwardOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    method: str = "POST"
    # Before headers, so that the headers' check sees whether requests are signed.
    sign: Signing | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        Target.parse(url)  # what the client sends to, checked as it will be read
        return url

    @field_validator("headers")
    @classmethod
    def _not_ours(cls, headers: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        check_configured_headers(headers)
        check_framing_headers(headers)
        ours = [
            name for name in headers if name.lower() in OWN_HEADERS or name.lower().startswith(OWN_PREFIX)
        ]
        if ours:
            raise ValueError(
                f"{', '.join(map(repr, ours))} cannot be set: forward sets Content-Type, Idempotency-Key, "
                "User-Agent and X-Hookyard-* itself"
            )
        if info.data.get("sign") is not None:
            signed = [name for name in headers if name.lower() in SIGNATURE_HEADERS]
            if signed:
                raise ValueError(
                    f"{', '.join(map(repr, signed))} cannot be set together with sign: it sets "
                    "webhook-id, webhook-timestamp and webhook-signature"
                )
        return headers

    @field_validator("method")
    @classmethod
    def _method(cls, method: str) -> str:
        if method.upper() not in ("POST", "PUT", "PATCH"):
            raise ValueError(f"method {method!r} must be POST, PUT or PATCH")
        return method.upper()


class Forward(Action):
    name = "forward"
    description = "POST the raw body to an HTTP endpoint, with Idempotency-Key and optional signature"
    Options = ForwardOptions
    options: ForwardOptions

    def __init__(self, options: Any, resources: Any) -> None:
        super().__init__(options, resources)
        self.signing_key = decode_secret(options.sign.secret) if options.sign else None
        self.target = Target.parse(options.url)
        # The request line and the static headers, the same for every event, joined once: per event only
        # the headers below are added (the static ones never name them, refused at load: none goes twice).
        self.head = resources.client.prepare(options.method, self.target, options.headers)

    def request_headers(self, job: Job) -> tuple[str, int]:
        """The header lines that vary from event to event, each `name: value` ending in CRLF, joined into one
        string, and how many lines the code here writes (6, or 9 with `sign:`), for PreparedHead.encode,
        which refuses the request when the text holds another count of line breaks (a value with one).

        Forward's own hot path, not part of the plugin API (docs/plugins.md does not list it): an action
        of a plugin sends its headers as a mapping, with HttpClient.request or prepare."""
        event = job.event
        lines = (
            f"content-type: {event.headers.get('content-type', 'application/json')}\r\n"
            f"idempotency-key: {event.id}\r\nx-hookyard-event-id: {event.id}\r\n"
            f"x-hookyard-source: {event.source}\r\nx-hookyard-type: {event.type}\r\n"
            f"x-hookyard-attempt: {job.attempt}\r\n"
        )
        if self.signing_key is None:
            return lines, 6
        timestamp = int(time.time())
        signature = sign(self.signing_key, event.id, timestamp, event.body)
        lines += (
            f"webhook-id: {event.id}\r\nwebhook-timestamp: {timestamp}\r\nwebhook-signature: {signature}\r\n"
        )
        return lines, 9

    async def deliver(self, job: Job) -> Outcome:
        # The hot path: the lean client (see Resources). The engine bounds the whole attempt with the
        # action's timeout; the answer's body is read only to keep the connection, within its own bounds.
        try:
            lines, count = self.request_headers(job)
            answer = await self.resources.client.send(
                self.target,
                self.head.encode(lines, count, job.event.body),
                read_limit=RESPONSE_BODY_LIMIT,
                read_timeout=ANSWER_READ_TIMEOUT,
            )
        except HeaderError as exc:
            return dead(str(exc))  # the same event would break the same header on every attempt
        except RequestError as exc:
            return retry(f"cannot connect: {exc}" if exc.connect else str(exc))
        # The status decides: a receiver that said 2xx has the event, whatever its body does next.
        return status_outcome(answer.status, answer.headers.get("retry-after"), job.retry)


@hookimpl
def register_actions() -> list[type[Action]]:
    return [Forward]
