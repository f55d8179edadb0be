"""Roll-ups: the usage records summed per hour, day and month, and the purge of old records.

``usage_rollup`` is the one entry point (the Celery task, the embedded timer and
``manage.py rollup_usage`` all call it). It finds the hours that got records since its last run,
recomputes each of them whole from the records and upserts the result, then recomputes the days
those hours fall in from the hours, and the months from the days. Because a period is always
recomputed whole, a second run gives the same rows, and a record that arrives after its hour was
rolled up (the usage buffer writes records with their request's start time, seconds or, after a
database outage, hours later) just makes its hour, day and month be recomputed again.

"Got records since" is read from ``UsageRecord.recorded_at`` (set by the database on insert):
each run remembers the newest one it saw and next time looks at records recorded since then,
minus ``ROLLUP_OVERLAP_SECONDS``. The overlap covers a usage batch whose transaction began (and
stamped its rows) before the last run but committed after it; such a transaction takes
milliseconds, the default overlap is five minutes, and recomputing an hour twice costs only time.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import BigIntegerField, Count, DateTimeField, DecimalField, F, Field, Max, Q, Sum
from django.db.models.functions import Cast, Round, TruncDay, TruncHour, TruncMonth
from django.utils import timezone

from billing.histograms import BOUNDS_MS
from billing.models import (
    BUCKET_COLUMNS,
    HISTOGRAM_COLUMNS,
    LABEL_COLUMNS,
    OUTCOME_COLUMNS,
    SUM_COLUMNS,
    Rollup,
    RollupCursor,
    UsageRecord,
)
from billing.periods import contiguous_runs, day_start, following, hour_start, month_start

log = logging.getLogger(__name__)

HOUR, DAY, MONTH = Rollup.Granularity.HOUR, Rollup.Granularity.DAY, Rollup.Granularity.MONTH
CURSOR = "usage"
# Costs carry 8 decimals; they are summed as integers of 1e-8 so that SQLite, which keeps
# decimals as binary floats, adds them exactly too.
COST_SCALE = 10**8
# Periods recomputed per query and transaction: a day of hours, a month of days, a year of months.
RUN_LENGTH: dict[str, int] = {HOUR: 24, DAY: 31, MONTH: 12}


@dataclass
class RollupRun:
    """What one run did, for logs, the command's output and the benchmark."""

    hours: int = 0
    days: int = 0
    months: int = 0
    rows: int = 0
    records_through: datetime | None = None
    seconds: float = 0.0
    skipped: bool = False  # another run held the lock
    too_old: list[datetime] = field(default_factory=list)  # hours past retention, left as they were

    def as_dict(self) -> dict[str, Any]:
        return {
            "hours": self.hours,
            "days": self.days,
            "months": self.months,
            "rows": self.rows,
            "records_through": self.records_through.isoformat() if self.records_through else None,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
            "too_old": [hour.isoformat() for hour in self.too_old],
        }


def usage_rollup(since: datetime | None = None) -> RollupRun:
    """Roll up every hour that got records since the last run (with ``since``: every hour from
    then on, for back-fills), then their days and months. Safe to run twice or concurrently."""
    run = RollupRun()
    started = time.monotonic()
    with rollup_lock() as acquired:
        if not acquired:
            run.skipped = True
            return run
        cursor, _ = RollupCursor.objects.get_or_create(name=CURSOR)
        # Read before the hours: every record visible now is in one of them.
        through = UsageRecord.objects.aggregate(newest=Max("recorded_at"))["newest"]
        hours = _hours_to_recompute(cursor.recorded_through, since)
        horizon = retention_horizon()
        if horizon is not None:
            run.too_old = sorted(hour for hour in hours if hour < horizon)
            if run.too_old:
                log.warning(
                    "usage arrived for %d hour(s) older than the retention period (first %s): not rolled up, "
                    "their records are purged",
                    len(run.too_old),
                    run.too_old[0],
                )
            hours = {hour for hour in hours if hour >= horizon}
        stamp = timezone.now()
        run.rows += rollup_recompute(HOUR, hours, stamp)
        days = {day_start(hour) for hour in hours}
        run.rows += rollup_recompute(DAY, days, stamp)
        months = {month_start(day) for day in days}
        run.rows += rollup_recompute(MONTH, months, stamp)
        run.hours, run.days, run.months = len(hours), len(days), len(months)
        if through is not None:
            # Forward only: a concurrent run that saw more must not be undone.
            moved = RollupCursor.objects.filter(name=CURSOR).filter(
                Q(recorded_through__isnull=True) | Q(recorded_through__lt=through)
            )
            moved.update(recorded_through=through)
        run.records_through = through
    run.seconds = time.monotonic() - started
    return run


