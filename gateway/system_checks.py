"""Configuration mistakes reported as Django system checks, so `manage.py check --deploy` names them."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Tags, Warning, register


@register(Tags.security, deploy=True)
def check_secret_key(app_configs, **kwargs):
    if settings.SECRET_KEY == settings.INSECURE_DEFAULT_SECRET_KEY:
        return [
            Warning(
                "SECRET_KEY is the built-in development key.",
                hint="Set the SECRET_KEY environment variable to a long random value.",
                id="gateway.W001",
            )
        ]
    return []


@register()
def check_gateway_settings(app_configs, **kwargs):
    from django.core.checks import Error

    errors = []
    g = settings.GATEWAY
    for name in ("MAX_BODY_BYTES", "USAGE_BATCH_SIZE", "QUEUE_MAX_DEPTH"):
        if g[name] <= 0:
            errors.append(Error(f"GATEWAY[{name!r}] must be positive, got {g[name]}.", id="gateway.E001"))
    for name in ("USAGE_FLUSH_SECONDS", "WINDOW_MINUTE_SECONDS", "QUEUE_TIMEOUT_SECONDS", "SNAPSHOT_POLL_SECONDS"):
        if g[name] <= 0:
            errors.append(Error(f"GATEWAY[{name!r}] must be positive, got {g[name]}.", id="gateway.E002"))
    return errors
