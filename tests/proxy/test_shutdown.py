"""Shutdown waits for the requests in flight (up to the grace period), then flushes usage."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.proxy import application
from gateway.proxy.runtime import InFlight, runtime


async def run_lifespan_shutdown() -> float:
    """Drive the ASGI lifespan through a shutdown; returns when runtime.shutdown was called."""
    messages: asyncio.Queue = asyncio.Queue()
    await messages.put({"type": "lifespan.shutdown"})
    sent = []

    async def send(message):
        sent.append(message)

    await application.lifespan({"type": "lifespan"}, messages.get, send)
    assert sent == [{"type": "lifespan.shutdown.complete"}]
    return time.monotonic()


@pytest.fixture
def fake_shutdown(monkeypatch, settings):
    settings.GATEWAY = {**settings.GATEWAY, "SHUTDOWN_GRACE_SECONDS": 0.5}
    in_flight = InFlight()
    monkeypatch.setattr(runtime, "in_flight", in_flight)
    calls: list[float] = []

    async def shutdown() -> None:
        calls.append(time.monotonic())

    monkeypatch.setattr(runtime, "shutdown", shutdown)
    return in_flight, calls


async def test_shutdown_waits_for_a_request_in_flight_to_finish(fake_shutdown):
    in_flight, calls = fake_shutdown
    in_flight.enter()
    started = time.monotonic()
    asyncio.get_running_loop().call_later(0.2, in_flight.leave)
    await run_lifespan_shutdown()
    assert len(calls) == 1 and 0.18 <= calls[0] - started < 0.45


async def test_shutdown_goes_on_after_the_grace_period(fake_shutdown):
    in_flight, calls = fake_shutdown
    in_flight.enter()  # a stream that will not end by itself
    started = time.monotonic()
    await run_lifespan_shutdown()
    assert len(calls) == 1 and 0.45 <= calls[0] - started < 1.0


async def test_shutdown_with_nothing_in_flight_is_immediate(fake_shutdown):
    _, calls = fake_shutdown
    started = time.monotonic()
    await run_lifespan_shutdown()
    assert calls[0] - started < 0.05
