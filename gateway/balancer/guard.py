"""The window guard sized from measurement (issue 18).

The balancer's request windows count each reservation a guard longer than the upstream's
window, because the upstream counts a request when it arrives, some milliseconds after the
gateway reserved it (contract.py, "Guard"). What matters is how much that delay varies: a
request that left late stays in the upstream's window after the gateway freed its slot. The
fixed guard (max(2 %, 50 ms)) is 5 % of the 1 s window, which an RPM-bound deployment loses.

So each process measures, per deployment, the delay from reservation to the moment the request
is handed to the upstream client (``BalancedDispatcher.sending``): its renewal of late grants,
Redis round trips, a busy event loop and building the upstream body are all inside it; what
follows (the connection, the network, the upstream's parsing) is about the same for every
request and so cancels out. The guard is ``MARGIN`` x the ``QUANTILE`` (the largest) of the last
``SAMPLES`` delays, within the configured floor and the fixed value as the ceiling, rounded up to
``STEP`` (so the window plans it selects stay few). Until ``MIN_SAMPLES`` delays are in, the
ceiling. In process only: the guard is passed with each call (``Candidate.guard``), so on
Redis every process counts the shared buckets with its own measurement. Not measured, so the
floor (10 ms) has to cover them: the send path after the hand-over (a new connection in a burst,
a busy loop before the bytes leave: a 2 ms floor drew single upstream 429s in bursts on 50 ms
test windows) and clock differences between gateway hosts (NTP keeps them within a few ms).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.balancer.contract import Candidate, Capacity

SAMPLES = 64  # the last delays kept per deployment
MIN_SAMPLES = 16  # before this many, the ceiling
QUANTILE = 1.0  # of the delays: the largest of the last 64 (the 98th percentile drew single 429s on Redis)
MARGIN = 1.5  # on it (below ~24 ms a larger guard costs nothing: see docs/architecture.md)
STEP = 0.0005  # seconds: guards are rounded up to this
REFRESH = 8  # the guard is recomputed every this many samples


@dataclass(slots=True)
class _Delays:
    samples: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))
    fresh: int = 0  # samples since the guard was computed
    guard: float = 0.0  # 0: not measured yet


def measured_guard(delays: list[float], floor: float) -> float:
    """``MARGIN`` x the ``QUANTILE`` of ``delays``, at least ``floor``, rounded up to ``STEP``
    (0 if too few)."""
    if len(delays) < MIN_SAMPLES:
        return 0.0
    ordered = sorted(delays)
    q = ordered[min(len(ordered) - 1, math.ceil(QUANTILE * len(ordered)) - 1)]
    return math.ceil(max(floor, q * MARGIN, STEP) / STEP - 1e-9) * STEP


class DispatchGuard:
    """Per deployment, the delay from reservation to sending, and the guard it sizes."""

    def __init__(self, floor: float = 0.01) -> None:
        self.floor = floor  # ``StateConfig.guard_floor``
        self._delays: dict[int, _Delays] = {}
        self._views: dict[tuple, Candidate] = {}

    def sent(self, deployment_id: int, delay: float) -> None:
        """A request reserved ``delay`` seconds ago is being handed to the upstream client."""
        d = self._delays.get(deployment_id)
        if d is None:
            d = self._delays[deployment_id] = _Delays()
        d.samples.append(delay)
        d.fresh += 1
        if d.fresh >= REFRESH or not d.guard:
            d.fresh = 0
            d.guard = measured_guard(list(d.samples), self.floor)

    def guard(self, deployment_id: int) -> float:
        """The measured guard of a deployment's request windows, seconds (0: not yet measured)."""
        d = self._delays.get(deployment_id)
        return d.guard if d is not None else 0.0

    def status(self, deployment_id: int) -> dict:
        """For the status page: the measured guard in ms (None: the ceiling) and the samples behind it."""
        d = self._delays.get(deployment_id)
        if d is None or not d.guard:
            return {"ms": None, "samples": len(d.samples) if d is not None else 0}
        return {"ms": round(d.guard * 1000.0, 1), "samples": len(d.samples)}

    def capacity(self, deployment: Any) -> Capacity:
        """``deployment`` (a ``DeploymentView`` or ``Candidate``) carrying its measured guard."""
        guard = self.guard(deployment.id)
        if not guard:
            return deployment
        model = getattr(deployment, "model", "")
        key = (deployment.id, deployment.rpm, deployment.tpm, deployment.weight, deployment.sku, model, guard)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 4096:
                self._views.clear()  # bounded: guards move in STEP, limits rarely
            view = self._views[key] = Candidate(
                deployment.id,
                deployment.rpm,
                deployment.tpm,
                deployment.weight,
                deployment.sku,
                model=model,
                guard=guard,
            )
        return view
