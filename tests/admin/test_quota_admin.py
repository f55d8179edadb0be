"""Quotas in the admin: use against each limit as progress bars (tenant and key pages, the tenant
list), the reset actions, alert contacts, and the webhook secret that never comes back."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gateway.snapshot.build import snapshot_build
from tenants.models import AlertEvent, ClientKey, Quota, Tenant
from tenants.services import IssuedKey, key_issue
from tests.admin.test_admin_pages import url, usage_record

WEBHOOK_SECRET = "whsec-do-not-show-7Q2"


@pytest.fixture(autouse=True)
def counters_from_the_records(settings) -> None:
    """No gateway runs in these tests: the admin reads use from the usage records."""
    settings.REDIS_URL = None


def form_data(response) -> dict[str, Any]:
    """What the change page would post back unchanged: the main form and every inline formset."""
    data: dict[str, Any] = {}
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        forms.append(formset.management_form)
        forms.extend(formset.forms)
    for form in forms:
        for name in form.fields:
            value = form[name].value()
            if value is None or value is False:
                continue
            key = form.add_prefix(name)
            if value is True:
                data[key] = "on"
            elif isinstance(value, list | tuple):
                data[key] = ", ".join(str(v) for v in value)
            else:
                data[key] = value
    return data


def this_month(days_ago: int = 0):
    now = timezone.now()
    return max(now - timedelta(days=days_ago), now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))


# -- use against limits -------------------------------------------------------------------------------


def test_the_tenant_page_shows_each_limit_against_its_use(admin_client, tenant_a: Tenant, key_a: IssuedKey):
    Quota.objects.filter(tenant=tenant_a, key__isnull=True).update(monthly_tokens=1_000)
    usage_record(1, tenant=tenant_a, key=key_a.key, prompt_tokens=300, completion_tokens=50, cost=Decimal("40"))
    usage_record(2, tenant=tenant_a, key=key_a.key, prompt_tokens=10, completion_tokens=5, cost=Decimal("2"))

    html = admin_client.get(url(Tenant, "change", tenant_a.pk)).content.decode()

    assert "Cost this month" in html and "42.00 / 100.00 (42%)" in html
    assert "Tokens this month" in html and "365 / 1,000 (36%)" in html
    assert "Requests per minute" in html and "2 / 600 (0%)" in html
    assert 'role="progressbar"' in html
    assert "Tokens today" not in html  # no daily budget: no bar


def test_the_key_page_shows_the_keys_own_quota(admin_client, key_a: IssuedKey):
    Quota.objects.create(tenant=key_a.key.tenant, key=key_a.key, daily_tokens=100)
    usage_record(1, tenant=key_a.key.tenant, key=key_a.key, prompt_tokens=80, completion_tokens=10)

    html = admin_client.get(url(ClientKey, "change", key_a.key.pk)).content.decode()

    assert "Tokens today" in html and "90 / 100 (90%)" in html
    assert "#d88a00" in html  # past 80 %: the warning colour


def make_tenants(start: int, stop: int) -> None:
    for i in range(start, stop):
        tenant = Tenant.objects.create(slug=f"t-{i}", name=f"T {i}")
        Quota.objects.create(tenant=tenant, rpm=60, monthly_tokens=1000)
        usage_record(i, tenant=tenant, key=key_issue(tenant, name="k").key)


def test_the_tenant_list_shows_quota_use_without_a_query_per_row(admin_client):
    make_tenants(0, 3)
    page = url(Tenant, "changelist")
    admin_client.get(page)
    with CaptureQueriesContext(connection) as few:
        assert "15 / 1,000" in admin_client.get(page).content.decode()
    make_tenants(3, 30)
    with CaptureQueriesContext(connection) as many:
        admin_client.get(page)

    assert len(many) == len(few)


# -- resets ---------------------------------------------------------------------------------------------


def test_resetting_a_tenants_month_is_recorded_and_reaches_every_gateway(
    admin_client, tenant_a: Tenant, key_a: IssuedKey
):
    data = {"action": "reset_month_counters", "_selected_action": [str(tenant_a.pk)]}

    response = admin_client.post(url(Tenant, "changelist"), data, follow=True)

    quota = Quota.objects.get(tenant=tenant_a, key__isnull=True)
    assert quota.month_counters_reset_at is not None and quota.day_counters_reset_at is None
    assert "Reset this month&#x27;s budget counters of 1 quota(s)" in response.content.decode()
    entry = LogEntry.objects.latest("pk")
    assert (entry.object_id, entry.get_change_message()) == (str(tenant_a.pk), "Reset this month's budget counters.")
    # Saved like any quota change, so the snapshot every process rebuilds carries it.
    (key_view,) = snapshot_build().keys_by_hash.values()
    assert key_view.tenant.quota.month_counters_reset_at == quota.month_counters_reset_at.timestamp()


def test_resetting_a_keys_day_counts_it_from_now(admin_client, key_a: IssuedKey):
    Quota.objects.create(tenant=key_a.key.tenant, key=key_a.key, daily_tokens=100)
    usage_record(1, tenant=key_a.key.tenant, key=key_a.key, prompt_tokens=95, completion_tokens=10)
    data = {"action": "reset_day_counters", "_selected_action": [str(key_a.key.pk)]}

    admin_client.post(url(ClientKey, "changelist"), data)

    assert Quota.objects.get(key=key_a.key).day_counters_reset_at is not None
    html = admin_client.get(url(ClientKey, "change", key_a.key.pk)).content.decode()
    assert "0 / 100 (0%)" in html  # the earlier record no longer counts today


# -- alert contacts ---------------------------------------------------------------------------------


def test_alert_contacts_are_saved_and_the_webhook_secret_never_comes_back(admin_client, tenant_a: Tenant):
    page = url(Tenant, "change", tenant_a.pk)
    data = form_data(admin_client.get(page))
    data.update(
        alert_emails="ops@team-a.example, lead@team-a.example",
        alert_webhook_url="https://hooks.team-a.example/budget",
        alert_webhook_secret=WEBHOOK_SECRET,
    )

    response = admin_client.post(page, data)

    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    tenant_a.refresh_from_db()
    assert tenant_a.alert_emails == ["ops@team-a.example", "lead@team-a.example"]
    assert tenant_a.alert_webhook_secret == WEBHOOK_SECRET
    for shown in (page, url(Tenant, "changelist"), url(Tenant, "history", tenant_a.pk)):
        assert WEBHOOK_SECRET not in admin_client.get(shown).content.decode(), shown
    assert all(WEBHOOK_SECRET not in e.change_message for e in LogEntry.objects.all())

    kept = form_data(admin_client.get(page))  # the secret field comes back blank: saving keeps it
    assert admin_client.post(page, kept).status_code == 302
    tenant_a.refresh_from_db()
    assert tenant_a.alert_webhook_secret == WEBHOOK_SECRET

    admin_client.post(page, {**kept, "clear_alert_webhook_secret": "on"})
    tenant_a.refresh_from_db()
    assert tenant_a.alert_webhook_secret == ""


def test_a_bad_alert_address_is_refused(admin_client, tenant_a: Tenant):
    page = url(Tenant, "change", tenant_a.pk)
    data = {**form_data(admin_client.get(page)), "alert_emails": "ops@team-a.example, not-an-address"}

    response = admin_client.post(page, data)

    assert "alert_emails" in response.context["adminform"].form.errors


def test_view_only_staff_see_whether_the_webhook_secret_is_set_not_its_value(django_user_model, tenant_a: Tenant):
    Tenant.objects.filter(pk=tenant_a.pk).update(alert_webhook_secret=WEBHOOK_SECRET)
    viewer = django_user_model.objects.create_user(username="viewer", password="unused", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename__in=["view_tenant", "view_quota"]))
    client = Client()
    client.force_login(viewer)

    html = client.get(url(Tenant, "change", tenant_a.pk)).content.decode()

    assert WEBHOOK_SECRET not in html
    assert "webhook secret" in html.lower() and ">set<" in html.replace("\n", "").replace(" ", "")


def test_alert_events_are_listed_with_their_delivery(admin_client, tenant_a: Tenant):
    AlertEvent.objects.create(
        tenant=tenant_a,
        budget=AlertEvent.Budget.MONTHLY_TOKENS,
        threshold=100,
        period_start=this_month().date(),
        used=Decimal(1010),
        limit=Decimal(1000),
        emailed_at=timezone.now(),
        last_error="webhook: https://hooks.example answered 500",
    )

    html = admin_client.get(url(AlertEvent, "changelist")).content.decode()

    assert "e-mail (failing: webhook: https://hooks.example answered 500)" in html
