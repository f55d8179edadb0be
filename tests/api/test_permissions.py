"""Who may do what in the management API (``/api/v1/``)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from billing.models import Rollup, Statement
from tenants.models import ClientKey, ManagementToken, Quota
from tenants.services import key_hash, management_token_revoke
from tests.api.conftest import bearer, tenant_token

pytestmark = pytest.mark.django_db

STAFF_ONLY_LISTS = [
    "/api/v1/tenants/",
    "/api/v1/quotas/",
    "/api/v1/access-policies/",
    "/api/v1/endpoints/",
    "/api/v1/deployments/",
    "/api/v1/prices/",
    "/api/v1/management-tokens/",
    "/api/v1/deployment-status/",
]
TENANT_LISTS = ["/api/v1/keys/", "/api/v1/usage/", "/api/v1/statements/"]


def rollup(tenant_id: int, **kwargs) -> Rollup:
    values = {"granularity": "day", "period_start": timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)}
    return Rollup.objects.create(tenant_ref=tenant_id, computed_at=timezone.now(), **{**values, **kwargs})


@pytest.mark.parametrize("path", STAFF_ONLY_LISTS + TENANT_LISTS)
def test_anonymous_callers_are_refused_with_401(anonymous, path):
    response = anonymous.get(path)
    assert response.status_code == 401
    assert response.json()["detail"]


@pytest.mark.parametrize("path", STAFF_ONLY_LISTS + TENANT_LISTS)
def test_staff_by_session_reads_every_list(staff, tenant_a, path):
    assert staff.get(path).status_code == 200


@pytest.mark.parametrize("path", STAFF_ONLY_LISTS)
def test_a_tenant_token_is_refused_everything_but_its_keys_usage_and_statements(token_a, path):
    assert token_a.get(path).status_code == 403


def test_a_non_staff_user_session_is_refused(tenant_a, db):
    from django.contrib.auth import get_user_model
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_login(get_user_model().objects.create_user("dev", password="pw-dev-123456"))
    assert client.get("/api/v1/keys/").status_code == 403


def test_a_client_key_presented_to_the_api_is_refused(key_a):
    response = bearer(key_a.secret).get("/api/v1/keys/")
    assert response.status_code == 401
    assert "not management credentials" in response.json()["detail"]
    # Not even with the api-key header the gateway's clients use: that is no API credential at all.
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_API_KEY=key_a.secret)
    assert client.get("/api/v1/keys/").status_code == 401


def test_unknown_revoked_and_expired_tokens_are_refused(tenant_a, staff_user):
    assert bearer("gwm-nothing-like-it").get("/api/v1/keys/").status_code == 401
    revoked = tenant_token(tenant_a, staff_user)
    management_token_revoke(ManagementToken.objects.get(token_hash=key_hash(revoked)))
    assert bearer(revoked).get("/api/v1/keys/").status_code == 401
    expired = tenant_token(tenant_a, staff_user, expires_at=timezone.now() - timedelta(seconds=1))
    assert bearer(expired).get("/api/v1/keys/").status_code == 401


def test_a_staff_token_stops_working_when_its_user_is_no_longer_staff(staff_token, staff_user):
    assert staff_token.get("/api/v1/tenants/").status_code == 200
    staff_user.is_staff = False
    staff_user.save()
    assert staff_token.get("/api/v1/tenants/").status_code == 401


def test_a_tenant_token_lists_only_its_own_keys(token_a, key_a, key_b):
    rows = token_a.get("/api/v1/keys/").json()["results"]
    assert [row["id"] for row in rows] == [key_a.key.pk]
    assert rows[0]["prefix"] == key_a.key.prefix and "secret" not in rows[0] and "key_hash" not in rows[0]


def test_a_tenant_token_for_a_gets_404_for_bs_key_and_cannot_revoke_it(token_a, key_b):
    assert token_a.get(f"/api/v1/keys/{key_b.key.pk}/").status_code == 404
    assert token_a.post(f"/api/v1/keys/{key_b.key.pk}/revoke/").status_code == 404
    assert token_a.patch(f"/api/v1/keys/{key_b.key.pk}/", {"name": "mine now"}, format="json").status_code == 404
    key_b.key.refresh_from_db()
    assert key_b.key.revoked_at is None and key_b.key.name != "mine now"


def test_a_tenant_token_issues_a_key_for_its_own_tenant_whatever_it_asks(token_a, tenant_a, tenant_b):
    response = token_a.post("/api/v1/keys/", {"name": "ci", "tenant": tenant_b.slug}, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["secret"].startswith("sk-gw-") and body["tenant"] == tenant_a.slug
    key = ClientKey.objects.get(pk=body["id"])
    assert key.tenant == tenant_a and key.key_hash == key_hash(body["secret"])
    # Shown once: reading it back gives the prefix only.
    again = token_a.get(f"/api/v1/keys/{key.pk}/").json()
    assert "secret" not in again and again["prefix"] == body["secret"][:12]


def test_a_tenant_token_revokes_and_expires_its_own_keys(token_a, key_a):
    assert token_a.post(f"/api/v1/keys/{key_a.key.pk}/revoke/").json()["revoked"] is True
    assert token_a.post(f"/api/v1/keys/{key_a.key.pk}/expire/").json()["expired"] is True
    key_a.key.refresh_from_db()
    assert key_a.key.revoked_at is not None and key_a.key.expires_at <= timezone.now()


def test_a_tenant_token_can_never_raise_its_priority(token_a, key_a):
    before = (key_a.key.default_priority, key_a.key.best_priority)
    token_a.patch(f"/api/v1/keys/{key_a.key.pk}/", {"default_priority": 0, "best_priority": 0}, format="json")
    issued = token_a.post("/api/v1/keys/", {"name": "jump", "best_priority": 0, "default_priority": 0}, format="json")
    key_a.key.refresh_from_db()
    assert (key_a.key.default_priority, key_a.key.best_priority) == before
    new = ClientKey.objects.get(pk=issued.json()["id"])
    assert new.best_priority is None and new.default_priority == key_a.key._meta.get_field("default_priority").default


def test_a_tenant_token_can_never_raise_its_quota(token_a, tenant_a):
    quota = Quota.objects.filter(tenant=tenant_a, key=None).first() or Quota.objects.create(tenant=tenant_a)
    assert token_a.patch(f"/api/v1/quotas/{quota.pk}/", {"rpm": 0, "tpm": 0}, format="json").status_code == 403
    assert token_a.post(f"/api/v1/quotas/{quota.pk}/reset/", {"period": "month"}, format="json").status_code == 403
    assert token_a.post("/api/v1/quotas/", {"tenant": tenant_a.slug}, format="json").status_code == 403
    assert token_a.patch(f"/api/v1/tenants/{tenant_a.slug}/", {"active": True}, format="json").status_code == 403
    before = quota.rpm
    quota.refresh_from_db()
    assert quota.rpm == before and quota.month_counters_reset_at is None


def test_a_tenant_token_reads_only_its_own_usage(token_a, tenant_a, tenant_b):
    mine = rollup(tenant_a.pk, requests=3, model="gpt-4o")
    theirs = rollup(tenant_b.pk, requests=5, model="gpt-4o")
    rows = token_a.get("/api/v1/usage/").json()["results"]
    assert [row["id"] for row in rows] == [mine.pk]
    # Asking for B by filter gives nothing; asking for B's row gives 404.
    assert token_a.get("/api/v1/usage/", {"tenant": tenant_b.slug}).json()["results"] == []
    assert token_a.get(f"/api/v1/usage/{theirs.pk}/").status_code == 404


def test_a_tenant_token_reads_only_its_own_statements(token_a, tenant_a, tenant_b):
    month = timezone.now().date().replace(day=1)
    Statement.objects.create(tenant=tenant_a, month=month, requests=1, computed_at=timezone.now())
    other = Statement.objects.create(tenant=tenant_b, month=month, requests=2, computed_at=timezone.now())
    rows = token_a.get("/api/v1/statements/").json()["results"]
    assert [row["tenant"] for row in rows] == [tenant_a.slug]
    assert token_a.get(f"/api/v1/statements/{other.pk}/").status_code == 404
    assert token_a.get(f"/api/v1/tenants/{tenant_b.slug}/statements/{month:%Y-%m}/").status_code == 404
    document = token_a.get(f"/api/v1/tenants/{tenant_a.slug}/statements/{month:%Y-%m}/").json()
    assert document["tenant"] == tenant_a.slug and document["totals"]["requests"] == 1


def test_staff_by_token_manages_everything(staff_token, tenant_a):
    response = staff_token.post("/api/v1/tenants/", {"slug": "newteam", "name": "New team"}, format="json")
    assert response.status_code == 201
    issued = staff_token.post("/api/v1/keys/", {"tenant": "newteam", "name": "app", "best_priority": 0}, format="json")
    assert issued.status_code == 201, issued.json()
    assert ClientKey.objects.get(pk=issued.json()["id"]).best_priority == 0


def test_a_tenant_token_cannot_issue_management_tokens(token_a, tenant_a):
    body = {"name": "more", "tenant": tenant_a.slug, "expires_at": (timezone.now() + timedelta(days=1)).isoformat()}
    assert token_a.post("/api/v1/management-tokens/", body, format="json").status_code == 403


def test_staff_issue_a_tenant_token_shown_once_that_works_for_that_tenant(staff, tenant_a, key_a):
    body = {"name": "lead", "tenant": tenant_a.slug, "expires_at": (timezone.now() + timedelta(days=1)).isoformat()}
    response = staff.post("/api/v1/management-tokens/", body, format="json")
    assert response.status_code == 201, response.json()
    secret = response.json()["secret"]
    assert secret.startswith("gwm-")
    assert "secret" not in staff.get(f"/api/v1/management-tokens/{response.json()['id']}/").json()
    assert ManagementToken.objects.get(pk=response.json()["id"]).token_hash == key_hash(secret)
    assert [row["id"] for row in bearer(secret).get("/api/v1/keys/").json()["results"]] == [key_a.key.pk]
