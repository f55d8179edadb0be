"""Azure AD client-credentials tokens against a fake token endpoint in the test's loop."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace

import pytest
from aiohttp import web

from gateway.proxy import upstream
from gateway.proxy.azure_ad import AzureADTokenProvider
from gateway.proxy.upstream import UpstreamAuthError
from gateway.snapshot.types import AUTH_AZURE_AD, AZURE, EndpointView

SECRET = "s3cr3t-client-secret-value"


class FakeAAD:
    """A token endpoint: counts calls, can be slowed down, and checks the secret."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.delay = 0.0
        self.expires_in: object = 3599
        self.status_override: int | None = None

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.calls.append(form)  # type: ignore[arg-type]
        self.paths.append(request.path)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status_override:
            return web.Response(status=self.status_override, text="<html>upstream broke</html>")
        if form.get("client_secret") != SECRET:
            return web.json_response(
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x",
                    "error_codes": [7000215],
                },
                status=401,
            )
        return web.json_response(
            {"token_type": "Bearer", "expires_in": self.expires_in, "access_token": f"token-{len(self.calls)}"}
        )


@pytest.fixture
async def aad():
    fake = FakeAAD()
    app = web.Application()
    app.router.add_post("/{tenant}/oauth2/v2.0/token", fake.token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.authority = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[attr-defined,union-attr]
    yield fake
    await runner.cleanup()


@pytest.fixture
async def upstream_client():
    c = upstream.make_client("aiohttp")
    yield c
    await c.aclose()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoint_for(aad: FakeAAD, secret: str = SECRET) -> EndpointView:
    return EndpointView(
        id=1, name="ad", kind=AZURE, base_url="https://res.openai.azure.com", auth=AUTH_AZURE_AD,
        ad_tenant_id="tenant-1", ad_client_id="client-1", ad_client_secret=secret,
        ad_authority=aad.authority + "/",  # type: ignore[attr-defined]
    )  # fmt: skip


async def test_token_is_fetched_once_and_cached(aad, upstream_client):
    provider = AzureADTokenProvider(upstream_client)
    endpoint = endpoint_for(aad)
    tokens = [await provider.get_token(endpoint) for _ in range(100)]
    assert set(tokens) == {"token-1"}
    assert len(aad.calls) == 1
    assert aad.paths == ["/tenant-1/oauth2/v2.0/token"]
    assert aad.calls[0] == {
        "grant_type": "client_credentials",
        "client_id": "client-1",
        "client_secret": SECRET,
        "scope": "https://cognitiveservices.azure.com/.default",
    }


async def test_concurrent_first_calls_share_one_fetch(aad, upstream_client):
    aad.delay = 0.2
    provider = AzureADTokenProvider(upstream_client)
    endpoint = endpoint_for(aad)
    tokens = await asyncio.gather(*(provider.get_token(endpoint) for _ in range(50)))
    assert set(tokens) == {"token-1"}
    assert len(aad.calls) == 1


async def test_each_client_and_scope_has_its_own_token(aad, upstream_client):
    provider = AzureADTokenProvider(upstream_client)
    endpoint = endpoint_for(aad)
    assert await provider.get_token(endpoint) == "token-1"
    assert await provider.get_token(replace(endpoint, ad_scope="api://other/.default")) == "token-2"
    assert await provider.get_token(endpoint) == "token-1"


@pytest.mark.parametrize(("lifetime", "refresh_after"), [(3600, 3300), (100, 90), ("3600", 3300)])
async def test_token_is_refreshed_before_it_expires(aad, upstream_client, lifetime, refresh_after):
    aad.expires_in = lifetime
    clock = Clock()
    provider = AzureADTokenProvider(upstream_client, clock=clock)
    endpoint = endpoint_for(aad)
    assert await provider.get_token(endpoint) == "token-1"
    clock.now += refresh_after - 1
    assert await provider.get_token(endpoint) == "token-1"
    clock.now += 2  # inside min(5 min, 10%) of expiry
    assert await provider.get_token(endpoint) == "token-2"
    assert len(aad.calls) == 2


async def test_callers_keep_the_current_token_while_a_refresh_is_in_flight(aad, upstream_client):
    clock = Clock()
    provider = AzureADTokenProvider(upstream_client, clock=clock)
    endpoint = endpoint_for(aad)
    await provider.get_token(endpoint)
    clock.now += 3400  # due for refresh, still valid
    aad.delay = 0.3
    refresher = asyncio.create_task(provider.get_token(endpoint))
    await asyncio.sleep(0.05)
    assert await asyncio.wait_for(provider.get_token(endpoint), 0.1) == "token-1"
    assert await refresher == "token-2"


async def test_bad_credentials_raise_without_the_secret(aad, upstream_client):
    provider = AzureADTokenProvider(upstream_client)
    wrong = "wrong-secret-do-not-log"
    with pytest.raises(UpstreamAuthError) as caught:
        await provider.get_token(endpoint_for(aad, secret=wrong))
    message = str(caught.value)
    assert "invalid_client" in message and "AADSTS7000215" in message and "401" in message
    assert wrong not in message and wrong not in repr(caught.value)
    assert caught.value.__cause__ is None


async def test_a_failure_is_remembered_briefly_instead_of_hammering_azure_ad(aad, upstream_client):
    clock = Clock()
    provider = AzureADTokenProvider(upstream_client, clock=clock, failure_backoff=5)
    endpoint = endpoint_for(aad, secret="wrong")
    for _ in range(10):
        with pytest.raises(UpstreamAuthError):
            await provider.get_token(endpoint)
    assert len(aad.calls) == 1
    clock.now += 6
    with pytest.raises(UpstreamAuthError):
        await provider.get_token(endpoint)
    assert len(aad.calls) == 2


async def test_a_failed_refresh_keeps_serving_the_still_valid_token(aad, upstream_client):
    clock = Clock()
    provider = AzureADTokenProvider(upstream_client, clock=clock)
    endpoint = endpoint_for(aad)
    assert await provider.get_token(endpoint) == "token-1"
    clock.now += 3400
    aad.status_override = 503
    assert await provider.get_token(endpoint) == "token-1"
    clock.now += 300  # now past expiry: nothing usable left
    with pytest.raises(UpstreamAuthError) as caught:
        await provider.get_token(endpoint)
    assert "503" in str(caught.value) and SECRET not in str(caught.value)


async def test_an_unreachable_authority_is_an_auth_error(upstream_client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = EndpointView(
        id=1, name="ad", kind=AZURE, base_url="https://x", auth=AUTH_AZURE_AD, ad_tenant_id="t",
        ad_client_id="c", ad_client_secret=SECRET, ad_authority=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    with pytest.raises(UpstreamAuthError) as caught:
        await AzureADTokenProvider(upstream_client).get_token(endpoint)
    assert SECRET not in str(caught.value)
