"""The metric names and labels of the issue are a contract (dashboards and alerts depend on them): scraped from a
running gateway after real traffic and pinned exactly."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from tests.support import RunningGateway, downstream_server, gateway_config, svix_request, wait_until

# name -> (type, label names). Histograms' _bucket samples add `le`, as every histogram does.
CONTRACT: dict[str, tuple[str, frozenset[str]]] = {
    "hookyard_webhooks_received_total": ("counter", frozenset({"source", "outcome"})),
    "hookyard_webhook_rejections_total": ("counter", frozenset({"source", "reason"})),
    "hookyard_ingest_duration_seconds": ("histogram", frozenset({"source"})),
    "hookyard_deliveries_total": ("counter", frozenset({"route", "action", "outcome"})),
    "hookyard_delivery_duration_seconds": ("histogram", frozenset({"route", "action"})),
    "hookyard_delivery_queue": ("gauge", frozenset({"state"})),
    "hookyard_delivery_lag_seconds": ("gauge", frozenset()),
    "hookyard_end_to_end_seconds": ("histogram", frozenset({"route"})),
    "hookyard_build_info": ("gauge", frozenset({"version"})),
}

# The values the issue names for the enumerated labels.
ALLOWED_VALUES = {
    ("hookyard_webhooks_received_total", "outcome"): {"accepted", "duplicate", "rejected"},
    ("hookyard_deliveries_total", "outcome"): {"delivered", "retried", "dead", "skipped"},
    ("hookyard_delivery_queue", "state"): {"due", "scheduled", "in_flight", "waiting"},
}

EVENT_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
FORGED_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4X"


def family_of(sample_name: str) -> str | None:
    for name, (kind, _) in CONTRACT.items():
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        if sample_name in {name + suffix for suffix in suffixes}:
            return name
    return None


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """/metrics of a gateway after one accepted event, its delivery and one rejected request."""
    tmp_path = tmp_path_factory.mktemp("contract")
    with downstream_server() as downstream, RunningGateway(gateway_config(tmp_path, downstream.url)) as gw:
        body, headers = svix_request(msg_id=EVENT_ID)
        assert gw.post("/webhooks/consignease", body, headers).json()["status"] == "accepted"
        forged, forged_headers = svix_request(
            msg_id=FORGED_ID, secret="whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
        )
        assert gw.post("/webhooks/consignease", forged, forged_headers).status_code == 401
        downstream.wait_for(1, "/hooks/users")
        wait_until(lambda: gw.metric("hookyard_end_to_end_seconds_count", route="users") == 1)
        wait_until(lambda: "hookyard_delivery_queue{" in gw.client.get(gw.ops_url + "/metrics").text)
        return gw.client.get(gw.ops_url + "/metrics").text, downstream.url


def samples(exposition: str) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """Each contract metric's samples as (sample name, labels)."""
    found: dict[str, list[tuple[str, dict[str, str]]]] = defaultdict(list)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            name = family_of(sample.name)
            if name is not None:
                found[name].append((sample.name, dict(sample.labels)))
    return found


def test_every_contract_metric_has_its_type(scrape: tuple[str, str]) -> None:
    exposition, _ = scrape
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
    for name, (kind, _) in CONTRACT.items():
        # Older clients declare a counter without its _total suffix; either way it is the same series.
        declared_kind = declared.get(name) or declared.get(name.removesuffix("_total"))
        assert declared_kind == kind, (name, declared_kind)


def test_every_contract_metric_has_exactly_its_labels(scrape: tuple[str, str]) -> None:
    found = samples(scrape[0])
    assert set(found) == set(CONTRACT), f"no samples for {set(CONTRACT) - set(found)}"
    for name, (_, labels) in CONTRACT.items():
        for sample_name, sample_labels in found[name]:
            expected = labels | {"le"} if sample_name.endswith("_bucket") else labels
            assert set(sample_labels) == expected, (sample_name, sample_labels)


def test_label_values_are_the_sources_routes_actions_and_named_outcomes(scrape: tuple[str, str]) -> None:
    found = samples(scrape[0])
    for name, entries in found.items():
        for _, labels in entries:
            assert labels.get("source", "consignease") == "consignease"
            assert labels.get("route", "users") == "users"
            assert labels.get("action", "app") == "app"
            for (metric, label), allowed in ALLOWED_VALUES.items():
                if metric == name:
                    assert labels[label] in allowed, (name, labels)
    received = {labels["outcome"] for _, labels in found["hookyard_webhooks_received_total"]}
    assert received == {"accepted", "rejected"}
    [(_, rejection)] = found["hookyard_webhook_rejections_total"]
    assert rejection["reason"] == "invalid_signature"
    assert {labels["outcome"] for _, labels in found["hookyard_deliveries_total"]} == {"delivered"}
    [(_, build)] = found["hookyard_build_info"]
    assert build["version"] == __version__


_ID_LIKE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # a UUID
    r"|[0-9A-Za-z]{20,}"  # a long opaque token (svix ids, hashes)
    r"|^\d{4,}$"  # a long number (sequence numbers, ports)
    r"|^(msg|evt|user|op)_",  # the providers' id prefixes
    re.I,
)


def test_no_label_value_looks_like_an_id_or_a_url(scrape: tuple[str, str]) -> None:
    exposition, downstream_url = scrape
    port = downstream_url.rsplit(":", 1)[1]
    for family in text_string_to_metric_families(exposition):
        if not family.name.startswith("hookyard_"):
            continue
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le":  # a histogram bucket's bound
                    continue
                where = f"{sample.name}{{{label}={value!r}}}"
                assert "://" not in value and "/" not in value and "127.0.0.1" not in value, where
                assert port not in value, where
                assert value not in (EVENT_ID, FORGED_ID), where
                assert not _ID_LIKE.search(value), where


def test_the_id_and_url_check_would_catch_them() -> None:
    for value in (EVENT_ID, "550e8400-e29b-41d4-a716-446655440000", "12345", "evt_1", "op_42"):
        assert _ID_LIKE.search(value), value
    for value in ("consignease", "users", "app", "in_flight", "invalid_signature", "0.1.0", "delivered"):
        assert not _ID_LIKE.search(value), value
