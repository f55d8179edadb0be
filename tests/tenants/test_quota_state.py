"""The quota state on both backends (in process and Redis): windows, budgets, seeding, leases.

Times are explicit (a fake clock from ``T0``); the window is 6 s, so a bucket is 0.1 s and a
bucket stops counting 6.1 s after it started.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tenants.quota_state import (
    KEY,
    TENANT,
    Admitted,
    Ask,
    PeriodIds,
    Refused,
    ScopeLimits,
    Seed,
    Unseeded,
)

T0 = 1_700_000_000.0
TODAY = PeriodIds(day=20250615, month=202506)
TOMORROW = PeriodIds(day=20250616, month=202506)
NEXT_MONTH = PeriodIds(day=20250701, month=202507)
NOTHING = Seed()


def tenant(**limits: int) -> ScopeLimits:
    return ScopeLimits(TENANT, 7, 7, **limits)


def key(**limits: int) -> ScopeLimits:
    return ScopeLimits(KEY, 70, 7, **limits)


def ask(*scopes: ScopeLimits, tokens: int = 100, cost: int = 0, periods: PeriodIds = TODAY, seed: bool = True) -> Ask:
    """An ask; ``seed`` gives every budgeted scope an empty seed (the records show no use)."""
    seeds = {s.ref: NOTHING for s in scopes if s.budgeted} if seed else None
    return Ask(scopes, tokens, cost, periods, seeds)


async def admitted(state, a: Ask, now: float = T0) -> Admitted:
    result = await state.admit(a, now)
    assert isinstance(result, Admitted), result
    return result


async def refused(state, a: Ask, now: float = T0) -> Refused:
    result = await state.admit(a, now)
    assert isinstance(result, Refused), result
    return result


# -- budgets ----------------------------------------------------------------------------------------


async def test_a_budget_admits_while_use_is_below_it_so_it_is_overrun_by_at_most_one_reservation(make_quota_state):
    state = await make_quota_state()
    scope = tenant(monthly_tokens=250)

    first = await admitted(state, ask(scope, tokens=100))
    await state.settle(first.reservation, 100, 0, dispatched=True, now=T0)
    second = await admitted(state, ask(scope, tokens=100))
    await state.settle(second.reservation, 100, 0, dispatched=True, now=T0)
    third = await admitted(state, ask(scope, tokens=100))  # 200 used: below 250, so it may go
    uses = await state.settle(third.reservation, 100, 0, dispatched=True, now=T0)

    assert uses[0].month_tokens == 300  # over by at most this one reservation
    over = await refused(state, ask(scope, tokens=1))
    assert (over.limit, over.used, over.held, over.retry_after) == ("monthly_tokens", 300, 0, None)


async def test_requests_in_flight_hold_their_reservation_against_the_budget(make_quota_state):
    state = await make_quota_state()
    scope = tenant(daily_tokens=1000)

    in_flight = [await admitted(state, ask(scope, tokens=400)) for _ in range(3)]  # 0, 400, 800 < 1000
    over = await refused(state, ask(scope, tokens=400))

    assert (over.limit, over.used, over.held) == ("daily_tokens", 0, 1200)
    for admission in in_flight:
        await state.settle(admission.reservation, 50, 0, dispatched=True, now=T0)
    await admitted(state, ask(scope, tokens=400))  # 150 used, nothing held


async def test_concurrent_admissions_overrun_a_budget_by_at_most_one_reservation(make_quota_state):
    state = await make_quota_state()
    scope = tenant(monthly_cost=10_000)  # cost units

    results = await asyncio.gather(*(state.admit(ask(scope, tokens=10, cost=3_000), T0) for _ in range(50)))

    admitted_ = [r for r in results if isinstance(r, Admitted)]
    assert len(admitted_) == 4  # 0, 3000, 6000, 9000 are below 10,000; 12,000 is not
    assert all(isinstance(r, Refused) and r.limit == "monthly_cost" for r in results if r not in admitted_)
    for admission in admitted_:
        await state.settle(admission.reservation, 10, 3_000, dispatched=True, now=T0)
    (use,) = await state.read([scope], TODAY, T0)
    assert use.month_cost == 12_000 <= 10_000 + 3_000


async def test_settlement_replaces_the_reservation_with_what_was_used(make_quota_state):
    state = await make_quota_state()
    scope = tenant(daily_tokens=10_000, monthly_cost=10**9)

    admission = await admitted(state, ask(scope, tokens=4_000, cost=5_000))
    (held,) = await state.read([scope], TODAY, T0)
    uses = await state.settle(admission.reservation, 120, 150, dispatched=True, now=T0)
    (after,) = await state.read([scope], TODAY, T0)

    assert (held.held_tokens, held.held_cost, held.month_tokens) == (4_000, 5_000, 0)
    assert (uses[0].day_tokens, uses[0].month_tokens, uses[0].month_cost) == (120, 120, 150)
    assert (after.held_tokens, after.held_cost, after.day_tokens, after.month_cost) == (0, 0, 120, 150)


async def test_a_lapsed_reservation_stops_holding_the_budget(make_quota_state):
    state = await make_quota_state(hold_seconds=30.0)
    scope = tenant(daily_tokens=500)

    await admitted(state, ask(scope, tokens=600))  # its process dies: never settled
    await refused(state, ask(scope, tokens=1), now=T0 + 29)

    await admitted(state, ask(scope, tokens=1), now=T0 + 31)


async def test_settling_a_lapsed_reservation_counts_what_it_used_once(make_quota_state):
    state = await make_quota_state(hold_seconds=30.0)
    scope = tenant(daily_tokens=500)

    slow = await admitted(state, ask(scope, tokens=300))
    await admitted(state, ask(scope, tokens=1), now=T0 + 31)  # drops the lapsed hold
    uses = await state.settle(slow.reservation, 40, 0, dispatched=True, now=T0 + 32)

    (use,) = await state.read([scope], TODAY, T0 + 32)
    assert uses[0].day_tokens == 40
    assert use.held_tokens == 1  # only the second request's


async def test_a_new_day_and_a_new_month_start_empty(make_quota_state):
    state = await make_quota_state()
    scope = tenant(daily_tokens=100, monthly_tokens=150)
    admission = await admitted(state, ask(scope, tokens=100))
    await state.settle(admission.reservation, 100, 0, dispatched=True, now=T0)
    await refused(state, ask(scope, tokens=1))

    tomorrow = await admitted(state, ask(scope, tokens=60, periods=TOMORROW, seed=False))
    await state.settle(tomorrow.reservation, 60, 0, dispatched=True, now=T0)
    over = await refused(state, ask(scope, tokens=1, periods=TOMORROW))
    next_month = await admitted(state, ask(scope, tokens=1, periods=NEXT_MONTH, seed=False))

    assert (over.limit, over.used) == ("monthly_tokens", 160)
    assert next_month.reservation.periods == NEXT_MONTH


async def test_a_request_admitted_yesterday_does_not_count_today(make_quota_state):
    state = await make_quota_state()
    scope = tenant(daily_tokens=100)
    yesterday = await admitted(state, ask(scope, tokens=90))
    await admitted(state, ask(scope, tokens=10, periods=TOMORROW, seed=False))

    await state.settle(yesterday.reservation, 90, 0, dispatched=True, now=T0)

    (use,) = await state.read([scope], TOMORROW, T0)
    assert (use.day_tokens, use.month_tokens) == (0, 90)


# -- seeding ----------------------------------------------------------------------------------------


async def test_a_scope_without_counters_asks_for_its_seed_and_takes_only_the_first(make_quota_state):
    state = await make_quota_state()
    scope = tenant(monthly_tokens=1_000)

    first = await state.admit(ask(scope, seed=False), T0)
    seeded = await state.admit(Ask((scope,), 100, 0, TODAY, {scope.ref: Seed(900, 950, 0)}), T0)
    late_seed = await state.admit(Ask((scope,), 100, 0, TODAY, {scope.ref: Seed(0, 0, 0)}), T0)

    assert isinstance(first, Unseeded) and first.scopes == [scope]
    assert isinstance(seeded, Admitted)
    assert isinstance(late_seed, Refused) and (late_seed.used, late_seed.held) == (950, 100)


async def test_only_budgeted_scopes_need_seeds(make_quota_state):
    state = await make_quota_state()

    result = await state.admit(ask(tenant(rpm=5), key(daily_tokens=10), seed=False), T0)

    assert isinstance(result, Unseeded) and [s.kind for s in result.scopes] == [KEY]


async def test_a_reset_period_is_seeded_again_and_older_requests_no_longer_count(make_quota_state):
    state = await make_quota_state()
    scope = tenant(daily_tokens=100, monthly_tokens=1_000)
    before = await admitted(state, ask(scope, tokens=100))
    await state.settle(before.reservation, 100, 0, dispatched=True, now=T0)
    started_before_reset = await admitted(state, ask(scope, tokens=1, periods=TOMORROW, seed=False))

    reset = dataclasses.replace(scope, day_stamp=int(T0) + 10)
    asks_seed = await state.admit(ask(reset, tokens=1, periods=TOMORROW, seed=False), T0 + 10)
    after = await admitted(state, Ask((reset,), 5, 0, TOMORROW, {reset.ref: Seed(0, 100, 0)}), T0 + 10)
    await state.settle(started_before_reset.reservation, 1, 0, dispatched=True, now=T0 + 11)
    await state.settle(after.reservation, 5, 0, dispatched=True, now=T0 + 11)

    assert isinstance(asks_seed, Unseeded)
    (use,) = await state.read([reset], TOMORROW, T0 + 11)
    assert (use.day_tokens, use.month_tokens) == (5, 106)


async def test_reconciling_raises_counters_to_the_records_and_never_lowers_them(make_quota_state):
    state = await make_quota_state()
    scope = tenant(daily_tokens=10_000, monthly_cost=10**9)
    admission = await admitted(state, ask(scope, tokens=100, cost=100))
    await state.settle(admission.reservation, 100, 100, dispatched=True, now=T0)

    raised = await state.reconcile([(scope, Seed(day_tokens=40, month_tokens=400, month_cost=90))], TODAY)

    (use,) = await state.read([scope], TODAY, T0)
    assert raised == 1
    assert (use.day_tokens, use.month_tokens, use.month_cost) == (100, 400, 100)


async def test_reading_and_reconciling_several_tenants_keeps_each_scope_in_its_place(make_quota_state):
    """Tenants' keys live in different Redis Cluster slots: reads and reconciliation spanning
    tenants go per tenant there, and answer in the order asked."""
    state = await make_quota_state()
    scopes = [ScopeLimits(TENANT, t, t, daily_tokens=10_000) for t in (7, 8, 9)]
    for i, scope in enumerate(scopes):
        admission = await admitted(state, ask(scope, tokens=10 * (i + 1)))
        await state.settle(admission.reservation, 10 * (i + 1), 0, dispatched=True, now=T0)

    raised = await state.reconcile([(scopes[2], Seed(500, 500, 0)), (scopes[0], Seed(1, 1, 0))], TODAY)

    assert raised == 2  # the third tenant's day and month tokens
    assert [u.day_tokens for u in await state.read([scopes[2], scopes[0], scopes[1]], TODAY, T0)] == [500, 10, 20]


async def test_reconciling_leaves_scopes_it_never_seeded_alone(make_quota_state):
    state = await make_quota_state()
    scope = tenant(daily_tokens=10)

    assert await state.reconcile([(scope, Seed(5, 5, 5))], TODAY) == 0
    assert isinstance(await state.admit(ask(scope, seed=False), T0), Unseeded)


# -- windows ----------------------------------------------------------------------------------------


async def test_rpm_refuses_the_request_over_it_until_the_oldest_request_leaves_the_window(make_quota_state):
    state = await make_quota_state()
    scope = tenant(rpm=3)
    for offset in (0.0, 1.0, 2.0):
        await admitted(state, ask(scope), now=T0 + offset)

    over = await refused(state, ask(scope), now=T0 + 3.0)

    assert (over.limit, over.used) == ("rpm", 3)
    # The first request's bucket [T0, T0 + 0.1) stops counting at T0 + 6.1.
    assert over.retry_after == pytest.approx(3.1, abs=0.11)
    await refused(state, ask(scope), now=T0 + 6.0)
    await admitted(state, ask(scope), now=T0 + 6.2)


async def test_tpm_counts_reserved_tokens_until_settled(make_quota_state):
    state = await make_quota_state()
    scope = tenant(tpm=1_000)
    big = await admitted(state, ask(scope, tokens=900))
    over = await refused(state, ask(scope, tokens=200), now=T0 + 1)

    await state.settle(big.reservation, 100, 0, dispatched=True, now=T0 + 1)
    fits = await admitted(state, ask(scope, tokens=200), now=T0 + 1)

    assert (over.limit, over.used) == ("tpm", 900)
    assert over.retry_after == pytest.approx(5.1, abs=0.11)
    assert [(w.requests, w.tokens) for w in fits.windows] == [(2, 300)]


async def test_a_request_larger_than_the_tpm_is_refused_with_no_wait(make_quota_state):
    state = await make_quota_state()

    over = await refused(state, ask(tenant(tpm=1_000), tokens=1_001))

    assert (over.limit, over.retry_after) == ("tpm", None)


async def test_a_released_request_leaves_the_window(make_quota_state):
    state = await make_quota_state()
    scope = tenant(rpm=1, tpm=1_000)
    admission = await admitted(state, ask(scope, tokens=500))

    await state.settle(admission.reservation, 0, 0, dispatched=False, now=T0)

    again = await admitted(state, ask(scope, tokens=1_000))
    assert [(w.requests, w.tokens) for w in again.windows] == [(1, 1_000)]


async def test_a_window_forgets_everything_after_a_long_pause(make_quota_state):
    state = await make_quota_state()
    scope = tenant(rpm=2)
    await admitted(state, ask(scope))
    await admitted(state, ask(scope))

    later = await admitted(state, ask(scope), now=T0 + 600)

    assert [(w.requests, w.tokens) for w in later.windows] == [(1, 100)]


# -- tenant and key together ------------------------------------------------------------------------


async def test_a_key_over_its_limit_is_refused_and_nothing_is_reserved_for_its_tenant(make_quota_state):
    state = await make_quota_state()
    team, app = tenant(rpm=100, monthly_tokens=10_000), key(rpm=1)
    await admitted(state, ask(team, app))

    over = await refused(state, ask(team, app))
    (team_use, key_use) = await state.read([team, app], TODAY, T0)

    assert (over.scope.kind, over.limit) == (KEY, "rpm")
    assert (team_use.requests, team_use.held_tokens, key_use.requests) == (1, 100, 1)
    assert [(w.scope.kind, w.requests) for w in over.windows] == [(TENANT, 1), (KEY, 1)]


async def test_a_tenant_budget_refuses_every_key_of_the_tenant(make_quota_state):
    state = await make_quota_state()
    team = tenant(monthly_tokens=50)
    other_key = ScopeLimits(KEY, 71, 7, rpm=10)
    admission = await admitted(state, ask(team, key(rpm=10), tokens=60))
    await state.settle(admission.reservation, 60, 0, dispatched=True, now=T0)

    over = await refused(state, ask(team, other_key))

    assert (over.scope.kind, over.limit) == (TENANT, "monthly_tokens")


# -- Redis only -------------------------------------------------------------------------------------


async def test_an_emptied_redis_asks_for_seeds_again(make_quota_state):
    if make_quota_state.backend == "memory":
        pytest.skip("Redis only")
    state = await make_quota_state()
    scope = tenant(monthly_tokens=1_000)
    admission = await admitted(state, ask(scope))
    await state.reset_all()  # FLUSHDB, as far as this state is concerned

    lost = await state.settle(admission.reservation, 100, 0, dispatched=True, now=T0)
    again = await state.admit(ask(scope, seed=False), T0)

    assert lost == []  # the settlement does not recreate a half-empty budget
    assert isinstance(again, Unseeded)


async def test_an_admission_settles_the_settlements_it_carries_before_deciding(make_quota_state):
    if make_quota_state.backend == "memory":
        pytest.skip("Redis only: one script call admits and settles")
    state = await make_quota_state()
    scope = tenant(daily_tokens=500, rpm=10)
    first = await admitted(state, ask(scope, tokens=600))  # holds more than the whole budget

    result, settled = await state.admit_carrying(ask(scope, tokens=100), T0 + 1, [(first.reservation, 50, 0, True)])

    assert isinstance(result, Admitted)
    assert [(u.scope.kind, u.day_tokens) for u in settled[0]] == [(TENANT, 50)]
    assert [(w.requests, w.tokens) for w in result.windows] == [(2, 150)]


async def test_settling_a_batch_settles_each_reservation_once(make_quota_state):
    state = await make_quota_state()
    scope, app = tenant(monthly_tokens=10_000, tpm=100_000), key(daily_tokens=10_000)
    admissions = [await admitted(state, ask(scope, app, tokens=1_000)) for _ in range(3)]

    results = await state.settle_many([(a.reservation, 10 * (i + 1), 0, True) for i, a in enumerate(admissions)])

    assert [[(u.scope.kind, u.month_tokens, u.day_tokens) for u in uses] for uses in results] == [
        [(TENANT, 10, 10), (KEY, 10, 10)],
        [(TENANT, 30, 30), (KEY, 30, 30)],
        [(TENANT, 60, 60), (KEY, 60, 60)],
    ]
    (team_use, key_use) = await state.read([scope, app], TODAY, T0)
    assert (team_use.held_tokens, key_use.held_tokens, team_use.tokens) == (0, 0, 60)
