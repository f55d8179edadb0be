"""The first-byte budget and the retry plan, without a network."""

from __future__ import annotations

import random

import pytest

from gateway.proxy import errors
from gateway.proxy.retries import BACKOFF_SECONDS, MIN_ATTEMPT_SECONDS, FirstByteBudget, RetryPlan

BOOM = errors.bad_gateway("boom")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_is_charged_only_while_running():
    clock = Clock()
    budget = FirstByteBudget(10.0, clock)
    clock.now += 5  # waiting for capacity: not charged
    assert budget.left() == 10.0
    budget.resume()
    clock.now += 3
    assert budget.left() == 7.0
    budget.pause()
    clock.now += 100
    budget.resume()
    budget.resume()  # idempotent: the clock is not restarted
    clock.now += 2
    budget.pause()
    budget.pause()
    assert budget.left() == 5.0


def plan(candidates=(1, 2), max_retries=2, seconds=10.0) -> tuple[RetryPlan, Clock]:
    clock = Clock()
    return RetryPlan(candidates, max_retries, FirstByteBudget(seconds, clock), random.Random(7)), clock


def test_untried_deployments_come_first_then_tried_ones_after_a_back_off():
    retry, _ = plan()
    assert retry.exclude() == frozenset()
    assert retry.after_failure(1, BOOM) == 0.0
    assert retry.exclude() == {1}
    backoff = retry.after_failure(2, BOOM)
    assert BACKOFF_SECONDS[0] <= backoff <= BACKOFF_SECONDS[1]
    assert retry.exclude() == frozenset(), "every deployment was tried: any may go again"


def test_transient_failures_stop_at_max_retries():
    retry, _ = plan(candidates=(1,), max_retries=2)
    assert retry.after_failure(1, BOOM) is not None
    assert retry.after_failure(1, BOOM) is not None
    assert retry.after_failure(1, BOOM) is None
    assert retry.last_error is BOOM


def test_zero_retries_means_one_attempt():
    retry, _ = plan(max_retries=0)
    assert retry.after_failure(1, BOOM) is None


def test_a_refusal_bars_the_deployment_without_spending_a_retry():
    retry, _ = plan(candidates=(1, 2, 3), max_retries=0)
    assert retry.after_failure(1, BOOM, refused=True) == 0.0
    assert retry.after_failure(2, BOOM, refused=True) == 0.0
    assert retry.exclude() == {1, 2}
    assert retry.after_failure(3, BOOM, refused=True) is None, "nothing left to try"


def test_a_deployment_whose_breaker_opened_is_not_tried_again():
    retry, _ = plan(candidates=(1, 2))
    assert retry.after_failure(1, BOOM, breaker_open=True) == 0.0
    assert retry.after_failure(2, BOOM) is not None
    assert retry.exclude() == {1}
    retry, _ = plan(candidates=(1,))
    assert retry.after_failure(1, BOOM, breaker_open=True) is None


@pytest.mark.parametrize("left", [MIN_ATTEMPT_SECONDS - 0.01, 0.0, -1.0])
def test_no_retry_without_time_left(left):
    retry, clock = plan(candidates=(1, 2), seconds=5.0)
    retry.budget.resume()
    clock.now += 5.0 - left
    assert retry.after_failure(1, BOOM) is None


def test_the_back_off_must_fit_the_budget_too():
    retry, clock = plan(candidates=(1,), seconds=1.0)
    retry.budget.resume()
    clock.now += 1.0 - MIN_ATTEMPT_SECONDS - 0.04  # less than the shortest back-off plus an attempt
    assert retry.after_failure(1, BOOM) is None
