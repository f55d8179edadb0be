"""Waiting for capacity through ``BalancedDispatcher``, run against both backends (memory and Redis).

The queue behaviours the request path relies on, driven through the policy's own loop on a real
clock: wake on release, priority order, fairness between tenants, hand-over speed, giving up at
once when the wait cannot fit the timeout, queue full and eviction, and leaving on cancellation.
The state's primitives are tested alone in ``test_state``. The ``make_state`` fixture (conftest)
builds each backend with a 6-second minute, so one deployment with TPM 1000 is full for ~6 s
once a 1000-token demand holds it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.balancer.contract import BalancerState
from gateway.balancer.dispatcher import Demand, Lease, NoCapacity
from gateway.balancer.policy import BalancedDispatcher
from gateway.snapshot.types import AZURE, DeploymentView, EndpointView

# The policy renews a grant that reaches it more than half the shortest window's guard after it
# was recorded (``BalancedDispatcher._renewed``: release, then take again), and the next head can
# take the capacity in between. On a loaded machine Redis grants arrive a few ms late, more than
# the fixture's 10 ms guard allows, so tests of the order of service widen the guard.
ORDERLY = {"guard_min": 0.5}

ENDPOINT = EndpointView(id=1, name="east", kind=AZURE, base_url="https://east.example")
MODEL = "gpt-4o"
NOTHING = frozenset[int]()


def deployment(tpm: int = 1000, **fields) -> tuple[DeploymentView, ...]:
    return (DeploymentView(id=1, endpoint=ENDPOINT, name="east-gpt-4o", model=MODEL, tpm=tpm, **fields),)


def demand(tokens: int, *, priority: int = 1, tenant: str = "A", timeout: float = 10.0) -> Demand:
    return Demand(
        model=MODEL,
        prompt_tokens=tokens,
        allowance=0,
        context_tokens=tokens,
        priority=priority,
        tenant=tenant,
        timeout=timeout,
    )


async def full(state: BalancerState, candidates: tuple[DeploymentView, ...]):
    """Fill the deployment's whole token window; returns the grant holding it."""
    holder = await state.try_acquire(candidates, candidates[0].tpm)
    assert holder.tokens == candidates[0].tpm
    return holder


def waiter(dispatcher: BalancedDispatcher, candidates, wanted: Demand) -> asyncio.Task[Lease]:
    return asyncio.create_task(dispatcher.acquire(candidates, wanted, NOTHING))


async def until_depth(state: BalancerState, depth: dict[int, int], timeout: float = 2.0) -> None:
    """Wait until the model's queue holds ``depth`` (tickets per priority)."""
    deadline = time.monotonic() + timeout
    while (seen := await state.depth(MODEL)) != depth:
        if time.monotonic() > deadline:
            pytest.fail(f"queue depth {seen}, expected {depth}")
        await asyncio.sleep(0.01)


async def test_a_waiter_gets_capacity_soon_after_it_is_released(make_state):
    state = await make_state()
    candidates = deployment()
    holder = await full(state, candidates)
    dispatcher = BalancedDispatcher(state)
    task = waiter(dispatcher, candidates, demand(500))
    await until_depth(state, {1: 1})
    await asyncio.sleep(0.05)
    assert not task.done()
    released = time.monotonic()
    await state.release(holder)
    lease = await asyncio.wait_for(task, 2.0)
    assert lease.deployment is candidates[0] and lease.grant.tokens == 500
    assert lease.queue_wait > 0.05
    # Memory wakes the waiter at once; Redis waiters at the head poll at most every poll_max (0.1 s).
    assert time.monotonic() - released < 0.25
    assert await state.depth(MODEL) == {}


async def test_waiters_are_served_by_priority_whatever_their_arrival(make_state):
    state = await make_state(**ORDERLY)
    candidates = deployment()
    holder = await full(state, candidates)
    dispatcher = BalancedDispatcher(state)
    low = waiter(dispatcher, candidates, demand(1000, priority=5))
    await until_depth(state, {5: 1})
    high = waiter(dispatcher, candidates, demand(1000, priority=1))
    await until_depth(state, {1: 1, 5: 1})
    await state.release(holder)
    first = await asyncio.wait_for(high, 2.0)
    await asyncio.sleep(0.05)
    assert not low.done()
    released = time.monotonic()
    await state.release(first.grant)
    assert (await asyncio.wait_for(low, 2.0)).grant.tokens == 1000
    assert time.monotonic() - released < 0.25


async def test_tenants_take_turns_at_equal_priority(make_state):
    """A tenant that queued three requests first does not get all three before another tenant's one."""
    state = await make_state(**ORDERLY)
    candidates = deployment()
    holder = await full(state, candidates)
    dispatcher = BalancedDispatcher(state)
    tasks: dict[asyncio.Task[Lease], str] = {}
    for n, tenant in enumerate(["A", "A", "A", "B"], start=1):
        tasks[waiter(dispatcher, candidates, demand(1000, tenant=tenant))] = f"{tenant}{n}"
        await until_depth(state, {1: n})
    served: list[str] = []
    await state.release(holder)
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, f"expected one grant at a time, got {len(done)}"
        task = done.pop()
        served.append(tasks[task])
        await state.release(task.result().grant)  # the next one's turn
    assert served == ["A1", "B4", "A2", "A3"]


