"""Waiting for the usage buffer to reach the database."""

from __future__ import annotations

import time

from billing.models import UsageRecord


def wait_for_records(count: int, timeout: float = 5.0) -> list[UsageRecord]:
    """The usage records once ``count`` are stored (the flusher runs every 50 ms in tests);
    fails if more or fewer arrive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if UsageRecord.objects.count() >= count:
            break
        time.sleep(0.02)
    time.sleep(0.15)  # a record too many would arrive within a flush or two
    records = list(UsageRecord.objects.order_by("started_at"))
    assert len(records) == count, [(r.route, r.status, r.outcome) for r in records]
    return records
