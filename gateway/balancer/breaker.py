"""A deployment's circuit breaker (the in-process form; ``lua/lib.lua`` mirrors it for Redis).

States, derived from three fields rather than stored, so that time alone moves them on:

* closed: fewer than ``threshold`` consecutive failures.
* open: ``threshold`` reached and ``now < open_until``; no capacity.
* half-open: ``threshold`` reached and the open time is over. Exactly one request (the
  probe) may go; until its outcome is recorded, or ``probe_seconds`` pass without one (its
  process died), nothing else may. Success closes; failure re-opens for ``open_seconds``.

Any success closes the breaker, also one from a request sent before it opened: a deployment
that answers well is healthy again. Every failure at or past the threshold (re)opens it, so
stragglers failing while it is open extend the open time.
"""

from __future__ import annotations

from dataclasses import dataclass

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    failures: int = 0
    open_until: float = 0.0
    probe: str | None = None  # reservation id of the outstanding probe
    probe_until: float = 0.0

    def state(self, now: float, threshold: int) -> str:
        if self.failures < threshold:
            return CLOSED
        return OPEN if now < self.open_until else HALF_OPEN

    def blocked_until(self, now: float, threshold: int) -> float:
        """When this breaker may next let a request through (<= now: it may now)."""
        if self.failures < threshold:
            return 0.0
        if now < self.open_until:
            return self.open_until
        if self.probe is not None and now < self.probe_until:
            return self.probe_until
        return 0.0

    def on_grant(self, reservation_id: str, now: float, threshold: int, probe_seconds: float) -> bool:
        """A request was granted; returns True if it is the half-open probe."""
        if self.failures < threshold:
            return False
        self.probe = reservation_id
        self.probe_until = now + probe_seconds
        return True

    def on_done(self, reservation_id: str) -> None:
        """A reservation settled or was released: if it was the probe, another may go."""
        if self.probe == reservation_id:
            self.probe = None
            self.probe_until = 0.0

    def on_failure(self, now: float, threshold: int, open_seconds: float) -> str:
        self.failures += 1
        if self.failures >= threshold:
            self.open_until = max(self.open_until, now + open_seconds)
            self.probe = None
            self.probe_until = 0.0
            return OPEN
        return CLOSED

    def on_success(self) -> None:
        self.failures = 0
        self.open_until = 0.0
        self.probe = None
        self.probe_until = 0.0
