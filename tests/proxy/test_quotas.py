"""Quotas on the request path, in-process: rate limits and budgets per team and per key, the
refusals the SDK sees, the rate-limit headers every answer carries, settlement and seeding.

Tenant A's quota in the cast: 600 RPM, 100,000 TPM, a monthly cost budget of 100; tenant B:
60 RPM, 10,000 TPM. "hi" as one chat message is 8 prompt tokens; the simulator answers 5
completion tokens; deployments allow 4,096 output tokens, so a request that names no
``max_tokens`` reserves 8 + 4,096 = 4,104 tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from billing.models import UsageRecord
from gateway.models import Deployment
from gateway.proxy.runtime import runtime
from tenants.models import Quota, Tenant
from tenants.services import IssuedKey, quota_counters_reset
from tests.fakes.simulator import InLoopSimulator
from tests.proxy.asgi_client import COMPLETION_TOKENS, GatewayHTTP

pytestmark = pytest.mark.django_db(transaction=True)

CHAT_PATH = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
PROMPT_TOKENS = 8
RESERVED = PROMPT_TOKENS + 4096  # no max_tokens: the deployments' max_output_tokens
USED = PROMPT_TOKENS + COMPLETION_TOKENS


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": HI, **fields}


def error_of(response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def set_tenant_quota(tenant: Tenant, **fields: Any) -> None:
    """Replace the tenant's quota with exactly these limits (the rest unlimited)."""
    limits = {"rpm": 0, "tpm": 0, "daily_tokens": 0, "monthly_tokens": 0, "monthly_cost": 0, **fields}
    Quota.objects.filter(tenant=tenant, key__isnull=True).update(**limits)


def ratelimit_headers(response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}


async def records(gateway_http: GatewayHTTP) -> list[UsageRecord]:
    return await gateway_http.usage_records()


# -- rate limits --------------------------------------------------------------------------------------


@pytest.fixture
def team_a_at_2_rpm(tenant_a: Tenant) -> None:
    set_tenant_quota(tenant_a, rpm=2)


