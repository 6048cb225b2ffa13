"""Prometheus metrics. Their names and labels are a contract: dashboards and alerts depend on them.
Labels never hold ids or URLs, so their number stays bounded."""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from gateway import __version__

if TYPE_CHECKING:
    from gateway.storage import DeliveryRecord

# The *_created series double the exposition for nothing a dashboard uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

Child = TypeVar("Child")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
END_TO_END_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)


class LoopCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopObservations:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last one is +Inf's
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount, as `le` reads
        self.sum += amount


class _LoopFamily(ABC, Generic[Child]):
    """A labelled metric for what runs on the event loop for every webhook or delivery, exposed as
    prometheus_client's own would be. Its children are plain numbers, read by the registry at scrape time
    (/metrics is served on the same loop): prometheus_client's children take a lock and make a few calls
    for every increment, about 1 µs each, and a histogram walks its buckets in Python."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        new_child: Callable[[], Child],
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._new_child = new_child
        self._children: dict[tuple[str, ...], Child] = {}
        registry.register(self)

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child

    def keep_only(self, wanted: Callable[[tuple[str, ...]], bool]) -> None:
        """Drop the children whose label values are not `wanted`: their series leave the exposition."""
        for values in [values for values in self._children if not wanted(values)]:
            del self._children[values]

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            self._add(family, values, child)
        yield family

    @abstractmethod
    def _family(self) -> Metric: ...

    @abstractmethod
    def _add(self, family: Any, values: tuple[str, ...], child: Child) -> None: ...


class LoopCounter(_LoopFamily[LoopCount]):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames, registry, LoopCount)

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: CounterMetricFamily, values: tuple[str, ...], child: LoopCount) -> None:
        family.add_metric(values, child.value)


class LoopHistogram(_LoopFamily[LoopObservations]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(float(bound) for bound in buckets)
        super().__init__(name, documentation, labelnames, registry, lambda: LoopObservations(bounds))
        self._le = [*(floatToGoString(bound) for bound in bounds), "+Inf"]  # type: ignore[no-untyped-call]

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: HistogramMetricFamily, values: tuple[str, ...], child: LoopObservations) -> None:
        cumulative, buckets = 0, []
        for le, count in zip(self._le, child.counts, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        family.add_metric(values, buckets, child.sum)


class Metrics:
    """One set of metrics on its own registry, so several gateways (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self._answer_children: dict[tuple[str, str], tuple[LoopCount, LoopObservations]] = {}
        self._delivery_children: dict[
            tuple[str, str, str], tuple[LoopCount, LoopObservations, LoopObservations | None]
        ] = {}
        # Updated for every webhook and every delivery: Loop* (see _LoopFamily).
        self.webhooks_received = LoopCounter(
            "hookyard_webhooks_received_total",
            "Webhook requests received, by outcome: accepted, duplicate or rejected.",
            ["source", "outcome"],
            registry=registry,
        )
        self.rejections = Counter(
            "hookyard_webhook_rejections_total",
            "Webhook requests rejected, by reason.",
            ["source", "reason"],
            registry=registry,
        )
        self.unverified = Counter(
            "hookyard_webhooks_unverified_total",
            "Webhooks accepted although their verification failed (sources with verify: log-only).",
            ["source", "reason"],
            registry=registry,
        )
        self.ingest_duration = LoopHistogram(
            "hookyard_ingest_duration_seconds",
            "Time from a webhook's first byte to its answer, durable commit included.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.deliveries = LoopCounter(
            "hookyard_deliveries_total",
            "Delivery attempts by outcome: delivered, retried, dead or skipped.",
            ["route", "action", "outcome"],
            registry=registry,
        )
        self.delivery_duration = LoopHistogram(
            "hookyard_delivery_duration_seconds",
            "Duration of one delivery attempt.",
            ["route", "action"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.delivery_queue = Gauge(
            "hookyard_delivery_queue",
            "Deliveries not yet final: due, scheduled (waiting for a retry), in_flight, waiting (for a parent).",
            ["state"],
            registry=registry,
        )
        self.delivery_lag = Gauge(
            "hookyard_delivery_lag_seconds",
            "Age of the oldest due delivery: how long it has waited for a worker. Rises when delivery "
            "cannot keep up; 0 when nothing is due.",
            registry=registry,
        )
        self.oldest_pending = Gauge(
            "hookyard_delivery_oldest_pending_seconds",
            "How long the oldest undelivered delivery has been pending (due, waiting for a retry or in "
            "flight): rises while a receiver is down. 0 when nothing is pending.",
            registry=registry,
        )
        self.end_to_end = LoopHistogram(
            "hookyard_end_to_end_seconds",
            "Time from receiving a webhook to delivering it, per route.",
            ["route"],
            buckets=END_TO_END_BUCKETS,
            registry=registry,
        )
        self.build_info = Info("hookyard_build", "Hookyard version.", registry=registry)
        self.build_info.info({"version": __version__})
        self.commit_duration = Histogram(
            "hookyard_storage_commit_seconds",
            "Duration of one storage transaction, durable commit included.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Read at scrape time (set_function, by the gateway): a hung fsync never ends a commit, so the
        # histogram above would not show it until it did.
        self.storage_fsync_wait = Gauge(
            "hookyard_storage_fsync_wait_seconds",
            "How long the oldest fsync that commits wait for has run: milliseconds on a healthy disk, rising "
            "while one hangs. 0 when none runs.",
            registry=registry,
        )
        self.storage_bytes = Gauge(
            "hookyard_storage_bytes",
            "Bytes the store takes on disk: the SQLite database file and its write-ahead log.",
            registry=registry,
        )
        self.commit_batch = Histogram(
            "hookyard_storage_batch_size",
            "Operations per storage commit: above 1 when group commit shares one fsync among many.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.events_pruned = Counter(
            "hookyard_events_pruned_total",
            "Events deleted by retention (storage.retention), with their deliveries and attempts.",
            registry=registry,
        )
        self.replays = Counter(
            "hookyard_replays_total",
            "Deliveries made to run again through the admin API, by mode: event, dead or missing.",
            ["mode"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "hookyard_config_reloads_total",
            "Config reloads by result: success, or error (the running config was kept).",
            ["result"],
            registry=registry,
        )
        self.config_last_reload_successful = Gauge(
            "hookyard_config_last_reload_successful",
            "0 after a refused config reload, until one succeeds: the running config is not the file's, "
            "and a restart may stop on the file. 1 otherwise.",
            registry=registry,
        )
        self.config_last_reload_successful.set(1)
        self.config_restart_required = Gauge(
            "hookyard_config_restart_required",
            "1 while the config file, as last reloaded, changes a setting that takes effect only at a restart "
            "(an address, storage, delivery, log, reload.watch, turning listen.tls on or off). 0 otherwise.",
            registry=registry,
        )
        self.ready = Gauge(
            "hookyard_ready", "1 when the gateway is ready to accept webhooks.", registry=registry
        )
        self.webhook_connections = Gauge(
            "hookyard_webhook_connections",
            "Connections open on the webhook listener.",
            registry=registry,
        )
        self.webhook_max_connections = Gauge(
            "hookyard_webhook_max_connections",
            "The webhook listener's limit of open connections (listen.max_connections, or lower where the "
            "open-file limit cannot hold it); past it, new ones are refused 503 too_many_connections.",
            registry=registry,
        )
        self.ops_connections = Gauge(
            "hookyard_ops_connections",
            "Connections open on the ops listener (32 at most).",
            registry=registry,
        )
        self.ops_connections_shed = Counter(
            "hookyard_ops_connections_shed_total",
            "Connections the ops listener shed while it had its 32 open, by outcome: closed (the oldest with no "
            "request being answered, for a new one) or refused (503, each one had a request being answered).",
            ["outcome"],
            registry=registry,
        )
        self.ops_request_faults = Counter(
            "hookyard_ops_request_faults_total",
            "Requests to /healthz, /readyz or /metrics answered 500 (503 on /readyz) for a fault in Hookyard or "
            "a plugin while answering them, by path.",
            ["path"],
            registry=registry,
        )
        self.storage_writable = Gauge(
            "hookyard_storage_writable",
            "1 when the store took the last readiness check's test write (every /readyz), 0 when it failed or "
            "found the volume full.",
            registry=registry,
        )

    def answered(self, source: str, status: str, seconds: float) -> None:
        """A webhook answered 200 (accepted or duplicate) after `seconds`; runs for every webhook, so the
        children of each (source, status) are kept: one lookup instead of two."""
        children = self._answer_children.get((source, status))
        if children is None:
            children = (self.webhooks_received.labels(source, status), self.ingest_duration.labels(source))
            self._answer_children[(source, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def delivery_finished(self, route: str, action: str, outcome: str, seconds: float, age: float) -> None:
        """One attempt: its outcome and duration; for a delivered one also its event's age (end to end).
        Runs for every delivery, so the children of each (route, action, outcome) are kept."""
        children = self._delivery_children.get((route, action, outcome))
        if children is None:
            children = (
                self.deliveries.labels(route, action, outcome),
                self.delivery_duration.labels(route, action),
                self.end_to_end.labels(route) if outcome == "delivered" else None,
            )
            self._delivery_children[(route, action, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)  # timed on the monotonic clock
        if children[2] is not None:
            # Counted from the stored receipt time, on the wall clock: a clock stepped back since makes it
            # negative, and a histogram's sum must never go down (rate() reads it as a counter).
            children[2].observe(max(age, 0.0))

    def skipped(self, deliveries: Sequence[DeliveryRecord]) -> None:
        """Dependents skipped without an attempt of their own (Storage.on_skipped, and those an attempt's
        result or an unreadable event settled)."""
        for delivery in deliveries:
            self.deliveries.labels(delivery.route, delivery.action, "skipped").inc()

    def keep_only_configured(self, sources: Collection[str], actions: Collection[tuple[str, str]]) -> None:
        """After a reload: drop the series of the sources, routes and actions (route, action) that are no
        longer configured, and keep the others as they are. A series left behind would show its last value
        for ever: a gauge or a rate of something that no longer exists, on a dashboard or in an alert.
        Prometheus reads a series that vanishes as ended, and one that comes back (the action put back, a
        delivery of a removed one ending) as a counter that started over."""
        sources = {*sources, ""}  # "": webhooks refused before any source was known (an unknown path)
        routes = {route for route, _ in actions}
        self.webhooks_received.keep_only(lambda values: values[0] in sources)
        self.ingest_duration.keep_only(lambda values: values[0] in sources)
        self.deliveries.keep_only(lambda values: values[:2] in actions)
        self.delivery_duration.keep_only(lambda values: values in actions)
        self.end_to_end.keep_only(lambda values: values[0] in routes)
        for by_source in (self.rejections, self.unverified):
            series = {
                (sample.labels["source"], sample.labels["reason"])
                for family in by_source.collect()
                for sample in family.samples
            }
            for source, reason in series:
                if source not in sources:
                    by_source.remove(source, reason)
        # What answered() and delivery_finished() hold for the next webhook or attempt: a child dropped
        # above would otherwise go on counting where no scrape reads it.
        self._answer_children = {
            key: children for key, children in self._answer_children.items() if key[0] in sources
        }
        self._delivery_children = {
            key: children for key, children in self._delivery_children.items() if key[:2] in actions
        }

    def observe_commit(self, batch_size: int, seconds: float) -> None:
        self.commit_batch.observe(batch_size)
        self.commit_duration.observe(seconds)

    def rejected(self, source: str, reason: str) -> None:
        self.webhooks_received.labels(source, "rejected").inc()
        self.rejections.labels(source, reason).inc()
