"""Monthly statements per tenant, from the month roll-ups.

A statement has two parts. Usage by model and key: requests and tokens, and the pay-as-you-go
cost of what standard deployments served (each record's cost, at the price in effect when its
request started). Provisioned (PTU) deployments are paid for by the month whatever they serve:
each one's ``monthly_fixed_cost`` is shared among the tenants that used it that month, in
proportion to their tokens (prompt + completion) on it, and shown apart. Tokens a PTU served
carry no pay-as-you-go cost in a statement.

``statements_refresh`` runs after every roll-up: it recomputes the drafts of open months and,
once a month has closed and ``GATEWAY_STATEMENT_GRACE_HOURS`` have passed (time for the last
usage buffers to reach the database), computes its statements one last time and freezes them.
A frozen statement never changes; usage that arrives later still reaches the roll-ups.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from math import floor
from typing import Any

from django.conf import settings
from django.db.models import F, Max, Q, Sum
from django.utils import timezone

from billing.models import Rollup, Statement
from billing.periods import month_start, next_month
from billing.rollups import COST_SCALE, cost_units
from gateway.models import Deployment

MONTH = Rollup.Granularity.MONTH
PROVISIONED = Deployment.Sku.PROVISIONED
CENT = Decimal("0.01")
EIGHT_PLACES = Decimal("0.00000001")


@dataclass
class StatementRun:
    drafts: int = 0
    frozen: int = 0


def statements_refresh(now: datetime | None = None) -> StatementRun:
    """Recompute every statement not yet final: drafts for open months, final ones (frozen) for
    months closed more than the grace period ago. Tenants without usage in a month get none."""
    now = now or timezone.now()
    grace = timedelta(hours=settings.GATEWAY["STATEMENT_GRACE_HOURS"])
    final = set(Statement.objects.filter(status=Statement.Status.FINAL).values_list("month", "tenant_id"))
    from tenants.models import Tenant

    tenants = set(Tenant.objects.values_list("pk", flat=True))
    used = Rollup.objects.filter(granularity=MONTH, tenant_ref__gt=0).values_list("period_start", "tenant_ref")
    pending: dict[datetime, set[int]] = defaultdict(set)
    for month, tenant_id in used.distinct().order_by():
        if tenant_id in tenants and (month.date(), tenant_id) not in final:
            pending[month].add(tenant_id)
    run = StatementRun()
    for month, tenant_ids in sorted(pending.items()):
        closed = next_month(month) + grace <= now
        statements = statements_compute(month, tenant_ids, now=now, final=closed)
        Statement.objects.bulk_create(
            statements,
            update_conflicts=True,
            unique_fields=["tenant", "month"],
            update_fields=[f.name for f in Statement._meta.concrete_fields if f.name not in ("id", "tenant", "month")],
        )
        if closed:
            run.frozen += len(statements)
        else:
            run.drafts += len(statements)
    return run


def statement_for(tenant_id: int, month: datetime) -> Statement:
    """The stored statement, or a draft computed now from the roll-ups (not saved; empty when the
    tenant had no usage that month)."""
    stored = Statement.objects.select_related("tenant").filter(tenant_id=tenant_id, month=month.date()).first()
    if stored is not None:
        return stored
    computed = statements_compute(month_start(month), {tenant_id}, now=timezone.now(), final=False)
    if computed:
        return computed[0]
    return Statement(tenant_id=tenant_id, month=month.date(), computed_at=timezone.now())


def statements_compute(month: datetime, tenant_ids: set[int], *, now: datetime, final: bool) -> list[Statement]:
    """Unsaved statements of ``month`` for ``tenant_ids`` (those with usage that month)."""
    rows = Rollup.objects.filter(granularity=MONTH, period_start=month)
    lines = _usage_lines(rows.filter(tenant_ref__in=tenant_ids))
    shares = _ptu_shares(rows)
    statements = []
    for tenant_id in sorted(lines.keys() | shares.keys()):
        if tenant_id not in tenant_ids:
            continue
        usage, provisioned = lines.get(tenant_id, []), shares.get(tenant_id, [])
        statements.append(
            Statement(
                tenant_id=tenant_id,
                month=month.date(),
                status=Statement.Status.FINAL if final else Statement.Status.DRAFT,
                requests=sum(line["requests"] for line in usage),
                prompt_tokens=sum(line["prompt_tokens"] for line in usage),
                cached_tokens=sum(line["cached_tokens"] for line in usage),
                completion_tokens=sum(line["completion_tokens"] for line in usage),
                payg_cost=sum((Decimal(line["cost"]) for line in usage), Decimal(0)),
                ptu_cost=sum((Decimal(share["charge"]) for share in provisioned), Decimal(0)),
                lines=usage,
                provisioned=provisioned,
                computed_at=now,
                frozen_at=now if final else None,
            )
        )
    return statements


def _usage_lines(rows) -> dict[int, list[dict[str, Any]]]:
    """Per tenant, one line per (model, key): requests, tokens, tokens served by PTU deployments,
    and the pay-as-you-go cost of the rest."""
    on_ptu = Q(sku=PROVISIONED)
    grouped = (
        rows.values("tenant_ref", "model", "key_ref")
        .annotate(
            n_requests=Sum("requests"),
            n_prompt=Sum("prompt_tokens"),
            n_cached=Sum("cached_tokens"),
            n_completion=Sum("completion_tokens"),
            n_ptu=Sum(F("prompt_tokens") + F("completion_tokens"), filter=on_ptu),
            payg_units=cost_units("cost", filter=~on_ptu),
            name=Max("key_name"),
            prefix=Max("key_prefix"),
        )
        .order_by("tenant_ref", "model", "key_ref")
    )
    lines: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for g in grouped:
        prompt, completion = int(g["n_prompt"] or 0), int(g["n_completion"] or 0)
        lines[g["tenant_ref"]].append(
            {
                "model": g["model"],
                "key": g["name"] or ("(no key)" if not g["key_ref"] else f"key #{g['key_ref']}"),
                "key_prefix": g["prefix"] or "",
                "requests": int(g["n_requests"] or 0),
                "prompt_tokens": prompt,
                "cached_tokens": int(g["n_cached"] or 0),
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "ptu_tokens": int(g["n_ptu"] or 0),
                "cost": decimal_text(Decimal(g["payg_units"] or 0) / COST_SCALE, EIGHT_PLACES),
            }
        )
    return lines


def _ptu_shares(rows) -> dict[int, list[dict[str, Any]]]:
    """Per tenant, its share of each provisioned deployment's fixed cost that month."""
    deployments = {
        d.pk: d for d in Deployment.objects.filter(sku=PROVISIONED, monthly_fixed_cost__gt=0).select_related("endpoint")
    }
    tokens = (
        rows.filter(sku=PROVISIONED, deployment_ref__in=deployments.keys(), tenant_ref__gt=0)
        .values("deployment_ref", "tenant_ref")
        .annotate(tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
        .order_by()
    )
    by_deployment: dict[int, dict[int, int]] = defaultdict(dict)
    for g in tokens:
        if g["tokens"]:
            by_deployment[g["deployment_ref"]][g["tenant_ref"]] = int(g["tokens"])
    shares: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for deployment_id, used in sorted(by_deployment.items()):
        deployment = deployments[deployment_id]
        total = sum(used.values())
        charges = ptu_allocate(deployment.monthly_fixed_cost, used)
        for tenant_id, tenant_tokens in used.items():
            shares[tenant_id].append(
                {
                    "deployment": f"{deployment.endpoint.name}/{deployment.name}",
                    "model": deployment.model,
                    "tokens": tenant_tokens,
                    "deployment_tokens": total,
                    "share": decimal_text(Decimal(tenant_tokens) / Decimal(total), EIGHT_PLACES),
                    "fixed_cost": decimal_text(deployment.monthly_fixed_cost, CENT),
                    "charge": decimal_text(charges[tenant_id], CENT),
                }
            )
    return shares


def ptu_allocate(fixed_cost: Decimal, tokens: dict[int, int]) -> dict[int, Decimal]:
    """Split ``fixed_cost`` among tenants in proportion to their tokens, in cents that add up to
    it exactly: each gets its share rounded down, and the cents left over go to the largest
    remainders (ties to the lower tenant id, so the split is the same every time)."""
    total = sum(tokens.values())
    cents = int((fixed_cost * 100).to_integral_value())
    if total <= 0:
        return {}
    exact = {tenant: Fraction(cents * used, total) for tenant, used in tokens.items()}
    allocated = {tenant: floor(share) for tenant, share in exact.items()}
    left = cents - sum(allocated.values())
    for tenant in sorted(exact, key=lambda t: (allocated[t] - exact[t], t))[:left]:
        allocated[tenant] += 1
    return {tenant: (Decimal(amount) / 100).quantize(CENT) for tenant, amount in allocated.items()}


def decimal_text(value: Decimal | int, places: Decimal) -> str:
    """Money as fixed-point text with ``places`` decimals: ``0.00000000``, never ``0E-8``."""
    return f"{Decimal(value).quantize(places):f}"


def statement_document(statement: Statement) -> dict[str, Any]:
    """The statement as finance gets it (the JSON export; the CSV has the same lines)."""
    tenant = statement.tenant
    return {
        "tenant": tenant.slug,
        "tenant_name": tenant.name,
        "month": f"{statement.month:%Y-%m}",
        "status": statement.status,
        "computed_at": statement.computed_at.isoformat() if statement.computed_at else None,
        "frozen_at": statement.frozen_at.isoformat() if statement.frozen_at else None,
        "totals": {
            "requests": statement.requests,
            "prompt_tokens": statement.prompt_tokens,
            "cached_tokens": statement.cached_tokens,
            "completion_tokens": statement.completion_tokens,
            "total_tokens": statement.prompt_tokens + statement.completion_tokens,
            "payg_cost": decimal_text(statement.payg_cost, EIGHT_PLACES),
            "ptu_cost": decimal_text(statement.ptu_cost, CENT),
            "total_cost": decimal_text(statement.total_cost, EIGHT_PLACES),
        },
        "lines": statement.lines,
        "provisioned": statement.provisioned,
    }
