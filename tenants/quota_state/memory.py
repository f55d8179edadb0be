"""The in-process quota state: the embedded default, and the reference the Redis scripts mirror.

Each method runs without awaiting, so on one event loop it is atomic; ``admit_now`` and
``settle_now`` are the same steps for callers that need no coroutine (the request path calls
them directly: this state is on every request's path, so it is written for speed). A gateway
process with this state keeps its own counters: several processes need Redis to share them.
"""

from __future__ import annotations

import time

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
    new_reservation_id,
)

# A hold: (tokens, cost, day, month, lease end).
Hold = tuple[int, int, int, int, float]
INF = float("inf")


class _Budget:
    __slots__ = (
        "day",
        "day_stamp",
        "day_tokens",
        "held_day_tokens",
        "held_month_cost",
        "held_month_tokens",
        "holds",
        "month",
        "month_cost",
        "month_stamp",
        "month_tokens",
        "next_lease",
        "seeded",
    )

    def __init__(self) -> None:
        self.seeded = False
        self.day = self.month = 0  # the period ids the counters belong to
        self.day_stamp = self.month_stamp = 0  # the reset stamps they were seeded under
        self.day_tokens = self.month_tokens = self.month_cost = 0  # used by settled requests
        self.held_day_tokens = self.held_month_tokens = self.held_month_cost = 0  # reserved in flight
        # Reservation id -> hold, in the order they were made. Leases all last as long, so the
        # first ones are the first to lapse.
        self.holds: dict[str, Hold] = {}
        self.next_lease = INF  # no hold lapses before this (a lower bound)

    def prepare(self, scope: ScopeLimits, periods: PeriodIds, seed: Seed | None) -> bool:
        """Bring the counters to the current periods; False when they must be seeded first."""
        if (
            self.seeded
            and self.day == periods.day
            and self.month == periods.month
            and self.day_stamp == scope.day_stamp
            and self.month_stamp == scope.month_stamp
        ):
            return True
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

    def unhold(self, hold: Hold) -> None:
        tokens, cost, day, month, _ = hold
        if day == self.day:
            self.held_day_tokens = max(self.held_day_tokens - tokens, 0)
        if month == self.month:
            self.held_month_tokens = max(self.held_month_tokens - tokens, 0)
            self.held_month_cost = max(self.held_month_cost - cost, 0)

    def expire_holds(self, now: float) -> None:
        """Forget reservations whose lease ended (their process died without settling)."""
        lapsed = []
        self.next_lease = INF
        for rid, hold in self.holds.items():
            if hold[4] > now:
                self.next_lease = hold[4]
                break
            lapsed.append(rid)
        for rid in lapsed:
            self.unhold(self.holds.pop(rid))

    def exhausted(self, scope: ScopeLimits) -> Refused | None:
        limit = scope.daily_tokens
        if limit and self.day_tokens + self.held_day_tokens >= limit:
            return Refused(scope, DAILY_TOKENS, self.day_tokens, self.held_day_tokens)
        limit = scope.monthly_tokens
        if limit and self.month_tokens + self.held_month_tokens >= limit:
            return Refused(scope, MONTHLY_TOKENS, self.month_tokens, self.held_month_tokens)
        limit = scope.monthly_cost
        if limit and self.month_cost + self.held_month_cost >= limit:
            return Refused(scope, MONTHLY_COST, self.month_cost, self.held_month_cost)
        return None


class _Window:
    __slots__ = ("lo", "r", "requests", "t", "tokens")

    def __init__(self) -> None:
        self.lo: int | None = None  # the oldest bucket still counted
        self.requests = self.tokens = 0
        self.r: dict[int, int] = {}
        self.t: dict[int, int] = {}

    def advance(self, bucket: int) -> None:
        """Drop the buckets that no longer count when ``bucket`` is filling."""
        new_lo = bucket - BUCKETS
        lo = self.lo
        if lo is not None and lo >= new_lo:
            return  # the same bucket as the last request (or a clock a little behind)
        if lo is None or new_lo - lo > BUCKETS:
            self.lo, self.requests, self.tokens = new_lo, 0, 0
            self.r.clear()
            self.t.clear()
            return
        for b in range(lo, new_lo):
            self.requests -= self.r.pop(b, 0)
            self.tokens -= self.t.pop(b, 0)
        self.lo = new_lo

    def wait(self, counts: dict[int, int], excess: int, bucket: int, bucket_seconds: float, now: float) -> float:
        """Seconds until the oldest buckets holding ``excess`` units have stopped counting."""
        freed = 0
        for b in range(self.lo if self.lo is not None else bucket, bucket + 1):
            freed += counts.get(b, 0)
            if freed >= excess:
                return max(bucket_expiry(b, bucket_seconds) - now, 0.001)
        return max(bucket_expiry(bucket, bucket_seconds) - now, 0.001)


