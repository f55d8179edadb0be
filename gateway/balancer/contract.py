"""The balancer's shared state: the contract both backends implement and the rules they share.

A backend (``memory.MemoryState`` in one process, ``redis_state.RedisState`` across processes)
keeps, per deployment: rolling request and token windows, requests in flight, what the
upstream last said (``x-ratelimit-remaining-*``), a cool-down and a circuit breaker; and per
queue name: the tickets of requests waiting for capacity. Tier and spill-over policy is *not*
here: the caller (``gateway.balancer.policy``) picks the candidates (one tier) and the time it is
willing to wait, and runs the waiting loop on these primitives (``poll_pause`` paces it).

Definitions both backends implement identically (the test suite runs against both):

Window
    ``request_windows(rpm, minute)`` and ``token_windows(tpm, minute)`` from
    ``gateway.balancer.windows``, counted in fixed buckets: a window's ``span`` is ``seconds +
    guard``; its buckets are ``(seconds + guard ceiling) / BUCKETS_PER_WINDOW`` seconds long
    (the same for every process, whatever guard it measured), bucket ``b`` holding the
    reservations made in ``[b * bucket, (b + 1) * bucket)``.
    A reservation made at ``t`` counts while its bucket ``floor(t / bucket)`` is at least
    ``floor((now - span) / bucket)`` (``counted``), that is until ``bucket_end(t) + span`` at
    the latest: never less than ``span`` after ``t``. So no span of ``seconds`` ever holds more
    than ``limit`` units, even seen from the upstream. The buckets are what make Redis cheap
    (a few hash fields per window, no per-request log); their price is that an entry counts up
    to one bucket (2.5 % of the span, 1.25 % on average) longer than the exact log did.

Guard
    ``max(guard_fraction * seconds, guard_min)``. We reserve at ``t``; the upstream counts the
    request on *arrival*, ``t + delta`` with delta = our send path plus network, a few ms that
    vary per request. If a slot were freed at exactly ``t + seconds``, the next request could
    arrive upstream less than ``seconds`` after the first one did (when its delta is smaller)
    and draw a 429. Keeping each entry ``guard`` longer absorbs that jitter and small clock
    differences between gateway hosts. That fixed value is the ceiling: request windows use the
    guard each process measures (``gateway.balancer.guard``: a high quantile of the delay from
    reservation to sending, per deployment), at least ``guard_floor``; a 50 ms guard is 5 % of
    the 1 s window, which is what an RPM-bound deployment loses to it. Token windows (the
    minute, where the ceiling is 2 %) keep the ceiling.

Headroom
    For a demand of 1 request + D tokens, each constraint k (each window; the upstream's
    remaining requests and tokens while fresh), with limit ``L`` and ``U`` counted, gives a
    remaining fraction: ``(L - U) / L`` for requests, ``(L - U - D) / L`` for tokens.
    ``headroom = min_k`` of those (1.0 with no constraint). Requests are measured *before* the
    one request of the demand: it is the same for every candidate, and subtracting it would
    pin every small window (limit 1 for RPM < 120) at 0 and hide the token load; tokens are
    measured *after* the demand, which differs in weight between small and large deployments.
    The demand *fits* when no constraint would go over (``U + d <= L`` everywhere) and the
    deployment is neither cooling down nor blocked by its breaker. For the upstream's word,
    ``U`` is what we reserved there since the observation and ``L = max(observed remaining,
    our smallest limit of that unit, 1)``: the upstream reports its tightest window, which is
    the size of our smallest one. Fractions rank deployments in proportion to their limits.

Score and choice
    ``score = weight * headroom`` (weight <= 0: ``headroom - 2``, a standby used only when no
    weighted candidate fits). The highest score wins; scores within 1e-9 tie and a uniform
    random draw picks among them, so identical deployments share load.

Wait hint
    A denied demand carries the soonest time at which some candidate would fit if nothing
    else changed: the latest of its blocking constraints' release times (oldest window entries
    expiring, cool-down end, breaker reopening, probe deadline, upstream word expiring); the
    minimum over candidates; ``inf`` if the demand exceeds a whole window limit everywhere.
"""

from __future__ import annotations

import abc
import asyncio
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from gateway.balancer.windows import request_windows, token_windows
from gateway.snapshot.types import SKU_PROVISIONED, SKU_STANDARD

