"""The Redis state under faults: every call fails within its timeout, fails at once for a moment
after, and works again by itself when Redis does. Against a redis-server of the test's own."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from gateway.balancer import Candidate, Grant, StateUnavailable
from gateway.balancer.contract import make_state
from gateway.balancer.redis_state import UNAVAILABLE_HOLD_SECONDS
from tests.e2e.servers import RedisServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]

TIMEOUT = 0.3
DEPLOYMENT = Candidate(id=1, rpm=600, tpm=100_000)


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


async def timed_acquire(state) -> tuple[object, float]:
    started = time.monotonic()
    try:
        result = await state.try_acquire([DEPLOYMENT], 100)
    except StateUnavailable as exc:
        result = exc
    return result, time.monotonic() - started


async def test_a_paused_redis_fails_calls_within_the_timeout_then_at_once_and_recovers(redis_server):
    state = make_state(redis_server.url, minute=60.0, prefix="faults", redis_timeout=TIMEOUT)
    try:
        assert isinstance((await timed_acquire(state))[0], Grant)
        redis_server.pause()
        first, waited = await timed_acquire(state)
        assert isinstance(first, StateUnavailable) and TIMEOUT * 0.9 <= waited < TIMEOUT + 0.2
        assert first.retry_after >= 1.0 and not state.available
        held, waited = await timed_acquire(state)  # within the hold: no second wait on Redis
        assert isinstance(held, StateUnavailable) and waited < 0.05
        redis_server.resume()
        await asyncio.sleep(UNAVAILABLE_HOLD_SECONDS)
        recovered, _ = await timed_acquire(state)
        assert isinstance(recovered, Grant) and state.available
    finally:
        redis_server.resume()
        await state.aclose()


async def test_a_restarted_redis_is_used_again_without_a_new_client(redis_server):
    state = make_state(redis_server.url, minute=60.0, prefix="faults", redis_timeout=TIMEOUT)
    try:
        assert isinstance((await timed_acquire(state))[0], Grant)
        redis_server.kill()
        gone, waited = await timed_acquire(state)
        assert isinstance(gone, StateUnavailable) and waited < TIMEOUT
        redis_server.start()  # same port, empty; the pooled connection is dead
        await asyncio.sleep(UNAVAILABLE_HOLD_SECONDS)
        back, _ = await timed_acquire(state)
        assert isinstance(back, Grant)
    finally:
        await state.aclose()
