"""Reads for quotas: what the usage records say a scope used in the current periods.

These run in worker threads (seeding a scope's counters, the periodic reconciliation) and in the
admin, never on the event loop.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import UTC, datetime
from functools import cache
from typing import Any

import redis
from django.conf import settings
from django.db.models import Count, F, Q, Sum

from gateway.redis_clients import is_cluster_url, redis_sync_client
from tenants.quota_state.contract import BUCKETS, KEY, ScopeLimits, ScopeUse, Seed
from tenants.quota_state.memory import MemoryQuotaState
from tenants.quota_state.redis import lua_source, read_args, read_rows, scope_keys, slot_groups
from tenants.quotas import Periods, cost_units, reset_since

log = logging.getLogger(__name__)


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


def quota_use_read(scopes: list[ScopeLimits], periods: Periods, now: float | None = None) -> list[ScopeUse]:
    """What the admin shows: each scope's use against its limits, from the state admission uses.

    Redis when configured (one script call for all the scopes); else the in-process state of the
    gateway this process runs; else (the admin served by a process that runs no gateway) the
    usage records, which lag the counters by up to a flush interval.
    """
    if not scopes:
        return []
    now = time.time() if now is None else now
    if settings.REDIS_URL:
        try:
            return _redis_use(scopes, periods, now)
        except (redis.RedisError, redis.exceptions.RedisClusterException):  # (a cluster with no node to ask)
            log.warning("could not read quota counters from Redis; showing the usage records", exc_info=True)
            return _records_use(scopes, periods, now)
    local = MemoryQuotaState.local()
    if local is not None:
        return local.read_now(scopes, periods.ids, now)
    return _records_use(scopes, periods, now)


@cache
def _redis_reader(url: str) -> Any:
    client = redis_sync_client(url, timeout=2.0)
    return client.register_script(lua_source("read"))


def _redis_use(scopes: list[ScopeLimits], periods: Periods, now: float) -> list[ScopeUse]:
    url = str(settings.REDIS_URL)
    script = _redis_reader(url)
    g = settings.GATEWAY
    out: dict[int, ScopeUse] = {}
    for group in slot_groups(scopes, is_cluster_url(url)):  # one call; on a cluster, one per tenant
        part = [scopes[i] for i in group]
        keys = [key for scope in part for key in scope_keys(g["BALANCER_REDIS_PREFIX"], scope)]
        args = read_args(part, periods.ids, now, g["QUOTA_WINDOW_SECONDS"] / BUCKETS)
        out.update(zip(group, read_rows(script(keys=keys, args=args)), strict=True))
    return [out[i] for i in range(len(scopes))]


def _records_use(scopes: list[ScopeLimits], periods: Periods, now: float) -> list[ScopeUse]:
    """Budgets and the last window's use from the usage records: one or two queries per kind of scope."""
    from billing.models import UsageRecord

    budgets = quota_usage_totals([s for s in scopes if s.budgeted], periods)
    windows: dict[tuple[str, int], tuple[int, int]] = {}
    since = _moment(now - settings.GATEWAY["QUOTA_WINDOW_SECONDS"])
    for kind in {s.kind for s in scopes if s.windowed}:
        column = "key_id" if kind == KEY else "tenant_id"
        ids = [s.id for s in scopes if s.windowed and s.kind == kind]
        rows = (
            UsageRecord.objects.filter(**{f"{column}__in": ids}, started_at__gte=since)
            .values(column)
            .annotate(requests=Count("id"), tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
            .order_by()
        )
        for row in rows:
            windows[(kind, row[column])] = (row["requests"], int(row["tokens"] or 0))
    out = []
    for scope in scopes:
        requests, tokens = windows.get(scope.ref, (0, 0))
        seed = budgets.get(scope.ref, Seed())
        out.append(
            ScopeUse(
                requests=requests,
                tokens=tokens,
                day_tokens=seed.day_tokens,
                month_tokens=seed.month_tokens,
                month_cost=seed.month_cost,
                seeded=True,
            )
        )
    return out