def _hours_to_recompute(recorded_through: datetime | None, since: datetime | None) -> set[datetime]:
    records = UsageRecord.objects.all()
    if since is not None:
        # A back-fill also revisits hours that have roll-ups but no records any more.
        records = records.filter(started_at__gte=hour_start(since))
        existing = Rollup.objects.filter(granularity=HOUR, period_start__gte=hour_start(since))
        hours = set(existing.values_list("period_start", flat=True).distinct())
    else:
        hours = set()
        if recorded_through is not None:
            overlap = timedelta(seconds=settings.GATEWAY["ROLLUP_OVERLAP_SECONDS"])
            records = records.filter(recorded_at__gte=recorded_through - overlap)
    found = records.annotate(hour=TruncHour("started_at")).values_list("hour", flat=True).distinct().order_by()
    return hours | set(found)


def rollup_recompute(granularity: str, periods: set[datetime], stamp: datetime) -> int:
    """Recompute ``periods`` of ``granularity`` whole (hours from records, days from hours, months
    from days) and replace their rows. Returns the number of rows written."""
    written = 0
    for run in contiguous_runs(periods, granularity, RUN_LENGTH[granularity]):
        start, end = run[0], following(run[-1], granularity)
        with transaction.atomic():
            rows = list(_sums(granularity, start, end))
            rollup_upsert(granularity, rows, stamp)
            # A bucket this run did not write has no records left (a back-fill after a purge).
            stale = Rollup.objects.filter(granularity=granularity, period_start__gte=start, period_start__lt=end)
            stale.exclude(computed_at=stamp).delete()
        written += len(rows)
    return written


def rollup_upsert(granularity: str, rows: list[dict[str, Any]], stamp: datetime) -> None:
    """Insert or replace roll-up rows by their bucket (``INSERT ... ON CONFLICT DO UPDATE``).

    PostgreSQL: the rows are copied (``COPY``) into a temporary table and upserted from it in one
    statement. SQLite: one statement per row through ``executemany``, which sqlite3 runs in C.
    Measured on PostgreSQL with 6,000 rows (two busy cores): one prepared statement per row, even
    pipelined, took 6.5 s, the copy and one upsert 0.45 s; ``bulk_create(update_conflicts=True)``
    spent four times the CPU of either preparing each of a row's ninety fields one by one.
    """
    if not rows:
        return
    columns = _upsert_columns()
    fixed = {"granularity": granularity, "computed_at": stamp}
    if connection.vendor == "postgresql":
        _copy_upsert(rows, fixed, [name for name, _ in columns])
        return
    params = []
    for row in rows:
        row = {**row, **fixed}
        params.append([adapt(row[name]) if adapt else row[name] for name, adapt in columns])
    with connection.cursor() as cursor:
        cursor.executemany(_upsert_sql(), params)


def _copy_upsert(rows: list[dict[str, Any]], fixed: dict[str, Any], names: list[str]) -> None:
    import psycopg

    quote, meta = connection.ops.quote_name, Rollup._meta
    columns = ", ".join(quote(_column(name)) for name in names)
    # Named for its columns, so a session that outlives a migration never reuses an old shape.
    staging = f"rollup_staging_{zlib.crc32(columns.encode()):08x}"
    with transaction.atomic():
        connection.ensure_connection()
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS AS "
                f"SELECT {columns} FROM {quote(meta.db_table)} WITH NO DATA"
            )
            cursor.execute(f"TRUNCATE {staging}")
            with cursor.copy(f"COPY {staging} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    values = {**row, **fixed}
                    copy.write_row([values[name] for name in names])
            cursor.execute(_upsert_sql(f"SELECT {columns} FROM {staging}"))


def _column(name: str) -> str:
    field = Rollup._meta.get_field(name)
    assert isinstance(field, Field) and field.column, name
    return field.column


def _upsert_columns() -> list[tuple[str, Any]]:
    """Every column a roll-up row writes, in order, with the backend's adapter where it needs one."""
    cached = _upsert_cache.get((connection.vendor, "columns"))
    if cached is not None:
        return cached
    ops, meta = connection.ops, Rollup._meta
    columns: list[tuple[str, Any]] = []
    for name in [*BUCKET_COLUMNS, *LABEL_COLUMNS, *SUM_COLUMNS, "computed_at"]:
        field = meta.get_field(name)
        adapt: Any = None
        if isinstance(field, DecimalField):
            adapt = functools.partial(_adapt_decimal, ops, field.max_digits, field.decimal_places)
        elif isinstance(field, DateTimeField):
            adapt = ops.adapt_datetimefield_value
        columns.append((name, adapt))
    _upsert_cache[(connection.vendor, "columns")] = columns
    return columns


def _upsert_sql(source: str | None = None) -> str:
    """The upsert of one row of parameters, or (PostgreSQL) of every row ``source`` selects."""
    cached = _upsert_cache.get((connection.vendor, source or "values"))
    if cached is not None:
        return cached
    quote, meta = connection.ops.quote_name, Rollup._meta
    names = [quote(_column(name)) for name, _ in _upsert_columns()]
    unique = ", ".join(quote(_column(name)) for name in BUCKET_COLUMNS)
    updates = ", ".join(f"{n} = excluded.{n}" for n in names[len(BUCKET_COLUMNS) :])
    rows = source or f"VALUES ({', '.join(['%s'] * len(names))})"
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(names)}) {rows} ON CONFLICT ({unique}) DO UPDATE SET {updates}"
    )
    _upsert_cache[(connection.vendor, source or "values")] = sql
    return sql


