"""Capacity-aware balancing: the shared state layer (windows, signals, breaker, queue).

``make_state`` builds the backend. ``wait_for_turn`` waits in a queue for one set of candidates;
the request path's policy (``policy.BalancedDispatcher``) runs its own loop over tiers with
spill-over on the same primitives. See ``state`` for the definitions both backends implement.
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
    wait_for_turn,
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
    "wait_for_turn",
]
