"""The seam between the request path and the balancer.

The consumer asks a ``Dispatcher`` for a ``Lease`` on a deployment that can take a request's
demand, then reports how the attempt ended. ``gateway.balancer.policy.BalancedDispatcher`` is
the implementation; tests may pass any object with the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.snapshot.types import DeploymentView


@dataclass(slots=True)
class Demand:
    """What one request needs from a deployment."""

    model: str
    prompt_tokens: int
    allowance: int  # completion tokens reserved (max_tokens * n, or a default)
    context_tokens: int  # prompt + the completion tokens the client explicitly asked for
    priority: int
    tenant: str
    timeout: float  # the longest the request may wait for capacity, in seconds

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.allowance


@dataclass(slots=True)
class Lease:
    """The right to send one attempt to ``deployment``; ``grant`` is the balancer's reservation."""

    deployment: DeploymentView
    grant: Any = None  # a gateway.balancer.contract.Grant; opaque to the request path
    queue_wait: float = 0.0
    extra: dict = field(default_factory=dict)


# NoCapacity's code when every candidate is held by its circuit breaker: the gateway answers 503
# (the deployments are failing), not 429 (they are busy).
UNHEALTHY_CODE = "deployments_unavailable"


class NoCapacity(Exception):
    """No deployment can take the request in time; answer 429 with ``retry_after`` (503 when the
    code is ``UNHEALTHY_CODE``)."""

    def __init__(self, message: str, retry_after: float, *, code: str = "rate_limit_exceeded") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code
        self.queue_wait = 0.0  # seconds the request waited in the queue before this refusal


class Dispatcher(Protocol):
    async def acquire(
        self, candidates: tuple[DeploymentView, ...], demand: Demand, exclude: frozenset[int], *, wait: bool = True
    ) -> Lease:
        """A lease on one of ``candidates`` (never one in ``exclude``), waiting if need be.

        Raises ``NoCapacity`` when none can take the request within ``demand.timeout`` (with
        ``wait=False``: when none can take it now).
        """

    def sending(self, lease: Lease) -> None:
        """The attempt is being handed to the upstream client now (the window guard's measure)."""

    async def succeeded(self, lease: Lease, prompt_tokens: int, completion_tokens: int, headers) -> None:
        """The attempt completed: an answer, or a client-caused 4xx (the deployment is healthy)."""

    async def rate_limited(self, lease: Lease, retry_after: float | None, headers) -> None:
        """The upstream answered 429: cool the deployment; the request will try elsewhere."""

    async def failed(self, lease: Lease, *, reached_upstream: bool, reason: str = "") -> bool:
        """A 5xx, a connect error, a timeout, a broken stream or a refusal of the gateway (401/403/404):
        counts towards the deployment's circuit breaker; ``reason`` (no secrets in it) is shown to
        operators. ``reached_upstream``: whether the upstream may have counted the request against
        its limits. Returns whether the deployment's breaker is open now."""

    async def abandoned(self, lease: Lease, prompt_tokens: int, completion_tokens: int) -> None:
        """The client went away mid-request: settle what was used, no verdict on the deployment."""
