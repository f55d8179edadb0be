"""The request path in-process: the gateway's ASGI application driven by an httpx client in the
test's own event loop, forwarding to a simulator served by that same loop. No server process
or server thread, so a test costs tens of milliseconds (the driver: ``asgi_client.py``).

Both fixtures build on the shared cast: the simulator plays the shared endpoint (its key, and
the PTU and standard deployments by name), and requests carry tenant A's key unless told
otherwise. Tests that use them need committed rows (``django_db(transaction=True)``): the
snapshot and the usage records are read and written by worker threads, as in production.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from aiohttp import web
from asgiref.sync import sync_to_async
from django.db import connections

from billing.usage_sink import get_sink
from gateway.models import Deployment, Endpoint
from gateway.proxy import consumer as consumer_module
from gateway.proxy.pressure import LoopPressure, pressure
from gateway.proxy.runtime import runtime
from tenants.models import Tenant
from tenants.services import IssuedKey, key_issue
from tests.fakes.simulator import InLoopSimulator, serve_simulator_here, start_simulator
from tests.proxy.asgi_call import SIM_KEY
from tests.proxy.asgi_client import COMPLETION_TOKENS, GatewayHTTP


@pytest.fixture
async def recording_sim(
    endpoint: Endpoint, ptu_deployment: Deployment, standard_deployment: Deployment
) -> AsyncIterator[InLoopSimulator]:
    """A simulator on the test's loop serving the cast's two gpt-4o deployments; the shared
    endpoint points at it. ``recording_sim.calls`` holds what the gateway forwarded."""
    config = {
        "api_key": endpoint.api_key,
        "deployments": [
            {"name": d.name, "model": "gpt-4o-2024-08-06", "completion_tokens": COMPLETION_TOKENS}
            for d in (ptu_deployment, standard_deployment)
        ],
    }
    async with serve_simulator_here(config) as sim:
        endpoint.base_url = sim.url
        await sync_to_async(endpoint.save)()
        yield sim


@pytest.fixture
async def gateway_http(
    recording_sim: InLoopSimulator, key_a: IssuedKey, settings, balancer_prefix: str
) -> AsyncIterator[GatewayHTTP]:
    """The gateway's ASGI application (``gateway.asgi.application``) in this test's loop.

    Its runtime (snapshot, balancer, usage flusher) starts on the first request, reading the
    cast as the test's fixtures left it, and is shut down afterwards (which flushes usage).
    """
    from gateway.asgi import application

    settings.GATEWAY = {**settings.GATEWAY, "BALANCER_REDIS_PREFIX": balancer_prefix}
    assert get_sink().pending == 0, "usage records of an earlier test are still buffered"
    # The gateway loads the snapshot and writes usage in the loop's default executor. One thread
    # is plenty here, and lets the teardown close that thread's database connection: one left
    # open makes PostgreSQL refuse (after 5 s) to drop the test database at the end.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-worker"))
    yield GatewayHTTP(application, key_a.secret)
    await runtime.shutdown()
    await loop.run_in_executor(None, connections.close_all)
    await sync_to_async(connections.close_all)()  # the thread of the tests' own ORM calls


@pytest.fixture
def upstream_writes(monkeypatch) -> list[bytes]:
    """Every body write the in-process simulator makes, in order, as it wrote them (every
    ``aiohttp.web.StreamResponse.write`` in the process is the simulator's: the gateway answers
    through ASGI)."""
    writes: list[bytes] = []
    original = web.StreamResponse.write

    async def write(self, data) -> None:
        writes.append(bytes(data))
        await original(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", write)
    return writes


@pytest.fixture
async def pressure_by_hand(gateway_http: GatewayHTTP) -> AsyncIterator[LoopPressure]:
    """The process's loop pressure with its timer stopped, for a test to set (``observe``, or its
    attributes): the runtime is started first, so its start-up does not reset what the test sets."""
    await runtime.ensure_started()
    await pressure.stop()
    yield pressure
    await pressure.stop()  # back to idle for the next test


# -- raw ASGI calls (tests/proxy/asgi_call.py): an upstream of their own, with an Azure and an
# OpenAI-compatible endpoint, an embedding model, and a tenant whose key may not raise its priority.


@pytest.fixture
def records(monkeypatch) -> list[dict[str, Any]]:
    """Every usage record the consumer makes during the test, in order."""
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(consumer_module, "record_usage", made.append)
    return made


@pytest.fixture
def sim() -> Iterator[Any]:
    handle = start_simulator(
        {
            "api_key": SIM_KEY,
            "deployments": [
                {"name": "chat-a", "model": "gpt-4o", "completion_tokens": 4},
                {"name": "embed-a", "model": "text-embedding-3-small", "embedding_dims": 4},
            ],
        }
    )
    yield handle
    handle.stop()


@pytest.fixture
def proxy_settings(settings):
    """Short polls and a private Redis key prefix (when Redis state is configured)."""
    settings.GATEWAY = {
        **settings.GATEWAY,
        "SNAPSHOT_POLL_SECONDS": 0.05,
        "BALANCER_REDIS_PREFIX": f"test-proxy-{uuid.uuid4().hex[:12]}",
    }
    return settings


@pytest.fixture
def upstream(transactional_db, sim, proxy_settings):
    """An Azure endpoint on the simulator with ``gpt-4o`` (chat, completions) and an embedding model,
    and an OpenAI-compatible one with ``gpt-4o-oai`` (its bodies are re-serialised with the
    upstream's model name)."""
    endpoint = Endpoint.objects.create(name="sim", kind=Endpoint.Kind.AZURE, base_url=sim.url, api_key=SIM_KEY)
    Deployment.objects.create(endpoint=endpoint, name="chat-a", model="gpt-4o", upstream_model="gpt-4o")
    Deployment.objects.create(endpoint=endpoint, name="embed-a", model="text-embedding-3-small")
    compatible = Endpoint.objects.create(
        name="sim-openai", kind=Endpoint.Kind.OPENAI, base_url=sim.url + "/v1", api_key=SIM_KEY
    )
    Deployment.objects.create(endpoint=compatible, name="chat-a", model="gpt-4o-oai", upstream_model="gpt-4o")
    return endpoint


@pytest.fixture
def secret(upstream) -> str:
    """A key of a fresh tenant (default priority 5, no better priority allowed)."""
    tenant = Tenant.objects.create(slug="proxy", name="Proxy tests")
    return key_issue(tenant, name="app").secret


@pytest.fixture
async def gateway_runtime(upstream, secret):
    """The runtime started on this test's loop (after the cast exists), stopped (usage flushed) afterwards."""
    await runtime.ensure_started()
    yield runtime
    await runtime.shutdown()  # its database threads close their connections as they end
    await asyncio.get_running_loop().shutdown_default_executor()


# -- observability: the spans and the JSON log lines of a test ------------------------------------


@pytest.fixture
def span_exporter() -> Iterator[Any]:
    """Tracing on for the test, into an in-memory exporter (``get_finished_spans()``), as
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` turns it on for an OTLP collector; off again afterwards."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.observability import tracing

    exporter = InMemorySpanExporter()
    tracing.tracing_configure(exporter, batch=False)
    yield exporter
    tracing.tracing_shutdown()


@pytest.fixture
def json_log() -> Iterator[Any]:
    """Every line logged during the test (DEBUG and up) as the gateway writes it with
    ``GATEWAY_LOG_FORMAT=json``: ``json_log.lines()`` parses them."""
    import io
    import logging

    from gateway.observability.logs import JsonFormatter, RequestIdFilter

    class Lines(io.StringIO):
        def lines(self) -> list[dict[str, Any]]:
            import json

            return [json.loads(line) for line in self.getvalue().splitlines()]

    stream = Lines()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    watched = [logging.getLogger(name) for name in ("gateway", "billing", "tenants")]
    levels = [logger.level for logger in watched]
    root.addHandler(handler)
    for logger in watched:
        logger.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    for logger, level in zip(watched, levels, strict=True):
        logger.setLevel(level)
