"""`acknowledge`: tell Consignly how the delivery of a consignment event went (its connection result).

Consignly waits for an integration to report back on each operation it started. This action runs after the
action that handled the event (usually `forward` to the app) and reports its final result:

    PUT {base_url}/v1/consignments/{data.consignmentId}/connection-result
    {"operationId": <payload.operationId>, "result": 1}     # 1: the parent was delivered, 2: it ended dead

    - id: ack
      use: acknowledge
      after: app
      with:
        base_url: https://api.consignly.example
        oauth:
          token_url: https://auth.consignly.example/oauth/token
          client_id: ${CONSIGNLY_CLIENT_ID}
          client_secret: ${CONSIGNLY_CLIENT_SECRET}

Authentication is a static bearer `token`, or `oauth` (the client credentials grant): the access token is
fetched once, shared by every delivery of the action, renewed shortly before it expires, and renewed at once
when the API answers 401 (that request is then sent once more).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self
from urllib.parse import quote, quote_plus

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator, model_validator

from gateway import hookimpl
from gateway.actions import (
    ANSWER_LIMIT,
    Action,
    AnswerTooLong,
    Job,
    Outcome,
    check_http_url,
    dead,
    drain_answer,
    http_outcome,
    parse_retry_after,
    read_answer,
    read_reason,
    retry,
    shown_reason,
    skipped,
    transport_error,
)
from gateway.events import Event, lost_digits
from gateway.http_client import control_character_name, header_control_character, shown_url
from gateway.providers import described

if TYPE_CHECKING:
    import httpx  # imported where it is used, as `resources.http` is made: see Resources

# Consignly's connection results.
RESULT_SUCCESS = 1
RESULT_FAILURE = 2


class OAuthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_url: str
    client_id: str
    # SecretStr: the options may end up in a repr (an error, a debugger); the secret must not.
    client_secret: SecretStr
    scope: str | None = None
    # How the client authenticates to the token endpoint (RFC 6749 2.3.1): in the form body, or with HTTP
    # Basic authentication.
    auth_method: Literal["client_secret_post", "client_secret_basic"] = "client_secret_post"

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return check_http_url(url)

    @field_validator("client_id", "client_secret")
    @classmethod
    def _not_blank(cls, value: str | SecretStr) -> str | SecretStr:
        # `${CONSIGNLY_CLIENT_ID:-}` with the variable unset: every token request would be refused, and each
        # acknowledgement retried through its schedule, then dead, Consignly never told.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not text.strip():
            raise ValueError("is empty (a ${VAR:-} whose variable is unset?)")
        return value


class AcknowledgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_url: str
    token: SecretStr | None = None
    oauth: OAuthOptions | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, url: str) -> str:
        check_http_url(url)
        # The API's path is appended to it: after a query or a fragment it would go there, and the PUT would
        # reach the base URL itself, whose 2xx would count as Consignly told.
        if "?" in url or "#" in url:
            raise ValueError(
                f"{shown_url(url)!r}: a base URL cannot have a query or a fragment; "
                "/v1/consignments/... is appended to it"
            )
        return url.rstrip("/")

    @field_validator("token")
    @classmethod
    def _blank_is_unset(cls, token: SecretStr | None) -> SecretStr | None:
        # `token: ${CONSIGNLY_TOKEN:-}` with the variable unset means "no static token", not an empty one.
        if token is None or not token.get_secret_value().strip():
            return None
        # Refused here rather than on every attempt (aiohttp raises for it). The message never shows it.
        problem = _header_problem(token.get_secret_value())
        if problem is not None:
            raise ValueError(f"the token holds {problem}")
        # A bearer token is ASCII (RFC 6750 2.1), and httpx sends headers as ASCII: every attempt would end
        # in a UnicodeEncodeError, then dead. Such a token is a copy gone wrong (a typographic quote, say).
        if not token.get_secret_value().isascii():
            raise ValueError("the token holds a character beyond ASCII, which no bearer token has")
        return token

    @model_validator(mode="after")
    def _one_credential(self) -> Self:
        if self.token is not None and self.oauth is not None:
            raise ValueError("give either token or oauth, not both")
        if self.token is None and self.oauth is None:
            raise ValueError("give a bearer token or oauth client credentials (token_url, client_id, ...)")
        return self


class TokenUnavailable(Exception):
    """The token endpoint did not issue a token; `outcome` says how the delivery attempt ends."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


