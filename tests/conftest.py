"""The shared cast: two tenants with keys and quotas, an exhausted tenant, and an endpoint with a
provisioned (PTU) and a standard deployment of the same model."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.models import Deployment, Endpoint
from tenants.models import AccessPolicy, Quota, Tenant
from tenants.services import key_issue


@pytest.fixture(autouse=True, scope="session")
def private_usage_spill_dir(tmp_path_factory):
    """Usage spill files of this run go to a temporary directory, never var/usage-spill, whose
    files a gateway would replay into the test database of a later run."""
    from django.conf import settings

    settings.GATEWAY["USAGE_SPILL_DIR"] = str(tmp_path_factory.mktemp("usage-spill"))


@pytest.fixture
def endpoint(db):
    return Endpoint.objects.create(
        name="east", kind=Endpoint.Kind.AZURE, base_url="http://127.0.0.1:9/", api_key="upstream-secret-east"
    )


@pytest.fixture
def ptu_deployment(endpoint):
    return Deployment.objects.create(
        endpoint=endpoint,
        name="gpt4o-ptu",
        model="gpt-4o",
        sku=Deployment.Sku.PROVISIONED,
        tier=1,
        max_wait_seconds=1.0,
        rpm=600,
        tpm=100_000,
    )


@pytest.fixture
def standard_deployment(endpoint):
    return Deployment.objects.create(
        endpoint=endpoint,
        name="gpt4o-paygo",
        model="gpt-4o",
        sku=Deployment.Sku.STANDARD,
        tier=2,
        rpm=600,
        tpm=100_000,
    )


@pytest.fixture
def tenant_a(db):
    tenant = Tenant.objects.create(slug="team-a", name="Team A")
    Quota.objects.create(tenant=tenant, rpm=600, tpm=100_000, monthly_cost=Decimal("100"))
    AccessPolicy.objects.create(tenant=tenant)
    return tenant


@pytest.fixture
def tenant_b(db):
    tenant = Tenant.objects.create(slug="team-b", name="Team B")
    Quota.objects.create(tenant=tenant, rpm=60, tpm=10_000)
    return tenant


@pytest.fixture
def exhausted_tenant(db):
    tenant = Tenant.objects.create(slug="team-broke", name="Team Broke")
    Quota.objects.create(tenant=tenant, monthly_tokens=1)
    return tenant


@pytest.fixture
def key_a(tenant_a):
    """The issued key for tenant A: ``.key`` is the row, ``.secret`` the one-time secret."""
    return key_issue(tenant_a, name="app-a")


@pytest.fixture
def key_b(tenant_b):
    return key_issue(tenant_b, name="app-b")
