"""What a request meets when the balancer's shared state (Redis) cannot be reached.

The choice is to refuse, not to degrade to per-process limits. Without the shared windows a
process cannot know what the others sent: N processes each balancing alone would send up to N
times a deployment's limits (upstream 429s, and spill-over from provisioned deployments decided
blind), and the queue's priority order would split per process. So a request that cannot take
a lease is answered 503 with code ``state_unavailable`` (type ``api_error``) and ``Retry-After``,
within the Redis timeout (0.5 s) or at once while the state is known to be down; the OpenAI SDKs
retry 503s by themselves. Requests recover by themselves when Redis answers again.

Reports after an attempt (settle, release, cool-down, breaker) that cannot reach Redis are
logged and dropped: the reservation ages out of the windows like any other, and an answer the
client already has is not turned into an error after the fact.
"""

from __future__ import annotations

import logging

from gateway.balancer.contract import StateUnavailable
from gateway.balancer.dispatcher import Demand, Lease
from gateway.balancer.policy import BalancedDispatcher
from gateway.proxy import errors
from gateway.snapshot.types import DeploymentView

log = logging.getLogger(__name__)


class GuardedDispatcher:
    """``BalancedDispatcher`` for the request path: ``StateUnavailable`` becomes a 503 on acquire
    and is dropped (logged) on the reports that follow an attempt."""

    def __init__(self, inner: BalancedDispatcher) -> None:
        self.inner = inner

    @property
    def state(self):
        return self.inner.state

    @property
    def notes(self):
        return self.inner.notes

    @property
    def calibration(self):
        return self.inner.calibration

    @property
    def guard(self):
        return self.inner.guard

    async def acquire(
        self, candidates: tuple[DeploymentView, ...], demand: Demand, exclude: frozenset[int], *, wait: bool = True
    ) -> Lease:
        """A lease as ``BalancedDispatcher.acquire`` gives it; raises ``NoCapacity`` (429) as it
        does, and ``GatewayError`` 503 ``state_unavailable`` when the shared state cannot be reached."""
        try:
            return await self.inner.acquire(candidates, demand, exclude, wait=wait)
        except StateUnavailable as exc:
            raise errors.state_unavailable(exc.retry_after) from None

    def sending(self, lease: Lease) -> None:
        self.inner.sending(lease)

    async def succeeded(self, lease: Lease, prompt_tokens: int, completion_tokens: int, headers) -> None:
        try:
            await self.inner.succeeded(lease, prompt_tokens, completion_tokens, headers)
        except StateUnavailable as exc:
            _dropped("settle", lease, exc)

    async def rate_limited(self, lease: Lease, retry_after: float | None, headers) -> None:
        try:
            await self.inner.rate_limited(lease, retry_after, headers)
        except StateUnavailable as exc:
            _dropped("cool-down", lease, exc)

    async def failed(self, lease: Lease, *, reached_upstream: bool, reason: str = "") -> bool:
        """As ``BalancedDispatcher.failed``: True when the deployment's breaker is now open
        (unknown while the state cannot be reached: False, so the request may still retry)."""
        try:
            return await self.inner.failed(lease, reached_upstream=reached_upstream, reason=reason)
        except StateUnavailable as exc:
            _dropped("failure", lease, exc)
            return False

    async def abandoned(self, lease: Lease, prompt_tokens: int, completion_tokens: int) -> None:
        try:
            await self.inner.abandoned(lease, prompt_tokens, completion_tokens)
        except StateUnavailable as exc:
            _dropped("settle", lease, exc)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _dropped(what: str, lease: Lease, exc: StateUnavailable) -> None:
    log.warning("could not report a %s of deployment %s to the balancer state: %s", what, lease.deployment.name, exc)
