"""gateway_apply: plans, idempotence, dry runs, pruning, and files that must be refused whole."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing.models import Price, UsageRecord
from gateway.models import ConfigVersion, Deployment, Endpoint
from tenants.models import AccessPolicy, Quota, Tenant

SECRET = "upstream-secret-value-4242"

BASE = """\
version: 1
endpoints:
  - name: east
    kind: azure
    base_url: https://east.openai.azure.com
    api_key: ${AZURE_EAST_KEY}
    api_version: 2024-10-21
    timeouts: {connect: 5, first_byte: 60, total: 600}
    deployments:
      - name: gpt4o-ptu
        model: gpt-4o
        sku: provisioned
        tier: 1
        max_wait_seconds: 1
        rpm: 600
        tpm: 100000
      - name: gpt4o-paygo
        model: gpt-4o
        tier: 2
        rpm: 300
tenants:
  - slug: team-a
    name: Team A
    quota: {rpm: 600, tpm: 100000, monthly_cost: 100.0, alert_thresholds: [50, 80, 100]}
    policy: {allowed_models: [gpt-4o], ip_allow: [10.0.0.0/8], ip_deny: [], max_tokens_cap: 4096}
prices:
  - model: gpt-4o
    input_per_million: 2.50
    cached_input_per_million: 1.25
    output_per_million: 10.00
    effective_from: 2026-01-01
"""

EXTRA_ENDPOINT = """\
  - name: west
    base_url: https://west.openai.azure.com
    api_key: ${AZURE_EAST_KEY}
    deployments:
      - {name: gpt4o-west, model: gpt-4o, tier: 2}
"""

EXTRA_TENANT = """\
  - slug: team-b
    name: Team B
"""

EXTRA_PRICE = """\
  - model: gpt-4o-mini
    input_per_million: 0.15
    output_per_million: 0.60
    effective_from: 2026-01-01
