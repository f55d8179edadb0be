"""An overloaded process says so at once (503 server_overloaded, Retry-After) instead of letting new
streams wait; streams already running go on. The loop's pressure is measured by a timer task,
which tests replace by setting the measurements themselves (``pressure_by_hand``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.proxy.errors import GatewayError
from gateway.proxy.pressure import TICK_SECONDS, LoopPressure
from tests.fakes.simulator import InLoopSimulator
from tests.proxy.asgi_client import COMPLETION_TOKENS, GatewayHTTP

CHAT_PATH = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": HI, **fields}


def press(pressure: LoopPressure, lag: float, busy: float = 1.0, ticks: int = 40) -> None:
    """Feed ``ticks`` measurements (2 s of them), enough for the smoothed values to settle."""
    for _ in range(ticks):
        pressure.observe(lag, busy)


# -- the measure -----------------------------------------------------------------------------------


def test_one_slow_tick_is_not_overload_but_a_lasting_lag_is():
    pressure = LoopPressure(lag_limit=0.1, max_hold=0.2)
    pressure.observe(0.4, 0.2)  # one 400 ms stall (a big collection, say)
    assert not pressure.overloaded
    press(pressure, 0.15, 0.2, ticks=20)
    assert pressure.overloaded


def test_overload_ends_only_once_the_lag_is_below_half_the_limit():
    pressure = LoopPressure(lag_limit=0.1, max_hold=0.2)
    press(pressure, 0.3)
    assert pressure.overloaded
    press(pressure, 0.07)  # below the limit, above half of it
    assert pressure.overloaded
    press(pressure, 0.01)
    assert not pressure.overloaded


def test_streams_are_held_only_when_the_process_is_more_than_half_busy_and_more_the_busier():
    pressure = LoopPressure(lag_limit=0.1, max_hold=0.2)
    press(pressure, 0.0, busy=0.4)
    assert pressure.stream_hold == 0.0
    press(pressure, 0.0, busy=0.75)
    assert 0.08 < pressure.stream_hold < 0.12
    press(pressure, 0.0, busy=1.2)
    assert pressure.stream_hold == pytest.approx(0.2)
    press(pressure, 0.08, busy=0.3)  # starved of its core by others: the lag counts as pressure
    assert pressure.stream_hold > 0.1


def test_switched_off_nothing_is_refused_or_held():
    pressure = LoopPressure(lag_limit=0.0, max_hold=0.0)
    press(pressure, 5.0, busy=1.0)
    assert not pressure.overloaded and pressure.stream_hold == 0.0
    pressure.admit()


async def test_the_timer_sees_a_loop_that_is_blocked():
    pressure = LoopPressure(lag_limit=0.05, max_hold=0.2)
    pressure.start()
    try:
        await asyncio.sleep(3 * TICK_SECONDS)
        assert pressure.lag < 0.02
        idle = pressure.busy
        for _ in range(10):  # a loop kept busy: 80 ms callbacks back to back
            spin_until = time.perf_counter() + 0.08
            while time.perf_counter() < spin_until:
                pass
            await asyncio.sleep(0)
        assert pressure.lag > 0.05 and pressure.overloaded
        # Spinning, the process used what the machine gave it (a whole core when nothing else runs).
        assert pressure.busy > max(0.1, 3 * idle)
    finally:
        await pressure.stop()
    assert pressure.lag == 0.0 and not pressure.overloaded


async def test_a_burst_is_refused_while_it_blocks_the_loop_before_the_smoothed_lag_knows():
    pressure = LoopPressure(lag_limit=0.05, max_hold=0.2)
    pressure.start()
    try:
        await asyncio.sleep(2 * TICK_SECONDS)
        pressure.admit()  # an idle loop admits
        # A burst: one callback's work after another, the timer not getting its turn in between,
        # for longer than twice the limit.
        spin_until = time.perf_counter() + 6 * TICK_SECONDS
        while time.perf_counter() < spin_until:
            pass
        assert not pressure.overloaded  # the smoothed measure has not seen it yet...
        with pytest.raises(GatewayError) as refused:
            pressure.admit()  # ...but the request that comes in the burst is refused
        assert refused.value.status == 503
        await asyncio.sleep(2 * TICK_SECONDS)
        if not pressure.overloaded:  # once the timer ran, admission follows the smoothed lag again
            pressure.admit()
    finally:
        await pressure.stop()


async def test_one_stall_shorter_than_twice_the_limit_refuses_nobody():
    pressure = LoopPressure(lag_limit=0.2, max_hold=0.2)
    pressure.start()
    try:
        await asyncio.sleep(2 * TICK_SECONDS)
        spin_until = time.perf_counter() + 0.25  # one slow callback (a collection of the heap, say)
        while time.perf_counter() < spin_until:
            pass
        pressure.admit()  # late by at most 0.25 s: more than the limit, less than twice it
    finally:
        await pressure.stop()


# -- admission through the request path ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_an_overloaded_process_refuses_new_requests_at_once_with_503_and_retry_after(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, pressure_by_hand: LoopPressure
):
    press(pressure_by_hand, lag=0.5)

    response = await gateway_http.post(CHAT_PATH, chat(stream=True))

    assert response.status_code == 503
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("api_error", "server_overloaded")
    assert response.headers["retry-after"] == "1" and response.headers["retry-after-ms"] == "1000"
    assert recording_sim.calls == []  # nothing reserved, nothing sent upstream
    record = await gateway_http.the_usage_record()
    assert (record.status, record.outcome, record.error_code) == (503, "rate_limited", "server_overloaded")
    assert (record.prompt_tokens, record.completion_tokens, record.cost) == (0, 0, 0)


@pytest.mark.django_db(transaction=True)
async def test_requests_are_admitted_again_once_the_lag_is_gone(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, pressure_by_hand: LoopPressure
):
    press(pressure_by_hand, lag=0.5)
    assert (await gateway_http.post(CHAT_PATH, chat())).status_code == 503
    press(pressure_by_hand, lag=0.0, busy=0.1, ticks=60)
    assert (await gateway_http.post(CHAT_PATH, chat())).status_code == 200


@pytest.mark.django_db(transaction=True)
async def test_a_stream_already_running_goes_on_when_the_process_becomes_overloaded(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, pressure_by_hand: LoopPressure
):
    for deployment in recording_sim.state.config.deployments:
        recording_sim.state.upsert(deployment.name, {"token_delay_ms": 40})
    running = asyncio.ensure_future(gateway_http.post(CHAT_PATH, chat(stream=True)))
    # Admitted and forwarded: the stream is under way. (The simulator notes calls in a list, with no
    # event to wait for.)
    while not recording_sim.calls:  # noqa: ASYNC110
        await asyncio.sleep(0.005)

    press(pressure_by_hand, lag=0.5)
    refused = await gateway_http.post(CHAT_PATH, chat(stream=True))
    streamed = await running

    assert refused.status_code == 503
    assert streamed.status_code == 200
    assert streamed.text.count('"content":') == COMPLETION_TOKENS + 1  # the role chunk and every token
    assert streamed.text.endswith("data: [DONE]\n\n")
    records = sorted(await gateway_http.usage_records(), key=lambda r: r.status)
    assert [(r.status, r.error_code, r.completion_tokens) for r in records] == [
        (200, "", COMPLETION_TOKENS),
        (503, "server_overloaded", 0),
    ]
