"""The learned upstream charge per reserved token (``gateway.balancer.calibration``).

A fake upstream here keeps its own one-minute token window and charges each request
``factor x`` what the gateway reserved (plus, in one test, another client's tokens); its answers
carry ``x-ratelimit-remaining-tokens`` as Azure's do. The calibration must learn the factor, stay
within its bounds, shrug off outliers, and (through the dispatcher) make the state reserve the
TPM in the gateway's units. Sharing between processes runs against Redis (skipped without it).
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
import redis.asyncio

from gateway.balancer.calibration import (
    HIGHEST,
    LOWEST,
    MIN_SAMPLES,
    Calibration,
    CalibrationSync,
    calibration_key,
)
from gateway.balancer.contract import Grant
from gateway.balancer.dispatcher import Demand
from gateway.balancer.policy import BalancedDispatcher
from gateway.snapshot.types import AZURE, DeploymentView, EndpointView

MINUTE = 6.0
TPM = 20_000
T0 = 1_000_000.0


class FakeUpstream:
    """A token window of ``MINUTE`` that charges ``factor x`` each reservation, on arrival."""

    def __init__(self, factor: float, tpm: int = 10 * TPM) -> None:
        self.factor = factor
        self.tpm = tpm
        self.log: list[tuple[float, int]] = []

    def used(self, now: float) -> int:
        self.log = [(t, n) for t, n in self.log if t > now - MINUTE]
        return sum(n for _, n in self.log)

    def charge(self, now: float, tokens: int, extra: int = 0) -> list[tuple[bytes, bytes]]:
        self.log.append((now, round(tokens * self.factor) + extra))
        remaining = max(self.tpm - self.used(now), 0)
        return [(b"x-ratelimit-remaining-tokens", str(remaining).encode())]


def learned(factor: float) -> float:
    """What the calibration should settle on for an upstream charging exactly ``factor`` per
    reserved token: that (the samples agree, so the margin for their spread is nil)."""
    return factor


def drive(calibration: Calibration, upstream: FakeUpstream, n: int, *, rate: float = 19.0, start: float = T0) -> float:
    """``n`` requests of 100-1000 tokens, ``rate`` per second (each one more than the calibration's
    50 ms after the one before, so that every one is sampled); returns the time after the last."""
    rng = random.Random(7)
    now = start
    for _ in range(n):
        tokens = rng.randint(100, 1000)
        sent = calibration.dispatched(1, tokens, now)
        calibration.answered(sent, upstream.tpm, upstream.charge(now + 0.005, tokens))
        now += 1.0 / rate
    return now


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.15, 2.5])
def test_learns_the_upstreams_charge_per_reserved_token(factor):
    calibration = Calibration(MINUTE)
    drive(calibration, FakeUpstream(factor), 200)
    assert calibration.factor(1) == pytest.approx(learned(factor), abs=0.03)
    assert calibration.factor(1) >= factor
    status = calibration.status(1)
    assert status["samples"] > 20 and status["processes"] == 1


def test_the_factor_is_bounded():
    high, low = Calibration(MINUTE), Calibration(MINUTE)
    drive(high, FakeUpstream(9.0, tpm=5 * 10**5), 400)
    drive(low, FakeUpstream(0.1), 100)
    assert high.factor(1) == HIGHEST
    assert low.factor(1) == LOWEST


def test_no_sample_while_the_gateway_has_reserved_little():
    """A ratio of two small numbers is noise: nothing is learned below a tenth of the limit."""
    calibration = Calibration(MINUTE)
    upstream = FakeUpstream(2.0)
    sent = calibration.dispatched(1, 500, T0)
    calibration.answered(sent, upstream.tpm, upstream.charge(T0, 500))
    assert calibration.status(1)["samples"] == 0 and calibration.factor(1) == 1.0


def test_outliers_move_the_median_not_the_factor():
    """Another client's burst crossing a few answers (its 5000 tokens in the window) moves them far;
    the factor stays the charge per reserved token."""
    calibration = Calibration(MINUTE)
    upstream = FakeUpstream(1.2)
    now = drive(calibration, upstream, 100)
    for i in range(6):
        sent = calibration.dispatched(1, 400, now)
        headers = upstream.charge(now, 400, extra=5000 if i % 2 == 0 else 0)
        calibration.answered(sent, upstream.tpm, headers)
        now += 0.051
    assert calibration.factor(1) == pytest.approx(learned(1.2), abs=0.03)


def test_steady_traffic_outside_the_gateway_is_carried_by_the_factor():
    """Another client holding 30 % of the window: what the gateway may reserve shrinks by it."""
    calibration = Calibration(MINUTE)
    upstream = FakeUpstream(1.0)
    now = T0
    rng = random.Random(3)
    for _ in range(400):
        tokens = rng.randint(100, 1000)
        sent = calibration.dispatched(1, tokens, now)
        # The other client sends 6000 tokens per minute, spread evenly.
        other = round(6000 / MINUTE / 20)
        calibration.answered(sent, upstream.tpm, upstream.charge(now, tokens, extra=other))
        now += 0.051
    ours = 20 * MINUTE * 550  # reserved by the gateway per window, on average
    expected = learned((ours + 6000) / ours)
    assert calibration.factor(1) == pytest.approx(expected, rel=0.08)


def test_a_429_does_not_count_its_own_request_and_one_without_figures_nudges_up():
    calibration = Calibration(MINUTE)
    upstream = FakeUpstream(1.5)
    now = drive(calibration, upstream, 100)
    assert calibration.factor(1) == pytest.approx(learned(1.5), abs=0.03)
    # A 429 with the remaining figure: the refused request is out of both windows.
    sent = calibration.dispatched(1, 800, now)
    remaining = max(upstream.tpm - upstream.used(now), 0)
    calibration.answered(
        sent, upstream.tpm, [(b"x-ratelimit-remaining-tokens", str(remaining).encode())], rate_limited=True
    )
    assert calibration.factor(1) == pytest.approx(learned(1.5), abs=0.03)
    # 429s without any figure: the upstream counted more than we thought; each one is a sample
    # 10 % above the current factor, so a run of them raises it.
    before = calibration.factor(1)
    for _ in range(40):
        sent = calibration.dispatched(1, 800, now)
        calibration.answered(sent, upstream.tpm, [], rate_limited=True)
    assert calibration.factor(1) > before


def test_samples_that_disagree_raise_the_factor_by_their_spread():
    """Requests charged by ratios of their own (an English prompt costs a characters / 4 upstream
    more than a CJK one): the window's ratio wanders with its mix, and the last request into a
    full window is charged by its own ratio; the factor stands above the samples' upper quantile
    by twice their spread. When the samples agree there is no margin (see the tests above)."""
    calibration = Calibration(MINUTE)
    upstream = FakeUpstream(1.0)
    rng = random.Random(11)
    now = T0
    for i in range(300):
        upstream.factor = 1.6 if (i // 40) % 2 else 0.9  # the mix changes every 2 s
        tokens = rng.randint(100, 1000)
        sent = calibration.dispatched(1, tokens, now)
        calibration.answered(sent, upstream.tpm, upstream.charge(now, tokens))
        now += 0.051
    samples = sorted(calibration._learned[1].samples)
    upper = samples[round(0.8 * (len(samples) - 1))]
    assert upper < samples[-1]  # the test's premise: the samples spread
    assert calibration.factor(1) > upper + 0.01


def test_an_answer_waits_for_the_other_processes_figures_and_interpolates_them():
    """Another process reserves 0 tokens by T0 and 4000 by T0 + 0.1 (as it publishes). This
    process sends 2000 at T0 + 0.05, when the upstream holds 2000 of each: the sample must be
    4000 / (2000 + 2000) = 1, not 4000 / 2000 = 2 as the other's last figure (0) would make it."""
    calibration = Calibration(MINUTE)
    calibration.merge(1, {"other": (0, 1.0, 0, T0)})
    sent = calibration.dispatched(1, 2000, T0 + 0.05)
    calibration.answered(sent, 10_000, [(b"x-ratelimit-remaining-tokens", b"6000")])
    assert calibration._learned[1].taken == 0  # waiting for the other's next figure
    calibration.merge(1, {"other": (4000, 1.0, 0, T0 + 0.1)})
    assert calibration._learned[1].taken == 1
    assert list(calibration._learned[1].samples) == [pytest.approx(1.0)]
    # An answer older than the publications kept cannot be placed, and is dropped.
    old = calibration.dispatched(1, 2000, T0 - 1)
    calibration.answered(old, 10_000, [(b"x-ratelimit-remaining-tokens", b"6000")])
    calibration.merge(1, {"other": (4000, 1.0, 0, T0 + 0.2)})
    assert calibration._learned[1].taken == 1 and not calibration._learned[1].pending


