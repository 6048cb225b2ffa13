"""The `notify` action against a real server posing as the chat webhooks (Slack, Teams, Discord, JSON)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from gateway.cli import main as cli
from gateway.config import ConfigError, parse_config
from gateway.plugins import registry
from gateway.routing import RouteTable
from gateway.storage import EventDetail
from plugins.notify import TEAMS_MAX_BYTES
from tests.support import (
    Downstream,
    RunningGateway,
    ServerThread,
    consignly_body,
    consignly_headers,
    gateway_config,
    raw_server,
    read_body,
    svix_request,
    wait_until,
    with_unchecked_ids,
)

CONSIGNMENT_ID = "550e8400-e29b-41d4-a716-446655440000"


def app_action(downstream: Downstream) -> dict[str, Any]:
    return {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/app"}}


def notify_action(action_id: str, url: str, **options: Any) -> dict[str, Any]:
    return {"id": action_id, "use": "notify", "with": {"url": url, **options}}


def route(source: str, *actions: dict[str, Any]) -> dict[str, Any]:
    return {"name": "alerts", "source": source, "events": ["*"], "actions": list(actions)}


def event_detail(gw: RunningGateway, event_id: str) -> EventDetail:
    [detail] = asyncio.run_coroutine_threadsafe(gw.gateway.storage.get_event(event_id), gw.loop).result(10)
    return detail


def delivery_states(gw: RunningGateway, event_id: str) -> dict[str, str]:
    return {d.action: d.state for d in event_detail(gw, event_id).deliveries}


def send_consignly(gw: RunningGateway, body: bytes) -> None:
    assert gw.post("/webhooks/consignly", body, consignly_headers(body)).status_code == 200


def send_consignease(gw: RunningGateway, msg_id: str) -> None:
    body, headers = svix_request(msg_id=msg_id)
    assert gw.post("/webhooks/consignease", body, headers).status_code == 200


@dataclass
class SlackWebhook:
    """A Slack incoming webhook: a JSON object with a non-empty `text` is posted and answered with a plain-text
    `ok`; anything else gets Slack's plain-text error codes (`invalid_payload`, `no_text`, `no_service`)."""

    path: str = "/services/T0001/B0002/abcdefghijklmnopqrstuvwx"
    url: str = ""
    messages: list[str] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if scope["path"] != self.path:
            status, answer = 404, "no_service"
        elif scope["method"] != "POST":
            status, answer = 405, "invalid_method"
        elif headers.get("content-type") != "application/json" or not isinstance(payload, dict):
            status, answer = 400, "invalid_payload"
        elif not isinstance(payload.get("text"), str) or not payload["text"].strip():
            status, answer = 400, "no_text"
        else:
            status, answer = 200, "ok"
        with self.lock:
            if status == 200:
                self.messages.append(payload["text"])
            else:
                self.refused.append((status, answer))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/html")],
            }
        )
        await send({"type": "http.response.body", "body": answer.encode()})


@pytest.fixture
def slack() -> Iterator[SlackWebhook]:
    webhook = SlackWebhook()
    with ServerThread(webhook) as server:
        webhook.url = f"http://127.0.0.1:{server.port}{webhook.path}"
        yield webhook


# -- the default messages -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app_status", "app_state", "expected"),
    [
        (
            400,
            "dead",
            "consignease user.created msg_default could not be delivered to app after 1 attempt: HTTP 400",
        ),
        (200, "delivered", "consignease user.created msg_default was delivered to app"),
    ],
    ids=["app-dead", "app-delivered"],
)
def test_default_messages_report_the_parent_result(
    tmp_path: Path,
    downstream: Downstream,
    slack: SlackWebhook,
    app_status: int,
    app_state: str,
    expected: str,
) -> None:
    downstream.answer("/app", app_status)
    alert = {**notify_action("alert", slack.url, format="slack"), "after": "app"}
    # Without `after:` there is no result to report: the message says the event arrived.
    hello = notify_action("hello", f"{downstream.url}/hello", format="slack")
    config = gateway_config(tmp_path, routes=[route("consignease", app_action(downstream), alert, hello)])
    with RunningGateway(config) as gw:
        send_consignease(gw, "msg_default")
        wait_until(
            lambda: (
                delivery_states(gw, "msg_default")
                == {"app": app_state, "alert": "delivered", "hello": "delivered"}
            )
        )
        # The stand-in takes only what Slack takes: a JSON POST with a non-empty text.
        assert slack.messages == [expected]
        assert slack.refused == []
        [hello_request] = downstream.received("/hello")
        assert hello_request.json() == {"text": "consignease user.created msg_default received"}


def test_failure_alert_after_the_schedule_is_used_up_and_custom_templates(
    tmp_path: Path, downstream: Downstream
) -> None:
    # The test schedule has three retries: four attempts, all 503.
    downstream.answer("/app", 503, 503, 503, 503)
    alert = {
        **notify_action("alert", f"{downstream.url}/slack", format="slack"),
        "after": "app",
        "when": "failure",
    }
    custom = {
        **notify_action(
            "custom",
            f"{downstream.url}/custom",
            format="slack",
            # As YAML block scalars arrive: several lines and a trailing newline.
            template=(
                ":warning: Consignment {{ event.data.consignmentId }} (status {{ event.data.status }})"
                " was not handed to {{ parent.action }}: {{ parent.error }}\n"
                "{{ event.type }} {{ event.id }} via {{ route }}/{{ action }}, attempt {{ attempt }},"
                " {{ parent.attempts }} tries ({{ parent.state }}, last status {{ parent.status_code }})\n"
            ),
        ),
        "after": "app",
        "when": "failure",
    }
    config = gateway_config(tmp_path, routes=[route("consignly", app_action(downstream), alert, custom)])
    with RunningGateway(config) as gw:
        send_consignly(gw, consignly_body(event_id="evt_exhausted", status=3))
        wait_until(
            lambda: (
                delivery_states(gw, "evt_exhausted")
                == {"app": "dead", "alert": "delivered", "custom": "delivered"}
            )
        )
        assert len(downstream.received("/app")) == 4
        [slack] = downstream.received("/slack")
        # The engine's "gave up after 4 attempts: ..." is not repeated: the message states the attempts.
        assert slack.json() == {
            "text": "consignly consignment.created evt_exhausted could not be delivered to app"
            " after 4 attempts: HTTP 503"
        }
        [custom_request] = downstream.received("/custom")
        assert custom_request.json() == {
            "text": f":warning: Consignment {CONSIGNMENT_ID} (status 3) was not handed to app:"
            " gave up after 4 attempts: HTTP 503\n"
            "consignment.created evt_exhausted via alerts/custom, attempt 1, 4 tries (dead, last status 503)"
        }


def test_a_template_prints_an_integer_past_64_bits_with_all_its_digits(
    tmp_path: Path, downstream: Downstream
) -> None:
    # orjson reads such an integer as a float, which printed as 1.2345678901234568e+29.
    big = 123456789012345678901234567891
    note = notify_action(
        "note",
        f"{downstream.url}/note",
        format="slack",
        template="{{ event.data.amount }} {{ event.data.parts }} {{ event.payload.data.amount - 1 }}",
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignease", note)])) as gw:
        body, headers = svix_request(msg_id="msg_big", data={"amount": big, "parts": [-big, 0.5]})
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: delivery_states(gw, "msg_big") == {"note": "delivered"})
    [request] = downstream.received("/note")
    assert request.json() == {"text": f"{big} [{-big}, 0.5] {big - 1}"}


def test_success_template_to_slack(tmp_path: Path, downstream: Downstream, slack: SlackWebhook) -> None:
    # The app needs a second attempt, so the message has something to say about it.
    downstream.answer("/app", 503, 200)
    success = {
        **notify_action(
            "shipped",
            slack.url,
            format="slack",
            template=(
                ":white_check_mark: Consignment {{ event.data.consignmentId }} reached {{ parent.action }}"
                " (HTTP {{ parent.status_code }}, {{ parent.attempts }}"
                " attempt{{ '' if parent.attempts == 1 else 's' }})\n"
                "{{ event.type }} {{ event.id }} from {{ event.occurred_at | isotime }}"
                " via {{ route }}/{{ action }}\n"
            ),
        ),
        "after": "app",
        "when": "success",
    }
    # Its failure counterpart must stay silent when the app got the event.
    failure = {
        **notify_action("lost", slack.url, format="slack", template="lost {{ event.id }}"),
        "after": "app",
        "when": "failure",
    }
    config = gateway_config(tmp_path, routes=[route("consignly", app_action(downstream), success, failure)])
    with RunningGateway(config) as gw:
        send_consignly(gw, consignly_body(event_id="evt_shipped"))
        wait_until(
            lambda: (
                delivery_states(gw, "evt_shipped")
                == {"app": "delivered", "shipped": "delivered", "lost": "skipped"}
            )
        )
        assert slack.messages == [
            f":white_check_mark: Consignment {CONSIGNMENT_ID} reached app (HTTP 200, 2 attempts)\n"
            "consignment.created evt_shipped from 2026-11-22T10:00:00Z via alerts/shipped"
        ]
        assert slack.refused == []
        # Slack's plain-text `ok` is a success like any 2xx: one attempt, no retry.
        shipped = next(d for d in event_detail(gw, "evt_shipped").deliveries if d.action == "shipped")
        assert (shipped.attempts, shipped.last_status, shipped.last_error) == (1, 200, None)


# -- formats --------------------------------------------------------------------------------------------


