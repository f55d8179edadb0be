"""Admission's arithmetic, without I/O: the scopes a request is admitted against, the calendar
periods in the budget time zone, what refusals say, the rate-limit headers, and which alert
thresholds a budget has reached.

The state that counts is in ``tenants.quota_state``; the request path that uses both is
``gateway.proxy.admission``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from gateway.snapshot.types import KeyView, QuotaView
from tenants.quota_state.contract import (
    BUCKETS,
    BUDGETS,
    COST_UNITS,
    DAILY_TOKENS,
    KEY,
    MONTHLY_COST,
    MONTHLY_TOKENS,
    RPM,
    TENANT,
    TPM,
    BudgetUse,
    PeriodIds,
    Refused,
    ScopeLimits,
    WindowUse,
    bucket_expiry,
    bucket_of,
)

_UNITS = Decimal(COST_UNITS)


def cost_units(amount: Decimal | float | int) -> int:
    """Money in ``COST_UNITS`` (10^-8), rounded as PostgreSQL rounds a usage record's cost into
    its 8 decimal places (half away from zero), so counters and records sum to the same total."""
    value = amount if isinstance(amount, Decimal) else Decimal(str(amount))
    return int((value * _UNITS).to_integral_value(ROUND_HALF_UP))


def money(units: int) -> Decimal:
    return Decimal(units) / _UNITS


# -- periods ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Periods:
    """The day and the month ``now`` falls in, in the budget time zone, with their bounds."""

    ids: PeriodIds
    day: date
    month: date  # its first day
    day_start: float  # epoch seconds
    day_end: float
    month_start: float
    month_end: float
    tz: ZoneInfo

    def start_of(self, budget: str) -> date:
        return self.day if budget == DAILY_TOKENS else self.month

    def end_of(self, budget: str) -> datetime:
        return datetime.fromtimestamp(self.day_end if budget == DAILY_TOKENS else self.month_end, self.tz)

    def bounds(self, budget: str) -> tuple[float, float]:
        return (self.day_start, self.day_end) if budget == DAILY_TOKENS else (self.month_start, self.month_end)


def periods_at(now: float, tz: ZoneInfo) -> Periods:
    day = datetime.fromtimestamp(now, tz).date()
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)

    def midnight(d: date) -> float:
        return datetime.combine(d, time.min, tz).timestamp()

    return Periods(
        ids=PeriodIds(day=day.year * 10000 + day.month * 100 + day.day, month=day.year * 100 + day.month),
        day=day,
        month=month,
        day_start=midnight(day),
        day_end=midnight(day + timedelta(days=1)),
        month_start=midnight(month),
        month_end=midnight(next_month),
        tz=tz,
    )


class PeriodClock:
    """``periods_at`` for the budget time zone, computed once a day rather than per request."""

    def __init__(self, tz_name: str) -> None:
        self.tz = ZoneInfo(tz_name)
        self._current: Periods | None = None

    def at(self, now: float) -> Periods:
        current = self._current
        if current is None or not current.day_start <= now < current.day_end:
            current = self._current = periods_at(now, self.tz)
        return current


# -- scopes -------------------------------------------------------------------------------------------


def scope_limits(kind: str, scope_id: int, tenant_id: int, quota: QuotaView, periods: Periods) -> ScopeLimits:
    """A quota as admission applies it. A reset counts only within the period it was made in."""
    day_reset, month_reset = quota.day_counters_reset_at, quota.month_counters_reset_at
    return ScopeLimits(
        kind=kind,
        id=scope_id,
        tenant_id=tenant_id,
        rpm=quota.rpm,
        tpm=quota.tpm,
        daily_tokens=quota.daily_tokens,
        monthly_tokens=quota.monthly_tokens,
        monthly_cost=cost_units(quota.monthly_cost) if quota.monthly_cost else 0,
        day_stamp=int(day_reset * 1000) if day_reset >= periods.day_start else 0,
        month_stamp=int(month_reset * 1000) if month_reset >= periods.month_start else 0,
    )


def scopes_for(key: KeyView, periods: Periods) -> tuple[ScopeLimits, ...]:
    """The tenant's and the key's quotas that limit anything (none: the request is not admitted)."""
    tenant = key.tenant
    scopes = []
    if tenant.quota.limited:
        scopes.append(scope_limits(TENANT, tenant.id, tenant.id, tenant.quota, periods))
    if key.quota.limited:
        scopes.append(scope_limits(KEY, key.id, tenant.id, key.quota, periods))
    return tuple(scopes)


def reset_since(stamp: int, period_start: float) -> float:
    """Where a period's count starts: its beginning, or the admin's reset within it."""
    return max(period_start, stamp / 1000.0) if stamp else period_start


# -- refusals -----------------------------------------------------------------------------------------

BUDGET_WORDS = {DAILY_TOKENS: "daily token", MONTHLY_TOKENS: "monthly token", MONTHLY_COST: "monthly cost"}
RATE_WORDS = {RPM: "requests per minute (RPM)", TPM: "tokens per minute (TPM)"}


def scope_name(scope: ScopeLimits, key: KeyView) -> str:
    team = f"team '{key.tenant.name or key.tenant.slug}'"
    return f"key '{key.name}' of {team}" if scope.kind == KEY else team


def amount_text(budget: str, units_or_tokens: int) -> str:
    if budget == MONTHLY_COST:
        return f"{money(units_or_tokens):,.2f}"
    return f"{units_or_tokens:,} token{'s' * (units_or_tokens != 1)}"


def budget_refusal_message(refused: Refused, key: KeyView, periods: Periods) -> str:
    """Which budget is used up, by how much, and when it resets; for a person reading an exception."""
    budget, limit = refused.limit, refused.scope.limit(refused.limit)
    reserved = f", {amount_text(budget, refused.held)} reserved by requests in progress" if refused.held else ""
    resets = periods.end_of(budget)
    return (
        f"You exceeded your current quota: the {BUDGET_WORDS[budget]} budget of {scope_name(refused.scope, key)} "
        f"is {amount_text(budget, limit)} and is used up ({amount_text(budget, refused.used)} used{reserved}). "
        f"It resets at {resets:%Y-%m-%d %H:%M} ({periods.tz.key})."
    )


def rate_refusal_message(refused: Refused, key: KeyView, requested: int) -> str:
    """OpenAI's wording for a rate limit, naming the team or key whose limit it is."""
    limit = refused.scope.limit(refused.limit)
    who = scope_name(refused.scope, key)
    if refused.retry_after is None:
        return (
            f"Request too large for {who} on {RATE_WORDS[refused.limit]}: Limit {limit}, Requested {requested}. "
            "Reduce the prompt or max_tokens."
        )
    asked = 1 if refused.limit == RPM else requested
    return (
        f"Rate limit reached for {who} on {RATE_WORDS[refused.limit]}: Limit {limit}, Used {refused.used}, "
        f"Requested {asked}. Please try again in {refused.retry_after:.1f}s."
    )


