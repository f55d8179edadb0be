"""Budget alerts: recorded once per scope, budget, threshold and period, then sent to the tenant's
contacts by e-mail (Django's e-mail backend) and webhook (httpx, signed with HMAC-SHA256).

The request path notices a threshold when it settles a request and hands ``alert_raise`` to a
worker thread; the insert decides which process sends. Sending is the Celery task
``tenants.tasks.quota_alert_send`` (retried with backoff), which runs in process when Celery is
eager (the embedded default).

Webhook requests carry ``X-Gateway-Timestamp`` (Unix seconds) and ``X-Gateway-Signature:
sha256=<hex>``, the HMAC-SHA256 of ``<timestamp>.<body>`` with the tenant's webhook secret. A
receiver recomputes it, compares in constant time and refuses old timestamps (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import httpx
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone

from tenants.models import AlertEvent

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 10.0
EVENT_TYPE = "budget.threshold_reached"
BUDGET_NAMES = {"daily_tokens": "daily token", "monthly_tokens": "monthly token", "monthly_cost": "monthly cost"}


class AlertDeliveryFailed(Exception):
    """Some channel could not be reached; the task retries what is still unsent."""


@dataclass(frozen=True, slots=True)
class AlertNotice:
    """What the request path saw: a scope's budget at or past a threshold in a period."""

    tenant_id: int
    key_id: int | None
    budget: str
    threshold: int
    period_start: date
    period_end: datetime  # when the period resets (aware, budget time zone)
    used: Decimal  # tokens, or money for the cost budget
    limit: Decimal


def alert_raise(notice: AlertNotice) -> AlertEvent | None:
    """Record the alert unless some process already did; queue its delivery if this call recorded it.

    Runs in a worker thread. Returns the new event, or None when it existed already (this
    period's alert was sent, or is being sent, by whoever recorded it).
    """
    from tenants.tasks import quota_alert_send

    try:
        with transaction.atomic():
            event, created = AlertEvent.objects.get_or_create(
                tenant_id=notice.tenant_id,
                key_id=notice.key_id,
                budget=notice.budget,
                threshold=notice.threshold,
                period_start=notice.period_start,
                defaults={"used": notice.used, "limit": notice.limit},
            )
    except IntegrityError:  # a concurrent insert won between get and create
        return None
    if not created:
        return None
    log.info("budget alert %s recorded; sending", event)
    quota_alert_send.delay(event.pk, notice.period_end.isoformat())
    return event


def alert_deliver(event_id: int, period_end: str = "") -> None:
    """Send the alert to every channel it has not reached yet; raise if any failed (to retry).

    Idempotent: a channel that got the alert is marked and skipped on the next try.
    """
    event = AlertEvent.objects.select_related("tenant", "key").get(pk=event_id)
    tenant = event.tenant
    failures: list[str] = []
    if tenant.alert_emails and event.emailed_at is None:
        try:
            subject, text = alert_email(event, period_end)
            send_mail(subject, text, settings.DEFAULT_FROM_EMAIL, list(tenant.alert_emails))
            event.emailed_at = timezone.now()
        except Exception as exc:
            failures.append(f"e-mail: {exc}")
    if tenant.alert_webhook_url and event.webhook_sent_at is None:
        try:
            webhook_post(tenant.alert_webhook_url, tenant.alert_webhook_secret, alert_payload(event, period_end))
            event.webhook_sent_at = timezone.now()
        except Exception as exc:
            failures.append(f"webhook: {exc}")
    event.attempts += 1
    event.last_error = "; ".join(failures)[:2000]
    event.save(update_fields=["emailed_at", "webhook_sent_at", "attempts", "last_error"])
    if failures:
        raise AlertDeliveryFailed(event.last_error)


def _amount(event: AlertEvent, value: Decimal) -> str:
    if event.budget == AlertEvent.Budget.MONTHLY_COST:
        return f"{value:,.2f}"
    return f"{int(value):,} tokens"


def _scope_name(event: AlertEvent) -> str:
    team = f"team '{event.tenant.name or event.tenant.slug}'"
    return f"key '{event.key.name}' of {team}" if event.key_id and event.key else team


def alert_email(event: AlertEvent, period_end: str = "") -> tuple[str, str]:
    """Subject and text of the alert e-mail."""
    budget = BUDGET_NAMES[event.budget]
    subject = f"[LLM gateway] {_scope_name(event)}: {budget} budget at {event.threshold}%"
    lines = [
        f"The {budget} budget of {_scope_name(event)} has reached {event.threshold}% of its limit.",
        "",
        f"Used:   {_amount(event, event.used)}",
        f"Budget: {_amount(event, event.limit)}",
        f"Period: from {event.period_start:%Y-%m-%d}" + (f", resets at {period_end}" if period_end else ""),
        "",
    ]
    if event.threshold >= 100:
        lines.append("Requests are refused (HTTP 429, insufficient_quota) until the budget resets or is raised.")
    return subject, "\n".join(lines) + "\n"


def alert_payload(event: AlertEvent, period_end: str = "") -> dict:
    return {
        "type": EVENT_TYPE,
        "id": event.pk,
        "tenant": event.tenant.slug,
        "key": {"id": event.key_id, "name": event.key.name, "prefix": event.key.prefix} if event.key else None,
        "budget": event.budget,
        "threshold": event.threshold,
        "used": str(event.used),
        "limit": str(event.limit),
        "period_start": event.period_start.isoformat(),
        "period_end": period_end or None,
        "created_at": event.created_at.isoformat(),
    }


def webhook_signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``<timestamp>.<body>`` keyed with ``secret``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def webhook_post(url: str, secret: str, payload: dict) -> None:
    """POST the payload as JSON, signed when the tenant has a secret; any non-2xx is a failure."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Gateway-Event": EVENT_TYPE, "X-Gateway-Timestamp": timestamp}
    if secret:
        headers["X-Gateway-Signature"] = webhook_signature(secret, timestamp, body)
    response = httpx.post(url, content=body, headers=headers, timeout=WEBHOOK_TIMEOUT, follow_redirects=False)
    if not response.is_success:
        raise AlertDeliveryFailed(f"{url} answered {response.status_code}")
