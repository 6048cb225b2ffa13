"""`notify`: post a short message about an event to a chat webhook (Slack, Microsoft Teams, Discord) or any
HTTP endpoint that takes JSON.

Used alone it announces events; used with `after:` it reports how another action went, e.g. an alert when
forwarding to the app ended dead:

    - id: alert
      use: notify
      after: app
      when: failure
      with:
        url: ${SLACK_WEBHOOK_URL}
        format: slack
        template: "Consignment {{ event.data.consignmentId }} not delivered: {{ parent.error }}"

The message is a Jinja template rendered in a sandbox. Undefined names are errors (a typo must not send a
half-empty message), syntax errors are reported when the config loads, and a template that renders to
nothing (say, everything inside an `{% if %}`) skips the notification. What one render may print and run is
bounded (gateway.templates): the payload it runs over is any sender's.

For the same reason the values a message shows are escaped for the chat (ESCAPES), the template's own text
not: a customer's name at the provider must not mention everybody in the channel or show a link that leads
elsewhere. Then, over the whole message (FINISHES), every mention that is not all the template's own text
is broken up: one a value completes after the template's `<` or `@`, or a filter makes of a block's text.
`|raw` puts a value in as it is, as the template's own. Discord is also told which mentions may ping: those
the message still holds, the template's (discord_mentions).
"""

from __future__ import annotations

import dataclasses
import json
import re
import traceback
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway import hookimpl
from gateway.actions import (
    Action,
    Job,
    Outcome,
    ParentResult,
    check_http_url,
    dead,
    drain_answer,
    hidden_paths,
    http_outcome,
    read_reason,
    skipped,
    transport_error,
)
from gateway.http_client import HeaderError, check_configured_headers, check_framing_headers, check_headers
from gateway.templates import compile_template, owns, render

EVENT_ID_HEADER = "x-hookyard-event-id"

# Discord rejects a message whose content is longer than this (HTTP 400, which would end the delivery dead).
DISCORD_MAX_CONTENT = 2000
# Teams does not post a message past 28 KB. A Workflows webhook answers 202 before its flow posts the card,
# so the delivery would count as delivered, and nothing shown. Counted on the whole body as sent.
TEAMS_MAX_BYTES = 28_000

# A zero-width space: put into a chat's markup, it keeps the markup from being read, and shows nothing.
_BREAK = "\u200b"


def slack_escape(text: str) -> str:
    """Slack's own escaping for text it did not write: `<!channel>`, `<@U123>` and `<https://x|a link>` are
    all made of `<` and `>`, and `&` starts the escapes themselves. Slack reads a `<` followed by anything else
    as a link, and a value that is a URL is one still."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# What decides whom a Slack `<…>` pings: `<!here>`, `<!channel>`, `<!everyone>`, `<!subteam^ID>`, `<@U123>`,
# and `<#C123>` (a channel's link), up to a label's `|`; a date's `<!date^…>` pings nobody, and what follows
# its `<!date^` (group 1) is read for the `^` that starts each further part of it (_slack_owned).
# Up to a next `<` too: a match runs on past it, and `<{{ a }} … <@{{ b }}>` with no `>` between made one match,
# its first `<` broken up and the `<@` of b's mention never looked at.
_SLACK_MENTION = re.compile(r"<(?:!date\^([^|<>]*)|[!@#][^|<>]*)")


def slack_finish(message: str) -> str:
    """`message`, which a template escaped with slack_escape, with a zero-width space after the `<` of each
    mention that is not wholly the template's own text (gateway.templates.owns): in `<{{ value }}>` the `<`
    and `>` are the template's, and a value of `!channel` would make `<!channel>`, as would a filter over a
    block's text. Only a template's own text and a raw value write a `<`: a value's is `&lt;`. So is a date
    whose `^` a value wrote (_slack_owned)."""
    return _break_mentions(message, _SLACK_MENTION, "<", _slack_owned)


def _slack_owned(message: str, match: re.Match[str]) -> bool:
    """Whether a `_SLACK_MENTION` is the template's own. A date (`<!date^{{ time|int }}^{date_short}|…>`) pings
    nobody and may show a value, but each `^` in it starts a further part, the third a link: a value's `^`
    (`1700000000^{date_short}^https://elsewhere`) made the date a link the sender chose. Its `^` must all be
    the template's own."""
    if match[1] is None:
        return _owned_whole(message, match)
    start = match.start(1)
    return owns(message, match.start(), start) and all(
        owns(message, start + at, start + at + 1) for at, char in enumerate(match[1]) if char == "^"
    )


