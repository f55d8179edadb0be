"""The team pages and the staff overview: who sees what, what they show, and a bounded number of
queries however much usage there is."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import UsageRecord
from billing.periods import month_start
from billing.rollups import usage_rollup
from billing.statements import statements_refresh
from tenants.models import Membership
from tenants.services import key_issue
from tests.billing.usage import insert, usage

NOW = datetime.now(UTC)
MONTH = f"{NOW:%Y-%m}"


def seed(tenant, deployment, keys, hours: int = 6, models=("gpt-4o",), per_hour: int = 2) -> None:
    records = []
    for h in range(hours):
        for key in keys:
            for model in models:
                for i in range(per_hour):
                    failed = i == 0 and h == 1
                    records.append(
                        usage(
                            NOW - timedelta(hours=h, minutes=1),
                            key=key,
                            deployment=deployment,
                            model=model,
                            outcome="upstream_error" if failed else "ok",
                            status=502 if failed else 200,
                            cost=Decimal("0.01"),
                            latency_ms=300.0 + 100 * i,
                        )
                    )
    insert(*records)


@pytest.fixture
def member(db, tenant_a) -> User:
    user = User.objects.create_user("alice", password="pw-alice-123")
    Membership.objects.create(user=user, tenant=tenant_a)
    return user


@pytest.fixture
def usage_of_a_and_b(key_a, key_b, standard_deployment):
    seed(key_a.key.tenant, standard_deployment, [key_a.key], models=("gpt-4o", "gpt-4o-mini"))
    seed(key_b.key.tenant, standard_deployment, [key_b.key])
    usage_rollup()
    statements_refresh()


def test_a_member_sees_their_teams_page_with_its_usage(client, member, usage_of_a_and_b):
    client.force_login(member)
    response = client.get(reverse("team-page", args=["team-a"]))
    assert response.status_code == 200
    page = response.content.decode()
    assert "Team A" in page and "gpt-4o-mini" in page
    assert response.context["usage"]["totals"]["requests"] == 24
    assert response.context["month"]["spend"] == Decimal("0.24")
    assert response.context["month"]["budget"] == Decimal("100")
    charts = {chart["id"]: chart for chart in response.context["charts"]}
    by_model = charts["team-by-model"]["config"]["data"]["datasets"]
    assert sorted(d["label"] for d in by_model) == ["gpt-4o", "gpt-4o-mini"]
    assert sum(sum(d["data"]) for d in by_model) == 24 * 150
    assert 'id="team-by-model-data"' in page  # the configuration the canvas reads
    assert [row["failed"] for row in response.context["errors"]] == [1, 1]


@pytest.mark.parametrize(
    "url",
    [
        reverse("team-page", args=["team-b"]),
        reverse("team-statement", args=["team-b", MONTH]),
        reverse("team-statement-export", args=["team-b", MONTH, "csv"]),
        reverse("team-statement-export", args=["team-b", MONTH, "json"]),
    ],
)
def test_a_member_of_team_a_gets_404_for_team_bs_page_statement_and_export(client, member, usage_of_a_and_b, url):
    client.force_login(member)
    assert client.get(url).status_code == 404
    assert client.get(url.replace("team-b", "team-a")).status_code == 200


def test_a_team_page_needs_a_login(client, usage_of_a_and_b):
    response = client.get(reverse("team-page", args=["team-a"]))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_a_member_of_one_team_goes_straight_to_it_and_a_superuser_sees_all(client, member, admin_user, tenant_b):
    client.force_login(member)
    assert client.get(reverse("team-index"))["Location"] == reverse("team-page", args=["team-a"])
    client.force_login(admin_user)
    page = client.get(reverse("team-index")).content.decode()
    assert "Team A" in page and "Team B" in page


def test_the_login_page_signs_a_member_in(client, member):
    response = client.post(reverse("login"), {"username": "alice", "password": "pw-alice-123"})
    assert response.status_code == 302
    assert client.get(reverse("team-index")).status_code == 302  # on to the one team


def test_statements_download_as_csv_and_json(client, member, usage_of_a_and_b):
    client.force_login(member)
    response = client.get(reverse("team-statement-export", args=["team-a", MONTH, "json"]))
    assert response["Content-Disposition"] == f'attachment; filename="statement-team-a-{MONTH}.json"'
    document = json.loads(response.content)
    assert document["status"] == "draft" and document["totals"]["requests"] == 24
    assert document["totals"]["payg_cost"] == "0.24000000"
    csv_text = client.get(reverse("team-statement-export", args=["team-a", MONTH, "csv"])).content.decode()
    assert csv_text.startswith(f"# statement team-a {MONTH} (draft)\nsection,model,key")
    assert client.get(reverse("team-statement", args=["team-a", MONTH])).status_code == 200
    assert client.get(reverse("team-statement", args=["team-a", "2001-01"])).status_code == 404
    assert client.get(reverse("team-statement-export", args=["team-a", MONTH, "xml"])).status_code == 404


def test_the_model_and_period_filters_narrow_the_page(client, member, usage_of_a_and_b):
    client.force_login(member)
    response = client.get(reverse("team-page", args=["team-a"]), {"model": "gpt-4o-mini", "period": "7d"})
    assert response.context["period"].key == "7d" and len(response.context["usage"]["labels"]) == 168
    assert response.context["usage"]["totals"]["requests"] == 12
    assert response.context["models"] == ["gpt-4o", "gpt-4o-mini"]
    month = client.get(reverse("team-page", args=["team-a"]), {"period": "month"})
    this_month = UsageRecord.objects.filter(tenant__slug="team-a", started_at__gte=month_start(NOW)).count()
    assert month.context["usage"]["totals"]["requests"] == this_month


def test_the_staff_overview_shows_everyone(admin_client, usage_of_a_and_b, ptu_deployment):
    response = admin_client.get(reverse("billing-overview"), {"period": "24h"})
    assert response.status_code == 200
    assert response.context["usage"]["totals"]["requests"] == 36
    assert [row["label"] for row in response.context["top_tenants"]] == ["Team A", "Team B"]
    use = {row["deployment"].name: row for row in response.context["deployments"]}
    assert use["gpt4o-paygo"]["requests"] == 36 and use["gpt4o-paygo"]["peak_rpm"] == 6 / 60
    assert use["gpt4o-ptu"]["requests"] == 0
    assert "Usage overview" in response.content.decode()


def test_the_staff_overview_is_for_staff_with_the_rollup_view_permission(client, member, db):
    client.force_login(member)
    assert client.get(reverse("billing-overview")).status_code == 302  # to the admin login
    member.is_staff = True
    member.save()
    assert client.get(reverse("billing-overview")).status_code == 403
    member.user_permissions.add(Permission.objects.get(codename="view_rollup"))
    assert client.get(reverse("billing-overview")).status_code == 200


def _queries(client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_pages_run_a_bounded_number_of_queries_whatever_the_usage(
    client, admin_client, member, tenant_a, key_a, standard_deployment, ptu_deployment, django_assert_max_num_queries
):
    client.force_login(member)
    team, overview = reverse("team-page", args=["team-a"]), reverse("billing-overview")
    seed(tenant_a, standard_deployment, [key_a.key], hours=2)
    usage_rollup()
    statements_refresh()
    small = (_queries(client, team), _queries(admin_client, overview))
    more_keys = [key_issue(tenant_a, name=f"extra-{i}").key for i in range(3)]
    seed(tenant_a, ptu_deployment, [key_a.key, *more_keys], hours=30, models=("gpt-4o", "o1", "o3-mini"))
    usage_rollup()
    statements_refresh()
    assert (_queries(client, team), _queries(admin_client, overview)) == small
    print(f"queries: team page {small[0]}, overview {small[1]}")
    with django_assert_max_num_queries(12):
        client.get(team, {"period": "30d", "model": "o1"})
    with django_assert_max_num_queries(8):
        admin_client.get(overview, {"period": "month"})


def test_the_admin_lists_statements_and_downloads_them(admin_client, usage_of_a_and_b):
    from billing.models import Statement

    statement = Statement.objects.get(tenant__slug="team-a")
    listing = admin_client.get(reverse("admin:billing_statement_changelist")).content.decode()
    url = reverse("admin:billing_statement_download", args=[statement.pk, "csv"])
    assert url in listing
    response = admin_client.get(url)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert response.content.decode().startswith(f"# statement team-a {MONTH}")
    document = json.loads(
        admin_client.get(reverse("admin:billing_statement_download", args=[statement.pk, "json"])).content
    )
    assert document["totals"]["requests"] == 24
    assert admin_client.get(reverse("admin:billing_statement_download", args=[statement.pk, "pdf"])).status_code == 404
    assert admin_client.get(reverse("admin:billing_statement_change", args=[statement.pk])).status_code == 200
