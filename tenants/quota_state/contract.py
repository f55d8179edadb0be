"""What the quota state stores and answers: the definitions both backends implement.

A *scope* is a tenant or one of its keys with a quota. Per scope the state keeps

* a rolling window of requests and tokens (RPM, TPM): ``BUCKETS`` + 1 buckets of a sixtieth of
  the window each. A bucket counts until the whole window has passed after its end, so "at most
  ``rpm`` requests in any window-long span" holds exactly; the price is that a request is
  forgotten up to one bucket (1 s of a 60 s minute) late.
* budget counters for the current calendar day and month (tokens; tokens and cost): what
  settled requests used (``used``) and what requests in flight reserved (``held``). Each
  reservation is also kept on its own with a lease, so a process that dies holding some cannot
  leave them held for longer than the lease.

A scope's budget counters are *seeded*: built from the usage records when the state has none
(a new process with the in-memory state, an emptied or restarted Redis) or when an admin reset
the period (its reset stamp changed). Admission then answers ``Unseeded`` and the caller passes
the records' totals on the next try. A new period (midnight, the first of the month) starts at
zero without asking.

Costs are integers in ``COST_UNITS`` per currency unit (10^-8: the usage record's precision),
so sums are exact and agree with the records to the last digit.
"""

from __future__ import annotations

import abc
import itertools
import os
from dataclasses import dataclass, field

TENANT = "tenant"
KEY = "key"

BUCKETS = 60  # a window is this many buckets (+1 for the one filling now)
COST_UNITS = 10**8

# Budget names, as the quota's fields are called.
DAILY_TOKENS = "daily_tokens"
MONTHLY_TOKENS = "monthly_tokens"
MONTHLY_COST = "monthly_cost"
RPM = "rpm"
TPM = "tpm"
BUDGETS = (DAILY_TOKENS, MONTHLY_TOKENS, MONTHLY_COST)


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """One scope's limits as admission applies them. 0 means unlimited.

    ``day_stamp`` / ``month_stamp``: when an admin last reset that period's counters (epoch
    milliseconds), or 0 when not within the current period. The state seeds again when it changes.
    """

    kind: str  # TENANT or KEY
    id: int  # the tenant's or the key's id
    tenant_id: int
    rpm: int = 0
    tpm: int = 0
    daily_tokens: int = 0
    monthly_tokens: int = 0
    monthly_cost: int = 0  # COST_UNITS
    day_stamp: int = 0
    month_stamp: int = 0
    # Derived once here, since admission reads them for every request.
    ref: tuple[str, int] = field(init=False, repr=False, compare=False)
    windowed: bool = field(init=False, repr=False, compare=False)
    budgeted: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", (self.kind, self.id))
        object.__setattr__(self, "windowed", bool(self.rpm or self.tpm))
        object.__setattr__(self, "budgeted", bool(self.daily_tokens or self.monthly_tokens or self.monthly_cost))

    def limit(self, name: str) -> int:
        return int(getattr(self, name))


@dataclass(frozen=True, slots=True)
class PeriodIds:
    """The current calendar periods in the budget time zone, as comparable integers."""

    day: int  # YYYYMMDD
    month: int  # YYYYMM


@dataclass(frozen=True, slots=True)
class Seed:
    """A scope's use in the current periods according to the usage records."""

    day_tokens: int = 0
    month_tokens: int = 0
    month_cost: int = 0  # COST_UNITS


@dataclass(slots=True)
class Ask:
    """One request's admission: reserve ``tokens`` and ``cost`` in every scope at once."""

    scopes: tuple[ScopeLimits, ...]
    tokens: int  # prompt + completion allowance: the most the request can use
    cost: int  # COST_UNITS: the most the request can cost
    periods: PeriodIds
    seeds: dict[tuple[str, int], Seed] | None = None  # after an Unseeded answer


@dataclass(slots=True)
class WindowUse:
    """A windowed scope's rolling-window use (this request included when it was admitted)."""

    scope: ScopeLimits
    requests: int
    tokens: int


@dataclass(slots=True)
class Reservation:
    """What admission reserved, to be settled or released exactly once."""

    id: str
    scopes: tuple[ScopeLimits, ...]
    tokens: int
    cost: int
    periods: PeriodIds
    bucket: int  # the window bucket the request was counted in


@dataclass(slots=True)
class Admitted:
    reservation: Reservation
    windows: list[WindowUse] = field(default_factory=list)


@dataclass(slots=True)
class Refused:
    """The first limit that refused the request.

    For a budget, ``used`` is what settled requests used and ``held`` what requests in flight
    reserved; ``retry_after`` is None (it resets with the period). For a rate limit, ``used``
    is the window's use and ``retry_after`` the seconds until the request would fit, or None
    when it never can (a request larger than the TPM).
    """

    scope: ScopeLimits
    limit: str  # RPM, TPM or one of BUDGETS
    used: int
    held: int = 0
    retry_after: float | None = None
    windows: list[WindowUse] = field(default_factory=list)

    @property
    def is_budget(self) -> bool:
        return self.limit in BUDGETS


