"""``acquire(wait=False)``: a lease only if one is free now, without joining the queue."""

from __future__ import annotations

import asyncio

import pytest

from gateway.balancer import make_state
from gateway.balancer.dispatcher import Demand, NoCapacity
from gateway.balancer.policy import BalancedDispatcher
from gateway.snapshot.types import DeploymentView, EndpointView

ENDPOINT = EndpointView(1, "e", "azure", "http://upstream.test")
ONE_RPM = DeploymentView(1, ENDPOINT, "a", "gpt-4o", rpm=1)


def demand(timeout: float = 5.0) -> Demand:
    return Demand("gpt-4o", 10, 10, 20, priority=5, tenant="t", timeout=timeout)


async def test_a_free_deployment_is_leased_at_once():
    dispatcher = BalancedDispatcher(make_state(None, minute=60.0))
    lease = await dispatcher.acquire((ONE_RPM,), demand(), frozenset(), wait=False)
    assert lease.deployment is ONE_RPM


async def test_without_room_it_refuses_at_once_instead_of_waiting():
    dispatcher = BalancedDispatcher(make_state(None, minute=60.0))
    await dispatcher.acquire((ONE_RPM,), demand(), frozenset())
    with pytest.raises(NoCapacity):
        await asyncio.wait_for(dispatcher.acquire((ONE_RPM,), demand(), frozenset(), wait=False), 0.5)
    with pytest.raises(NoCapacity):  # nothing left once excluded
        await dispatcher.acquire((ONE_RPM,), demand(), frozenset({ONE_RPM.id}), wait=False)


async def test_it_does_not_jump_ahead_of_waiting_requests():
    dispatcher = BalancedDispatcher(make_state(None, minute=60.0))
    await dispatcher.acquire((ONE_RPM,), demand(), frozenset())
    waiter = asyncio.ensure_future(dispatcher.acquire((ONE_RPM,), demand(timeout=120.0), frozenset()))
    await asyncio.sleep(0.05)  # queued behind the full window
    assert await dispatcher.state.depth("gpt-4o") == {5: 1}
    with pytest.raises(NoCapacity):
        await dispatcher.acquire((ONE_RPM,), demand(), frozenset(), wait=False)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
