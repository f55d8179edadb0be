"""What the dashboards show, read from roll-ups only (never the usage records).

Each function runs a fixed number of queries whatever the data: sums are grouped in SQL (by
period, model, key, tenant or deployment) over one granularity's rows in the period's range,
which the roll-up indexes serve, and percentiles come from the summed histogram buckets
(``billing.histograms``). Hour rows feed the 24-hour and 7-day views, day rows the 30-day and
month views.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import F, Max, QuerySet, Sum
from django.utils import timezone

from billing.histograms import percentile
from billing.models import HISTOGRAM_COLUMNS, OUTCOME_COLUMNS, Rollup, Statement
from billing.periods import DAY, HOUR, day_start, hour_start, month_start, next_month
from billing.rollups import COST_SCALE, cost_units

LATENCY = HISTOGRAM_COLUMNS["latency"]
ERROR_OUTCOMES = [outcome for outcome in OUTCOME_COLUMNS if outcome != "ok"]


@dataclass(frozen=True)
class Period:
    """A dashboard's time range: ``start`` inclusive, ``end`` exclusive, in points of ``granularity``."""

    key: str
    label: str
    start: datetime
    end: datetime
    granularity: str

    def points(self) -> list[datetime]:
        step = HOUR if self.granularity == Rollup.Granularity.HOUR else DAY
        points, point = [], self.start
        while point < self.end:
            points.append(point)
            point += step
        return points

    def point_label(self, point: datetime) -> str:
        return f"{point:%m-%d %H:00}" if self.granularity == Rollup.Granularity.HOUR else f"{point:%Y-%m-%d}"


PERIODS = {"24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days", "month": "This month"}


def period_for(key: str | None, now: datetime | None = None) -> Period:
    """The period a dashboard's ``?period=`` names (default: the last 24 hours)."""
    now = now or timezone.now()
    key = key if key in PERIODS else "24h"
    if key in ("24h", "7d"):
        end = hour_start(now) + HOUR
        hours = 24 if key == "24h" else 7 * 24
        return Period(key, PERIODS[key], end - hours * HOUR, end, Rollup.Granularity.HOUR)
    end = day_start(now) + DAY
    start = end - 30 * DAY if key == "30d" else month_start(now)
    return Period(key, PERIODS[key], start, end, Rollup.Granularity.DAY)


def rows_in(period: Period, **filters: Any) -> QuerySet[Rollup]:
    return Rollup.objects.filter(
        granularity=period.granularity, period_start__gte=period.start, period_start__lt=period.end, **filters
    )


def _money(units: Any) -> Decimal:
    return Decimal(units or 0) / COST_SCALE


def _totals_aggregates() -> dict[str, Any]:
    return {
        "n_requests": Sum("requests"),
        "n_ok": Sum("ok"),
        "n_prompt": Sum("prompt_tokens"),
        "n_completion": Sum("completion_tokens"),
        "n_cost": cost_units("cost"),
        **{f"n_{column}": Sum(column) for column in LATENCY},
    }


