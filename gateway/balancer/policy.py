"""The balancing policy: tiers, spill-over, the priority queue and upstream signals.

``BalancedDispatcher`` implements ``gateway.balancer.dispatcher.Dispatcher`` on a ``BalancerState``:

* Tiers are tried in order (1 first). Within a tier the state picks the deployment with the
  most headroom that fits the demand (weights respected).
* If no deployment of a tier fits now, the request may wait for it up to that tier's
  ``max_wait``. When the state's wait hint (windows, cool-down, breaker) says the wait would be
  longer than what is left of that allowance, it goes to the next tier at once (spill-over).
  The last tier is waited for until the request's queue timeout.
* Waiters stand in one queue per model, served by priority, then the tenant's round (fairness),
  then arrival; a new arrival never jumps ahead of waiters. The head of the queue decides for
  itself which tier to take, so priority order holds across tiers.
* A request that comes back for another lease (after a 429 or a failure) keeps the time it has
  waited: a tier's ``max_wait`` and the queue timeout bound its waiting over all its attempts,
  so a deployment that keeps answering 429 with a short ``retry-after`` cannot hold a request
  on its tier past that tier's allowance.
* An upstream 429 releases the reservation (the upstream did not count it) and cools the
  deployment until its ``retry-after``; 5xx, connect errors, timeouts and refusals of the
  gateway (401/403/404) feed the breaker, and the failure's reason is noted for the status page
  (``gateway.balancer.failures``).
  ``x-ratelimit-remaining-*`` is passed to the state only for a limit the deployment does not
  configure (see ``_observe``).
* Token limits are seen through the deployment's learned calibration
  (``gateway.balancer.calibration``): the state is given the TPM in the gateway's units, i.e. the
  configured TPM divided by how many tokens the upstream charges per token the gateway reserves,
  learned from the upstream's remaining-tokens figures and its 429s.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from gateway.balancer.breaker import OPEN
from gateway.balancer.calibration import Calibration, CalibrationSync
from gateway.balancer.contract import BalancerState, Denied, Grant, Reason, new_id, poll_pause
from gateway.balancer.dispatcher import UNHEALTHY_CODE, Demand, Lease, NoCapacity
from gateway.balancer.failures import FailureNotes
from gateway.balancer.guard import DispatchGuard
from gateway.snapshot.types import DeploymentView

# Cool-down after a 429 that names no retry-after: short, since the SDKs' own first backoff is ~0.5 s.
DEFAULT_COOL_SECONDS = 1.0
# Forgetting requests that ended without telling us (see ``BalancedDispatcher._prune``): an
# entry is touched by each acquire, and no attempt outlasts the upstream's total timeout.
PRUNE_EVERY_SECONDS = 10.0
FORGET_AFTER_SECONDS = 900.0
# How many times a late grant is renewed before it is used anyway (see ``_renewed``).
RENEW_ATTEMPTS = 3


class _Waits:
    """What the dispatcher remembers of a request between its attempts."""

    __slots__ = ("demand", "touched", "waited")

    def __init__(self, demand: Demand, now: float) -> None:
        self.demand = demand  # held so that id(demand) cannot be reused while the entry lives
        self.waited = 0.0  # seconds spent in acquire by the attempts before this one
        self.touched = now


class BalancedDispatcher:
    def __init__(
        self,
        state: BalancerState,
        *,
        clock=time.time,
        notes: FailureNotes | None = None,
        calibration: Calibration | None = None,
        calibration_sync: CalibrationSync | None = None,
    ) -> None:
        self.state = state
        self.clock = clock
        self.notes = notes or FailureNotes()
        self.calibration = calibration or Calibration(state.config.minute, clock=clock)
        self.calibration_sync = calibration_sync
        # The request windows' guard, measured per deployment (``gateway.balancer.guard``).
        self.guard = DispatchGuard(state.config.guard_floor)
        # Requests between their first acquire and their end, by id(demand). A 429 or a failure
        # sends a request back to ``acquire``; a tier's max wait and the queue timeout are the
        # request's, so the time its earlier attempts waited counts (see ``acquire``).
        self._requests: dict[int, _Waits] = {}
        self._pruned_at = 0.0
        # A grant that reaches us later than this after its reservation was recorded is renewed
        # (see ``_renewed``): half the guard's ceiling for the shortest window, the other half
        # being left for sending the request. Not the measured guard (10 ms and up): with it the
        # two-process e2e test served 74-82 % in arrival order (>= 90 % expected) in two of three
        # loaded runs, presumably renewals that found the window full sending their request to
        # the back of the queue. The measured guard covers late grants anyway: their delay is in
        # its samples (reservation to hand-over).
        config = state.config
        self._late_after = config.guard(config.minute / 60.0) / 2.0

    # -- acquiring ------------------------------------------------------------------------------

    async def acquire(
        self, candidates: tuple[DeploymentView, ...], demand: Demand, exclude: frozenset[int], *, wait: bool = True
    ) -> Lease:
        """A lease on the best deployment with room, waiting in the model's queue if need be.

        ``demand.timeout`` and the tiers' ``max_wait`` bound the time the request spends here
        over all its attempts: an attempt after a 429 or a failure starts with what the earlier
        ones waited. (Otherwise a PTU answering 429 with a short retry-after again and again
        would hold the request on its tier for good: each wait fits the allowance.)
        ``wait=False``: a lease only if one is free now and nobody waits, else ``NoCapacity`` at
        once; the request stays known (the caller is expected to ask again, waiting).
        """
        start = self.clock()
        entry = self._entry(demand, start)
        if not wait:
            return await self._acquire_now(candidates, demand, exclude, entry)
        began = start
        try:
            while True:
                first = await self._acquire(candidates, demand, exclude, start, entry.waited + start - began)
                lease = await self._renewed(first, demand)
                if _cancel_pending():  # (see _cancel_pending)
                    if lease is not None:
                        await asyncio.shield(self.state.release(lease.grant))
                    raise asyncio.CancelledError()
                if lease is not None:
                    break
                start = self.clock()  # the deployment filled up meanwhile: wait again
        except BaseException as exc:
            self._requests.pop(id(demand), None)  # no capacity, or the client left: the request ends
            if isinstance(exc, NoCapacity):
                exc.queue_wait = self.clock() - began
            raise
        now = self.clock()
        if lease.queue_wait or start != began:  # it waited (a fast-path grant reports 0)
            lease.queue_wait = now - began
        entry.waited += now - began
        entry.touched = now
        self._dispatched(lease, now)
        return lease

    def sending(self, lease: Lease) -> None:
        """The request of ``lease`` is being handed to the upstream client: its delay since the
        reservation sizes the window guard (``gateway.balancer.guard``)."""
        grant = lease.grant
        self.guard.sent(grant.deployment_id, self.clock() - grant.reserved_at)

    def _capacity(self, deployment: DeploymentView):
        """What the state sees of a deployment: TPM in the gateway's units, the measured guard."""
        return self.guard.capacity(self.calibration.capacity(deployment))

    def _dispatched(self, lease: Lease, now: float) -> None:
        """Tell the calibration a reservation is about to be sent (see ``calibration``)."""
        grant = lease.grant
        lease.extra["calibration"] = self.calibration.dispatched(grant.deployment_id, grant.tokens, now)

    async def _acquire_now(self, candidates, demand: Demand, exclude: frozenset[int], entry: _Waits) -> Lease:
        """``acquire(wait=False)``: one try across the tiers, without joining the queue."""
        tiers = _tiers(d for d in candidates if d.id not in exclude)
        result = await self._try_tiers(demand.model, None, tiers, demand, entry.waited) if tiers else None
        if isinstance(result, Grant):
            lease = await self._renewed(self._lease(result, candidates, demand, 0.0), demand)
            if _cancel_pending():  # (see _cancel_pending)
                if lease is not None:
                    await asyncio.shield(self.state.release(lease.grant))
                raise asyncio.CancelledError()
            if lease is not None:
                entry.touched = self.clock()
                self._dispatched(lease, entry.touched)
                return lease
        raise NoCapacity("No deployment of this model has room now.", 0.1)

    async def _renewed(self, lease: Lease, demand: Demand) -> Lease | None:
        """The lease with a grant recorded no more than ``_late_after`` ago, or None.

        A reservation counts in our windows from the time it was recorded, the upstream counts the
        request when it arrives; the windows' guard absorbs the few milliseconds in between. A
        grant can reach us much later than it was recorded: the Redis call that made it waited
        for a connection (a burst opens one per concurrent call) or for a busy event loop. Sent
        then, the request stays in the upstream's window that much longer than in ours, and the
        slot we free for the next request is still taken upstream: a 429 (measured: 70-120 ms
        late grants at the start of a 60-request burst drew 1-2 upstream 429s every time). So
        such a grant is moved to now on the same deployment (``state.renew``: released and taken
        again in one atomic step, so no other request takes the slot in between and this one
        keeps its turn; before, two calls let a waiter of another process in and reordered
        service); None if it has no room any more.
        """
        for _ in range(RENEW_ATTEMPTS):
            grant = lease.grant
            if self.clock() - grant.reserved_at <= self._late_after:
                break
            fresh = await asyncio.shield(self.state.renew(grant, self._capacity(lease.deployment)))
            if not isinstance(fresh, Grant):
                return None
            lease.grant = fresh
        return lease

    async def _acquire(self, candidates, demand: Demand, exclude: frozenset[int], start: float, waited: float) -> Lease:
        """One attempt's lease. ``waited``: what the request had waited before ``start``."""
        tiers = _tiers(d for d in candidates if d.id not in exclude)
        if not tiers:
            raise NoCapacity("No deployment of this model is available; try again shortly.", 1.0)
        origin = start - waited  # waited(now) = now - origin
        deadline = origin + demand.timeout
        result = await self._try_tiers(demand.model, None, tiers, demand, waited)
        if isinstance(result, Grant):
            return self._lease(result, candidates, demand, 0.0)
        self._raise_if_hopeless(result, demand)
        self._raise_if_late(result, demand, deadline - start)
        _raise_if_cancel_pending()
        ticket = new_id()
        await self._enqueue(demand, ticket, result, start)
        granted = False
        try:
            for attempt in itertools.count():
                _raise_if_cancel_pending()
                now = self.clock()
                result = await self._try_tiers(demand.model, ticket, tiers, demand, now - origin)
                if isinstance(result, Grant):
                    granted = True
                    return self._lease(result, candidates, demand, self.clock() - start)
                self._raise_if_hopeless(result, demand)
                if result.reason == Reason.EVICTED:
                    # A request of better priority took our place in the full queue.
                    raise NoCapacity(
                        "Too many requests are waiting for this model; retry shortly.", 1.0, code="queue_full"
                    )
                if result.reason == Reason.NOT_QUEUED:
                    # Our lease lapsed (the loop was starved): rejoin rather than give up.
                    await self._enqueue(demand, ticket, result, now)
                    continue
                remaining = deadline - now
                self._raise_if_late(result, demand, remaining)
                await self.state.wait_change(demand.model, ticket, poll_pause(self.state, result, attempt, remaining))
            raise AssertionError("unreachable: the loop above returns or raises")
        finally:
            if not granted:
                await asyncio.shield(self.state.leave(demand.model, ticket))

    async def _enqueue(self, demand: Demand, ticket: str, result: Denied, now: float) -> None:
        if not await self.state.enqueue(demand.model, ticket, demand.priority, demand.tenant, now):
            raise NoCapacity(
                "Too many requests are waiting for this model; retry shortly.",
                max(_retry_hint(result.wait_seconds, 1.0), 1.0),
                code="queue_full",
            )

    async def _try_tiers(self, queue: str, ticket: str | None, tiers, demand: Demand, waited: float) -> Grant | Denied:
        """One attempt across the tiers, spilling over past a tier whose wait exceeds its allowance.

        ``waited``: how long the request has waited so far (all its attempts). A denial's wait is
        the soonest at which any tier the request would still take could fit.
        """
        result: Denied | None = None
        for index, (max_wait, deployments) in enumerate(tiers):
            capacities = tuple(self._capacity(d) for d in deployments)
            outcome = await self.state.try_acquire_queued(queue, ticket, capacities, demand.tokens)
            if isinstance(outcome, Grant) or outcome.reason in (Reason.QUEUED, Reason.NOT_QUEUED, Reason.EVICTED):
                return outcome
            last = index == len(tiers) - 1
            if not last and (
                outcome.reason in (Reason.NEVER, Reason.UNHEALTHY) or outcome.wait_seconds > max_wait - waited
            ):
                result = _sooner(result, outcome)
                continue  # spill over to the next tier now
            # Wait for this tier; but a tier passed over above may free first, and the waiter
            # tries every tier in order on each attempt, so it would take that one then.
            return _sooner(result, outcome)
        raise AssertionError("the last tier always answers")  # callers pass at least one tier

    def _raise_if_hopeless(self, result: Denied, demand: Demand) -> None:
        if result.reason == Reason.UNHEALTHY:
            raise NoCapacity(
                f"Every deployment of model '{demand.model}' is failing and paused by its circuit breaker; "
                "nothing was sent upstream. Retry shortly.",
                _retry_hint(result.wait_seconds, 1.0),
                code=UNHEALTHY_CODE,
            )
        if result.reason == Reason.NEVER:
            raise NoCapacity(
                f"Request too large for model '{demand.model}': it needs {demand.tokens} tokens, more than any "
                "deployment's per-minute limit. Reduce the prompt or max_tokens.",
                60.0,
                code="request_too_large",
            )

    def _raise_if_late(self, result: Denied, demand: Demand, remaining: float) -> None:
        """Give up when the queue timeout is spent or capacity cannot come within it."""
        if remaining <= 0 or (result.reason == Reason.CAPACITY and result.wait_seconds > remaining):
            raise NoCapacity(
                f"No capacity for model '{demand.model}' within {demand.timeout:.0f}s; retry shortly.",
                _retry_hint(result.wait_seconds, 1.0),
            )

    def _lease(self, grant: Grant, candidates, demand: Demand, waited: float) -> Lease:
        deployment = next(d for d in candidates if d.id == grant.deployment_id)
        return Lease(deployment, grant, queue_wait=waited, extra={"request": id(demand)})

    # -- per-request bookkeeping -----------------------------------------------------------------

    def _entry(self, demand: Demand, now: float) -> _Waits:
        entry = self._requests.get(id(demand))
        if entry is None or entry.demand is not demand:
            if now - self._pruned_at > PRUNE_EVERY_SECONDS:
                self._prune(now)
            entry = self._requests[id(demand)] = _Waits(demand, now)
        return entry

    def _prune(self, now: float) -> None:
        """Forget requests that ended on a failure or a 429 without asking again (the forwarder
        gave up): nothing tells us, so entries go once long untouched."""
        self._pruned_at = now
        stale = [k for k, e in self._requests.items() if now - e.touched > FORGET_AFTER_SECONDS]
        for key in stale:
            del self._requests[key]

    def _done(self, lease: Lease) -> None:
        key = lease.extra.get("request") if lease.extra else None
        if key is not None:
            self._requests.pop(key, None)

    # -- outcomes -------------------------------------------------------------------------------

    async def succeeded(self, lease: Lease, prompt_tokens: int, completion_tokens: int, headers) -> None:
        self._done(lease)
        grant = lease.grant
        # Off the response path: it rides along the next acquire (Redis), see settle_later.
        await self.state.settle_later(grant, prompt_tokens + completion_tokens, ok=True)
        self._answered(lease, headers, rate_limited=False)
        await self._observe(lease, headers)

    async def rate_limited(self, lease: Lease, retry_after: float | None, headers) -> None:
        grant = lease.grant
        now = self.clock()
        await self.state.release(grant, now)
        await self.state.cool(
            grant.deployment_id, now + (retry_after if retry_after is not None else DEFAULT_COOL_SECONDS), now
        )
        self._answered(lease, headers, rate_limited=True)
        await self._observe(lease, headers)

    async def failed(self, lease: Lease, *, reached_upstream: bool, reason: str = "") -> bool:
        grant = lease.grant
        if reached_upstream:
            # It may have been counted upstream (a timeout, a 5xx after admission): keep it.
            await self.state.settle(grant, grant.tokens)
        else:
            await self.state.release(grant)
            sent = lease.extra.get("calibration") if lease.extra else None
            if sent is not None:
                self.calibration.released(sent)
        if reason:
            await self.notes.note(grant.deployment_id, reason)
        return await self.state.record_failure(grant.deployment_id) == OPEN

    async def abandoned(self, lease: Lease, prompt_tokens: int, completion_tokens: int) -> None:
        self._done(lease)
        await self.state.settle_later(lease.grant, prompt_tokens + completion_tokens)

    def _answered(self, lease: Lease, headers, *, rate_limited: bool) -> None:
        sent = lease.extra.get("calibration") if lease.extra else None
        if sent is not None and headers is not None:
            self.calibration.answered(sent, lease.deployment.tpm, headers, rate_limited=rate_limited)

    async def _observe(self, lease: Lease, headers) -> None:
        """Pass the upstream's ``x-ratelimit-remaining-*`` to the state, for the units whose limit
        the gateway does not know.

        Where the deployment has a configured RPM (TPM), the gateway's own windows are the
        upstream's windows (``gateway.balancer.windows`` on both sides), counted from our reservations and
        kept a guard longer, so they already hold the upstream within that limit. The upstream's
        word adds nothing there but staleness: it is the remainder of its *tightest* window (for
        requests, the 1/60-minute one, which a burst of RPM/60 requests empties) as of the moment
        it counted this request, and the state holds it for a sixth of a minute. Taken as is, a
        burst that momentarily fills the one-second window stops the deployment for ten seconds;
        and at saturation every answer says the token window is (nearly) full, which stops the
        deployment for ten seconds past the moment our window frees. Measured with a 3 s minute
        (tests/e2e/test_balancing.py): a 60-request burst within capacity took 7 s instead of
        1.5 s, and saturation used 31-64 % of the capacity instead of 100 %. A deployment whose
        real quota is below its configured one (or shared outside the gateway) still answers
        429, which cools it and retries elsewhere.
        """
        requests = tokens = None
        for name, value in headers:
            if name == b"x-ratelimit-remaining-requests":
                requests = _int_or_none(value)
            elif name == b"x-ratelimit-remaining-tokens":
                tokens = _int_or_none(value)
        deployment = lease.deployment
        if deployment.rpm > 0:
            requests = None
        if deployment.tpm > 0:
            tokens = None
        if requests is not None or tokens is not None:
            await self.state.observe(lease.grant.deployment_id, requests, tokens)

    async def aclose(self) -> None:
        if self.calibration_sync is not None:
            await self.calibration_sync.stop()
        await self.state.aclose()


