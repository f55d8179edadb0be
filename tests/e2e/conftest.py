"""Fixtures of the end-to-end tests. Every test in this folder starts servers and carries the
``e2e`` marker (set here), so ``pytest -m "not e2e"`` leaves them out.

The SDK cast builds on the shared one (``tests/conftest.py``): the shared endpoint pointed at a
simulator in a thread (``sim``) and given one deployment per client-facing model (``upstream``),
tenant A's key, a live gateway under uvicorn in a thread (``gateway``) and the OpenAI SDK on it
(``sdk_client``, ``azure_sdk_client``).

The balancing cast is made by factories, because each test shapes its own upstream: a
simulator subprocess (``start_sim``), deployments mirroring it (``deploy``), tenants with chosen
priorities (``tenant_key``), gateway knobs (``knobs``), the balancer backend (``backend``) and
gateways in a thread or as processes (``start_gateway``, ``start_process_gateway``). The load
generator and the assertions they share are in ``tests/e2e/balancing.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openai import AzureOpenAI, OpenAI

from gateway.models import Deployment, Endpoint
from tenants.models import Tenant
from tenants.services import key_issue
from tests.e2e.balancing import MINUTE, MODEL, SIM_KEY
from tests.e2e.servers import ProcessGateway, RedisServer, ThreadGateway, stop_thread_gateway
from tests.fakes.simulator import (
    ProcessSimulatorHandle,
    ThreadSimulatorHandle,
    start_simulator,
    start_simulator_process,
)

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before -m selects on markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


# -- the SDK cast ----------------------------------------------------------------------------------


@pytest.fixture
def sim(endpoint) -> Iterator[ThreadSimulatorHandle]:
    """A simulator in a thread that plays the shared endpoint (it takes that endpoint's key)."""
    config = {
        "api_key": endpoint.api_key,
        "deployments": [
            {"name": "chat-a", "model": "gpt-4o-2024-08-06", "completion_tokens": 8},
            {"name": "chat-slow", "model": "gpt-4o-2024-08-06", "completion_tokens": 10, "token_delay_ms": 100},
            {"name": "embed-a", "model": "text-embedding-3-small", "embedding_dims": 16},
            {
                "name": "chat-nousage",
                "model": "gpt-4o-2024-08-06",
                "completion_tokens": 6,
                "send_usage_in_stream": False,
            },
        ],
    }
    handle = start_simulator(config)
    yield handle
    handle.stop()


@pytest.fixture
def upstream(transactional_db, endpoint, sim) -> Endpoint:
    """The shared endpoint on the simulator, with one deployment per client-facing model."""
    endpoint.base_url = sim.url
    endpoint.save()
    for name, model in (
        ("chat-a", "gpt-4o"),
        ("chat-slow", "slow-model"),
        ("embed-a", "text-embedding-3-small"),
        ("chat-nousage", "no-usage-model"),
    ):
        Deployment.objects.create(endpoint=endpoint, name=name, model=model, upstream_model="gpt-4o")
    return endpoint


@pytest.fixture
def gateway(upstream, key_a, settings, balancer_prefix) -> Iterator[ThreadGateway]:
    settings.GATEWAY = {
        **settings.GATEWAY,
        "SNAPSHOT_POLL_SECONDS": 0.05,
        "USAGE_FLUSH_SECONDS": 0.05,
        "BALANCER_REDIS_PREFIX": balancer_prefix,
    }
    server = ThreadGateway().start()
    yield server
    server.stop()


@pytest.fixture
def sdk_client(gateway, key_a) -> OpenAI:
    """The OpenAI SDK on the live gateway, with tenant A's key."""
    return OpenAI(base_url=gateway.url + "/v1", api_key=key_a.secret, max_retries=0)


@pytest.fixture
def azure_sdk_client(gateway, key_a) -> AzureOpenAI:
    """The AzureOpenAI SDK on the live gateway, with tenant A's key."""
    return AzureOpenAI(azure_endpoint=gateway.url, api_key=key_a.secret, api_version="2024-10-21", max_retries=0)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own (the test may restart it); skipped without the binary."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    yield server
    server.stop()


# -- the balancing cast ----------------------------------------------------------------------------

NO_REDIS = (
    "REDIS_URL is not set: the Redis balancer backend cannot be exercised (the in-process "
    "variant of this test runs instead)"
)


@pytest.fixture(params=["memory", "redis"])
def backend(request, settings) -> str:
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
def knobs(settings, balancer_prefix) -> Callable[..., dict]:
    """``knobs(**GATEWAY)`` overrides gateway settings (call it before a gateway starts)."""
    base = {
        "SNAPSHOT_POLL_SECONDS": 0.05,
        "USAGE_FLUSH_SECONDS": 0.05,
        "WINDOW_MINUTE_SECONDS": MINUTE,
        "QUEUE_TIMEOUT_SECONDS": 30.0,
        "BALANCER_REDIS_PREFIX": balancer_prefix,
    }
    settings.GATEWAY = {**settings.GATEWAY, **base}

    def apply(**overrides) -> dict:
        settings.GATEWAY = {**settings.GATEWAY, **overrides}
        return settings.GATEWAY

    return apply


@pytest.fixture
def start_sim() -> Iterator[Callable[..., ProcessSimulatorHandle]]:
    """``start_sim([{name, rpm, tpm, ...}, ...], minute=MINUTE)`` -> a simulator in a subprocess."""
    handles: list[ProcessSimulatorHandle] = []

    def start(deployments: list[dict], minute: float = MINUTE) -> ProcessSimulatorHandle:
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
def deploy(transactional_db) -> Callable[..., dict[str, Deployment]]:
    """``deploy(sim, [{name, rpm, tpm, tier, sku, max_wait_seconds, ...}, ...])`` -> Deployments
    of model ``MODEL`` on an Azure endpoint pointing at ``sim`` (names match the simulator's)."""

    def create(sim: ProcessSimulatorHandle, deployments: list[dict]) -> dict[str, Deployment]:
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
def tenant_key(transactional_db) -> Callable[..., str]:
    """``tenant_key(slug)`` -> the secret of a new key of a new tenant ``slug`` (no quotas), entitled
    to every priority (the tests send priorities from 0)."""

    def create(slug: str, default_priority: int = 5) -> str:
        tenant = Tenant.objects.create(slug=slug, name=slug.title())
        return key_issue(tenant, name=f"{slug}-app", default_priority=default_priority, best_priority=0).secret

    return create


@pytest.fixture
def start_gateway() -> Iterator[Callable[[], ThreadGateway]]:
    """``start_gateway()`` -> a ThreadGateway started with the settings as they are now."""
    servers: list[ThreadGateway] = []

    def start() -> ThreadGateway:
        server = ThreadGateway().start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        stop_thread_gateway(server)


@pytest.fixture
def start_process_gateway() -> Iterator[Callable[[dict[str, str]], ProcessGateway]]:
    """``start_process_gateway(env)`` -> a ProcessGateway; ``env`` holds GATEWAY_* variables."""
    servers: list[ProcessGateway] = []

    def start(env: dict[str, str]) -> ProcessGateway:
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
