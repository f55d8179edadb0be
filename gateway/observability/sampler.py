"""Per-process values, copied into the metrics every second: what requests added (see
``GatewayMetrics.flush``), the usage buffer and the snapshot.

They belong to each process (its buffer, its snapshot), so with several processes a scrape of one
cannot read them from the others: each process writes them into its own multiprocess file, and
the gauges' ``multiprocess_mode`` says how they combine. The buffer's counts (written, parked,
spilled, dropped, flush failures) are cumulative in the sink and go to counters as increments, so
they survive the process that counted them, as counters should.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from billing.usage_sink import get_sink
from gateway import snapshot
from gateway.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 1.0
_COUNTED = ("flush_failures", "parked", "written", "spilled", "dropped")


class ProcessSampler:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self._counted: dict[str, int] = {}
        self._task: asyncio.Task | None = None

    def sample(self, snapshot_checked_at: float | None) -> None:
        """Copy the sink's and the snapshot's state now (``snapshot_checked_at``: wall time of the
        refresher's last look at the database's version, None if it has none)."""
        m = self.metrics
        m.flush()
        sink = get_sink()
        stats = sink.stats()
        m.usage_buffered.set(stats["in_memory"])
        m.usage_database_down.set(1 if stats["database_down"] else 0)
        counters = {
            "flush_failures": m.usage_flush_failures,
            "parked": m.usage_parked,
            "written": m.usage_written,
            "spilled": m.usage_spilled,
            "dropped": m.usage_dropped,
        }
        for name in _COUNTED:
            value = int(stats.get(name, 0))
            delta = value - self._counted.get(name, 0)
            if delta > 0:
                counters[name].inc(delta)
            self._counted[name] = value  # a new sink (tests) starts again from its own count
        m.snapshot_version.set(snapshot.current().version)
        if snapshot_checked_at is not None:
            m.snapshot_age.set(max(time.time() - snapshot_checked_at, 0.0))

    def start(self, checked_at) -> None:
        """Sample every second on the running loop; ``checked_at()`` gives the refresher's time."""
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(self._run(checked_at), name="metrics-sampler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, checked_at) -> None:
        while True:
            try:
                self.sample(checked_at())
            except Exception:
                log.exception("sampling the process's metrics failed")
            await asyncio.sleep(SAMPLE_SECONDS)
