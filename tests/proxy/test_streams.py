"""Streams through the gateway in-process: what the client receives is what the upstream wrote.

The simulated upstream's own writes are captured (``upstream_writes``), so each test compares the
client's bytes with the upstream's, byte for byte. Fixtures: ``tests/proxy/conftest.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.proxy.pressure import LoopPressure
from tests.fakes.simulator import InLoopSimulator
from tests.proxy.asgi_client import COMPLETION_TOKENS, GatewayHTTP

pytestmark = pytest.mark.django_db(transaction=True)

CHAT_PATH = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
PROMPT_TOKENS = 8


def stream_body(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": HI, "stream": True, **fields}


def usage_event_of(upstream: bytes) -> bytes:
    """The one event of the upstream's stream that carries the usage object."""
    events = [e + b"\n\n" for e in upstream.split(b"\n\n") if e]
    found = [e for e in events if b'"usage":{' in e]
    assert len(found) == 1, found
    return found[0]


async def test_a_client_that_asked_for_usage_receives_the_upstreams_bytes_unchanged(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, upstream_writes: list[bytes]
):
    response = await gateway_http.post(CHAT_PATH, stream_body(stream_options={"include_usage": True}))

    assert response.status_code == 200, response.text
    upstream = b"".join(upstream_writes)
    assert upstream.count(b"data:") == COMPLETION_TOKENS + 4  # role, tokens, finish, usage, [DONE]
    assert response.content == upstream


async def test_a_client_that_did_not_ask_receives_everything_but_the_usage_chunk(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, upstream_writes: list[bytes]
):
    response = await gateway_http.post(CHAT_PATH, stream_body())

    assert response.status_code == 200, response.text
    assert recording_sim.calls[0].body["stream_options"] == {"include_usage": True}  # the gateway asked
    upstream = b"".join(upstream_writes)
    usage = usage_event_of(upstream)
    assert response.content == upstream.replace(usage, b"")
    assert response.content.endswith(b"data: [DONE]\n\n")


async def test_a_streams_usage_record_takes_the_upstreams_usage_chunk(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, upstream_writes: list[bytes]
):
    response = await gateway_http.post(CHAT_PATH, stream_body())

    assert response.status_code == 200
    usage = json.loads(usage_event_of(b"".join(upstream_writes))[len(b"data: ") :])["usage"]
    record = await gateway_http.the_usage_record()
    assert (record.status, record.outcome, record.error_code) == (200, "ok", "")
    assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert (record.prompt_tokens, record.completion_tokens) == (PROMPT_TOKENS, COMPLETION_TOKENS)
    assert not record.tokens_estimated
    assert record.ttft_ms is not None and record.ttft_ms >= 0


async def test_under_pressure_a_streams_events_go_out_in_fewer_writes_and_unchanged(
    gateway_http: GatewayHTTP,
    recording_sim: InLoopSimulator,
    upstream_writes: list[bytes],
    pressure_by_hand: LoopPressure,
):
    # 5 tokens 20 ms apart; the relay may hold its reads for 60 ms: about three events per write.
    for deployment in recording_sim.state.config.deployments:
        recording_sim.state.upsert(deployment.name, {"token_delay_ms": 20})
    pressure_by_hand.stream_hold = 0.06
    sent: list[bytes] = []

    async def counting_app(scope, receive, send):
        async def spy(message):
            if message["type"] == "http.response.body" and message.get("body"):
                sent.append(message["body"])
            await send(message)

        await gateway_http.app(scope, receive, spy)

    response = await GatewayHTTP(counting_app, gateway_http.secret).post(
        CHAT_PATH, stream_body(stream_options={"include_usage": True})
    )

    assert response.content == b"".join(upstream_writes)
    # Unheld, each of the 5 tokens goes out alone (6 writes or more); held, 3 writes at most.
    assert len(sent) <= 3, [body.count(b"data:") for body in sent]
    assert sent[0].count(b"data:") == 1  # the first event is never held