class MemoryQuotaState(QuotaState):
    """Counters in this process's memory. ``local()`` is the one the gateway runtime serves with
    (the admin, in the same process, reads it)."""

    synchronous = True
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
        self._bucket_seconds = self.config.bucket
        self._hold_seconds = self.config.hold_seconds

    async def admit(self, ask: Ask, now: float | None = None) -> Admitted | Refused | Unseeded:
        return self.admit_now(ask, time.time() if now is None else now)

    def admit_now(self, ask: Ask, now: float) -> Admitted | Refused | Unseeded:
        seeds = ask.seeds
        periods = ask.periods
        day, month = periods.day, periods.month
        unseeded: list[ScopeLimits] | None = None
        budgets: list[tuple[ScopeLimits, _Budget]] = []
        windows: list[tuple[ScopeLimits, _Window]] = []
        bucket = int(now // self._bucket_seconds)
        for scope in ask.scopes:
            ref = scope.ref
            if scope.budgeted:
                budget = self._budgets.get(ref)
                if budget is None:
                    budget = self._budgets[ref] = _Budget()
                if not (
                    budget.seeded
                    and budget.day == day
                    and budget.month == month
                    and budget.day_stamp == scope.day_stamp
                    and budget.month_stamp == scope.month_stamp
                ) and not budget.prepare(scope, periods, seeds.get(ref) if seeds else None):
                    unseeded = [*(unseeded or ()), scope]
                    continue
                if budget.next_lease <= now:
                    budget.expire_holds(now)
                budgets.append((scope, budget))
            if scope.windowed:
                window = self._windows.get(ref)
                if window is None:
                    window = self._windows[ref] = _Window()
                if window.lo is None or window.lo < bucket - BUCKETS:
                    window.advance(bucket)
                windows.append((scope, window))
        if unseeded:
            return Unseeded(unseeded)
        for scope, budget in budgets:
            refused = budget.exhausted(scope)
            if refused is not None:
                refused.windows = [WindowUse(s, w.requests, w.tokens) for s, w in windows]
                return refused
        tokens = ask.tokens
        for scope, window in windows:
            if scope.rpm and window.requests >= scope.rpm:
                wait = window.wait(window.r, window.requests + 1 - scope.rpm, bucket, self._bucket_seconds, now)
                uses = [WindowUse(s, w.requests, w.tokens) for s, w in windows]
                return Refused(scope, RPM, window.requests, retry_after=wait, windows=uses)
            if scope.tpm and window.tokens + tokens > scope.tpm:
                excess = window.tokens + tokens - scope.tpm
                wait_or_never = (
                    None if tokens > scope.tpm else window.wait(window.t, excess, bucket, self._bucket_seconds, now)
                )
                uses = [WindowUse(s, w.requests, w.tokens) for s, w in windows]
                return Refused(scope, TPM, window.tokens, retry_after=wait_or_never, windows=uses)
        rid = new_reservation_id()
        cost = ask.cost
        for _, budget in budgets:
            budget.held_day_tokens += tokens
            budget.held_month_tokens += tokens
            budget.held_month_cost += cost
            lease_end = now + self._hold_seconds
            budget.holds[rid] = (tokens, cost, budget.day, budget.month, lease_end)
            if lease_end < budget.next_lease:
                budget.next_lease = lease_end
        uses = []
        for scope, window in windows:
            r, t = window.r, window.t
            r[bucket] = r.get(bucket, 0) + 1
            t[bucket] = t.get(bucket, 0) + tokens
            window.requests += 1
            window.tokens += tokens
            uses.append(WindowUse(scope, window.requests, window.tokens))
        return Admitted(Reservation(rid, ask.scopes, tokens, cost, periods, bucket), uses)

    async def settle(
        self, reservation: Reservation, tokens: int, cost: int, *, dispatched: bool, now: float | None = None
    ) -> list[BudgetUse]:
        return self.settle_now(reservation, tokens, cost, dispatched=dispatched)

    def settle_now(self, reservation: Reservation, tokens: int, cost: int, *, dispatched: bool) -> list[BudgetUse]:
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
                    same_day, same_month = periods.day == budget.day, periods.month == budget.month
                    if same_day and scope.day_stamp == budget.day_stamp:
                        budget.day_tokens += tokens
                    if same_month and scope.month_stamp == budget.month_stamp:
                        budget.month_tokens += tokens
                        budget.month_cost += cost
                    if same_day and same_month:
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
        bucket = int(now // self._bucket_seconds)
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
