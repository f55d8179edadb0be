"""Fixtures for the balancer state suite: every test runs against both backends.

``make_state`` builds a state with the test's knobs; the Redis one gets a unique key prefix
and is wiped afterwards. Redis comes from ``BALANCER_TEST_REDIS_URL`` (default: the local
server); the Redis cases are skipped, loudly, when it is unreachable.
"""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from gateway.balancer import make_state as build
from gateway.balancer.contract import BalancerState

REDIS_URL = os.environ.get("BALANCER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
T0 = 1_000_000.0  # fake clock origin: most tests pass explicit times


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _redis_up():
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_state(request):
    """``await make_state(**knobs)`` -> a fresh BalancerState of the parametrized backend.

    ``cluster``: the Redis backend on a local three-node Redis Cluster (``tests/redis_cluster.py``),
    where a script whose keys span two slots fails. Defaults: a 6-second minute (windows 0.1 s,
    1 s, 6 s) and a 10 ms guard floor.
    """
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    elif request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    created: list[BalancerState] = []

    async def factory(**knobs) -> BalancerState:
        knobs.setdefault("minute", 6.0)
        knobs.setdefault("guard_min", 0.01)
        prefix = f"test-balancer-{uuid.uuid4().hex[:12]}"
        # A generous wait for Redis: these tests are about what the state does; on a busy CI
        # machine running six cluster nodes a loopback connect took over the 0.5 s default.
        knobs.setdefault("redis_timeout", 5.0)
        state = build(url, prefix=prefix, **knobs)
        created.append(state)
        return state

    factory.backend = request.param
    yield factory
    for state in created:
        await state.reset()
        await state.aclose()
