"""The window guard sized from measurement (``gateway.balancer.guard``), and how the windows and
both state backends take it (``WindowPlanner``, ``Candidate.guard``)."""

from __future__ import annotations

import pytest

from gateway.balancer import Candidate, Grant
from gateway.balancer.contract import REQUESTS, StateConfig, WindowPlanner
from gateway.balancer.guard import MIN_SAMPLES, SAMPLES, DispatchGuard, measured_guard
from gateway.balancer.policy import BalancedDispatcher

from .conftest import T0
from .test_policy import NOTHING, demand, deployment


def test_the_guard_is_one_and_a_half_times_the_largest_recent_delay_rounded_up():
    delays = [0.001] * 62 + [0.004, 0.012]
    assert measured_guard(delays, floor=0.002) == pytest.approx(0.018)
    assert measured_guard([0.0001] * 64, floor=0.002) == pytest.approx(0.002)  # the floor
    assert measured_guard([0.0013] * 64, floor=0.0) == pytest.approx(0.002)  # 1.95 ms up to 0.5 ms steps
    assert measured_guard([0.001] * (MIN_SAMPLES - 1), floor=0.002) == 0.0  # too few: unmeasured


def test_a_deployment_keeps_its_ceiling_until_measured_then_carries_its_own_guard():
    guard = DispatchGuard(floor=0.002)
    dep = Candidate(7, rpm=600, tpm=1000, model="gpt-4o")
    assert guard.capacity(dep) is dep and guard.status(7) == {"ms": None, "samples": 0}
    for _ in range(MIN_SAMPLES):
        guard.sent(7, 0.003)
    view = guard.capacity(dep)
    assert (view.id, view.rpm, view.tpm, view.guard) == (7, 600, 1000, pytest.approx(0.0045))
    assert view.model == "gpt-4o"  # on a Redis Cluster, the model is its keys' slot
    assert guard.capacity(Candidate(8, rpm=600)).guard == 0.0  # another deployment: its own
    assert guard.status(7) == {"ms": 4.5, "samples": MIN_SAMPLES}
    for _ in range(SAMPLES):  # the delays shrink: the guard follows the recent ones
        guard.sent(7, 0.0005)
    assert guard.capacity(dep).guard == pytest.approx(0.002)


def test_request_windows_take_the_measured_guard_within_floor_and_ceiling_and_keep_their_buckets():
    cfg = StateConfig(minute=60.0)
    planner = WindowPlanner(cfg)
    ceiling = planner.plan(600, 1000)
    for measured, expected in ((0.012, 0.012), (0.004, cfg.guard_floor), (5.0, None)):
        plan = planner.plan(600, 1000, measured)
        for w, c in zip(plan.windows, ceiling.windows, strict=True):
            assert w.bucket == c.bucket  # every process cuts the same buckets (Redis fields)
            if w.unit == REQUESTS and expected is not None:
                assert w.span == pytest.approx(w.seconds + expected)
            else:  # token windows, and a guard above the ceiling: the ceiling
                assert w.span == c.span


async def test_a_measured_guard_frees_a_request_slot_sooner_on_both_backends(make_state):
    """RPM 60 on a 60 s minute: one request per 1 s window, buckets of 26.25 ms. Reserved at a
    bucket's start, the slot frees 1.05 s + one bucket later with the 50 ms ceiling, 1.01 s + one
    bucket later with a 10 ms guard; the shared bucket counts are the same either way."""
    state = await make_state(minute=60.0, guard_min=0.05)
    measured, ceiling = Candidate(1, rpm=60, guard=0.01), Candidate(1, rpm=60)
    start = T0 - T0 % state.planner.plan(60, 0).windows[0].bucket  # a bucket's start
    assert isinstance(await state.try_acquire([measured], 0, start), Grant)
    now = start + 1.04
    assert not isinstance(await state.try_acquire([ceiling], 0, now), Grant)
    assert isinstance(await state.try_acquire([measured], 0, now), Grant)


async def test_the_dispatcher_measures_each_hand_over_and_passes_the_guard_to_the_state(make_state):
    """Every request handed to the upstream client is a delay sample of its deployment; once
    enough are in, the state sees that deployment with the measured guard (about the floor: the
    hand-over follows the grant at once, but on Redis a loaded machine can add a few ms)."""
    state = await make_state(guard_min=0.05)
    dispatcher = BalancedDispatcher(state)
    candidates = deployment(tpm=1_000_000)
    for _ in range(MIN_SAMPLES):
        lease = await dispatcher.acquire(candidates, demand(10), NOTHING)
        dispatcher.sending(lease)
        await dispatcher.succeeded(lease, 10, 0, {})
    status = dispatcher.guard.status(1)
    assert status["samples"] == MIN_SAMPLES and status["ms"] >= state.config.guard_floor * 1000
    assert dispatcher._capacity(candidates[0]).guard == pytest.approx(status["ms"] / 1000)


def test_the_floor_is_an_operator_setting(settings):
    """Hosts whose clocks may differ by more than the default 10 ms raise it."""
    from gateway.proxy.runtime import make_dispatcher

    settings.GATEWAY = {**settings.GATEWAY, "WINDOW_GUARD_FLOOR_MS": 25.0}
    dispatcher = make_dispatcher()
    assert dispatcher.state.config.guard_floor == pytest.approx(0.025)
    assert dispatcher.guard.floor == pytest.approx(0.025)