def test_the_factor_waits_for_a_few_samples():
    calibration = Calibration(MINUTE)
    upstream = FakeUpstream(2.0)
    now = T0
    while calibration._learned.get(1) is None or calibration._learned[1].taken < MIN_SAMPLES - 1:
        now = drive(calibration, upstream, 1, start=now)
    assert calibration.factor(1) == 1.0
    drive(calibration, upstream, 1, start=now)
    assert calibration.factor(1) == 2.0


def test_capacity_divides_the_tpm_and_leaves_the_rest():
    endpoint = EndpointView(id=1, name="east", kind=AZURE, base_url="https://east.example")
    d = DeploymentView(id=1, endpoint=endpoint, name="d", model="m", rpm=600, tpm=TPM, weight=3)
    calibration = Calibration(MINUTE)
    assert calibration.capacity(d) is d  # nothing learned: the deployment itself
    drive(calibration, FakeUpstream(1.25), 150)
    view = calibration.capacity(d)
    assert (view.id, view.rpm, view.weight, view.sku) == (1, 600, 3, d.sku)
    assert view.tpm == pytest.approx(TPM / calibration.factor(1), abs=1)
    assert calibration.capacity(d) is view  # cached


async def test_the_dispatcher_reserves_the_tpm_in_the_gateways_units(make_state):
    """After the upstream has shown it charges 2 tokens per reserved token, a deployment of
    TPM 2000 takes 1000 of the gateway's tokens per minute, not 2000."""
    state = await make_state(minute=MINUTE)
    calibration = Calibration(MINUTE)
    dispatcher = BalancedDispatcher(state, calibration=calibration)
    endpoint = EndpointView(id=1, name="east", kind=AZURE, base_url="https://east.example")
    d = (DeploymentView(id=1, endpoint=endpoint, name="d", model="m", tpm=2000),)
    drive(calibration, FakeUpstream(2.0), 50, start=0.0)  # long expired
    assert calibration.factor(1) == pytest.approx(learned(2.0), abs=0.01)
    fit = int(2000 / calibration.factor(1)) // 250  # 4: 2000 / 2 = 1000 of the gateway's tokens
    demand = Demand(model="m", prompt_tokens=250, allowance=0, context_tokens=250, priority=1, tenant="A", timeout=0.0)
    granted = 0
    for _ in range(8):
        try:
            lease = await dispatcher.acquire(d, demand, frozenset(), wait=False)
        except Exception:
            break
        assert isinstance(lease.grant, Grant) and lease.extra["calibration"].entry[1] == 250
        granted += 1
    assert granted == fit == 4