@dataclass(slots=True)
class Unseeded:
    """The state cannot decide: these scopes' budget counters must be seeded from the records."""

    scopes: list[ScopeLimits]


@dataclass(slots=True)
class BudgetUse:
    """A budgeted scope's settled use in the current periods (after a settlement)."""

    scope: ScopeLimits
    day_tokens: int
    month_tokens: int
    month_cost: int

    def used(self, name: str) -> int:
        return {DAILY_TOKENS: self.day_tokens, MONTHLY_TOKENS: self.month_tokens, MONTHLY_COST: self.month_cost}[name]


@dataclass(slots=True)
class ScopeUse:
    """What the admin shows for a scope: window use and the periods' budget counters.

    ``seeded`` is False when the state holds no counters for the current periods yet (they are
    built on the scope's next request); the budget fields are then 0.
    """

    requests: int = 0
    tokens: int = 0
    day_tokens: int = 0
    month_tokens: int = 0
    month_cost: int = 0
    held_tokens: int = 0
    held_cost: int = 0
    seeded: bool = False


@dataclass(frozen=True, slots=True)
class QuotaStateConfig:
    window: float = 60.0  # seconds in a rate-limit "minute"
    hold_seconds: float = 3600.0  # lease of a budget reservation
    budget_ttl: float = 40 * 86400.0  # a budget's keys outlive a month without requests

    @property
    def bucket(self) -> float:
        return self.window / BUCKETS


_ID_PREFIX = ""
_id_counter = itertools.count(1)


def _new_id_prefix() -> None:
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = os.urandom(6).hex()
    _id_counter = itertools.count(1)


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker must not repeat its parent's ids


def new_reservation_id() -> str:
    """Unique across processes and restarts (48 random bits per process, then a counter)."""
    return f"{_ID_PREFIX}{next(_id_counter):x}"


def bucket_of(now: float, bucket_seconds: float) -> int:
    return int(now // bucket_seconds)


def bucket_expiry(bucket: int, bucket_seconds: float) -> float:
    """When a bucket stops counting: a whole window after its end."""
    return (bucket + BUCKETS + 1) * bucket_seconds


class QuotaState(abc.ABC):
    """The quota state of every scope: in process (``MemoryQuotaState``) or Redis (``RedisQuotaState``).

    Every method is one atomic step (one Lua script call on Redis). ``now`` is ``time.time()``;
    gateway hosts keep their clocks in sync.
    """

    # True when ``admit_now`` / ``settle_now`` do the same without a coroutine (in process).
    synchronous = False

    def __init__(self, config: QuotaStateConfig) -> None:
        self.config = config

    @abc.abstractmethod
    async def admit(self, ask: Ask, now: float | None = None) -> Admitted | Refused | Unseeded:
        """Check every scope's windows and budgets and, if all pass, reserve the ask in all of them.

        Budgets admit while ``used + held`` is below the limit, so the last request admitted can
        take the use past it by at most its own reservation. Windows admit while the request
        fits (``requests + 1 <= rpm``, ``tokens + ask.tokens <= tpm``).
        """

    @abc.abstractmethod
    async def settle(
        self, reservation: Reservation, tokens: int, cost: int, *, dispatched: bool, now: float | None = None
    ) -> list[BudgetUse]:
        """Replace the reservation with what the request used; exactly once per reservation.

        ``dispatched`` False (refused later, the client gone before an upstream took it):
        the request leaves the windows too. Returns each budgeted scope's settled use.
        """

    async def settle_many(self, items: list[tuple[Reservation, int, int, bool]]) -> list[list[BudgetUse]]:
        """Several ``settle`` calls, (reservation, tokens, cost, dispatched) each; the Redis state
        makes them one script call."""
        return [await self.settle(r, tokens, cost, dispatched=dispatched) for r, tokens, cost, dispatched in items]

    @abc.abstractmethod
    async def reconcile(self, items: list[tuple[ScopeLimits, Seed]], periods: PeriodIds) -> int:
        """Raise seeded counters to at least what the records show; returns how many rose.

        Never lowers: records not written out yet are in the counters but not in the table.
        """

    @abc.abstractmethod
    async def read(self, scopes: list[ScopeLimits], periods: PeriodIds, now: float | None = None) -> list[ScopeUse]:
        """The scopes' current use, without changing anything."""

    @abc.abstractmethod
    async def reset_all(self) -> None:
        """Forget everything (tests)."""

    async def aclose(self) -> None:
        """Release connections (the Redis backend's); the in-process state holds none."""
        return None


def make_quota_state(
    redis_url: str | None, config: QuotaStateConfig, *, prefix: str = "gw", timeout: float = 0.5
) -> QuotaState:
    """The Redis state when ``redis_url`` is given (every wait bounded by ``timeout`` seconds),
    else the in-process one."""
    if redis_url:
        from tenants.quota_state.redis import RedisQuotaState

        return RedisQuotaState.from_url(redis_url, config, prefix=prefix, timeout=timeout)
    from tenants.quota_state.memory import MemoryQuotaState

    return MemoryQuotaState(config)