"""


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_EAST_KEY", SECRET)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def apply(path: Path | str, *args: str) -> str:
    out = io.StringIO()
    call_command("gateway_apply", str(path), *args, stdout=out)
    return out.getvalue()


def state() -> dict[str, list[dict[str, Any]]]:
    """Every row the file manages, timestamps included, to prove nothing was written."""
    return {
        model.__name__: list(model.objects.order_by("pk").values())
        for model in (Endpoint, Deployment, Tenant, Quota, AccessPolicy, Price, ConfigVersion)
    }


def with_everything() -> str:
    """BASE plus a second endpoint, a second tenant and a second price."""
    return (
        BASE.replace("tenants:\n", EXTRA_ENDPOINT + "tenants:\n").replace("prices:\n", EXTRA_TENANT + "prices:\n")
        + EXTRA_PRICE
    )


# --- creating, and applying again ----------------------------------------------------------------


@pytest.mark.django_db
def test_apply_creates_everything_the_file_names(tmp_path: Path) -> None:
    output = apply(write(tmp_path, BASE))

    endpoint = Endpoint.objects.get(name="east")
    assert endpoint.api_key == SECRET
    assert (endpoint.connect_timeout, endpoint.first_byte_timeout, endpoint.total_timeout) == (5, 60, 600)
    ptu = Deployment.objects.get(endpoint=endpoint, name="gpt4o-ptu")
    assert (ptu.model, ptu.sku, ptu.tier, ptu.max_wait_seconds, ptu.rpm, ptu.tpm) == (
        "gpt-4o",
        "provisioned",
        1,
        1.0,
        600,
        100_000,
    )
    paygo = Deployment.objects.get(endpoint=endpoint, name="gpt4o-paygo")
    assert (paygo.sku, paygo.tier, paygo.context_window) == ("standard", 2, 128_000)  # model defaults
    tenant = Tenant.objects.get(slug="team-a")
    assert tenant.name == "Team A" and tenant.active
    quota = Quota.objects.get(tenant=tenant, key__isnull=True)
    assert (quota.rpm, quota.monthly_cost, quota.alert_thresholds) == (600, Decimal("100"), [50, 80, 100])
    assert tenant.policy.ip_allow == ["10.0.0.0/8"] and tenant.policy.max_tokens_cap == 4096
    price = Price.objects.get(model="gpt-4o")
    assert price.input_per_million == Decimal("2.5")
    assert price.effective_from == datetime(2026, 1, 1, tzinfo=UTC)

    assert "+ endpoint east" in output
    assert "+ deployment east/gpt4o-ptu (model gpt-4o" in output
    assert "+ quota team-a" in output and "+ policy team-a" in output
    assert "7 to create, 0 to update, 0 to remove, 0 unchanged" in output
    assert SECRET not in output


@pytest.mark.django_db
def test_second_apply_reports_no_changes_and_writes_nothing(
    tmp_path: Path, django_capture_on_commit_callbacks: Any
) -> None:
    path = write(tmp_path, BASE)
    apply(path)
    before = state()

    with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks() as callbacks:
        output = apply(path)

    writes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith(("INSERT", "UPDATE", "DELETE"))]
    assert writes == []
    assert callbacks == []  # no save, so no config version bump queued
    assert len(queries.captured_queries) <= 10  # a fixed handful of reads, not one per row
    assert state() == before
    assert "0 to create, 0 to update, 0 to remove, 7 unchanged" in output
    assert "No changes" in output


@pytest.mark.django_db
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    apply(write(tmp_path, BASE))
    before = state()

    output = apply(write(tmp_path, with_everything().replace("rpm: 300", "rpm: 900")), "--dry-run")

    assert state() == before
    assert "+ endpoint west" in output
    assert "~ deployment east/gpt4o-paygo: rpm" in output
    assert "Dry run: nothing was written." in output


@pytest.mark.django_db
def test_a_changed_field_is_updated_and_reported_by_name_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apply(write(tmp_path, BASE))
    tenant_stamp = Tenant.objects.get(slug="team-a").updated_at
    monkeypatch.setenv("AZURE_EAST_KEY", "rotated-secret-value-9999")
    changed = (
        BASE.replace("https://east.openai.azure.com", "https://east2.openai.azure.com")
        .replace("rpm: 300", "rpm: 900")
        .replace("connect: 5,", "connect: 3,")
        .replace("ip_allow: [10.0.0.0/8]", "ip_allow: [10.0.0.0/8, 192.168.0.0/16]")
    )

    output = apply(write(tmp_path, changed))

    assert "~ endpoint east: base_url, api_key, timeouts.connect" in output
    assert "~ deployment east/gpt4o-paygo: rpm" in output
    assert "~ policy team-a: ip_allow" in output
    assert "0 to create, 3 to update, 0 to remove, 4 unchanged" in output
    assert "rotated-secret-value-9999" not in output and SECRET not in output
    endpoint = Endpoint.objects.get(name="east")
    assert (endpoint.base_url, endpoint.api_key, endpoint.connect_timeout) == (
        "https://east2.openai.azure.com",
        "rotated-secret-value-9999",
        3.0,
    )
    assert Deployment.objects.get(name="gpt4o-paygo").rpm == 900
    assert Tenant.objects.get(slug="team-a").updated_at == tenant_stamp  # unchanged rows are not saved


@pytest.mark.django_db
def test_alert_contacts_are_applied_and_reported_by_name_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apply(write(tmp_path, BASE))
    monkeypatch.setenv("TEAM_A_HOOK_SECRET", "whsec-applied-value-31")
    alerts = (
        "    alerts:\n"
        "      emails: [ops@team-a.example]\n"
        "      webhook_url: https://hooks.team-a.example/budget\n"
        "      webhook_secret: ${TEAM_A_HOOK_SECRET}\n"
    )

    output = apply(write(tmp_path, BASE.replace("    name: Team A\n", "    name: Team A\n" + alerts)))

    assert "~ tenant team-a: alerts.emails, alerts.webhook_url, alerts.webhook_secret" in output
    assert "whsec-applied-value-31" not in output
    tenant = Tenant.objects.get(slug="team-a")
    assert (tenant.alert_emails, tenant.alert_webhook_url, tenant.alert_webhook_secret) == (
        ["ops@team-a.example"],
        "https://hooks.team-a.example/budget",
        "whsec-applied-value-31",
    )
    assert "0 to create, 0 to update" in apply(write(tmp_path, BASE))  # no alerts block: left as they are


@pytest.mark.django_db
def test_a_file_that_moves_an_endpoint_without_its_key_leaves_it_keyless_and_says_so(tmp_path: Path) -> None:
    apply(write(tmp_path, BASE))
    moved = BASE.replace("https://east.openai.azure.com", "https://east2.openai.azure.com").replace(
        "    api_key: ${AZURE_EAST_KEY}\n", ""
    )

    planned = apply(write(tmp_path, moved), "--dry-run")
    assert Endpoint.objects.get(name="east").api_key == SECRET  # a dry run writes nothing
    output = apply(write(tmp_path, moved))

    line = "~ endpoint east: base_url, api_key (api_key removed: base_url changed and the file does not give it again)"
    assert line in planned and line in output
    assert SECRET not in output
    endpoint = Endpoint.objects.get(name="east")
    assert (endpoint.base_url, endpoint.api_key) == ("https://east2.openai.azure.com", "")


@pytest.mark.django_db
def test_a_file_that_drops_a_key_without_moving_the_endpoint_says_it_is_removed(tmp_path: Path) -> None:
    apply(write(tmp_path, BASE))
    output = apply(write(tmp_path, BASE.replace("    api_key: ${AZURE_EAST_KEY}\n", "")))
    assert "~ endpoint east: api_key (api_key removed: the file gives none)" in output
    assert Endpoint.objects.get(name="east").api_key == ""


@pytest.mark.django_db
def test_a_file_that_moves_an_endpoint_and_gives_its_key_keeps_it(tmp_path: Path) -> None:
    apply(write(tmp_path, BASE))
    output = apply(write(tmp_path, BASE.replace("https://east.openai.azure.com", "https://east2.openai.azure.com")))
    assert "~ endpoint east: base_url\n" in output and "removed" not in output
    assert Endpoint.objects.get(name="east").api_key == SECRET


# --- pruning ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_without_prune_rows_missing_from_the_file_are_left_alone(tmp_path: Path) -> None:
    apply(write(tmp_path, with_everything()))
    before = state()

    output = apply(write(tmp_path, BASE))

    assert state() == before
    assert "4 not in the file, left alone (--prune removes them)" in output  # west, its deployment, team-b, a price


@pytest.mark.django_db
def test_prune_deletes_endpoints_deployments_prices_and_deactivates_tenants(tmp_path: Path) -> None:
    apply(write(tmp_path, with_everything()))
    team_b = Tenant.objects.get(slug="team-b")
    UsageRecord.objects.create(
        request_id="r1", tenant=team_b, route="chat", status=200, outcome="ok", started_at=timezone.now()
    )
    paygo = "      - name: gpt4o-paygo\n        model: gpt-4o\n        tier: 2\n        rpm: 300\n"
    without_paygo = BASE.replace(paygo, "")

    output = apply(write(tmp_path, without_paygo), "--prune")

    assert not Endpoint.objects.filter(name="west").exists()
    assert list(Deployment.objects.values_list("name", flat=True)) == ["gpt4o-ptu"]
    assert list(Price.objects.values_list("model", flat=True)) == ["gpt-4o"]
    team_b.refresh_from_db()
    assert team_b.active is False  # deactivated, not deleted
    assert UsageRecord.objects.filter(tenant=team_b).count() == 1  # its history survives
    assert "- endpoint west" in output
    assert "- deployment west/gpt4o-west" in output and "- deployment east/gpt4o-paygo" in output
    assert "- price gpt-4o-mini from 2026-01-01" in output
    assert "- tenant team-b: deactivated, not deleted" in output
    assert "0 to create, 0 to update, 5 to remove (1 tenant deactivated, not deleted)" in output


@pytest.mark.django_db
def test_prune_removes_a_quota_and_policy_the_file_no_longer_gives(tmp_path: Path) -> None:
    apply(write(tmp_path, BASE))
    bare = BASE.replace("    quota: {rpm: 600", "    #").replace("    policy: {allowed", "    #")

    kept = apply(write(tmp_path, bare))
    assert Quota.objects.filter(tenant__slug="team-a").exists()  # omitted block: left alone
    assert "2 not in the file, left alone" in kept

    pruned = apply(write(tmp_path, bare), "--prune")
    assert not Quota.objects.filter(tenant__slug="team-a").exists()
    assert not AccessPolicy.objects.filter(tenant__slug="team-a").exists()
    assert "- quota team-a (not in the file: the tenant's limits and budgets are lifted)" in pruned


# --- files that are refused ----------------------------------------------------------------------

# (what to break in BASE, fragments the error must contain)
BAD_FILES = {
    "malformed yaml": (
        ("    kind: azure\n", "    kind: azure\n   oops: [\n"),
        ["gateway.yaml: line ", "column ", "malformed YAML"],
    ),
    "unknown field": (
        ("        rpm: 600\n", "        rmp: 600\n"),
        ["gateway.yaml: endpoints[0] (east) > deployments[0] (gpt4o-ptu).rmp: unknown field; did you mean 'rpm'?"],
    ),
    "wrong type": (
        ("        tpm: 100000\n", "        tpm: lots\n"),
        ["endpoints[0] (east) > deployments[0] (gpt4o-ptu).tpm: Input should be a valid integer"],
    ),
    "negative number": (
        ("        tier: 2\n", "        tier: 0\n"),
        ["endpoints[0] (east) > deployments[1] (gpt4o-paygo).tier: Input should be greater than or equal to 1"],
    ),
    "unknown enum value": (
        ("    kind: azure\n", "    kind: bedrock\n"),
        ["endpoints[0] (east).kind: Input should be 'azure' or 'openai'"],
    ),
    "missing env var": (
        ("${AZURE_EAST_KEY}", "${NOT_SET_ANYWHERE}"),
        ["gateway.yaml: endpoints[0] (east).api_key: environment variable NOT_SET_ANYWHERE is not set (line 6)"],
    ),
    "literal secret": (
        ("${AZURE_EAST_KEY}", "sk-pasted-literal-secret"),
        ["gateway.yaml: endpoints[0] (east).api_key: a literal secret is not allowed", "${EAST_API_KEY}"],
    ),
    "azure_ad without its block": (
        ("    kind: azure\n", "    kind: azure\n    auth: azure_ad\n"),
        ["gateway.yaml: endpoints[0] (east): auth is azure_ad, so an azure_ad block", "(line 3)"],
    ),
    "bad alert address": (
        ("    name: Team A\n", "    name: Team A\n    alerts: {emails: [ops-at-team-a.example]}\n"),
        ["gateway.yaml: tenants[0] (team-a).alerts.emails[0]: must be an e-mail address"],
    ),
    "literal webhook secret": (
        ("    name: Team A\n", "    name: Team A\n    alerts: {webhook_secret: sk-pasted-literal-secret}\n"),
        ["gateway.yaml: tenants[0] (team-a).alerts.webhook_secret: a literal secret is not allowed"],
    ),
    "bad cidr": (
        ("ip_allow: [10.0.0.0/8]", "ip_allow: [10.0.0.300/8]"),
        ["gateway.yaml: tenants[0] (team-a).policy.ip_allow[0]: not a valid network address or CIDR"],
    ),
    "fixed cost on a standard deployment": (
        ("        tier: 2\n", "        tier: 2\n        monthly_fixed_cost: 100\n"),
        ["deployments[1] (gpt4o-paygo): monthly_fixed_cost is for provisioned (PTU) deployments only (line 17)"],
    ),
    "duplicate endpoint": (
        ("tenants:\n", "  - {name: east, base_url: https://x.example.com}\ntenants:\n"),
        ["gateway.yaml: endpoints[1] (east).name: duplicate endpoint name: endpoints[0] already uses it"],
    ),
    "duplicate deployment": (
        ("      - name: gpt4o-paygo\n", "      - name: gpt4o-ptu\n"),
        ["endpoints[0] (east) > deployments[1] (gpt4o-ptu).name: duplicate deployment name on this endpoint"],
    ),
    "duplicate tenant": (
        ("prices:\n", "  - {slug: team-a, name: Again}\nprices:\n"),
        ["gateway.yaml: tenants[1] (team-a).slug: duplicate tenant slug: tenants[0] already uses it"],
    ),
    "duplicate price": (
        ("    effective_from: 2026-01-01\n", "    effective_from: 2026-01-01\n" + EXTRA_PRICE.replace("-mini", "")),
        ["prices[1] (gpt-4o from 2026-01-01).effective_from: duplicate price for this model and date"],
    ),
}


@pytest.mark.django_db
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_refused_with_file_entry_and_field_and_changes_nothing(tmp_path: Path, case: str) -> None:
    apply(write(tmp_path, BASE))
    before = state()
    (old, new), fragments = BAD_FILES[case]
    assert old in BASE
    # A valid change rides along, to show that nothing at all is applied when anything is wrong.
    bad = BASE.replace("rpm: 300", "rpm: 900").replace(old, new, 1)

    with pytest.raises(CommandError) as error:
        apply(write(tmp_path, bad))

    message = str(error.value)
    for fragment in fragments:
        assert fragment in message
    assert "nothing was written" in message
    assert "sk-pasted-literal-secret" not in message and SECRET not in message
    assert state() == before


@pytest.mark.django_db
def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad = (
        BASE.replace("${AZURE_EAST_KEY}", "${NOT_SET_ANYWHERE}")
        .replace("rpm: 300", "rpm: -5")
        .replace("ip_allow: [10.0.0.0/8]", "ip_allow: [not-a-network]")
    )

    with pytest.raises(CommandError) as error:
        apply(write(tmp_path, bad))

    message = str(error.value)
    assert "api_key: environment variable NOT_SET_ANYWHERE is not set" in message
    assert "deployments[1] (gpt4o-paygo).rpm" in message
    assert "policy.ip_allow[0]" in message
    assert "3 problems found" in message
    assert not Endpoint.objects.exists()


@pytest.mark.django_db
def test_a_database_failure_midway_rolls_back_the_whole_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Price, *args: Any, **kwargs: Any) -> None:
        raise DatabaseError("disk full")

    monkeypatch.setattr(Price, "save", refuse)  # prices are written last

    with pytest.raises(CommandError, match="nothing was changed"):
        apply(write(tmp_path, BASE))

    assert not Endpoint.objects.exists() and not Tenant.objects.exists()


@pytest.mark.django_db
def test_references_expand_in_any_string_and_double_dollar_escapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EAST_HOST", "east.openai.azure.com")
    text = BASE.replace("https://east.openai.azure.com", "https://${EAST_HOST}").replace(
        "name: Team A", "name: Team $${A}"
    )

    apply(write(tmp_path, text))

    assert Endpoint.objects.get().base_url == "https://east.openai.azure.com"
    assert Tenant.objects.get().name == "Team ${A}"


@pytest.mark.django_db
def test_the_example_file_applies_as_a_dry_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AZURE_EAST_KEY",
        "AZURE_WEST_CLIENT_SECRET",
        "AZURE_TENANT_ID",
        "LOCAL_LLM_KEY",
        "TEAM_SEARCH_ALERT_WEBHOOK_SECRET",
    ):
        monkeypatch.setenv(name, f"value-of-{name}")

    output = apply(Path(settings.BASE_DIR) / "gateway.example.yaml", "--dry-run")

    assert "+ deployment east/gpt4o-ptu (model gpt-4o, tier 1)" in output
    assert "+ deployment west/gpt4o-paygo (model gpt-4o, tier 2)" in output
    assert not Endpoint.objects.exists()


@pytest.mark.django_db
def test_a_provisioned_deployments_monthly_fixed_cost_is_applied_and_exported(tmp_path: Path) -> None:
    text = BASE.replace("        tpm: 100000\n", "        tpm: 100000\n        monthly_fixed_cost: 18000.50\n", 1)
    output = apply(write(tmp_path, text))
    assert "+ deployment east/gpt4o-ptu" in output
    ptu = Deployment.objects.get(name="gpt4o-ptu")
    assert ptu.monthly_fixed_cost == Decimal("18000.50")
    exported = io.StringIO()
    call_command("gateway_export", stdout=exported)
    assert "monthly_fixed_cost: 18000.5\n" in exported.getvalue()
    assert exported.getvalue().count("monthly_fixed_cost") == 1  # not written for a standard deployment