def usage_series(rows: QuerySet[Rollup], period: Period) -> dict[str, Any]:
    """One point per period step (zeros where nothing happened): requests, errors, error rate,
    prompt and completion tokens, cost, latency p50/p95; and the totals over the period."""
    grouped = rows.values("period_start").annotate(**_totals_aggregates()).order_by()
    by_point: dict[datetime, dict[str, Any]] = {g["period_start"]: dict(g) for g in grouped}
    series: dict[str, list[Any]] = defaultdict(list)
    total_buckets = [0] * len(LATENCY)
    totals: dict[str, Any] = {
        "requests": 0,
        "errors": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost": Decimal(0),
    }
    for point in period.points():
        g = by_point.get(point, {})
        requests, ok = int(g.get("n_requests") or 0), int(g.get("n_ok") or 0)
        buckets = [int(g.get(f"n_{column}") or 0) for column in LATENCY]
        cost = _money(g.get("n_cost"))
        values: dict[str, Any] = {
            "requests": requests,
            "errors": requests - ok,
            "prompt_tokens": int(g.get("n_prompt") or 0),
            "completion_tokens": int(g.get("n_completion") or 0),
            "cost": cost,
        }
        for name, value in values.items():
            series[name].append(float(value) if name == "cost" else value)
            totals[name] += value
        series["error_rate"].append(round(100 * (requests - ok) / requests, 2) if requests else None)
        series["p50_ms"].append(_rounded(percentile(buckets, 0.5)))
        series["p95_ms"].append(_rounded(percentile(buckets, 0.95)))
        total_buckets = [a + b for a, b in zip(total_buckets, buckets, strict=True)]
    totals["tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    totals["error_rate"] = 100 * totals["errors"] / totals["requests"] if totals["requests"] else None
    totals["p50_ms"] = _rounded(percentile(total_buckets, 0.5))
    totals["p95_ms"] = _rounded(percentile(total_buckets, 0.95))
    return {"labels": [period.point_label(p) for p in period.points()], "series": dict(series), "totals": totals}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def tokens_split(rows: QuerySet[Rollup], period: Period, by: str) -> dict[str, Any]:
    """Tokens per point, one series per value of ``by`` ("model" or "key_ref"), largest first;
    for keys the names as they were rolled up (``labels_by_key`` of the caller may rename)."""
    grouped = (
        rows.values("period_start", by)
        .annotate(tokens=Sum(F("prompt_tokens") + F("completion_tokens")), name=Max("key_name"))
        .order_by()
    )
    per_split: dict[Any, dict[datetime, int]] = defaultdict(dict)
    names: dict[Any, str] = {}
    for g in grouped:
        per_split[g[by]][g["period_start"]] = int(g["tokens"] or 0)
        names[g[by]] = g["name"] or ""
    points = period.points()
    ordered = sorted(per_split, key=lambda split: -sum(per_split[split].values()))
    return {
        "labels": [period.point_label(p) for p in points],
        "splits": [
            {
                "value": split,
                "name": names[split],
                "data": [per_split[split].get(p, 0) for p in points],
                "total": sum(per_split[split].values()),
            }
            for split in ordered
        ],
    }


# --- the staff overview -----------------------------------------------------------------------------


def overview(period: Period) -> dict[str, Any]:
    """Everything on the staff overview: the series, top tenants, deployments against limits."""
    rows = rows_in(period)
    return {
        "period": period,
        "usage": usage_series(rows, period),
        "top_tenants": top_tenants(rows),
        "deployments": deployments_use(period),
    }


def top_tenants(rows: QuerySet[Rollup], limit: int = 10) -> list[dict[str, Any]]:
    from tenants.models import Tenant

    grouped = list(
        rows.values("tenant_ref")
        .annotate(
            n_requests=Sum("requests"),
            n_ok=Sum("ok"),
            n_tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
            n_cost=cost_units("cost"),
        )
        .order_by("-n_cost", "-n_tokens", "tenant_ref")[:limit]
    )
    tenants = Tenant.objects.in_bulk([g["tenant_ref"] for g in grouped if g["tenant_ref"]])
    top = []
    for g in grouped:
        tenant = tenants.get(g["tenant_ref"])
        requests = int(g["n_requests"] or 0)
        top.append(
            {
                "tenant": tenant,
                "label": tenant.name if tenant else ("(no tenant)" if not g["tenant_ref"] else f"#{g['tenant_ref']}"),
                "requests": requests,
                "error_rate": 100 * (requests - int(g["n_ok"] or 0)) / requests if requests else None,
                "tokens": int(g["n_tokens"] or 0),
                "cost": _money(g["n_cost"]),
            }
        )
    return top


def deployments_use(period: Period) -> list[dict[str, Any]]:
    """Each configured deployment's use in the period against its limits: its busiest hour's
    average requests and tokens per minute next to its RPM and TPM (hour roll-ups), and for a
    provisioned one its monthly fixed cost and tokens so far this month."""
    from gateway.models import Deployment

    hours = Rollup.objects.filter(
        granularity=Rollup.Granularity.HOUR,
        period_start__gte=period.start,
        period_start__lt=period.end,
        deployment_ref__gt=0,
    )
    per_hour = (
        hours.values("deployment_ref", "period_start")
        .annotate(n_requests=Sum("requests"), n_tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
        .order_by()
    )
    used: dict[int, dict[str, int]] = defaultdict(lambda: {"requests": 0, "tokens": 0, "peak_rpm": 0, "peak_tpm": 0})
    for g in per_hour:
        entry = used[g["deployment_ref"]]
        requests, tokens = int(g["n_requests"] or 0), int(g["n_tokens"] or 0)
        entry["requests"] += requests
        entry["tokens"] += tokens
        entry["peak_rpm"] = max(entry["peak_rpm"], requests)
        entry["peak_tpm"] = max(entry["peak_tpm"], tokens)
    month = month_start(timezone.now())
    month_tokens = dict(
        Rollup.objects.filter(granularity=Rollup.Granularity.MONTH, period_start=month, deployment_ref__gt=0)
        .values("deployment_ref")
        .annotate(n=Sum(F("prompt_tokens") + F("completion_tokens")))
        .values_list("deployment_ref", "n")
        .order_by()
    )
    result = []
    for deployment in Deployment.objects.select_related("endpoint").order_by("model", "tier", "endpoint__name", "name"):
        entry = used.get(deployment.pk, {"requests": 0, "tokens": 0, "peak_rpm": 0, "peak_tpm": 0})
        peak_rpm, peak_tpm = entry["peak_rpm"] / 60, entry["peak_tpm"] / 60  # an hour's average per minute
        result.append(
            {
                "deployment": deployment,
                "requests": entry["requests"],
                "tokens": entry["tokens"],
                "peak_rpm": peak_rpm,
                "peak_tpm": peak_tpm,
                "rpm_use": 100 * peak_rpm / deployment.rpm if deployment.rpm else None,
                "tpm_use": 100 * peak_tpm / deployment.tpm if deployment.tpm else None,
                "month_tokens": int(month_tokens.get(deployment.pk) or 0),
            }
        )
    return result


# --- a team's page ------------------------------------------------------------------------------------


def team_dashboard(tenant, period: Period, model: str | None = None) -> dict[str, Any]:
    """A tenant's page: usage over time (totals, by model, by key), spend this month against its
    budget, recent errors, the models it used (for the filter) and its statements."""
    from tenants.models import Quota

    rows = rows_in(period, tenant_ref=tenant.pk)
    models = sorted(set(rows.values_list("model", flat=True).distinct().order_by()) - {""})
    if model:
        rows = rows.filter(model=model)
    keys = {key.pk: key for key in tenant.keys.all()}
    by_key = tokens_split(rows, period, "key_ref")
    for split in by_key["splits"]:
        key = keys.get(split["value"])
        split["name"] = key.name if key else (split["name"] or "(no key)")
    now = timezone.now()
    this_month = Rollup.objects.filter(
        tenant_ref=tenant.pk, granularity=Rollup.Granularity.MONTH, period_start=month_start(now)
    ).aggregate(n_cost=cost_units("cost"), n_tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
    quota = Quota.objects.filter(tenant=tenant, key__isnull=True).first()
    budget = quota.monthly_cost if quota and quota.monthly_cost else None
    spend = _money(this_month["n_cost"])
    statements = list(Statement.objects.filter(tenant=tenant).order_by("-month")[:24])
    current = next((s for s in statements if s.month == month_start(now).date()), None)
    return {
        "period": period,
        "model": model,
        "models": models,
        "usage": usage_series(rows, period),
        "by_model": tokens_split(rows, period, "model"),
        "by_key": by_key,
        "month": {
            "start": month_start(now),
            "end": next_month(now),
            "spend": spend,
            "tokens": int(this_month["n_tokens"] or 0),
            "budget": budget,
            "budget_use": float(100 * spend / budget) if budget else None,
            "statement": current,
        },
        "errors": recent_errors(tenant, now, model),
        "statements": statements,
    }


def recent_errors(tenant, now: datetime, model: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The tenant's hours of the last day with failed requests, newest first, by model and key."""
    rows = Rollup.objects.filter(
        tenant_ref=tenant.pk,
        granularity=Rollup.Granularity.HOUR,
        period_start__gte=hour_start(now) - timedelta(hours=23),
    ).exclude(ok=F("requests"))
    if model:
        rows = rows.filter(model=model)
    columns = ["period_start", "model", "key_name", "deployment_name", "requests", *ERROR_OUTCOMES]
    errors = []
    for row in rows.order_by("-period_start", "model")[:limit].values(*columns):
        counts = {outcome: row[outcome] for outcome in ERROR_OUTCOMES if row[outcome]}
        errors.append({**row, "failed": sum(counts.values()), "by_outcome": counts})
    return errors
