"""The metrics kept as plain numbers on the event loop read exactly as prometheus_client's own would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.metrics import LATENCY_BUCKETS, LoopCounter, LoopHistogram, Metrics


def test_loop_counter_and_histogram_expose_what_prometheus_clients_own_would() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    labels = ["route", "action"]
    counters = (
        Counter("hookyard_things_total", "Things.", labels, registry=theirs),
        LoopCounter("hookyard_things_total", "Things.", labels, registry=ours),
    )
    histograms = (
        Histogram("hookyard_took_seconds", "Took.", labels, buckets=LATENCY_BUCKETS, registry=theirs),
        LoopHistogram("hookyard_took_seconds", "Took.", labels, buckets=LATENCY_BUCKETS, registry=ours),
    )
    # On a bound (it counts in that bucket), between bounds, below the first, past the last (+Inf), zero.
    amounts = [0.0, 0.0001, 0.0005, 0.0007, 0.001, 0.3, 2.5, 9.99, 10.0, 10.01, 3600.0]
    for n, amount in enumerate(amounts):
        values = ("users", "app") if n % 3 else ("orders", "audit")
        for counter in counters:
            counter.labels(*values).inc(1 + n % 2)
        for histogram in histograms:
            histogram.labels(*values).observe(amount)
    exposed = generate_latest(ours).decode()
    assert exposed == generate_latest(theirs).decode()
    assert 'hookyard_took_seconds_bucket{action="app",le="+Inf",route="users"} 7.0' in exposed


def test_a_family_without_children_exposes_its_help_and_type_only() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    Histogram("hookyard_took_seconds", "Took.", ["route"], buckets=(1, 2), registry=theirs)
    LoopHistogram("hookyard_took_seconds", "Took.", ["route"], buckets=(1, 2), registry=ours)
    assert generate_latest(ours) == generate_latest(theirs)


def test_an_event_received_before_a_clock_stepped_back_counts_as_no_time_end_to_end() -> None:
    """An event's age is counted from its stored receipt time, on the wall clock: the system clock stepped
    back an hour since (NTP, a VM restored) makes it negative. The histogram's sum, read as a counter by
    rate(), must not go down. (The attempt's own duration is timed on the monotonic clock.)"""
    metrics = Metrics()
    metrics.delivery_finished("users", "app", "delivered", 0.25, 1.5)
    metrics.delivery_finished("users", "app", "delivered", 0.25, -3598.5)
    exposed = generate_latest(metrics.registry).decode()
    for name, labels, total in [
        ("hookyard_delivery_duration_seconds", 'action="app",route="users"', 0.5),
        ("hookyard_end_to_end_seconds", 'route="users"', 1.5),
    ]:
        assert f"{name}_sum{{{labels}}} {total}" in exposed
        assert f"{name}_count{{{labels}}} 2.0" in exposed
