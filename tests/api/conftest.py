"""The management API's callers: anonymous, staff (session, token), tenant tokens for A and B."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from tenants.models import Tenant
from tenants.services import management_token_issue


@pytest.fixture(autouse=True)
def fresh_throttle_counts(settings) -> None:
    """Throttle counts live in the cache; each test starts with none: a cache of its own (a fresh
    key prefix). Not ``cache.clear()``: on Redis that flushes the database, and with it the
    balancer and quota state of the tests another xdist worker runs meanwhile."""
    settings.CACHES = {
        name: {**config, "KEY_PREFIX": f"test-cache-{uuid.uuid4().hex[:12]}"}
        for name, config in settings.CACHES.items()
    }


@pytest.fixture(autouse=True)
def status_runtime_stopped_after_each_call(monkeypatch) -> None:
    """The status view starts the gateway runtime (as the first proxied request would). Served by
    ASGI that is the process's runtime on the server's loop; here every sync call gets a loop of its
    own, so the runtime is stopped on that loop before it closes (later tests must not find one)."""
    from gateway.api import views
    from gateway.proxy.runtime import runtime
    from gateway.status import deployment_status

    async def status_then_stop() -> dict:
        try:
            return await deployment_status()
        finally:
            await runtime.shutdown()

    monkeypatch.setattr(views, "deployment_status", status_then_stop)


@pytest.fixture
def anonymous() -> APIClient:
    return APIClient()


@pytest.fixture
def staff_user(db):
    return get_user_model().objects.create_user("ops", password="pw-ops-123456", is_staff=True)


@pytest.fixture
def staff(staff_user) -> APIClient:
    client = APIClient()
    client.force_login(staff_user)
    return client


def bearer(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def tenant_token(tenant: Tenant, creator, **kwargs) -> str:
    expires = kwargs.pop("expires_at", timezone.now() + timedelta(days=30))
    return management_token_issue(
        name=f"{tenant.slug} lead", created_by=creator, expires_at=expires, tenant=tenant
    ).secret


@pytest.fixture
def token_a(tenant_a: Tenant, staff_user) -> APIClient:
    """A team lead of tenant A, by a tenant-scoped management token."""
    return bearer(tenant_token(tenant_a, staff_user))


@pytest.fixture
def staff_token(staff_user) -> APIClient:
    secret = management_token_issue(
        name="pipeline", created_by=staff_user, expires_at=timezone.now() + timedelta(days=1)
    ).secret
    return bearer(secret)