def _cancel_pending() -> bool:
    """Whether this task was cancelled although the await it was in returned normally.

    redis-py's asyncio client (8.1) can lose a cancellation that lands while it sends a command:
    the call returns as if nothing happened and the task runs on, still "cancelling" (reproduced:
    15 of 300 cancels landing in ``Redis.get``). A request whose client left would then keep
    waiting in the queue and be sent upstream with nobody to answer; so the waiting loop checks.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _raise_if_cancel_pending() -> None:
    if _cancel_pending():
        raise asyncio.CancelledError()


def _tiers(deployments) -> list[tuple[float, tuple[DeploymentView, ...]]]:
    """(allowance, deployments) per tier in order; a tier waits as long as its most patient member."""
    by_tier: dict[int, list[DeploymentView]] = {}
    for d in deployments:
        by_tier.setdefault(d.tier, []).append(d)
    return [(max(d.max_wait for d in ds), tuple(ds)) for _, ds in sorted(by_tier.items())]


def _sooner(a: Denied | None, b: Denied) -> Denied:
    """The denial to act on across tiers: capacity worth waiting for first (the soonest), then
    breakers (the soonest probe), then never."""
    if a is None:
        return b
    rank = {Reason.NEVER: 2, Reason.UNHEALTHY: 1}
    ra, rb = rank.get(a.reason, 0), rank.get(b.reason, 0)
    if ra != rb:
        return a if ra < rb else b
    return a if a.wait_seconds <= b.wait_seconds else b


def _retry_hint(wait: float, default: float) -> float:
    """A Retry-After from a wait hint: the hint when finite, else ``default``; never below 0.1 s."""
    return max(wait if wait != float("inf") else default, 0.1)


def _int_or_none(value: bytes) -> int | None:
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number >= 0 else None
