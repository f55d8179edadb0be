"""Hours, days and months in UTC: where roll-up periods and statement months start and end.

Pure: no Django. Every datetime here is timezone-aware and in UTC; so are the periods the
roll-ups store (the project's ``TIME_ZONE`` is UTC, and a month closes at midnight UTC).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def hour_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def day_start(moment: datetime) -> datetime:
    return hour_start(moment).replace(hour=0)


def month_start(moment: datetime | date) -> datetime:
    if not isinstance(moment, datetime):
        return datetime(moment.year, moment.month, 1, tzinfo=UTC)
    return day_start(moment).replace(day=1)


def next_month(moment: datetime | date) -> datetime:
    start = month_start(moment)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def parse_month(text: str) -> datetime:
    """``YYYY-MM`` -> the month's first instant (ValueError otherwise)."""
    try:
        year, month = (int(part) for part in text.split("-"))
        return datetime(year, month, 1, tzinfo=UTC)
    except ValueError:
        raise ValueError(f"not a month (YYYY-MM): {text!r}") from None


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """Every hour start from ``start``'s hour up to (not including) ``end``."""
    hour, stop = hour_start(start), end.astimezone(UTC)
    hours = []
    while hour < stop:
        hours.append(hour)
        hour += HOUR
    return hours


def contiguous_runs(periods: Iterable[datetime], step: str, longest: int) -> Iterator[list[datetime]]:
    """Sorted periods in runs of consecutive ones (``step``: "hour", "day" or "month"), at most
    ``longest`` each, so that one query can read a run as a single range."""
    run: list[datetime] = []
    for period in sorted(set(periods)):
        if run and (len(run) >= longest or period != following(run[-1], step)):
            yield run
            run = []
        run.append(period)
    if run:
        yield run


def following(period: datetime, step: str) -> datetime:
    """The start of the period after ``period``."""
    if step == "hour":
        return period + HOUR
    if step == "day":
        return period + DAY
    if step == "month":
        return next_month(period)
    raise ValueError(f"unknown period {step!r}")
