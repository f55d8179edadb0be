"""An endpoint authenticated with Azure AD client credentials: the gateway fetches a token from the
token endpoint once, caches it, and sends it as a bearer token upstream."""

from __future__ import annotations

import pytest
from openai import OpenAI

from gateway.models import Deployment, Endpoint
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


def test_requests_carry_a_cached_azure_ad_token(ad_sim, endpoint, key_a):
    """The shared endpoint, switched to Azure AD on the simulator's token endpoint."""
    endpoint.base_url = ad_sim.url
    endpoint.auth = Endpoint.Auth.AZURE_AD
    endpoint.ad_tenant_id, endpoint.ad_client_id, endpoint.ad_client_secret = "contoso", "gateway-app", "ad-secret"
    endpoint.ad_authority = ad_sim.url
    endpoint.api_key = ""  # the token is all it needs
    endpoint.save()
    Deployment.objects.create(endpoint=endpoint, name="gpt-4o-ad", model="gpt-4o")
    gateway = ThreadGateway().start()
    try:
        client = OpenAI(base_url=gateway.url + "/v1", api_key=key_a.secret, max_retries=0)
        for _ in range(5):
            reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content
    finally:
        gateway.stop()
    stats = ad_sim.stats()
    assert stats["token_issued"] == 1
    assert stats["deployments"]["gpt-4o-ad"]["served"] == 5
