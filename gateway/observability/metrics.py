"""The Prometheus series the gateway writes as it works.

Three kinds, by where they are computed:

* Per request, from its usage record (``GatewayMetrics.request_observe``, once, where the record
  is made): requests by model, deployment, status and outcome; latency, time to first token and
  queue wait; tokens and cost by model. Per upstream attempt (``gateway.observability.dispatch``):
  attempts by deployment and result (429s are ``result="rate_limited"``), retries, spill-overs,
  breakers opened.
* Per process, sampled every second (``gateway.observability.sampler``): the usage buffer
  (depth, flush failures, parked, spilled, dropped records) and the snapshot (version, age).
* At scrape time, from the balancer's state (``gateway.observability.scrape``): breaker state,
  window use, in flight, cool-down per deployment, queue depth per model.

Several worker processes: with ``PROMETHEUS_MULTIPROC_DIR`` set (the image sets it), prometheus
client's multiprocess mode keeps each process's values in memory-mapped files there and a scrape
of any process adds them up; per-process gauges say how (``multiprocess_mode``). Without it (one
process, ``make run``) values live in memory.

The request path does not write those values itself: each request adds to plain dictionaries
(``Pending``: a few dictionary updates, about 2 µs), and ``flush`` moves the sums into the
prometheus values once a second (the sampler) and before every scrape. Writing each request's ten
values through the multiprocess value class cost 12 µs a request (``python -m tests.bench
observe``); aggregated, a series is written once a second whatever the traffic. So a scrape sees
the scraped process's requests at once and the other processes' up to a second late, and a
process killed with SIGKILL takes its last second of counts with it.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from gateway.observability.labels import LabelIndex

# No `_created` series (one more per label set); multiprocess mode has none either.
disable_created_metrics()

# Seconds. Latency spans fast refusals to long streams; time to first token and queue wait are shorter.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)


class GatewayMetrics:
    """The written series. One instance per process (``gateway_metrics()``); tests may make more,
    each on a registry of its own.

    ``tenant_label``: the request, token and cost series get a ``tenant`` label (the tenant's slug).
    """

    def __init__(self, *, tenant_label: bool = False, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.tenant_label = tenant_label
        self.registry = registry
        tenant = ("tenant",) if tenant_label else ()
        r = registry
        self.requests = Counter(
            "gateway_requests",
            "Requests that got past their headers (one per usage record), by model, deployment, status and outcome.",
            ("model", "deployment", "status", "outcome", *tenant),
            registry=r,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "From the request's arrival to its usage record (streams: to their last byte).",
            ("model", "deployment"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "From the request's arrival to the first byte of the answer sent to the client (served requests).",
            ("model", "deployment"),
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time requests waited for capacity (all attempts), for requests that reached the balancer.",
            ("model",),
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Billed tokens by model and kind (prompt, cached: the part of prompt read from cache, completion).",
            ("model", "kind", *tenant),
            registry=r,
        )
        self.cost = Counter(
            "gateway_cost",
            "Cost of the billed tokens at the prices in effect, in the price list's currency.",
            ("model", *tenant),
            registry=r,
        )
        self.attempts = Counter(
            "gateway_upstream_attempts",
            "Upstream attempts by deployment and result: ok, rate_limited (upstream 429), failed (5xx, "
            "timeout, connect error, broken stream, refused credentials), abandoned (the client left).",
            ("deployment", "result"),
            registry=r,
        )
        self.retries = Counter(
            "gateway_upstream_retries",
            "Attempts on this deployment after which the request tried again (here or elsewhere).",
            ("deployment",),
            registry=r,
        )
        self.spillovers = Counter(
            "gateway_spillovers",
            "Leases on this deployment although a better tier of the model could have served the request "
            "(it had no room within its max wait, was cooling down or its breaker was open).",
            ("model", "deployment"),
            registry=r,
        )
        self.breaker_opened = Counter(
            "gateway_breaker_opened",
            "Failures that left the deployment's circuit breaker open.",
            ("deployment",),
            registry=r,
        )
        # Per process; written by the sampler. Gauges say how processes' values combine.
        self.usage_buffered = Gauge(
            "gateway_usage_buffer_records",
            "Usage records waiting in memory to be written (all live processes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.usage_database_down = Gauge(
            "gateway_usage_database_down",
            "1 while a process cannot write usage records to the database (they go to spill files).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.usage_flush_failures = Counter(
            "gateway_usage_flush_failures", "Usage buffer flushes that failed (retried later).", registry=r
        )
        self.usage_parked = Counter(
            "gateway_usage_parked_records",
            "Usage records the database refused, parked for an operator (admin: Parked usage records).",
            registry=r,
        )
        self.usage_written = Counter("gateway_usage_written_records", "Usage records written.", registry=r)
        self.usage_spilled = Counter(
            "gateway_usage_spilled_records", "Usage records moved to spill files (replayed later).", registry=r
        )
        self.usage_dropped = Counter(
            "gateway_usage_dropped_records",
            "Usage records lost: memory full and neither the database nor the disk took them.",
            registry=r,
        )
        self.snapshot_version = Gauge(
            "gateway_snapshot_version",
            "The configuration version each process serves.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.snapshot_age = Gauge(
            "gateway_snapshot_age_seconds",
            "Seconds since each process last checked its configuration against the database's version.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self._bounds = {
            m: (*buckets, float("inf"))
            for m, buckets in (
                (self.latency, LATENCY_BUCKETS),
                (self.ttft, TTFT_BUCKETS),
                (self.queue_wait, QUEUE_WAIT_BUCKETS),
            )
        }
        # What requests added since the last flush: (metric, label values) -> amount, or for
        # histograms -> [sum, count in bucket 0, count in bucket 1, ...].
        self._counts: dict[tuple[Any, tuple], float] = {}
        self._histograms: dict[tuple[Any, tuple], list[float]] = {}

    def _count(self, metric: Any, values: tuple, amount: float = 1.0) -> None:
        key = (metric, values)
        counts = self._counts
        counts[key] = counts.get(key, 0.0) + amount

    def _observe(self, metric: Any, values: tuple, value: float) -> None:
        key = (metric, values)
        slot = self._histograms.get(key)
        bounds = self._bounds[metric]
        if slot is None:
            slot = self._histograms[key] = [0.0] * (len(bounds) + 1)
        slot[0] += value
        slot[1 + bisect_left(bounds, value)] += 1

    def flush(self) -> None:
        """Write what requests added since the last flush into the prometheus values (on the thread
        that observes, the event loop's: nothing is added meanwhile)."""
        counts, self._counts = self._counts, {}
        histograms, self._histograms = self._histograms, {}
        for (metric, values), amount in counts.items():
            (metric.labels(*values) if values else metric).inc(amount)
        for (metric, values), slot in histograms.items():
            child = metric.labels(*values)
            # Histogram.observe() adds to _sum and to one bucket; this adds many observations at once
            # (tests/observability/test_metrics.py checks the result against observe()).
            child._sum.inc(slot[0])
            for bucket, count in zip(child._buckets, slot[1:], strict=True):
                if count:
                    bucket.inc(count)

    def request_observe(self, record: dict[str, Any], index: LabelIndex) -> None:
        """Count one request from its usage record (``RequestContext.usage_record``)."""
        count, observe = self._count, self._observe
        model = index.model(record["model"])
        deployment_id = record["deployment_id"]
        deployment = index.deployment(deployment_id)
        tenant = (index.tenant(record["tenant_id"]),) if self.tenant_label else ()
        count(self.requests, (model, deployment, str(record["status"]), record["outcome"], *tenant))
        pair = (model, deployment)
        observe(self.latency, pair, record["latency_ms"] / 1000.0)
        ttft = record["ttft_ms"]
        if ttft is not None:
            observe(self.ttft, pair, ttft / 1000.0)
        # Requests that reached the balancer (the forwarder sets the estimate), leased or refused.
        if record["estimated_prompt_tokens"] is not None:
            observe(self.queue_wait, (model,), record["queue_wait_ms"] / 1000.0)
        prompt, completion = record["prompt_tokens"], record["completion_tokens"]
        if prompt:
            count(self.tokens, (model, "prompt", *tenant), prompt)
            cached = record["cached_tokens"]
            if cached:
                count(self.tokens, (model, "cached", *tenant), cached)
        if completion:
            count(self.tokens, (model, "completion", *tenant), completion)
        cost = record["cost"]
        if cost:
            count(self.cost, (model, *tenant), float(cost))

    def attempt_observe(self, deployment: str, result: str) -> None:
        self._count(self.attempts, (deployment, result))

    def retry_observe(self, deployment: str) -> None:
        self._count(self.retries, (deployment,))

    def spillover_observe(self, model: str, deployment: str) -> None:
        self._count(self.spillovers, (model, deployment))

    def breaker_opened_observe(self, deployment: str) -> None:
        self._count(self.breaker_opened, (deployment,))


_metrics: GatewayMetrics | None = None
_resolved = False


def gateway_metrics() -> GatewayMetrics | None:
    """The process's metrics, made on first use from the settings; None when metrics are off."""
    global _metrics, _resolved
    if not _resolved:
        from django.conf import settings

        options = settings.OBSERVABILITY
        if options["METRICS"] and _metrics is None:
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            if directory:
                os.makedirs(directory, exist_ok=True)  # its files are made with the first series
            _metrics = GatewayMetrics(tenant_label=options["METRICS_TENANT_LABEL"])
        _resolved = True
    return _metrics


def metrics_install(metrics: GatewayMetrics | None) -> GatewayMetrics | None:
    """Use ``metrics`` (None: metrics off) from now on; returns what was used before (tests)."""
    global _metrics, _resolved
    previous = gateway_metrics()
    _metrics, _resolved = metrics, True
    return previous
