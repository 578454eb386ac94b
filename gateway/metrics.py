"""Prometheus metrics at ``/metrics``: one registry per :class:`gateway.app.Gateway`, never the global one.

Two kinds of figures, and why:

- **From the store, on scrape** (ratings by channel and level, outbox depth and oldest pending
  age): every instance sharing a store reports the same values, so they are right whichever
  process stored a rating (FastAGI, SMS, ``gateway import``, another instance). They are read in
  a store thread (never on the reactor), at most once per ``store_interval`` seconds however
  often Prometheus scrapes, and incrementally (:class:`storage.queries.StoreFigureCounter`):
  only rows new since the last scrape are counted. Aggregate them across instances with
  ``max``, not ``sum``.
- **Of this process** (push request latency and counts, AGI sessions, the SMPP link): read from
  the live objects when scraped; sum them across instances.

The SMPP figures come from :func:`observe_smpp`, which the SMS service calls with its link's
state; ``scrape_hooks`` are called before each scrape for such pull-style updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from storage.queries import StoreFigureCounter, StoreFigures

#: What ``/metrics`` answers with (the text exposition format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PUSH_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SMPP_KEYS = ("bound", "window_in_use", "window", "rate", "submitted_total", "errors_total")


class GatewayMetrics:
    """The process's metrics; ``scrape()`` answers a Deferred of the exposition text."""

    def __init__(self, store: Any | None, clock: IReactorTime, *, store_interval: float = 5.0) -> None:
        self.registry = CollectorRegistry()
        self.store = store  # a DeferredStore (``run`` in a store thread), or None: no store figures
        self.clock = clock
        self.store_interval = store_interval
        self.push_latency = Histogram(
            "hcp_push_request_duration_seconds",
            "Time from sending a batch to the central platform to its complete answer (SPEC R7.1).",
            ["outcome"],
            buckets=PUSH_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scrape_hooks: list[Callable[[], None]] = []
        self.agi_stats: Any = None  # gateway.ivr.fastagi.CallStats
        self.pusher: Any = None  # gateway.platform.pusher.Pusher
        self.smpp_state: dict[str, Any] | None = None
        self._counter = StoreFigureCounter()
        self._figures: StoreFigures | None = None
        self._figures_at: float | None = None
        self._store_up = 0
        self._refreshing: defer.Deferred[None] | None = None
        self.registry.register(_LiveCollector(self))

    # -- sources ---------------------------------------------------------------------------------

    def watch_agi(self, stats: Any) -> None:
        """AGI sessions from the FastAGI factory's ``CallStats`` (active, started, outcomes)."""
        self.agi_stats = stats

    def watch_pusher(self, pusher: Any) -> None:
        """Push counts from the pusher's stats, and each request's latency as it happens."""
        self.pusher = pusher
        pusher.request_observers.append(self.observe_push)

    def observe_push(self, seconds: float, outcome: str) -> None:
        self.push_latency.labels(outcome=outcome).observe(seconds)

    # -- scraping --------------------------------------------------------------------------------

    def scrape(self) -> defer.Deferred[bytes]:
        """The exposition text; the store's figures are refreshed first if older than the interval."""
        for hook in self.scrape_hooks:
            hook()
        return self._refresh().addCallback(lambda _: generate_latest(self.registry))

    def _refresh(self) -> defer.Deferred[None]:
        now = self.clock.seconds()
        if self.store is None or (self._figures_at is not None and now - self._figures_at < self.store_interval):
            return defer.succeed(None)
        refreshing = self._refreshing
        if refreshing is None:  # scrapes arriving meanwhile wait for the same query
            refreshing = self._refreshing = self.store.run(self._counter.figures, self.store.store)
            refreshing.addCallbacks(self._got, self._failed)
        waiter: defer.Deferred[None] = defer.Deferred()
        refreshing.addBoth(lambda _: waiter.callback(None))
        return waiter

    def _got(self, figures: StoreFigures) -> None:
        self._figures, self._figures_at, self._store_up = figures, self.clock.seconds(), 1
        self._refreshing = None

    def _failed(self, failure: Failure) -> None:
        # The last figures stay (marked stale by hcp_store_up 0); the next scrape asks again.
        self._store_up = 0
        self._refreshing = None


def observe_smpp(metrics: GatewayMetrics, state: Mapping[str, Any]) -> None:
    """Record the SMPP link's state: bound (bool), window_in_use and window (int), rate (float,
    the configured messages per second), submitted_total and errors_total (int, since start).

    Keys missing from ``state`` count as 0 (false); unknown keys are ignored.
    """
    metrics.smpp_state = {key: state.get(key, 0) for key in SMPP_KEYS}


class _LiveCollector(Collector):
    """Reads the sources when the registry is collected (on the reactor thread, no I/O)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._store()
        yield from self._agi()
        yield from self._push()
        yield from self._smpp()

    def _store(self) -> Iterator[Metric]:
        metrics = self.metrics
        if metrics.store is None:
            return
        yield GaugeMetricFamily(
            "hcp_store_up", "1 if the store answered the last metrics query, else 0.", value=metrics._store_up
        )
        figures = metrics._figures
        if figures is None:
            return
        counted = CounterMetricFamily(
            "hcp_ratings",
            "Counted ratings in the store by channel and level code (SPEC R1.2: 5 非常满意 … 1 非常不满意); "
            "the same in every instance sharing the store.",
            labels=["channel", "level"],
        )
        for (channel, level), n in sorted(figures.ratings.items()):
            counted.add_metric([channel, str(level)], n)
        yield counted
        depth = GaugeMetricFamily(
            "hcp_outbox_records", "Outbox records by status (pending: not yet acknowledged).", labels=["status"]
        )
        for status, n in sorted(figures.outbox.items()):
            depth.add_metric([status], n)
        yield depth
        age = 0.0
        if figures.oldest_pending_at is not None:
            age = max(metrics.clock.seconds() - figures.oldest_pending_at.timestamp(), 0.0)
        yield GaugeMetricFamily(
            "hcp_outbox_oldest_pending_age_seconds",
            "Age of the oldest record not yet acknowledged by the platform (0: none pending).",
            value=age,
        )

    def _agi(self) -> Iterator[Metric]:
        stats = self.metrics.agi_stats
        if stats is None:
            return
        yield GaugeMetricFamily("hcp_agi_sessions_active", "FastAGI sessions (calls) in progress.", value=stats.active)
        yield CounterMetricFamily("hcp_agi_sessions", "FastAGI sessions accepted since start.", value=stats.started)
        calls = CounterMetricFamily(
            "hcp_agi_calls", "FastAGI calls ended, rated or not rated (SPEC R2.3).", labels=["outcome"]
        )
        calls.add_metric(["rated"], stats.rated)
        calls.add_metric(["not_rated"], stats.not_rated)
        yield calls
        yield CounterMetricFamily(
            "hcp_agi_store_failures", "Store writes of calls that failed (each is retried).", value=stats.store_failures
        )

    def _push(self) -> Iterator[Metric]:
        pusher = self.metrics.pusher
        if pusher is None:
            return
        stats = pusher.stats
        records = CounterMetricFamily(
            "hcp_push_records", "Records the platform acknowledged or rejected (SPEC R7.2).", labels=["outcome"]
        )
        records.add_metric(["acknowledged"], stats.pushed)
        records.add_metric(["rejected"], stats.rejected)
        yield records
        yield CounterMetricFamily("hcp_push_requests", "Batches posted to the platform.", value=stats.requests)
        yield CounterMetricFamily(
            "hcp_push_failures",
            "Posts that failed and were retried later (errors, 5xx, 429, 401).",
            value=stats.failures,
        )
        yield GaugeMetricFamily(
            "hcp_push_consecutive_failures", "Failed posts since the last success.", value=stats.consecutive_failures
        )
        if stats.last_success is not None:
            yield GaugeMetricFamily(
                "hcp_push_last_success_timestamp_seconds",
                "When the platform last acknowledged a batch (Unix time).",
                value=stats.last_success,
            )

    def _smpp(self) -> Iterator[Metric]:
        state = self.metrics.smpp_state
        if state is None:
            return
        yield GaugeMetricFamily("hcp_smpp_bound", "1 while the SMPP link is bound.", value=1 if state["bound"] else 0)
        yield GaugeMetricFamily(
            "hcp_smpp_window_in_use", "submit_sm sent and not yet answered.", value=state["window_in_use"]
        )
        yield GaugeMetricFamily("hcp_smpp_window", "Configured window ([smpp] window).", value=state["window"])
        yield GaugeMetricFamily(
            "hcp_smpp_rate_per_second", "Configured submit rate ([smpp] rate, messages/s).", value=state["rate"]
        )
        yield CounterMetricFamily(
            "hcp_smpp_submitted", "submit_sm answered ESME_ROK since start.", value=state["submitted_total"]
        )
        yield CounterMetricFamily(
            "hcp_smpp_errors", "submit_sm answered with an error or not at all.", value=state["errors_total"]
        )
