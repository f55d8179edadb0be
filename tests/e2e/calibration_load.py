"""Load for the capacity-calibration e2e tests (``test_capacity_calibration.py``): a mix of prompts
whose upstream charge differs from the gateway's count, and the arithmetic of what the upstream
charged.

The simulated upstream charges each deployment by its own arrival rule (``arrival_count``,
``arrival_factor``: see ``gateway.simulator.arrival``); the gateway counts with tiktoken as
always, so the two disagree, in both directions depending on the prompt: characters / 4 is above
tiktoken for English and code, far below it for CJK, and long words sit in between.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from typing import Any

from gateway.proxy import tokens
from tests.e2e.balancing import MODEL, Run, Shot, _fire

ENGLISH = (
    "The committee reviewed the quarterly figures and asked the team to explain why the deliveries to the "
    "northern warehouses had slipped by two weeks, what the new schedule looks like, and who owns each step. "
)
CODE = (
    "def merge_sorted(left: list[int], right: list[int]) -> list[int]:\n"
    "    result, i, j = [], 0, 0\n"
    "    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n"
    "            result.append(left[i]); i += 1\n"
    "        else:\n"
    "            result.append(right[j]); j += 1\n"
    "    return result + left[i:] + right[j:]\n"
)
CJK = "请根据以下会议记录总结三项主要决定，并列出每项决定的负责人和截止日期。会议讨论了预算、招聘和产品发布计划。"
LONG_WORDS = (
    "Donaudampfschifffahrtsgesellschaftskapitän pneumonoultramicroscopicsilicovolcanoconiosis "
    "antidisestablishmentarianism Rindfleischetikettierungsüberwachungsaufgabenübertragungsgesetz "
)
TEXTS = {"english": ENGLISH, "code": CODE, "cjk": CJK, "long-words": LONG_WORDS}


def mixed_bodies(n: int, seed: int = 18) -> list[dict[str, Any]]:
    """``n`` chat bodies: one of the four texts repeated 1-8 times, ``max_tokens`` 16-1000, every
    other one streamed (with usage, as the SDKs ask)."""
    rng = random.Random(seed)
    kinds = list(TEXTS)
    bodies = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        text = TEXTS[kind] * rng.randint(1, 8)
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}],
            "max_tokens": rng.randint(16, 1000),
        }
        if i % 2:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        bodies.append(body)
    return bodies


def upstream_charge(body: dict[str, Any], arrival_count: str, arrival_factor: float) -> int:
    """What the simulator charges ``body`` on arrival under a deployment's rule."""
    mode = tokens.MODE_FAST if arrival_count == "characters" else tokens.MODE_TIKTOKEN
    prompt = tokens.count_prompt_tokens("chat", body, "gpt-4o", mode=mode)
    if arrival_factor != 1.0:
        prompt = math.ceil(prompt * arrival_factor)
    return prompt + tokens.completion_allowance("chat", body, 1024)


def gateway_estimate(body: dict[str, Any]) -> int:
    return tokens.count_prompt_tokens("chat", body, "gpt-4o") + tokens.completion_allowance("chat", body, 1024)


async def _run_probing(shots: list[Shot], url: str, probes: dict[float, Callable[[], Any]]) -> tuple[Run, dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(shots) + 10, max_keepalive_connections=len(shots) + 10)
    seen: dict[float, Any] = {}

    async def probe(at: float, read: Callable[[], Any], t0: float) -> None:
        await asyncio.sleep(max(t0 + at - time.monotonic(), 0.0))
        seen[at] = await asyncio.to_thread(read)

    async with httpx.AsyncClient(limits=limits, trust_env=False) as http:
        wall0, t0 = time.time(), time.monotonic()
        gathered = await asyncio.gather(
            asyncio.gather(*(_fire(http, s, url, t0) for s in shots)),
            *(probe(at, read, t0) for at, read in probes.items()),
        )
    run = Run(gathered[0])
    run.wall0 = wall0
    return run, seen


def run_load_probing(shots: list[Shot], url: str, probes: dict[float, Callable[[], Any]]) -> tuple[Run, dict]:
    """``run_load`` that also calls each probe (in a thread) ``at`` seconds into the run; returns
    the results and ``{at: what the probe returned}``."""
    return asyncio.run(_run_probing(shots, url, probes))
