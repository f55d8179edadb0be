"""A live gateway driven past what its process can relay says so (503 server_overloaded, Retry-After)
before the streams it is already serving stall.

One uvicorn process (pinned to one CPU where there are two) relays eight long "watched" streams
(20 ms per token) while a separate load generator floods it with completions of 160 kB prompts
(200 connections opened over two seconds, as traffic grows, each sending its next request as soon
as the last is answered, and waiting as long as a 503's Retry-After says). The gateway counts every prompt's tokens, the upstream only
estimates them: more work than one process can do, from clients and an upstream that do little.
The prompts are big so that the gateway's share of the work (counting every token, on its event
loop: the offload threshold is raised here) dominates, and the flood saturates the gateway however
fast the load generator's core is. A prober sends a short request every 25 ms and notes when the
first 503 comes. Stream coalescing
is off here, so that what keeps the watched streams going is admission alone.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import time
from typing import Any

import aiohttp
import pytest

from tests.bench.driver import Request, run_load

pytestmark = pytest.mark.django_db(transaction=True)

WATCHED, FLOOD = "watched", "flood"
STALL_SECONDS = 1.0  # a gap this long in a token stream is a stall a user sees
PROMPT_160KB = " ".join(f"word{i % 997} and some more text" for i in range(6400))


def stream_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "stream": True, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "go"}]}


async def watched_stream(session: aiohttp.ClientSession, url: str, key: str, t0: float) -> dict[str, Any]:
    """One long stream: its status, its events' arrival times (s since ``t0``) and its last bytes."""
    arrivals: list[float] = []
    tail = b""
    async with session.post(url, json=stream_body(WATCHED, 400), headers={"authorization": f"Bearer {key}"}) as r:
        async for chunk in r.content.iter_any():
            if b"data:" in chunk:
                arrivals.append(time.monotonic() - t0)
            tail = (tail + chunk)[-64:]
        return {"status": r.status, "arrivals": arrivals, "tail": tail}


async def probe(session: aiohttp.ClientSession, url: str, key: str, t0: float, until: float) -> list[dict[str, Any]]:
    """A new short request every 25 ms, whatever the earlier ones do: when each was sent, and how it
    was answered."""
    body = {"model": WATCHED, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}

    async def one(sent: float) -> dict[str, Any]:
        async with session.post(url, json=body, headers={"authorization": f"Bearer {key}"}) as r:
            answer = await r.read()
            code = json.loads(answer)["error"]["code"] if r.status != 200 else None
            return {"at": sent, "status": r.status, "code": code, "retry_after": r.headers.get("retry-after")}

    sent = []
    while time.monotonic() - t0 < until:
        sent.append(asyncio.ensure_future(one(time.monotonic() - t0)))
        await asyncio.sleep(0.025)
    return list(await asyncio.gather(*sent))


def test_a_saturated_gateway_refuses_new_streams_before_its_running_streams_stall(
    start_sim, deploy, tenant_key, start_process_gateway
):
    sim = start_sim(
        [
            {"name": WATCHED, "model": WATCHED, "completion_tokens": 400, "token_delay_ms": 20},
            {"name": FLOOD, "model": FLOOD, "completion_tokens": 16, "token_estimate": "fast"},
        ]
    )
    deploy(sim, [{"name": WATCHED, "model": WATCHED}, {"name": FLOOD, "model": FLOOD}])
    key = tenant_key("overload")
    # In-process state even where the suite runs on Redis: with every core saturated, the shared
    # Redis server answers late too, and its timeouts (503 state_unavailable) would be measured instead.
    gateway = start_process_gateway(
        {
            "GATEWAY_OVERLOAD_LAG_MS": "100",
            "GATEWAY_STREAM_COALESCE_MS": "0",
            "GATEWAY_OFFLOAD_BODY_BYTES": str(1 << 20),
            "REDIS_URL": "",
        }
    )
    cpus = sorted(os.sched_getaffinity(0))
    others = cpus
    if len(cpus) >= 2:  # the gateway gets a core of its own; everything else shares the other
        os.sched_setaffinity(gateway.process.pid, {cpus[-1]})
        others = cpus[:-1]
        os.sched_setaffinity(sim.pid, set(others))
    url = gateway.url + "/v1/chat/completions"
    flood = Request(
        "/v1/chat/completions",
        {"authorization": f"Bearer {key}"},
        {"model": FLOOD, "max_tokens": 16, "messages": [{"role": "user", "content": PROMPT_160KB}]},
    )

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        t0 = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            watched = [asyncio.ensure_future(watched_stream(session, url, key, t0)) for _ in range(8)]
            prober = asyncio.ensure_future(probe(session, url, key, t0, until=8.0))
            await asyncio.sleep(1.0)
            flooded = await asyncio.to_thread(
                run_load, gateway.url, [flood], cpus=others, concurrency=200, duration=5.0, ramp=2.0, retry_after=True
            )
            return await asyncio.gather(*watched), await prober, flooded

    streams, answers, flooded = asyncio.run(run())

    refused = [a for a in answers if a["status"] == 503]
    probed = collections.Counter((a["status"], a["code"]) for a in answers)
    assert refused, f"never overloaded: probes {dict(probed)}, flood {flooded['overall']}"
    assert {(a["code"], a["retry_after"]) for a in refused} == {("server_overloaded", "1")}
    first_refusal = min(a["at"] for a in refused)
    for stream in streams:
        assert stream["status"] == 200 and stream["tail"].endswith(b"data: [DONE]\n\n")
        gaps = [(after, after - before) for before, after in itertools.pairwise(stream["arrivals"])]
        stalls = [end - gap for end, gap in gaps if gap > STALL_SECONDS]
        # The refusals began before any running stream stalled (if one did at all), and none
        # stopped for long: the streams kept their pace.
        assert not stalls or first_refusal < min(stalls), (first_refusal, stalls)
        assert max(gap for _, gap in gaps) < 2 * STALL_SECONDS
