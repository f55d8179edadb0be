"""What the admin reads as a scope's use: the counters admission uses, from Redis or from the
gateway running in this process, and the usage records when neither is there."""

from __future__ import annotations

import time
import uuid
from zoneinfo import ZoneInfo

import pytest
from asgiref.sync import sync_to_async

from tenants.quota_state import TENANT, Admitted, Ask, QuotaStateConfig, ScopeLimits, Seed
from tenants.quota_state.memory import MemoryQuotaState
from tenants.quota_state.redis import RedisQuotaState
from tenants.quotas import periods_at
from tenants.selectors import quota_use_read

SCOPE = ScopeLimits(TENANT, 7, 7, rpm=60, monthly_tokens=1_000)


async def spend(state, tokens: int, periods) -> None:
    result = await state.admit(Ask((SCOPE,), 500, 0, periods.ids, {SCOPE.ref: Seed(0, 100, 0)}))
    assert isinstance(result, Admitted)
    await state.settle(result.reservation, tokens, 0, dispatched=True)


async def test_the_admin_reads_the_gateway_state_of_its_own_process(settings):
    settings.REDIS_URL = None
    periods = periods_at(time.time(), ZoneInfo("UTC"))
    state = MemoryQuotaState(QuotaStateConfig(window=settings.GATEWAY["QUOTA_WINDOW_SECONDS"]))
    state.serve_locally()
    try:
        await spend(state, 40, periods)
        (use,) = await sync_to_async(quota_use_read)([SCOPE], periods)
    finally:
        state.serve_locally(False)

    assert (use.requests, use.tokens, use.month_tokens, use.seeded) == (1, 40, 140, True)


async def test_the_admin_reads_the_counters_in_redis(settings, quota_redis_url: str):
    prefix = f"test-quota-use-{uuid.uuid4().hex[:8]}"
    settings.REDIS_URL = quota_redis_url
    settings.GATEWAY = {**settings.GATEWAY, "BALANCER_REDIS_PREFIX": prefix}
    periods = periods_at(time.time(), ZoneInfo("UTC"))
    state = RedisQuotaState.from_url(
        quota_redis_url, QuotaStateConfig(window=settings.GATEWAY["QUOTA_WINDOW_SECONDS"]), prefix=prefix
    )
    try:
        await spend(state, 40, periods)
        (use,) = quota_use_read([SCOPE], periods)  # no database: Redis only
    finally:
        await state.reset_all()
        await state.aclose()

    assert (use.requests, use.tokens, use.month_tokens, use.held_tokens, use.seeded) == (1, 40, 140, 0, True)


@pytest.mark.django_db
def test_without_a_gateway_here_the_admin_reads_the_usage_records(settings, tenant_a, key_a):
    from tests.admin.test_admin_pages import usage_record

    settings.REDIS_URL = None
    usage_record(1, tenant=tenant_a, key=key_a.key, prompt_tokens=30, completion_tokens=12)
    scope = ScopeLimits(TENANT, tenant_a.pk, tenant_a.pk, rpm=60, monthly_tokens=1_000)

    (use,) = quota_use_read([scope], periods_at(time.time(), ZoneInfo("UTC")))

    assert (use.requests, use.tokens, use.month_tokens) == (1, 42, 42)


@pytest.mark.django_db
def test_an_unreachable_redis_cluster_falls_back_to_the_usage_records(settings, tenant_a, key_a):
    """redis-py's cluster client raises RedisClusterException (not a RedisError) when no node
    answers: the admin shows the records, and a configuration change is still saved."""
    from gateway.snapshot.version import _mirror_to_redis
    from tests.admin.test_admin_pages import usage_record
    from tests.e2e.servers import free_port

    settings.REDIS_URL = f"redis+cluster://127.0.0.1:{free_port()}"
    usage_record(1, tenant=tenant_a, key=key_a.key, prompt_tokens=30, completion_tokens=12)
    scope = ScopeLimits(TENANT, tenant_a.pk, tenant_a.pk, rpm=60, monthly_tokens=1_000)

    (use,) = quota_use_read([scope], periods_at(time.time(), ZoneInfo("UTC")))
    _mirror_to_redis(5)  # logged, not raised

    assert (use.requests, use.tokens, use.month_tokens) == (1, 42, 42)