def test_teams_discord_and_generic_payloads(tmp_path: Path, downstream: Downstream) -> None:
    template = "{{ event.source }}: consignment {{ event.data.consignmentId }} {{ parent.state }}"
    text = f"consignly: consignment {CONSIGNMENT_ID} delivered"
    actions = [
        app_action(downstream),
        {
            **notify_action("teams", f"{downstream.url}/teams", format="teams", template=template),
            "after": "app",
        },
        {
            **notify_action("discord", f"{downstream.url}/discord", format="discord", template=template),
            "after": "app",
        },
        {
            **notify_action(
                "generic", f"{downstream.url}/generic", template=template, headers={"X-Token": "t0ken"}
            ),
            "after": "app",
        },
        # The default format is generic; without a parent, `parent` is null.
        notify_action("plain", f"{downstream.url}/plain"),
    ]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_formats"))
        wait_until(lambda: set(delivery_states(gw, "evt_formats").values()) == {"delivered"})

        [teams] = downstream.received("/teams")
        assert teams.json() == {
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
        [discord] = downstream.received("/discord")
        # No mention in the message: none may ping.
        assert discord.json() == {
            "content": text,
            "allowed_mentions": {"parse": [], "users": [], "roles": []},
        }
        [generic] = downstream.received("/generic")
        assert generic.headers["x-token"] == "t0ken"
        assert generic.headers["x-hookyard-event-id"] == "evt_formats"
        assert generic.json() == {
            "text": text,
            "event": {"id": "evt_formats", "source": "consignly", "type": "consignment.created"},
            "route": "alerts",
            "parent": {
                "action": "app",
                "state": "delivered",
                "attempts": 1,
                "status_code": 200,
                "error": None,
            },
        }
        [plain] = downstream.received("/plain")
        assert plain.json() == {
            "text": "consignly consignment.created evt_formats received",
            "event": {"id": "evt_formats", "source": "consignly", "type": "consignment.created"},
            "route": "alerts",
            "parent": None,
        }


# -- escaping what the event says ----------------------------------------------------------------------

# What a sender chose (a customer's name, an order note): each chat's control sequences, to ping everybody
# or to show a link that leads elsewhere than it says.
HOSTILE = {
    "customer": "<!channel> & <@U0123> @everyone",
    "note": "<https://evil.example|click here> [click here](https://evil.example) <@222222222222222222>",
    "oncall": "<@444444444444444444>",
}


def test_values_from_the_event_are_escaped_for_each_chat_and_the_templates_own_text_is_not(
    tmp_path: Path, downstream: Downstream, slack: SlackWebhook
) -> None:
    actions = [
        notify_action(
            "slack",
            slack.url,
            format="slack",
            template=(
                "<!here> {{ event.data.customer }}: {{ event.data.note }} <https://shop.example/o/1|order>"
                " {{ '<@U0999>'|raw }}"
            ),
        ),
        notify_action(
            "discord",
            f"{downstream.url}/discord",
            format="discord",
            template=(
                "@here {{ event.data.customer }}: {{ event.data.note }} [order](https://shop.example/o/1)"
                " <@111111111111111111> {{ event.data.oncall|raw }}"
            ),
        ),
        notify_action(
            "teams",
            f"{downstream.url}/teams",
            format="teams",
            template="**{{ event.data.customer }}**: {{ event.data.note }} [order](https://shop.example/o/1)",
        ),
        # A JSON endpoint's format is not known: the values are sent as they are.
        notify_action("generic", f"{downstream.url}/generic", template="{{ event.data.note }}"),
        # The built-in message escapes the event's id, which the sender chose too.
        notify_action("default", f"{downstream.url}/default", format="slack"),
    ]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_<!channel>", **HOSTILE))
        wait_until(lambda: set(delivery_states(gw, "evt_<!channel>").values()) == {"delivered"})

        assert slack.messages == [
            "<!here> &lt;!channel&gt; &amp; &lt;@U0123&gt; @everyone: &lt;https://evil.example|click here&gt;"
            " [click here](https://evil.example) &lt;@222222222222222222&gt; <https://shop.example/o/1|order>"
            " <@U0999>"
        ]
        [discord] = downstream.received("/discord")
        # A zero-width space keeps a mention from being one, and a masked link from being a link.
        assert discord.json() == {
            "content": "@here <!channel> & <@U0123> @\u200beveryone: <https://evil.example|click here>"
            " [click here]\u200b(https://evil.example) <@\u200b222222222222222222>"
            " [order](https://shop.example/o/1) <@111111111111111111> <@444444444444444444>",
            # Only the mentions the template wrote (or put in with |raw) may ping.
            "allowed_mentions": {
                "parse": ["everyone"],
                "users": ["111111111111111111", "444444444444444444"],
                "roles": [],
            },
        }
        [teams] = downstream.received("/teams")
        [block] = teams.json()["attachments"][0]["content"]["body"]
        assert block["text"] == (
            "**<!channel> & <@U0123> @everyone**: <https://evil.example|click here>"
            " [click here]\u200b(https://evil.example) <@222222222222222222> [order](https://shop.example/o/1)"
        )
        [generic] = downstream.received("/generic")
        assert generic.json()["text"] == HOSTILE["note"]
        [default] = downstream.received("/default")
        assert default.json() == {"text": "consignly consignment.created evt_&lt;!channel&gt; received"}


def test_a_value_inside_the_templates_own_angle_brackets_cannot_ping_in_slack(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # The template writes the `<` and `>` of a link, and the value goes between them: `!channel` there made
    # `<!channel>`, which pings the channel, with nothing of the value's to escape. A URL still makes a link.
    template = (
        "<{{ event.data.url }}|order> <{{ event.data.url }}> <{{ event.data.customer }}> <{{ event.data.note }}>"
        " <{{ event.data.oncall }}> <{{ event.data.channel }}|general> <{{ event.data.empty }}{{ event.data.here }}>"
    )
    values = {
        "url": "https://shop.example/o/1?a=1&b=2",
        "customer": "!channel",
        "note": "@U0123",
        "oncall": "!subteam^S0123",
        "channel": "#C0123",
        "empty": "",
        "here": "!here",
    }
    actions = [notify_action("slack", slack.url, format="slack", template=template)]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_bracketed", **values))
        wait_until(lambda: delivery_states(gw, "evt_bracketed") == {"slack": "delivered"})
    # A zero-width space before the value's `!`, `@` or `#`: Slack reads `<` followed by anything else as a
    # link, not a mention, and shows the space as nothing.
    assert slack.messages == [
        "<https://shop.example/o/1?a=1&amp;b=2|order> <https://shop.example/o/1?a=1&amp;b=2>"
        " <\u200b!channel> <\u200b@U0123> <\u200b!subteam^S0123> <\u200b#C0123|general> <\u200b!here>"
    ]


def test_a_value_a_template_builds_a_slack_link_of_keeps_the_link_working(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # `@name` right after the template's `<` would be a mention, inside a URL the template writes it is a path:
    # a zero-width space there would be part of the URL, and the link would lead nowhere.
    template = (
        "<https://x.example/{{ event.data.customer }}|profile> <https://x.example/?c={{ event.data.channel }}>"
        " {{ event.data.note }}"
    )
    values = {"customer": "@name", "channel": "#C0123", "note": "!channel"}
    actions = [notify_action("slack", slack.url, format="slack", template=template)]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_in_url", **values))
        wait_until(lambda: delivery_states(gw, "evt_in_url") == {"slack": "delivered"})
    assert slack.messages == ["<https://x.example/@name|profile> <https://x.example/?c=#C0123> !channel"]


def slack_sent(tmp_path: Path, slack: SlackWebhook, template: str, event_id: str, **values: Any) -> str:
    """The message a Slack notify with `template` posts for a Consignly event with `values` in its data."""
    actions = [notify_action("slack", slack.url, format="slack", template=template)]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id=event_id, **values))
        wait_until(lambda: delivery_states(gw, event_id) == {"slack": "delivered"})
    [message] = slack.messages
    return message


def test_a_value_cannot_complete_a_slack_mention_the_template_starts(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # The template's `<@` or `<!` followed by a value pings whom the sender chose: only a raw value may.
    template = (
        "<@{{ event.data.oncall }}> <!{{ event.data.customer }}> <!subteam^{{ event.data.note }}|team>"
        " <@{{ event.data.oncall|raw }}>"
    )
    values = {"oncall": "U0123", "customer": "channel", "note": "S0123"}
    assert slack_sent(tmp_path, slack, template, "evt_completed", **values) == (
        "<\u200b@U0123> <\u200b!channel> <\u200b!subteam^S0123|team> <@U0123>"
    )


def test_a_value_cannot_add_a_link_to_a_slack_date(tmp_path: Path, slack: SlackWebhook) -> None:
    # A `^` starts each further part of a `<!date^…>`, the third a link: a time not passed through `|int`
    # made the date a link the sender chose. The template's own parts, its link too, are left as written.
    template = (
        "<!date^{{ event.data.note }}^{date_short}|then>"
        " <!date^{{ event.data.time }}^{date_short}^https://shop.example/orders|{{ event.data.time }}>"
    )
    values = {"note": "1700000000^{date_short}^https://evil.example", "time": "1700000000"}
    assert slack_sent(tmp_path, slack, template, "evt_dated", **values) == (
        "<\u200b!date^1700000000^{date_short}^https://evil.example^{date_short}|then>"
        " <!date^1700000000^{date_short}^https://shop.example/orders|1700000000>"
    )


def test_a_value_after_a_templates_unclosed_angle_bracket_cannot_hide_a_later_slack_mention(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # A `<` of the template's that no `>` or `|` closes before its next `<` (a less-than sign): the value after
    # it and the next mention were read as one, and only its first `<` was broken up, so `<@U0999>` pinged.
    template = "Latency <{{ event.data.limit }} ms, owner <@{{ event.data.owner }}>"
    values = {"limit": "#1", "owner": "U0999"}
    assert slack_sent(tmp_path, slack, template, "evt_unclosed", **values) == (
        "Latency <\u200b#1 ms, owner <\u200b@U0999>"
    )


def test_what_a_filter_block_makes_of_its_values_is_escaped_as_a_value(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # `|striptags` takes the tags of the template's own `<b>` off and makes plain text of the escaped value: a
    # filter block printed that as it is, and the sender's link showed other text than where it led. What a
    # filter block keeps of the template's own text is still its own. A change of case leaves the escapes be.
    template = (
        "{% filter striptags %}<b>{{ event.data.note }}</b>{% endfilter %}"
        " {% filter trim %} <!here> {% endfilter %} {% filter upper %}{{ event.data.customer }}{% endfilter %}"
    )
    values = {"note": "<https://evil.example|Your invoice>", "customer": "a & b"}
    assert slack_sent(tmp_path, slack, template, "evt_filtered", **values) == (
        "&lt;https://evil.example|Your invoice&gt; <!here> A &amp; B"
    )


def test_a_change_of_case_over_a_blocks_values_changes_what_slack_shows_not_the_escapes(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # `&amp;` upper-cased is `&AMP;`, which Slack shows as it is; Jinja's title made plain text of a block's
    # escaped values, which was escaped again (`&amp;amp;`). Each changes the case of what the message shows.
    template = (
        "{% filter upper %}{{ event.data.customer }} &amp; co{% endfilter %}"
        " {% filter title %}{{ event.data.customer }}{% endfilter %}"
        " {% filter capitalize %}{{ event.data.note }}{% endfilter %}"
        " {% set who %}{{ event.data.customer }}{% endset %}{{ who.upper() }} {{ who.title() }} {{ who.swapcase() }}"
    )
    values = {"customer": "ann & <bob>", "note": "&IDLE <X>"}
    assert slack_sent(tmp_path, slack, template, "evt_cased", **values) == (
        "ANN &amp; &lt;BOB&gt; &amp; CO Ann &amp; &lt;Bob&gt; &amp;idle &lt;x&gt;"
        " ANN &amp; &lt;BOB&gt; Ann &amp; &lt;Bob&gt; ANN &amp; &lt;BOB&gt;"
    )


def test_a_value_a_blocks_text_is_indented_with_is_escaped(tmp_path: Path, slack: SlackWebhook) -> None:
    # Jinja's indent marks a text it indents escaped text with as escaped itself: the value was printed as it
    # is, and its link was a link.
    template = "{% set body %}a\nb{% endset %}{{ body|indent(event.data.note) }}"
    values = {"note": "<https://evil.example|Your invoice> "}
    assert slack_sent(tmp_path, slack, template, "evt_indented", **values) == (
        "a\n&lt;https://evil.example|Your invoice&gt; b"
    )


def test_a_message_built_up_line_by_line_in_a_loop_keeps_its_own_mentions_and_renders_in_time(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # Where a text is the template's own was copied whole each time a line was added to it: 2,000 lines of
    # each kind took past the second a render may run (a fifth of one without it), and the message ended dead.
    template = (
        "{% set ns = namespace(text='') %}{% for i in range(event.data.count) %}"
        "{% set line %}<!here>{{ i }}\n{% endset %}{% set ns.text = ns.text ~ line %}{% endfor %}"
        "{% set ns.block = '' %}{% for i in range(event.data.count) %}"
        "{% set ns.block %}{{ ns.block }}<@U1>{{ i }}\n{% endset %}{% endfor %}"
        "{{ ns.text }}{{ ns.block }}<{{ event.data.note }}>"
        # Two texts made of one: the second's own `!here>` is not the first's, which shares its start.
        "{% set lt %}<{% endset %}{% set value = lt ~ event.data.here %}{% set own %}{{ lt }}!here>{% endset %}"
        " {{ value }}> {{ own }}"
    )
    message = slack_sent(tmp_path, slack, template, "evt_lines", count=2000, note="!channel", here="!here")
    lines = message.split("\n")
    assert lines[:2] == ["<!here>0", "<!here>1"] and lines[1999:2001] == ["<!here>1999", "<@U1>0"]
    assert lines[-2:] == ["<@U1>1999", "<\u200b!channel> <\u200b!here> <!here>"] and len(lines) == 4001
    assert message.count("\u200b") == 2


def test_a_message_trimmed_or_added_to_at_its_start_in_a_loop_keeps_its_own_mentions_and_renders_in_time(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # Where a text is the template's own was worked out anew each time it was trimmed or a line was put before
    # it: 2,000 lines of each took past the second a render may run, and the message ended dead.
    template = (
        "{% set ns = namespace(text='', back='') %}{% for i in range(event.data.count) %}"
        "{% set line %}\n<!here>{{ i }}{{ event.data.note }}{% endset %}{% set ns.text = (ns.text ~ line)|trim %}"
        "{% set line %}<@U1>{{ i }}\n{% endset %}{% set ns.back = line ~ ns.back %}{% endfor %}"
        "{{ ns.text }}\n{{ ns.back }}"
    )
    message = slack_sent(tmp_path, slack, template, "evt_trimmed", count=2000, note=" <!channel>")
    lines = message.split("\n")
    assert lines[:2] == ["<!here>0 &lt;!channel&gt;", "<!here>1 &lt;!channel&gt;"] and len(lines) == 4000
    assert lines[1999:2001] == ["<!here>1999 &lt;!channel&gt;", "<@U1>1999"] and lines[-1] == "<@U1>0"
    assert "\u200b" not in message


def test_a_filter_over_a_blocks_values_cannot_make_a_slack_mention(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # What a block printed is escaped already: a filter that turns or cuts it round may bring a value's `!`
    # right after the template's `<`, as it may bring the template's own text next to a value's.
    template = (
        "{% set customer %}{{ event.data.customer }}{% endset %}<{{ customer|reverse }}>"
        " <{{ event.data.customer|reverse }}>"
        " {% set note %}<{{ event.data.note }}{% endset %}{{ note|replace('x', '') }}>"
        " {% set here %}!here{% endset %}<{{ here|upper|lower }}>"
    )
    values = {"customer": "lennahc!", "note": "x@U0123"}
    assert slack_sent(tmp_path, slack, template, "evt_turned", **values) == (
        "<\u200b!channel> <\u200b!channel> <\u200b@U0123> <\u200b!here>"
    )


def test_the_templates_own_slack_mentions_ping_wherever_it_writes_them(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # Written in a macro, a call block, a trimmed set block, in two pieces around an `{% if %}`, joined with a
    # value, or as a raw value: the template's own, and left as written. A date's `<!date^…>` pings nobody and
    # may take the event's time.
    template = (
        "{% macro alert(text) %}<!channel> {{ text }}{% endmacro %}{{ alert(event.data.customer) }}"
        " {% macro wrap() %}[{{ caller() }}]{% endmacro %}{% call wrap() %}<!here>{% endcall %}"
        " {% set lead %}\n  <@U0999> {{ event.data.customer }}\n{% endset %}{{ lead|trim }}"
        " {% set kept | trim %} <#C0999> {% endset %}{{ kept }}"
        " <{% if event.data.customer %}!{% endif %}everyone>"
        " {{ '<!subteam^S0999>'|raw ~ event.data.customer + '<@U0999>'|raw }}"
        " <!date^{{ event.data.note }}^{date_short}|{{ event.data.note }}>"
    )
    values = {"customer": "x", "note": "1700000000"}
    assert slack_sent(tmp_path, slack, template, "evt_own", **values) == (
        "<!channel> x [<!here>] <@U0999> x <#C0999> <!everyone> <!subteam^S0999>x<@U0999>"
        " <!date^1700000000^{date_short}|1700000000>"
    )


def test_a_values_private_use_characters_are_sent_as_they_are(
    tmp_path: Path, downstream: Downstream, slack: SlackWebhook
) -> None:
    # Nothing in the text marks where a value is: U+E000 is a character like any other, raw or not.
    mark = "\ue000"
    template = "<{{ event.data.customer }}> {{ event.data.note|raw }} @{{ event.data.oncall }}"
    values = {"customer": f"{mark}!channel", "note": f"a{mark}b", "oncall": f"{mark}here"}
    assert slack_sent(tmp_path, slack, template, "evt_private", **values) == (
        f"<{mark}!channel> a{mark}b @{mark}here"
    )
    assert discord_sent(tmp_path, downstream, template, "evt_private_discord", **values) == {
        "content": f"<{mark}!channel> a{mark}b @{mark}here",
        "allowed_mentions": {"parse": [], "users": [], "roles": []},
    }


def test_a_set_blocks_text_is_what_it_printed_to_filters_and_comparisons(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # What a block printed is the escaped text and nothing else: its length, a comparison and a URL built of it
    # see what the message shows.
    template = (
        "{% set who %}{{ event.data.customer }}{% endset %}"
        "{{ who|length }} {{ who == '@ann!#' }} {{ who|urlencode }} {{ who|wordcount }}"
    )
    assert (
        slack_sent(tmp_path, slack, template, "evt_block_text", customer="@ann!#") == "6 True %40ann%21%23 1"
    )


def test_a_slack_value_trimmed_or_cut_inside_a_template_stays_broken_up(
    tmp_path: Path, slack: SlackWebhook
) -> None:
    # What a block or a macro prints is escaped already, and a filter over it may take off what came before a
    # value's `!` or `@` (its own leading space, a character): that `!` or `@` must still not follow a `<`.
    template = (
        "{% set customer %}{{ event.data.customer }}{% endset %}<{{ customer|trim }}>"
        " {% macro show(text) %} {{ text }} {% endmacro %}<{{ show(event.data.note)|trim }}>"
        " {% set oncall %}{{ event.data.oncall }}{% endset %}<{{ oncall|replace('x', '') }}>"
    )
    values = {"customer": " !channel", "note": "\n@U0123", "oncall": "x!here"}
    actions = [notify_action("slack", slack.url, format="slack", template=template)]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_trimmed", **values))
        wait_until(lambda: delivery_states(gw, "evt_trimmed") == {"slack": "delivered"})
    assert slack.messages == ["<\u200b!channel> <\u200b@U0123> <\u200b!here>"]


def test_escaping_follows_values_through_filters_blocks_and_macros(
    tmp_path: Path, downstream: Downstream
) -> None:
    parts = [
        # What a macro or a block prints is escaped once, its own text not at all.
        "{% macro shout(text) %}<!here> {{ text|upper }}{% endmacro %}{{ shout(event.data.customer) }}",
        "{% set who %}<b>{{ event.data.customer }}</b>{% endset %}{{ who }}",
        # A text written inside {{ }} is a value, as in any Jinja template that escapes.
        "{{ '<' ~ event.data.customer ~ '>' }}",
        "{{ event.data.customer|replace(\"'\", '') }}",
        "{{ event.data.customer|replace('&', '&'|raw) }}",
        "{{ event.data.customer|truncate(12, True, '') }}",
        "{{ [event.data.customer, '<&>'|raw]|join(' < ') }}",
        "{{ shout('<x>') + event.data.customer }}",
        "{{ '%s & %s'|format(event.data.customer, 1) }}",
        "{{ event.data.customer|length }}",
        "{{ event.data|tojson }}",
    ]
    actions = [notify_action("slack", f"{downstream.url}/slack", format="slack", template=" | ".join(parts))]
    customer = "<!channel> & 'O\"Brien'"
    escaped = "&lt;!channel&gt; &amp; 'O\"Brien'"
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_filters", customer=customer))
        wait_until(lambda: delivery_states(gw, "evt_filters") == {"slack": "delivered"})
        [request] = downstream.received("/slack")
        assert request.json()["text"].split(" | ") == [
            "<!here> &lt;!CHANNEL&gt; &amp; 'O\"BRIEN'",
            f"<b>{escaped}</b>",
            f"&lt;{escaped}&gt;",
            '&lt;!channel&gt; &amp; O"Brien',
            "&lt;!channel&gt; & 'O\"Brien'",
            "&lt;!channel&gt; &amp;",
            f"{escaped} &lt; <&>",
            f"<!here> &lt;X&gt;{escaped}",
            f"{escaped} &amp; 1",
            str(len(customer)),
            # tojson writes <, > and & as \\u escapes already.
            '{"consignmentId": "550e8400-e29b-41d4-a716-446655440000", "customer":'
            ' "\\u003c!channel\\u003e \\u0026 \\u0027O\\"Brien\\u0027", "status": 1}',
        ]


def test_set_blocks_and_slices_print_what_they_take_escaped_where_values_are(
    tmp_path: Path, downstream: Downstream
) -> None:
    # What a `{% set %}` block captures and what a slice takes count against what a render holds, and print as
    # before: a slice of a value is a value, escaped; one of what a block printed is printed as it is.
    parts = [
        "{% set who %}<b>{{ event.data.customer }}</b>{% endset %}{{ who }}",
        "{% set ns = namespace(line='') %}{% set ns.line %}{{ event.data.customer }}!{% endset %}{{ ns.line }}",
        "{% set kept | trim %}  {{ event.data.customer }}  {% endset %}{{ kept }}",
        "{% for p in event.data.parcels %}{% set line %}[{{ p }}]{% endset %}{{ line }}{% endfor %}",
        "{{ event.data.customer[3:10] }}",
        "{{ event.data.customer[:3] }}",
        "{{ event.data.customer[::-1] }}",
        "{% set who %}<b>{{ event.data.customer }}</b>{% endset %}{{ who[:3] }}",
        "{{ event.data.parcels[1:]|join(',') }}",
        "{{ event.data.parcels[::2]|join(',') }}",
        "{{ 'abcdef'[1:4] }}",
    ]
    template = " | ".join(parts)
    actions = [
        notify_action("generic", f"{downstream.url}/generic", template=template),
        notify_action("slack", f"{downstream.url}/slack", format="slack", template=template),
    ]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        body = consignly_body(
            event_id="evt_sets", customer="<i>O'Brien & co</i>", parcels=["a", "b", "c", "d"]
        )
        send_consignly(gw, body)
        wait_until(lambda: delivery_states(gw, "evt_sets") == {"generic": "delivered", "slack": "delivered"})
        [generic] = downstream.received("/generic")
        [slack] = downstream.received("/slack")
    assert generic.json()["text"].split(" | ") == [
        "<b><i>O'Brien & co</i></b>",
        "<i>O'Brien & co</i>!",
        "<i>O'Brien & co</i>",
        "[a][b][c][d]",
        "O'Brien",
        "<i>",
        ">i/<oc & neirB'O>i<",
        "<b>",
        "b,c,d",
        "a,c",
        "bcd",
    ]
    escaped = "&lt;i&gt;O'Brien &amp; co&lt;/i&gt;"
    assert slack.json()["text"].split(" | ") == [
        f"<b>{escaped}</b>",
        f"{escaped}!",
        escaped,
        "[a][b][c][d]",
        "O'Brien",
        "&lt;i&gt;",
        "&gt;i/&lt;oc &amp; neirB'O&gt;i&lt;",
        "<b>",
        "b,c,d",
        "a,c",
        "bcd",
    ]


def discord_sent(tmp_path: Path, downstream: Downstream, template: str, event_id: str, **values: Any) -> Any:
    """What a Discord notify with `template` sends for a Consignly event with `values` in its data."""
    actions = [notify_action("discord", f"{downstream.url}/discord", format="discord", template=template)]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id=event_id, **values))
        wait_until(lambda: delivery_states(gw, event_id) == {"discord": "delivered"})
        [request] = downstream.received("/discord")
    return request.json()


def test_a_mention_split_across_two_values_does_not_ping(tmp_path: Path, downstream: Downstream) -> None:
    # Each value escaped on its own, and the mention only whole where the message puts them side by side.
    template = "{{ event.data.customer }}{{ event.data.note }}{{ event.data.oncall }}"
    parts = {"customer": "<@!", "note": "222222222222222222> @every", "oncall": "one <@&"}
    sent = discord_sent(tmp_path, downstream, template, "evt_split", **parts)
    assert sent["content"].replace("\u200b", "") == "<@!222222222222222222> @everyone <@&"
    assert sent["allowed_mentions"] == {"parse": [], "users": [], "roles": []}


def test_a_mention_split_after_the_templates_own_at_does_not_ping(
    tmp_path: Path, downstream: Downstream
) -> None:
    # The template's @, then `every` and `one` from two values: neither starts with the whole word.
    template = "@{{ event.data.customer }}{{ event.data.note }}"
    sent = discord_sent(tmp_path, downstream, template, "evt_split_at", customer="every", note="one")
    assert sent["content"] == "@\u200beveryone"
    assert sent["allowed_mentions"] == {"parse": [], "users": [], "roles": []}


def test_a_value_a_template_builds_a_discord_link_of_keeps_the_link_working(
    tmp_path: Path, downstream: Downstream
) -> None:
    # `here` or its start (`he`, Hebrew's language code) right after the template's @ would be a mention, in a
    # URL the template writes it is a path: a zero-width space there would be part of the URL.
    template = (
        "https://shop.example/{{ event.data.customer }}/o/1 {{ event.data.note }} @{{ event.data.oncall }}"
    )
    values = {"customer": "he", "note": "everyone", "oncall": "here"}
    assert discord_sent(tmp_path, downstream, template, "evt_discord_url", **values) == {
        "content": "https://shop.example/he/o/1 everyone @\u200bhere",
        "allowed_mentions": {"parse": [], "users": [], "roles": []},
    }


def test_a_filter_over_a_blocks_values_cannot_make_a_discord_mention(
    tmp_path: Path, downstream: Downstream
) -> None:
    # A filter over what a block printed may take out what kept a value's text from being a mention, turn it
    # round, or bring it right after the template's @: none pings, nor do the template's own `x@here` and
    # `everyone` that a filter made a mention of.
    template = (
        "{% set customer %}{{ event.data.customer }}{% endset %}@{{ customer|replace('x', '') }}"
        " {% set note %}{{ event.data.note }}{% endset %}{{ note|reverse }}"
        " {% set oncall %}{{ event.data.oncall }}{% endset %}{{ oncall.replace('x', '') }}"
        " {% set own %}x@here{% endset %}{{ own[1:] }} {% set word %}xeveryone{% endset %}@{{ word|replace('x', '') }}"
    )
    values = {"customer": "xeveryone", "note": "enoyreve@", "oncall": "<@x222222222222222222>"}
    assert discord_sent(tmp_path, downstream, template, "evt_discord_filtered", **values) == {
        "content": "@\u200beveryone @\u200beveryone <@\u200b222222222222222222> @\u200bhere @\u200beveryone",
        "allowed_mentions": {"parse": [], "users": [], "roles": []},
    }


def test_the_templates_own_discord_mentions_ping_and_a_values_do_not(
    tmp_path: Path, downstream: Downstream
) -> None:
    # A value after the template's `<@` would choose whom to ping; a raw one may, and the template's own text
    # in a macro or a trimmed block does.
    template = (
        "<@{{ event.data.oncall }}> <@&{{ event.data.oncall }}> <@{{ event.data.oncall|raw }}>"
        " {% macro alert() %}@here{% endmacro %}{{ alert() }}"
        " {% set lead %}\n <@&333333333333333333> {{ event.data.customer }}{% endset %}{{ lead|trim }}"
    )
    values = {"oncall": "222222222222222222", "customer": "@everyone"}
    assert discord_sent(tmp_path, downstream, template, "evt_discord_own", **values) == {
        "content": "<@\u200b222222222222222222> <@\u200b&222222222222222222> <@222222222222222222>"
        " @here <@&333333333333333333> @\u200beveryone",
        "allowed_mentions": {
            "parse": ["everyone"],
            "users": ["222222222222222222"],
            "roles": ["333333333333333333"],
        },
    }


def test_a_discord_value_trimmed_or_lower_cased_inside_a_template_stays_broken_up(
    tmp_path: Path, downstream: Downstream
) -> None:
    # What a block prints is escaped already, and a filter over it may make `everyone` of a value that did not
    # start with it (a leading space trimmed, `EVERYONE` lower-cased) right after a template's @.
    template = (
        "{% set customer %}{{ event.data.customer }}{% endset %}@{{ customer|trim }}"
        " {% set note %}{{ event.data.note }}{% endset %}@{{ note|lower }}"
    )
    values = {"customer": " everyone", "note": "HERE"}
    assert discord_sent(tmp_path, downstream, template, "evt_discord_trimmed", **values) == {
        "content": "@\u200beveryone @\u200bhere",
        "allowed_mentions": {"parse": [], "users": [], "roles": []},
    }


def test_what_a_block_prints_escapes_for_the_chat_what_it_is_formatted_with(
    tmp_path: Path, downstream: Downstream
) -> None:
    # A block called as `self.name()` prints Jinja's Markup, whose format and `%` escaped their values as HTML,
    # which leaves a Discord mention as it is.
    template = (
        "{% block line %}%s{% endblock %} | {{ self.line()|format(event.data.customer) }}"
        " | {{ self.line().replace('%s', event.data.customer) }}"
    )
    sent = discord_sent(
        tmp_path, downstream, template, "evt_block", customer="@everyone <@222222222222222222>"
    )
    escaped = "@\u200beveryone <@\u200b222222222222222222>"
    assert sent == {
        "content": f"%s | {escaped} | {escaped}",
        "allowed_mentions": {"parse": [], "users": [], "roles": []},
    }


def test_a_text_written_inside_braces_is_escaped_for_the_chat_not_as_html(
    tmp_path: Path, downstream: Downstream
) -> None:
    # A constant in `{{ }}` is a value like any other: Discord's escaping, not HTML's, which showed `&lt;b&gt;` and
    # left `@everyone` as it was, to ping.
    template = "{{ '<b>' }} {{ '@everyone' }} {{ '@here'|upper|lower }} {{ '@here'|raw }}"
    assert discord_sent(tmp_path, downstream, template, "evt_constants") == {
        "content": "<b> @\u200beveryone @\u200bhere @here",
        "allowed_mentions": {"parse": ["everyone"], "users": [], "roles": []},
    }


def test_a_teams_card_past_28_kb_is_cut_to_fit_as_valid_json(tmp_path: Path, downstream: Downstream) -> None:
    # 40,000 characters, 80 KB as sent: é is 2 bytes of UTF-8, and JSON escapes the quote as 2.
    template = """{{ event.id }} {{ 'é"' * 20000 }}"""
    actions = [notify_action("teams", f"{downstream.url}/teams", format="teams", template=template)]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_long_card"))
        wait_until(lambda: delivery_states(gw, "evt_long_card") == {"teams": "delivered"})
        [card] = downstream.received("/teams")
    # As long as fits: one more character (4 bytes at most) would take it past the cap.
    assert TEAMS_MAX_BYTES - 4 < len(card.body) <= TEAMS_MAX_BYTES
    [block] = card.json()["attachments"][0]["content"]["body"]
    full = "evt_long_card " + 'é"' * 20000
    assert block["text"].endswith("…")
    assert full.startswith(block["text"][:-1])
    assert block == {"type": "TextBlock", "text": block["text"], "wrap": True}


# -- failures ---------------------------------------------------------------------------------------------


def test_render_errors_end_dead_with_the_reason(tmp_path: Path, downstream: Downstream) -> None:
    actions = [
        # A typo: StrictUndefined makes it an error instead of an empty string in the message.
        notify_action(
            "typo", f"{downstream.url}/typo", template="Consignment\n{{ event.data.consignmentid }}"
        ),
        # The sandbox refuses to reach Python internals.
        notify_action("escape", f"{downstream.url}/escape", template="{{ event.id.__class__.__mro__ }}"),
        # Nothing to say for this event: skipped, not sent.
        notify_action(
            "quiet", f"{downstream.url}/quiet", template="{% if event.data.status == 9 %}lost{% endif %}"
        ),
    ]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_render", status=1))
        wait_until(
            lambda: (
                delivery_states(gw, "evt_render") == {"typo": "dead", "escape": "dead", "quiet": "skipped"}
            )
        )
        deliveries = {d.action: d for d in event_detail(gw, "evt_render").deliveries}
        assert deliveries["typo"].attempts == 1  # a template fails the same way every time: no retries
        assert deliveries["typo"].last_error == (
            "template line 2: UndefinedError: 'dict object' has no attribute 'consignmentid'"
        )
        assert "SecurityError" in (deliveries["escape"].last_error or "")
        assert deliveries["quiet"].last_error == "the template rendered an empty message"
        assert downstream.received() == []
        assert gw.metric("hookyard_deliveries_total", route="alerts", action="typo", outcome="dead") == 1
        assert gw.metric("hookyard_deliveries_total", route="alerts", action="quiet", outcome="skipped") == 1


def test_a_template_on_an_event_nested_too_deeply_to_render_ends_dead_with_that_reason(
    tmp_path: Path, downstream: Downstream
) -> None:
    # The gateway reads JSON nested up to 1024 levels; Python stops near its recursion limit when a template
    # writes the payload (tojson, or as text). The reason read as a RecursionError from the interpreter.
    actions = [
        notify_action("json", f"{downstream.url}/json", template="{{ event.data | tojson }}"),
        notify_action("text", f"{downstream.url}/text", template="{{ event.payload }}"),
        notify_action("plain", f"{downstream.url}/plain"),  # the default message names the event only
    ]
    deep = "[" * 1010 + "]" * 1010
    body = consignly_body(event_id="evt_deep", deep="DEEP").replace(b'"DEEP"', deep.encode())
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, body)
        wait_until(
            lambda: delivery_states(gw, "evt_deep") == {"json": "dead", "text": "dead", "plain": "delivered"}
        )
        deliveries = {d.action: d for d in event_detail(gw, "evt_deep").deliveries}
        for name in ("json", "text"):
            assert deliveries[name].attempts == 1
            assert deliveries[name].last_error == (
                "template line 1: RecursionError: the event (or the template's recursion) is nested too "
                "deeply to render"
            )


# Templates that make what a hostile payload says in one step: `n` is a width, `note` a text, `count` a number of
# items. For each: the message of a fair event (n=5, note "ok", count=3), and why a hostile one's delivery ends
# dead. Each filter, str method and operator whose result's length comes from an argument is here.
TEMPLATE_BOUNDS: dict[str, tuple[str, str, str]] = {
    "stars": ("{{ '*' * event.data.n }}", "*****", "* would make a str longer"),
    "center": ('[{{ "x"|center(event.data.n) }}]', "[  x  ]", "|center would make a str longer"),
    "indent": ('{{ "a\\nb"|indent(event.data.n) }}', "a\n     b", "|indent would make a str longer"),
    "format": ('[{{ "%*s"|format(event.data.n, "x") }}]', "[    x]", "|format would make a str longer"),
    "percent": ('{{ "%.*f" % (event.data.n, 1) }}', "1.00000", "% would make a str longer"),
    "power": ("{{ 2 ** event.data.n }}", "32", "** would make a number longer"),
    # len(note) ** 2: every position of the note becomes the note.
    "replace": (
        '{{ event.data.note|replace("", event.data.note) }}',
        "okookkok",
        "|replace would make a str longer",
    ),
    "str-replace": (
        '{{ event.data.note.replace("", event.data.note) }}',
        "okookkok",
        "str.replace would make a str longer",
    ),
    "wordwrap": (
        "{{ event.data.note|wordwrap(1, wrapstring=event.data.note) }}",
        "ookk",
        "|wordwrap would make a str longer",
    ),
    "join": ("{{ event.data.note|join(event.data.note) }}", "ookk", "|join would make a str longer"),
    "str-join": ("{{ event.data.note.join(event.data.note) }}", "ookk", "str.join would make a str longer"),
    "translate": (
        "{{ event.data.note.translate({111: event.data.note}) }}",
        "okk",
        "str.translate would make a str longer",
    ),
    "str-format": (
        '[{{ "{:>{}}".format("x", event.data.n) }}]',
        "[    x]",
        "str.format would make a str longer",
    ),
    "str-format-repeat": (
        '{{ ("{0}" * event.data.note|length).format(event.data.note) }}',
        "okok",
        "str.format would make a str longer",
    ),
    # In a loop, where Jinja gives a call keyword arguments of its own.
    "ljust": (
        '{% for _ in [1] %}[{{ "x".ljust(event.data.n) }}]{% endfor %}',
        "[x    ]",
        "str.ljust would make a str longer",
    ),
    "rjust": ('[{{ "x".rjust(event.data.n) }}]', "[    x]", "str.rjust would make a str longer"),
    "str-center": ('[{{ "x".center(event.data.n) }}]', "[  x  ]", "str.center would make a str longer"),
    "zfill": ('{{ "1".zfill(event.data.n) }}', "00001", "str.zfill would make a str longer"),
    "expandtabs": (
        '[{{ "\\tx".expandtabs(event.data.n) }}]',
        "[     x]",
        "str.expandtabs would make a str longer",
    ),
    "tojson": ("{{ [1]|tojson(indent=event.data.n) }}", "[\n     1\n]", "|tojson would make a str longer"),
    "urlize": (
        '{{ ("www.a.com " * 1000)|urlize(target=event.data.note)|length }}',
        "69000",
        "|urlize would make a str longer",
    ),
    "batch": ("{{ [1]|batch(event.data.count, 0)|first|length }}", "3", "|batch would make a list longer"),
    "slice": ("{{ [1]|slice(event.data.count)|list|length }}", "3", "|slice would make a list longer"),
    "sum": (
        "{% set chars = event.data.note|list %}{{ [chars, chars, chars]|sum(start=[])|length }}",
        "6",
        "|sum would make a list longer",
    ),
    # A list holds one text many times at the cost of a reference each, and costs the whole text each time
    # once written: its length is what it is written as.
    "list-repeat": (
        "{{ ([event.data.note] * event.data.times)|length }}",
        "3",
        "* would make a list longer",
    ),
    # Measured as written, not beyond: 30,000 zeros are 90,000 characters, the brackets once. Each copy's
    # brackets and each 0 as two digits made them 180,000, and refused them.
    "list-repeat-numbers": (
        "{{ ([0] * event.data.count * 10000)|length }}",
        "30000",
        "* would make a list longer",
    ),
    "view-repeat": (
        "{{ ([event.data.values()] * 100)|length }}",
        "100",
        "* would make a list longer",
    ),
    "list-add": (
        "{% set ns = namespace(items=[event.data.note]) %}"
        '{% for _ in "12345" %}{% set ns.items = ns.items + ns.items %}{% endfor %}{{ ns.items|length }}',
        "32",
        "+ would make a list longer",
    ),
    # A text doubled at each step: forty steps would make a terabyte.
    "str-add": (
        "{% set ns = namespace(text=event.data.note) %}"
        '{% for _ in "12345" %}{% set ns.text = ns.text + ns.text %}{% endfor %}{{ ns.text|length }}',
        "64",
        "+ would make a str longer",
    ),
    "concat": (
        "{% set ns = namespace(text=event.data.note) %}"
        '{% for _ in "12345" %}{% set ns.text = ns.text ~ ns.text %}{% endfor %}{{ ns.text|length }}',
        "64",
        "~ would make a str longer",
    ),
    # What a macro or a block prints, doubled at each step.
    "macro-output": (
        "{% macro twice(text) %}{{ text }}{{ text }}{% endmacro %}{% set ns = namespace(text=event.data.note) %}"
        '{% for _ in "12345" %}{% set ns.text = twice(ns.text) %}{% endfor %}{{ ns.text|length }}',
        "64",
        "a macro or block would make a str longer",
    ),
    "block-set": (
        '{% set ns = namespace(text=event.data.note) %}{% for _ in "12345" %}'
        "{% set ns.text %}{{ ns.text }}{{ ns.text }}{% endset %}{% endfor %}{{ ns.text|length }}",
        "64",
        "a macro or block would make a str longer",
    ),
    "fromkeys": (
        "{{ {}.fromkeys(range(event.data.times), event.data.note)|length }}",
        "3",
        "dict.fromkeys would make a dict longer",
    ),
    "batch-fill": (
        "{{ [1]|batch(event.data.times, event.data.note)|first|length }}",
        "3",
        "|batch would make a list longer",
    ),
    "lipsum": (
        "{{ lipsum(1, false, event.data.count, event.data.count + 1)|wordcount }}",
        "3",
        "lipsum() would make a str longer",
    ),
}


def test_a_template_cannot_blow_up_on_a_hostile_payload(tmp_path: Path, downstream: Downstream) -> None:
    # Templates run on the event loop over what any sender writes: what they may make is bounded. A step that
    # would make too much is refused before it runs: `"x"|center(10**9)` took a gigabyte at once, before the
    # message's length was checked, and could stop the gateway (and every webhook) for want of memory.
    actions = [
        notify_action(name, f"{downstream.url}/{name}", template=template)
        for name, (template, _, _) in TEMPLATE_BOUNDS.items()
    ]
    # Made a piece at a time, a message is stopped as it grows past the bound.
    actions.append(
        notify_action(
            "echo",
            f"{downstream.url}/echo",
            template="{% for _ in range(event.data.times) %}{{ event.data.note }}{% endfor %}",
        )
    )
    # Each step within its bound, but a list keeps what each made: 100,000 of them would hold 10 GB.
    actions.append(
        notify_action(
            "made",
            f"{downstream.url}/made",
            template='{{ range(event.data.times)|map("center", 99)|list|map("length")|sum }}',
        )
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_fair", n=5, note="ok", count=3, times=3))
        # Without the bounds, each would make about 100 MB (the payload could as well say 10**9).
        # range() is bounded by the sandbox itself (100,000), but not what the loop prints.
        hostile = consignly_body(
            event_id="evt_hostile", n=10**8, note="o" * 10_000, count=200_000, times=100_000
        )
        send_consignly(gw, hostile)
        wait_until(lambda: set(delivery_states(gw, "evt_fair").values()) == {"delivered"})
        # Generous, for the bounds' absence to show as the reasons below: with them, this takes a second.
        wait_until(
            lambda: set(delivery_states(gw, "evt_hostile").values()) <= {"dead", "delivered"}, timeout=60
        )
        refused = {d.action: (d.attempts, d.last_error) for d in event_detail(gw, "evt_hostile").deliveries}
        assert refused == {
            **{
                name: (1, f"template line 1: SecurityError: {reason} than 100000")
                for name, (_, _, reason) in TEMPLATE_BOUNDS.items()
            },
            "echo": (1, "template: ValueError: the message is longer than 100000 characters"),
            "made": (
                1,
                "template line 1: SecurityError: |center would take what this render made past 1000000 characters",
            ),
        }
        messages = {r.path.removeprefix("/"): r.json()["text"] for r in downstream.received()}
        assert messages == {
            **{name: message for name, (_, message, _) in TEMPLATE_BOUNDS.items()},
            "echo": "okokok",
            "made": "297",
        }


def test_a_template_that_loops_over_a_large_payload_is_stopped_and_the_gateway_answers(
    tmp_path: Path, downstream: Downstream
) -> None:
    # Fine for the few parcels of a consignment, unbounded on what a sender may put in a payload: rendered on
    # the event loop, they held every webhook, /healthz and /metrics for minutes, printing next to nothing.
    # The bound on iterations stops each render within about 0.4 s of processor time, before the bound on
    # time, which has a test of its own.
    actions = [
        # Quadratic in the parcels: 400 million iterations for 20,000.
        notify_action(
            "twice",
            f"{downstream.url}/twice",
            template=(
                "{% for a in event.data.parcels %}{% set i = loop.index %}{% for b in event.data.parcels %}"
                "{% if loop.index > i and a == b %}{{ a }} sent twice{% endif %}{% endfor %}{% endfor %}"
            ),
        ),
        # A recursive loop's inner levels: iterated by loop(), not by a `{% for %}`.
        notify_action(
            "tree",
            f"{downstream.url}/tree",
            template=(
                "{% for p in event.data.parcels recursive %}{% if loop.depth == 1 %}"
                "{{ loop(event.data.parcels) }}{% elif loop.first %}{{ p }}{% endif %}{% endfor %}"
            ),
        ),
        # No loop at all: a macro that calls itself twice, 2**40 calls.
        notify_action(
            "split",
            f"{downstream.url}/split",
            template=(
                "{% macro split(n) %}{% if n %}{{ split(n - 1) }}{{ split(n - 1) }}{% endif %}{% endmacro %}"
                "{{ split(event.data.depth) }}{{ event.data.depth }} levels"
            ),
        ),
        # A filter's or test's pass over a list, item by item: 20,000 passes over 20,000 parcels.
        notify_action(
            "dupes",
            f"{downstream.url}/dupes",
            template=(
                "{% for p in event.data.parcels %}"
                '{% if event.data.parcels|select("eq", p)|list|length > 1 %}{{ p }}!{% endif %}{% endfor %}'
            ),
        ),
    ]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        # Answered at all is what this asks: the renders' 1.6 s or so of one core can pass the client's
        # 10 s on a machine busy with other work.
        gw.client.timeout = httpx.Timeout(60)
        parcels = [f"p{i}" for i in range(20_000)]
        send_consignly(gw, consignly_body(event_id="evt_large", parcels=parcels, depth=40))
        # Sent while the first is rendered: answered, and notified.
        send_consignly(gw, consignly_body(event_id="evt_small", parcels=["p1", "p2", "p1"], depth=2))
        assert gw.client.get(gw.ops_url + "/healthz").status_code == 200
        wait_until(lambda: set(delivery_states(gw, "evt_large").values()) == {"dead"})
        wait_until(lambda: set(delivery_states(gw, "evt_small").values()) == {"delivered"})
        # Past the bound, the render is refused: dead at once, as the same payload would go past it again.
        for large in event_detail(gw, "evt_large").deliveries:
            assert (large.attempts, large.last_error) == (
                1,
                "template line 1: SecurityError: more than 100000 loop iterations and calls",
            )
            assert (
                gw.metric("hookyard_deliveries_total", route="alerts", action=large.action, outcome="dead")
                == 1
            )
        assert sorted(r.json()["text"] for r in downstream.received()) == [
            "2 levels",
            "p1 sent twice",
            "p1!p1!",
            "p1p1p1",
        ]


def test_a_template_that_scans_the_payload_in_every_iteration_is_stopped_after_a_second(
    tmp_path: Path, downstream: Downstream
) -> None:
    # Few iterations, each over a whole list of the payload: 25,000 parcels looked up among 60,000 flagged ones
    # are 1.5 billion comparisons, some ten seconds of the event loop, within the bound on iterations.
    action = notify_action(
        "flagged",
        f"{downstream.url}/flagged",
        template=(
            "{% for p in event.data.parcels %}{% if p in event.data.flagged %}{{ p }} is flagged"
            "{% endif %}{% endfor %}"
        ),
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", action)])) as gw:
        parcels = [f"p{i:05}" for i in range(25_000)]
        flagged = [f"f{i:05}" for i in range(60_000)]
        send_consignly(gw, consignly_body(event_id="evt_scan", parcels=parcels, flagged=flagged))
        send_consignly(gw, consignly_body(event_id="evt_fine", parcels=["p1", "p2"], flagged=["p2"]))
        wait_until(lambda: delivery_states(gw, "evt_scan") == {"flagged": "dead"})
        wait_until(lambda: delivery_states(gw, "evt_fine") == {"flagged": "delivered"})
        [scan] = event_detail(gw, "evt_scan").deliveries
        assert (scan.attempts, scan.last_error) == (
            1,
            "template line 1: SecurityError: rendering took more than 1 s of processor time",
        )
        assert [r.json()["text"] for r in downstream.received()] == ["p2 is flagged"]


def test_a_render_is_bounded_by_its_processor_time_not_by_the_wall_time_a_busy_host_stretches_it_to() -> None:
    # On a host busy with other work, the event loop's thread waits for a core in the middle of a render: a
    # render of 0.15 s took 0.46 s. Bounded by the wall clock, a message that renders in time was failed, for
    # good, on a busy enough host. A value that sleeps as it is printed stands for that wait: wall time passes
    # with next to no processor time.
    from gateway import templates

    class Waiting:
        def __str__(self) -> str:
            time.sleep(0.05)
            return "x"

    template = templates.compile_template("{% for i in range(40) %}{{ event.data.value }}{% endfor %}", None)
    started = time.monotonic()
    assert templates.render(template, {"event": {"data": {"value": Waiting()}}}) == "x" * 40
    assert time.monotonic() - started > templates.MAX_RENDER_SECONDS  # it did wait past the bound


def test_an_event_id_that_cannot_be_a_header_ends_dead_without_a_request(
    tmp_path: Path, downstream: Downstream
) -> None:
    # The id is sent as x-hookyard-event-id: with a line break in it no request can carry it, on any attempt.
    # The built-in providers refuse such an id at the door; a provider plugin may let it through.
    action = notify_action("alert", f"{downstream.url}/slack", format="slack")
    config = gateway_config(tmp_path, routes=[route("consignly", action)])
    with RunningGateway(config, pm=with_unchecked_ids(config)) as gw:
        send_consignly(gw, consignly_body(event_id="evt_1\r\nx-injected: 1"))
        wait_until(lambda: delivery_states(gw, "evt_1\r\nx-injected: 1") == {"alert": "dead"})
        [alert] = event_detail(gw, "evt_1\r\nx-injected: 1").deliveries
        assert alert.attempts == 1
        assert alert.last_error == (
            "header 'x-hookyard-event-id' cannot be sent: its value holds a carriage return ('\\r')"
        )
        assert downstream.received() == []


@pytest.mark.parametrize("char", ["\x01", "\x7f"], ids=["control", "delete"])
def test_an_event_id_with_a_control_character_ends_dead_naming_the_header(
    tmp_path: Path, downstream: Downstream, char: str
) -> None:
    # RFC 9110 allows no control character but the tab in a field value. Only CR, LF and NUL were refused:
    # the others went out, for the chat's server to refuse or take as it would.
    action = notify_action("alert", f"{downstream.url}/slack", format="slack")
    config = gateway_config(tmp_path, routes=[route("consignly", action)])
    event_id = f"evt_1{char}"
    with RunningGateway(config, pm=with_unchecked_ids(config)) as gw:
        send_consignly(gw, consignly_body(event_id=event_id))
        wait_until(lambda: delivery_states(gw, event_id) == {"alert": "dead"})
        [alert] = event_detail(gw, event_id).deliveries
        assert (alert.attempts, alert.last_error) == (
            1,
            f"header 'x-hookyard-event-id' cannot be sent: its value holds a control character ({char!r})",
        )
        assert downstream.received() == []


def test_a_500_from_the_chat_webhook_is_retried(tmp_path: Path, downstream: Downstream) -> None:
    downstream.answer("/slack", 500, (429, {"Retry-After": "0"}), 200)
    action = notify_action("alert", f"{downstream.url}/slack", format="slack")
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignease", action)])) as gw:
        send_consignease(gw, "msg_chat_down")
        wait_until(lambda: delivery_states(gw, "msg_chat_down") == {"alert": "delivered"})
        received = downstream.received("/slack")
        assert [r.json() for r in received] == [
            {"text": "consignease user.created msg_chat_down received"}
        ] * 3
        [history] = event_detail(gw, "msg_chat_down").attempts.values()
        assert [(a.outcome, a.status_code) for a in history] == [
            ("retry", 500),
            ("retry", 429),
            ("delivered", 200),
        ]


def test_a_refusal_from_slack_is_dead_and_says_what_slack_said(tmp_path: Path, slack: SlackWebhook) -> None:
    # A webhook that was removed: Slack answers 404 `no_service`, which no retry changes. "HTTP 404" alone
    # did not tell a revoked webhook from an archived channel (410 `channel_is_archived`) or a bad payload.
    alert = only_attempt(tmp_path, slack.url.replace("/B0002/", "/B0003/"), "msg_removed")
    assert (alert.attempts, alert.last_status, alert.last_error) == (1, 404, "HTTP 404: no_service")
    assert slack.refused == [(404, "no_service")]


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        # Discord's JSON error.
        (
            400,
            b'{"message": "Cannot send an empty message", "code": 50006}',
            "HTTP 400: Cannot send an empty message",
        ),
        # A Teams Workflows (Power Automate) trigger's.
        (
            400,
            b'{"error": {"code": "TriggerInputSchemaMismatch", "message": "The input body for trigger '
            b"'manual' of type 'Request' did not match its schema definition.\"}}",
            "HTTP 400: The input body for trigger 'manual' of type 'Request' did not match its schema "
            "definition.",
        ),
        # The API's own, {"ok": false, "error": ...}.
        (403, b'{"ok": false, "error": "action_prohibited"}', "HTTP 403: action_prohibited"),
        # Text on several lines, on one; past 200 characters, cut.
        (410, b"channel_is_archived\r\n", "HTTP 410: channel_is_archived"),
        (400, b"bad\n\tpayload \x01" + b"x" * 300, "HTTP 400: bad payload " + "x" * 187 + "\u2026"),
        # A page (a proxy's), an empty body, or JSON that says nothing of the kind: the status alone.
        (404, b"<html><body><h1>404 Not Found</h1></body></html>", "HTTP 404"),
        (404, b"", "HTTP 404"),
        (404, b"{}", "HTTP 404"),
    ],
    ids=["discord", "teams", "slack-api", "text", "long-text", "html", "empty", "json"],
)
def test_a_refusal_says_what_the_chat_webhook_answered(
    tmp_path: Path, status: int, body: bytes, error: str
) -> None:
    def answer(conn: socket.socket) -> None:
        head = f"HTTP/1.1 {status} Refused\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    with raw_server(answer) as url:
        alert = only_attempt(tmp_path, f"{url}/hook", "msg_refused")
    assert (alert.attempts, alert.last_status, alert.last_error) == (1, status, error)


@pytest.mark.parametrize("echoed", ["path", "url", "unquoted"])
def test_a_refusal_that_echoes_the_webhook_url_is_reported_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, echoed: str
) -> None:
    # A chat webhook's path is its credential, kept out of every error; a server that names it in its
    # refusal ("Cannot POST /services/..."), or the whole URL, must not put it there either.
    secret = "services/T0001/B0002/abc%20def?key=xyz"
    caplog.set_level(logging.INFO)
    seen: list[str] = []

    def answer(conn: socket.socket) -> None:
        text = {"path": f"Cannot POST /{secret}", "url": f"no such hook: {seen[0]}/{secret}"}.get(
            echoed, "Cannot POST /services/T0001/B0002/abc def?key=xyz"
        )
        body = text.encode()
        head = f"HTTP/1.1 404 Not Found\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    with raw_server(answer) as url:
        seen.append(url)
        alert = only_attempt(tmp_path, f"{url}/{secret}", "msg_echoed")
    expected = {
        "path": "HTTP 404: Cannot POST /…",
        "url": f"HTTP 404: no such hook: {url}/…",
        "unquoted": "HTTP 404: Cannot POST /…",
    }[echoed]
    assert alert.last_error == expected
    # Nor in the gateway's log (its fields are the records' attributes). httpx's own logger names every
    # request's URL, and the gateway sets it to WARNING.
    logged = [str(vars(record)) for record in caplog.records if record.name.startswith("hookyard")]
    assert logged and not any("T0001" in text for text in logged)


@pytest.mark.parametrize(
    ("headers", "echoed", "error"),
    [
        ({"X-Api-Key": "key-8f2b6c1d9e"}, "invalid key key-8f2b6c1d9e", "invalid key …"),
        ({"Authorization": "Bearer tok-5a7c3e9f1b"}, "invalid token tok-5a7c3e9f1b", "invalid token …"),
        ({"Authorization": "Bearer tok-5a7c3e9f1b"}, "you sent: Bearer tok-5a7c3e9f1b", "you sent: …"),
        # A value too short to be a credential (a version, a flag) stays: hidden, it would blank every
        # place the same few characters stand in the reason.
        (
            {"X-Api-Version": "2", "Accept": "application/json", "X-Api-Key": "key-8f2b6c1d9e"},
            "version 2 wants application/json; invalid key key-8f2b6c1d9e",
            "version 2 wants application/json; invalid key …",
        ),
    ],
    ids=["api-key", "bearer-token", "whole-value", "short-values-stay"],
)
def test_a_refusal_that_echoes_a_configured_header_is_reported_without_its_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, headers: dict[str, str], echoed: str, error: str
) -> None:
    # `headers` is where a chat webhook's credential goes (the URL refuses one): an API that repeats what
    # it was sent in its refusal must not put the key into the attempt's error, which the admin API and
    # the log show.
    caplog.set_level(logging.INFO)
    secret = echoed.rpartition(" ")[2]

    def answer(conn: socket.socket) -> None:
        body = json.dumps({"error": echoed}).encode()
        head = f"HTTP/1.1 401 Unauthorized\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    with raw_server(answer) as url:
        alert = only_attempt(tmp_path, f"{url}/hook", "msg_key_echoed", headers=headers)
    assert alert.last_error == f"HTTP 401: {error}"
    logged = [str(vars(record)) for record in caplog.records if record.name.startswith("hookyard")]
    assert logged and not any(secret in text for text in logged)


def only_attempt(tmp_path: Path, url: str, msg_id: str, **options: Any) -> Any:
    """The delivery of one event to a notify action at `url` that has no retries, once it is dead."""
    config = gateway_config(
        tmp_path, routes=[route("consignease", notify_action("alert", url, format="slack", **options))]
    )
    config["defaults"]["retry"]["schedule"] = []
    with RunningGateway(config) as gw:
        send_consignease(gw, msg_id)
        wait_until(lambda: delivery_states(gw, msg_id) == {"alert": "dead"})
        [alert] = event_detail(gw, msg_id).deliveries
    return alert


def test_an_answer_that_is_not_http_is_reported_without_the_webhook_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A chat webhook's URL is its credential: an unreadable answer must not put it in the attempt's error
    # (the admin API shows it) nor in the log.
    secret = "services/T0001/B0002/abcdefghijklmnopqrstuvwx"
    caplog.set_level(logging.INFO)
    with raw_server(lambda conn: conn.sendall(b"NOT-HTTP\r\n\r\n")) as url:
        alert = only_attempt(tmp_path, f"{url}/{secret}", "msg_garbled")
    error = alert.last_error or ""
    assert error.startswith("gave up after 1 attempt: RemoteProtocolError: invalid answer: Bad status line")
    # aiohttp's message, on one line, and without the caret it draws under the fault.
    assert "\n" not in error and error.endswith("b'NOT-HTTP'")
    assert secret not in error
    assert secret not in caplog.text  # messages and tracebacks


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_chat_webhook_that_drops_the_connection_is_not_reported_as_a_timeout(
    tmp_path: Path, reset: bool
) -> None:
    # The transport maps a connection the receiver closed or reset to a ConnectTimeout; it happened at once,
    # and the error must say so rather than send the operator looking for a slow receiver.
    def drop(conn: socket.socket) -> None:
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    with raw_server(drop) as url:
        alert = only_attempt(tmp_path, f"{url}/hook", "msg_dropped")
    assert (alert.last_error or "").startswith(
        "gave up after 1 attempt: connection closed before the answer: "
    )
    assert "timeout" not in (alert.last_error or "").lower()


def test_a_204_that_announces_a_body_costs_its_connection_and_the_next_message_is_sent_once(
    tmp_path: Path,
) -> None:
    head = b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"
    requests: list[str] = []  # each request: the first on its connection, or a next one

    def answer(conn: socket.socket) -> None:
        requests.append("first")
        conn.sendall(head)
        while conn.recv(65536):
            requests.append("next")
            # The announced body comes late: a client that kept the connection reads it as this answer's start.
            conn.sendall(b"hello" + head)

    config = gateway_config(
        tmp_path, routes=[route("consignease", notify_action("alert", "", format="slack"))]
    )
    config["defaults"]["retry"]["schedule"] = []
    with raw_server(answer) as url:
        config["routes"][0]["actions"][0]["with"]["url"] = f"{url}/hook"
        with RunningGateway(config) as gw:
            for msg_id in ("msg_first", "msg_second"):
                send_consignease(gw, msg_id)
                wait_until(lambda m=msg_id: delivery_states(gw, m)["alert"] in ("delivered", "dead"))
                assert delivery_states(gw, msg_id) == {"alert": "delivered"}
    assert requests == ["first", "first"]


def kept_connection_receiver(requests: list[str], *, new_ones_fail: bool = False) -> Any:
    """A raw receiver's `answer` (raw_server) that answers `ok` on a new connection, keeps it open, and
    closes it without answering when the next request comes on it: a receiver whose keep-alive timeout
    (uvicorn's and Node.js's 5 s, gunicorn's 2 s) ran out just as the gateway sent on the connection, too
    late for the gateway to have seen the close. `new_ones_fail`: once one was answered, a new connection
    is closed unanswered too. Records "new" and "kept" for each request."""
    answered: list[bool] = []

    def answer(conn: socket.socket) -> None:
        requests.append("new")
        if new_ones_fail and answered:
            return
        answered.append(True)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        conn.settimeout(10)
        with contextlib.suppress(OSError):  # the gateway closed it, or sent nothing more within 10 s
            if conn.recv(65536):
                requests.append("kept")

    return answer


def test_a_message_sent_on_a_kept_connection_the_receiver_closed_is_delivered_at_its_first_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The pool's connection looked open, the receiver had closed it: the POST failed before any answer, and
    # was logged as a failure and sent again only after the schedule's first delay. The receiver never saw
    # it, so it is sent again at once, on a new connection.
    requests: list[str] = []
    config = gateway_config(
        tmp_path, routes=[route("consignease", notify_action("alert", "", format="slack"))]
    )
    config["defaults"]["retry"]["schedule"] = ["5s"]
    caplog.set_level(logging.INFO)
    with raw_server(kept_connection_receiver(requests)) as url:
        config["routes"][0]["actions"][0]["with"]["url"] = f"{url}/hook"
        with RunningGateway(config) as gw:
            for msg_id in ("msg_first", "msg_second"):
                send_consignease(gw, msg_id)
                wait_until(lambda m=msg_id: delivery_states(gw, m)["alert"] in ("delivered", "dead"))
                [history] = event_detail(gw, msg_id).attempts.values()
                assert [(a.outcome, a.status_code, a.error) for a in history] == [("delivered", 200, None)]
    assert requests == ["new", "kept", "new"]
    assert not [r for r in caplog.records if r.name.startswith("hookyard") and r.levelno >= logging.WARNING]


def test_a_receiver_that_closes_new_connections_unanswered_too_fails_the_attempt(tmp_path: Path) -> None:
    # Sent again on a new connection only when the one it failed on had been kept: a receiver that drops
    # every request fails the attempt after that one more, and its schedule decides the rest.
    requests: list[str] = []
    with raw_server(kept_connection_receiver(requests, new_ones_fail=True)) as url:
        config = gateway_config(
            tmp_path, routes=[route("consignease", notify_action("alert", f"{url}/hook", format="slack"))]
        )
        config["defaults"]["retry"]["schedule"] = []
        with RunningGateway(config) as gw:
            send_consignease(gw, "msg_first")
            wait_until(lambda: delivery_states(gw, "msg_first")["alert"] in ("delivered", "dead"))
            send_consignease(gw, "msg_second")
            wait_until(lambda: delivery_states(gw, "msg_second")["alert"] in ("delivered", "dead"))
            [history] = event_detail(gw, "msg_second").attempts.values()
    assert [(a.outcome, a.status_code) for a in history] == [("dead", None)]
    assert (history[0].error or "").startswith("gave up after 1 attempt: connection closed before the answer")
    assert requests == ["new", "kept", "new"]


def test_a_plugins_post_through_the_shared_session_is_sent_again_unless_its_body_was_a_stream() -> None:
    # Resources.session is the pool under Resources.http: a plugin that uses aiohttp's API gets the same. A
    # body read from a stream once cannot be sent again: that request fails, as it did.
    import aiohttp

    from gateway.actions import Resources
    from gateway.http_client import HttpClient, default_ssl_context

    async def stream() -> Any:
        yield b"streamed"

    async def post(url: str, body: Any) -> int | str:
        client = HttpClient(ssl_context=default_ssl_context(), user_agent="hookyard/test")
        resources = Resources(
            client=client, user_agent="hookyard/test", ssl_context=client.ssl_context, pool=4
        )
        try:
            async with resources.session.post(url, data=b"first") as response:
                await response.read()
            async with resources.session.post(url, data=body, allow_redirects=False) as response:
                return response.status
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # The receiver's close reaches the pool as an end of the connection or, when part of the
            # streamed body was still unread in its socket, as a reset: either way the send failed.
            return "failed"
        finally:
            await resources.aclose()

    for body, status, sent in [
        (b"second", 200, ["new", "kept", "new"]),
        (stream(), "failed", ["new", "kept"]),
    ]:
        requests: list[str] = []
        with raw_server(kept_connection_receiver(requests)) as url:
            assert asyncio.run(asyncio.wait_for(post(url, body), 10)) == status
        assert requests == sent


def test_a_request_a_receiver_takes_and_dies_on_is_sent_once_more_not_once_per_kept_connection() -> None:
    # A receiver that takes each request on a kept connection and then closes it unanswered (a worker that
    # dies after its side effect) looks like one whose keep-alive ran out. With four kept connections in
    # the pool, each send took the next one: the request was taken five times. Once more, then it raises.
    import aiohttp

    from gateway.actions import Resources
    from gateway.http_client import HttpClient, default_ssl_context

    taken: list[bytes] = []
    first_four = threading.Barrier(4, timeout=10)  # the four warm-ups at once: four connections kept

    def connection(conn: socket.socket) -> None:
        with conn:
            for number in range(2):
                request = conn.recv(65536)
                if not request:
                    return
                body = request.rpartition(b"\r\n\r\n")[2]
                taken.append(body)
                if number == 0:  # a new connection's request is answered
                    if body == b"warm-up":
                        first_four.wait()
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=connection, args=(listener.accept()[0],), daemon=True).start()

    async def post_after_warming_up(url: str) -> str:
        client = HttpClient(ssl_context=default_ssl_context(), user_agent="hookyard/test")
        resources = Resources(
            client=client, user_agent="hookyard/test", ssl_context=client.ssl_context, pool=4
        )

        async def post(body: bytes) -> int:
            async with resources.session.post(url, data=body) as response:
                await response.read()
                return response.status

        try:
            assert await asyncio.gather(*(post(b"warm-up") for _ in range(4))) == [200] * 4
            return str(await post(b"payment"))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):  # an end or a reset alike
            return "failed"
        finally:
            await resources.aclose()

    threading.Thread(target=accept, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
        assert asyncio.run(asyncio.wait_for(post_after_warming_up(url), 20)) == "failed"
    finally:
        listener.close()
    assert taken.count(b"payment") == 2


@pytest.mark.parametrize("body", ["endless", "cut-short"])
def test_a_2xx_whose_body_does_not_come_whole_is_delivered_once(tmp_path: Path, body: str) -> None:
    # The status decides, as for forward. httpx read an answer's body whole, into memory, for as long as
    # it came: an endless one took a gigabyte in 3 s from a receiver on loopback, until the attempt timed
    # out; one cut short failed the attempt. Either way the message was posted again with every retry.
    requests: list[float] = []

    def answer(conn: socket.socket) -> None:
        requests.append(time.monotonic())
        if body == "cut-short":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"ok" * 25)
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n")
        with contextlib.suppress(OSError):  # until the client closes the connection
            while True:
                conn.sendall(b"o" * 65536)
                time.sleep(0.01)

    config = gateway_config(
        tmp_path, routes=[route("consignease", notify_action("alert", "", format="slack"))]
    )
    config["defaults"]["timeout"] = "20s"
    with raw_server(answer) as url:
        config["routes"][0]["actions"][0]["with"]["url"] = f"{url}/hook"
        with RunningGateway(config) as gw:
            send_consignease(gw, "msg_long_answer")
            wait_until(
                lambda: delivery_states(gw, "msg_long_answer")["alert"] in ("delivered", "dead"), timeout=30
            )
            [history] = event_detail(gw, "msg_long_answer").attempts.values()
    assert [(a.outcome, a.status_code, a.error) for a in history] == [("delivered", 200, None)]
    # 64 KiB of it are read, within a second at most: far from the action's 20 s timeout.
    assert history[0].duration < 10
    assert len(requests) == 1


def test_a_lost_connection_is_reported_without_the_url_aiohttp_names() -> None:
    # aiohttp says "Can not write request body for <the whole URL>" when the receiver closes the
    # connection as the body goes out (seen against a receiver that closes at once, now and then).
    import aiohttp
    import httpx

    from gateway.actions import transport_error

    secret = "services/T0001/B0002/abcdefghijklmnopqrstuvwx?token=t0k3n"
    try:
        try:
            raise aiohttp.ClientOSError(None, f"Can not write request body for https://chat.example/{secret}")
        except aiohttp.ClientOSError as cause:
            raise httpx.ConnectTimeout(str(cause)) from cause
    except httpx.ConnectTimeout as exc:
        outcome = transport_error(exc)
    assert outcome.error == (
        "connection closed before the answer: [Errno None] Can not write request body for https://chat.example/…"
    )


# -- config checks ---------------------------------------------------------------------------------------


def build(config: dict[str, Any]) -> RouteTable:
    return RouteTable.build(parse_config(yaml.safe_dump(config)), registry())


def alert_config(tmp_path: Path, **options: Any) -> dict[str, Any]:
    actions = [
        {"id": "app", "use": "forward", "with": {"url": "http://127.0.0.1:9/app"}},
        {
            "id": "alert",
            "use": "notify",
            "after": "app",
            "with": {"url": "http://127.0.0.1:9/slack", **options},
        },
    ]
    return gateway_config(tmp_path, routes=[route("consignly", *actions)])


def test_a_valid_template_loads(tmp_path: Path) -> None:
    table = build(
        alert_config(tmp_path, format="teams", template="{{ event.id }} {{ event.received_at | isotime }}")
    )
    assert table.actions[("alerts", "alert")].use == "notify"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"template": "Consignment {{ event.data.consignmentId }}\nfailed: {{ parent.error }"},
            "routes[0].actions[1].with.template: line 2: unexpected '}'",
        ),
        (
            {"template": "{% if parent.state == 'dead' %}dead"},
            "routes[0].actions[1].with.template: line 1: Unexpected end of template.",
        ),
        (
            {"template": "{{ event.id | shout }}"},
            "routes[0].actions[1].with.template: line 1: No filter named 'shout'.",
        ),
        (
            {"format": "irc"},
            "routes[0].actions[1].with.format: Input should be 'slack', 'teams', 'discord' or 'generic'",
        ),
        (
            {"url": "ftp://chat.example/hook"},
            "routes[0].actions[1].with.url: 'ftp://chat.example/…' is not an http(s) URL",
        ),
        (
            # Refused rather than failing every attempt: httpx makes them an Authorization header, and
            # aiohttp refuses a URL that holds them as well.
            {"url": "https://hook:s3cret@chat.example/hook"},
            "routes[0].actions[1].with.url: 'https://chat.example/…': credentials in the URL cannot be sent",
        ),
        ({"colour": "red"}, "routes[0].actions[1].with.colour: unknown key"),
    ],
    ids=["syntax", "unclosed-block", "unknown-filter", "format", "url", "url-credentials", "unknown-option"],
)
def test_bad_options_fail_at_config_load(tmp_path: Path, options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build(alert_config(tmp_path, **options))
    [error] = raised.value.errors
    # Jinja's messages go on to list what it expected, in no fixed order: the start says enough.
    assert error.startswith(expected)


def test_hookyard_check_names_the_broken_template(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    config = alert_config(tmp_path, template="{{ parent.error }")
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert result.exit_code == 1
    assert f"{path}: routes[0].actions[1].with.template: line 1: unexpected '}}'" in result.output


def test_a_non_ascii_event_id_is_notified(tmp_path: Path, downstream: Downstream) -> None:
    # Consignly's ids come from the payload: any JSON string. x-hookyard-event-id with "é" in it made httpx
    # raise UnicodeEncodeError on every attempt, so the alert was never sent (dead after the whole schedule,
    # with a traceback logged for each attempt). forward sends the same header as UTF-8.
    action = notify_action("alert", f"{downstream.url}/slack", format="slack")
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", action)])) as gw:
        send_consignly(gw, consignly_body(event_id="évt_事件"))
        wait_until(lambda: delivery_states(gw, "évt_事件")["alert"] != "pending")
        [alert] = event_detail(gw, "évt_事件").deliveries
        assert (alert.state, alert.attempts, alert.last_error) == ("delivered", 1, None)
        [received] = downstream.received("/slack")
        assert received.json() == {"text": "consignly consignment.created évt_事件 received"}
        assert received.headers["x-hookyard-event-id"].encode("latin-1").decode() == "évt_事件"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer token-from-a-file\n"},
        {"X Team": "ops"},
        {"X-Team:": "ops"},
        {"X-Tëam": "ops"},
        {"X-Team": "ops\x01"},
        {"X-Team": "ops\x7f"},
    ],
    ids=[
        "value-with-newline",
        "name-with-space",
        "name-with-colon",
        "name-not-ascii",
        "value-with-control",
        "value-with-delete",
    ],
)
def test_headers_that_cannot_be_sent_fail_at_config_load(tmp_path: Path, headers: dict[str, str]) -> None:
    # forward refuses these when the config loads; notify accepted them, `hookyard check` said ok, and then
    # every notification ended dead (a newline: "cannot be sent"; a bad name: the chat answered 400).
    with pytest.raises(ConfigError) as raised:
        build(alert_config(tmp_path, headers=headers))
    [error] = raised.value.errors
    assert error.startswith("routes[0].actions[1].with.headers: ")
    assert "token-from-a-file" not in error


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {"Content-Length": "5"},
            "'Content-Length' cannot be set: the HTTP client frames each request itself",
        ),
        (
            {"transfer-encoding": "chunked", "Host": "chat.internal"},
            "'Host', 'transfer-encoding' cannot be set: the HTTP client frames each request itself",
        ),
        ({"X-Hookyard-Event-Id": "evt"}, "'X-Hookyard-Event-Id' cannot be set: notify sends it"),
    ],
    ids=["content-length", "transfer-encoding-and-host", "event-id"],
)
def test_headers_notify_sets_itself_fail_at_config_load(
    tmp_path: Path, headers: dict[str, str], expected: str
) -> None:
    # They were sent as configured: a Content-Length of 5 cut every message to `{"tex` and left the rest on
    # the connection as the start of a next request; Transfer-Encoding: chunked went out beside the real
    # Content-Length (a request a server must refuse, or reads wrongly); X-Hookyard-Event-Id went out twice.
    with pytest.raises(ConfigError) as raised:
        build(alert_config(tmp_path, headers=headers))
    assert raised.value.errors == [f"routes[0].actions[1].with.headers: {expected}"]


