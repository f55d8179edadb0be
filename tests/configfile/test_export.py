"""gateway_export: secrets redacted as ${ENV} references, and a lossless round trip with gateway_apply."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing.models import Price
from gateway.models import Deployment, Endpoint
from tenants.models import AccessPolicy, Quota, Tenant

AD_SECRET = "ad-client-secret-value-777"
WEBHOOK_SECRET = "whsec-team-a-value-555"


def export(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("gateway_export", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def apply(path: Path, *args: str) -> str:
    out = io.StringIO()
    call_command("gateway_apply", str(path), *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def cast(endpoint, ptu_deployment, standard_deployment, tenant_a, tenant_b, exhausted_tenant, key_a) -> None:
    """The shared cast, plus what exercises every corner of the format."""
    Endpoint.objects.create(
        name="west-ad",
        base_url="https://west.openai.azure.com",
        auth=Endpoint.Auth.AZURE_AD,
        ad_tenant_id="contoso-tenant",
        ad_client_id="client-1",
        ad_client_secret=AD_SECRET,
    )
    Deployment.objects.create(endpoint=endpoint, name="odd-${name}", model="gpt-4o-mini", upstream_model="gpt-4o")
    AccessPolicy.objects.filter(tenant=tenant_a).update(ip_allow=["10.0.0.0/8", "::1"], allowed_models=["gpt-4o"])
    Tenant.objects.filter(pk=tenant_a.pk).update(
        alert_emails=["ops@team-a.example", "lead@team-a.example"],
        alert_webhook_url="https://hooks.team-a.example/budget",
        alert_webhook_secret=WEBHOOK_SECRET,
    )
    Tenant.objects.filter(pk=tenant_b.pk).update(alert_emails=["b@team-b.example"])  # e-mail only
    Tenant.objects.create(slug="team-old", name="Old team", active=False)
    Quota.objects.create(tenant=tenant_a, key=key_a.key, rpm=5)  # per-key: not part of the file
    Price.objects.create(
        model="gpt-4o",
        input_per_million=Decimal("2.5"),
        cached_input_per_million=Decimal("1.25"),
        output_per_million=Decimal("10"),
        effective_from=datetime(2026, 1, 1, tzinfo=UTC),
    )
    Price.objects.create(
        model="gpt-4o",
        input_per_million=Decimal("2.123456"),
        output_per_million=Decimal("8"),
        effective_from=datetime(2026, 6, 1, 12, 30, tzinfo=UTC),
    )


@pytest.fixture
def secrets_in_env(monkeypatch: pytest.MonkeyPatch, endpoint) -> None:
    """What a user does after an export: set the variables it names to the real secrets."""
    monkeypatch.setenv("EAST_API_KEY", endpoint.api_key)
    monkeypatch.setenv("WEST_AD_AD_CLIENT_SECRET", AD_SECRET)
    monkeypatch.setenv("TEAM_A_ALERT_WEBHOOK_SECRET", WEBHOOK_SECRET)


@pytest.mark.django_db
def test_export_redacts_secrets_as_named_env_references(cast, tmp_path: Path) -> None:
    text, err = export()

    assert "upstream-secret-east" not in text and AD_SECRET not in text
    assert "api_key: ${EAST_API_KEY}" in text
    assert "client_secret: ${WEST_AD_AD_CLIENT_SECRET}" in text
    assert "EAST_API_KEY" in err and "WEST_AD_AD_CLIENT_SECRET" in err  # told which variables to set
    assert "name: odd-$${name}" in text  # a literal "${" is escaped, so apply does not expand it
    assert "team-old" in text and "active: false" in text
    assert WEBHOOK_SECRET not in text
    assert "webhook_secret: ${TEAM_A_ALERT_WEBHOOK_SECRET}" in text and "TEAM_A_ALERT_WEBHOOK_SECRET" in err
    assert "emails: [ops@team-a.example, lead@team-a.example]" in text

    export("-o", str(tmp_path / "out.yaml"))
    assert (tmp_path / "out.yaml").read_text() == text


@pytest.mark.django_db
def test_applying_an_export_to_the_same_database_changes_nothing(cast, secrets_in_env, tmp_path: Path) -> None:
    path = tmp_path / "exported.yaml"
    path.write_text(export()[0])

    with CaptureQueriesContext(connection) as queries:
        output = apply(path, "--prune")

    assert "0 to create, 0 to update, 0 to remove" in output
    assert Quota.objects.filter(key__isnull=False, rpm=5).exists()
    assert not [q for q in queries.captured_queries if q["sql"].startswith(("INSERT", "UPDATE", "DELETE"))]


@pytest.mark.django_db
def test_export_apply_to_an_empty_database_export_gives_the_same_text(cast, secrets_in_env, tmp_path: Path) -> None:
    first = export()[0]
    path = tmp_path / "exported.yaml"
    path.write_text(first)
    Endpoint.objects.all().delete()
    Tenant.objects.all().delete()
    Price.objects.all().delete()

    apply(path)

    assert export()[0] == first
    assert Endpoint.objects.get(name="east").api_key == "upstream-secret-east"
    assert Endpoint.objects.get(name="west-ad").ad_client_secret == AD_SECRET
    assert Quota.objects.get(tenant__slug="team-broke").monthly_tokens == 1  # a spent budget stays spent
    team_a = Tenant.objects.get(slug="team-a")
    assert (team_a.alert_webhook_secret, team_a.alert_emails[0]) == (WEBHOOK_SECRET, "ops@team-a.example")


@pytest.mark.django_db
def test_env_names_stay_unique_when_endpoint_names_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Endpoint.objects.create(name="east-1", base_url="https://a.example.com", api_key="secret-a")
    Endpoint.objects.create(name="east_1", base_url="https://b.example.com", api_key="secret-b")

    text = export()[0]

    assert "${EAST_1_API_KEY}" in text and "${EAST_1_API_KEY_2}" in text
    monkeypatch.setenv("EAST_1_API_KEY", "secret-a")
    monkeypatch.setenv("EAST_1_API_KEY_2", "secret-b")
    path = tmp_path / "exported.yaml"
    path.write_text(text)
    assert "0 to create, 0 to update, 0 to remove, 2 unchanged" in apply(path)


@pytest.mark.django_db
def test_an_empty_database_exports_a_valid_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(export()[0])

    assert "0 to create, 0 to update, 0 to remove, 0 unchanged" in apply(path)
