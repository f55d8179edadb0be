"""Helpers for the balancer's end-to-end tests (``test_balancing*.py``); their fixtures
(``start_sim``, ``deploy``, ``tenant_key``, ``knobs``, ``backend``, ``start_gateway``,
``start_process_gateway``) are in ``tests/e2e/conftest.py``.

The cast: a simulated Azure upstream that enforces its own RPM/TPM windows (a subprocess, so it
has its own CPU and GIL and its arrival times are not skewed by the gateway's work), a gateway
(``ThreadGateway`` in this process, or ``ProcessGateway`` processes) whose deployments mirror
the simulator's, and an asyncio load generator (here) that fires requests at chosen times and
keeps, per request, when it was sent and when it completed.

Both sides use the same short "minute" (``MINUTE`` seconds), so the short windows scale with it:
with a 3 s minute the request windows are 0.05 s, 0.5 s and 3 s, the token window 3 s.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway.balancer.windows import request_windows, token_windows
from gateway.simulator.stats import window_key

MINUTE = 3.0  # seconds in a "minute", on both sides
SIM_KEY = "sim-balancer-key"
MODEL = "gpt-4o"
PROMPT = [{"role": "user", "content": "hi"}]
PROMPT_TOKENS = 8  # "hi" as one user message: 3 + 1 (role) + 1 (content) + 3 (reply priming)


# -- load ------------------------------------------------------------------------------------------


def chat_body(max_tokens: int, **extra) -> dict:
    """A chat request whose demand is ``PROMPT_TOKENS + max_tokens`` on both sides."""
    return {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, **extra}


@dataclass
class Shot:
    """One request to fire ``at`` seconds after the run starts."""

    at: float
    secret: str
    body: dict
    tag: str = ""
    url: str | None = None  # a gateway's base URL; None = the run's default
    client_timeout: float | None = None  # hang up after this long (a client that gives up)


@dataclass
class Result:
    shot: Shot
    status: int  # 0: no answer (the client hung up or the connection failed)
    sent: float  # seconds since the run started
    done: float
    request_id: str = ""
    error: str = ""
    payload: Any = field(default=None, repr=False)

    @property
    def latency(self) -> float:
        return self.done - self.sent


async def _fire(http: httpx.AsyncClient, shot: Shot, url: str, t0: float) -> Result:
    delay = t0 + shot.at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.monotonic() - t0
    headers = {"Authorization": f"Bearer {shot.secret}"}
    timeout = shot.client_timeout if shot.client_timeout is not None else 120.0
    try:
        response = await http.post(
            (shot.url or url) + "/v1/chat/completions", json=shot.body, headers=headers, timeout=timeout
        )
    except httpx.HTTPError as exc:
        return Result(shot, 0, sent, time.monotonic() - t0, error=f"{type(exc).__name__}: {exc}")
    done = time.monotonic() - t0
    try:
        payload = response.json()
    except ValueError:
        payload = response.text
    return Result(
        shot,
        response.status_code,
        sent,
        done,
        response.headers.get("x-request-id", ""),
        "" if response.status_code == 200 else str(payload)[:300],
        payload,
    )


class Run(list):
    """The results of ``run_load`` in shot order; ``wall0`` is the run's start on ``time.time()``
    (the clock usage records use)."""

    wall0: float = 0.0


async def _run(shots: list[Shot], url: str) -> Run:
    limits = httpx.Limits(max_connections=len(shots) + 10, max_keepalive_connections=len(shots) + 10)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as http:
        wall0, t0 = time.time(), time.monotonic()
        results = await asyncio.gather(*(_fire(http, s, url, t0) for s in shots))
    run = Run(results)
    run.wall0 = wall0
    return run


def run_load(shots: list[Shot], url: str = "") -> Run:
    """Fire the shots (concurrently, each at its time) and wait for every answer."""
    return asyncio.run(_run(shots, url))


def failures(results: list[Result]) -> list[tuple[str, int, str]]:
    return [(r.shot.tag, r.status, r.error) for r in results if r.status != 200]


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def assert_within_limits(stats: dict, rpm: int, tpm: int, minute: float = MINUTE) -> None:
    """The simulator never admitted more than its limits in any of its rolling windows.

    (It enforces them itself, so this holds by construction; it guards the test's premise that
    the simulator really measured those windows.)
    """
    for w in request_windows(rpm, minute):
        assert stats["max_requests_in_window"][window_key(w.seconds)] <= w.limit, stats
    for w in token_windows(tpm, minute):
        assert stats["max_tokens_in_window"][window_key(w.seconds)] <= w.limit, stats
