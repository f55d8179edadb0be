"""Statements: costs match hand-computed cases (a price change mid-month, cached tokens, the PTU
chargeback split), drafts until the month closes, frozen after; CSV, JSON and the command."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command

from billing.models import Price, Statement
from billing.rollups import usage_rollup
from billing.statements import ptu_allocate, statement_document, statements_refresh
from gateway.models import Deployment
from gateway.proxy.context import RequestContext
from tenants.services import key_issue
from tests.billing.usage import insert, usage

OCTOBER = datetime(2026, 10, 1, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)
DURING_NOVEMBER = datetime(2026, 11, 20, tzinfo=UTC)


def priced(started_at: datetime, prompt: int, cached: int, completion: int, prices, **fields):
    """A record whose cost the request path computes (RequestContext.usage_record) from ``prices``."""
    context = RequestContext(request_id="x", started_at=started_at, t0=0.0, client_ip=None, model="gpt-4o")
    context.prompt_tokens, context.cached_tokens, context.completion_tokens = prompt, cached, completion
    context.served = True  # the upstream answered: only served requests cost money
    cost = context.usage_record({"gpt-4o": prices})["cost"]
    return usage(
        started_at, prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion, cost=cost, **fields
    )


@pytest.fixture
def october_prices(db) -> list[Price]:
    """gpt-4o at 2.50 / 1.25 cached / 10.00 per million from October 1st, 5.00 / 2.50 / 15.00 from the 16th."""
    early = Price.objects.create(
        model="gpt-4o",
        input_per_million=Decimal("2.50"),
        cached_input_per_million=Decimal("1.25"),
        output_per_million=Decimal("10.00"),
        effective_from=OCTOBER,
    )
    late = Price.objects.create(
        model="gpt-4o",
        input_per_million=Decimal("5.00"),
        cached_input_per_million=Decimal("2.50"),
        output_per_million=Decimal("15.00"),
        effective_from=OCTOBER + timedelta(days=15),
    )
    return [late, early]  # newest first, as the snapshot keeps them


def test_a_price_change_mid_month_and_cached_tokens_cost_what_was_computed_by_hand(
    october_prices, key_a, standard_deployment
):
    insert(
        # Oct 10, old price: 600 uncached x 2.50 + 400 cached x 1.25 + 500 x 10.00 = 7,000 / 1e6
        priced(
            OCTOBER + timedelta(days=9), 1000, 400, 500, october_prices, key=key_a.key, deployment=standard_deployment
        ),
        # Oct 20, new price: 2,000 x 5.00 + 1,000 x 15.00 = 25,000 / 1e6
        priced(
            OCTOBER + timedelta(days=19), 2000, 0, 1000, october_prices, key=key_a.key, deployment=standard_deployment
        ),
        # Oct 31 23:59, new price: 100 uncached x 5 + 100 cached x 2.5 + 10 x 15 = 900 / 1e6
        priced(
            NOVEMBER - timedelta(minutes=1), 200, 100, 10, october_prices, key=key_a.key, deployment=standard_deployment
        ),
    )
    usage_rollup()
    statements_refresh(now=DURING_NOVEMBER)
    statement = Statement.objects.get(tenant=key_a.key.tenant, month=OCTOBER.date())
    assert statement.status == Statement.Status.FINAL
    assert statement.payg_cost == Decimal("0.032900")
    assert (statement.requests, statement.prompt_tokens, statement.cached_tokens, statement.completion_tokens) == (
        3,
        3200,
        500,
        1510,
    )
    assert statement.ptu_cost == 0 and statement.total_cost == Decimal("0.0329")


@pytest.fixture
def ptu_with_fee(ptu_deployment) -> Deployment:
    ptu_deployment.monthly_fixed_cost = Decimal("1000.00")
    ptu_deployment.save()
    return ptu_deployment


def test_a_ptu_fixed_cost_is_shared_by_tokens_and_shown_apart_from_pay_as_you_go(
    ptu_with_fee, standard_deployment, key_a, key_b
):
    at = OCTOBER + timedelta(days=3)
    insert(
        # Tenant A: 100,000 tokens on the PTU, B: 200,000. List-price costs on the PTU are not charged.
        usage(
            at,
            key=key_a.key,
            deployment=ptu_with_fee,
            prompt_tokens=60_000,
            completion_tokens=40_000,
            cost=Decimal("1"),
        ),
        usage(
            at,
            key=key_b.key,
            deployment=ptu_with_fee,
            prompt_tokens=150_000,
            completion_tokens=50_000,
            cost=Decimal("2"),
        ),
        # A also spills 0.25 onto the standard deployment.
        usage(at, key=key_a.key, deployment=standard_deployment, cost=Decimal("0.25")),
    )
    usage_rollup()
    statements_refresh(now=DURING_NOVEMBER)
    a = Statement.objects.get(tenant=key_a.key.tenant)
    b = Statement.objects.get(tenant=key_b.key.tenant)
    assert (a.ptu_cost, b.ptu_cost) == (Decimal("333.33"), Decimal("666.67"))
    assert (a.payg_cost, b.payg_cost) == (Decimal("0.25"), Decimal(0))
    assert a.total_cost == Decimal("333.58")
    [share] = a.provisioned
    assert share == {
        "deployment": "east/gpt4o-ptu",
        "model": "gpt-4o",
        "tokens": 100_000,
        "deployment_tokens": 300_000,
        "share": "0.33333333",
        "fixed_cost": "1000.00",
        "charge": "333.33",
    }
    line = next(line for line in a.lines if line["model"] == "gpt-4o")
    assert (line["requests"], line["ptu_tokens"], line["total_tokens"], line["cost"]) == (
        2,
        100_000,
        100_150,
        "0.25000000",
    )


def test_the_ptu_split_adds_up_to_the_cent_and_is_stable():
    assert ptu_allocate(Decimal("100.00"), {3: 1, 1: 1, 2: 1}) == {
        1: Decimal("33.34"),
        2: Decimal("33.33"),
        3: Decimal("33.33"),
    }
    split = ptu_allocate(Decimal("18000.00"), {1: 123_457, 2: 9_876_543, 3: 1})
    assert sum(split.values()) == Decimal("18000.00")
    assert split[3] == Decimal("0.00")
    assert ptu_allocate(Decimal("10"), {}) == {}


def test_statements_are_drafts_until_the_month_closes_and_frozen_after(key_a, standard_deployment, settings):
    settings.GATEWAY = {**settings.GATEWAY, "STATEMENT_GRACE_HOURS": 6}
    insert(usage(OCTOBER + timedelta(days=1), key=key_a.key, deployment=standard_deployment, cost=Decimal("1")))
    usage_rollup()
    statements_refresh(now=NOVEMBER + timedelta(hours=5))
    statement = Statement.objects.get()
    assert (statement.status, statement.frozen_at, statement.payg_cost) == ("draft", None, Decimal(1))
    statements_refresh(now=NOVEMBER + timedelta(hours=6))
    statement.refresh_from_db()
    assert statement.status == "final" and statement.frozen_at == NOVEMBER + timedelta(hours=6)
    # Usage that arrives after the freeze reaches the roll-ups but not the frozen statement.
    insert(usage(OCTOBER + timedelta(days=2), key=key_a.key, deployment=standard_deployment, cost=Decimal("5")))
    usage_rollup()
    statements_refresh(now=NOVEMBER + timedelta(days=2))
    statement.refresh_from_db()
    assert (statement.requests, statement.payg_cost) == (1, Decimal(1))


def test_a_tenant_without_usage_gets_no_statement(key_a, key_b, standard_deployment):
    insert(usage(OCTOBER + timedelta(days=1), key=key_a.key, deployment=standard_deployment))
    usage_rollup()
    statements_refresh(now=DURING_NOVEMBER)
    assert list(Statement.objects.values_list("tenant__slug", flat=True)) == ["team-a"]


def test_lines_are_by_model_and_key(tenant_a, key_a, standard_deployment):
    second = key_issue(tenant_a, name="batch-jobs")
    at = OCTOBER + timedelta(days=1)
    insert(
        usage(at, key=key_a.key, deployment=standard_deployment, cost=Decimal("0.1")),
        usage(at, key=key_a.key, deployment=standard_deployment, cost=Decimal("0.2")),
        usage(at, key=second.key, deployment=standard_deployment, cost=Decimal("0.4")),
        usage(
            at,
            key=second.key,
            model="gpt-4o-mini",
            outcome="client_error",
            status=400,
            prompt_tokens=0,
            completion_tokens=0,
            cost=Decimal(0),
        ),
    )
    usage_rollup()
    statements_refresh(now=DURING_NOVEMBER)
    lines = {(line["model"], line["key"]): (line["requests"], line["cost"]) for line in Statement.objects.get().lines}
    assert lines == {
        ("gpt-4o", "app-a"): (2, "0.30000000"),
        ("gpt-4o", "batch-jobs"): (1, "0.40000000"),
        ("gpt-4o-mini", "batch-jobs"): (1, "0.00000000"),
    }


def test_usage_report_prints_the_statement_as_csv_and_json(ptu_with_fee, key_a, capsys):
    insert(
        usage(
            OCTOBER + timedelta(days=1), key=key_a.key, deployment=ptu_with_fee, prompt_tokens=10, completion_tokens=5
        )
    )
    usage_rollup()
    statements_refresh(now=DURING_NOVEMBER)
    call_command("usage_report", "--tenant", "team-a", "--month", "2026-10", "--format", "json")
    document = json.loads(capsys.readouterr().out)
    assert document["status"] == "final" and document["totals"]["ptu_cost"] == "1000.00"
    assert document == statement_document(Statement.objects.get())
    call_command("usage_report", "--tenant", "team-a", "--month", "2026-10")
    text = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(text.split("\n", 1)[1])))
    assert [row["section"] for row in rows] == ["usage", "provisioned", "total payg", "total provisioned", "total"]
    assert rows[-1]["cost"] == "1000.00000000" and rows[1]["share"] == "1.00000000"


def test_usage_report_computes_a_draft_when_nothing_is_stored(key_a, standard_deployment, capsys):
    now = datetime.now(UTC)
    insert(usage(now - timedelta(minutes=1), key=key_a.key, deployment=standard_deployment, cost=Decimal("0.5")))
    usage_rollup()
    call_command("usage_report", "--tenant", "team-a", "--month", f"{now:%Y-%m}", "--format", "json")
    document = json.loads(capsys.readouterr().out)
    assert document["status"] == "draft" and document["totals"]["payg_cost"] == "0.50000000"
    assert not Statement.objects.exists()
