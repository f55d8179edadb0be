"""Fixtures and helpers for the balancer's end-to-end tests (``test_balancing*.py``).

Imported by those modules (pytest registers fixtures found in a test module's namespace), so
they stay out of the shared ``conftest.py``.

The cast: a simulated Azure upstream that enforces its own RPM/TPM windows (a subprocess, so it
has its own CPU and GIL and its arrival times are not skewed by the gateway's work), a gateway
(``ThreadGateway`` in this process, or ``ProcessGateway`` processes) whose deployments mirror
the simulator's, and an asyncio load generator that fires requests at chosen times and keeps,
per request, when it was sent and when it completed.

Both sides use the same short "minute" (``MINUTE`` seconds), so the short windows scale with it:
with a 3 s minute the request windows are 0.05 s, 0.5 s and 3 s, the token window 3 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from gateway.balancer.windows import request_windows, token_windows
from gateway.models import Deployment, Endpoint
from gateway.simulator.stats import window_key
from tenants.models import Tenant
from tenants.services import key_issue
from tests.e2e.servers import ProcessGateway, ThreadGateway
from tests.fakes.simulator import start_simulator_process

MINUTE = 3.0  # seconds in a "minute", on both sides
SIM_KEY = "sim-balancer-key"
MODEL = "gpt-4o"
PROMPT = [{"role": "user", "content": "hi"}]
PROMPT_TOKENS = 8  # "hi" as one user message: 3 + 1 (role) + 1 (content) + 3 (reply priming)
BACKENDS = ["memory", "redis"]
NO_REDIS = (
    "REDIS_URL is not set: the Redis balancer backend cannot be exercised (the in-process "
    "variant of this test runs instead)"
)


def redis_prefix() -> str:
    return f"test-e2e-bal-{uuid.uuid4().hex[:12]}"


# -- configuration ---------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request, settings):
    """The balancer state the gateway uses: ``memory`` always; ``redis`` when REDIS_URL is set.

    The memory variant clears ``settings.REDIS_URL`` for the in-thread gateway, so it runs in
    both CI configurations. Each Redis variant gets its own key prefix.
    """
    if request.param == "redis":
        if not settings.REDIS_URL:
            pytest.skip(NO_REDIS)
    else:
        settings.REDIS_URL = None
    return request.param


@pytest.fixture
def balancer_prefix():
    """A fresh BALANCER_REDIS_PREFIX; its keys are deleted after the test (they would expire)."""
    prefix = redis_prefix()
    yield prefix
    url = os.environ.get("REDIS_URL")
    if url:
        import redis

        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass
        finally:
            client.close()


@pytest.fixture
def knobs(settings, balancer_prefix):
    """``knobs(**GATEWAY)`` overrides gateway settings (call it before a gateway starts)."""
    base = {
        "SNAPSHOT_POLL_SECONDS": 0.05,
        "USAGE_FLUSH_SECONDS": 0.05,
        "WINDOW_MINUTE_SECONDS": MINUTE,
        "QUEUE_TIMEOUT_SECONDS": 30.0,
        "BALANCER_REDIS_PREFIX": balancer_prefix,
    }
    settings.GATEWAY = {**settings.GATEWAY, **base}

    def apply(**overrides):
        settings.GATEWAY = {**settings.GATEWAY, **overrides}
        return settings.GATEWAY

    return apply


# -- the upstream ----------------------------------------------------------------------------------


@pytest.fixture
def start_sim():
    """``start_sim([{name, rpm, tpm, ...}, ...], minute=MINUTE)`` -> a simulator in a subprocess."""
    handles = []

    def start(deployments: list[dict], minute: float = MINUTE):
        config = {
            "api_key": SIM_KEY,
            "minute_seconds": minute,
            "deployments": [{"model": MODEL, "completion_tokens": 5, **d} for d in deployments],
        }
        handle = start_simulator_process(config)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture
def deploy(transactional_db):
    """``deploy(sim, [{name, rpm, tpm, tier, sku, max_wait_seconds, ...}, ...])`` -> Deployments
    of model ``MODEL`` on an Azure endpoint pointing at ``sim`` (names match the simulator's)."""

    def create(sim, deployments: list[dict]) -> dict[str, Deployment]:
        endpoint = Endpoint.objects.create(
            name=f"sim-{uuid.uuid4().hex[:6]}", kind=Endpoint.Kind.AZURE, base_url=sim.url, api_key=SIM_KEY
        )
        out = {}
        for d in deployments:
            fields = {"model": MODEL, "upstream_model": "gpt-4o", **d}
            out[d["name"]] = Deployment.objects.create(endpoint=endpoint, **fields)
        return out

    return create


@pytest.fixture
def tenant_key(transactional_db):
    """``tenant_key(slug)`` -> the secret of a new key of a new tenant ``slug`` (no quotas), entitled
    to every priority (the tests send priorities from 0)."""

    def create(slug: str, default_priority: int = 5) -> str:
        tenant = Tenant.objects.create(slug=slug, name=slug.title())
        return key_issue(tenant, name=f"{slug}-app", default_priority=default_priority, best_priority=0).secret

    return create


# -- gateways --------------------------------------------------------------------------------------


@pytest.fixture
def start_gateway():
    """``start_gateway()`` -> a ThreadGateway started with the settings as they are now."""
    servers = []

    def start():
        server = ThreadGateway()
        serve = server.server.serve

        async def serve_noting_loop(*args, **kwargs):
            server.loop = asyncio.get_running_loop()
            return await serve(*args, **kwargs)

        server.server.serve = serve_noting_loop
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        stop_thread_gateway(server)


def stop_thread_gateway(server: ThreadGateway, timeout: float = 20.0) -> None:
    """Stop a ThreadGateway and make sure it has stopped before the next test starts one.

    The gateway's runtime (``gateway.proxy.runtime.runtime``, the usage sink) is global to the
    process: a gateway still shutting down while the next one starts takes the new one's Redis
    client and flusher with it, and that test loses its usage records. Its shutdown can hang: it
    cancels the snapshot refresher and awaits it, and redis-py's asyncio client sometimes loses
    a cancellation that lands during a command (see the report of the balancer tests), so the
    refresher runs on. Cancelling again the tasks still "cancelling" lets the shutdown finish.
    """
    server.server.should_exit = True
    server.thread.join(timeout=5)
    deadline = time.monotonic() + timeout
    while server.thread.is_alive() and time.monotonic() < deadline:
        loop = getattr(server, "loop", None)
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(_cancel_again, loop)
        server.thread.join(timeout=0.5)
    assert not server.thread.is_alive(), "the test gateway did not stop"


def _cancel_again(loop) -> None:
    for task in asyncio.all_tasks(loop):
        if task.cancelling():
            logging.getLogger(__name__).warning("gateway shutdown stuck on %r: cancelling it again", task)
            task.cancel()


@pytest.fixture
def start_process_gateway():
    """``start_process_gateway(env)`` -> a ProcessGateway; ``env`` holds GATEWAY_* variables."""
    servers = []

    def start(env: dict[str, str]):
        server = ProcessGateway(env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.process.terminate()
    for server in servers:
        # Usually gone within a second; a shutdown stuck on the lost cancellation described in
        # ``stop_thread_gateway`` would hold it for good, and the test is over: do not wait long.
        try:
            server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


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
