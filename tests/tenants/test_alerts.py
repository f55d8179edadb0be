"""Budget alerts: recorded once, delivered by e-mail and a signed webhook, retried until delivered."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from tenants.alerts import AlertDeliveryFailed, AlertNotice, alert_deliver, alert_raise, webhook_signature
from tenants.models import AlertEvent, Tenant
from tests.fakes.webhook import WebhookReceiver

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    yield hook
    hook.stop()


@pytest.fixture
def celery_eager() -> Iterator[None]:
    """Run Celery tasks in process, as the embedded default does (also when REDIS_URL is set)."""
    from gateway.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


@pytest.fixture
def team_a_contacts(tenant_a: Tenant, receiver: WebhookReceiver) -> Tenant:
    tenant_a.alert_emails = ["ops@team-a.example"]
    tenant_a.alert_webhook_url = receiver.url
    tenant_a.alert_webhook_secret = "whsec-team-a"
    tenant_a.save()
    return tenant_a


def notice(tenant: Tenant, threshold: int = 80) -> AlertNotice:
    return AlertNotice(
        tenant_id=tenant.pk,
        key_id=None,
        budget="monthly_cost",
        threshold=threshold,
        period_start=date(2025, 6, 1),
        period_end=datetime(2025, 7, 1, tzinfo=UTC),
        used=Decimal("81.25"),
        limit=Decimal("100"),
    )


def test_the_webhook_signature_is_the_hmac_of_timestamp_and_body():
    body = b'{"type":"budget.threshold_reached"}'

    signature = webhook_signature("s3cret", "1750000000", body)

    expected = hmac.new(b"s3cret", b"1750000000." + body, hashlib.sha256).hexdigest()
    assert signature == f"sha256={expected}"


def test_an_alert_is_recorded_and_sent_once_however_often_it_is_raised(
    team_a_contacts: Tenant, receiver: WebhookReceiver, celery_eager, mailoutbox
):
    first = alert_raise(notice(team_a_contacts))
    again = alert_raise(notice(team_a_contacts))

    assert first is not None and again is None
    assert AlertEvent.objects.count() == 1
    (mail,) = mailoutbox
    assert mail.to == ["ops@team-a.example"]
    assert mail.subject == "[LLM gateway] team 'Team A': monthly cost budget at 80%"
    assert "Used:   81.25" in mail.body and "Budget: 100.00" in mail.body
    (delivery,) = receiver.deliveries
    stamp = delivery.headers["x-gateway-timestamp"]
    assert delivery.headers["x-gateway-signature"] == webhook_signature("whsec-team-a", stamp, delivery.body)
    assert delivery.payload["tenant"] == "team-a"
    assert (delivery.payload["budget"], delivery.payload["threshold"]) == ("monthly_cost", 80)


def test_a_failed_channel_is_retried_without_repeating_the_one_that_worked(
    team_a_contacts: Tenant, receiver: WebhookReceiver, mailoutbox
):
    event = AlertEvent.objects.create(
        tenant=team_a_contacts,
        budget="monthly_cost",
        threshold=100,
        period_start=date(2025, 6, 1),
        used=Decimal("100"),
        limit=Decimal("100"),
    )
    receiver.statuses = [500]

    with pytest.raises(AlertDeliveryFailed, match="answered 500"):
        alert_deliver(event.pk)
    alert_deliver(event.pk)

    event.refresh_from_db()
    assert len(mailoutbox) == 1 and len(receiver.deliveries) == 2
    assert event.emailed_at is not None and event.webhook_sent_at is not None
    assert (event.attempts, event.last_error) == (2, "")


def test_the_task_retries_a_webhook_that_fails_until_it_is_delivered(
    team_a_contacts: Tenant, receiver: WebhookReceiver, celery_eager, mailoutbox
):
    receiver.statuses = [503, 502]

    event = alert_raise(notice(team_a_contacts, threshold=100))

    assert event is not None
    event.refresh_from_db()
    assert len(receiver.deliveries) == 3 and len(mailoutbox) == 1
    assert event.webhook_sent_at is not None and event.attempts == 3
