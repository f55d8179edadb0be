"""Capacity-aware balancing: the shared state layer (windows, signals, breaker, queue).

``make_state`` builds the backend; the request path's policy (``policy.BalancedDispatcher``)
waits in the model's queue and spills over between tiers on its primitives. See ``contract`` for
the definitions both backends implement.
"""

from gateway.balancer.contract import (
    BalancerState,
    Candidate,
    Capacity,
    Denied,
    Grant,
    Reason,
    StateConfig,
    StateUnavailable,
    make_state,
)

__all__ = [
    "BalancerState",
    "Candidate",
    "Capacity",
    "Denied",
    "Grant",
    "Reason",
    "StateConfig",
    "StateUnavailable",
    "make_state",
]
