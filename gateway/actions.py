"""What an action plugin implements: take one event and deliver it somewhere, then say how it went."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import re
import ssl
import time
import zlib
from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict

from gateway.config import RetryPolicy
from gateway.events import Event
from gateway.http_client import HttpClient, Target, announces_a_stray_body, check_url_text, shown_url

if TYPE_CHECKING:
    from types import SimpleNamespace

    import aiohttp
    import httpx


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt went.

    kind: `delivered` (done), `retry` (try again per the schedule), `dead` (give up now),
    `skipped` (nothing to do for this event; final, not a failure).
    """

    kind: Literal["delivered", "retry", "dead", "skipped"]
    status_code: int | None = None
    error: str | None = None
    # Seconds the receiver asked us to wait (Retry-After); the schedule's delay is used when it is longer.
    retry_after: float | None = None

    def __post_init__(self) -> None:
        # Checked where a plugin makes it, so that a wrong field is that attempt's error (the engine retries
        # an action that raised). Recorded as it was, it failed the engine after the attempt, and the delivery
        # was left leased, claimed again for ever, or in a state that means nothing.
        if self.kind not in _KINDS:
            raise ValueError(f"an Outcome's kind is {self.kind!r}, not delivered, retry, dead or skipped")
        if self.status_code is not None and type(self.status_code) not in _NUMBERS:
            raise TypeError(f"an Outcome's status_code is {_a(self.status_code)}, not an int")
        if self.retry_after is not None and type(self.retry_after) not in _NUMBERS:
            raise TypeError(f"an Outcome's retry_after is {_a(self.retry_after)}, not a number")
        if self.error is not None:
            if not isinstance(self.error, str):
                raise TypeError(f"an Outcome's error is {_a(self.error)}, not a str")
            if len(self.error) > MAX_ERROR_CHARS:
                # Stored with every attempt and logged: a whole answer body or traceback would be, each time.
                cut = f"… ({len(self.error)} characters)"
                object.__setattr__(self, "error", self.error[: MAX_ERROR_CHARS - len(cut)] + cut)


_KINDS = frozenset(("delivered", "retry", "dead", "skipped"))
_NUMBERS = (int, float)  # not bool, nor a str that reads as one: stored and compared as numbers

# The longest error an attempt records; the rest is cut, saying how long it was.
MAX_ERROR_CHARS = 2000


def _a(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def delivered(status_code: int | None = None) -> Outcome:
    # Outcomes are immutable: the usual ones are made once, not for every delivery (a frozen dataclass
    # sets each of its fields through object.__setattr__).
    if type(status_code) is int and 200 <= status_code < 300:
        return _DELIVERED[status_code - 200]
    return Outcome("delivered", status_code)


_DELIVERED = [Outcome("delivered", status) for status in range(200, 300)]


def retry(error: str, status_code: int | None = None, retry_after: float | None = None) -> Outcome:
    return Outcome("retry", status_code, error, retry_after)


def dead(error: str, status_code: int | None = None) -> Outcome:
    return Outcome("dead", status_code, error)


def skipped(reason: str) -> Outcome:
    return Outcome("skipped", None, reason)


@dataclass(frozen=True, slots=True)
class ParentResult:
    """The final state of the action a dependent action runs `after`."""

    action: str
    state: Literal["delivered", "dead"]
    attempts: int
    status_code: int | None
    error: str | None


@dataclass(slots=True)  # not frozen: a frozen dataclass sets each field through object.__setattr__
class Job:
    """One attempt at one delivery; read-only. One is made for every attempt: frozen, its `__init__` cost
    about 3% of a forwarded webhook's instructions (bench part 6)."""

    event: Event
    route: str
    action: str
    attempt: int
    timeout: float
    retry: RetryPolicy
    parent: ParentResult | None = None


class Resources:
    """Shared by every action of a gateway; none of them is closed by an action.

    http: httpx's API over aiohttp's keep-alive pool, for any action. session: aiohttp's own API over that
    pool. client: a lean HTTP/1.1 client for actions that send one plain request per event on the hot path
    (forward): it costs about a fifth of aiohttp's CPU per request (bench/RESULTS.md). Both pools send a
    request again, on another connection, when a kept one ends before its answer (HttpClient.send,
    _KeptConnectionResend).

    `http` and `session` are made when an action first asks for them, on the event loop: httpx and
    aiohttp take some 30 MB of memory once imported, which a gateway whose actions never use them (only
    forward and store, say) does not spend.
    """

    def __init__(
        self, *, client: HttpClient, user_agent: str, ssl_context: ssl.SSLContext, pool: int
    ) -> None:
        self.client = client
        self.user_agent = user_agent
        self.ssl_context = ssl_context
        self.pool = pool  # aiohttp's limit of connections, all origins together
        self._session: aiohttp.ClientSession | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            resend = _KeptConnectionResend()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.pool, keepalive_timeout=30, ssl=self.ssl_context),
                headers={"user-agent": self.user_agent},
                cookie_jar=aiohttp.DummyCookieJar(),
                response_class=_response_class(),
                middlewares=(resend.middleware,),
                trace_configs=[resend.trace],
            )
        return self._session

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            # httpx's API over aiohttp's pool: httpcore's own pool costs several times more CPU per request.
            import httpx

            self._http = httpx.AsyncClient(
                transport=_url_free_transport(self.session),
                follow_redirects=False,
                headers={"user-agent": self.user_agent},
            )
        return self._http

    async def aclose(self) -> None:
        # The lean client first: it closes its connections at once, where aiohttp's close may wait.
        await self.client.aclose()
        if self._http is not None:
            await self._http.aclose()
        if self._session is not None:
            await self._session.close()


