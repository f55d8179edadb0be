"""Quota refusals as the official OpenAI SDK sees them: ``RateLimitError`` with a message a person
understands; a spent budget is never retried, a rate limit is waited out."""

from __future__ import annotations

import time

import openai
import pytest

from tenants.models import Quota, Tenant
from tenants.services import IssuedKey, key_issue
from tests.e2e.servers import ThreadGateway
from tests.e2e.usage import wait_for_records

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def broke_key(exhausted_tenant: Tenant) -> IssuedKey:
    """A key of the team whose monthly budget is one token."""
    return key_issue(exhausted_tenant, name="broke-app")


def test_a_spent_budget_raises_rate_limit_error_that_the_sdk_does_not_retry(
    broke_key: IssuedKey, gateway: ThreadGateway, sim
):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=broke_key.secret)  # the default 2 retries
    client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=20)  # spends the budget

    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=20)

    assert time.monotonic() - started < 1.0  # no back-off: the SDK gave up at once
    error = refused.value
    assert (error.status_code, error.code, error.type) == (429, "insufficient_quota", "insufficient_quota")
    assert "You exceeded your current quota: the monthly token budget of team 'Team Broke' is 1 token" in str(error)
    assert "It resets at " in str(error)
    assert error.response.headers["x-should-retry"] == "false"
    assert sim.deployment_stats("chat-a")["served"] == 1
    records = wait_for_records(2)  # one for the answer, one for the refusal: no retries
    assert [(r.status, r.error_code) for r in records] == [(200, ""), (429, "insufficient_quota:tenant_monthly_tokens")]


@pytest.fixture
def one_request_per_two_seconds(settings, tenant_a: Tenant) -> None:
    """Tenant A at 1 RPM, over a "minute" of two seconds (set before the gateway starts)."""
    settings.GATEWAY = {**settings.GATEWAY, "QUOTA_WINDOW_SECONDS": 2.0}
    Quota.objects.filter(tenant=tenant_a, key__isnull=True).update(rpm=1, tpm=0, monthly_cost=0)


def test_a_rate_limit_raises_rate_limit_error_naming_the_limit_and_the_wait(
    one_request_per_two_seconds, gateway: ThreadGateway, key_a: IssuedKey
):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key_a.secret, max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=20)

    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=20)

    error = refused.value
    assert (error.code, error.type) == ("tenant_rate_limit_exceeded", "requests")
    assert "Rate limit reached for team 'Team A' on requests per minute (RPM): Limit 1, Used 1, Requested 1." in str(
        error
    )
    assert "Please try again in 2." in str(error) or "Please try again in 1." in str(error)


def test_the_sdk_waits_out_a_rate_limit_and_then_gets_its_answer(
    one_request_per_two_seconds, gateway: ThreadGateway, key_a: IssuedKey
):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key_a.secret)  # the default 2 retries
    client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=20)

    started = time.monotonic()
    completion = client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=20)

    assert completion.choices[0].message.content
    assert time.monotonic() - started >= 1.0  # it waited as retry-after-ms said
    records = wait_for_records(3)
    assert [r.status for r in records] == [200, 429, 200]
