"""Budget alerts from the request path, in-process: settling a request that takes a budget past
a threshold records one alert per threshold and period, sent by e-mail (Django's in-memory
backend) and to a webhook that checks the signature, and never again after a restart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async

from gateway.proxy.runtime import runtime
from tenants.alerts import webhook_signature
from tenants.models import AlertEvent, Quota, Tenant
from tests.fakes.webhook import WebhookReceiver
from tests.proxy.asgi_client import GatewayHTTP

pytestmark = pytest.mark.django_db(transaction=True)

CHAT_PATH = "/v1/chat/completions"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}  # 8 + 5 = 13 tokens used
SECRET = "whsec-team-a"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.stop()


@pytest.fixture
def celery_eager() -> Iterator[None]:
    from gateway.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


@pytest.fixture
def team_a_alerted_at_50_and_100(tenant_a: Tenant, receiver: WebhookReceiver) -> None:
    """Tenant A: a monthly budget of 40 tokens, alerts at 50 % and 100 % to two people and a webhook."""
    Tenant.objects.filter(pk=tenant_a.pk).update(
        alert_emails=["ops@team-a.example", "lead@team-a.example"],
        alert_webhook_url=receiver.url,
        alert_webhook_secret=SECRET,
    )
    Quota.objects.filter(tenant=tenant_a, key__isnull=True).update(
        rpm=0, tpm=0, monthly_cost=0, monthly_tokens=40, alert_thresholds=[50, 100]
    )


async def send(gateway_http: GatewayHTTP, times: int) -> list[int]:
    """One request after the other, each settled before the next (on Redis settling follows the answer)."""
    statuses = []
    for _ in range(times):
        statuses.append((await gateway_http.post(CHAT_PATH, CHAT)).status_code)
        await runtime.quotas.drain()
    return statuses


async def test_a_budget_alerts_once_per_threshold_and_period_even_after_a_restart(
    team_a_alerted_at_50_and_100, celery_eager, gateway_http: GatewayHTTP, receiver: WebhookReceiver, mailoutbox
):
    # 13, 26 (65 %: the 50 % alert), 39, 52 (130 %: the 100 % alert), then refused.
    statuses = await send(gateway_http, 5)
    await runtime.quotas.drain()

    assert statuses == [200, 200, 200, 200, 429]
    assert [m.subject for m in mailoutbox] == [
        "[LLM gateway] team 'Team A': monthly token budget at 50%",
        "[LLM gateway] team 'Team A': monthly token budget at 100%",
    ]
    assert mailoutbox[0].to == ["ops@team-a.example", "lead@team-a.example"]
    assert [d.payload["threshold"] for d in receiver.deliveries] == [50, 100]
    for delivery in receiver.deliveries:
        stamp = delivery.headers["x-gateway-timestamp"]
        assert delivery.headers["x-gateway-signature"] == webhook_signature(SECRET, stamp, delivery.body)
    assert receiver.deliveries[0].payload["used"] == "26.00000000"

    # A restart forgets what the process handed off; with the budget raised to 60 the next
    # request reaches both thresholds again, in the same period: nothing is sent twice.
    await runtime.shutdown()
    quota = await Quota.objects.aget(tenant__slug="team-a", key__isnull=True)
    quota.monthly_tokens = 60
    await quota.asave()  # a save (not an update) moves the configuration version
    after_restart = await send(gateway_http, 2)
    await runtime.quotas.drain()

    assert after_restart == [200, 429]  # 52 used < 60, then 65
    assert len(mailoutbox) == 2 and len(receiver.deliveries) == 2
    assert await sync_to_async(AlertEvent.objects.count)() == 2
