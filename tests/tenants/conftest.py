"""Fixtures for the quota state suite: every test runs against both backends.

``make_quota_state`` builds a state with a short window (6 s: buckets of 0.1 s); the Redis one
gets a unique key prefix and is wiped afterwards. Redis comes from ``BALANCER_TEST_REDIS_URL``
(default: the local server); the Redis cases are skipped, loudly, when it is unreachable.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis

from tenants.quota_state import QuotaState, QuotaStateConfig
from tenants.quota_state import make_quota_state as build

REDIS_URL = os.environ.get("BALANCER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def quota_redis_url() -> str:
    if not _redis_up():
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_quota_state(request: Any) -> AsyncIterator[Callable[..., Awaitable[QuotaState]]]:
    """``await make_quota_state(**config)`` -> a fresh QuotaState of the parametrized backend
    (``cluster``: on a local three-node Redis Cluster, ``tests/redis_cluster.py``)."""
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("quota_redis_url")
    elif request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    created: list[QuotaState] = []

    async def factory(**config: Any) -> QuotaState:
        config.setdefault("window", 6.0)
        # A generous wait for Redis (see tests/balancer/conftest.py's make_state).
        state = build(url, QuotaStateConfig(**config), prefix=f"test-quota-{uuid.uuid4().hex[:12]}", timeout=5.0)
        created.append(state)
        return state

    factory.backend = request.param  # type: ignore[attr-defined]
    yield factory
    for state in created:
        await state.reset_all()
        await state.aclose()
