"""Fixtures for end-to-end tests: the simulated upstream, a live gateway, and the OpenAI SDK."""

from __future__ import annotations

import pytest
from openai import AzureOpenAI, OpenAI

from gateway.models import Deployment, Endpoint
from tenants.models import Tenant
from tenants.services import key_issue
from tests.e2e.servers import ThreadGateway
from tests.fakes.simulator import start_simulator

SIM_KEY = "sim-upstream-key"


@pytest.fixture
def sim():
    config = {
        "api_key": SIM_KEY,
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
def upstream(transactional_db, sim):
    """An Azure endpoint on the simulator with one deployment per client-facing model."""
    endpoint = Endpoint.objects.create(name="sim", kind=Endpoint.Kind.AZURE, base_url=sim.url, api_key=SIM_KEY)
    for name, model in (
        ("chat-a", "gpt-4o"),
        ("chat-slow", "slow-model"),
        ("embed-a", "text-embedding-3-small"),
        ("chat-nousage", "no-usage-model"),
    ):
        Deployment.objects.create(endpoint=endpoint, name=name, model=model, upstream_model="gpt-4o")
    return endpoint


@pytest.fixture
def team(transactional_db):
    tenant = Tenant.objects.create(slug="e2e", name="E2E team")
    return key_issue(tenant, name="e2e-app")


@pytest.fixture
def gateway(upstream, team, settings):
    settings.GATEWAY = {**settings.GATEWAY, "SNAPSHOT_POLL_SECONDS": 0.05, "USAGE_FLUSH_SECONDS": 0.05}
    server = ThreadGateway().start()
    yield server
    server.stop()


@pytest.fixture
def client(gateway, team):
    return OpenAI(base_url=gateway.url + "/v1", api_key=team.secret, max_retries=0)


@pytest.fixture
def azure_client(gateway, team):
    return AzureOpenAI(azure_endpoint=gateway.url, api_key=team.secret, api_version="2024-10-21", max_retries=0)
