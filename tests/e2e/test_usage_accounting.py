"""Every request that got past its headers leaves exactly one usage record: successes, errors,
rejections and client disconnects alike, also across a graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from billing.models import UsageRecord
from tests.e2e.servers import ProcessGateway
from tests.e2e.usage import wait_for_records

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hi"}]


async def _disconnect_mid_stream(http: httpx.AsyncClient, auth: dict) -> str:
    async with http.stream(
        "POST", "/v1/chat/completions", headers=auth, json={"model": "slow-model", "messages": HELLO, "stream": True}
    ) as response:
        async for _ in response.aiter_bytes():
            break  # first chunk, then hang up
    return "disconnect"


async def _disconnect_while_waiting(http: httpx.AsyncClient, auth: dict) -> str:
    try:
        await http.post(
            "/v1/chat/completions", headers=auth, timeout=0.3, json={"model": "slow-model", "messages": HELLO}
        )
    except httpx.TimeoutException:
        return "timeout"
    return "answered"


async def _mixed_run(url: str, secret: str) -> list:
    auth = {"Authorization": f"Bearer {secret}"}
    calls = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(8):
            calls.append(http.post("/v1/chat/completions", headers=auth, json={"model": "gpt-4o", "messages": HELLO}))
            calls.append(http.post("/v1/chat/completions", headers=auth, content=b"{broken"))
            calls.append(http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}))
            calls.append(http.post("/v1/embeddings", headers=auth, json={"model": "nope", "input": "x"}))
        for _ in range(3):
            calls.append(_disconnect_mid_stream(http, auth))
            calls.append(_disconnect_while_waiting(http, auth))
        return await asyncio.gather(*calls, return_exceptions=True)


@pytest.fixture
def breaker_out_of_the_way(settings):
    """With one deployment and 30 % random 500s, five failures in a row open its breaker now and
    then, and a request already retrying then waits for it to half-open (up to 30 s), past this
    test's client timeout. The breaker is not what this test is about (tests/proxy/test_forward.py
    is); set before ``gateway`` starts, which keeps it."""
    settings.GATEWAY = {**settings.GATEWAY, "BREAKER_FAILURES": 1000}


def test_records_equal_requests_after_a_mixed_run(breaker_out_of_the_way, gateway, key_a, sim):
    sim.inject("chat-a", {"kind": "probability", "status": 500, "p": 0.3})
    results = asyncio.run(_mixed_run(gateway.url, key_a.secret))
    assert not [r for r in results if isinstance(r, Exception)], results
    records = wait_for_records(len(results), timeout=10)
    outcomes = {}
    for record in records:
        outcomes[record.outcome] = outcomes.get(record.outcome, 0) + 1
    assert outcomes.get("client_disconnect", 0) == 6, outcomes
    assert outcomes.get("auth_error") == 8 and outcomes.get("client_error", 0) >= 16, outcomes
    assert len({r.request_id for r in records}) == len(records)


def test_disconnect_cancels_the_upstream_stream(gateway, key_a, sim):
    asyncio.run(
        _disconnect_mid_stream(httpx.AsyncClient(base_url=gateway.url), {"Authorization": f"Bearer {key_a.secret}"})
    )
    [record] = wait_for_records(1)
    assert record.outcome == "client_disconnect" and record.streamed
    # The upstream would stream 10 tokens over ~1 s; cancelled, it records a broken (dropped) stream.
    time.sleep(1.2)
    stats = sim.deployment_stats("chat-slow")
    assert stats["requests"] == 1
    assert record.completion_tokens < 10


def test_graceful_shutdown_finishes_streams_and_flushes_usage(upstream, key_a):
    gateway = ProcessGateway({"GATEWAY_USAGE_FLUSH_SECONDS": "30"}).start()  # only shutdown flushes
    try:
        auth = {"Authorization": f"Bearer {key_a.secret}"}
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            for _ in range(3):
                assert (
                    http.post(
                        "/v1/chat/completions", headers=auth, json={"model": "gpt-4o", "messages": HELLO}
                    ).status_code
                    == 200
                )
            with http.stream(
                "POST",
                "/v1/chat/completions",
                headers=auth,
                json={"model": "slow-model", "messages": HELLO, "stream": True},
            ) as response:
                chunks = response.iter_bytes()
                first = next(chunks)
                gateway.process.send_signal(signal.SIGTERM)
                rest = b"".join(chunks)
            assert b"[DONE]" in first + rest, "the in-flight stream was not allowed to finish"
        # uvicorn re-raises SIGTERM once its graceful shutdown is done, so -15 is a clean exit.
        assert gateway.process.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        gateway.stop()
    records = list(UsageRecord.objects.all())
    assert len(records) == 4 and all(r.status == 200 for r in records)


@pytest.mark.e2e
def test_a_stream_longer_than_the_grace_is_cut_at_the_grace_and_still_recorded(upstream, key_a, sim):
    sim.configure("chat-slow", completion_tokens=100, token_delay_ms=100)  # a 10 s stream
    grace = 1
    gateway = ProcessGateway(
        {"GATEWAY_USAGE_FLUSH_SECONDS": "30", "GATEWAY_SHUTDOWN_GRACE_SECONDS": str(grace)},  # only shutdown flushes
        uvicorn_args=["--timeout-graceful-shutdown", str(grace)],
    ).start()
    try:
        auth = {"Authorization": f"Bearer {key_a.secret}"}
        body = {"model": "slow-model", "messages": HELLO, "stream": True}
        with (
            httpx.Client(base_url=gateway.url, timeout=15) as http,
            http.stream("POST", "/v1/chat/completions", headers=auth, json=body) as response,
        ):
            chunks = response.iter_bytes()
            first = next(chunks)
            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                rest = b"".join(chunks)
            except httpx.HTTPError:
                rest = b""
        assert gateway.process.wait(timeout=20) in (0, -signal.SIGTERM)
        exited_after = time.monotonic() - signalled
    finally:
        gateway.stop()
    assert b"[DONE]" not in first + rest, "the stream should have been cut at the grace period"
    assert exited_after < grace + 3, f"the process took {exited_after:.1f}s to exit after SIGTERM"
    print(f"\nexited {exited_after:.2f}s after SIGTERM (grace {grace}s)")
    [record] = UsageRecord.objects.all()
    assert record.streamed and record.model == "slow-model"
