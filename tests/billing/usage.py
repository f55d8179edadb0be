"""Usage records for billing tests, written as the request path would leave them."""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from billing.models import Rollup, UsageRecord

_ids = itertools.count(1)


def usage(started_at: datetime, *, tenant=None, key=None, deployment=None, **fields: Any) -> UsageRecord:
    """One unsaved record; tenant and key default to the key's, the model to the deployment's."""
    values: dict[str, Any] = {
        "request_id": f"req-test-{next(_ids):08d}",
        "tenant_id": tenant.pk if tenant is not None else (key.tenant_id if key is not None else None),
        "key_id": key.pk if key is not None else None,
        "deployment_id": deployment.pk if deployment is not None else None,
        "deployment_name": f"{deployment.endpoint.name}/{deployment.name}" if deployment is not None else "",
        "model": deployment.model if deployment is not None else "gpt-4o",
        "route": "chat",
        "status": 200,
        "outcome": UsageRecord.Outcome.OK,
        "prompt_tokens": 100,
        "cached_tokens": 0,
        "completion_tokens": 50,
        "cost": Decimal("0.00075000"),
        "latency_ms": 420.0,
        "started_at": started_at,
    }
    values.update(fields)
    return UsageRecord(**values)


def insert(*records: UsageRecord) -> list[UsageRecord]:
    return UsageRecord.objects.bulk_create(records)


TOTALS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost")


def raw_totals(**filters: Any) -> dict[tuple[int, str], dict[str, Any]]:
    """Per (tenant id or 0, model): requests, tokens and cost summed in Python from the records."""
    totals: dict[tuple[int, str], dict[str, Any]] = defaultdict(lambda: dict.fromkeys(TOTALS, 0))
    for record in UsageRecord.objects.filter(**filters):
        bucket = totals[(record.tenant_id or 0, record.model)]
        bucket["requests"] += 1
        bucket["prompt_tokens"] += record.prompt_tokens
        bucket["cached_tokens"] += record.cached_tokens
        bucket["completion_tokens"] += record.completion_tokens
        bucket["cost"] += record.cost
    return dict(totals)


def rollup_totals(granularity: str, **filters: Any) -> dict[tuple[int, str], dict[str, Any]]:
    """The same sums, from the roll-ups of one granularity."""
    totals: dict[tuple[int, str], dict[str, Any]] = defaultdict(lambda: dict.fromkeys(TOTALS, 0))
    for row in Rollup.objects.filter(granularity=granularity, **filters):
        bucket = totals[(row.tenant_ref, row.model)]
        for name in TOTALS:
            bucket[name] += getattr(row, name)
    return dict(totals)


def rollup_rows() -> list[tuple]:
    """Every roll-up row's bucket and sums (not its id or computed_at): what a re-run must keep."""
    from billing.models import BUCKET_COLUMNS, LABEL_COLUMNS, SUM_COLUMNS

    columns = [*BUCKET_COLUMNS, *LABEL_COLUMNS, *SUM_COLUMNS]
    return sorted(tuple(row) for row in Rollup.objects.values_list(*columns))
