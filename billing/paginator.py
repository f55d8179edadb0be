"""A paginator for tables too large to count: the usage records, and the roll-ups after them.

Django's paginator runs ``SELECT COUNT(*)`` over the filtered queryset to number its pages. On a
table of hundreds of millions of rows that is a full scan on every page view (PostgreSQL keeps no
row count), so this one never counts more than ``count_limit`` rows:

* unfiltered, on PostgreSQL: the planner's row estimate for the table (``pg_class.reltuples``,
  kept fresh by autovacuum) and no scan at all;
* filtered, on PostgreSQL: the planner's estimate for the query (``EXPLAIN``), when it says
  there are more rows than ``count_limit``;
* otherwise (a small result, or SQLite and other databases): a bounded count,
  ``SELECT COUNT(*) FROM (SELECT ... LIMIT count_limit + 1)``, which stops after
  ``count_limit + 1`` rows.

Estimates can be wrong either way (that is why they are cheap); the list says "about" or
"more than" next to them, see ``count_kind``. Pages are capped at ``count_limit`` rows deep in
any case: ``OFFSET`` into millions of rows costs as much as counting them, and a person looking
for a record past the first ten thousand narrows the list (dates, tenant, request id) instead.
"""

from __future__ import annotations

import json
import logging
from math import ceil
from typing import Literal

from django.core.paginator import Paginator
from django.db import DatabaseError, connections, transaction
from django.db.models import QuerySet
from django.utils.functional import cached_property

log = logging.getLogger(__name__)

CountKind = Literal["exact", "at_least", "estimate"]


class EstimatedCountPaginator(Paginator):
    """Numbers pages without ever counting more than ``count_limit`` rows (see the module doc)."""

    #: Rows counted at most; also how deep the pages go.
    count_limit: int = 10_000

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: How to read ``count``: exact, "more than count_limit", or the planner's estimate.
        self.count_kind: CountKind = "exact"

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return super().count
        queryset = queryset.order_by()  # ordering changes nothing in a count and costs a sort
        estimate = self.planner_estimate(queryset)
        if estimate is not None and estimate > self.count_limit:
            self.count_kind = "estimate"
            return estimate
        counted = queryset.values("pk")[: self.count_limit + 1].count()
        if counted > self.count_limit:
            self.count_kind = "at_least"
        return counted

    @cached_property
    def num_pages(self) -> int:
        """Pages reachable: what the count gives, but never deeper than ``count_limit`` rows."""
        pages = super().num_pages
        return min(pages, max(1, ceil(self.count_limit / self.per_page)))

    def planner_estimate(self, queryset: QuerySet) -> int | None:
        """PostgreSQL's row estimate for ``queryset``, or None where there is none to be had cheaply."""
        connection = connections[queryset.db]
        if connection.vendor != "postgresql":
            return None
        try:
            # A savepoint, so that a failed estimate inside a transaction does not poison it.
            with transaction.atomic(using=queryset.db), connection.cursor() as cursor:
                if not queryset.query.has_filters():
                    return _table_estimate(cursor, queryset.model._meta.db_table)
                sql, params = queryset.query.sql_with_params()
                cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
                return _plan_rows(cursor.fetchone()[0])
        except DatabaseError:
            # An estimate is a nicety: fall back to the bounded count rather than fail the page.
            log.warning("row estimate failed for %s", queryset.model._meta.label, exc_info=True)
            return None


def _table_estimate(cursor, table: str) -> int | None:
    # reltuples is -1 (PostgreSQL 14+) or 0 for a table never vacuumed or analysed: no estimate,
    # and the bounded count is cheap then anyway because such a table is new.
    cursor.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)", [table])
    row = cursor.fetchone()
    if row is None or row[0] is None or row[0] <= 0:
        return None
    return int(row[0])


def _plan_rows(plan: object) -> int | None:
    # psycopg 3 parses the json column; other drivers may hand back the text.
    if isinstance(plan, str):
        plan = json.loads(plan)
    try:
        return int(plan[0]["Plan"]["Plan Rows"])  # type: ignore[index]
    except (LookupError, TypeError, ValueError):
        return None