async def test_processes_share_their_reservations_and_factors_over_redis(redis_url):
    """Two processes' calibrations on one Redis: each counts the other's reservations in R, and
    both use the sample-weighted factor."""
    client = redis.asyncio.Redis.from_url(redis_url)
    prefix = f"test-calibration-{uuid.uuid4().hex[:8]}"
    try:
        one, two = Calibration(MINUTE), Calibration(MINUTE)
        sync_one = CalibrationSync(one, client, prefix, 0.05)
        sync_two = CalibrationSync(two, client, prefix, 0.05)
        upstream = FakeUpstream(1.3)
        rng = random.Random(5)
        now = T0
        for i in range(300):
            calibration = one if i % 2 else two
            tokens = rng.randint(100, 1000)
            sent = calibration.dispatched(1, tokens, now)
            calibration.answered(sent, upstream.tpm, upstream.charge(now, tokens))
            if i % 2:  # every 0.1 s of simulated time, as the background task would
                await sync_one.exchange(now)
                await sync_two.exchange(now)
            now += 0.051
        # Each saw only half the reservations in its own log: without the other's it would learn 2.6.
        for calibration in (one, two):
            assert calibration.factor(1) == pytest.approx(learned(1.3), abs=0.05), calibration.status(1)
            assert calibration.status(1)["processes"] == 2
        assert await client.exists(calibration_key(prefix, 1))
        assert "{d1}" in calibration_key(prefix, 1)
        # A process that stops publishing is forgotten after a few intervals.
        await sync_one.exchange(now + 10)
        assert one.status(1)["processes"] == 1
        # Without Redis a process goes on with its own figures.
        sync_two.forget_others()
        assert two.status(1)["processes"] == 1 and two.factor(1) == two.status(1)["local_factor"]
    finally:
        await client.delete(calibration_key(prefix, 1))
        await client.aclose()