class ClientCredentials:
    """Access tokens from an OAuth2 client credentials grant, cached until shortly before they expire."""

    # Renew this long before the announced expiry, so that a token never expires on its way to the API.
    margin: ClassVar[float] = 30.0
    # Reuse a token announced without expires_in this long; a 401 renews it earlier anyway.
    default_lifetime: ClassVar[float] = 300.0

    def __init__(self, options: OAuthOptions, http: httpx.AsyncClient) -> None:
        self.options = options
        self.http = http
        self._token: str | None = None
        self._expires_at = 0.0  # time.monotonic()
        # Concurrent deliveries that find no valid token wait for one fetch instead of each making their own.
        self._lock = asyncio.Lock()

    async def token(self, timeout: float, *, rejected: str | None = None) -> str:
        """A valid access token; `rejected` is one the API just refused, which must not be handed out again."""
        async with self._lock:
            token = self._token
            if token is not None and token != rejected and time.monotonic() < self._expires_at:
                return token
            if token is not None and token == rejected:
                # Forgotten before the fetch: should it fail, the next attempts fetch again rather than send
                # the API a token it refused, each for one more 401.
                self._token = None
            # A token fetched now is used for this request even when its lifetime is shorter than the margin.
            return await self._fetch(timeout)

    async def _fetch(self, timeout: float) -> str:
        options = self.options
        secret = options.client_secret.get_secret_value()
        form = {"grant_type": "client_credentials"}
        if options.scope:
            form["scope"] = options.scope
        headers = {"accept": "application/json"}
        # What a refusal never shows, should the endpoint repeat what it was sent: the secret as it is, as
        # the form encodes it, and the Basic credentials that hold it.
        sent = [secret, quote_plus(secret)]
        if options.auth_method == "client_secret_post":
            form["client_id"] = options.client_id
            form["client_secret"] = secret
        else:
            # RFC 6749 2.3.1: both are form-encoded before they are joined and base64-encoded.
            pair = f"{quote_plus(options.client_id)}:{quote_plus(secret)}"
            credentials = base64.b64encode(pair.encode()).decode("ascii")
            headers["authorization"] = "Basic " + credentials
            sent.append(credentials)
        started = time.monotonic()
        import httpx  # loaded already: self.http is an httpx client

        content: bytes | None = None
        try:
            # Streamed: the answer is read only up to ANSWER_LIMIT (see read_answer).
            async with self.http.stream(
                "POST", options.token_url, data=form, headers=headers, timeout=timeout
            ) as response:
                with contextlib.suppress(AnswerTooLong):  # content stays None
                    content = await read_answer(response)
        except httpx.HTTPError as exc:
            outcome = transport_error(exc)
            raise TokenUnavailable(
                dataclasses.replace(outcome, error=f"token endpoint: {outcome.error}")
            ) from None
        # A token endpoint that refuses us may recover (a rotated secret is fixed, the server comes back): every
        # failure here is retried on the action's schedule rather than ending the delivery dead at once.
        if not 200 <= response.status_code < 300:
            detail = _oauth_error(content, tuple(sent))
            raise TokenUnavailable(
                retry(
                    f"token endpoint: HTTP {response.status_code}{f' {detail}' if detail else ''}",
                    retry_after=parse_retry_after(response.headers.get("retry-after")),
                )
            )
        if content is None:
            raise TokenUnavailable(
                retry(f"token endpoint: the answer is longer than {ANSWER_LIMIT // 1024} KiB")
            )
        answer = _json(content)
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise TokenUnavailable(retry("token endpoint: the answer has no access_token"))
        problem = _header_problem(token)
        if problem is not None:
            # Not kept: no request could carry it, and every acknowledgement would fail until it expired.
            raise TokenUnavailable(retry(f"token endpoint: the access_token holds {problem}"))
        if not token.isascii():
            # Not kept either: httpx sends headers as ASCII, and every attempt would end in a
            # UnicodeEncodeError until the token expired (an hour, say), each acknowledgement dead meanwhile.
            raise TokenUnavailable(retry("token endpoint: the access_token holds a character beyond ASCII"))
        lifetime = _expires_in(answer)
        lifetime = self.default_lifetime if lifetime is None else max(0.0, lifetime - self.margin)
        # Counted from before the request: the server's clock started while we were waiting for its answer.
        self._token, self._expires_at = token, started + lifetime
        return token


def _header_problem(token: str) -> str | None:
    """What keeps `token` out of an Authorization header, never showing the token: a control character other
    than the tab (RFC 9110 5.5), which the other actions' headers are checked for too; None when there is
    none."""
    found = header_control_character(token)
    if found is None:
        return None
    return f"{control_character_name(found)} ({found!r}), which no header can carry"


def _expires_in(answer: dict[str, Any]) -> float | None:
    """The token's lifetime in seconds, if the answer gives one that can be used."""
    value = answer.get("expires_in")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)  # some servers send it as a string, "3600" or "3599.0"
    except (ValueError, OverflowError):
        return None
    # Python's JSON reads Infinity and NaN: a token kept for ever, or a lifetime no comparison holds.
    return seconds if math.isfinite(seconds) else None


def _json(content: bytes) -> Any:
    """The JSON of an answer's body, or None."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # UnicodeDecodeError included; RecursionError: nested past its depth
        return None


def _oauth_error(content: bytes | None, secrets: tuple[str, ...]) -> str:
    """The `error` code of an OAuth error answer (`invalid_client`), as any refusal's reason is shown (on one
    line, cut short, without `secrets`), or nothing."""
    answer = _json(content) if content is not None else None
    error = answer.get("error") if isinstance(answer, dict) else None
    return (shown_reason(error, secrets=secrets) or "") if isinstance(error, str) else ""


def _identifier(value: Any) -> str | int | None:
    """An id from the payload: a non-empty string or an integer, anything else counts as missing."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _wrong_kind(value: Any) -> bool:
    """A value that is there but can be no id: neither null, a string nor an integer."""
    return value is not None and not isinstance(value, str) and _identifier(value) is None


