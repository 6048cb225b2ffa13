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
bounded (MAX_MESSAGE, MAX_STEPS, MAX_RENDER_SECONDS): the payload it runs over is any sender's.
"""

from __future__ import annotations

import functools
import re
import time
import traceback
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway import hookimpl
from gateway.actions import (
    Action,
    Job,
    Outcome,
    ParentResult,
    check_http_url,
    dead,
    http_outcome,
    skipped,
    transport_error,
)
from gateway.http_client import HeaderError, check_configured_headers, check_headers

# Jinja costs about 2 MB of resident memory and only templates need it: it is imported when the first
# template is compiled, so a gateway with no notify template (or no notify action) never loads it.
if TYPE_CHECKING:
    from jinja2 import Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

# Discord rejects a message whose content is longer than this (HTTP 400, which would end the delivery dead).
DISCORD_MAX_CONTENT = 2000
# The longest message a template may render, and the longest text or list its `*` may make. A template
# runs on the event loop, over a payload any sender writes: `{{ "*" * event.data.rating }}` with a rating
# of 10**9, or a loop printing a large field a hundred thousand times, would take gigabytes and stop the
# gateway (webhooks included) while it runs. Far more than any chat shows: Slack cuts a message at 40,000.
MAX_MESSAGE = 100_000
# The most loop iterations and calls (of macros, methods, a recursive loop's `loop()`) one render may run.
# Bounding what it prints is not enough: `{% for a in event.data.parcels %}{% for b in event.data.parcels %}`
# over a payload of 20,000 parcels runs 400 million iterations, which may print nothing, while no webhook,
# /healthz or /metrics is answered. A message listing a few thousand items, in nested loops, is far below it;
# 100,000 steps take a tenth of a second.
MAX_STEPS = 100_000
# How long one render may run: a backstop for what a single step may do over the whole payload, such as
# `{% if p in event.data.flagged %}` in a loop over parcels, a billion comparisons for 20,000 and 50,000 of
# them. Ten times what MAX_STEPS takes, so that a busy host does not fail a message that renders in time.
MAX_RENDER_SECONDS = 1.0

# The engine words a used-up retry schedule as "gave up after N attempts: <last error>"; the default message
# states the attempts itself, so it shows only the last error.
_GAVE_UP = re.compile(r"^gave up after \d+ attempts?: ")


def isotime(value: float | None) -> str:
    """A Unix timestamp as ISO 8601 UTC (`2026-11-22T10:00:00Z`), for templates: event times are numbers."""
    if value is None:
        return ""
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(slots=True)
class _Budget:
    """What the render under way may still do."""

    steps: int
    deadline: float  # time.monotonic()


# The render under way on this thread (templates run on the event loop, one at a time, start to end).
_budget: ContextVar[_Budget | None] = ContextVar("notify_render_budget", default=None)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    from jinja2 import StrictUndefined
    from jinja2.exceptions import SecurityError
    from jinja2.runtime import Context, LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def step() -> None:
        budget = _budget.get()
        if budget is None:  # not rendered by render(): nothing to bound
            return
        budget.steps -= 1
        if budget.steps < 0:
            raise SecurityError(f"more than {MAX_STEPS} loop iterations and calls")
        if time.monotonic() > budget.deadline:
            raise SecurityError(f"rendering took more than {MAX_RENDER_SECONDS:g} s")

    def count_iterations(iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            step()
            yield item

    class Environment(ImmutableSandboxedEnvironment):
        # The sandbox bounds range() but not repetition: `*` is checked before it runs.
        intercepted_binops = frozenset({"*"})

        def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
            sequence, times = (right, left) if isinstance(left, int) else (left, right)
            if (
                isinstance(sequence, str | list | tuple)
                and isinstance(times, int)
                and len(sequence) * times > MAX_MESSAGE
            ):
                raise SecurityError(f"* would make a {type(sequence).__name__} longer than {MAX_MESSAGE}")
            return super().call_binop(context, operator, left, right)

        # compile_template() makes every `{% for %}` loop over `environment.counted(<what it names>)`.
        counted = staticmethod(count_iterations)

        # Every call a template makes passes here: a macro that calls itself twice cannot run for ever.
        def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            if obj is not count_iterations:  # compile_template's, not one the template makes
                step()
            if isinstance(obj, LoopContext) and args:  # `loop(item.children)` in a recursive loop
                args = (count_iterations(args[0]), *args[1:])
            return super().call(context, obj, *args, **kwargs)

    # Sandboxed because templates come from the config, which may be edited by people who must not get code
    # execution in the gateway; immutable so a template cannot change the event other actions see.
    env = Environment(autoescape=False, undefined=StrictUndefined)
    env.filters["isotime"] = isotime
    return env


def compile_template(source: str) -> Template:
    """Compile a message template; raises ValueError naming the line of a syntax error."""
    from jinja2 import TemplateSyntaxError, nodes

    env = _environment()
    try:
        tree = env.parse(source)
        # Each loop counts its iterations, as `environment.counted(<what it loops over>)`: Jinja has a hook
        # for calls, none for iteration.
        for loop in list(tree.find_all(nodes.For)):
            counted = nodes.EnvironmentAttribute("counted", lineno=loop.iter.lineno)
            loop.iter = nodes.Call(counted, [loop.iter], [], None, None, lineno=loop.iter.lineno)
        tree.set_environment(env)
        return env.from_string(tree)  # an unknown filter or test is found here
    except TemplateSyntaxError as exc:
        raise ValueError(f"line {exc.lineno}: {exc.message}") from None


def render(template: Template, context: dict[str, Any]) -> str:
    """The message `template` makes of `context`; raises past MAX_MESSAGE, MAX_STEPS or MAX_RENDER_SECONDS."""
    token = _budget.set(_Budget(MAX_STEPS, time.monotonic() + MAX_RENDER_SECONDS))
    try:
        # Rendered piece by piece, so that a message that grows past the limit stops there.
        pieces: list[str] = []
        length = 0
        for piece in template.generate(context):
            length += len(piece)
            if length > MAX_MESSAGE:
                raise ValueError(f"the message is longer than {MAX_MESSAGE} characters")
            pieces.append(piece)
        return "".join(pieces).strip()
    finally:
        _budget.reset(token)


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


def template_context(job: Job) -> dict[str, Any]:
    event = job.event
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


def default_message(job: Job) -> str:
    """`consignly consignment.created <id> could not be delivered to app after 6 attempts: HTTP 503`,
    `... was delivered to app`, or `... received` for a notify that runs on its own."""
    event, parent = job.event, job.parent
    subject = f"{event.source} {event.type} {event.id}"
    if parent is None:
        return f"{subject} received"
    if parent.state == "delivered":
        return f"{subject} was delivered to {parent.action}"
    plural = "" if parent.attempts == 1 else "s"
    text = f"{subject} could not be delivered to {parent.action} after {parent.attempts} attempt{plural}"
    if parent.error:
        reason: str | None = _GAVE_UP.sub("", parent.error)
    elif parent.status_code is not None:
        reason = f"HTTP {parent.status_code}"
    else:
        reason = None
    return f"{text}: {reason}" if reason else text


def chat_payload(format: str, message: str, job: Job) -> dict[str, Any]:
    """The JSON body each kind of webhook expects."""
    if format == "slack":
        return {"text": message}
    if format == "discord":
        if len(message) > DISCORD_MAX_CONTENT:
            message = message[: DISCORD_MAX_CONTENT - 1] + "…"
        return {"content": message}
    if format == "teams":
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
                        "body": [{"type": "TextBlock", "text": message, "wrap": True}],
                    },
                }
            ],
        }
    event = job.event
    return {
        "text": message,
        "event": {"id": event.id, "source": event.source, "type": event.type},
        "route": job.route,
        "parent": parent_fields(job.parent),
    }


def render_error(exc: Exception) -> str:
    """`template line 2: UndefinedError: 'dict object' has no attribute 'nope'`."""
    # Jinja rewrites tracebacks so that template frames carry the template's own line numbers.
    frames = traceback.StackSummary.extract(traceback.walk_tb(exc.__traceback__), lookup_lines=False)
    lines = [frame.lineno for frame in frames if frame.filename == "<template>"]
    where = f"template line {lines[-1]}" if lines else "template"
    return f"{where}: {type(exc).__name__}: {exc}"


class Notify(Action):
    name = "notify"
    description = (
        "Post a message about the event (or another action's result) to Slack, Teams, Discord or JSON"
    )
    Options = NotifyOptions
    options: NotifyOptions

    def __init__(self, options: Any, resources: Any) -> None:
        super().__init__(options, resources)
        self.template = compile_template(options.template) if options.template is not None else None

    def message(self, job: Job) -> str:
        if self.template is None:
            return default_message(job)
        return render(self.template, template_context(job))

    async def deliver(self, job: Job) -> Outcome:
        try:
            message = self.message(job)
        except Exception as exc:
            # A template fails the same way on every attempt: retrying would only delay the verdict.
            return dead(render_error(exc))
        if not message:
            return skipped("the template rendered an empty message")
        headers = {"x-hookyard-event-id": job.event.id, **self.options.headers}
        try:
            check_headers(headers)
        except HeaderError as exc:
            return dead(str(exc))  # the event's id breaks the header, the same on every attempt
        import httpx  # here, not at the top: see Resources

        try:
            response = await self.resources.http.post(
                self.options.url,
                json=chat_payload(self.options.format, message, job),
                # As bytes: httpx encodes str header values as ASCII and raises UnicodeEncodeError for an
                # event id such as "évt_1" (any JSON string, for Consignly). UTF-8, as forward sends it.
                headers={name.encode(): value.encode() for name, value in headers.items()},
                timeout=job.timeout,
            )
        except httpx.HTTPError as exc:
            return transport_error(exc)
        return http_outcome(response, job.retry)


@hookimpl
def register_actions() -> list[type[Action]]:
    return [Notify]