def _owned_whole(message: str, match: re.Match[str]) -> bool:
    return owns(message, match.start(), match.end())


def _break_mentions(
    message: str,
    mention: re.Pattern[str],
    after: str,
    owned: Callable[[str, re.Match[str]], bool] = _owned_whole,
) -> str:
    """`message` with a zero-width space after the `after` that starts each `mention` not `owned` (by default,
    not wholly its own)."""
    pieces: list[str] = []
    done = 0
    for match in mention.finditer(message):
        if not owned(message, match):
            cut = message.index(after, match.start()) + 1
            pieces += [message[done:cut], _BREAK]
            done = cut
    return "".join(pieces) + message[done:] if pieces else str(message)


# `@everyone`, `@here`, `<@id>`, `<@!id>` and `<@&role>`: in either case, as a mention that pings nobody costs
# nothing to break up.
_DISCORD_MENTION = re.compile(r"@(?:everyone|here)|<@[!&]?[0-9]+>", re.IGNORECASE)
# A masked link, `[text](https://elsewhere)`: the `](` between what it shows and where it leads; a `]` at the
# end of the text, which a next value might continue.
_MASKED_LINK = re.compile(r"\](?=\(|\Z)")


def discord_escape(text: str) -> str:
    """A zero-width space between the parts of a masked link keeps it from being read as one: Discord has no
    escaping that works in code blocks too (a backslash shows there). A value's mentions are discord_finish's."""
    return _MASKED_LINK.sub("]" + _BREAK, text)


def discord_finish(message: str) -> str:
    """`message`, which a template escaped with discord_escape, with a zero-width space after the `@` of each
    mention that is not wholly the template's own text (gateway.templates.owns): a value's, one a value ends
    after the template's `@`, one two values or a filter over a block's text make."""
    return _break_mentions(message, _DISCORD_MENTION, "@")


def teams_escape(text: str) -> str:
    """An Adaptive Card's TextBlock reads Markdown, whose masked link `[text](url)` may show other text than
    where it leads. A mention needs the card's `msteams.entities`, which notify does not send: text cannot ping."""
    return _MASKED_LINK.sub("]" + _BREAK, text)


# How each format escapes the values a message shows. A `generic` endpoint's is not known: nothing.
ESCAPES: dict[str, Callable[[str], str]] = {
    "slack": slack_escape,
    "discord": discord_escape,
    "teams": teams_escape,
}

# What each format does to the whole message its escaped values went into. Nothing, for the others.
FINISHES: dict[str, Callable[[str], str]] = {
    "slack": slack_finish,
    "discord": discord_finish,
}

# The mentions a Discord message holds: `@everyone` and `@here`, a user's `<@id>` or `<@!id>`, a role's `<@&id>`.
_DISCORD_PINGS = re.compile(r"@(everyone|here)|<@(!?|&)([0-9]+)>")
# Discord refuses a message that allows more users or roles than this.
DISCORD_MAX_MENTIONS = 100


def discord_mentions(message: str) -> dict[str, Any]:
    """Discord's `allowed_mentions` for `message`: those it holds, and nothing else. Discord enforces it whatever
    the text says; discord_finish broke up every mention that was not all the template's own (or a `|raw`
    value's), so what is left is."""
    everyone, users, roles = False, [], []
    for match in _DISCORD_PINGS.finditer(message):
        if match[1]:
            everyone = True
        elif match[2] == "&":
            roles.append(match[3])
        else:
            users.append(match[3])
    return {
        "parse": ["everyone"] if everyone else [],
        "users": list(dict.fromkeys(users))[:DISCORD_MAX_MENTIONS],
        "roles": list(dict.fromkeys(roles))[:DISCORD_MAX_MENTIONS],
    }


# The engine words a used-up retry schedule as "gave up after N attempts: <last error>"; the default message
# states the attempts itself, so it shows only the last error.
_GAVE_UP = re.compile(r"^gave up after \d+ attempts?: ")


class NotifyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    format: Literal["slack", "teams", "discord", "generic"] = "generic"
    template: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return check_http_url(url)

    @field_validator("headers")
    @classmethod
    def _sendable(cls, headers: dict[str, str]) -> dict[str, str]:
        check_configured_headers(headers)
        # httpx sends a configured Content-Length or Transfer-Encoding as it is, beside the body it frames
        # itself: a message cut short, the rest left on the connection as the start of a next request.
        check_framing_headers(headers)
        ours = [name for name in headers if name.lower() == EVENT_ID_HEADER]
        if ours:
            raise ValueError(f"{', '.join(map(repr, ours))} cannot be set: notify sends it")
        return headers

    @field_validator("template")
    @classmethod
    def _compiles(cls, template: str | None) -> str | None:
        # Compiled here so that `hookyard check` reports a broken template with its place and line, instead
        # of every delivery failing once the gateway runs.
        if template is not None:
            compile_template(template)
        return template


