"""Fixed-bucket histograms of milliseconds, so that percentiles come from roll-ups.

Roll-ups keep one count per bucket (columns ``lat_00`` … ``lat_19`` and the same for time to
first token and queue wait). Counts of the same buckets add up across hours, tenants and models,
so a dashboard sums them in SQL and reads p50/p95 off the sums: an estimate whose error is at
most the width of the bucket the percentile falls in (interpolated linearly inside it, as
Prometheus' ``histogram_quantile`` does). Bucket edges are roughly logarithmic, from 10 ms to
two minutes; the last bucket is open-ended.

Pure: no Django.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

# Upper edges (exclusive) in milliseconds; bucket i holds lower <= value < BOUNDS_MS[i].
BOUNDS_MS: Final = (
    10,
    25,
    50,
    100,
    250,
    500,
    750,
    1000,
    1500,
    2000,
    3000,
    5000,
    7500,
    10_000,
    15_000,
    20_000,
    30_000,
    60_000,
    120_000,
)
BUCKETS: Final = len(BOUNDS_MS) + 1

# Histogram name -> column prefix. Latency counts requests that reached a deployment; time to
# first token, streamed requests that got one; queue wait, every request.
HISTOGRAMS: Final = {"latency": "lat", "ttft": "ttft", "queue_wait": "wait"}


def column_names(prefix: str) -> list[str]:
    """The roll-up columns of one histogram, in bucket order: ``lat_00`` … ``lat_19``."""
    return [f"{prefix}_{i:02d}" for i in range(BUCKETS)]


def bucket_ranges() -> list[tuple[float, float | None]]:
    """``(lower, upper)`` of every bucket in ms; the last one's upper is None (open-ended)."""
    lowers = (0, *BOUNDS_MS)
    uppers: tuple[float | None, ...] = (*BOUNDS_MS, None)
    return list(zip(lowers, uppers, strict=True))


def bucket_of(value_ms: float) -> int:
    """The bucket a value falls in (negative values count as 0)."""
    for i, bound in enumerate(BOUNDS_MS):
        if value_ms < bound:
            return i
    return BUCKETS - 1


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) estimated from bucket counts, or None when they are all zero.

    Linear inside the bucket it falls in; in the open last bucket, that bucket's lower edge (the
    only honest figure: "at least two minutes").
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for (lower, upper), count in zip(bucket_ranges(), counts, strict=True):
        if count and seen + count >= rank:
            if upper is None:
                return float(lower)
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return float(BOUNDS_MS[-1])
