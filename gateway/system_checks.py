"""Configuration mistakes reported as Django system checks, so `manage.py check --deploy` names them."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

#: docker-compose.yml's ``${SECRET_KEY:-...}`` default (a test keeps the two equal).
COMPOSE_DEFAULT_SECRET_KEY = "change-me-to-a-long-random-string"


@register(Tags.security, deploy=True)
def check_secret_key(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """A published key signs sessions and CSRF tokens anyone can forge: an error, not a warning."""
    if settings.DEBUG:
        return []
    known = {
        settings.INSECURE_DEFAULT_SECRET_KEY: "the built-in development key",
        COMPOSE_DEFAULT_SECRET_KEY: "docker-compose.yml's default",
    }
    if settings.SECRET_KEY in known:
        return [
            Error(
                f"SECRET_KEY is {known[settings.SECRET_KEY]}, which is published.",
                hint="Set the SECRET_KEY environment variable to a long random value, e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe(50))'`.",
                id="gateway.E010",
            )
        ]
    return []


@register(Tags.security, deploy=True)
def check_trusted_proxies(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """Trusting every address as a proxy lets any client choose the address the IP policy checks."""
    everyone = [str(net) for net in settings.GATEWAY["TRUSTED_PROXIES"] if net.prefixlen == 0]
    if everyone:
        return [
            Warning(
                f"GATEWAY_TRUSTED_PROXIES includes {', '.join(everyone)}: every client's X-Forwarded-For is believed.",
                hint="List only the networks of your load balancers or reverse proxies.",
                id="gateway.W010",
            )
        ]
    return []


@register(Tags.security, deploy=True)
def check_metrics_guard(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """/metrics names models, deployments (and tenants, with their label): not for every client."""
    options = settings.OBSERVABILITY
    if options["METRICS"] and not options["METRICS_TOKEN"] and not options["METRICS_PORT"]:
        return [
            Warning(
                "/metrics is served on the public port without a token: anyone who reaches the gateway can read it.",
                hint="Set GATEWAY_METRICS_TOKEN (Prometheus sends it as a bearer token), or GATEWAY_METRICS_PORT "
                "to serve the metrics on an internal port only.",
                id="gateway.W011",
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
    for name in ("OVERLOAD_LAG_MS", "STREAM_COALESCE_MS", "UPSTREAM_MAX_CONNECTIONS"):
        if g[name] < 0:
            errors.append(Error(f"GATEWAY[{name!r}] must be 0 (off) or positive, got {g[name]}.", id="gateway.E003"))
    return errors


@register()
def check_workers_share_state(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """Several worker processes without Redis would each apply every deployment's limits alone."""
    import os

    from gateway import workers

    try:
        asked = workers.asked_workers(os.environ)
    except workers.WorkersRefused as refused:
        return [Error(str(refused), id="gateway.E020")]
    problem = workers.refusal(asked or 1, settings.REDIS_URL)
    return [Error(problem, hint="Set REDIS_URL, or WEB_CONCURRENCY=1.", id="gateway.E020")] if problem else []