def parent_fields(parent: ParentResult | None) -> dict[str, Any] | None:
    if parent is None:
        return None
    return {
        "action": parent.action,
        "state": parent.state,
        "attempts": parent.attempts,
        "status_code": parent.status_code,
        "error": parent.error,
    }


# template_context's default: the event's own payload (which may be null).
_EVENTS_OWN: Any = object()


def template_context(job: Job, payload: Any = _EVENTS_OWN) -> dict[str, Any]:
    """What a template sees; `payload` in place of the event's own, if given."""
    event = job.event if payload is _EVENTS_OWN else dataclasses.replace(job.event, payload=payload)
    return {
        "event": {
            "id": event.id,
            "source": event.source,
            "type": event.type,
            "data": event.data,
            "payload": event.payload,
            "occurred_at": event.occurred_at,
            "received_at": event.received_at,
        },
        "route": job.route,
        "action": job.action,
        "attempt": job.attempt,
        "parent": parent_fields(job.parent),
    }


def default_message(job: Job, escape: Callable[[str], str] | None = None) -> str:
    """`consignly consignment.created <id> could not be delivered to app after 6 attempts: HTTP 503`,
    `... was delivered to app`, or `... received` for a notify that runs on its own. Each value escaped with
    `escape`: a sender chose the event's type and id, and an error may repeat what a server answered."""
    event, parent = job.event, job.parent
    shown = escape or str
    subject = f"{shown(event.source)} {shown(event.type)} {shown(event.id)}"
    if parent is None:
        return f"{subject} received"
    if parent.state == "delivered":
        return f"{subject} was delivered to {shown(parent.action)}"
    plural = "" if parent.attempts == 1 else "s"
    attempts = f"{parent.attempts} attempt{plural}"
    text = f"{subject} could not be delivered to {shown(parent.action)} after {attempts}"
    if parent.error:
        reason: str | None = _GAVE_UP.sub("", parent.error)
    elif parent.status_code is not None:
        reason = f"HTTP {parent.status_code}"
    else:
        reason = None
    return f"{text}: {shown(reason)}" if reason else text


def chat_payload(format: str, message: str, job: Job) -> dict[str, Any]:
    """The JSON body each kind of webhook expects."""
    if format == "slack":
        return {"text": message}
    if format == "discord":
        if len(message) > DISCORD_MAX_CONTENT:
            message = message[: DISCORD_MAX_CONTENT - 1] + "…"
        return {"content": message, "allowed_mentions": discord_mentions(message)}
    if format == "teams":
        return teams_card(message)
    event = job.event
    return {
        "text": message,
        "event": {"id": event.id, "source": event.source, "type": event.type},
        "route": job.route,
        "parent": parent_fields(job.parent),
    }


def teams_card(message: str) -> dict[str, Any]:
    """The message in an Adaptive Card, cut (ending in "…") to the longest that keeps the body within
    TEAMS_MAX_BYTES."""
    card = _adaptive_card(message)
    if _size(card) <= TEAMS_MAX_BYTES:
        return card
    # The size grows with the length of the text kept: the longest that fits, by bisection.
    shortest, longest = 0, len(message)
    while shortest < longest:
        middle = (shortest + longest + 1) // 2
        if _size(_adaptive_card(message[:middle] + "…")) <= TEAMS_MAX_BYTES:
            shortest = middle
        else:
            longest = middle - 1
    return _adaptive_card(message[:shortest] + "…")


def _adaptive_card(text: str) -> dict[str, Any]:
    # Teams Workflows (Power Automate) webhooks take a message carrying an Adaptive Card; the retired
    # Office 365 connectors took MessageCards, which Workflows do not render.
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "content": {
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": [{"type": "TextBlock", "text": text, "wrap": True}],
                },
            }
        ],
    }


def _size(payload: dict[str, Any]) -> int:
    """The bytes of the body httpx sends for `json=payload`: compact JSON, UTF-8, not ASCII-escaped."""
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