def _response_class() -> type[aiohttp.ClientResponse]:
    """aiohttp's answer, except that a 204 or 304 announcing a body costs its connection. aiohttp would
    give the connection back to its pool, and read that body, should it come after the head, as the next
    request's answer: that request would fail after its receiver took it, and be sent again."""
    import aiohttp

    class Response(aiohttp.ClientResponse):
        async def start(self, connection: aiohttp.connector.Connection) -> Response:
            protocol = connection.protocol  # the connection lets go of it once the answer is in
            await super().start(connection)
            # Nothing ran in between: the pool cannot have handed the connection to another request yet.
            if protocol is not None and announces_a_stray_body(self.status, self.headers):
                protocol.close()
            return self

    return Response


@dataclass(slots=True)
class _Sending:
    """One send of a request by the pool: whether it went out on a kept connection, one that had served an
    earlier request."""

    kept: bool = False


# The send under way in this task, for the pool's trace to mark (_KeptConnectionResend).
_SENDING: ContextVar[_Sending | None] = ContextVar("hookyard_sending", default=None)


# What aiohttp sends again by itself when a kept connection ends before the answer (RFC 9110 9.2.2).
_RESENT_BY_AIOHTTP = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class _KeptConnectionResend:
    """Sends a request once more when the kept connection it went out on ended before its answer came.

    Receivers close idle keep-alive connections sooner than the pool's 30 s (uvicorn and Node.js after 5 s,
    gunicorn after 2 s). The pool drops a connection whose close it has seen; one whose close was still on
    its way when the request went out fails it before a byte of the answer (Server disconnected, a reset).
    aiohttp sends such a request again by itself only for idempotent methods (_RESENT_BY_AIOHTTP), not a
    POST (notify, most plugins): the attempt failed, was logged, and waited for the schedule's first delay,
    though the receiver most likely never took it. Keeping connections idle for less time would not do: a
    receiver whose timeout is shorter still, or that restarts, closes them all the same, and every message
    would pay a new connection (and TLS handshake) to a chat API that keeps them for minutes.

    So it is sent once more at once, as forward's client does. RFC 9112 9.3.1 lets a client do so when it
    can tell the request was not processed: a connection that had served a request and ends before any
    answer is what a receiver closing an idle one looks like, though a receiver that took the request and
    then died looks the same (the schedule would have sent it again too). Once only: each connection of
    the pool may be kept and fail alike, and a receiver that takes requests and dies before answering would
    otherwise get the same request once per connection. Only when nothing of the answer was read (aiohttp
    cannot say whether part of its head came before the close, which a receiver that answers at all hardly
    does) and the body can be sent again (not a stream read once). A new connection that ends unanswered
    fails the attempt as before: the receiver did that to a fresh one."""

    def __init__(self) -> None:
        import aiohttp

        self.trace = aiohttp.TraceConfig()
        self.trace.on_connection_reuseconn.append(_mark_kept)

    async def middleware(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        import aiohttp

        if request.method in _RESENT_BY_AIOHTTP:
            return await handler(request)
        sending = _Sending()
        # Not reset afterwards: every send sets its own, and a send abandoned in a task the garbage collector
        # closes runs its `finally` outside that task's context, where a reset fails.
        _SENDING.set(sending)
        try:
            return await handler(request)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError):
            # Raised before the answer's head was read (the handler returns once it is); a connect error
            # comes only from a new connection.
            if not sending.kept:
                raise
            await request.close()  # the failed send's body writer settles: a body rewinds only then
            body = request.body
            if isinstance(body, aiohttp.payload.Payload) and body.consumed:
                raise
        _SENDING.set(None)
        return await handler(request)