async def test_a_team_over_its_rpm_is_refused_with_its_code_and_when_to_retry(
    team_a_at_2_rpm, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    answers = [await gateway_http.post(CHAT_PATH, chat()) for _ in range(3)]

    assert [a.status_code for a in answers] == [200, 200, 429]
    refused = answers[2]
    error = error_of(refused)
    assert (error["type"], error["code"]) == ("requests", "tenant_rate_limit_exceeded")
    assert "team 'Team A' on requests per minute (RPM): Limit 2, Used 2" in error["message"]
    assert 50 <= int(refused.headers["retry-after"]) <= 60
    assert 50_000 <= int(refused.headers["retry-after-ms"]) <= 60_000
    assert "x-should-retry" not in refused.headers
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(recording_sim.calls) == 2
    rows = await records(gateway_http)
    assert [(r.status, r.outcome, r.error_code, r.prompt_tokens, r.cost) for r in rows][-1] == (
        429,
        "rate_limited",
        "tenant_rate_limit_exceeded:tenant_rpm",
        0,  # nothing was served
        0,
    )
    assert len(rows) == 3


async def test_another_team_on_the_same_deployment_is_not_held_back_by_it(
    team_a_at_2_rpm, gateway_http: GatewayHTTP, key_b: IssuedKey
):
    for _ in range(2):
        await gateway_http.post(CHAT_PATH, chat())
    refused = await gateway_http.post(CHAT_PATH, chat())

    other_team = await gateway_http.with_key(key_b.secret).post(CHAT_PATH, chat())

    assert (refused.status_code, other_team.status_code) == (429, 200)


@pytest.fixture
def key_a_at_1_rpm(key_a: IssuedKey) -> None:
    Quota.objects.create(tenant=key_a.key.tenant, key=key_a.key, rpm=1)


async def test_a_key_over_its_own_rpm_is_refused_as_the_keys_limit(key_a_at_1_rpm, gateway_http: GatewayHTTP):
    first = await gateway_http.post(CHAT_PATH, chat())
    second = await gateway_http.post(CHAT_PATH, chat())

    assert (first.status_code, second.status_code) == (200, 429)
    error = error_of(second)
    assert error["code"] == "key_rate_limit_exceeded"
    assert "key 'app-a' of team 'Team A'" in error["message"]


async def test_a_request_larger_than_the_team_tpm_is_refused_without_a_retry(
    tenant_a: Tenant, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    await sync_to_async(set_tenant_quota)(tenant_a, tpm=50)

    response = await gateway_http.post(CHAT_PATH, chat(max_tokens=100))

    assert response.status_code == 429
    error = error_of(response)
    assert (error["type"], error["code"]) == ("tokens", "tenant_rate_limit_exceeded")
    assert "Request too large for team 'Team A' on tokens per minute (TPM): Limit 50, Requested 108" in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert "retry-after" not in response.headers
    assert recording_sim.calls == []


# -- budgets ------------------------------------------------------------------------------------------


@pytest.fixture
def broke_key(exhausted_tenant: Tenant) -> IssuedKey:
    from tenants.services import key_issue

    return key_issue(exhausted_tenant, name="broke-app")


async def test_a_spent_budget_is_refused_as_insufficient_quota_naming_the_budget_and_its_reset(
    broke_key: IssuedKey, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    client = gateway_http.with_key(broke_key.secret)

    first = await client.post(CHAT_PATH, chat())  # nothing spent yet: admitted, and spends it all
    await runtime.quotas.drain()  # on Redis, settlements are sent just after the answer
    second = await client.post(CHAT_PATH, chat())

    assert (first.status_code, second.status_code) == (200, 429)
    error = error_of(second)
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    now = datetime.now(UTC)
    next_month = f"{now.year + now.month // 12}-{now.month % 12 + 1:02d}-01 00:00 (UTC)"
    assert error["message"] == (
        "You exceeded your current quota: the monthly token budget of team 'Team Broke' is 1 token and is "
        f"used up ({USED} tokens used). It resets at {next_month}."
    )
    assert second.headers["x-should-retry"] == "false"
    assert "retry-after" not in second.headers and "retry-after-ms" not in second.headers
    assert len(recording_sim.calls) == 1
    rows = await records(gateway_http)
    assert [(r.status, r.error_code) for r in rows] == [
        (200, ""),
        (429, "insufficient_quota:tenant_monthly_tokens"),
    ]


async def test_requests_in_flight_hold_the_most_they_can_use_against_the_budget(
    tenant_a: Tenant, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    await sync_to_async(set_tenant_quota)(tenant_a, daily_tokens=5_000)
    for deployment in recording_sim.state.deployments.values():
        deployment.update(dataclasses.replace(deployment.config, latency_ms=300))

    # 0 and 4,104 held are below 5,000; 8,208 is not.
    answers = await asyncio.gather(*(gateway_http.post(CHAT_PATH, chat()) for _ in range(3)))
    await runtime.quotas.drain()
    later = await gateway_http.post(CHAT_PATH, chat())  # 26 used once they settled

    assert sorted(a.status_code for a in answers) == [200, 200, 429]
    (refused,) = [a for a in answers if a.status_code == 429]
    assert "daily token budget of team 'Team A' is 5,000 tokens" in error_of(refused)["message"]
    assert f"(0 tokens used, {2 * RESERVED:,} tokens reserved by requests in progress)" in error_of(refused)["message"]
    assert later.status_code == 200


@pytest.fixture
def team_a_spent_its_month(tenant_a: Tenant, key_a: IssuedKey) -> None:
    """Usage records of this month that add up to tenant A's whole cost budget (100)."""
    now = datetime.now(UTC)
    for i in range(4):
        UsageRecord.objects.create(
            request_id=f"earlier-{i}",
            tenant=tenant_a,
            key=key_a.key,
            model="gpt-4o",
            route="chat.completions",
            status=200,
            outcome="ok",
            prompt_tokens=1000,
            completion_tokens=100,
            cost=Decimal("25"),
            started_at=now.replace(day=1, hour=0, minute=0, second=1),
        )


async def test_budget_counters_start_from_the_usage_records(team_a_spent_its_month, gateway_http: GatewayHTTP):
    response = await gateway_http.post(CHAT_PATH, chat())

    assert response.status_code == 429
    assert (
        "monthly cost budget of team 'Team A' is 100.00 and is used up (100.00 used)" in error_of(response)["message"]
    )


async def test_resetting_the_month_lets_the_team_spend_again(team_a_spent_its_month, gateway_http: GatewayHTTP):
    refused = await gateway_http.post(CHAT_PATH, chat())
    quota = await Quota.objects.aget(tenant__slug="team-a", key__isnull=True)

    await sync_to_async(quota_counters_reset)(quota, "month")
    assert runtime.refresher is not None
    await runtime.refresher.load_now()
    again = await gateway_http.post(CHAT_PATH, chat())

    assert (refused.status_code, again.status_code) == (429, 200)


# -- headers, settlement, release -----------------------------------------------------------------


@pytest.fixture
def key_a_at_5_rpm(key_a: IssuedKey) -> None:
    Quota.objects.create(tenant=key_a.key.tenant, key=key_a.key, rpm=5)


@pytest.mark.parametrize("stream", [False, True])
async def test_every_answer_carries_the_callers_tightest_limits_not_the_upstreams(
    key_a_at_5_rpm, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, stream: bool
):
    for deployment in recording_sim.state.deployments.values():  # the upstream reports its own limits
        deployment.update(dataclasses.replace(deployment.config, rpm=1000, tpm=1_000_000))

    response = await gateway_http.post(CHAT_PATH, chat(stream=stream))

    assert response.status_code == 200
    headers = ratelimit_headers(response)
    assert headers.keys() == {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    }
    # Requests: the key's 5 RPM is tighter than the team's 600; tokens: the team's 100,000 TPM.
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("5", "4")
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == (
        "100000",
        str(100_000 - RESERVED),
    )
    assert re.fullmatch(r"1m0(\.\d+)?s|59(\.\d+)?s|1m1s", headers["x-ratelimit-reset-requests"])


async def test_a_team_without_rate_limits_gets_no_ratelimit_headers_even_when_the_upstream_sends_them(
    tenant_a: Tenant, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    await sync_to_async(set_tenant_quota)(tenant_a, monthly_tokens=1_000_000)
    for deployment in recording_sim.state.deployments.values():
        deployment.update(dataclasses.replace(deployment.config, rpm=1000, tpm=1_000_000))

    response = await gateway_http.post(CHAT_PATH, chat())

    assert response.status_code == 200
    assert ratelimit_headers(response) == {}


async def test_settling_replaces_the_reservation_with_what_the_request_used(gateway_http: GatewayHTTP):
    await gateway_http.post(CHAT_PATH, chat())
    await runtime.quotas.drain()
    second = await gateway_http.post(CHAT_PATH, chat())

    assert second.headers["x-ratelimit-remaining-tokens"] == str(100_000 - USED - RESERVED)
    assert second.headers["x-ratelimit-remaining-requests"] == "598"


async def test_a_request_the_balancer_refuses_gives_its_place_back(
    tenant_a: Tenant, gateway_http: GatewayHTTP, ptu_deployment: Deployment, standard_deployment: Deployment
):
    await sync_to_async(set_tenant_quota)(tenant_a, rpm=1)
    await Deployment.objects.filter(pk__in=[ptu_deployment.pk, standard_deployment.pk]).aupdate(tpm=1_000)

    too_large = await gateway_http.post(CHAT_PATH, chat(max_tokens=2_000))  # no deployment's minute holds it
    await runtime.quotas.drain()
    fits = await gateway_http.post(CHAT_PATH, chat(max_tokens=5))

    assert (too_large.status_code, error_of(too_large)["code"]) == (429, "request_too_large")
    assert fits.status_code == 200


# -- reconciliation and faults --------------------------------------------------------------------


async def test_reconciling_raises_the_counters_to_usage_recorded_elsewhere(
    tenant_a: Tenant, key_a: IssuedKey, gateway_http: GatewayHTTP
):
    await sync_to_async(set_tenant_quota)(tenant_a, monthly_tokens=1_000)
    first = await gateway_http.post(CHAT_PATH, chat(max_tokens=5))  # seeds the counters: 13 used
    await runtime.quotas.drain()
    # Another gateway (its own in-process state) served this team too; its records are stored.
    await UsageRecord.objects.acreate(
        request_id="elsewhere-1",
        tenant=tenant_a,
        key=key_a.key,
        model="gpt-4o",
        route="chat.completions",
        status=200,
        outcome="ok",
        prompt_tokens=900,
        completion_tokens=100,
        started_at=datetime.now(UTC),
    )

    await records(gateway_http)  # this gateway's own record written out too

    raised = await runtime.quotas.upkeep.reconcile_once()
    refused = await gateway_http.post(CHAT_PATH, chat(max_tokens=5))

    assert (first.status_code, raised, refused.status_code) == (200, 2, 429)  # today's and this month's
    assert "(1,013 tokens used)" in error_of(refused)["message"]


async def test_a_quota_state_that_cannot_answer_is_a_503_the_sdk_retries(gateway_http: GatewayHTTP, monkeypatch):
    await gateway_http.post(CHAT_PATH, chat())  # the runtime is up

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(runtime.quotas, "synchronous", False)
    monkeypatch.setattr(runtime.quotas.state, "admit", unreachable)
    monkeypatch.setattr(runtime.quotas.state, "admit_carrying", unreachable, raising=False)
    response = await gateway_http.post(CHAT_PATH, chat())

    assert response.status_code == 503
    error = error_of(response)
    assert (error["type"], error["code"]) == ("api_error", "quota_state_unavailable")
    assert response.headers["retry-after"] == "1"
    rows = await records(gateway_http)
    assert (rows[-1].status, rows[-1].error_code) == (503, "quota_state_unavailable")
