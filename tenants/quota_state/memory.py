"""The in-process quota state: the embedded default, and the reference the Redis scripts mirror.

Each method runs without awaiting, so on one event loop it is atomic. A gateway process with
this state keeps its own counters: several processes need Redis to share them.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from tenants.quota_state.contract import (
    BUCKETS,
    DAILY_TOKENS,
    MONTHLY_COST,
    MONTHLY_TOKENS,
    RPM,
    TPM,
    Admitted,
    Ask,
    BudgetUse,
    PeriodIds,
    QuotaState,
    QuotaStateConfig,
    Refused,
    Reservation,
    ScopeLimits,
    ScopeUse,
    Seed,
    Unseeded,
    WindowUse,
    bucket_expiry,
    bucket_of,
    new_reservation_id,
)


@dataclass(slots=True)
class _Hold:
    tokens: int
    cost: int
    day: int
    month: int


@dataclass(slots=True)
class _Budget:
    seeded: bool = False
    day: int = 0  # period ids the counters belong to
    month: int = 0
    day_stamp: int = 0  # the reset stamps they were seeded under
    month_stamp: int = 0
    day_tokens: int = 0  # used by settled requests
    month_tokens: int = 0
    month_cost: int = 0
    held_day_tokens: int = 0  # reserved by requests in flight
    held_month_tokens: int = 0
    held_month_cost: int = 0
    holds: dict[str, _Hold] = field(default_factory=dict)
    leases: list[tuple[float, str]] = field(default_factory=list)  # heap of (lease end, reservation id)

    def prepare(self, scope: ScopeLimits, periods: PeriodIds, seed: Seed | None) -> bool:
        """Bring the counters to the current periods; False when they must be seeded first."""
        if not self.seeded:
            if seed is None:
                return False
            self.seeded = True
            self.day, self.month = periods.day, periods.month
            self.day_stamp, self.month_stamp = scope.day_stamp, scope.month_stamp
            self.day_tokens, self.month_tokens, self.month_cost = seed.day_tokens, seed.month_tokens, seed.month_cost
            self.held_day_tokens = self.held_month_tokens = self.held_month_cost = 0
            return True
        ok = True
        if self.day < periods.day:  # a new day starts empty
            self.day, self.day_tokens, self.held_day_tokens, self.day_stamp = periods.day, 0, 0, scope.day_stamp
        elif self.day_stamp != scope.day_stamp:  # reset by an admin: count again from the records
            if seed is None:
                ok = False
            else:
                self.day_tokens, self.day_stamp = seed.day_tokens, scope.day_stamp
        if self.month < periods.month:
            self.month, self.month_stamp = periods.month, scope.month_stamp
            self.month_tokens = self.month_cost = self.held_month_tokens = self.held_month_cost = 0
        elif self.month_stamp != scope.month_stamp:
            if seed is None:
                ok = False
            else:
                self.month_tokens, self.month_cost = seed.month_tokens, seed.month_cost
                self.month_stamp = scope.month_stamp
        return ok

    def unhold(self, hold: _Hold) -> None:
        if hold.day == self.day:
            self.held_day_tokens = max(self.held_day_tokens - hold.tokens, 0)
        if hold.month == self.month:
            self.held_month_tokens = max(self.held_month_tokens - hold.tokens, 0)
            self.held_month_cost = max(self.held_month_cost - hold.cost, 0)

    def expire_holds(self, now: float) -> None:
        """Forget reservations whose lease ended (their process died without settling)."""
        while self.leases and self.leases[0][0] <= now:
            _, rid = heapq.heappop(self.leases)
            hold = self.holds.pop(rid, None)
            if hold is not None:
                self.unhold(hold)

    def exhausted(self, scope: ScopeLimits) -> Refused | None:
        for name, used, held in (
            (DAILY_TOKENS, self.day_tokens, self.held_day_tokens),
            (MONTHLY_TOKENS, self.month_tokens, self.held_month_tokens),
            (MONTHLY_COST, self.month_cost, self.held_month_cost),
        ):
            limit = scope.limit(name)
            if limit and used + held >= limit:
                return Refused(scope, name, used, held)
        return None


@dataclass(slots=True)
class _Window:
    lo: int | None = None  # the oldest bucket still counted
    requests: int = 0
    tokens: int = 0
    r: dict[int, int] = field(default_factory=dict)
    t: dict[int, int] = field(default_factory=dict)

    def advance(self, bucket: int) -> None:
        """Drop the buckets that no longer count when ``bucket`` is filling."""
        new_lo = bucket - BUCKETS
        if self.lo is None or new_lo - self.lo > BUCKETS:
            self.lo, self.requests, self.tokens = new_lo, 0, 0
            self.r.clear()
            self.t.clear()
            return
        for b in range(self.lo, new_lo):
            self.requests -= self.r.pop(b, 0)
            self.tokens -= self.t.pop(b, 0)
        self.lo = max(self.lo, new_lo)

    def wait(self, counts: dict[int, int], excess: int, bucket: int, bucket_seconds: float, now: float) -> float:
        """Seconds until the oldest buckets holding ``excess`` units have stopped counting."""
        assert self.lo is not None
        freed = 0
        for b in range(self.lo, bucket + 1):
            freed += counts.get(b, 0)
            if freed >= excess:
                return max(bucket_expiry(b, bucket_seconds) - now, 0.001)
        return max(bucket_expiry(bucket, bucket_seconds) - now, 0.001)


class MemoryQuotaState(QuotaState):
    """Counters in this process's memory. ``local()`` is the one the gateway runtime serves with
    (the admin, in the same process, reads it)."""

    _local: MemoryQuotaState | None = None

    @classmethod
    def local(cls) -> MemoryQuotaState | None:
        return cls._local

    def serve_locally(self, serving: bool = True) -> None:
        """Make this the state ``local()`` returns (or stop being it)."""
        if serving:
            MemoryQuotaState._local = self
        elif MemoryQuotaState._local is self:
            MemoryQuotaState._local = None

    def __init__(self, config: QuotaStateConfig | None = None) -> None:
        super().__init__(config or QuotaStateConfig())
        self._budgets: dict[tuple[str, int], _Budget] = {}
        self._windows: dict[tuple[str, int], _Window] = {}

    async def admit(self, ask: Ask, now: float | None = None) -> Admitted | Refused | Unseeded:
        return self.admit_now(ask, time.time() if now is None else now)

    def admit_now(self, ask: Ask, now: float) -> Admitted | Refused | Unseeded:
        seeds = ask.seeds or {}
        unseeded: list[ScopeLimits] = []
        budgets: list[tuple[ScopeLimits, _Budget]] = []
        for scope in ask.scopes:
            if scope.budgeted:
                budget = self._budgets.setdefault(scope.ref, _Budget())
                if not budget.prepare(scope, ask.periods, seeds.get(scope.ref)):
                    unseeded.append(scope)
                    continue
                budget.expire_holds(now)
                budgets.append((scope, budget))
        if unseeded:
            return Unseeded(unseeded)
        bucket_seconds = self.config.bucket
        bucket = bucket_of(now, bucket_seconds)
        windows: list[tuple[ScopeLimits, _Window]] = []
        for scope in ask.scopes:
            if scope.windowed:
                window = self._windows.setdefault(scope.ref, _Window())
                window.advance(bucket)
                windows.append((scope, window))
        before = [WindowUse(s, w.requests, w.tokens) for s, w in windows]
        for scope, budget in budgets:
            refused = budget.exhausted(scope)
            if refused is not None:
                refused.windows = before
                return refused
        for scope, window in windows:
            if scope.rpm and window.requests + 1 > scope.rpm:
                wait = window.wait(window.r, window.requests + 1 - scope.rpm, bucket, bucket_seconds, now)
                return Refused(scope, RPM, window.requests, retry_after=wait, windows=before)
            if scope.tpm and window.tokens + ask.tokens > scope.tpm:
                wait_or_never = (
                    None
                    if ask.tokens > scope.tpm
                    else window.wait(window.t, window.tokens + ask.tokens - scope.tpm, bucket, bucket_seconds, now)
                )
                return Refused(scope, TPM, window.tokens, retry_after=wait_or_never, windows=before)
        rid = new_reservation_id()
        lease_end = now + self.config.hold_seconds
        for _, budget in budgets:
            budget.held_day_tokens += ask.tokens
            budget.held_month_tokens += ask.tokens
            budget.held_month_cost += ask.cost
            budget.holds[rid] = _Hold(ask.tokens, ask.cost, budget.day, budget.month)
            heapq.heappush(budget.leases, (lease_end, rid))
        for _, window in windows:
            window.r[bucket] = window.r.get(bucket, 0) + 1
            window.t[bucket] = window.t.get(bucket, 0) + ask.tokens
            window.requests += 1
            window.tokens += ask.tokens
        reservation = Reservation(rid, ask.scopes, ask.tokens, ask.cost, ask.periods, bucket)
        return Admitted(reservation, [WindowUse(s, w.requests, w.tokens) for s, w in windows])

    async def settle(
        self, reservation: Reservation, tokens: int, cost: int, *, dispatched: bool, now: float | None = None
    ) -> list[BudgetUse]:
        out: list[BudgetUse] = []
        periods = reservation.periods
        for scope in reservation.scopes:
            if scope.budgeted:
                budget = self._budgets.get(scope.ref)
                if budget is not None and budget.seeded:
                    hold = budget.holds.pop(reservation.id, None)
                    if hold is not None:
                        budget.unhold(hold)
                    # Counted only into the periods it was admitted in, and not across a reset
                    # (the records counted after a reset start at the reset).
                    if periods.day == budget.day and scope.day_stamp == budget.day_stamp:
                        budget.day_tokens += tokens
                    if periods.month == budget.month and scope.month_stamp == budget.month_stamp:
                        budget.month_tokens += tokens
                        budget.month_cost += cost
                    if periods.day == budget.day and periods.month == budget.month:
                        out.append(BudgetUse(scope, budget.day_tokens, budget.month_tokens, budget.month_cost))
            if scope.windowed:
                window = self._windows.get(scope.ref)
                b = reservation.bucket
                if window is not None and window.lo is not None and b >= window.lo:
                    if dispatched:
                        window.t[b] = window.t.get(b, 0) + tokens - reservation.tokens
                        window.tokens += tokens - reservation.tokens
                    else:
                        window.r[b] = window.r.get(b, 0) - 1
                        window.requests -= 1
                        window.t[b] = window.t.get(b, 0) - reservation.tokens
                        window.tokens -= reservation.tokens
        return out

    async def reconcile(self, items: list[tuple[ScopeLimits, Seed]], periods: PeriodIds) -> int:
        raised = 0
        for scope, seed in items:
            budget = self._budgets.get(scope.ref)
            if budget is None or not budget.seeded:
                continue  # seeded from the records on its next request anyway
            if (
                budget.day == periods.day
                and budget.day_stamp == scope.day_stamp
                and seed.day_tokens > budget.day_tokens
            ):
                budget.day_tokens = seed.day_tokens
                raised += 1
            if budget.month == periods.month and budget.month_stamp == scope.month_stamp:
                if seed.month_tokens > budget.month_tokens:
                    budget.month_tokens = seed.month_tokens
                    raised += 1
                if seed.month_cost > budget.month_cost:
                    budget.month_cost = seed.month_cost
                    raised += 1
        return raised

    async def read(self, scopes: list[ScopeLimits], periods: PeriodIds, now: float | None = None) -> list[ScopeUse]:
        return self.read_now(scopes, periods, time.time() if now is None else now)

    def read_now(self, scopes: list[ScopeLimits], periods: PeriodIds, now: float) -> list[ScopeUse]:
        """``read`` without the event loop: only reads, so another thread (the admin's) may call it."""
        bucket = bucket_of(now, self.config.bucket)
        out = []
        for scope in scopes:
            use = ScopeUse()
            window = self._windows.get(scope.ref)
            if window is not None and window.lo is not None:
                stale = range(window.lo, bucket - BUCKETS)
                use.requests = window.requests - sum(window.r.get(b, 0) for b in stale)
                use.tokens = window.tokens - sum(window.t.get(b, 0) for b in stale)
            budget = self._budgets.get(scope.ref)
            if budget is not None and budget.seeded:
                day_ok = budget.day == periods.day and budget.day_stamp == scope.day_stamp
                month_ok = budget.month == periods.month and budget.month_stamp == scope.month_stamp
                use.seeded = day_ok and month_ok
                if day_ok:
                    use.day_tokens = budget.day_tokens
                if month_ok:
                    use.month_tokens, use.month_cost = budget.month_tokens, budget.month_cost
                    use.held_tokens, use.held_cost = budget.held_month_tokens, budget.held_month_cost
            out.append(use)
        return out

    async def reset_all(self) -> None:
        self._budgets.clear()
        self._windows.clear()