INF = math.inf
TIE_EPSILON = 1e-9
MIN_WAIT = 1e-6  # the smallest wait a denial reports
REQUESTS = "r"
TOKENS = "t"


class Reason(StrEnum):
    """Why a demand was not granted."""

    CAPACITY = "capacity"  # no candidate fits now; wait_seconds says when one may
    NEVER = "never"  # the demand exceeds a whole window limit of every candidate
    QUEUED = "queued"  # other tickets are ahead in the queue
    NOT_QUEUED = "not_queued"  # the ticket is unknown (left, or its lease expired)
    EVICTED = "evicted"  # a better-priority arrival pushed the ticket out of the full queue
    # Nothing fits, and every candidate that could take the demand has an open circuit breaker
    # (or its half-open probe in flight): wait_seconds says when the first lets a probe through.
    # Not worth queueing for: the deployments are failing, and a client held for the breaker's
    # open period (30 s) sees a hang; it is told at once (503 with Retry-After) instead.
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class Grant:
    """A reservation of 1 request + ``tokens`` on ``deployment_id``; settle or release it once."""

    deployment_id: int
    reservation_id: str
    tokens: int
    reserved_at: float  # the time the windows recorded (never earlier than an older entry's)
    sku: str = SKU_STANDARD
    headroom: float = 0.0  # the chosen deployment's headroom after this reservation
    probe: bool = False  # the single request a half-open breaker lets through
    windows: tuple[WindowSpec, ...] = ()  # the deployment's windows when granted (where settling corrects)


@dataclass(frozen=True, slots=True)
class Denied:
    """Nothing granted. ``wait_seconds`` is a hint (``inf``: the demand can never fit)."""

    wait_seconds: float
    reason: Reason = Reason.CAPACITY