def refusal_code(refused: Refused) -> str:
    """The error code the client sees."""
    if refused.is_budget:
        return "insufficient_quota"
    return "key_rate_limit_exceeded" if refused.scope.kind == KEY else "tenant_rate_limit_exceeded"


def refusal_reason(refused: Refused) -> str:
    """The usage record's error code: the client's code and which limit, e.g. ``insufficient_quota:key_monthly_cost``."""
    return f"{refusal_code(refused)}:{refused.scope.kind}_{refused.limit}"


# -- headers ------------------------------------------------------------------------------------------


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes its reset headers (Go's format): ``12ms``, ``1.5s``, ``1m7.5s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        ms = max(round(seconds * 1000), 1)
        if ms < 1000:
            return f"{ms}ms"
    total = round(seconds, 3)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


_RESET_TEXTS: dict[int, bytes] = {}


def _reset_text(seconds: float) -> bytes:
    """``go_duration`` to the next 10 ms up, as header bytes, cached (a few thousand values at most)."""
    centis = math.ceil(seconds * 100)
    text = _RESET_TEXTS.get(centis)
    if text is None:
        if len(_RESET_TEXTS) > 10_000:
            _RESET_TEXTS.clear()
        text = _RESET_TEXTS[centis] = go_duration(centis / 100).encode()
    return text


_REQUEST_HEADERS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKEN_HEADERS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


def limit_headers(windows: list[WindowUse], now: float, window_seconds: float) -> list[tuple[bytes, bytes]]:
    """The caller's tightest rate limits as OpenAI's ``x-ratelimit-*`` headers.

    Per kind (requests, tokens), the scope with the least left; ``reset`` is the time until that
    window holds nothing again (OpenAI: "until the limit resets to its initial state").
    """
    requests: tuple[int, int, int] | None = None  # (left, limit, used)
    tokens: tuple[int, int, int] | None = None
    for use in windows:
        scope = use.scope
        if scope.rpm:
            candidate = (scope.rpm - use.requests, scope.rpm, use.requests)
            if requests is None or candidate < requests:
                requests = candidate
        if scope.tpm:
            candidate = (scope.tpm - use.tokens, scope.tpm, use.tokens)
            if tokens is None or candidate < tokens:
                tokens = candidate
    if requests is None and tokens is None:
        return []
    bucket_seconds = window_seconds / BUCKETS
    reset = _reset_text(bucket_expiry(bucket_of(now, bucket_seconds), bucket_seconds) - now)
    headers: list[tuple[bytes, bytes]] = []
    for names, best in ((_REQUEST_HEADERS, requests), (_TOKEN_HEADERS, tokens)):
        if best is not None:
            left, limit, used = best
            headers += [
                (names[0], str(limit).encode()),
                (names[1], str(max(left, 0)).encode()),
                (names[2], reset if used > 0 else b"0s"),
            ]
    return headers


# -- alerts -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThresholdReached:
    scope: ScopeLimits
    budget: str
    threshold: int
    used: int  # tokens, or COST_UNITS for the cost budget
    limit: int


def thresholds_reached(use: BudgetUse, thresholds: tuple[int, ...]) -> list[ThresholdReached]:
    """Every (budget, threshold) of the scope that its settled use has reached."""
    scope, lowest = use.scope, min(thresholds)
    if not (
        (scope.daily_tokens and use.day_tokens * 100 >= scope.daily_tokens * lowest)
        or (scope.monthly_tokens and use.month_tokens * 100 >= scope.monthly_tokens * lowest)
        or (scope.monthly_cost and use.month_cost * 100 >= scope.monthly_cost * lowest)
    ):
        return []  # the usual case, checked first: below every threshold
    reached = []
    for budget in BUDGETS:
        limit = use.scope.limit(budget)
        if not limit:
            continue
        used = use.used(budget)
        for threshold in thresholds:
            if used * 100 >= limit * threshold:
                reached.append(ThresholdReached(use.scope, budget, threshold, used, limit))
    return reached