async def _mark_kept(
    _session: aiohttp.ClientSession,
    _context: SimpleNamespace,
    _params: aiohttp.TraceConnectionReuseconnParams,
) -> None:
    sending = _SENDING.get()
    if sending is not None:
        sending.kept = True


def _url_free_transport(session: aiohttp.ClientSession) -> httpx.AsyncBaseTransport:
    """httpx_aiohttp's transport, except that an answer aiohttp cannot parse (a bad status line or header)
    is an httpx error without the URL. aiohttp's own error ends with the whole URL, and httpx_aiohttp passes
    it on as it is: a chat webhook's URL holds its secret, which would reach the attempt's error (the admin
    API, `hookyard events show`) and the log."""
    import aiohttp
    import httpx
    from httpx_aiohttp import AiohttpTransport

    class Transport(AiohttpTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            try:
                return await super().handle_async_request(request)
            except aiohttp.ClientResponseError as exc:
                # On one line: aiohttp's parser errors take several, the last only a caret under the fault.
                lines = (line.strip() for line in str(exc.message).splitlines())
                message = " ".join(line for line in lines if line.strip("^"))
                raise httpx.RemoteProtocolError(f"invalid answer: {message}", request=request) from None

    return Transport(client=session)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Action(ABC):
    """Base class of actions. Subclasses set `name`, optionally `Options` (the schema of `with:`, checked
    when the config loads), and implement `deliver`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    # True for actions that report on another action's result (acknowledge): the config must say `after:`.
    needs_parent: ClassVar[bool] = False

    def __init__(self, options: Any, resources: Resources) -> None:
        self.options = options
        self.resources = resources

    @abstractmethod
    async def deliver(self, job: Job) -> Outcome:
        """Make one attempt and say how it went; a subclass without it cannot be instantiated."""

    async def aclose(self) -> None:  # noqa: B027 - optional: most actions hold nothing of their own
        """Release what the action holds (pools, connections)."""


def check_http_url(url: str) -> str:
    """An http(s) URL with a host, as httpx reads it: for the options of actions that send with `http`."""
    import httpx

    check_url_text(url)  # httpx would refuse it too, as only "not a valid URL"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:  # not a ValueError: the config check would fail with it, not report it
        Target.parse(url)  # its reason, where it has one: a host in brackets that is no IPv6 address, say
        raise ValueError(f"{shown_url(url)!r} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{shown_url(url)!r} is not an http(s) URL")
    if parsed.userinfo:
        # httpx turns them into an Authorization header and aiohttp then refuses the URL that still holds
        # them: every attempt would fail, after the whole schedule, with a ValueError.
        raise ValueError(f"{shown_url(url)!r}: credentials in the URL cannot be sent; use a header or token")
    # What `forward` checks too: a host no host can be (`exa mple.com`, which httpx percent-encodes), port 0.
    Target.parse(url)
    return url


def http_outcome(response: httpx.Response, policy: RetryPolicy) -> Outcome:
    """The usual reading of an HTTP answer: 2xx delivered, retryable statuses retried, others dead."""
    return status_outcome(response.status_code, response.headers.get("retry-after"), policy)


def status_outcome(status: int, retry_after: str | None, policy: RetryPolicy) -> Outcome:
    """`http_outcome` from the status and the Retry-After header alone."""
    if 200 <= status < 300:
        return delivered(status)
    error = f"HTTP {status}"
    if policy.retries_status(status):
        return retry(error, status, parse_retry_after(retry_after))
    return dead(error, status)


# How much of an answer's body notify and acknowledge read, and for how long once the status is in: what
# forward's client reads (plugins/forward.py). httpx alone reads a body whole, into memory, for as long as
# it comes: a receiver that answered with an endless one would take the gateway's memory, and every
# webhook with it.
ANSWER_LIMIT = 64 * 1024
ANSWER_READ_TIMEOUT = 1.0


class AnswerTooLong(Exception):
    """An answer's body went past ANSWER_LIMIT bytes."""


async def read_answer(response: httpx.Response) -> bytes:
    """The whole body of an answer sent with `stream=True` (`http.stream(...)`), decoded. Raises
    AnswerTooLong past ANSWER_LIMIT bytes, and httpx's errors when the connection fails or a compressed
    body is broken; closing the answer then closes the connection rather than keep it for the next
    request."""
    import httpx  # loaded already: response came from it

    # Decoded here, never past ANSWER_LIMIT: httpx decodes each piece that comes whole, and 16 KiB of gzip
    # may hold 16 MiB, for every answer of a receiver that sends so.
    inflate = _Inflate.of(response.headers.get("content-encoding", ""))
    body = bytearray()
    async for chunk in response.aiter_raw() if inflate is not None else response.aiter_bytes():
        if inflate is not None:
            try:
                chunk = inflate.decompress(chunk, ANSWER_LIMIT + 1 - len(body))
            except zlib.error as exc:
                raise httpx.DecodingError(f"cannot decode the answer: {exc}") from None
        body += chunk
        if len(body) > ANSWER_LIMIT:
            raise AnswerTooLong(f"the answer is longer than {ANSWER_LIMIT // 1024} KiB")
    return bytes(body)


class _Inflate:
    """gzip or deflate, decoded at most so far at a time (zlib's max_length); a deflate body without its
    zlib header is read raw, as httpx reads it."""

    def __init__(self, coding: str) -> None:
        self.deflate = coding == "deflate"
        self.decoder = zlib.decompressobj(zlib.MAX_WBITS if self.deflate else zlib.MAX_WBITS | 16)
        self.started = False

    @classmethod
    def of(cls, content_encoding: str) -> _Inflate | None:
        """One for an answer in gzip or deflate alone; None for any other (httpx decodes it, or passes it
        on as it came)."""
        codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip().lower() != "identity"]
        if len(codings) != 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
            return None
        return cls(codings[0])

    def decompress(self, data: bytes, room: int) -> bytes:
        try:
            decoded = self.decoder.decompress(data, room)
        except zlib.error:
            if not self.deflate or self.started:
                raise
            self.decoder = zlib.decompressobj(-zlib.MAX_WBITS)
            decoded = self.decoder.decompress(data, room)
        self.started = True
        return decoded


