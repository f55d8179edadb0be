"""What the management API does with its resources: propagation, secrets, usage, paging, throttling."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.throttling import SimpleRateThrottle

from billing.models import Rollup
from gateway.api.throttling import ManagementUserThrottle
from gateway.models import Endpoint
from gateway.snapshot.build import snapshot_build
from gateway.snapshot.version import config_version_read
from tenants.auth import AuthFailure, authenticate

pytestmark = pytest.mark.django_db


@pytest.mark.django_db(transaction=True)  # real commits: the version moves on commit
def test_a_key_revoked_through_the_api_is_refused_by_the_next_snapshot(staff, key_a):
    before = config_version_read()
    assert authenticate(key_a.secret, snapshot_build().keys_by_hash, timezone.now()).id == key_a.key.pk
    assert staff.post(f"/api/v1/keys/{key_a.key.pk}/revoke/").status_code == 200
    # The version moved, so every process rebuilds; the rebuilt snapshot refuses the key.
    assert config_version_read() > before
    with pytest.raises(AuthFailure, match="revoked"):
        authenticate(key_a.secret, snapshot_build().keys_by_hash, timezone.now())


def test_a_key_issued_through_the_api_is_accepted_by_the_next_snapshot(staff, tenant_a):
    secret = staff.post("/api/v1/keys/", {"tenant": tenant_a.slug, "name": "new"}, format="json").json()["secret"]
    assert authenticate(secret, snapshot_build().keys_by_hash, timezone.now()).tenant.slug == tenant_a.slug


def test_endpoint_secrets_are_write_only(staff, endpoint):
    endpoint.api_key = "upstream-secret-1"
    endpoint.save()
    body = staff.get(f"/api/v1/endpoints/{endpoint.pk}/").json()
    assert body["api_key_set"] is True and "api_key" not in body
    assert "upstream-secret-1" not in staff.get("/api/v1/endpoints/").content.decode()


def test_moving_an_endpoint_clears_its_secrets_unless_given_again(staff, endpoint):
    endpoint.api_key = "upstream-secret-1"
    endpoint.save()
    moved = staff.patch(
        f"/api/v1/endpoints/{endpoint.pk}/", {"base_url": "https://elsewhere.example.com"}, format="json"
    )
    # Moved without a key: refused, since an API-key endpoint needs one; the stored key stays.
    assert moved.status_code == 400 and "api_key" in moved.json()
    endpoint.refresh_from_db()
    assert endpoint.api_key == "upstream-secret-1" and "elsewhere" not in endpoint.base_url
    again = staff.patch(
        f"/api/v1/endpoints/{endpoint.pk}/",
        {"base_url": "https://elsewhere.example.com", "api_key": "upstream-secret-2"},
        format="json",
    )
    assert again.status_code == 200, again.json()
    endpoint.refresh_from_db()
    assert endpoint.api_key == "upstream-secret-2"


def test_moving_an_azure_ad_endpoint_removes_the_stored_client_secret(staff, db):
    endpoint = Endpoint.objects.create(
        name="ad",
        base_url="https://a.openai.azure.com",
        auth=Endpoint.Auth.AZURE_AD,
        ad_tenant_id="t",
        ad_client_id="c",
        ad_client_secret="s3cret",
    )
    response = staff.patch(
        f"/api/v1/endpoints/{endpoint.pk}/", {"base_url": "https://b.openai.azure.com"}, format="json"
    )
    assert response.status_code == 400 and "ad_client_secret" in response.json()
    endpoint.refresh_from_db()
    assert endpoint.ad_client_secret == "s3cret"


def test_a_deployment_breaking_a_constraint_is_a_400_not_a_500(staff, endpoint):
    body = {"endpoint": endpoint.name, "name": "d", "model": "gpt-4o", "tier": 0}
    response = staff.post("/api/v1/deployments/", body, format="json")
    assert response.status_code == 400
    body = {"endpoint": endpoint.name, "name": "d", "model": "gpt-4o", "monthly_fixed_cost": "10.00"}
    assert staff.post("/api/v1/deployments/", body, format="json").status_code == 400  # standard SKU


def rollup(granularity: str, start: datetime, tenant_id: int, **kwargs) -> Rollup:
    return Rollup.objects.create(
        granularity=granularity, period_start=start, tenant_ref=tenant_id, computed_at=timezone.now(), **kwargs
    )


def test_usage_filters_by_granularity_time_range_tenant_key_model_and_deployment(staff, tenant_a, tenant_b, key_a):
    day = datetime(2026, 11, 3, tzinfo=UTC)
    wanted = rollup("hour", day + timedelta(hours=5), tenant_a.pk, key_ref=key_a.key.pk, model="gpt-4o",
                    deployment_ref=7, requests=4)  # fmt: skip
    rollup("day", day, tenant_a.pk, key_ref=key_a.key.pk, model="gpt-4o", deployment_ref=7, requests=4)
    rollup("hour", day + timedelta(hours=5), tenant_b.pk, model="gpt-4o", deployment_ref=7)
    rollup("hour", day + timedelta(hours=5), tenant_a.pk, key_ref=key_a.key.pk, model="gpt-4o-mini", deployment_ref=8)
    rollup("hour", day + timedelta(days=2), tenant_a.pk, key_ref=key_a.key.pk, model="gpt-4o", deployment_ref=7)
    query = {
        "granularity": "hour",
        "since": day.isoformat(),
        "until": (day + timedelta(days=1)).isoformat(),
        "tenant": tenant_a.slug,
        "key": key_a.key.pk,
        "model": "gpt-4o",
        "deployment": 7,
    }
    rows = staff.get("/api/v1/usage/", query).json()["results"]
    assert [row["id"] for row in rows] == [wanted.pk]
    assert rows[0]["requests"] == 4 and rows[0]["granularity"] == "hour"
    # Default granularity: day.
    assert {row["granularity"] for row in staff.get("/api/v1/usage/").json()["results"]} == {"day"}
    assert staff.get("/api/v1/usage/", {"granularity": "week"}).status_code == 400


def test_usage_pages_by_cursor_without_counting_the_table(staff, tenant_a):
    start = datetime(2026, 11, 1, tzinfo=UTC)
    for hour in range(7):
        rollup("hour", start + timedelta(hours=hour), tenant_a.pk, requests=hour)
    seen, url = [], "/api/v1/usage/?granularity=hour&page_size=3"
    with CaptureQueriesContext(connection) as queries:
        while url:
            page = staff.get(url).json()
            assert "count" not in page
            seen += [row["requests"] for row in page["results"]]
            url = page["next"]
    assert seen == [6, 5, 4, 3, 2, 1, 0]
    assert not [q for q in queries.captured_queries if "COUNT(" in q["sql"].upper() and "billing_rollup" in q["sql"]]


def test_lists_are_paged_filtered_and_ordered(staff, tenant_a, tenant_b, key_a, key_b):
    page = staff.get("/api/v1/keys/", {"page_size": 1, "ordering": "-name"}).json()
    assert page["count"] == 2 and len(page["results"]) == 1 and page["next"]
    assert [r["tenant"] for r in staff.get("/api/v1/keys/", {"tenant": tenant_b.slug}).json()["results"]] == [
        tenant_b.slug
    ]


def test_validation_errors_are_drf_field_errors(staff):
    response = staff.post("/api/v1/tenants/", {"slug": "not a slug!"}, format="json")
    assert response.status_code == 400
    assert set(response.json()) == {"slug", "name"}


def test_the_management_api_is_throttled_per_caller(staff, monkeypatch):
    monkeypatch.setattr(
        ManagementUserThrottle, "THROTTLE_RATES", {**SimpleRateThrottle.THROTTLE_RATES, "management": "3/min"}
    )
    codes = [staff.get("/api/v1/tenants/").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


def test_the_schema_and_the_docs_page_are_served_from_own_static_files(anonymous):
    schema = anonymous.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    assert schema.json()["openapi"].startswith("3.") and "/api/v1/keys/{id}/revoke/" in schema.json()["paths"]
    docs = anonymous.get("/api/docs/").content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in docs
    assert "cdn" not in docs.lower() and "unpkg" not in docs.lower()


@pytest.mark.django_db(transaction=True)  # the runtime builds its snapshot on a connection of its own
def test_deployment_status_serves_the_live_balancer_state(staff, standard_deployment):
    body = staff.get("/api/v1/deployment-status/").json()
    assert [row["id"] for row in body["deployments"]] == [standard_deployment.pk]
    assert body["shared_state"]["reachable"] is True and "gpt-4o" in body["queues"]


def test_the_schema_generates_without_a_warning_and_validates(tmp_path):
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert "/api/v1/usage/" in (tmp_path / "schema.yaml").read_text()


def test_a_nul_character_in_a_slug_or_a_filter_is_a_400_not_a_server_error(staff, tenant_a):
    # PostgreSQL cannot compare text with a NUL byte; SQLite finds nothing. Either way: the caller's input.
    created = staff.post("/api/v1/quotas/", {"tenant": "team\x00a", "rpm": 5}, format="json")
    assert created.status_code == 400, created.content
    listed = staff.get("/api/v1/keys/", {"tenant": "team\x00a"})
    assert listed.status_code in (200, 400), listed.content
    assert staff.get("/api/v1/tenants/team%00a/").status_code in (400, 404)
