"""Admission's arithmetic (``tenants/quotas.py``): periods, costs, messages, headers, thresholds."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from gateway.snapshot.types import KeyView, QuotaView, TenantView
from tenants.quota_state import KEY, TENANT, BudgetUse, PeriodIds, Refused, ScopeLimits, WindowUse
from tenants.quotas import (
    budget_refusal_message,
    cost_units,
    go_duration,
    limit_headers,
    periods_at,
    rate_refusal_message,
    refusal_reason,
    scopes_for,
    thresholds_reached,
)

BERLIN = ZoneInfo("Europe/Berlin")


def epoch(*args: int, tz=UTC) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


def test_periods_follow_the_budget_time_zone():
    # 23:30 UTC on 31 March is already 1 April in Berlin (summer time: UTC+2).
    periods = periods_at(epoch(2025, 3, 31, 23, 30), BERLIN)

    assert periods.ids == PeriodIds(day=20250401, month=202504)
    assert periods.day_start == epoch(2025, 4, 1, tz=BERLIN) == epoch(2025, 3, 31, 22)
    assert periods.month_end == epoch(2025, 5, 1, tz=BERLIN)


def test_a_day_with_a_clock_change_is_23_hours_long():
    periods = periods_at(epoch(2025, 3, 30, 12), BERLIN)

    assert periods.day_end - periods.day_start == 23 * 3600


@pytest.mark.parametrize(
    ("amount", "units"),
    [(Decimal("100"), 10_000_000_000), (Decimal("0.000000015"), 2), (Decimal("0.000000014"), 1), (2.5, 250_000_000)],
)
def test_costs_are_counted_in_units_of_ten_to_the_minus_eight_rounded_as_postgresql_does(amount, units):
    assert cost_units(amount) == units


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.012, "12ms"), (1.5, "1.5s"), (60.0, "1m0s"), (67.5, "1m7.5s"), (3600.25, "1h0m0.25s")],
)
def test_durations_are_written_as_openai_writes_its_reset_headers(seconds, text):
    assert go_duration(seconds) == text


TEAM = TenantView(id=7, slug="search", name="Search", quota=QuotaView(rpm=600, monthly_cost=1500.0))
APP = KeyView(id=70, tenant=TEAM, name="indexer", prefix="sk-gw-ab", quota=QuotaView(rpm=60, tpm=10_000))


def test_a_key_is_admitted_against_its_teams_quota_and_its_own():
    periods = periods_at(epoch(2025, 6, 15, 12), ZoneInfo("UTC"))

    team, app = scopes_for(APP, periods)

    assert (team.kind, team.id, team.rpm, team.monthly_cost) == (TENANT, 7, 600, 150_000_000_000)
    assert (app.kind, app.id, app.tenant_id, app.tpm) == (KEY, 70, 7, 10_000)


def test_a_reset_counts_only_within_the_period_it_was_made_in():
    periods = periods_at(epoch(2025, 6, 15, 12), ZoneInfo("UTC"))
    yesterday = QuotaView(daily_tokens=10, day_counters_reset_at=epoch(2025, 6, 14, 9))
    this_month = QuotaView(monthly_tokens=10, month_counters_reset_at=epoch(2025, 6, 2, 9))

    (day_scope,) = scopes_for(KeyView(1, TenantView(1, "a", "A", quota=yesterday), "k", "p"), periods)
    (month_scope,) = scopes_for(KeyView(1, TenantView(1, "a", "A", quota=this_month), "k", "p"), periods)

    assert day_scope.day_stamp == 0
    assert month_scope.month_stamp == int(epoch(2025, 6, 2, 9) * 1000)


def test_a_budget_refusal_names_the_budget_whose_it_is_and_when_it_resets():
    periods = periods_at(epoch(2025, 6, 15, 12), BERLIN)
    team = ScopeLimits(TENANT, 7, 7, monthly_cost=150_000_000_000)
    refused = Refused(team, "monthly_cost", used=150_037_000_000, held=50_000_000)

    message = budget_refusal_message(refused, APP, periods)

    assert message == (
        "You exceeded your current quota: the monthly cost budget of team 'Search' is 1,500.00 and is used up "
        "(1,500.37 used, 0.50 reserved by requests in progress). It resets at 2025-07-01 00:00 (Europe/Berlin)."
    )
    assert refusal_reason(refused) == "insufficient_quota:tenant_monthly_cost"


def test_a_rate_refusal_says_the_limit_the_use_and_the_wait():
    app = ScopeLimits(KEY, 70, 7, rpm=60)

    message = rate_refusal_message(Refused(app, "rpm", used=60, retry_after=12.34), APP, requested=500)

    assert message == (
        "Rate limit reached for key 'indexer' of team 'Search' on requests per minute (RPM): Limit 60, Used 60, "
        "Requested 1. Please try again in 12.3s."
    )


def test_the_headers_carry_the_tightest_limit_of_each_kind():
    team, app = ScopeLimits(TENANT, 7, 7, rpm=600, tpm=100_000), ScopeLimits(KEY, 70, 7, rpm=60)
    now = 1_000_000.25  # 0.25 s into a bucket of 1 s: the window empties 60.75 s from now

    headers = dict(limit_headers([WindowUse(team, 100, 5_000), WindowUse(app, 59, 0)], now, 60.0))

    assert headers == {
        b"x-ratelimit-limit-requests": b"60",
        b"x-ratelimit-remaining-requests": b"1",
        b"x-ratelimit-reset-requests": b"1m0.75s",
        b"x-ratelimit-limit-tokens": b"100000",
        b"x-ratelimit-remaining-tokens": b"95000",
        b"x-ratelimit-reset-tokens": b"1m0.75s",
    }


def test_thresholds_reached_are_every_one_at_or_below_the_use():
    team = ScopeLimits(TENANT, 7, 7, daily_tokens=1_000, monthly_tokens=10_000)

    reached = thresholds_reached(BudgetUse(team, 800, 800, 0), (50, 80, 100))

    assert [(r.budget, r.threshold) for r in reached] == [("daily_tokens", 50), ("daily_tokens", 80)]
    assert thresholds_reached(BudgetUse(team, 499, 499, 0), (50, 80, 100)) == []
