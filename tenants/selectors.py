"""Reads for quotas: what the usage records say a scope used in the current periods.

These run in worker threads (seeding a scope's counters, the periodic reconciliation) and in the
admin, never on the event loop.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from django.db.models import F, Q, Sum

from tenants.quota_state.contract import KEY, ScopeLimits, Seed
from tenants.quotas import Periods, cost_units, reset_since


def quota_usage_totals(scopes: list[ScopeLimits], periods: Periods) -> dict[tuple[str, int], Seed]:
    """Each scope's tokens today and this month and its cost this month, from the usage records.

    A period an admin reset counts from the reset on. One query per kind of scope and distinct
    reset (usually two queries), on the (tenant|key, started_at) indexes.
    """
    from billing.models import UsageRecord

    groups: dict[tuple[str, float, float], list[int]] = defaultdict(list)
    for scope in scopes:
        since_day = reset_since(scope.day_stamp, periods.day_start)
        since_month = reset_since(scope.month_stamp, periods.month_start)
        groups[(scope.kind, since_day, since_month)].append(scope.id)
    totals: dict[tuple[str, int], Seed] = {}
    tokens = F("prompt_tokens") + F("completion_tokens")
    end = _moment(periods.month_end)
    day_end = _moment(periods.day_end)
    for (kind, since_day, since_month), ids in groups.items():
        column = "key_id" if kind == KEY else "tenant_id"
        day_from, month_from = _moment(since_day), _moment(since_month)
        in_day = Q(started_at__gte=day_from, started_at__lt=day_end)
        in_month = Q(started_at__gte=month_from)
        rows = (
            UsageRecord.objects.filter(
                **{f"{column}__in": ids}, started_at__gte=min(day_from, month_from), started_at__lt=end
            )
            .values(column)
            .annotate(
                day_tokens=Sum(tokens, filter=in_day),
                month_tokens=Sum(tokens, filter=in_month),
                month_cost=Sum("cost", filter=in_month),
            )
            .order_by()
        )
        for row in rows:
            totals[(kind, row[column])] = Seed(
                day_tokens=int(row["day_tokens"] or 0),
                month_tokens=int(row["month_tokens"] or 0),
                month_cost=cost_units(row["month_cost"] or 0),
            )
    for scope in scopes:
        totals.setdefault(scope.ref, Seed())
    return totals


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
