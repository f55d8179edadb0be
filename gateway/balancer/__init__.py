"""Capacity-aware balancing: the shared state layer (windows, signals, breaker, queue).

``make_state`` builds the backend; ``wait_for_turn`` is the waiting loop the policy (tiers,
spill-over) calls. See ``state`` for the definitions both backends implement.
"""

from gateway.balancer.state import (
    BalancerState,
    Candidate,
    Capacity,
    Denied,
    Grant,
    Reason,
    StateConfig,
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
    "make_state",
    "wait_for_turn",
]