async def drain_answer(response: httpx.Response) -> None:
    """Read a streamed answer's body for its connection's sake: up to ANSWER_LIMIT bytes within
    ANSWER_READ_TIMEOUT seconds, as forward does. The status is in, and decides: a body that is longer,
    slower or cut short costs the connection, not the attempt (which would send the request again)."""
    import httpx  # loaded already: response came from it

    with contextlib.suppress(AnswerTooLong, TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(ANSWER_READ_TIMEOUT):
            await read_answer(response)


# How much of what a server says when it refuses a request goes into the delivery's error.
REASON_LIMIT = 200
# Shown in place of a secret that an answer repeats.
_HIDDEN_SECRET = "…"


def answer_reason(content: bytes, hidden: tuple[str, ...] = (), secrets: tuple[str, ...] = ()) -> str | None:
    """What a refusal says, on one line and cut to REASON_LIMIT characters: a plain-text answer (Slack's
    `no_service`, `channel_is_archived`), or the `error`, `message`, `detail` or `title` of a JSON answer
    (Slack's API, Discord's, a Teams Workflows trigger's, an RFC 9457 problem); None for an empty answer, a
    page (a proxy's), or JSON without any of them. Each text of `hidden` (hidden_paths) is shown as "/…",
    each of `secrets` (a bearer token, a client secret) as "…"."""
    text = content.decode("utf-8", "replace").strip()
    if not text or text.startswith("<"):
        return None
    try:
        answer = json.loads(text)
    except ValueError:
        pass
    except RecursionError:
        # JSON nested past the parser's depth (64 KiB of `[`): nothing to read in it, and raised on, it would
        # fail the attempt, which the status alone decides (a 409 retried instead of dead).
        return None
    else:
        found = _json_reason(answer)
        if found is None:
            return None
        text = found
    return shown_reason(text, hidden, secrets)


def shown_reason(text: str, hidden: tuple[str, ...] = (), secrets: tuple[str, ...] = ()) -> str | None:
    """`text`, what a server said of a refusal, as an error shows it: on one line, cut to REASON_LIMIT
    characters, each of `hidden` shown as "/…" and each of `secrets` as "…"; None when nothing is left."""
    secrets = tuple(sorted({secret for secret in secrets if secret}, key=len, reverse=True))
    # Before the control characters go too: a secret may hold a tab, which would no longer match.
    for secret in secrets:
        text = text.replace(secret, _HIDDEN_SECRET)
    # Control characters (a line break among them) become spaces: the error is one line of the log.
    text = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", text).split())
    for secret in secrets:
        text = text.replace(secret, _HIDDEN_SECRET)
    for path in hidden:
        text = text.replace(path, "/…")
    if len(text) > REASON_LIMIT:
        text = text[: REASON_LIMIT - 1] + "…"
    return text or None


def _json_reason(answer: Any) -> str | None:
    if not isinstance(answer, dict):
        return None
    for key in ("error", "message", "detail", "title"):
        value = answer.get(key)
        if isinstance(value, dict):  # Teams: {"error": {"code": ..., "message": ...}}
            value = value.get("message") or value.get("code")
        if isinstance(value, str) and value.strip():
            return value
    return None


def hidden_paths(url: str) -> tuple[str, ...]:
    """The forms in which a server may repeat the path (and query) of `url`, longest first: a chat webhook's
    path is its credential, which no error shows (see shown_url)."""
    import httpx  # loaded already: the options' URL was checked with it

    raw = httpx.URL(url).raw_path.decode("ascii")
    forms = {raw, raw.partition("?")[0]}
    forms |= {unquote(form) for form in forms}
    return tuple(sorted((form for form in forms if len(form) > 1), key=len, reverse=True))


async def read_reason(
    response: httpx.Response, hidden: tuple[str, ...] = (), secrets: tuple[str, ...] = ()
) -> str | None:
    """answer_reason of a streamed answer's body, read as drain_answer reads it: up to ANSWER_LIMIT bytes
    within ANSWER_READ_TIMEOUT seconds. A longer, slower or cut-off body says nothing: the status decides."""
    import httpx  # loaded already: response came from it

    with contextlib.suppress(AnswerTooLong, TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(ANSWER_READ_TIMEOUT):
            return answer_reason(await read_answer(response), hidden, secrets)
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        # ASCII digits only: a header read as latin-1 may hold ² or ¹, digits to isdigit() but not to float().
        return float(value) if value.isascii() else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # a field of twenty digits overflows a C long
        return None
    if when.tzinfo is None:
        # "-0000" (RFC 5322's "zone unknown") and asctime's form, which has none: email.utils leaves them
        # naive, which timestamp() reads as local time. An HTTP date is GMT, however written (RFC 9110 5.6.7).
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def transport_error(exc: Exception) -> Outcome:
    """Connection failures and timeouts are always worth another attempt."""
    cause = exc.__cause__
    if cause is not None and "Connect" in type(cause).__name__ and "Timeout" not in type(cause).__name__:
        # The transport maps a refused connection to a ConnectTimeout; say what really happened.
        return retry(f"cannot connect: {cause}")
    import httpx  # loaded already: exc came from a request made with it

    if isinstance(exc, httpx.TimeoutException) and cause is not None and not isinstance(cause, TimeoutError):
        # The transport maps every lost connection to a ConnectTimeout too: a receiver that reset or closed
        # the connection without answering did so at once, and "timeout" would send the operator looking
        # for a slow receiver.
        # aiohttp names the whole URL in some of these ("Can not write request body for http://..."): a chat
        # webhook's URL holds its secret, and the error reaches the admin API and the log.
        text = _URL.sub(lambda url: shown_url(url.group()), str(cause)) or type(cause).__name__
        return retry(f"connection closed before the answer: {text}")
    if isinstance(exc, httpx.TimeoutException):
        return retry(f"timeout: {type(exc).__name__}")
    return retry(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
