"""Quota state: rolling RPM/TPM windows and daily/monthly budgets per tenant and per key.

``make_quota_state`` builds the backend (in process, or Redis with Lua scripts); ``contract``
defines what both store and answer. The request path's use of it is ``gateway.proxy.admission``.
"""

from tenants.quota_state.contract import (
    KEY,
    TENANT,
    Admitted,
    Ask,
    BudgetUse,
    PeriodIds,
    QuotaState,
    QuotaStateConfig,
    Refused,
    Reservation,
    ScopeLimits,
    ScopeUse,
    Seed,
    Unseeded,
    WindowUse,
    make_quota_state,
)

__all__ = [
    "KEY",
    "TENANT",
    "Admitted",
    "Ask",
    "BudgetUse",
    "PeriodIds",
    "QuotaState",
    "QuotaStateConfig",
    "Refused",
    "Reservation",
    "ScopeLimits",
    "ScopeUse",
    "Seed",
    "Unseeded",
    "WindowUse",
    "make_quota_state",
]
