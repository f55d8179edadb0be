"""When a request may try again: its first-byte deadline and its retry plan.

One deadline per request. The first-byte budget is the largest ``first_byte`` timeout among the
endpoints of the request's candidate deployments (with one endpoint, simply its ``first_byte``).
It is spent by attempts, from the moment an attempt has its lease (the AD token, connecting,
sending and waiting for the answer, and reading a non-streamed answer, which is when the client's
first byte can go) until that attempt ends, and by the back-off before a retry. It is *not* spent
while the request waits in the balancer for capacity before its first attempt: that wait has its
own limit (the queue timeout). Once an attempt has failed the request is on the clock: a retry's
wait for capacity is charged to the budget too, and bounded by what is left of it (the queue
timeout still applies, counted across attempts by the dispatcher). Each attempt's connect and
first-byte timeouts are cut to what is left, and a retry starts only if at least
``MIN_ATTEMPT_SECONDS`` would be left after its back-off. So once a request has its first lease,
a hung or failing upstream is answered (504/502) within ``first_byte``, however many deployments
and retries there are.

Retries: an attempt that failed transiently (5xx, 408, connect error, timeout, a broken answer)
counts against ``MAX_RETRIES``; one refused (401/403/404/407, a redirect, an Azure AD token that
could not be had) does not, but that deployment is not tried again for this request, and neither
is one whose circuit breaker the failure opened. Deployments not yet tried come first, if one has
room at once (one whose breaker others opened, or whose window is full, is not waited for); else,
and once every candidate has been tried, the ones that may still go are tried again after a short
jittered back-off, so that a transient 500 gets another chance even with one or two deployments.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

from gateway.proxy.errors import GatewayError

# Back-off before trying a deployment that was already tried: short, since the failure was
# transient and the client is waiting; jittered so that the retries of requests that failed
# together do not arrive together.
BACKOFF_SECONDS = (0.05, 0.2)
# A retry needs at least this much of the first-byte budget, or it could not get an answer anyway.
MIN_ATTEMPT_SECONDS = 0.1
_RNG = random.Random()


class FirstByteBudget:
    """The request's first-byte budget, charged only while an attempt or a back-off runs."""

    __slots__ = ("_clock", "_since", "seconds", "spent")

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self._since: float | None = None
        self._clock = clock

    def resume(self) -> None:
        """Start charging (an attempt or a back-off begins). Idempotent."""
        if self._since is None:
            self._since = self._clock()

    def pause(self) -> None:
        """Stop charging (the attempt ended, or the request goes back to wait for capacity)."""
        if self._since is not None:
            self.spent += self._clock() - self._since
            self._since = None

    def left(self) -> float:
        """Seconds left (may be negative once spent)."""
        running = self._clock() - self._since if self._since is not None else 0.0
        return self.seconds - self.spent - running


class RetryPlan:
    """Which deployments a request may still try, and whether and when it tries again.

    ``exclude()`` is what to pass to the dispatcher for the next attempt; ``after_failure``
    records a failed attempt and answers the back-off before the next one, or None to give up.
    """

    __slots__ = ("_rng", "barred", "budget", "candidates", "last_error", "retries_left", "tried")

    def __init__(
        self, candidates: Iterable[int], max_retries: int, budget: FirstByteBudget, rng: random.Random | None = None
    ) -> None:
        self.candidates = frozenset(candidates)
        self.retries_left = max_retries
        self.budget = budget
        self.tried: set[int] = set()
        self.barred: set[int] = set()  # refused the gateway, or its breaker opened: not again
        self.last_error: GatewayError | None = None
        self._rng = rng or _RNG  # a Random() per request would cost ~10 us of seeding

    def exclude(self, untried_first: bool = True) -> frozenset[int]:
        """Deployments the next attempt must not use: barred ones, and (``untried_first``) tried ones
        while others remain."""
        if untried_first and self.candidates - self.tried - self.barred:
            return frozenset(self.tried | self.barred)
        return frozenset(self.barred)

    def backoff(self) -> float | None:
        """A back-off before trying a tried deployment again, or None if the budget cannot afford it."""
        backoff = self._rng.uniform(*BACKOFF_SECONDS)
        return backoff if self.budget.left() >= backoff + MIN_ATTEMPT_SECONDS else None

    def after_failure(
        self, deployment_id: int, error: GatewayError, *, refused: bool = False, breaker_open: bool = False
    ) -> float | None:
        """Record a failed attempt; the seconds to back off before the next one, or None: give up."""
        self.tried.add(deployment_id)
        self.last_error = error
        if refused or breaker_open:
            self.barred.add(deployment_id)
        if not refused:
            if self.retries_left <= 0:
                return None
            self.retries_left -= 1
        if not self.candidates - self.barred:
            return None
        if self.candidates - self.tried - self.barred:
            return 0.0 if self.budget.left() >= MIN_ATTEMPT_SECONDS else None
        return self.backoff()
