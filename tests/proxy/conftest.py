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
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from billing.usage_sink import get_sink
from gateway.models import Deployment, Endpoint
from gateway.proxy.runtime import runtime
from tenants.services import IssuedKey
from tests.fakes.simulator import InLoopSimulator, serve_simulator_here
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
