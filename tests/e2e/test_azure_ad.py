"""An endpoint authenticated with Azure AD client credentials: the gateway fetches a token from the
token endpoint once, caches it, and sends it as a bearer token upstream."""

from __future__ import annotations

import pytest
from openai import OpenAI

from gateway.models import Deployment, Endpoint
from tenants.models import Tenant
from tenants.services import key_issue
from tests.e2e.servers import ThreadGateway
from tests.fakes.simulator import start_simulator

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ad_sim():
    sim = start_simulator(
        {
            "api_key": "static-key-the-gateway-must-not-need",
            "azure_ad": {
                "tenant": "contoso",
                "client_id": "gateway-app",
                "client_secret": "ad-secret",
                "expires_in": 3600,
            },
            "deployments": [{"name": "gpt-4o-ad", "model": "gpt-4o"}],
        }
    )
    yield sim
    sim.stop()


def test_requests_carry_a_cached_azure_ad_token(ad_sim, transactional_db):
    endpoint = Endpoint.objects.create(
        name="ad",
        kind=Endpoint.Kind.AZURE,
        base_url=ad_sim.url,
        auth=Endpoint.Auth.AZURE_AD,
        ad_tenant_id="contoso",
        ad_client_id="gateway-app",
        ad_client_secret="ad-secret",
        ad_authority=ad_sim.url,
    )
    Deployment.objects.create(endpoint=endpoint, name="gpt-4o-ad", model="gpt-4o")
    issued = key_issue(Tenant.objects.create(slug="ad-team", name="AD team"), name="app")
    gateway = ThreadGateway().start()
    try:
        client = OpenAI(base_url=gateway.url + "/v1", api_key=issued.secret, max_retries=0)
        for _ in range(5):
            reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content
    finally:
        gateway.stop()
    stats = ad_sim.stats()
    assert stats["token_issued"] == 1
    assert stats["deployments"]["gpt-4o-ad"]["served"] == 5
