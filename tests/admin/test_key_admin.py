"""Client keys in the admin: issued through the service, the secret shown once, revoked and expired by actions."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

import tenants.admin as tenants_admin
from tenants.models import ClientKey, Quota, Tenant
from tenants.services import key_issue, key_revoke

CHANGELIST = reverse("admin:tenants_clientkey_changelist")
ADD = reverse("admin:tenants_clientkey_add")


def change_url(key: ClientKey) -> str:
    return reverse("admin:tenants_clientkey_change", args=[key.pk])


def issue_data(tenant: Tenant, **overrides) -> dict[str, str]:
    return {
        "tenant": str(tenant.pk),
        "name": "ci-bot",
        "expires_at_0": "",
        "expires_at_1": "",
        "allowed_models": "gpt-4o, gpt-4o-mini",
        "default_priority": "3",
        **overrides,
    }


def change_data(key: ClientKey, quota: dict[str, str] | None = None, **overrides) -> dict[str, str]:
    data = {
        "name": key.name,
        "expires_at_0": "",
        "expires_at_1": "",
        "allowed_models": ", ".join(key.allowed_models),
        "default_priority": str(key.default_priority),
        "quota-TOTAL_FORMS": "1" if quota else "0",
        "quota-INITIAL_FORMS": "0",
        "quota-MIN_NUM_FORMS": "0",
        "quota-MAX_NUM_FORMS": "1",
    }
    for name, value in (quota or {}).items():
        data[f"quota-0-{name}"] = value
    data.update(overrides)
    return data


def issue_through_admin(client, tenant: Tenant, **overrides):
    response = client.post(ADD, issue_data(tenant, **overrides))
    assert response.status_code == 200
    return response


def test_issuing_a_key_renders_its_secret_once_and_stores_only_the_hash(admin_client, tenant_a):
    response = issue_through_admin(admin_client, tenant_a)

    assert response.templates[0].name == "admin/tenants/clientkey/issued.html"
    secret = response.context["secret"]
    content = response.content.decode()
    assert secret in content
    assert "will not be shown again" in content
    assert "no-store" in response["Cache-Control"]

    key = ClientKey.objects.get(tenant=tenant_a, name="ci-bot")
    assert hashlib.sha256(secret.encode()).hexdigest() == key.key_hash
    assert secret.startswith(key.prefix) and len(key.prefix) < len(secret)
    assert (key.allowed_models, key.default_priority, key.expires_at) == (["gpt-4o", "gpt-4o-mini"], 3, None)
    # The secret is in no column, no cookie or session (messages), no history entry.
    assert all(secret not in str(value) for value in ClientKey.objects.filter(pk=key.pk).values().get().values())
    assert all(secret not in morsel.value for morsel in response.cookies.values())
    assert secret not in str(dict(admin_client.session))
    entry = LogEntry.objects.get(object_id=str(key.pk))
    assert entry.is_addition() and secret not in f"{entry.object_repr} {entry.change_message}"

    for page in (change_url(key), CHANGELIST, reverse("admin:tenants_clientkey_history", args=[key.pk])):
        later = admin_client.get(page).content.decode()
        assert secret not in later, page
        assert key.key_hash not in later, page
        assert key.prefix in later, page


def test_the_add_page_issues_through_key_issue(admin_client, tenant_a, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return key_issue(*args, **kwargs)

    monkeypatch.setattr(tenants_admin, "key_issue", spy)
    issue_through_admin(admin_client, tenant_a)
    assert len(calls) == 1
    assert calls[0][1]["name"] == "ci-bot"


def test_the_add_page_is_the_issue_form(admin_client, tenant_a):
    page = admin_client.get(ADD)
    assert set(page.context["adminform"].form.fields) == {
        "tenant",
        "name",
        "expires_at",
        "allowed_models",
        "default_priority",
        "best_priority",
    }
    assert "Issue a new key" in admin_client.get(CHANGELIST).content.decode()


def test_the_best_priority_is_issued_shown_and_editable(admin_client, tenant_a):
    issue_through_admin(admin_client, tenant_a, best_priority="1")
    key = ClientKey.objects.get(tenant=tenant_a, name="ci-bot")
    assert (key.default_priority, key.best_priority) == (3, 1)
    assert 'name="best_priority"' in admin_client.get(change_url(key)).content.decode()

    response = admin_client.post(change_url(key), change_data(key, best_priority="0"))
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.best_priority == 0


def test_a_best_priority_worse_than_the_default_is_refused(admin_client, tenant_a, key_a):
    key = key_a.key
    response = admin_client.post(change_url(key), change_data(key, best_priority=str(key.default_priority + 1)))
    assert response.status_code == 200
    assert "cannot be worse (higher) than the default priority" in response.content.decode()
    key.refresh_from_db()
    assert key.best_priority is None


def test_an_invalid_issue_form_issues_nothing(admin_client, tenant_a, key_a):
    duplicate = issue_through_admin(admin_client, tenant_a, name=key_a.key.name)
    assert "secret" not in duplicate.context
    assert duplicate.context["adminform"].form.errors

    past = (timezone.now() - timedelta(days=1)).strftime("%Y-%m-%d")
    expired = issue_through_admin(admin_client, tenant_a, expires_at_0=past, expires_at_1="00:00:00")
    assert "expires_at" in expired.context["adminform"].form.errors
    assert list(ClientKey.objects.values_list("name", flat=True)) == [key_a.key.name]


def test_the_change_page_edits_a_key_without_touching_its_secret(admin_client, key_a):
    key = key_a.key
    response = admin_client.post(change_url(key), change_data(key, name="renamed", allowed_models="gpt-4o"))
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    stored = ClientKey.objects.get(pk=key.pk)
    assert (stored.name, stored.allowed_models, stored.key_hash) == ("renamed", ["gpt-4o"], key.key_hash)


def test_saving_a_stale_key_does_not_undo_a_revocation(admin_user, key_a):
    """The change form saves only the fields it changed, so a revocation made meanwhile stands."""
    stale = ClientKey.objects.get(pk=key_a.key.pk)
    key_revoke(ClientKey.objects.get(pk=key_a.key.pk))
    stale.name = "renamed"
    request = RequestFactory().post("/")
    request.user = admin_user
    admin.site._registry[ClientKey].save_model(request, stale, SimpleNamespace(changed_data=["name"]), change=True)
    stored = ClientKey.objects.get(pk=key_a.key.pk)
    assert stored.name == "renamed" and stored.revoked_at is not None


def test_a_key_quota_is_added_inline_for_the_keys_tenant(admin_client, key_a):
    key = key_a.key
    quota = {
        "rpm": "30",
        "tpm": "5000",
        "daily_tokens": "0",
        "monthly_tokens": "0",
        "monthly_cost": "0",
        "alert_thresholds": "50, 80",
        "key": str(key.pk),
    }
    response = admin_client.post(change_url(key), change_data(key, quota=quota))
    assert response.status_code == 302, response.context and response.context["inline_admin_formsets"][0].formset.errors
    stored = Quota.objects.get(key=key)
    assert (stored.tenant_id, stored.rpm, stored.alert_thresholds) == (key.tenant_id, 30, [50, 80])


# --- actions ---------------------------------------------------------------------------------


def run_action(client, action: str, keys: list[ClientKey]):
    data = {"action": action, "_selected_action": [str(k.pk) for k in keys]}
    response = client.post(CHANGELIST, data)
    assert response.status_code == 302
    return response


def test_revoke_action_revokes_and_keeps_the_first_revocation_time(admin_client, key_a, key_b, tenant_a):
    other = key_issue(tenant_a, name="other").key
    run_action(admin_client, "revoke_keys", [key_a.key, key_b.key])
    first = {k.pk: k.revoked_at for k in ClientKey.objects.filter(revoked_at__isnull=False)}
    assert set(first) == {key_a.key.pk, key_b.key.pk}
    assert ClientKey.objects.get(pk=other.pk).revoked_at is None

    run_action(admin_client, "revoke_keys", [key_a.key])
    assert ClientKey.objects.get(pk=key_a.key.pk).revoked_at == first[key_a.key.pk]
    assert LogEntry.objects.filter(object_id=str(key_a.key.pk), change_message__contains="Revoked").count() == 1

    listing = admin_client.get(CHANGELIST, {"revoked": "yes"})
    assert {k.pk for k in listing.context["cl"].result_list} == set(first)
    assert "revoked" in listing.content.decode()


def test_expire_action_expires_now(admin_client, key_a, key_b):
    before = timezone.now()
    run_action(admin_client, "expire_keys", [key_a.key])
    expired = ClientKey.objects.get(pk=key_a.key.pk)
    assert expired.expires_at is not None and before <= expired.expires_at <= timezone.now()
    assert ClientKey.objects.get(pk=key_b.key.pk).expires_at is None

    listing = admin_client.get(CHANGELIST, {"expired": "yes"})
    assert [k.pk for k in listing.context["cl"].result_list] == [key_a.key.pk]
    row_status = admin.site._registry[ClientKey].status(expired)
    assert row_status == "expired"


def test_the_revoke_action_calls_the_service(admin_client, key_a, monkeypatch):
    calls = []
    monkeypatch.setattr(tenants_admin, "key_revoke", lambda key: calls.append(key.pk))
    run_action(admin_client, "revoke_keys", [key_a.key])
    assert calls == [key_a.key.pk]


# --- query count -----------------------------------------------------------------------------


def list_queries(client) -> int:
    client.get(CHANGELIST)
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(CHANGELIST).status_code == 200
    return len(ctx)


@pytest.mark.django_db
def test_key_changelist_queries_do_not_grow_with_keys(admin_client):
    def make(start: int, stop: int) -> None:
        for i in range(start, stop):
            tenant = Tenant.objects.create(slug=f"t-{i}", name=f"T {i}")
            issued = key_issue(tenant, name=f"k-{i}", expires_at=timezone.now() + timedelta(days=i))
            Quota.objects.create(tenant=tenant, key=issued.key)

    make(0, 3)
    few = list_queries(admin_client)
    make(3, 30)
    assert list_queries(admin_client) == few
