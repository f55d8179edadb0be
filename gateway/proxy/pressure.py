"""How hard this process's event loop is pressed, and the two things that follow from it.

A timer task wakes every ``TICK_SECONDS`` (50 ms) and notes:

* **lag**: how late it woke, i.e. how long anything queued on the loop now waits for its turn;
* **busy**: the event loop thread's CPU seconds per wall second since the previous tick (work in
  other threads, such as big prompts counted off the loop, does not count: it does not delay
  the streams).

Both are smoothed (exponentially, over ``SMOOTHING_SECONDS``) so that one slow callback or one
garbage collection does not count as overload. From them:

* **Admission** (``admit``): once the smoothed lag passes ``OVERLOAD_LAG_MS``, the process is
  *overloaded* until it falls below half of that. New proxied requests are then answered at once
  with 503 ``server_overloaded`` and ``Retry-After`` (the SDKs retry it, a load balancer can send
  it to another process), before their body is read or capacity reserved, rather than waiting
  seconds for a first token while nothing tells the client; and again once the body is in, before
  it is parsed and counted. The timer being overdue by more than twice the limit right now counts
  too, so that a burst is refused while it happens, not after. Streams already running are not
  touched, and keep their pace because no new work joins them.
* **Stream coalescing** (``stream_hold``): when the event loop is more than half busy, a stream's
  relay reads its upstream at most once per ``stream_hold`` seconds (up to ``STREAM_COALESCE_MS``,
  growing with the pressure), with the upstream connection paused in between. The events that
  arrive meanwhile wait in the socket and go out together: one read, one wake-up, one write to the
  client instead of one per event, which is most of what an event costs. Tokens then reach the
  client in small bursts, never later than ``stream_hold`` after they arrived; the first event of
  a stream is never held. Below half busy nothing is held.

One instance per process: ``pressure`` (started and stopped by ``gateway.proxy.runtime``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from gateway.proxy import errors

log = logging.getLogger(__name__)

TICK_SECONDS = 0.05
SMOOTHING_SECONDS = 0.3
OVERLOAD_RETRY_AFTER_SECONDS = 1.0
# Admission refuses at once while the timer is this many times the lag limit late (see ``admit``).
BURST_LAG_FACTOR = 2.0
# Coalescing starts at this busy share (CPU seconds per second) and is at its maximum at 1.
COALESCE_FROM = 0.5


class LoopPressure:
    """Smoothed lag and CPU share of this process's event loop; admission and stream coalescing from them.

    ``lag_limit``: seconds of smoothed lag that mean overload (0: never refuse).
    ``max_hold``: the longest a stream may hold its upstream reads under pressure (0: never).
    """

    def __init__(self, lag_limit: float = 0.1, max_hold: float = 0.2) -> None:
        self.lag_limit = lag_limit
        self.max_hold = max_hold
        self.lag = 0.0  # smoothed seconds
        self.busy = 0.0  # smoothed CPU seconds of the loop's thread per wall second
        self.overloaded = False
        self.stream_hold = 0.0  # seconds; read by every stream relay after each write
        self._weight = 1.0 - math.exp(-TICK_SECONDS / SMOOTHING_SECONDS)
        self._task: asyncio.Task | None = None
        self._due = math.inf  # loop time the timer is due to wake next (inf: not running)

    def configure(self, lag_limit: float, max_hold: float) -> None:
        self.lag_limit, self.max_hold = lag_limit, max_hold

    # -- measuring -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the timer task on the running loop (again after ``stop``, or on a new loop)."""
        if self._task is not None and not self._task.done():
            return
        self.reset()
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop-pressure")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.reset()

    def reset(self) -> None:
        self._due = math.inf
        self.lag = self.busy = self.stream_hold = 0.0
        self.overloaded = False

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        wall, cpu = time.monotonic(), time.thread_time()  # this task runs on the loop's thread
        while True:
            due = self._due = loop.time() + TICK_SECONDS
            await asyncio.sleep(TICK_SECONDS)
            lag = max(loop.time() - due, 0.0)
            now_wall, now_cpu = time.monotonic(), time.thread_time()
            busy = (now_cpu - cpu) / (now_wall - wall) if now_wall > wall else self.busy
            wall, cpu = now_wall, now_cpu
            self.observe(lag, busy)

    def observe(self, lag: float, busy: float) -> None:
        """Take one measurement (the timer's, or a test's) and update what follows from it."""
        w = self._weight
        self.lag += w * (lag - self.lag)
        self.busy += w * (busy - self.busy)
        self._update()

    def _update(self) -> None:
        if self.lag_limit > 0:
            if not self.overloaded and self.lag > self.lag_limit:
                self.overloaded = True
                log.warning(
                    "event loop lag %.0f ms (limit %.0f ms): refusing new requests with 503 until it falls below %.0f ms",
                    self.lag * 1000,
                    self.lag_limit * 1000,
                    self.lag_limit * 500,
                )
            elif self.overloaded and self.lag < self.lag_limit / 2:
                self.overloaded = False
                log.warning("event loop lag back to %.0f ms: admitting new requests", self.lag * 1000)
        # Lag counts as pressure too: a process starved of its core by others is pressed although
        # its own CPU share looks moderate.
        pressed = max(self.busy, self.lag / self.lag_limit if self.lag_limit > 0 else 0.0)
        share = min(max((pressed - COALESCE_FROM) / (1.0 - COALESCE_FROM), 0.0), 1.0)
        self.stream_hold = self.max_hold * share if share > 0.05 else 0.0

    # -- admission -----------------------------------------------------------------------------

    def admit(self) -> None:
        """Raise the 503 ``server_overloaded`` error while the process is overloaded; else return.

        Also while the timer is overdue by more than ``BURST_LAG_FACTOR`` times the limit right now:
        the smoothed lag is only measured once the timer gets its turn, which during a burst (a
        hundred big requests arriving together, or clients told to retry after the same second) is
        after the burst's work is done. The timer's lateness is visible before that, to the
        requests the burst is made of, so the burst is cut short instead of stalling every stream
        for its whole length. Twice the limit, so that one stall the smoothing forgives (a
        collection of the heap, one slow callback) refuses nobody unless it is that long.
        """
        if self.overloaded or (
            self.lag_limit > 0
            and self._due != math.inf
            and asyncio.get_running_loop().time() - self._due > BURST_LAG_FACTOR * self.lag_limit
        ):
            raise errors.server_overloaded(OVERLOAD_RETRY_AFTER_SECONDS)


pressure = LoopPressure()
