"""Every admin page renders, endpoint secrets never reach a page, and big lists stay cheap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Group
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from billing.models import ParkedUsageRecord, Price, Rollup, Statement, UsageRecord
from billing.paginator import EstimatedCountPaginator
from gateway.admin_forms import EndpointAdminForm
from gateway.models import ConfigVersion, Deployment, Endpoint
from tenants.models import AccessPolicy, AlertEvent, Membership, Quota, Tenant
from tenants.services import key_issue, management_token_issue

UPSTREAM_SECRET = "sk-upstream-XYZ"


def url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def usage_record(n: int, *, tenant=None, key=None, started_at=None, **fields) -> UsageRecord:
    defaults = {
        "request_id": f"req-{n}",
        "tenant": tenant,
        "key": key,
        "model": "gpt-4o",
        "deployment_name": "east/gpt4o-ptu",
        "route": "chat",
        "status": 200,
        "outcome": UsageRecord.Outcome.OK,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost": Decimal("0.0001"),
        "latency_ms": 120.0,
        "started_at": started_at or timezone.now(),
    }
    return UsageRecord.objects.create(**{**defaults, **fields})


@pytest.fixture
def one_of_each(db, admin_user, endpoint, ptu_deployment, standard_deployment, tenant_a, tenant_b, key_a):
    """At least one row of every model the admin shows (add one here when registering a model)."""
    Quota.objects.create(tenant=tenant_a, key=key_a.key, rpm=10)
    Membership.objects.create(user=admin_user, tenant=tenant_a, role=Membership.Role.ADMIN)
    Price.objects.create(
        model="gpt-4o",
        input_per_million=Decimal("2.5"),
        output_per_million=Decimal("10"),
        effective_from=timezone.now() - timedelta(days=1),
    )
    usage_record(1, tenant=tenant_a, key=key_a.key, deployment=ptu_deployment)
    Rollup.objects.create(
        granularity=Rollup.Granularity.HOUR,
        period_start=timezone.now().replace(minute=0),
        tenant_ref=tenant_a.pk,
        key_ref=key_a.key.pk,
        key_prefix=key_a.key.prefix,
        model="gpt-4o",
        requests=1,
        computed_at=timezone.now(),
    )
    Statement.objects.create(
        tenant=tenant_a,
        month=timezone.now().date().replace(day=1),
        requests=1,
        lines=[{"model": "gpt-4o", "key": "app-a", "requests": 1, "cost": "0.1"}],
        provisioned=[{"deployment": "east/gpt4o-ptu", "tokens": 10, "share": "1", "charge": "5.00"}],
        computed_at=timezone.now(),
    )
    Group.objects.create(name="operators")
    management_token_issue(
        name="lead", created_by=admin_user, expires_at=timezone.now() + timedelta(days=1), tenant=tenant_a
    )
    ParkedUsageRecord.objects.create(
        request_id="req-refused", record={"request_id": "req-refused", "model": "gpt-4o"}, error="IntegrityError: x"
    )
    AlertEvent.objects.create(
        tenant=tenant_a,
        budget=AlertEvent.Budget.MONTHLY_COST,
        threshold=80,
        period_start=timezone.now().date().replace(day=1),
        used=Decimal("80.5"),
        limit=Decimal("100"),
    )


def registered():
    return sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)


def test_site_header_names_the_gateway(admin_client):
    response = admin_client.get(reverse("admin:index"))
    assert response.status_code == 200
    assert "LLM Gateway" in response.content.decode()


def test_config_version_is_not_editable_in_the_admin():
    assert ConfigVersion not in admin.site._registry


@pytest.mark.parametrize(
    ("model", "model_admin"), registered(), ids=lambda v: getattr(v, "_meta", None) and v._meta.label
)
def test_every_changelist_add_and_change_page_renders(admin_client, admin_user, one_of_each, model, model_admin):
    assert admin_client.get(url(model, "changelist")).status_code == 200

    request = RequestFactory().get("/")
    request.user = admin_user
    add = admin_client.get(url(model, "add"))
    assert add.status_code == (200 if model_admin.has_add_permission(request) else 403)

    obj = model._default_manager.order_by("pk").first()
    assert obj is not None, f"add a {model.__name__} to the one_of_each fixture"
    change = admin_client.get(url(model, "change", obj.pk))
    assert change.status_code == 200
    assert escape(str(obj)) in change.content.decode()


@pytest.mark.parametrize(
    ("model", "model_admin"), registered(), ids=lambda v: getattr(v, "_meta", None) and v._meta.label
)
def test_every_autocomplete_field_answers(admin_client, one_of_each, model, model_admin):
    for field_name in model_admin.autocomplete_fields:
        params = {"app_label": model._meta.app_label, "model_name": model._meta.model_name, "field_name": field_name}
        assert admin_client.get(reverse("admin:autocomplete"), params).status_code == 200


def test_parked_usage_records_are_listed_with_their_count_and_error_and_cannot_be_changed(admin_client):
    for i in range(3):
        ParkedUsageRecord.objects.create(
            request_id=f"req-bad-{i}",
            record={"request_id": f"req-bad-{i}", "model": "gpt-4o", "status": 200, "prompt_tokens": -1},
            error='IntegrityError: new row violates check constraint "billing_usagerecord_prompt_tokens_check"',
        )
    page = " ".join(admin_client.get(url(ParkedUsageRecord, "changelist")).content.decode().split())
    assert "3 parked usage records" in page
    assert "billing_usagerecord_prompt_tokens_check" in page
    parked = ParkedUsageRecord.objects.get(request_id="req-bad-1")
    change = admin_client.post(url(ParkedUsageRecord, "change", parked.pk), {"error": "edited"})
    assert change.status_code == 403
    assert admin_client.post(url(ParkedUsageRecord, "delete", parked.pk), {"post": "yes"}).status_code == 403
    assert ParkedUsageRecord.objects.count() == 3


# --- endpoint secrets ------------------------------------------------------------------------


def endpoint_data(endpoint: Endpoint | None = None, **overrides) -> dict[str, str]:
    """POST data for the endpoint add/change page, its deployments inline included unchanged."""
    data = {
        "name": "west",
        "kind": "azure",
        "base_url": "https://west.example.com",
        "api_version": "2024-10-21",
        "enabled": "on",
        "auth": "api_key",
        "api_key": "",
        "ad_tenant_id": "",
        "ad_client_id": "",
        "ad_client_secret": "",
        "ad_authority": "https://login.microsoftonline.com",
        "connect_timeout": "5",
        "first_byte_timeout": "60",
        "total_timeout": "600",
    }
    deployments = list(endpoint.deployments.order_by("pk")) if endpoint else []
    if endpoint:
        data.update(
            name=endpoint.name,
            kind=endpoint.kind,
            base_url=endpoint.base_url,
            auth=endpoint.auth,
            ad_tenant_id=endpoint.ad_tenant_id,
            ad_client_id=endpoint.ad_client_id,
        )
    data.update(
        {
            "deployments-TOTAL_FORMS": str(len(deployments)),
            "deployments-INITIAL_FORMS": str(len(deployments)),
            "deployments-MIN_NUM_FORMS": "0",
            "deployments-MAX_NUM_FORMS": "1000",
        }
    )
    for i, d in enumerate(deployments):
        prefix = f"deployments-{i}-"
        data.update(
            {
                prefix + "id": str(d.pk),
                prefix + "endpoint": str(endpoint.pk),
                prefix + "name": d.name,
                prefix + "model": d.model,
                prefix + "sku": d.sku,
                prefix + "tier": str(d.tier),
                prefix + "rpm": str(d.rpm),
                prefix + "tpm": str(d.tpm),
                prefix + "max_wait_seconds": str(d.max_wait_seconds),
                prefix + "weight": str(d.weight),
                prefix + "context_window": str(d.context_window),
                prefix + "max_output_tokens": str(d.max_output_tokens),
                prefix + "enabled": "on",
            }
        )
    data.update(overrides)
    return data


def with_new_deployment(data: dict[str, str]) -> dict[str, str]:
    i = int(data["deployments-TOTAL_FORMS"])
    prefix = f"deployments-{i}-"
    return {
        **data,
        "deployments-TOTAL_FORMS": str(i + 1),
        prefix + "name": "gpt4o-west",
        prefix + "model": "gpt-4o",
        prefix + "sku": "standard",
        prefix + "tier": "1",
        prefix + "rpm": "60",
        prefix + "tpm": "1000",
        prefix + "max_wait_seconds": "0",
        prefix + "weight": "1",
        prefix + "context_window": "128000",
        prefix + "max_output_tokens": "4096",
        prefix + "enabled": "on",
    }


def test_endpoint_secret_is_saved_but_never_shown(admin_client):
    response = admin_client.post(url(Endpoint, "add"), with_new_deployment(endpoint_data(api_key=UPSTREAM_SECRET)))
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    endpoint = Endpoint.objects.get(name="west")
    deployment = endpoint.deployments.get()
    assert endpoint.api_key == UPSTREAM_SECRET

    pages = [
        url(Endpoint, "changelist"),
        url(Endpoint, "change", endpoint.pk),
        url(Endpoint, "history", endpoint.pk),
        url(Endpoint, "delete", endpoint.pk),
        url(Deployment, "changelist"),
        url(Deployment, "change", deployment.pk),
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        assert UPSTREAM_SECRET not in response.content.decode(), page
    change_page = admin_client.get(url(Endpoint, "change", endpoint.pk)).content.decode()
    assert "set" in change_page and "Leave blank to keep the stored value" in change_page
    for entry in LogEntry.objects.all():
        assert UPSTREAM_SECRET not in f"{entry.object_repr} {entry.change_message}"


def test_blank_secret_keeps_the_stored_one_and_a_typed_one_replaces_it(admin_client, endpoint, ptu_deployment):
    stored = endpoint.api_key
    response = admin_client.post(
        url(Endpoint, "change", endpoint.pk), endpoint_data(endpoint, api_version="2025-01-01")
    )
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    endpoint.refresh_from_db()
    assert endpoint.api_key == stored and endpoint.api_version == "2025-01-01"
    # "Changed Api version", not "Changed API key": a blank secret is no change.
    assert "API key" not in LogEntry.objects.latest("pk").get_change_message()

    admin_client.post(url(Endpoint, "change", endpoint.pk), endpoint_data(endpoint, api_key="sk-rotated"))
    endpoint.refresh_from_db()
    assert endpoint.api_key == "sk-rotated"


def test_a_secret_can_be_removed_when_the_auth_no_longer_needs_it(admin_client, endpoint):
    data = endpoint_data(
        endpoint, auth="azure_ad", ad_tenant_id="t", ad_client_id="c", ad_client_secret="s3cret", clear_api_key="on"
    )
    assert admin_client.post(url(Endpoint, "change", endpoint.pk), data).status_code == 302
    endpoint.refresh_from_db()
    assert (endpoint.api_key, endpoint.ad_client_secret) == ("", "s3cret")


def test_api_key_auth_needs_a_key(admin_client, endpoint):
    response = admin_client.post(url(Endpoint, "add"), endpoint_data())
    assert response.status_code == 200
    assert "api_key" in response.context["adminform"].form.errors
    assert not Endpoint.objects.filter(name="west").exists()

    response = admin_client.post(url(Endpoint, "change", endpoint.pk), endpoint_data(endpoint, clear_api_key="on"))
    assert "api_key" in response.context["adminform"].form.errors


def test_azure_ad_auth_needs_tenant_client_and_secret(admin_client):
    response = admin_client.post(url(Endpoint, "add"), endpoint_data(auth="azure_ad", api_key=UPSTREAM_SECRET))
    errors = response.context["adminform"].form.errors
    assert {"ad_tenant_id", "ad_client_id", "ad_client_secret"} <= set(errors)
    assert UPSTREAM_SECRET not in response.content.decode()  # not even echoed back on an error


def test_endpoint_form_never_renders_stored_secrets(endpoint):
    endpoint.ad_client_secret = "ad-secret-123"
    html = str(EndpointAdminForm(instance=endpoint))
    assert endpoint.api_key not in html and "ad-secret-123" not in html


def test_a_quota_cannot_name_another_tenants_key(admin_client, tenant_b, key_a):
    data = {
        "tenant": str(tenant_b.pk),
        "key": str(key_a.key.pk),
        "rpm": "1",
        "tpm": "1",
        "daily_tokens": "0",
        "monthly_tokens": "0",
        "monthly_cost": "0",
        "alert_thresholds": "50, 80",
    }
    response = admin_client.post(url(Quota, "add"), data)
    assert "key" in response.context["adminform"].form.errors
    assert not Quota.objects.filter(key=key_a.key).exists()


def test_policy_networks_are_checked_and_normalised(admin_client, tenant_b):
    data = {
        "tenant": str(tenant_b.pk),
        "allowed_models": "gpt-4o",
        "ip_allow": "10.0.0.0/8, 192.168.1.7",
        "ip_deny": "not-a-network",
        "max_tokens_cap": "0",
    }
    response = admin_client.post(url(AccessPolicy, "add"), data)
    assert "ip_deny" in response.context["adminform"].form.errors
    response = admin_client.post(url(AccessPolicy, "add"), {**data, "ip_deny": ""})
    assert response.status_code == 302
    assert AccessPolicy.objects.get(tenant=tenant_b).ip_allow == ["10.0.0.0/8", "192.168.1.7/32"]


# --- query counts ----------------------------------------------------------------------------


def queries_for(client, page: str) -> int:
    client.get(page)  # warm caches (content types, sessions) so both counts are like for like
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(page).status_code == 200
    return len(ctx)


def make_deployments(start: int, stop: int) -> None:
    for i in range(start, stop):
        endpoint = Endpoint.objects.create(name=f"ep-{i}", base_url="https://x.example.com", api_key=f"k{i}")
        Deployment.objects.create(endpoint=endpoint, name=f"d-{i}", model="gpt-4o")


def make_usage(start: int, stop: int) -> None:
    for i in range(start, stop):
        tenant = Tenant.objects.create(slug=f"t-{i}", name=f"T {i}")
        usage_record(i, tenant=tenant, key=key_issue(tenant, name="k").key)


@pytest.mark.parametrize(("model", "make"), [(Deployment, make_deployments), (UsageRecord, make_usage)])
def test_changelist_queries_do_not_grow_with_rows(admin_client, model, make):
    make(0, 3)
    few = queries_for(admin_client, url(model, "changelist"))
    make(3, 30)
    assert queries_for(admin_client, url(model, "changelist")) == few


# --- usage records ---------------------------------------------------------------------------


def test_usage_records_are_read_only(admin_client, admin_user, tenant_a):
    record = usage_record(1, tenant=tenant_a)
    model_admin = admin.site._registry[UsageRecord]
    request = RequestFactory().get("/")
    request.user = admin_user
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, record)
    assert not model_admin.has_delete_permission(request, record)
    assert model_admin.get_actions(request) == {}

    assert admin_client.get(url(UsageRecord, "add")).status_code == 403
    assert admin_client.get(url(UsageRecord, "delete", record.pk)).status_code == 403
    change = admin_client.get(url(UsageRecord, "change", record.pk))
    assert change.status_code == 200
    assert not change.context["adminform"].form.fields  # every field shown read-only
    assert admin_client.post(url(UsageRecord, "change", record.pk), {"status": "500"}).status_code == 403
    record.refresh_from_db()
    assert record.status == 200


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?outcome=ok",
        "?status=5xx",
        "?route=chat",
        "?streamed__exact=1",
        "?q=req-3",
        "?_facets=1",
        "?started_at__year=2024",
        "?started_at__year=2024&started_at__month=3",
    ],
)
def test_usage_changelist_never_counts_or_scans_the_table(admin_client, tenant_a, query):
    for i in range(5):
        usage_record(i, tenant=tenant_a, started_at=datetime(2023 + i % 2, 3, 1 + i, tzinfo=UTC))
    with CaptureQueriesContext(connection) as ctx:
        assert admin_client.get(url(UsageRecord, "changelist") + query).status_code == 200
    usage_sql = [q["sql"] for q in ctx if UsageRecord._meta.db_table in q["sql"]]
    assert usage_sql
    for sql in usage_sql:
        if "COUNT(" in sql.upper():
            assert "LIMIT" in sql.upper(), sql  # bounded: at most count_limit + 1 rows
        assert "DISTINCT" not in sql.upper(), sql  # filter choices and date links come from elsewhere


def test_usage_search_is_exact(admin_client, tenant_a):
    usage_record(1, tenant=tenant_a)
    usage_record(2, tenant=tenant_a, request_id="req-12")
    response = admin_client.get(url(UsageRecord, "changelist"), {"q": "req-1"})
    assert list(response.context["cl"].result_list.values_list("request_id", flat=True)) == ["req-1"]


def test_usage_date_links_span_the_table_without_scanning_it(admin_client, tenant_a):
    usage_record(1, tenant=tenant_a, started_at=datetime(2023, 11, 5, tzinfo=UTC))
    usage_record(2, tenant=tenant_a, started_at=datetime(2025, 2, 7, tzinfo=UTC))
    years = admin_client.get(url(UsageRecord, "changelist")).context["cl"].date_nav
    assert [c["title"] for c in years["choices"]] == ["2023", "2024", "2025"]

    months = admin_client.get(url(UsageRecord, "changelist"), {"started_at__year": "2025"})
    assert [c["title"] for c in months.context["cl"].date_nav["choices"]] == ["January 2025", "February 2025"]
    assert list(months.context["cl"].result_list.values_list("request_id", flat=True)) == ["req-2"]

    days = admin_client.get(url(UsageRecord, "changelist"), {"started_at__year": "2023", "started_at__month": "11"})
    assert [c["title"] for c in days.context["cl"].date_nav["choices"]][:1] == ["November 5"]


def test_usage_list_says_more_than_when_the_count_stops(admin_client, tenant_a, monkeypatch):
    monkeypatch.setattr(EstimatedCountPaginator, "count_limit", 3)
    for i in range(5):
        usage_record(i, tenant=tenant_a)
    response = admin_client.get(url(UsageRecord, "changelist"))
    assert response.context["cl"].paginator.count_kind == "at_least"
    assert "more than 3" in response.content.decode()


# --- the paginator ---------------------------------------------------------------------------


def test_paginator_counts_exactly_below_its_limit(tenant_a):
    for i in range(4):
        usage_record(i, tenant=tenant_a)
    paginator = EstimatedCountPaginator(UsageRecord.objects.all(), 2)
    assert (paginator.count, paginator.count_kind, paginator.num_pages) == (4, "exact", 2)


def test_paginator_stops_counting_at_its_limit_and_caps_pages(tenant_a, monkeypatch):
    monkeypatch.setattr(EstimatedCountPaginator, "count_limit", 5)
    for i in range(9):
        usage_record(i, tenant=tenant_a)
    paginator = EstimatedCountPaginator(UsageRecord.objects.all(), 2)
    assert (paginator.count, paginator.count_kind, paginator.num_pages) == (6, "at_least", 3)


def test_paginator_trusts_a_large_estimate_without_counting(db, monkeypatch):
    monkeypatch.setattr(EstimatedCountPaginator, "planner_estimate", lambda self, qs: 300_000_000)
    paginator = EstimatedCountPaginator(UsageRecord.objects.all(), 100)
    with CaptureQueriesContext(connection) as ctx:
        assert paginator.count == 300_000_000
    assert len(ctx) == 0
    assert paginator.count_kind == "estimate"
    assert paginator.num_pages == EstimatedCountPaginator.count_limit // 100


def test_paginator_counts_when_the_estimate_is_small(tenant_a, monkeypatch):
    monkeypatch.setattr(EstimatedCountPaginator, "planner_estimate", lambda self, qs: 7)
    usage_record(1, tenant=tenant_a)
    paginator = EstimatedCountPaginator(UsageRecord.objects.all(), 100)
    assert (paginator.count, paginator.count_kind) == (1, "exact")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the planner estimate exists on PostgreSQL only")
def test_postgresql_planner_estimates_are_read(tenant_a):
    for i in range(20):
        usage_record(i, tenant=tenant_a)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {UsageRecord._meta.db_table}")
    paginator = EstimatedCountPaginator(UsageRecord.objects.all(), 100)
    assert paginator.planner_estimate(UsageRecord.objects.order_by()) == 20
    assert paginator.planner_estimate(UsageRecord.objects.filter(tenant=tenant_a).order_by()) > 0


def test_usage_list_shows_the_key_prefix_not_its_hash(admin_client, key_a, tenant_a):
    usage_record(1, tenant=tenant_a, key=key_a.key)
    content = admin_client.get(url(UsageRecord, "changelist")).content.decode()
    assert key_a.key.prefix in content
    assert key_a.key.key_hash not in content