def test_a_list_built_item_by_item_renders_and_what_filters_keep_is_bounded(
    tmp_path: Path, downstream: Downstream
) -> None:
    # `ns.items + [item]` makes anew only the item it adds (the list refers to the items it had): counted whole
    # against what a render may make, a list of 1,000 short items built item by item was refused.
    made = "would take what this render made past 1000000 characters"
    listed = (
        "{% set ns = namespace(items=[]) %}{% for i in range(event.data.count) %}"
        '{% set ns.items = ns.items + ["parcel " ~ i] %}{% endfor %}{{ ns.items|length }} {{ ns.items|last }}'
    )
    # Each step makes a new text of the payload's length, kept by a dict, a list or a namespace: 100,000 of the
    # note's 10,000 characters would hold a gigabyte, and a larger payload reached 630 MB within the second. Each
    # is refused by what makes or keeps it: dict(), a str method, a filter, or a slice of the note (kept by a list
    # written in the template, namespace() or what a call passes to a macro, which count it once, as made).
    kept = {
        "dict": (
            "{% set ns.d = dict(ns.d, **{i|string: event.data.note|upper}) %}",
            "dict() would make a dict longer than 100000",
        ),
        "list": ("{% set ns.d = [ns.d, event.data.note[1:]] %}", f"a slice {made}"),
        "namespace": ("{% set ns.d = namespace(a=ns.d, b=event.data.note[1:]) %}", f"a slice {made}"),
        "method": ('{% set ns.d = [ns.d, event.data.note.split("o", 1)] %}', f"str.split {made}"),
        "filter": ("{% set ns.d = [ns.d, event.data.note|upper] %}", f"|upper {made}"),
        # What a call passes past a macro's arguments, which Jinja holds in a tuple and a dict the macro may keep.
        "varargs": (
            "{% macro keep() %}{% set ns.d = [ns.d, varargs] %}{% endmacro %}{{ keep(event.data.note[1:]) }}",
            f"a slice {made}",
        ),
        "kwargs": (
            "{% macro keep() %}{% set ns.d = [ns.d, kwargs] %}{% endmacro %}{{ keep(a=event.data.note[1:]) }}",
            f"a slice {made}",
        ),
    }
    actions = [notify_action("listed", f"{downstream.url}/listed", template=listed)] + [
        notify_action(
            name,
            f"{downstream.url}/{name}",
            template="{% set ns = namespace(d={}) %}{% for i in range(event.data.times) %}"
            + step
            + "{% endfor %}done",
        )
        for name, (step, _) in kept.items()
    ]
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_fair", count=3000, note="ok", times=3))
        send_consignly(gw, consignly_body(event_id="evt_hostile", count=3, note="o" * 10_000, times=100_000))
        wait_until(lambda: set(delivery_states(gw, "evt_fair").values()) == {"delivered"})
        wait_until(
            lambda: set(delivery_states(gw, "evt_hostile").values()) <= {"dead", "delivered"}, timeout=60
        )
        refused = {
            d.action: (d.attempts, d.last_error)
            for d in event_detail(gw, "evt_hostile").deliveries
            if d.action in kept
        }
        assert refused == {
            name: (1, f"template line 1: SecurityError: {reason}") for name, (_, reason) in kept.items()
        }
        messages = sorted(r.json()["text"] for r in downstream.received())
        assert messages == sorted(["3000 parcel 2999", "3 parcel 2", *["done"] * len(kept)])


