"""Which dispatcher a process uses: the capacity-aware balancer, on Redis when configured."""

from __future__ import annotations

from django.conf import settings

from gateway.balancer import make_state
from gateway.balancer.policy import BalancedDispatcher


def make_dispatcher(redis_client=None) -> BalancedDispatcher:
    g = settings.GATEWAY
    state = make_state(
        settings.REDIS_URL,
        minute=g["WINDOW_MINUTE_SECONDS"],
        prefix=g["BALANCER_REDIS_PREFIX"],
        breaker_failures=g["BREAKER_FAILURES"],
        breaker_open_seconds=g["BREAKER_OPEN_SECONDS"],
        queue_max_depth=g["QUEUE_MAX_DEPTH"],
    )
    return BalancedDispatcher(state)
