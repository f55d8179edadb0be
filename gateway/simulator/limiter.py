"""Rate-limit state of one simulated deployment: rolling windows and PTU utilisation.

Standard deployments (Azure pay-as-you-go):

* :class:`ArrivalLog` records every *admitted* request as (arrival time, counted tokens). The
  windows come from :mod:`gateway.balancer.windows` (``request_windows``/``token_windows``), which the
  gateway's balancer uses too, so both sides enforce exactly the same windows.
* Windows are exact sliding windows: an entry counts in a window of ``seconds`` while
  ``now - t < seconds``. Rejected requests are never recorded (they consume no capacity) and
  recorded amounts are never corrected (Azure counts on arrival).
* The same log yields the observed peaks reported in stats ("the most requests/tokens ever
  seen in any rolling window of this length"), which is how tests check that a gateway kept
  an upstream under its limits.

Storage is two flat arrays (timestamps and cumulative tokens) shared by all windows, each
window being a cursor into them: O(1) amortised per request, O(log n) only to compute a
retry-after, and 16 bytes per request kept for the longest window (a minute of 10k req/s is
under 10 MB).

Provisioned deployments (PTU): :class:`PtuMeter` is a leaky bucket. Arrival adds
prompt + allowance, completion corrects to the actual usage, the level drains continuously at
``ptu_tokens_per_minute`` per minute, and a full bucket (>= 100 %) answers 429 at once.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.balancer.windows import Window

# Compact the arrays once this many expired entries sit at the front (and they are at least
# half of the arrays), so deletion cost stays amortised O(1).
_COMPACT_MIN = 4096

# A retry hint lands exactly on the boundary where the blocking entry expires (or the PTU
# level reaches 100 %); a little slack keeps a client that obeys it from arriving a hair early.
RETRY_SLACK_S = 0.001


class ArrivalLog:
    """Admitted arrivals with per-duration cursors. Time is any monotonic clock, in seconds."""

    def __init__(self, durations: Iterable[float]) -> None:
        self._ts = array("d")
        self._cum = array("q")  # tokens counted before entry i (prefix sums)
        self._total = 0  # tokens counted over all retained entries and the dropped prefix
        self._cursor: dict[float, int] = {}
        self._peak_requests: dict[float, int] = {}
        self._peak_tokens: dict[float, int] = {}
        for seconds in durations:
            self.track(seconds)

    def track(self, seconds: float) -> None:
        """Start tracking a window length (entries older than the longest may be gone)."""
        if seconds in self._cursor:
            return
        # Start after everything: a new duration only sees future arrivals. This only
        # happens if the window set changes at runtime, where that is the honest choice.
        self._cursor[seconds] = len(self._ts)
        self._peak_requests[seconds] = 0
        self._peak_tokens[seconds] = 0

    @property
    def durations(self) -> tuple[float, ...]:
        return tuple(sorted(self._cursor))

    def advance(self, now: float) -> None:
        """Expire entries that left each window by ``now``."""
        ts = self._ts
        end = len(ts)
        for seconds, cursor in self._cursor.items():
            horizon = now - seconds
            start = cursor
            while cursor < end and ts[cursor] <= horizon:
                cursor += 1
            if cursor != start:
                self._cursor[seconds] = cursor
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        head = min(self._cursor.values(), default=len(self._ts))
        if head >= _COMPACT_MIN and head * 2 >= len(self._ts):
            del self._ts[:head]
            del self._cum[:head]
            for seconds in self._cursor:
                self._cursor[seconds] -= head

    def requests(self, seconds: float) -> int:
        """Requests inside the window (call :meth:`advance` first)."""
        return len(self._ts) - self._cursor[seconds]

    def tokens(self, seconds: float) -> int:
        """Tokens inside the window (call :meth:`advance` first)."""
        cursor = self._cursor[seconds]
        return self._total - self._cum[cursor] if cursor < len(self._ts) else 0

    def add(self, now: float, tokens: int) -> None:
        """Record an admitted request and update the observed peaks."""
        self._ts.append(now)
        self._cum.append(self._total)
        self._total += tokens
        end = len(self._ts)
        for seconds, cursor in self._cursor.items():
            count = end - cursor
            if count > self._peak_requests[seconds]:
                self._peak_requests[seconds] = count
            amount = self._total - self._cum[cursor]
            if amount > self._peak_tokens[seconds]:
                self._peak_tokens[seconds] = amount

    def wait_for_request(self, now: float, window: Window) -> float:
        """Seconds until one more request fits ``window`` (0 = fits now)."""
        count = self.requests(window.seconds)
        if count < window.limit:
            return 0.0
        # The (count - limit + 1) oldest entries must leave; the last of them decides.
        blocking = self._cursor[window.seconds] + (count - window.limit)
        return self._ts[blocking] + window.seconds - now

    def wait_for_tokens(self, now: float, window: Window, amount: int) -> float | None:
        """Seconds until ``amount`` tokens fit ``window``; None if they never can."""
        if amount > window.limit:
            return None
        if self.tokens(window.seconds) + amount <= window.limit:
            return 0.0
        cursor, end = self._cursor[window.seconds], len(self._ts)
        # Entries cursor..k-1 must expire so that total - cum[k] + amount <= limit; cum is
        # non-decreasing, so the first such k is a binary search away (k == end: all expire).
        need = self._total + amount - window.limit
        k = bisect_left(self._cum, need, cursor + 1, end)
        return self._ts[k - 1] + window.seconds - now

    def peaks(self) -> tuple[dict[float, int], dict[float, int]]:
        """(max requests, max tokens) ever observed in a rolling window, per duration."""
        return dict(self._peak_requests), dict(self._peak_tokens)


@dataclass(slots=True)
class Decision:
    """Outcome of an admission check.

    ``retry_after`` is None when admitted; otherwise seconds until the blocking window would
    admit this request (a whole window if it never can), and ``reason`` says which limit
    ("requests" | "tokens" | "utilization").
    """

    retry_after: float | None = None
    reason: str = ""

    @property
    def admitted(self) -> bool:
        return self.retry_after is None


class StandardLimiter:
    """RPM/TPM windows over an :class:`ArrivalLog` (the log also serves the stats)."""

    def __init__(
        self,
        log: ArrivalLog,
        request_windows: tuple[Window, ...],
        token_windows: tuple[Window, ...],
    ) -> None:
        self.log = log
        self.request_windows = request_windows
        self.token_windows = token_windows
        for window in request_windows + token_windows:
            log.track(window.seconds)

    def check(self, now: float, tokens: int) -> Decision:
        """Admit (and record) the request, or say how long until it would fit."""
        log = self.log
        log.advance(now)
        wait, reason = 0.0, ""
        for window in self.request_windows:
            w = log.wait_for_request(now, window)
            if w > wait:
                wait, reason = w, "requests"
        for window in self.token_windows:
            token_wait = log.wait_for_tokens(now, window, tokens)
            if token_wait is None:
                # Larger than the whole limit: it can never fit. Azure still answers 429;
                # a hint of one full window keeps clients from hammering.
                return Decision(window.seconds + RETRY_SLACK_S, "tokens")
            if token_wait > wait:
                wait, reason = token_wait, "tokens"
        if reason:
            return Decision(wait + RETRY_SLACK_S, reason)
        log.add(now, tokens)
        return Decision()

    def remaining(self) -> tuple[int | None, int | None]:
        """Smallest remaining requests / tokens over the windows (None = unlimited)."""
        log = self.log
        req = min((w.limit - log.requests(w.seconds) for w in self.request_windows), default=None)
        tok = min((w.limit - log.tokens(w.seconds) for w in self.token_windows), default=None)
        return (None if req is None else max(req, 0), None if tok is None else max(tok, 0))


class PtuMeter:
    """Provisioned-throughput utilisation: a bucket of ``capacity`` tokens draining per minute.

    100 % utilisation = ``tokens_per_minute`` tokens in the bucket, i.e. a minute's worth of
    provisioned throughput is in flight or recently used.
    """

    def __init__(self, tokens_per_minute: int, minute: float, now: float) -> None:
        self.level = 0.0
        self._updated = now
        self.reconfigure(tokens_per_minute, minute)

    def reconfigure(self, tokens_per_minute: int, minute: float) -> None:
        self.capacity = float(max(tokens_per_minute, 1))
        self.drain_per_second = self.capacity / minute

    def _drain(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:
            self.level = max(0.0, self.level - elapsed * self.drain_per_second)
            self._updated = now

    def utilization(self, now: float) -> float:
        """Percent of capacity in use (can exceed 100 after admitting a large request)."""
        self._drain(now)
        return 100.0 * self.level / self.capacity

    def check(self, now: float, tokens: int) -> Decision:
        """Admit (adding ``tokens``) unless utilisation is already >= 100 %."""
        self._drain(now)
        if self.level >= self.capacity:
            wait = (self.level - self.capacity) / self.drain_per_second
            return Decision(wait + RETRY_SLACK_S, "utilization")
        self.level += tokens
        return Decision()

    def settle(self, now: float, counted: int, actual: int) -> None:
        """Correct an admitted request's arrival count to what it really used."""
        self._drain(now)
        self.level = max(0.0, self.level + (actual - counted))