class Capacity(Protocol):
    """What the state needs of a deployment. ``DeploymentView`` satisfies it."""

    @property
    def id(self) -> int: ...
    @property
    def rpm(self) -> int: ...
    @property
    def tpm(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def sku(self) -> str: ...
    @property
    def model(self) -> str: ...  # the model it serves: on Redis, the hash tag of its keys


@dataclass(frozen=True, slots=True)
class Candidate:
    """A minimal ``Capacity`` (tests, tools); the request path passes ``DeploymentView``s."""

    id: int
    rpm: int = 0
    tpm: int = 0
    weight: int = 1
    sku: str = SKU_STANDARD
    model: str = ""
    guard: float = 0.0  # the measured window guard, seconds (0: the ceiling; see ``WindowPlanner``)


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Knobs of the state layer. Times in seconds; ``minute`` scales every window."""

    minute: float = 60.0
    guard_fraction: float = 0.02
    guard_min: float = 0.05
    guard_floor: float = 0.01  # the least a measured guard can be (``WindowPlanner``)
    upstream_ttl: float = 0.0  # how long the upstream's word holds; 0 = minute / 6
    breaker_failures: int = 5  # consecutive failures that open the breaker
    breaker_open_seconds: float = 30.0
    probe_seconds: float = 60.0  # a half-open probe outstanding longer than this is presumed lost
    inflight_ttl: float = 900.0  # an unsettled reservation is forgotten after this (dead process)
    lease_seconds: float = 10.0  # default lease of a queue ticket, refreshed by each poll
    queue_max_depth: int = 1000
    poll_min: float = 0.005  # polling bounds of a waiter (``poll_pause``) when the backend cannot push
    poll_max: float = 0.1

    def __post_init__(self) -> None:
        if self.minute <= 0 or self.guard_fraction < 0 or self.guard_min < 0:
            raise ValueError("minute must be > 0 and the guard >= 0")
        if self.breaker_failures < 1 or self.queue_max_depth < 1 or self.lease_seconds <= 0:
            raise ValueError("breaker_failures, queue_max_depth and lease_seconds must be positive")
        if self.inflight_ttl < self.retention:
            raise ValueError("inflight_ttl must outlast the window retention")

    def guard(self, seconds: float) -> float:
        """The guard's ceiling for a window of ``seconds``: what it is until it was measured."""
        return max(self.guard_fraction * seconds, self.guard_min)

    def request_guard(self, seconds: float, measured: float) -> float:
        """A request window's guard: the measured one (0: not measured yet) within floor..ceiling."""
        ceiling = self.guard(seconds)
        if measured <= 0:
            return ceiling
        return min(ceiling, max(self.guard_floor, measured))

    @property
    def retention(self) -> float:
        """How long an entry stays in the longest window (the minute) and so in the log."""
        return self.minute + self.guard(self.minute)

    @property
    def retention_window(self) -> WindowSpec:
        """The longest window (the minute, bucketed as a token window is): what the log keeps."""
        return WindowSpec(TOKENS, self.minute, self.retention, 0, self.retention / BUCKETS_PER_WINDOW, "keep")

    @property
    def upstream_age(self) -> float:
        return self.upstream_ttl or self.minute / 6.0

    @property
    def key_ttl(self) -> float:
        """Expiry of a deployment's Redis keys: outlives every record they hold."""
        return self.inflight_ttl + self.retention + 60.0


# Buckets per window span (module docstring, "Window"). 40: an entry counts at most 2.5 % (on
# average 1.25 %) of its window longer than an exact log would keep it, and a saturated window,
# whose freed slots are taken again at once, loses up to a bucket per cycle; with 20 that was
# 5 %, too much for 97 % of an RPM-bound deployment (issue 18). More buckets cost Redis more
# fields (~41 live per window) to walk when a denial computes its wait and when a window moves on.
BUCKETS_PER_WINDOW = 40


@dataclass(frozen=True, slots=True)
class WindowSpec:
    unit: str  # REQUESTS or TOKENS
    seconds: float  # the window's nominal length
    span: float  # seconds + guard: how long an entry counts (at least)
    limit: int
    bucket: float = 0.0  # seconds per bucket: span / BUCKETS_PER_WINDOW
    name: str = ""  # the window's field name in Redis: r0, r1, r2 (requests, shortest first), k0 (tokens)

    def oldest_counted(self, now: float) -> int:
        """The oldest bucket still counted at ``now`` (both backends compute exactly this)."""
        return math.floor((now - self.span) / self.bucket)

    def bucket_of(self, t: float) -> int:
        return math.floor(t / self.bucket)

    def counted(self, t: float, now: float) -> bool:
        """Whether a reservation made at ``t`` still counts in this window at ``now``."""
        return self.bucket_of(t) >= self.oldest_counted(now)

    def counted_until(self, t: float) -> float:
        """When a reservation made at ``t`` stops counting: the end of its bucket plus the span."""
        return (self.bucket_of(t) + 1) * self.bucket + self.span


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """A deployment's windows and the denominators of the upstream's word."""

    windows: tuple[WindowSpec, ...]
    request_ref: int  # our smallest request limit (0: none)
    token_ref: int  # our smallest token limit (0: none)


class WindowPlanner:
    """Turns (rpm, tpm, measured guard) into a ``WindowPlan``, cached.

    Request windows count their entries ``seconds + request_guard(seconds, guard)``: the guard
    measured by the process (``gateway.balancer.guard``), within floor and ceiling. Their buckets
    are sized from the ceiling, never from the measurement, so every process cuts a window into
    the same buckets (Redis: the same field names) whatever it measured; a process only decides
    how long its own evaluation counts them. A window never counts an entry longer than the
    retention (the minute's ceiling span, same bucket grid), so the log still holds everything a
    window counts. Token windows keep the ceiling: their sums ride on the retention cursor.
    """

    def __init__(self, config: StateConfig) -> None:
        self.config = config
        self._cache: dict[tuple[int, int, float], WindowPlan] = {}

    def plan(self, rpm: int, tpm: int, guard: float = 0.0) -> WindowPlan:
        key = (rpm, tpm, guard)
        plan = self._cache.get(key)
        if plan is None:
            if len(self._cache) > 4096:
                self._cache.clear()  # bounded: guards come in 0.5 ms steps, limit pairs are few
            plan = self._cache[key] = self._build(rpm, tpm, guard)
        return plan

    def plan_for(self, c: Capacity) -> WindowPlan:
        """The plan of a candidate (``guard`` when it carries one: ``Candidate`` views do)."""
        return self.plan(c.rpm, c.tpm, getattr(c, "guard", 0.0))

    def _build(self, rpm: int, tpm: int, guard: float = 0.0) -> WindowPlan:
        cfg = self.config
        specs = []
        for unit, windows, prefix in (
            (REQUESTS, request_windows(rpm, cfg.minute), "r"),
            (TOKENS, token_windows(tpm, cfg.minute), "k"),
        ):
            for i, w in enumerate(windows):
                ceiling_span = w.seconds + cfg.guard(w.seconds)
                span = w.seconds + cfg.request_guard(w.seconds, guard) if unit == REQUESTS else ceiling_span
                bucket = ceiling_span / BUCKETS_PER_WINDOW
                specs.append(WindowSpec(unit, w.seconds, span, w.limit, bucket, f"{prefix}{i}"))
        for spec in specs:
            # Token sums are kept over the whole log (one running sum per deployment, in
            # both backends), which is only right if token windows are the longest one.
            if spec.span > cfg.retention or (spec.unit == TOKENS and spec.span != cfg.retention):
                raise ValueError(f"unsupported window {spec}: token windows must be the minute")
        req = [s.limit for s in specs if s.unit == REQUESTS]
        tok = [s.limit for s in specs if s.unit == TOKENS]
        return WindowPlan(tuple(specs), min(req, default=0), min(tok, default=0))


def score(headroom: float, weight: int) -> float:
    """Rank of a fitting candidate (see the module docstring)."""
    return weight * headroom if weight > 0 else headroom - 2.0


def settled_tokens(reserved: int, actual: int, sku: str) -> int:
    """What a finished request keeps in the token window.

    Provisioned (PTU): Azure corrects utilisation to the actual usage at completion, so the
    window holds the actual tokens. Standard: Azure's TPM counter keeps the estimate it made on
    arrival (prompt + max_tokens) and never corrects it, so freeing the unused allowance would
    let us overrun the upstream's counter; we keep the larger of reservation and actual.
    """
    if sku == SKU_PROVISIONED:
        return actual
    return max(reserved, actual)


def window_status(unit: str, seconds: float, limit: int, used: int) -> dict:
    return {"unit": "requests" if unit == REQUESTS else "tokens", "seconds": seconds, "limit": limit, "used": used}


def build_status(
    *,
    windows,
    headroom,
    wait,
    in_flight,
    cool_down,
    breaker_state,
    failures,
    open_for,
    probe,
    upstream_requests,
    upstream_tokens,
) -> dict:
    """The status both backends report for one deployment (admin page, status API)."""
    return {
        "windows": windows,  # [{unit, seconds, limit, used}]
        "headroom": headroom,  # for one request and no tokens
        "available": wait <= 0,  # could take one request now
        "wait": wait,  # seconds until it could, if not
        "in_flight": in_flight,
        "cool_down": cool_down,  # seconds left
        "breaker": {"state": breaker_state, "failures": failures, "open_for": open_for, "probe": probe},
        "upstream": {"requests": upstream_requests, "tokens": upstream_tokens},  # None: no fresh word
    }


def check_ticket(ticket_id: str) -> None:
    """Ticket ids are opaque but non-empty and free of '|' (the Redis record's separator)."""
    if not ticket_id or "|" in ticket_id:
        raise ValueError(f"invalid ticket id {ticket_id!r}")


def new_id() -> str:
    """A reservation or ticket id, unique across processes."""
    return secrets.token_hex(8)


class StateUnavailable(Exception):
    """The state cannot be reached (Redis down, paused or too slow): nothing was decided.

    Any operation of a shared backend may raise it, after at most its timeout. ``retry_after``
    is how long a caller should wait before asking again.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BalancerState(abc.ABC):
    """The contract. ``now`` arguments default to ``time.time()`` (shared by all processes).

    A backend shared between processes may fail any operation with ``StateUnavailable``.

    ``wait_change`` sleeps until a ticket's situation may have changed. ``wakes_on_turn``: it
    returns early when the ticket becomes the head. ``wakes_on_capacity``: also when capacity
    is freed on a deployment its queue waits for (settle, release, breaker closing); without
    it the head polls.
    """

    wakes_on_turn: bool = False
    wakes_on_capacity: bool = False

    def __init__(self, config: StateConfig) -> None:
        self.config = config
        self.planner = WindowPlanner(config)

    @abc.abstractmethod
    async def try_acquire(
        self, candidates: Sequence[Capacity], demand_tokens: int, now: float | None = None
    ) -> Grant | Denied:
        """Reserve 1 request + ``demand_tokens`` on the best fitting candidate, ignoring queues.

        Atomic: concurrent callers (and processes, with Redis) never overrun a window.
        """

    @abc.abstractmethod
    async def try_acquire_queued(
        self,
        queue: str,
        ticket_id: str | None,
        candidates: Sequence[Capacity],
        demand_tokens: int,
        now: float | None = None,
    ) -> Grant | Denied:
        """``try_acquire`` that respects the queue ``queue`` (a model, or model + tier).

        With ``ticket_id`` None (a new arrival) it proceeds only if nobody waits; with a ticket,
        only if that ticket is at the head, whose lease it refreshes. On a grant the ticket
        leaves the queue in the same atomic step. Denials say QUEUED (others ahead, with the
        capacity wait as a lower bound), NOT_QUEUED (ticket gone), EVICTED (see ``enqueue``),
        CAPACITY or NEVER.
        """

    @abc.abstractmethod
    async def settle(self, grant: Grant, actual_tokens: int, sku: str | None = None, now: float | None = None) -> bool:
        """The request completed: fix its tokens (``settled_tokens``), end it in flight.

        ``sku`` defaults to the grant's. Returns False if the reservation was already settled,
        released or forgotten (``inflight_ttl``): it settles once.
        """

    async def renew(self, grant: Grant, candidate: Capacity, now: float | None = None) -> Grant | Denied:
        """Move a late grant's reservation to ``now`` on the same deployment (``candidate``): the
        old one is released and a new one taken in one atomic step, so nobody takes the slot in
        between and the request keeps its turn; ``Denied`` if it does not fit any more (its
        windows moved on meanwhile). This default is two calls, for backends without one."""
        await self.release(grant, now)
        return await self.try_acquire((candidate,), grant.tokens, now)

    async def settle_later(
        self, grant: Grant, actual_tokens: int, sku: str | None = None, *, ok: bool = False, now: float | None = None
    ) -> None:
        """``settle`` (with ``ok``: ``settle_success``) when convenient for the backend: Redis
        sends it along the process's next call, or batched soon after; until then the
        reservation holds as reserved. Never raises for an unreachable state (logged)."""
        if ok:
            await self.settle_success(grant, actual_tokens, sku, now)
        else:
            await self.settle(grant, actual_tokens, sku, now)

    async def drain(self) -> None:
        """Send whatever ``settle_later`` queued (tests, shutdown). Nothing queues by default."""
        return None

    async def settle_success(
        self, grant: Grant, actual_tokens: int, sku: str | None = None, now: float | None = None
    ) -> bool:
        """``settle``, then ``record_success`` (a good answer): one call where the backend can
        (Redis: one script call instead of two round trips on every successful request)."""
        settled = await self.settle(grant, actual_tokens, sku, now)
        await self.record_success(grant.deployment_id)
        return settled

    @abc.abstractmethod
    async def release(self, grant: Grant, now: float | None = None) -> bool:
        """The request never reached the upstream's counter: remove its reservation. Once."""

    @abc.abstractmethod
    async def observe(
        self,
        deployment_id: int,
        remaining_requests: int | None,
        remaining_tokens: int | None,
        now: float | None = None,
    ) -> None:
        """Record ``x-ratelimit-remaining-*``; each holds for ``upstream_age`` seconds."""

    @abc.abstractmethod
    async def cool(self, deployment_id: int, until: float, now: float | None = None) -> None:
        """No capacity until ``until`` (a 429's retry-after); the later of two cool-downs wins."""

    @abc.abstractmethod
    async def record_failure(self, deployment_id: int, now: float | None = None) -> str:
        """A 5xx/connect error/timeout. Returns the breaker state afterwards."""

    @abc.abstractmethod
    async def record_success(self, deployment_id: int) -> None:
        """A good answer: reset the failure count and close the breaker."""

    @abc.abstractmethod
    async def enqueue(
        self,
        queue: str,
        ticket_id: str,
        priority: int,
        tenant: str,
        now: float | None = None,
        lease_seconds: float | None = None,
    ) -> bool:
        """Add a waiting ticket (idempotent: an existing ticket only has its lease refreshed).

        Ranking: priority (lower first), then the tenant's round, then arrival; see
        ``memory._Queue``. When the queue holds ``queue_max_depth`` live tickets, a newcomer
        whose priority is strictly better (lower) than that of the *last* ticket in this order
        (the one that would be served last) evicts that ticket and takes its place, in one
        atomic step; otherwise it is refused and this returns False. So an arrival at the
        priority of the last ticket, or worse, never evicts: a full queue at one priority
        refuses as before, and the depth never exceeds the maximum.

        The evicted ticket leaves the queue at once (its waiter is woken) and leaves a
        tombstone: the next ``try_acquire_queued`` for it says ``Denied(0, EVICTED)``, once
        (later polls say NOT_QUEUED, as for any unknown ticket), so its waiter can answer
        "queue full" instead of rejoining at the back. The tombstone goes when reported, when
        the ticket ``leave``s or is enqueued again, or after the ticket's lease seconds (a
        waiter that has not polled for a lease would have lost its place anyway). ``touch``
        of an evicted ticket returns False, as for any ticket that is gone.
        """

    @abc.abstractmethod
    async def touch(self, queue: str, ticket_id: str, now: float | None = None) -> bool:
        """Refresh a ticket's lease. False if the ticket is gone."""

    @abc.abstractmethod
    async def leave(self, queue: str, ticket_id: str) -> bool:
        """Remove a ticket (timeout, disconnect). False if it was not there."""

    @abc.abstractmethod
    async def depth(self, queue: str, now: float | None = None) -> dict[int, int]:
        """Live tickets per priority."""

    @abc.abstractmethod
    async def status(self, deployments: Sequence[Capacity], now: float | None = None) -> dict[int, dict]:
        """Per deployment id: windows (used/limit), headroom, in flight, cool-down, breaker,
        upstream's word. For the admin page and status API; not on the request path."""

    async def queue_depths(self, queue: str, now: float | None = None) -> dict[int, int]:
        return await self.depth(queue, now)

    async def wait_change(self, queue: str, ticket_id: str, timeout: float) -> None:
        """Sleep up to ``timeout``; backends that can push return early on a relevant change."""
        await asyncio.sleep(max(timeout, 0.0))

    @abc.abstractmethod
    async def reset(self) -> None:
        """Forget everything (tests)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections."""


def make_state(
    redis_url: str | None, *, minute: float, prefix: str = "gw", redis_timeout: float | None = None, **knobs
) -> BalancerState:
    """The Redis backend when ``redis_url`` is given, else the in-process one.

    ``knobs`` are ``StateConfig`` fields. ``prefix`` namespaces the Redis keys; ``redis_timeout``
    bounds each Redis call (default: the ``REDIS_TIMEOUT_SECONDS`` setting).
    """
    config = StateConfig(minute=minute, **knobs)
    if redis_url:
        from gateway.balancer.redis_state import RedisState

        return RedisState.from_url(redis_url, config, prefix=prefix, timeout=redis_timeout)
    from gateway.balancer.memory import MemoryState

    return MemoryState(config)


def poll_pause(state: BalancerState, denied: Denied, attempt: int, remaining: float) -> float:
    """How long a waiter sleeps before polling again.

    It polls at least every third of its lease, or loses its place. Behind the head it sleeps
    until woken when the backend announces turns, else it backs off from ``poll_min`` to
    ``poll_max``. At the head it sleeps until the capacity wait hint when the backend announces
    freed capacity, else at most ``poll_max``: a release (429, connect error) or a provisioned
    settle can free capacity before the hint says.
    """
    cfg = state.config
    ceiling = min(remaining, cfg.lease_seconds / 3.0)
    hint = denied.wait_seconds
    if denied.reason == Reason.CAPACITY:
        pause = hint if state.wakes_on_capacity else min(max(hint, cfg.poll_min), cfg.poll_max)
    elif state.wakes_on_turn:
        pause = ceiling
    else:
        pause = min(max(hint, cfg.poll_min * (2 ** min(attempt, 16))), cfg.poll_max)
    return max(min(pause, ceiling), 0.0)
