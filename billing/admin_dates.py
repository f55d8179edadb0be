"""A date drill-down for admin lists over very large tables.

Django's ``date_hierarchy`` filters well (it turns year/month/day into an index-friendly range)
but draws its links with ``SELECT DISTINCT`` truncated dates over the filtered rows: a scan of
every usage record of the year or, with no year chosen, of the whole table. This change list
draws the same links from two index lookups instead (the oldest and newest value of the field,
over the unfiltered table) and lists every year, month or day between them.

The trade-off: a link may lead to a period with no rows for the current filters, where Django
would have hidden it. That is an empty page, never a slow one.
"""

from __future__ import annotations

import calendar
import datetime
from typing import Any

from django.contrib.admin.views.main import ChangeList
from django.utils import formats, timezone
from django.utils.functional import cached_property
from django.utils.text import capfirst


class LargeTableChangeList(ChangeList):
    """A ChangeList whose date drill-down (``cl.date_nav``) costs two indexed queries at most."""

    @cached_property
    def date_nav(self) -> dict[str, Any] | None:
        """Context for ``admin/date_hierarchy.html``, or None when the list has no dates."""
        if not self.date_hierarchy:
            return None
        field = self.date_hierarchy
        year_field, month_field, day_field = f"{field}__year", f"{field}__month", f"{field}__day"
        year, month, day = (_int(self.params.get(name)) for name in (year_field, month_field, day_field))

        def link(filters: dict[str, int]) -> str:
            return self.get_query_string({k: str(v) for k, v in filters.items()}, [f"{field}__"])

        bounds = self._bounds()
        if bounds is None:
            return None
        first, last = bounds
        if year is None:
            # Like Django: start one level down when everything falls in one year or month.
            if first.year == last.year:
                year = first.year
                if first.month == last.month:
                    month = first.month
            else:
                return {
                    "show": True,
                    "back": None,
                    "choices": [
                        {"link": link({year_field: y}), "title": str(y)} for y in range(first.year, last.year + 1)
                    ],
                }
        if month is None:
            months = [
                datetime.date(year, m, 1)
                for m in range(1, 13)
                if (year, m) >= (first.year, first.month) and (year, m) <= (last.year, last.month)
            ]
            return {
                "show": True,
                "back": {"link": link({}), "title": "All dates"},
                "choices": [
                    {"link": link({year_field: year, month_field: d.month}), "title": _fmt(d, "YEAR_MONTH_FORMAT")}
                    for d in months
                ],
            }
        if not 1 <= month <= 12:
            return None  # the filter itself rejects such a month with an error note
        if day is None:
            days_in_month = calendar.monthrange(year, month)[1]
            days = [
                datetime.date(year, month, d)
                for d in range(1, days_in_month + 1)
                if first <= datetime.date(year, month, d) <= last
            ]
            return {
                "show": True,
                "back": {"link": link({year_field: year}), "title": str(year)},
                "choices": [
                    {
                        "link": link({year_field: year, month_field: month, day_field: d.day}),
                        "title": _fmt(d, "MONTH_DAY_FORMAT"),
                    }
                    for d in days
                ],
            }
        try:
            chosen = datetime.date(year, month, day)
        except ValueError:
            return None  # the filter itself rejects such a date with an error note
        return {
            "show": True,
            "back": {"link": link({year_field: year, month_field: month}), "title": _fmt(chosen, "YEAR_MONTH_FORMAT")},
            "choices": [{"title": _fmt(chosen, "MONTH_DAY_FORMAT")}],
        }

    def _bounds(self) -> tuple[datetime.date, datetime.date] | None:
        """The oldest and newest date in the table, in the current time zone.

        Two ``ORDER BY field LIMIT 1`` queries rather than one ``MIN(), MAX()``: each is a single
        index probe on every database, where SQLite only optimises a lone MIN or MAX.
        """
        values = self.root_queryset.values_list(self.date_hierarchy, flat=True)
        first = values.order_by(self.date_hierarchy).first()
        last = values.order_by(f"-{self.date_hierarchy}").first()
        if first is None or last is None:
            return None
        return _local_date(first), _local_date(last)


def _local_date(value: datetime.date | datetime.datetime) -> datetime.date:
    if isinstance(value, datetime.datetime):
        if timezone.is_aware(value):
            value = timezone.localtime(value)
        return value.date()
    return value


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _fmt(day: datetime.date, format_name: str) -> str:
    return capfirst(formats.date_format(day, format_name))