def render_error(exc: Exception) -> str:
    """`template line 2: UndefinedError: 'dict object' has no attribute 'nope'`."""
    # Jinja rewrites tracebacks so that template frames carry the template's own line numbers.
    frames = traceback.StackSummary.extract(traceback.walk_tb(exc.__traceback__), lookup_lines=False)
    lines = [frame.lineno for frame in frames if frame.filename == "<template>"]
    where = f"template line {lines[-1]}" if lines else "template"
    if isinstance(exc, RecursionError):
        # The gateway reads JSON nested up to 1024 levels; writing it (tojson, or as text) stops near Python's
        # recursion limit. The interpreter's message says nothing of the event.
        return (
            f"{where}: RecursionError: the event (or the template's recursion) is nested too deeply to render"
        )
    return f"{where}: {type(exc).__name__}: {exc}"


# Headers that describe the message, never a credential: their values may be shown.
_DESCRIPTIVE_HEADERS = re.compile(r"(accept|content)(-.*)?|user-agent", re.IGNORECASE)
# Shorter than this, a value is no credential (a version, a flag); hidden, it would blank every place the
# same few characters stand in the reason.
_SHORTEST_SECRET = 8


def header_secrets(headers: dict[str, str]) -> tuple[str, ...]:
    """What an error never shows of the configured `headers`, should a refusal repeat it: each value that
    could be a credential, and what follows its scheme (`Bearer <token>`). A chat API's key goes there (a
    URL with credentials is refused), and no name tells which header holds one."""
    secrets: list[str] = []
    for name, value in headers.items():
        if _DESCRIPTIVE_HEADERS.fullmatch(name.strip()):
            continue
        secrets.append(value.strip())
        _, space, credential = value.strip().partition(" ")
        if space:
            secrets.append(credential.strip())
    return tuple(secret for secret in secrets if len(secret) >= _SHORTEST_SECRET)


class Notify(Action):
    name = "notify"
    description = (
        "Post a message about the event (or another action's result) to Slack, Teams, Discord or JSON"
    )
    Options = NotifyOptions
    options: NotifyOptions

    def __init__(self, options: Any, resources: Any) -> None:
        super().__init__(options, resources)
        self.escape = ESCAPES.get(options.format)
        self.finish = FINISHES.get(options.format, str)
        self.template = (
            compile_template(options.template, self.escape) if options.template is not None else None
        )
        self.hidden = hidden_paths(options.url)
        self.secrets = header_secrets(options.headers)

    def message(self, job: Job) -> str:
        return self.finish(self.rendered(job))

    def rendered(self, job: Job) -> str:
        if self.template is None:
            return default_message(job, self.escape)
        message = render(self.template, template_context(job))
        # orjson reads an integer past 64 bits as a float, which prints with an exponent
        # (1.2345678901234568e+29): such a message is rendered again over the payload read from the body by
        # Python's json, which keeps every digit. Only then, so that the common payload is parsed once.
        if "e+" in message and (exact := job.event.exact_payload()) is not None:
            message = render(self.template, template_context(job, exact))
        return message

    async def deliver(self, job: Job) -> Outcome:
        try:
            message = self.message(job)
        except Exception as exc:
            # A template fails the same way on every attempt: retrying would only delay the verdict.
            return dead(render_error(exc))
        if not message:
            return skipped("the template rendered an empty message")
        headers = {EVENT_ID_HEADER: job.event.id, **self.options.headers}
        try:
            check_headers(headers)
        except HeaderError as exc:
            return dead(str(exc))  # the event's id breaks the header, the same on every attempt
        import httpx  # here, not at the top: see Resources

        try:
            # Streamed: the answer's body is read only so far (see drain_answer).
            async with self.resources.http.stream(
                "POST",
                self.options.url,
                json=chat_payload(self.options.format, message, job),
                # As bytes: httpx encodes str header values as ASCII and raises UnicodeEncodeError for an
                # event id such as "évt_1" (any JSON string, for Consignly). UTF-8, as forward sends it.
                headers={name.encode(): value.encode() for name, value in headers.items()},
                timeout=job.timeout,
            ) as response:
                if 200 <= response.status_code < 300:
                    await drain_answer(response)
                    reason = None
                else:
                    # Chat webhooks say why they refused in the body: Slack's 404 `no_service` (the webhook
                    # was removed) and 410 `channel_is_archived` need different fixes.
                    reason = await read_reason(response, self.hidden, self.secrets)
        except httpx.HTTPError as exc:
            return transport_error(exc)
        outcome = http_outcome(response, job.retry)
        if reason is not None and outcome.error is not None:
            outcome = dataclasses.replace(outcome, error=f"{outcome.error}: {reason}")
        return outcome


@hookimpl
def register_actions() -> list[type[Action]]:
    return [Notify]