def _ids(event: Event) -> tuple[Any, Any]:
    """The event's operationId and data.consignmentId, as they are in its payload."""
    payload = event.payload
    operation = payload.get("operationId") if isinstance(payload, dict) else None
    return operation, event.lookup("data.consignmentId")


class Acknowledge(Action):
    name = "acknowledge"
    description = (
        "Report another action's result to Consignly (PUT .../connection-result), static or OAuth2 auth"
    )
    Options = AcknowledgeOptions
    options: AcknowledgeOptions
    needs_parent = True

    def __init__(self, options: Any, resources: Any) -> None:
        super().__init__(options, resources)
        # The options hold exactly one of the two.
        self.static_token = options.token.get_secret_value() if options.token else ""
        self.credentials = ClientCredentials(options.oauth, resources.http) if options.oauth else None

    async def bearer(self, timeout: float, rejected: str | None = None) -> str:
        if self.credentials is None:
            return self.static_token
        return await self.credentials.token(timeout, rejected=rejected)

    async def deliver(self, job: Job) -> Outcome:
        parent = job.parent
        if parent is None:
            return dead("the result of the action this one runs after is missing")
        operation, consignment = _ids(job.event)
        if lost_digits(operation) or lost_digits(consignment):
            # orjson reads an integer past 64 bits as a float: read again from the body, with every digit.
            exact = job.event.exact_payload()
            if exact is not None:
                operation, consignment = _ids(dataclasses.replace(job.event, payload=exact))
        # One of another kind (a number with a fraction, an object) names an operation that waits for its
        # result, which cannot be sent: a failure to show, not an event without one.
        for name, value in (("operationId", operation), ("data.consignmentId", consignment)):
            if _wrong_kind(value):
                return dead(f"the event's {name} is {described(value)}, not text or an integer")
        operation_id, consignment_id = _identifier(operation), _identifier(consignment)
        # Not every Consignly event belongs to an operation: there is nothing to report, and no point retrying.
        if operation_id is None:
            return skipped("the event has no operationId")
        if consignment_id is None:
            return skipped("the event has no data.consignmentId")
        # The id comes from the payload: encoded as one path segment, a `/`, `?` or `#` in it stays inside
        # it. `.` and `..` are left as they are by any encoding (unreserved) and a URL resolves them as
        # dot-segments, so the PUT would reach another endpoint: no consignment has such an id. Nor `..;x`:
        # aiohttp sends a `;` unencoded, and a servlet container reads what follows it as a parameter of
        # the segment, resolving the `..` before it.
        if str(consignment_id).partition(";")[0] in (".", ".."):
            return dead(f"data.consignmentId {consignment_id!r} is not a consignment id")
        url = (
            f"{self.options.base_url}/v1/consignments/{quote(str(consignment_id), safe='')}/connection-result"
        )
        body = {
            "operationId": operation_id,
            "result": RESULT_SUCCESS if parent.state == "delivered" else RESULT_FAILURE,
        }
        import httpx  # here, not at the top: see Resources

        try:
            token = await self.bearer(job.timeout)
            response, reason = await self._put(url, body, token, job.timeout)
            if response.status_code == 401 and self.credentials is not None:
                # The token was revoked or expired before we thought: renew it and try once more. A second
                # 401 is the API's verdict, read like any other answer.
                token = await self.bearer(job.timeout, rejected=token)
                response, reason = await self._put(url, body, token, job.timeout)
        except TokenUnavailable as exc:
            return exc.outcome
        except httpx.HTTPError as exc:
            return transport_error(exc)
        outcome = http_outcome(response, job.retry)
        if reason is not None and outcome.error is not None:
            outcome = dataclasses.replace(outcome, error=f"{outcome.error}: {reason}")
        return outcome

    async def _put(
        self, url: str, body: dict[str, Any], token: str, timeout: float
    ) -> tuple[httpx.Response, str | None]:
        """The API's answer, its body read only so far (see drain_answer), and for a refusal what its body
        says (an unknown operation, a token without the scope): the status decides, the reason tells why."""
        async with self.resources.http.stream(
            "PUT", url, json=body, headers={"authorization": f"Bearer {token}"}, timeout=timeout
        ) as response:
            if 200 <= response.status_code < 300:
                await drain_answer(response)
                return response, None
            return response, await read_reason(response, secrets=self._secrets(token))

    def _secrets(self, token: str) -> tuple[str, ...]:
        """What an error never shows, should the API's answer repeat it."""
        secrets = [token, self.static_token]
        if self.options.oauth is not None:
            secrets.append(self.options.oauth.client_secret.get_secret_value())
        return tuple(secrets)


@hookimpl
def register_actions() -> list[type[Action]]:
    return [Acknowledge]
