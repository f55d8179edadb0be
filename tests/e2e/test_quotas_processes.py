"""Quotas across two gateway processes sharing a Redis of the test's own: budgets hold under
concurrency, rate limits hold with the load split across processes, counters survive restarts
of the processes and of Redis, and alerts go out once.

Each gateway is an OS process (uvicorn) on the test database; the upstream is a simulator
subprocess answering 5 completion tokens after 200 ms. "hi" is 8 prompt tokens, so a request
with ``max_tokens`` 20 reserves 28 tokens and uses 13.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from billing.models import UsageRecord
from tenants.alerts import webhook_signature
from tenants.models import AlertEvent, Quota, Tenant
from tenants.quota_state import TENANT, ScopeLimits
from tenants.quotas import PeriodClock
from tenants.selectors import quota_use_read
from tenants.services import key_issue
from tests.e2e.balancing import chat_body
from tests.e2e.servers import ProcessGateway, RedisServer
from tests.e2e.usage import wait_for_records
from tests.fakes.webhook import WebhookReceiver

pytestmark = pytest.mark.django_db(transaction=True)

USED = 8 + 5  # what each request uses
RESERVED = 8 + 20  # what each request reserves (max_tokens 20)


@pytest.fixture
def upstream(start_sim, deploy) -> None:
    sim = start_sim([{"name": "quota-dep", "latency_ms": 200}])
    deploy(sim, [{"name": "quota-dep"}])


@pytest.fixture
def quota_redis(request) -> str:
    """The gateways' Redis URL: a private redis-server, or (``indirect`` param ``"cluster"``) the
    local three-node Redis Cluster (``tests/redis_cluster.py``)."""
    if getattr(request, "param", "redis") == "cluster":
        return request.getfixturevalue("redis_cluster").url
    return request.getfixturevalue("private_redis").url


ON_BOTH = pytest.mark.parametrize("quota_redis", ["redis", "cluster"], indirect=True)


@pytest.fixture
def gateways(
    upstream, quota_redis: str, balancer_prefix: str, start_process_gateway, tmp_path: Path
) -> Callable[..., list[ProcessGateway]]:
    """``gateways(n=2)`` -> n gateway processes on ``quota_redis`` (e-mail into files, Celery eager)."""

    def start(n: int = 2) -> list[ProcessGateway]:
        env = {
            "REDIS_URL": quota_redis,
            "GATEWAY_BALANCER_REDIS_PREFIX": balancer_prefix,
            "GATEWAY_SNAPSHOT_POLL_SECONDS": "0.05",
            "GATEWAY_USAGE_FLUSH_SECONDS": "0.05",
            "CELERY_TASK_ALWAYS_EAGER": "true",
            "EMAIL_URL": f"filemail:///{tmp_path / 'mail'}",  # django-environ drops one leading /
            "LOG_LEVEL": "WARNING",
        }
        return [start_process_gateway(env) for _ in range(n)]

    return start


def team(slug: str, **quota: Any) -> tuple[Tenant, str]:
    tenant = Tenant.objects.create(slug=slug, name=slug.replace("-", " ").title())
    Quota.objects.create(tenant=tenant, **quota)
    return tenant, key_issue(tenant, name=f"{slug}-app").secret


def fire(shots: list[tuple[ProcessGateway, str, dict]]) -> list[httpx.Response]:
    """Send every request at once, each to its gateway, and wait for all the answers."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            return await asyncio.gather(
                *(
                    http.post(g.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"})
                    for g, secret, body in shots
                )
            )

    return asyncio.run(run())


def counters(tenant: Tenant, settings, redis_url: str, prefix: str, **limits: int):
    """The tenant's counters in the gateways' Redis, as the admin reads them."""
    settings.REDIS_URL = redis_url
    settings.GATEWAY = {**settings.GATEWAY, "BALANCER_REDIS_PREFIX": prefix}
    periods = PeriodClock("UTC").at(time.time())
    (use,) = quota_use_read([ScopeLimits(TENANT, tenant.pk, tenant.pk, **limits)], periods)
    return use


def tokens_recorded(tenant: Tenant) -> int:
    return sum(r.prompt_tokens + r.completion_tokens for r in UsageRecord.objects.filter(tenant=tenant))


@ON_BOTH
def test_fifty_concurrent_requests_overrun_a_budget_by_at_most_one_reservation(
    gateways, quota_redis, balancer_prefix, settings
):
    tenant, secret = team("tight-budget", monthly_tokens=100)
    first, second = gateways()

    answers = fire([(first if i % 2 else second, secret, chat_body(20)) for i in range(50)])

    admitted = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(admitted) >= 100 // RESERVED  # at least what fits when all are in flight at once
    assert {(a.status_code, a.json()["error"]["code"]) for a in refused} == {(429, "insufficient_quota")}
    wait_for_records(50)
    spent = tokens_recorded(tenant)
    assert spent == USED * len(admitted) <= 100 + RESERVED
    use = counters(tenant, settings, quota_redis, balancer_prefix, monthly_tokens=100)
    assert (use.month_tokens, use.held_tokens) == (spent, 0)  # the records agree with the counters
    assert set(UsageRecord.objects.filter(status=429).values_list("error_code", flat=True)) == {
        "insufficient_quota:tenant_monthly_tokens"
    }


