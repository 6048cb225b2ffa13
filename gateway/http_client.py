"""A lean HTTP/1.1 client for one request per event: keep-alive connections, httptools' parser.

`forward` sends every event as one request, usually to the app beside the sidecar. aiohttp spends about
140 µs of CPU on such a request on a 2-core machine of the class the benchmark runs on; this client about
20 µs (both measured against the same loopback receiver), and on the gateway's one event-loop core that
is a large part of what delivering an event costs. It does only what forwarding needs:

- one request at a time per connection, written with one `write`: the head, then the body;
- the answer parsed by httptools (llhttp, the parser uvicorn and Node.js use): status, headers, length or
  chunked bodies, 1xx interim answers;
- idle connections kept per origin for the next request, for at most `keepalive` seconds;
- http and https (the same `ssl.SSLContext` as the rest of the gateway).

What it leaves out on purpose: redirects (forward never follows them), cookies, proxies, compression
(the answer is never decoded, only read to keep the connection) and pipelining.

An answer's body is read only so that its connection can serve the next request: at most `read_limit`
bytes within `read_timeout` seconds, after the status has been returned (a body still coming is read in the
background). A larger, slower or broken body costs its connection, nothing more: the status has already
decided how the attempt went.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import certifi
import httptools

# What a request target keeps as it is (RFC 3986 pchar, "/" and "%" for escapes already made).
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
# The most an answer's head (status line, headers, interim answers) may take. httptools joins a header that
# comes in pieces in memory of its own and bounds nothing: a receiver sending headers without end would
# grow it until the action's timeout.
HEAD_LIMIT = 64 * 1024


# A header continued on the next line, which begins with a space or a tab (obs-fold, RFC 9112 §5.2), is
# refused by llhttp. It unfolds one only under lenient_headers, which would also take NUL and control
# characters in a value and a space before a name's colon (`Content-Length : 5`, then read as no length),
# on connections that are reused. Its words for a fold: after a value, and after an empty value (the same
# words as for a control character, so the head is looked at). Such an answer's head is unfolded here
# instead (see unfold), and parsed again in llhttp's strict mode.
_FOLDED_AFTER_VALUE = "Unexpected whitespace after header value"
_FOLDED_AFTER_EMPTY = "Invalid header value char"
_EMPTY_THEN_FOLDED = re.compile(rb":[ \t]*\r\n[ \t]")
_VALUE_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_FOLD = re.compile(rb"\r\n[ \t]")
# Headers that frame an answer: a folded one is refused, as its framing must not be guessed.
_FRAMING_NAMES = (b"content-length", b"transfer-encoding")
OBS_FOLD = (
    "a header continues on the next line (obs-fold, obsolete line folding: RFC 9112 section 5.2) where "
    "Hookyard does not unfold it: right after the status line, in Content-Length or Transfer-Encoding (which "
    "frame the answer), or in a head that is malformed otherwise; the app must send each header on one line"
)


def parse_error(error: Exception, received: bytes) -> str:
    """What an answer's parser error says, `received` the data it failed in: llhttp's words, or OBS_FOLD."""
    reason = str(error)
    if reason == _FOLDED_AFTER_VALUE:
        return OBS_FOLD
    if reason == _FOLDED_AFTER_EMPTY:
        head = received.partition(b"\r\n\r\n")[0]
        if _EMPTY_THEN_FOLDED.search(head) and not _VALUE_CONTROL.search(head):
            return OBS_FOLD
    return reason


def unfold(received: bytes) -> bytes | None:
    """`received`, an answer's bytes from its first (interim answers included), with each obs-fold of its
    first folded head replaced by one space, as RFC 9112 §5.2 asks of a user agent. None where that would be
    a guess: the head is not whole within HEAD_LIMIT bytes, or see unfold_head."""
    start = 0
    for _ in range(HEAD_LIMIT // 4 + 1):  # each head takes 4 bytes at least: its CRLFCRLF
        end = received.find(b"\r\n\r\n", start, HEAD_LIMIT)
        if end < 0:
            return None
        head = received[start:end]
        if _FOLD.search(head):
            unfolded = unfold_head(head)
            return None if unfolded is None else received[:start] + unfolded + received[end:]
        start = end + 4  # an interim answer's head, which llhttp took
    return None


def unfold_head(head: bytes) -> bytes | None:
    """`head` (without its CRLFCRLF) with each CRLF and the spaces and tabs after it replaced by one space.
    None unless the folds are all that is wrong with it: a control character or a CR or LF on its own
    anywhere, a fold of the status line or of a header framing the answer, are not unfolded but refused."""
    if _VALUE_CONTROL.search(head):
        return None
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        return None
    if not lines[0].startswith(b"HTTP/") or lines[1][:1] in (b" ", b"\t"):
        return None  # a fold in, or right after, the status line
    fields: list[bytes] = []
    for line in lines[1:]:
        if line[:1] not in (b" ", b"\t"):
            fields.append(line)
        elif fields[-1].partition(b":")[0].strip().lower() in _FRAMING_NAMES:
            return None
        else:
            fields[-1] += b" " + line.lstrip(b" \t")
    return b"\r\n".join([lines[0], *fields])


class RequestError(Exception):
    """The request could not be made or its answer not read. `connect`: the peer was never reached.
    `unanswered`: the connection ended before a byte of the answer came."""

    def __init__(self, message: str, *, connect: bool = False, unanswered: bool = False) -> None:
        super().__init__(message)
        self.connect = connect
        self.unanswered = unanswered


BROKEN_HEADER = "a header name or value holds a line break and cannot be sent"


class HeaderError(ValueError):
    """A header that cannot be sent: a name that is not a token, or a value with a control character (a line
    break would break the request apart)."""


# A control character other than the tab: a line break or NUL would end a header, and RFC 9110 (5.5) allows
# none of the others in a field value either; the HTTP libraries (h11, llhttp, aiohttp) and most servers
# refuse them.
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The same as bytes, but for header lines, each ending in CR LF (whose count is checked apart). Looked for
# with bytes.translate, which deletes them in one pass of C: a third of what a regular expression's search
# takes over forward's per-event lines (in UTF-8, no byte of a character past U+007F is below 0x80).
_LINE_CONTROL = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
# A header name is an RFC 9110 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
TOKEN_CHARACTERS = "letters, digits or !#$%&'*+-.^_`|~"


def header_control_character(text: str) -> str | None:
    """The first control character other than the tab in `text`, which no request header can carry; None
    when there is none."""
    if text.isprintable():  # the common case, without a regular expression
        return None
    found = _HEADER_CONTROL.search(text)
    return found.group() if found is not None else None


def header_problem(name: str, value: str) -> str | None:
    """Why a header cannot be sent (RFC 9110 5.1 and 5.5), never showing its value (it may be a secret): a
    name that is not a token, or a value that holds a control character other than the tab. None when it
    can be."""
    if _TOKEN.fullmatch(name) is None:
        return f"its name is not a token ({TOKEN_CHARACTERS})"
    found = header_control_character(value)
    if found is not None:
        return f"its value holds {control_character_name(found)} ({found!r})"
    return None


def check_headers(headers: Mapping[str, str]) -> None:
    """Raise HeaderError, naming the header, for one that no request can carry (header_problem): what the
    actions that send with httpx check before each request, as HttpClient does its own."""
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem is not None:
            raise HeaderError(f"header {name!r} cannot be sent: {problem}")


def _lines_problem(lines: str) -> str:
    """What HeaderError says of header lines that PreparedHead.encode refused: the first header found that
    cannot be sent, or BROKEN_HEADER for a line break that made a well-formed line of its own."""
    for line in lines.removesuffix("\r\n").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            problem = header_problem(name, value.strip(" \t"))
            if problem is not None:
                return f"header {name!r} cannot be sent: {problem}"
    return BROKEN_HEADER


# What a host may be written as, with its port: a name or an address (even a bad one, which an error is
# about), or anything in brackets. Never a ':' followed by anything but digits: that is `user:password`.
_HOST_AND_PORT = re.compile(r"(?:\[[^\]]*\]|[^:\[\]]*)(?::[0-9]*)?")
# RFC 3986's scheme: what comes before a "://" is one only if it is one (a password may hold "://").
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def shown_url(url: str) -> str:
    """`url` as an error message may show it: scheme, host and port. Credentials, the path and the query
    are left out ("/…" stands for what followed): a chat webhook carries its secret in its path, and a URL
    may hold a password or a token. Where a '/', '?' or '#' left unencoded in a password may have ended the
    host early, only the host after the last '@' is shown, or "…" when that is no host either."""
    scheme, rest = _split_scheme(url)
    end = _first_of("/?#", rest)
    at = rest.rfind("@")
    if at < end:  # no '@', or every '@' before the path: whatever holds a password is before the last one
        return _host_and_rest(scheme, rest[at + 1 : end], rest[end:])
    # An '@' after the first '/', '?' or '#': in the path or the query, or in a password holding one of them.
    authority_host = rest[:end].rpartition("@")[2]
    if ":" not in rest[:at] and _first_of("?#", rest) < rest.find("@", end):
        # No password without a ':' before it, and a '?' or '#' before the '@' makes it the query's
        # (`/hook?to=ops@example.com`), not a user name's (`user/name@host`).
        return _host_and_rest(scheme, authority_host, rest[end:])
    if _HOST_AND_PORT.fullmatch(authority_host) or _first_of("?#", rest) < at:
        # What is before the first '/' may be a host, a user name (`user/name@host`) or a password's digits
        # (`deploy:2024/pass@host`); and an '@' after a '?' or '#' may be a query's, whose token the host
        # after it would be part of: nothing is shown.
        return f"{scheme}…"
    # It is no host (`user:pa` of `user:pa/ss@host`): the host follows the last '@'.
    after = rest[at + 1 :]
    end = _first_of("/?#", after)
    if not _HOST_AND_PORT.fullmatch(after[:end]):
        return f"{scheme}…"
    return _host_and_rest(scheme, after[:end], after[end:])


def shown_url_with_path(url: str) -> str:
    """`url` without its credentials, but with its path and query: for a URL the user gave on the command
    line (`--url`, `--admin-url`), whose path is theirs to see and no secret of a config. Where a '/', '?' or
    '#' left unencoded in a password makes it ambiguous which '@' ends the credentials, everything before
    the last '@' is left out ("…@" stands for it): a password may hold any character."""
    scheme, rest = _split_scheme(url)
    at = rest.rfind("@")
    if at < _first_of("/?#", rest):  # no '@', or every '@' before the path: userinfo as URL parsers read it
        return f"{scheme}{rest[at + 1 :]}"
    return f"{scheme}…@{rest[at + 1 :]}"


def _split_scheme(url: str) -> tuple[str, str]:
    """`scheme://` (or "" for `host:port/path` without one, say) and what follows it."""
    found = _SCHEME.match(url)
    if found is None:
        return "", url
    return found.group(), url[found.end() :]


def _host_and_rest(scheme: str, host: str, after: str) -> str:
    return f"{scheme}{host}{after if after in ('', '/') else '/…'}"


def _first_of(marks: str, text: str) -> int:
    return min((text.find(mark) for mark in marks if mark in text), default=len(text))


# ASCII control characters: urlsplit drops tabs and line breaks wherever they are, and the leading ones with
# the spaces before a URL, without a word (as browsers do with what is pasted into them).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_NAMES = {"\t": "a tab", "\n": "a line feed", "\r": "a carriage return", "\0": "a NUL"}


def control_character_name(char: str) -> str:
    """How an error names a control character: `a line feed`, or `a control character` for the rarer ones."""
    return _CONTROL_NAMES.get(char, "a control character")


def url_text_problem(url: str) -> str | None:
    """What makes `url` no URL as written, without repeating it (it may hold a password): whitespace at
    either end, or an ASCII control character anywhere. Either would be dropped without a word by urlsplit:
    `"http://app/ho\\tok"`, a YAML escape, would be sent to /hook. A space inside is left to the parser
    (a path's is percent-encoded, a host's refused)."""
    if url != url.strip():
        return "begins or ends with whitespace, such as a newline kept from a file: remove it"
    found = _CONTROL.search(url)
    if found is None:
        return None
    char = found.group()
    name = control_character_name(char)
    return f"{name} ({char!r}) at character {found.start() + 1}: a URL cannot hold a control character"


def check_url_text(url: str) -> None:
    """Raise ValueError, showing `url` as shown_url does, for what url_text_problem finds."""
    problem = url_text_problem(url)
    if problem is not None:
        raise ValueError(f"{shown_url(url)!r}: {problem}")


def check_configured_headers(headers: Mapping[str, str]) -> None:
    """Raise ValueError, naming them, for configured headers no request can carry (header_problem): a name
    that is not a token, a value with a control character other than the tab. Checked when the config loads,
    so that `hookyard check` says so instead of every delivery ending dead. Names only in the message: a
    value may be a secret."""
    broken = [name for name, value in headers.items() if header_problem(name, value) is not None]
    if broken:
        raise ValueError(
            f"{', '.join(map(repr, broken))}: not a header (a name must be {TOKEN_CHARACTERS}; a value cannot "
            "hold a line break or another control character but the tab)"
        )


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


def check_framing_headers(headers: Mapping[str, str]) -> None:
    """Raise ValueError, naming them, for configured headers that frame the request (FRAMING_HEADERS): the
    client that sends it writes them itself, and a second or a changed one corrupts the request."""
    framing = [name for name in headers if name.lower() in FRAMING_HEADERS]
    if framing:
        raise ValueError(
            f"{', '.join(map(repr, framing))} cannot be set: the HTTP client frames each request itself"
        )


# A host name once IDNA-encoded, or an IPv4 address: DNS labels, with the `_` some internal names have.
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def wire_host(url: str, hostname: str) -> str:
    """`hostname` (of `url`) as it is connected to and sent: a name outside ASCII as IDNA (punycode).
    Raises ValueError for one no host can be: urlsplit takes `exa mple.com` or `a<b`, and every attempt would
    then fail to resolve it."""
    if ":" in hostname:
        if "%" in hostname:
            raise ValueError(f"{shown_url(url)!r}: an IPv6 zone is not supported")
        try:
            ipaddress.IPv6Address(hostname)
        except ValueError:
            raise ValueError(f"{shown_url(url)!r}: {hostname!r} is not an IPv6 address") from None
        return hostname
    try:
        host = hostname.encode("idna").decode("ascii")
    except UnicodeError:  # an empty label (`a..b`), or one longer than 63
        host = ""
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{shown_url(url)!r}: {hostname!r} is not a host name")
    return host


_HOST_FORMS = " (a name, an IPv4 address, or an IPv6 address in brackets)"


@dataclass(frozen=True, slots=True)
class Target:
    """A URL parsed once: where to connect and what to put in the request line and Host header."""

    scheme: str
    host: str
    port: int
    host_header: str
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        check_url_text(url)
        try:
            parts = urlsplit(url)
        except ValueError:
            # Brackets that hold no address (`[V1.x]`, `[127.0.0.1]`, one left open), or a name that reads as
            # a `/`, `@` or `:` once normalised. Not urlsplit's own words: they may repeat a password.
            raise ValueError(f"{shown_url(url)!r}: its host cannot be read{_HOST_FORMS}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{shown_url(url)!r} is not an http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"{shown_url(url)!r}: credentials in the URL are not sent; use a header instead")
        if parts.netloc.startswith("[") and ":" not in parts.hostname:
            # urlsplit takes an IPvFuture literal (`[v1.x]`) in brackets and gives it out without them, as if
            # it were a name: no socket can connect to one.
            raise ValueError(f"{shown_url(url)!r}: its host cannot be read{_HOST_FORMS}")
        host = wire_host(url, parts.hostname)
        default = 443 if parts.scheme == "https" else 80
        try:
            port = default if parts.port is None else parts.port
        except ValueError:
            # Not urlsplit's words either: they repeat what it read as the port, which, in
            # `user:pa/ss@host`, is the start of a password.
            problem = "its port is not a number from 1 to 65535"
            if "@" in url:
                problem += ", or a '/', '?' or '#' in a password ended the host early"
            raise ValueError(f"{shown_url(url)!r}: {problem}") from None
        if port == 0:
            raise ValueError(f"{shown_url(url)!r}: port 0 cannot be connected to")
        # The path and query percent-encoded where they hold what a request line cannot (spaces,
        # non-ASCII), escapes already there kept.
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default else f"{shown}:{port}"
        path = quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            path += "?" + quote(parts.query, safe=_PATH_SAFE + "?")
        return cls(parts.scheme, host, port, host_header, path)

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


@dataclass(slots=True)  # read-only, but not frozen: one is made for every request (see Job)
class Answer:
    status: int
    # Lower-cased names; the last value of a repeated header.
    headers: dict[str, str]


@dataclass(eq=False)
class _Exchange:
    """What one request is waiting for on its connection."""

    head: asyncio.Future[Answer]
    done: asyncio.Future[None]
    read_limit: int
    answered: bool = False  # a byte of the answer came
    head_read: int = 0  # bytes received before the head was whole
    # Those bytes, kept only when a head comes in more than one piece: a folded head is parsed again whole.
    # (None until then: no list is made for the usual answer, whose head comes whole.)
    head_pieces: list[bytes] | None = None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body_read: int = 0


def announces_a_stray_body(status: int, headers: Mapping[str, str]) -> bool:
    """A 204 or 304, which has no body whatever it says (RFC 9110 6.4.1), that announces one all the same:
    the receiver may send it after the head, and on a kept connection it would be read as the next answer.
    (A 304's length may only describe the resource; a new connection is the cheap side of that doubt.)
    `headers` is looked up by lower-case name."""
    if status not in (204, 304):
        return False
    return "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("", "0")


class PreparedHead:
    """A request head whose every line but the body's length and the headers that vary is the same from one
    request to the next: joined and checked once (HttpClient.prepare), not for every request."""

    __slots__ = ("_broken", "_fixed", "_start")

    def __init__(self, start: str, fixed: str, broken: str | None) -> None:
        self._start = start  # up to the value of Content-Length
        self._fixed = fixed  # the headers that do not vary, each line ending in CRLF
        # Why one of those cannot be sent: every request is refused, as by `request`.
        self._broken = broken

    def encode(self, lines: str, count: int, body: bytes) -> bytes:
        """The request: this head, then `lines` (`count` header lines, each ending in CRLF), then `body`.
        Raises HeaderError, as HttpClient.request does, for a header value with a control character other
        than the tab (header_problem), naming the header where it can be told: `count` is how many lines the
        caller's code writes, never counted from the text (a value holding CRLF would count as a line of its
        own). The names in `lines` are that code's own, and not checked. For forward's hot path; other
        actions send with `request`."""
        if self._broken is not None:
            raise HeaderError(self._broken)
        encoded = lines.encode()
        if (
            lines.count("\n") != count
            or lines.count("\r") != count
            or len(encoded.translate(None, _LINE_CONTROL)) != len(encoded)
            or (lines and not lines.endswith("\r\n"))
        ):
            raise HeaderError(_lines_problem(lines))
        return f"{self._start}{len(body)}\r\n{self._fixed}{lines}\r\n".encode() + body


class Connection(asyncio.Protocol):
    """One keep-alive connection: one exchange at a time, answers fed to httptools as they arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = self._new_parser()
        self.exchange: _Exchange | None = None
        self.open = False
        self.reusable = False
        # Served an earlier request: the peer may have closed it meanwhile (see HttpClient.request).
        self.used_before = False
        self.idle_since = 0.0

    def _new_parser(self) -> httptools.HttpResponseParser:
        parser = httptools.HttpResponseParser(self)
        # An answer with both Content-Length and chunked Transfer-Encoding is read as chunked (RFC 9112 6.3)
        # rather than refused: its status is what the receiver decided, and refusing it would send an event
        # it has already taken again. The connection is then given up (on_message_complete).
        parser.set_dangerous_leniencies(lenient_chunked_length=True)
        return parser

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            # Bytes nobody asked for: the peer is not speaking HTTP/1.1 request-response any more.
            self.close()
            return
        exchange = self.exchange
        exchange.answered = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # not one family
            self._parse_failed(exc, exchange, b"".join([*(exchange.head_pieces or ()), data]))
            return
        if not exchange.status:
            # Not reached by a head that comes whole in one piece, the usual answer.
            if exchange.head_pieces is None:
                exchange.head_pieces = []
            exchange.head_pieces.append(data)
            exchange.head_read += len(data)
            if exchange.head_read > HEAD_LIMIT:
                self._fail(RequestError(f"invalid answer: its head is longer than {HEAD_LIMIT} bytes"))
                self.close()

    def _parse_failed(self, error: Exception, exchange: _Exchange, received: bytes) -> None:
        """Refuse the answer, unless only obs-fold made it invalid: then parse its head again unfolded, with a
        new parser, and give the connection up after it (whatever follows it was framed by the receiver's
        idea of that head, which need not be this one's)."""
        reason = parse_error(error, received)
        unfolded = unfold(received) if reason == OBS_FOLD and not exchange.status else None
        if unfolded is not None:
            self.open = False  # serves no other request: _release closes it after this answer
            self.parser = self._new_parser()
            exchange.head_pieces = [unfolded]
            exchange.head_read = len(unfolded)
            try:
                self.parser.feed_data(unfolded)
                return
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                reason = parse_error(exc, unfolded)
        self._fail(RequestError(f"invalid answer: {reason}"))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.reusable = False
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.head.done():
            # A body delimited by the end of the connection, or one cut short: the status stands.
            if not exchange.done.done():
                exchange.done.set_result(None)
            return
        reason = "connection closed before the answer" + (f": {exc}" if exc else "")
        self._fail(RequestError(reason, unanswered=not exchange.answered))

    # -- httptools' callbacks

    def on_message_begin(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.status:
            # A second answer to one request: whatever it is, it would be read as the next request's.
            self.close()
            return
        exchange.headers = {}
        exchange.body_read = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.status:
            return  # a chunked body's trailer: the answer's headers are already out
        # httptools joins a name or value that arrived in pieces before calling this.
        exchange.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        if not 200 <= status <= 599:
            # Not a status (RFC 9110 15: three digits, 100 to 599). A 0 would pass for no status yet, and
            # the answer's end for an interim answer's.
            self._fail(RequestError(f"invalid answer: status {status:03d}"))
            self.close()
            return
        exchange.status = status
        if not exchange.head.done():
            exchange.head.set_result(Answer(status, exchange.headers))

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.body_read += len(body)
        if exchange.body_read > exchange.read_limit:
            # Not worth reading for a keep-alive connection: give the connection up instead.
            self.close()

    def on_message_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.status == 0:
            return  # the end of an interim answer
        # Kept only if the peer keeps it and all of the request went out: an answer that came before the
        # body was written leaves the rest of the body to be read as the next request.
        assert self.transport is not None
        self.reusable = (
            self.open
            and self.parser.should_keep_alive()
            and not self.transport.get_write_buffer_size()
            # Two framings: whoever sent it may read the connection's next bytes by the other one.
            and not ("content-length" in exchange.headers and "transfer-encoding" in exchange.headers)
            and not announces_a_stray_body(exchange.status, exchange.headers)
        )
        if not exchange.done.done():
            exchange.done.set_result(None)

    # -- the client's side

    def send(self, data: bytes, read_limit: int) -> _Exchange:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.reusable = False
        self.exchange = _Exchange(loop.create_future(), loop.create_future(), read_limit)
        self.transport.write(data)
        return self.exchange

    def finish(self) -> None:
        self.exchange = None
        self.idle_since = time.monotonic()

    def _fail(self, error: RequestError) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        for future in (exchange.head, exchange.done):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: the waiter may be gone (a timeout) and asyncio must not warn

    def close(self) -> None:
        self.open = False
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


def default_ssl_context() -> ssl.SSLContext:
    """The certificates every action's HTTPS trusts, as httpx picks them (without importing httpx, which
    a gateway that only forwards never needs): $SSL_CERT_FILE or $SSL_CERT_DIR when set, else certifi's
    bundle."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    return ssl.create_default_context(cafile=certifi.where())


class HttpClient:
    """Keep-alive connections per origin. The number of connections is bounded by the callers: one per
    request in flight (the delivery engine runs at most `delivery.concurrency`), the idle ones kept for
    `keepalive` seconds (up to twice that once no request comes, see _sweep)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        user_agent: str,
        keepalive: float = 30.0,
        connect_timeout: float = 30.0,
    ) -> None:
        self.ssl_context = ssl_context
        self.user_agent = user_agent
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, str, int], deque[Connection]] = {}
        self._draining: set[Connection] = set()  # answered, the rest of the body still coming
        self._sweeper: asyncio.TimerHandle | None = None  # the next _sweep, while any connection is idle
        self._closed = False

    async def request(
        self,
        method: str,
        target: Target,
        headers: dict[str, str],
        body: bytes,
        *,
        read_limit: int = 64 * 1024,
        read_timeout: float = 1.0,
    ) -> Answer:
        """Send one request and return its answer once the status and headers are in; the body is then
        read for the connection's sake (see the module's docstring).

        Raises HeaderError for a header that cannot be sent (header_problem), RequestError when the peer
        could not be reached or gave no valid answer. A pooled connection that the peer had closed meanwhile
        is retried once on a new one, before anything was answered: the receiver dedupes on the
        Idempotency-Key that forward sends."""
        return await self.send(
            target,
            self.prepare(method, target, headers).encode("", 0, body),
            read_limit=read_limit,
            read_timeout=read_timeout,
        )

    def prepare(self, method: str, target: Target, headers: Mapping[str, str]) -> PreparedHead:
        """The head of `method` requests to `target` that start with `headers`, joined and checked once, for
        `send` with the lines that vary from request to request (PreparedHead.encode)."""
        start = self._start(method, target)
        fixed = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        broken = next(
            (
                f"header {name!r} cannot be sent: {problem}"
                for name, value in headers.items()
                if (problem := header_problem(name, value)) is not None
            ),
            None,
        )
        if broken is None and _HEADER_CONTROL.search(start.replace("\r\n", "")) is not None:
            broken = BROKEN_HEADER  # the user agent
        return PreparedHead(start, fixed, broken)

    async def send(
        self, target: Target, data: bytes, *, read_limit: int = 64 * 1024, read_timeout: float = 1.0
    ) -> Answer:
        """`request` for a request already encoded (PreparedHead.encode)."""
        connection = await self._checkout(target)
        try:
            exchange = connection.send(data, read_limit)
            try:
                answer = await exchange.head
            except RequestError as error:
                if not (error.unanswered and connection.used_before):
                    raise
                connection.close()
                connection = await self._connect(target)
                exchange = connection.send(data, read_limit)
                answer = await exchange.head
        except BaseException:
            connection.close()  # cancelled (the action's timeout) or failed: the exchange's state is unknown
            raise
        if exchange.done.done():
            self._release(connection, target)
        else:
            # The rest of the body is read without the caller, who has the status: a cancellation (the
            # action's timeout) while it comes must not turn an answered request into a failed one.
            self._drain(connection, exchange, target, read_timeout)
        return answer

    def _drain(
        self, connection: Connection, exchange: _Exchange, target: Target, read_timeout: float
    ) -> None:
        """Read the rest of an answer's body in the background: the connection goes back to the pool once
        it is whole, or is closed after `read_timeout` seconds."""
        timer = asyncio.get_running_loop().call_later(read_timeout, connection.close)
        self._draining.add(connection)

        def finished(_done: asyncio.Future[None]) -> None:
            timer.cancel()
            self._draining.discard(connection)
            self._release(connection, target)

        exchange.done.add_done_callback(finished)

    def _release(self, connection: Connection, target: Target) -> None:
        connection.finish()
        if connection.reusable and connection.open and not self._closed:
            idle = self._idle.setdefault(target.origin, deque())
            idle.append(connection)
            # Checkouts take the newest; the oldest would stay open past `keepalive` unless let go here.
            while not (idle[0].open and connection.idle_since - idle[0].idle_since < self.keepalive):
                idle.popleft().close()
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().call_later(self.keepalive, self._sweep)
        else:
            connection.close()

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._draining):
            connection.close()
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _start(self, method: str, target: Target) -> str:
        """A request's head up to the value of its Content-Length."""
        return (
            f"{method} {target.path} HTTP/1.1\r\nhost: {target.host_header}\r\n"
            f"user-agent: {self.user_agent}\r\ncontent-length: "
        )

    async def _checkout(self, target: Target) -> Connection:
        idle = self._idle.get(target.origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the likeliest still open
            if connection.open and now - connection.idle_since < self.keepalive:
                connection.used_before = True
                return connection
            connection.close()
        return await self._connect(target)

    def _sweep(self) -> None:
        """Close the idle connections past the keepalive of every origin, and forget the origins left with
        none; again after `keepalive` while any is left. An origin's own requests let go of its old
        connections (_release), but one no longer sent to (a reload gave its action another URL), or a
        gateway that no webhook comes to, would keep them open, and their entries here, for good."""
        self._sweeper = None
        now = time.monotonic()
        for origin, idle in list(self._idle.items()):
            while idle and not (idle[0].open and now - idle[0].idle_since < self.keepalive):
                idle.popleft().close()
            if not idle:
                del self._idle[origin]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(self.keepalive, self._sweep)

    async def _connect(self, target: Target) -> Connection:
        if self._closed:
            raise RequestError("the client is closed", connect=True)
        loop = asyncio.get_running_loop()
        tls = target.scheme == "https"
        try:
            async with asyncio.timeout(self.connect_timeout):
                _transport, connection = await loop.create_connection(
                    Connection,
                    target.host,
                    target.port,
                    ssl=self.ssl_context if tls else None,
                    server_hostname=target.host if tls else None,
                )
        except TimeoutError:
            raise RequestError(f"timed out after {self.connect_timeout:g}s", connect=True) from None
        except (OSError, ssl.SSLError) as exc:
            raise RequestError(str(exc) or type(exc).__name__, connect=True) from None
        return connection