async def test_a_queue_drains_at_the_speed_of_capacity_not_of_polling(make_state):
    """Each served head hands the turn to the next at once (no waiter sleeps out a backoff)."""
    state = await make_state()
    candidates = deployment()
    holder = await full(state, candidates)
    dispatcher = BalancedDispatcher(state)
    tasks = [waiter(dispatcher, candidates, demand(10, tenant=f"t{i}")) for i in range(12)]
    await until_depth(state, {1: 12})
    await asyncio.sleep(0.3)  # every waiter is now deep in its backoff (or asleep until woken)
    released = time.monotonic()
    await state.release(holder)
    leases = await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    assert [lease.grant.tokens for lease in leases] == [10] * 12
    # Polling behind the head would take ~poll_max (0.1 s) per hand-over: > 1 s for 12.
    assert time.monotonic() - released < 0.4
    assert await state.depth(MODEL) == {}


async def test_a_wait_longer_than_the_queue_timeout_is_refused_at_once(make_state):
    state = await make_state()
    candidates = deployment()
    await full(state, candidates)
    dispatcher = BalancedDispatcher(state)
    started = time.monotonic()
    with pytest.raises(NoCapacity) as caught:
        await dispatcher.acquire(candidates, demand(500, timeout=1.0), NOTHING)
    assert time.monotonic() - started < 0.1  # the hint (~6.1 s) says it cannot fit: no waiting
    assert caught.value.code == "rate_limit_exceeded"
    assert 6.02 < caught.value.retry_after < 6.12 + 0.306 + 0.01  # the minute + guard, to its bucket's end
    with pytest.raises(NoCapacity) as never:
        await dispatcher.acquire(candidates, demand(5000, timeout=1.0), NOTHING)
    assert never.value.code == "request_too_large"
    assert await state.depth(MODEL) == {}


async def test_a_waiter_gives_up_when_its_queue_timeout_runs_out(make_state):
    state = await make_state()
    candidates = deployment()  # room to spare, but a head that never takes its turn
    dispatcher = BalancedDispatcher(state)
    assert await state.enqueue(MODEL, "ahead", 0, "Z")
    started = time.monotonic()
    with pytest.raises(NoCapacity) as caught:
        await dispatcher.acquire(candidates, demand(10, timeout=0.4), NOTHING)
    assert 0.35 < time.monotonic() - started < 1.0
    assert caught.value.code == "rate_limit_exceeded"
    assert await state.depth(MODEL) == {0: 1}  # only the ticket ahead is left
    await state.leave(MODEL, "ahead")


async def test_a_full_queue_refuses_an_arrival_of_equal_priority(make_state):
    state = await make_state(queue_max_depth=1)
    candidates = deployment()
    await full(state, candidates)
    dispatcher = BalancedDispatcher(state)
    first = waiter(dispatcher, candidates, demand(10, priority=3))
    await until_depth(state, {3: 1})
    with pytest.raises(NoCapacity) as caught:
        await dispatcher.acquire(candidates, demand(10, priority=3, tenant="B"), NOTHING)
    assert caught.value.code == "queue_full" and caught.value.retry_after >= 1.0
    assert not first.done()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert await state.depth(MODEL) == {}


async def test_an_evicted_waiter_answers_queue_full_at_once(make_state):
    state = await make_state(queue_max_depth=1)
    candidates = deployment()
    await full(state, candidates)
    dispatcher = BalancedDispatcher(state)
    low = waiter(dispatcher, candidates, demand(10, priority=9, tenant="A"))
    await until_depth(state, {9: 1})
    started = time.monotonic()
    high = waiter(dispatcher, candidates, demand(10, priority=0, tenant="B"))
    with pytest.raises(NoCapacity) as caught:
        await asyncio.wait_for(low, 2.0)
    assert caught.value.code == "queue_full"  # not back in the queue, not waiting it out
    assert time.monotonic() - started < 0.25
    await asyncio.sleep(0.02)
    assert not high.done() and await state.depth(MODEL) == {0: 1}
    high.cancel()
    await asyncio.gather(high, return_exceptions=True)
    assert await state.depth(MODEL) == {}


async def test_a_cancelled_waiter_leaves_the_queue(make_state):
    state = await make_state()
    candidates = deployment()
    holder = await full(state, candidates)
    dispatcher = BalancedDispatcher(state)
    task = waiter(dispatcher, candidates, demand(500))
    await until_depth(state, {1: 1})
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await state.depth(MODEL) == {}
    await state.release(holder)
    # Nothing was reserved for the waiter that left: the whole window is free again.
    assert (await state.try_acquire(candidates, 1000)).tokens == 1000