@ON_BOTH
def test_a_team_over_its_rpm_is_refused_while_another_on_the_same_deployment_is_not(gateways):
    _, limited = team("ten-rpm", rpm=10)
    _, other = team("other-team", rpm=1_000)
    first, second = gateways()

    shots = [(first if i % 2 else second, limited, chat_body(20)) for i in range(30)]
    shots += [(second if i % 2 else first, other, chat_body(20)) for i in range(20)]
    answers = fire(shots)

    limited_answers, other_answers = answers[:30], answers[30:]
    assert sum(a.status_code == 200 for a in limited_answers) == 10  # across both processes
    for refusal in (a for a in limited_answers if a.status_code != 200):
        assert (refusal.status_code, refusal.json()["error"]["code"]) == (429, "tenant_rate_limit_exceeded")
        assert 1 <= int(refusal.headers["retry-after"]) <= 60 and int(refusal.headers["retry-after-ms"]) > 0
        assert refusal.headers["x-ratelimit-remaining-requests"] == "0"
    assert [a.status_code for a in other_answers] == [200] * 20


def test_a_spent_budget_stays_spent_across_restarts_of_both_processes_and_of_redis(
    gateways, private_redis: RedisServer, balancer_prefix, settings
):
    tenant, secret = team("spent-budget", monthly_tokens=30)
    first, second = gateways()
    statuses = []
    for g in (first, second, first, second):
        statuses.append(fire([(g, secret, chat_body(20))])[0].status_code)
        time.sleep(0.05)  # settling follows the answer by a round trip to Redis
    assert statuses == [200, 200, 200, 429]  # 0, 13, 26 < 30; 39 is not
    for g in (first, second):
        g.stop()  # a graceful stop writes out the usage buffer
    wait_for_records(4)

    first, second = gateways()  # Redis kept the counters
    assert [fire([(g, secret, chat_body(20))])[0].status_code for g in (first, second)] == [429, 429]
    for g in (first, second):
        g.stop()
    private_redis.restart()  # an empty Redis: the counters are rebuilt from the usage records

    first, second = gateways()
    answers = fire([(first, secret, chat_body(20)), (second, secret, chat_body(20))])

    assert [a.status_code for a in answers] == [429, 429]
    assert "is 30 tokens and is used up (39 tokens used)" in answers[0].json()["error"]["message"]
    use = counters(tenant, settings, private_redis.url, balancer_prefix, monthly_tokens=30)
    assert use.month_tokens == 39 == tokens_recorded(tenant)


def test_a_budget_alert_goes_out_once_per_threshold_across_processes_and_restarts(gateways, tmp_path: Path, request):
    receiver = WebhookReceiver()
    request.addfinalizer(receiver.stop)
    tenant, secret = team("alerted", monthly_tokens=100, alert_thresholds=[50, 100])
    Tenant.objects.filter(pk=tenant.pk).update(
        alert_emails=["ops@alerted.example"], alert_webhook_url=receiver.url, alert_webhook_secret="whsec-e2e"
    )
    first, second = gateways()

    # Both processes settle requests past 50 % and 100 % at about the same time.
    fire([(first if i % 2 else second, secret, chat_body(5)) for i in range(16)])
    deadline = time.monotonic() + 10
    while len(receiver.deliveries) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a duplicate would arrive meanwhile

    mails = sorted((tmp_path / "mail").iterdir())
    subjects = sorted(line for m in mails for line in m.read_text().splitlines() if line.startswith("Subject:"))
    assert subjects == [
        "Subject: [LLM gateway] team 'Alerted': monthly token budget at 100%",
        "Subject: [LLM gateway] team 'Alerted': monthly token budget at 50%",
    ]
    assert sorted(d.payload["threshold"] for d in receiver.deliveries) == [50, 100]
    for delivery in receiver.deliveries:
        stamp = delivery.headers["x-gateway-timestamp"]
        assert delivery.headers["x-gateway-signature"] == webhook_signature("whsec-e2e", stamp, delivery.body)

    # Restarted, with the budget raised so that settling crosses both thresholds again this month.
    for g in (first, second):
        g.stop()
    quota = Quota.objects.get(tenant=tenant)
    quota.monthly_tokens = 200
    quota.save()
    first, second = gateways()
    answers = fire([(first, secret, chat_body(5)), (second, secret, chat_body(5))])
    time.sleep(1.0)

    assert [a.status_code for a in answers] == [200, 200]
    assert len(list((tmp_path / "mail").iterdir())) == len(mails) and len(receiver.deliveries) == 2
    assert AlertEvent.objects.filter(tenant=tenant).count() == 2
    assert AlertEvent.objects.get(tenant=tenant, threshold=100).used >= Decimal(100)
