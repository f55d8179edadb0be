"""The request path's dispatcher, observed: attempts, spill-overs and breakers for the metrics, the
attempts of each request for its log line, queue-wait and attempt spans for its trace.

``ObservedDispatcher`` wraps the dispatcher the runtime builds (``GuardedDispatcher`` on the
``BalancedDispatcher``) and changes nothing of what it decides. It is only put in place when
metrics, the request log or tracing is on (``dispatcher_observed``).
"""

from __future__ import annotations

from typing import Any

from gateway.balancer.dispatcher import Demand, Lease, NoCapacity
from gateway.observability import tracing
from gateway.observability.context import current_watch
from gateway.observability.labels import deployment_label, label_index
from gateway.observability.metrics import gateway_metrics
from gateway.observability.request import Attempt
from gateway.snapshot.types import DeploymentView

OK, RATE_LIMITED, FAILED, ABANDONED = "ok", "rate_limited", "failed", "abandoned"


class ObservedDispatcher:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def state(self):
        return self.inner.state

    @property
    def notes(self):
        return self.inner.notes

    @property
    def calibration(self):
        return self.inner.calibration

    @property
    def guard(self):
        return self.inner.guard

    async def acquire(
        self, candidates: tuple[DeploymentView, ...], demand: Demand, exclude: frozenset[int], *, wait: bool = True
    ) -> Lease:
        """As the inner dispatcher's; notes the attempt the lease starts on the current request."""
        watch = current_watch.get()
        span = None
        if watch is not None and watch.span is not None:
            span = tracing.child_span_start(
                watch.span,
                tracing.QUEUE_WAIT_SPAN,
                {"gateway.model": demand.model, "gateway.priority": demand.priority, "gateway.wait": wait},
            )
        try:
            lease = await self.inner.acquire(candidates, demand, exclude, wait=wait)
        except BaseException as exc:
            if span is not None:
                refusal = exc.code if isinstance(exc, NoCapacity) else getattr(exc, "code", None) or type(exc).__name__
                tracing.span_end(span, {"gateway.result": refusal})
            raise
        label = deployment_label(lease.deployment)
        if span is not None:
            tracing.span_end(
                span,
                {
                    "gateway.result": "granted",
                    "gateway.deployment": label,
                    "gateway.queue_wait_ms": lease.queue_wait * 1e3,
                },
            )
        metrics = gateway_metrics()
        if metrics is not None and _spilled_over(lease.deployment, candidates, exclude):
            metrics.spillover_observe(label_index().model(demand.model), label)
        if watch is not None:
            attempt = Attempt(label)
            watch.attempts.append(attempt)
            if watch.span is not None:
                attempt.span = watch.attempt_span = tracing.child_span_start(
                    watch.span,
                    tracing.ATTEMPT_SPAN,
                    {
                        "gateway.deployment": label,
                        "gateway.endpoint": lease.deployment.endpoint.name,
                        "gateway.attempt": len(watch.attempts),
                        "server.address": lease.deployment.endpoint.base_url,
                    },
                    client=True,
                )
            lease.extra["attempt"] = attempt
        return lease

    def sending(self, lease: Lease) -> None:
        self.inner.sending(lease)

    async def succeeded(self, lease: Lease, prompt_tokens: int, completion_tokens: int, headers) -> None:
        self._ended(lease, OK)
        await self.inner.succeeded(lease, prompt_tokens, completion_tokens, headers)

    async def rate_limited(self, lease: Lease, retry_after: float | None, headers) -> None:
        self._ended(lease, RATE_LIMITED, {"gateway.retry_after_s": retry_after})
        await self.inner.rate_limited(lease, retry_after, headers)

    async def failed(self, lease: Lease, *, reached_upstream: bool, reason: str = "") -> bool:
        # ``reason`` is scrubbed of secrets by the forwarder (it goes to the status page too).
        self._ended(lease, FAILED, {"gateway.failure": reason or None}, error=reason or "failed")
        opened = await self.inner.failed(lease, reached_upstream=reached_upstream, reason=reason)
        metrics = gateway_metrics()
        if opened and metrics is not None:
            metrics.breaker_opened_observe(deployment_label(lease.deployment))
        return opened

    async def abandoned(self, lease: Lease, prompt_tokens: int, completion_tokens: int) -> None:
        self._ended(lease, ABANDONED)
        await self.inner.abandoned(lease, prompt_tokens, completion_tokens)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def _ended(
        self, lease: Lease, result: str, attributes: dict[str, Any] | None = None, *, error: str | None = None
    ) -> None:
        attempt = lease.extra.get("attempt") if lease.extra else None
        metrics = gateway_metrics()
        if metrics is not None:
            metrics.attempt_observe(attempt.deployment if attempt else deployment_label(lease.deployment), result)
        if attempt is None:
            return
        attempt.result = result
        if attempt.span is not None:
            tracing.span_end(attempt.span, {"gateway.result": result, **(attributes or {})}, error=error)
            watch = current_watch.get()
            if watch is not None and watch.attempt_span is attempt.span:
                watch.attempt_span = None


def _spilled_over(deployment: DeploymentView, candidates: tuple[DeploymentView, ...], exclude: frozenset[int]) -> bool:
    """Whether the lease went to a worse tier than the best the request could have used."""
    best = min((d.tier for d in candidates if d.id not in exclude), default=deployment.tier)
    return deployment.tier > best


def dispatcher_observed(inner: Any) -> Any:
    """``inner`` observed when metrics, the request log or tracing is on; else ``inner`` itself."""
    from gateway.observability.request import _log_level

    if gateway_metrics() is None and _log_level() is None and not tracing.tracing_enabled():
        return inner
    return ObservedDispatcher(inner)