_upsert_cache: dict[tuple[str, str], Any] = {}


def _adapt_decimal(ops: Any, max_digits: int, decimal_places: int, value: Decimal) -> Any:
    return ops.adapt_decimalfield_value(value, max_digits, decimal_places)


def _sums(granularity: str, start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
    if granularity == HOUR:
        yield from _hour_sums(start, end)
    else:
        finer = HOUR if granularity == DAY else DAY
        yield from _coarser_sums(finer, TruncDay if granularity == DAY else TruncMonth, start, end)


def _hour_sums(start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
    records = UsageRecord.objects.filter(started_at__gte=start, started_at__lt=end)
    grouped = (
        records.annotate(hour=TruncHour("started_at"))
        .values("hour", "tenant_id", "key_id", "model", "deployment_id")
        .annotate(**_record_aggregates())
        .order_by()
    )
    groups: list[dict[str, Any]] = [dict(g) for g in grouped]
    keys = _key_labels({g["key_id"] for g in groups if g["key_id"]})
    deployments = _deployment_labels({g["deployment_id"] for g in groups if g["deployment_id"]})
    for g in groups:
        key_ref, deployment_ref = g["key_id"] or 0, g["deployment_id"] or 0
        yield {
            "period_start": g["hour"],
            "tenant_ref": g["tenant_id"] or 0,
            "key_ref": key_ref,
            "model": g["model"],
            "deployment_ref": deployment_ref,
            **keys.get(key_ref, {"key_name": "", "key_prefix": ""}),
            **deployments.get(deployment_ref, {"endpoint_name": "", "sku": ""}),
            "deployment_name": g["label_deployment_name"] or "",
            **_sum_values(g),
        }


def _sum_values(group: dict[str, Any]) -> dict[str, Any]:
    """The ``sum_*`` aggregates of a group as column values, in Python types (PostgreSQL returns
    SUM() of integers as numeric, and any SUM() of no rows as NULL)."""
    values: dict[str, Any] = {}
    for column in SUM_COLUMNS:
        if column == "cost":
            values[column] = Decimal(group["sum_cost_units"] or 0) / COST_SCALE
        else:
            values[column] = int(group[f"sum_{column}"] or 0)
    return values


def _record_aggregates() -> dict[str, Any]:
    """Every SUM_COLUMNS value of a group of records, named ``sum_<column>`` (an annotation may
    not take a field's name), and the deployment name as ``label_deployment_name``."""
    forwarded = Q(deployment_id__isnull=False)
    sums: dict[str, Any] = {
        "requests": Count("id"),
        **{outcome: Count("id", filter=Q(outcome=outcome)) for outcome in OUTCOME_COLUMNS},
        "streamed": Count("id", filter=Q(streamed=True)),
        "retries": Sum("retries"),
        "estimated": Count("id", filter=Q(tokens_estimated=True)),
        "prompt_tokens": Sum("prompt_tokens"),
        "cached_tokens": Sum("cached_tokens"),
        "completion_tokens": Sum("completion_tokens"),
        "cost_units": cost_units("cost"),
        "latency_us_sum": microseconds("latency_ms", filter=forwarded),
        "ttft_us_sum": microseconds("ttft_ms"),
        "queue_wait_us_sum": microseconds("queue_wait_ms"),
    }
    for histogram, value_field, only in (
        ("latency", "latency_ms", forwarded),
        ("ttft", "ttft_ms", Q(ttft_ms__isnull=False)),
        ("queue_wait", "queue_wait_ms", Q()),
    ):
        for column, condition in zip(HISTOGRAM_COLUMNS[histogram], _bucket_conditions(value_field), strict=True):
            sums[column] = Count("id", filter=only & condition)
    return {"label_deployment_name": Max("deployment_name"), **{f"sum_{name}": agg for name, agg in sums.items()}}


def _bucket_conditions(value_field: str) -> list[Q]:
    conditions = [Q(**{f"{value_field}__lt": BOUNDS_MS[0]})]
    for lower, upper in itertools.pairwise(BOUNDS_MS):
        conditions.append(Q(**{f"{value_field}__gte": lower, f"{value_field}__lt": upper}))
    conditions.append(Q(**{f"{value_field}__gte": BOUNDS_MS[-1]}))
    return conditions


def _coarser_sums(finer: str, trunc: type, start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
    rows = Rollup.objects.filter(granularity=finer, period_start__gte=start, period_start__lt=end)
    aggregates: dict[str, Any] = {f"sum_{column}": Sum(column) for column in SUM_COLUMNS if column != "cost"}
    aggregates["sum_cost_units"] = cost_units("cost")
    aggregates.update({f"label_{label}": Max(label) for label in LABEL_COLUMNS})
    dimensions = [column for column in BUCKET_COLUMNS if column not in ("granularity", "period_start")]
    grouped = (
        rows.annotate(period=trunc("period_start")).values("period", *dimensions).annotate(**aggregates).order_by()
    )
    for g in grouped:
        yield {
            "period_start": g["period"],
            **{column: g[column] for column in dimensions},
            **{label: g[f"label_{label}"] or "" for label in LABEL_COLUMNS},
            **_sum_values(g),
        }


def cost_units(column: str, **options: Any) -> Sum:
    """SUM of a cost column in integer units of 1e-8 (exact on every database)."""
    return Sum(Cast(Round(F(column) * COST_SCALE), BigIntegerField()), **options)


def microseconds(column: str, **options: Any) -> Sum:
    """SUM of a duration in milliseconds as whole microseconds (the same in any order)."""
    return Sum(Cast(Round(F(column) * 1000), BigIntegerField()), **options)


def _key_labels(ids: set[int]) -> dict[int, dict[str, str]]:
    from tenants.models import ClientKey

    rows = ClientKey.objects.filter(pk__in=ids).values_list("pk", "name", "prefix")
    return {pk: {"key_name": name, "key_prefix": prefix} for pk, name, prefix in rows}


def _deployment_labels(ids: set[int]) -> dict[int, dict[str, str]]:
    from gateway.models import Deployment

    rows = Deployment.objects.filter(pk__in=ids).values_list("pk", "endpoint__name", "sku")
    return {pk: {"endpoint_name": endpoint, "sku": sku} for pk, endpoint, sku in rows}


# --- retention -------------------------------------------------------------------------------------


def retention_horizon(now: datetime | None = None) -> datetime | None:
    """The start of the oldest hour whose usage records are kept (None: kept forever)."""
    days = settings.GATEWAY["USAGE_RETENTION_DAYS"]
    if days <= 0:
        return None
    return hour_start((now or timezone.now()) - timedelta(days=days))


def usage_purge(now: datetime | None = None, batch_size: int = 5000) -> int:
    """Delete usage records older than the retention period, in batches by id range. Returns how
    many were deleted. Only records the roll-ups have already read are deleted; roll-ups and
    statements stay."""
    horizon = retention_horizon(now)
    cursor = RollupCursor.objects.filter(name=CURSOR).first()
    if horizon is None or cursor is None or cursor.recorded_through is None:
        return 0
    read = cursor.recorded_through - timedelta(seconds=settings.GATEWAY["ROLLUP_OVERLAP_SECONDS"])
    old = UsageRecord.objects.filter(started_at__lt=horizon, recorded_at__lt=read)
    deleted = 0
    while True:
        # Each batch is one short statement of its own, so the table is never locked for long.
        ids = list(old.order_by("id").values_list("id", flat=True)[:batch_size])
        if not ids:
            return deleted
        count, _ = old.filter(id__gte=ids[0], id__lte=ids[-1]).delete()
        deleted += count


# --- one run at a time --------------------------------------------------------------------------------

_local_lock = threading.Lock()
_ADVISORY_KEY = 0x6277_726F_6C6C  # "bwroll": any constant shared by every process


@contextlib.contextmanager
def rollup_lock() -> Iterator[bool]:
    """Hold the roll-up lock, or yield False at once if another run holds it.

    On PostgreSQL a session advisory lock, shared by every worker and process; on SQLite (one
    machine, the embedded mode) a process lock. Runs that overlap anyway are still correct (a
    period's rows are replaced in one transaction, from all its records): the lock saves work.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", [_ADVISORY_KEY])
            acquired = cursor.fetchone()[0]
        try:
            yield acquired
        finally:
            if acquired:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", [_ADVISORY_KEY])
        return
    acquired = _local_lock.acquire(blocking=False)
    try:
        yield acquired
    finally:
        if acquired:
            _local_lock.release()
