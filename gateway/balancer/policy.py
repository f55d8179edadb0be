"""The balancing policy: tiers, spill-over, the priority queue and upstream signals.

``BalancedDispatcher`` implements ``gateway.dispatch.Dispatcher`` on a ``BalancerState``:

* Tiers are tried in order (1 first). Within a tier the state picks the deployment with the
  most headroom that fits the demand (weights respected).
* If no deployment of a tier fits now, the request may wait for it up to that tier's
  ``max_wait``. When the state's wait hint (windows, cool-down, breaker) says the wait would be
  longer than what is left of that allowance, it goes to the next tier at once (spill-over).
  The last tier is waited for until the request's queue timeout.
* Waiters stand in one queue per model, served by priority, then the tenant's round (fairness),
  then arrival; a new arrival never jumps ahead of waiters. The head of the queue decides for
  itself which tier to take, so priority order holds across tiers.
* An upstream 429 releases the reservation (the upstream did not count it) and cools the
  deployment until its ``retry-after``; 5xx, connect errors and timeouts feed the breaker.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence

from gateway.balancer.state import BalancerState, Denied, Grant, Reason, poll_pause, new_id
from gateway.dispatch import Demand, Lease, NoCapacity
from gateway.snapshot_types import DeploymentView

# Cool-down after a 429 that names no retry-after: short, since the SDKs' own first backoff is ~0.5 s.
DEFAULT_COOL_SECONDS = 1.0


class BalancedDispatcher:
    def __init__(self, state: BalancerState, *, clock=time.time) -> None:
        self.state = state
        self.clock = clock

    # -- acquiring ------------------------------------------------------------------------------

    async def acquire(self, candidates: tuple[DeploymentView, ...], demand: Demand, exclude: frozenset[int]) -> Lease:
        """A lease on the best deployment with room, waiting in the model's queue if need be."""
        tiers = _tiers(d for d in candidates if d.id not in exclude)
        if not tiers:
            raise NoCapacity("No deployment of this model is available; try again shortly.", 1.0)
        start = self.clock()
        result = await self._try_tiers(demand.model, None, tiers, demand, 0.0)
        if isinstance(result, Grant):
            return self._lease(result, candidates, 0.0)
        self._raise_if_hopeless(result, demand)
        ticket = new_id()
        if not await self.state.enqueue(demand.model, ticket, demand.priority, demand.tenant, start):
            raise NoCapacity("Too many requests are waiting for this model; retry shortly.",
                             max(result.wait_seconds, 1.0), code="queue_full")
        granted = False
        try:
            for attempt in itertools.count():
                now = self.clock()
                result = await self._try_tiers(demand.model, ticket, tiers, demand, now - start)
                if isinstance(result, Grant):
                    granted = True
                    return self._lease(result, candidates, self.clock() - start)
                self._raise_if_hopeless(result, demand)
                if result.reason == Reason.NOT_QUEUED:
                    # Our lease lapsed (the loop was starved): rejoin rather than give up.
                    await self.state.enqueue(demand.model, ticket, demand.priority, demand.tenant, now)
                    continue
                remaining = start + demand.timeout - now
                if remaining <= 0 or (result.reason == Reason.CAPACITY and result.wait_seconds > remaining):
                    raise NoCapacity(
                        f"No capacity for model '{demand.model}' within {demand.timeout:.0f}s; retry shortly.",
                        max(result.wait_seconds if result.wait_seconds != float("inf") else 1.0, 0.1),
                    )
                await self.state.wait_change(demand.model, ticket, poll_pause(self.state, result, attempt, remaining))
        finally:
            if not granted:
                await asyncio.shield(self.state.leave(demand.model, ticket))

    async def _try_tiers(self, queue: str, ticket: str | None, tiers, demand: Demand, waited: float) -> Grant | Denied:
        """One attempt across the tiers, spilling over past a tier whose wait exceeds its allowance."""
        result: Denied | None = None
        for index, (max_wait, deployments) in enumerate(tiers):
            outcome = await self.state.try_acquire_queued(queue, ticket, deployments, demand.tokens)
            if isinstance(outcome, Grant) or outcome.reason in (Reason.QUEUED, Reason.NOT_QUEUED):
                return outcome
            last = index == len(tiers) - 1
            if not last and (outcome.reason == Reason.NEVER or outcome.wait_seconds > max_wait - waited):
                result = _sooner(result, outcome)
                continue  # spill over to the next tier now
            return _sooner(result, outcome) if outcome.reason == Reason.NEVER else outcome
        return result

    def _raise_if_hopeless(self, result: Denied, demand: Demand) -> None:
        if result.reason == Reason.NEVER:
            raise NoCapacity(
                f"Request too large for model '{demand.model}': it needs {demand.tokens} tokens, more than any "
                "deployment's per-minute limit. Reduce the prompt or max_tokens.", 60.0, code="request_too_large")

    def _lease(self, grant: Grant, candidates, waited: float) -> Lease:
        deployment = next(d for d in candidates if d.id == grant.deployment_id)
        return Lease(deployment, grant, queue_wait=waited)

    # -- outcomes -------------------------------------------------------------------------------

    async def succeeded(self, lease: Lease, prompt_tokens: int, completion_tokens: int, headers) -> None:
        grant = lease.grant
        await self.state.settle(grant, prompt_tokens + completion_tokens)
        await self._observe(lease, headers)
        await self.state.record_success(grant.deployment_id)

    async def rate_limited(self, lease: Lease, retry_after: float | None, headers) -> None:
        grant = lease.grant
        now = self.clock()
        await self.state.release(grant, now)
        await self.state.cool(grant.deployment_id, now + (retry_after if retry_after is not None else DEFAULT_COOL_SECONDS), now)
        await self._observe(lease, headers)

    async def failed(self, lease: Lease, *, reached_upstream: bool) -> None:
        grant = lease.grant
        if reached_upstream:
            # It may have been counted upstream (a timeout, a 5xx after admission): keep it.
            await self.state.settle(grant, grant.tokens)
        else:
            await self.state.release(grant)
        await self.state.record_failure(grant.deployment_id)

    async def abandoned(self, lease: Lease, prompt_tokens: int, completion_tokens: int) -> None:
        await self.state.settle(lease.grant, prompt_tokens + completion_tokens)

    async def _observe(self, lease: Lease, headers) -> None:
        requests = tokens = None
        for name, value in headers:
            if name == b"x-ratelimit-remaining-requests":
                requests = _int_or_none(value)
            elif name == b"x-ratelimit-remaining-tokens":
                tokens = _int_or_none(value)
        if requests is not None or tokens is not None:
            await self.state.observe(lease.grant.deployment_id, requests, tokens)

    async def aclose(self) -> None:
        await self.state.aclose()


def _tiers(deployments) -> list[tuple[float, tuple[DeploymentView, ...]]]:
    """(allowance, deployments) per tier in order; a tier waits as long as its most patient member."""
    by_tier: dict[int, list[DeploymentView]] = {}
    for d in deployments:
        by_tier.setdefault(d.tier, []).append(d)
    return [(max(d.max_wait for d in ds), tuple(ds)) for _, ds in sorted(by_tier.items())]


def _sooner(a: Denied | None, b: Denied) -> Denied:
    if a is None:
        return b
    if a.reason == Reason.NEVER:
        return b
    if b.reason == Reason.NEVER:
        return a
    return a if a.wait_seconds <= b.wait_seconds else b


def _int_or_none(value: bytes) -> int | None:
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number >= 0 else None


def deployments_of(snapshot) -> Sequence[DeploymentView]:
    return snapshot.all_deployments
