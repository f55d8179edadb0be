"""Celery tasks of the tenants app: thin shells around services, safe to run twice."""

from __future__ import annotations

from gateway.celery import app
from tenants.alerts import AlertDeliveryFailed, alert_deliver


@app.task(
    name="tenants.quota_alert_send",
    autoretry_for=(AlertDeliveryFailed,),
    retry_backoff=10,
    retry_backoff_max=900,
    retry_jitter=True,
    max_retries=8,
)
def quota_alert_send(event_id: int, period_end: str = "") -> None:
    """Deliver a recorded budget alert to the channels it has not reached yet."""
    alert_deliver(event_id, period_end)
