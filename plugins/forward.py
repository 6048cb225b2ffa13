"""`forward`: POST the event's raw body to an HTTP endpoint (usually the app next to the sidecar)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from gateway import hookimpl
from gateway.actions import Action, Job, Outcome, retry, status_outcome
from plugins.svix import decode_secret, sign

# How much of the receiver's answer is read, and for how long: enough to keep its connection for the next
# request.
RESPONSE_BODY_LIMIT = 64 * 1024
ANSWER_READ_TIMEOUT = 1.0
# No timer armed and cancelled on every request: the engine's action timeout bounds the whole attempt and
# ANSWER_READ_TIMEOUT the answer's body. Opening a new connection keeps aiohttp's own bound (its default),
# which costs nothing on a pooled connection.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30)
# Headers that frame the request or belong to one connection: a static value would corrupt the request.
FRAMING_HEADERS = (
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "host",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
)


class Signing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A whsec_ secret: the app verifies Hookyard's requests with any Standard Webhooks library.
    secret: str

    @field_validator("secret")
    @classmethod
    def _valid(cls, secret: str) -> str:
        decode_secret(secret)
        return secret


# Set by forward itself on every request; a static header must not change them (the app dedupes and
# routes on them).
OWN_HEADERS = ("content-type", "idempotency-key")
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
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url

    @field_validator("headers")
    @classmethod
    def _not_ours(cls, headers: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        broken = [
            name
            for name, value in headers.items()
            if not name or any(c in name + value for c in "\r\n\0") or any(c in name for c in " :\t")
        ]
        if broken:
            raise ValueError(
                f"{', '.join(map(repr, broken))}: not a header (a name with a space, colon or control "
                "character, or a value with CR, LF or NUL)"
            )
        framing = [name for name in headers if name.lower() in FRAMING_HEADERS]
        if framing:
            raise ValueError(
                f"{', '.join(map(repr, framing))} cannot be set: the HTTP client frames each request itself"
            )
        ours = [
            name for name in headers if name.lower() in OWN_HEADERS or name.lower().startswith(OWN_PREFIX)
        ]
        if ours:
            raise ValueError(
                f"{', '.join(map(repr, ours))} cannot be set: forward sets Content-Type, Idempotency-Key "
                "and X-Hookyard-* itself"
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

    def request_headers(self, job: Job) -> dict[str, str]:
        event = job.event
        # The static headers never name the ones below (refused at load), so none is sent twice.
        headers = {
            **self.options.headers,
            "content-type": event.headers.get("content-type", "application/json"),
            "idempotency-key": event.id,
            "x-hookyard-event-id": event.id,
            "x-hookyard-source": event.source,
            "x-hookyard-type": event.type,
            "x-hookyard-attempt": str(job.attempt),
        }
        if self.signing_key is not None:
            timestamp = int(time.time())
            headers["webhook-id"] = event.id
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = sign(self.signing_key, event.id, timestamp, event.body)
        return headers

    async def deliver(self, job: Job) -> Outcome:
        # The hot path: aiohttp's API, not httpx's (see Resources). The engine bounds the whole attempt
        # with the action's timeout.
        try:
            async with self.resources.session.request(
                self.options.method,
                self.options.url,
                data=job.event.body,
                headers=self.request_headers(job),
                allow_redirects=False,
                auto_decompress=False,  # the answer is only read to keep the connection, never decoded
                timeout=CLIENT_TIMEOUT,
            ) as response:
                # The status decides: a receiver that said 2xx has the event, whatever its body does next.
                outcome = status_outcome(response.status, response.headers.get("retry-after"), job.retry)
                await _read_answer(response)
                return outcome
        except aiohttp.ClientConnectorError as exc:
            return retry(f"cannot connect: {exc.os_error or exc}")
        except aiohttp.ClientError as exc:
            return retry(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


async def _read_answer(response: aiohttp.ClientResponse) -> None:
    """Read the answer, so its keep-alive connection serves the next request. An answer larger than
    RESPONSE_BODY_LIMIT, slower than ANSWER_READ_TIMEOUT or broken is left unread and costs its connection
    instead, nothing more."""
    if response.content.is_eof():
        # Usually: a small answer arrived whole with its head. The connection goes back to the pool as it
        # is; no timer, no read.
        return
    remaining = RESPONSE_BODY_LIMIT
    try:
        async with asyncio.timeout(ANSWER_READ_TIMEOUT):
            while remaining > 0 and (chunk := await response.content.read(remaining)):
                remaining -= len(chunk)
    except (aiohttp.ClientError, TimeoutError):
        response.close()


@hookimpl
def register_actions() -> list[type[Action]]:
    return [Forward]
