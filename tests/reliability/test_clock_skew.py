"""Scenario 5: clock skew. Requests signed by a sender whose clock is off from the gateway's, inside and
outside the source's tolerance (5 min by default): accepted, or 401 timestamp_out_of_tolerance and neither
stored nor delivered."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.reliability.harness import delivered_keys, in_process, record
from tests.support import Downstream, gateway_config, svix_request, wait_until

PATH = "/webhooks/consignease"
# (skew of the sender's clock, expected status) for the default tolerance of 5 minutes. The boundary cases
# keep 10 s of margin for the time a request takes.
DEFAULT_TOLERANCE = [
    (timedelta(minutes=-6), 401),
    (timedelta(minutes=-5, seconds=-10), 401),
    (timedelta(minutes=-4, seconds=-50), 200),
    (timedelta(minutes=-4), 200),
    (timedelta(0), 200),
    (timedelta(minutes=4), 200),
    (timedelta(minutes=4, seconds=50), 200),
    (timedelta(minutes=5, seconds=10), 401),
    (timedelta(minutes=6), 401),
    (timedelta(hours=-24), 401),
    (timedelta(days=365), 401),
]
# A source configured with `tolerance: 30s`.
SHORT_TOLERANCE = [
    (timedelta(seconds=-40), 401),
    (timedelta(seconds=-20), 200),
    (timedelta(seconds=20), 200),
    (timedelta(seconds=40), 401),
]


def _label(skew: timedelta) -> str:
    seconds = int(skew.total_seconds())
    return f"{'+' if seconds >= 0 else '-'}{abs(seconds)}s"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tolerance", "cases"), [(None, DEFAULT_TOLERANCE), ("30s", SHORT_TOLERANCE)], ids=["default-5m", "30s"]
)
def test_skewed_senders_inside_tolerance_are_accepted_outside_refused(
    tmp_path: Path, app: Downstream, tolerance: str | None, cases: list[tuple[timedelta, int]]
) -> None:
    started = time.monotonic()
    config = gateway_config(
        tmp_path,
        app.url,
        routes=[
            {
                "name": "users",
                "source": "consignease",
                "actions": [{"id": "app", "use": "forward", "with": {"url": f"{app.url}/app"}}],
            }
        ],
    )
    if tolerance is not None:
        config["sources"]["consignease"]["tolerance"] = tolerance
    results: dict[str, str] = {}
    with in_process(config) as gw:
        for skew, expected in cases:
            msg_id = f"msg_skew_{_label(skew)}"
            body, headers = svix_request(msg_id=msg_id, timestamp=datetime.now(tz=UTC) + skew)
            response = gw.post(PATH, body, headers)
            answer = response.json()
            results[_label(skew)] = f"{response.status_code} {answer.get('status') or answer.get('error')}"
            assert response.status_code == expected, (skew, response.text)
            if expected == 401:
                assert answer["error"] == "timestamp_out_of_tolerance"
        accepted = {f"msg_skew_{_label(skew)}" for skew, expected in cases if expected == 200}
        refused = {f"msg_skew_{_label(skew)}" for skew, expected in cases if expected == 401}
        wait_until(lambda: set(delivered_keys(app)) >= accepted, 10)
        # Refused requests were neither stored nor delivered.
        storage = gw.gateway.storage
        for msg_id in refused:
            future = asyncio.run_coroutine_threadsafe(storage.get_event(msg_id), gw.loop)
            assert future.result(10) == [], msg_id
        assert not set(delivered_keys(app)) & refused
        counted = gw.metric(
            "hookyard_webhook_rejections_total", source="consignease", reason="timestamp_out_of_tolerance"
        )
    assert counted == len(refused)
    record(
        f"clock_skew_{tolerance or 'default'}",
        {"tolerance": tolerance or "5m", "answers": results, "test_s": round(time.monotonic() - started, 1)},
        tmp_path,
    )