def test_a_loop_may_use_a_filter_on_a_large_field_when_it_keeps_little(
    tmp_path: Path, downstream: Downstream
) -> None:
    # Each iteration makes a new text of the note's 100,000 characters and drops it at once: what the render
    # holds never passes one of them. Counted as if kept, every one added up, the loop was refused at its tenth.
    loops = {
        "filter": ("{{ event.data.note|lower|length }}", "100000"),
        "method": ("{{ event.data.note.lower()|length }}", "100000"),
        "replace": ('{{ event.data.note|replace("O", "o")|length }}', "100000"),
        "format": ('{{ "{}!".format(event.data.note)|length }}', "100001"),
        "literal": ("{{ [event.data.note, i]|length }}", "2"),
        "slice": ("{{ event.data.note[1:]|length }}", "99999"),
        "block": ("{% set copy %}{{ event.data.note }}{% endset %}{{ copy|length }}", "100000"),
    }
    actions = [
        notify_action(
            name,
            f"{downstream.url}/{name}",
            template="{% for i in range(20) %}" + step + "{% endfor %}",
        )
        for name, (step, _) in loops.items()
    ]
    # What a render keeps is still bounded: the same text kept at each iteration is refused at the tenth or so.
    actions.append(
        notify_action(
            "kept",
            f"{downstream.url}/kept",
            template=(
                "{% set ns = namespace(d=[]) %}{% for i in range(20) %}"
                "{% set ns.d = [ns.d, event.data.note|lower] %}{% endfor %}{{ ns.d|length }}"
            ),
        )
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_large", note="O" * 100_000))
        wait_until(lambda: set(delivery_states(gw, "evt_large").values()) <= {"dead", "delivered"})
        outcomes = {d.action: (d.state, d.last_error) for d in event_detail(gw, "evt_large").deliveries}
        assert outcomes == {
            **{name: ("delivered", None) for name in loops},
            "kept": (
                "dead",
                "template line 1: SecurityError: |lower would take what this render made past 1000000 characters",
            ),
        }
        messages = {r.path.removeprefix("/"): r.json()["text"] for r in downstream.received()}
        assert messages == {name: length * 20 for name, (_, length) in loops.items()}


def test_a_recursive_macro_cannot_hold_a_new_text_at_each_call(
    tmp_path: Path, downstream: Downstream
) -> None:
    # Each call makes a text a little longer than the note with `~`, `+`, a macro or a `{% set %}` block, or a
    # little shorter with a slice, and passes it on, and each level of the recursion holds its own until the last
    # returns. Uncounted, a note of 99,000 characters held 15 MB by the time Python's recursion limit stopped
    # it, fifteen times what a render may hold.
    deeper = {
        "concat": '{% macro deeper(text) %}{{ deeper(text ~ "!") }}{% endmacro %}{{ deeper(event.data.note) }}',
        "add": '{% macro deeper(text) %}{{ deeper(text + "!") }}{% endmacro %}{{ deeper(event.data.note) }}',
        "macro": "{% macro bang(text) %}{{ text }}!{% endmacro %}"
        "{% macro deeper(text) %}{{ deeper(bang(text)) }}{% endmacro %}{{ deeper(event.data.note) }}",
        "block": "{% macro deeper(text) %}{% set longer %}{{ text }}!{% endset %}{{ deeper(longer) }}"
        "{% endmacro %}{{ deeper(event.data.note) }}",
        "namespace block": "{% set ns = namespace(text='') %}{% macro deeper(text) %}{% set ns.text %}{{ text }}!"
        "{% endset %}{{ deeper(ns.text) }}{% endmacro %}{{ deeper(event.data.note) }}",
        "slice": "{% macro deeper(text) %}{{ deeper(text[1:]) }}{% endmacro %}{{ deeper(event.data.note) }}",
        # What a block prints, called as `self.name()`, is a new text at each call.
        "self block": "{% block line %}{{ event.data.note }}!{% endblock %}"
        "{% macro deeper(text) %}{{ deeper(self.line()) }}{% endmacro %}{{ deeper('') }}",
        # A list's slice is a new list of references to its items, which a list of the note's characters makes
        # as long as the note.
        "list slice": "{% macro deeper(items) %}{{ deeper(items[:-1]) }}{% endmacro %}"
        "{{ deeper(event.data.note|list) }}",
        "list copy": "{% macro deeper(items) %}{{ deeper(items.copy()) }}{% endmacro %}"
        "{{ deeper(event.data.note|list) }}",
    }
    actions = [notify_action(name, f"{downstream.url}/{name}", template=t) for name, t in deeper.items()]
    # Where values are escaped, Jinja copies what a block captures into another text as it assigns it.
    actions.append(
        notify_action("slack block", f"{downstream.url}/slack", format="slack", template=deeper["block"])
    )
    # A text built up with `~` lets the one before go: one of 99,000 characters made in 99 steps holds one at
    # a time, though all it made add up to 5 MB.
    actions.append(
        notify_action(
            "built",
            f"{downstream.url}/built",
            template="{% set ns = namespace(text='') %}{% for _ in range(event.data.count) %}"
            "{% set ns.text = ns.text ~ event.data.note %}{% endfor %}{{ ns.text|length }}",
        )
    )
    with RunningGateway(gateway_config(tmp_path, routes=[route("consignly", *actions)])) as gw:
        send_consignly(gw, consignly_body(event_id="evt_large", note="o" * 50_000, count=1))
        send_consignly(gw, consignly_body(event_id="evt_built", note="o" * 1_000, count=99))
        wait_until(lambda: set(delivery_states(gw, "evt_large").values()) <= {"dead", "delivered"})
        wait_until(lambda: delivery_states(gw, "evt_built").get("built") in ("dead", "delivered"))
        outcomes = {d.action: (d.attempts, d.last_error) for d in event_detail(gw, "evt_large").deliveries}
        made = "would take what this render made past 1000000 characters"
        assert outcomes == {
            "concat": (1, f"template line 1: SecurityError: ~ {made}"),
            "add": (1, f"template line 1: SecurityError: + {made}"),
            "macro": (1, f"template line 1: SecurityError: a macro {made}"),
            "block": (1, f"template line 1: SecurityError: a set block {made}"),
            "namespace block": (1, f"template line 1: SecurityError: a set block {made}"),
            "slice": (1, f"template line 1: SecurityError: a slice {made}"),
            "self block": (1, f"template line 1: SecurityError: a block {made}"),
            "list slice": (1, f"template line 1: SecurityError: a slice {made}"),
            "list copy": (1, f"template line 1: SecurityError: list.copy {made}"),
            "slack block": (1, f"template line 1: SecurityError: a set block {made}"),
            "built": (1, None),
        }
        messages = {(r.path, r.json()["text"]) for r in downstream.received()}
        assert messages == {("/built", "50000"), ("/built", "99000")}