async def test_the_background_task_exchanges_and_stops(redis_url):
    client = redis.asyncio.Redis.from_url(redis_url)
    prefix = f"test-calibration-{uuid.uuid4().hex[:8]}"
    try:
        calibration = Calibration(MINUTE)
        calibration.dispatched(7, 100)
        sync = CalibrationSync(calibration, client, prefix, 0.02)
        sync.start()
        for _ in range(50):
            if await client.exists(calibration_key(prefix, 7)):
                break
            await asyncio.sleep(0.02)
        assert await client.hlen(calibration_key(prefix, 7)) == 1
        await sync.stop()
    finally:
        await client.delete(calibration_key(prefix, 7))
        await client.aclose()


def test_a_factor_just_below_one_is_one():
    """An exact upstream, seen through a burst (requests sent, not yet counted): samples a little
    below 1 must not let the gateway reserve more than the upstream holds."""
    calibration = Calibration(MINUTE)
    drive(calibration, FakeUpstream(0.98), 150)
    assert calibration.factor(1) == 1.0
    clearly = Calibration(MINUTE)
    drive(clearly, FakeUpstream(0.9), 150)
    assert clearly.factor(1) == pytest.approx(0.9, abs=0.015)


def test_requests_sent_close_together_are_not_sampled():
    """Twelve requests sent within a few ms, answered as they arrive: the upstream counts each
    one before the next arrives, while R already holds all twelve. Sampled, they would say the
    upstream charges a fraction of what it does."""
    calibration = Calibration(MINUTE)
    upstream = FakeUpstream(1.0, tpm=10_000)
    burst = [calibration.dispatched(1, 500, T0 + i * 0.001) for i in range(12)]
    for i, sent in enumerate(burst):
        calibration.answered(sent, upstream.tpm, upstream.charge(T0 + 0.01 + i * 0.001, 500))
    # The first went alone but R (500) was below a tenth of the limit (1000); the others followed one ms
    # after another.
    assert calibration._learned[1].taken == 0
    assert calibration.factor(1) == 1.0
    # Sent 50 ms after the burst, a request is sampled: the burst has reached the upstream.
    sent = calibration.dispatched(1, 500, T0 + 0.062)
    calibration.answered(sent, upstream.tpm, upstream.charge(T0 + 0.063, 500))
    assert list(calibration._learned[1].samples) == [1.0]
