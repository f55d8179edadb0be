"""The shared cast: two tenants with keys and quotas, an exhausted tenant, and an endpoint with a
provisioned (PTU) and a standard deployment of the same model. Tests add what they need to it
(the e2e SDK cast points the endpoint at a simulator; tests/proxy points it at one in-process).

Every fixture here is function-scoped and asks for ``db``: in a test marked
``django_db(transaction=True)`` (or asking for ``transactional_db``) the rows are committed,
so worker threads (the snapshot loader, the usage flusher) see them.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.db.models.signals import post_save
from django.test import override_settings

from gateway.models import Deployment, Endpoint
from tenants.models import AccessPolicy, Quota, Tenant
from tenants.services import IssuedKey, key_issue
from tests.log_secrets import endpoint_secrets, endpoint_secrets_note, leaked_secret
from tests.redis_cluster import redis_cluster  # noqa: F401 (a fixture: the local Redis Cluster)


@pytest.fixture(autouse=True, scope="session")
def private_usage_spill_dir(tmp_path_factory):
    """Usage spill files of this run go to a temporary directory, never var/usage-spill, whose
    files a gateway would replay into the test database of a later run."""
    from django.conf import settings

    settings.GATEWAY["USAGE_SPILL_DIR"] = str(tmp_path_factory.mktemp("usage-spill"))


@pytest.fixture(autouse=True, scope="session")
def log_lines_written_in_their_test():
    """The console handler writes on the caller's thread during the suite: each test's log lines
    are captured with that test's output (its writer thread would print them between tests)."""
    from gateway.observability.logs import BackgroundStreamHandler

    BackgroundStreamHandler.synchronous = True


# -- no secret in any log line ----------------------------------------------------------------
post_save.connect(endpoint_secrets_note, sender=Endpoint, dispatch_uid="tests-endpoint-secrets")


@pytest.fixture(autouse=True)
def fast_password_hashing(request) -> Iterator[None]:
    """A cheap password hasher for in-process tests: the production one costs 0.6 s per user
    created with a password (PBKDF2, a million rounds), which made up a fifth of the fast suite.
    End-to-end tests keep the real one: the servers they start check the passwords."""
    if request.node.get_closest_marker("e2e"):
        yield
        return
    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog) -> Iterator[None]:
    """Fails a test if any line logged while it ran (at the configured levels) holds a secret."""
    endpoint_secrets.clear()
    yield
    leaks = []
    for when in ("setup", "call", "teardown"):  # teardown: what the fixtures torn down so far logged
        for record in caplog.get_records(when):
            text = record.getMessage()
            if record.exc_info:
                text += logging.Formatter().formatException(record.exc_info)
            secret = leaked_secret(text)
            if secret is not None:
                leaks.append(f"{record.name} {record.levelname}: {text[:300]!r} holds {secret[:12]!r}…")
    assert not leaks, "secrets in the log:\n" + "\n".join(leaks)


@pytest.fixture
def endpoint(db) -> Endpoint:
    """An Azure endpoint; it points nowhere (port 9, discard) until a test points it at an upstream."""
    return Endpoint.objects.create(
        name="east", kind=Endpoint.Kind.AZURE, base_url="http://127.0.0.1:9/", api_key="upstream-secret-east"
    )


@pytest.fixture
def ptu_deployment(endpoint: Endpoint) -> Deployment:
    """gpt-4o on provisioned throughput: tier 1, tried first, waited for up to a second."""
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
def standard_deployment(endpoint: Endpoint) -> Deployment:
    """gpt-4o pay-as-you-go: tier 2, where the PTU spills over."""
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
def tenant_a(db) -> Tenant:
    """A team with request, token and monthly cost quotas and an access policy (open by default)."""
    tenant = Tenant.objects.create(slug="team-a", name="Team A")
    Quota.objects.create(tenant=tenant, rpm=600, tpm=100_000, monthly_cost=Decimal("100"))
    AccessPolicy.objects.create(tenant=tenant)
    return tenant


@pytest.fixture
def tenant_b(db) -> Tenant:
    """A second team with smaller quotas and no access policy."""
    tenant = Tenant.objects.create(slug="team-b", name="Team B")
    Quota.objects.create(tenant=tenant, rpm=60, tpm=10_000)
    return tenant


@pytest.fixture
def exhausted_tenant(db) -> Tenant:
    """A team whose monthly token budget (1 token) is spent by any request."""
    tenant = Tenant.objects.create(slug="team-broke", name="Team Broke")
    Quota.objects.create(tenant=tenant, monthly_tokens=1)
    return tenant


@pytest.fixture
def key_a(tenant_a: Tenant) -> IssuedKey:
    """The issued key for tenant A: ``.key`` is the row, ``.secret`` the one-time secret."""
    return key_issue(tenant_a, name="app-a")


@pytest.fixture
def key_b(tenant_b: Tenant) -> IssuedKey:
    return key_issue(tenant_b, name="app-b")


@pytest.fixture
def balancer_prefix() -> Iterator[str]:
    """A fresh BALANCER_REDIS_PREFIX, so a test's windows and queues start empty in a shared
    Redis; its keys are deleted afterwards (they would expire anyway)."""
    prefix = f"test-bal-{uuid.uuid4().hex[:12]}"
    yield prefix
    url = os.environ.get("REDIS_URL")
    if url:
        import redis

        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass
        finally:
            client.close()
