"""Azure AD client-credentials tokens (over httpx) against a fake token endpoint in the test's loop."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import replace

import httpx
import pytest
from aiohttp import web

from gateway.proxy import azure_ad
from gateway.proxy.azure_ad import AzureADTokenProvider
from gateway.proxy.runtime import Runtime
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
        self.echo_secret = False  # a token endpoint that quotes the form back in its error

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.calls.append(form)  # type: ignore[arg-type]
        self.paths.append(request.path)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status_override:
            return web.Response(status=self.status_override, text="<html>upstream broke</html>")
        if self.echo_secret:
            return web.json_response({"error": "invalid_request", "error_description": f"bad form: {form}"}, status=400)
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
async def token_http():
    async with httpx.AsyncClient(trust_env=False) as c:
        yield c


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoint_for(aad: FakeAAD, secret: str = SECRET, **timeouts: float) -> EndpointView:
    return EndpointView(
        id=1, name="ad", kind=AZURE, base_url="https://res.openai.azure.com", auth=AUTH_AZURE_AD,
        ad_tenant_id="tenant-1", ad_client_id="client-1", ad_client_secret=secret,
        ad_authority=aad.authority + "/",  # type: ignore[attr-defined]
        **timeouts,
    )  # fmt: skip


async def test_token_is_fetched_once_and_cached(aad, token_http):
    provider = AzureADTokenProvider(token_http)
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


async def test_concurrent_first_calls_share_one_fetch(aad, token_http):
    aad.delay = 0.2
    provider = AzureADTokenProvider(token_http)
    endpoint = endpoint_for(aad)
    tokens = await asyncio.gather(*(provider.get_token(endpoint) for _ in range(50)))
    assert set(tokens) == {"token-1"}
    assert len(aad.calls) == 1


async def test_each_client_and_scope_has_its_own_token(aad, token_http):
    provider = AzureADTokenProvider(token_http)
    endpoint = endpoint_for(aad)
    assert await provider.get_token(endpoint) == "token-1"
    assert await provider.get_token(replace(endpoint, ad_scope="api://other/.default")) == "token-2"
    assert await provider.get_token(endpoint) == "token-1"


@pytest.mark.parametrize(("lifetime", "refresh_after"), [(3600, 3300), (100, 90), ("3600", 3300)])
async def test_token_is_refreshed_before_it_expires(aad, token_http, lifetime, refresh_after):
    aad.expires_in = lifetime
    clock = Clock()
    provider = AzureADTokenProvider(token_http, clock=clock)
    endpoint = endpoint_for(aad)
    assert await provider.get_token(endpoint) == "token-1"
    clock.now += refresh_after - 1
    assert await provider.get_token(endpoint) == "token-1"
    clock.now += 2  # inside min(5 min, 10%) of expiry
    assert await provider.get_token(endpoint) == "token-2"
    assert len(aad.calls) == 2


async def test_callers_keep_the_current_token_while_a_refresh_is_in_flight(aad, token_http):
    clock = Clock()
    provider = AzureADTokenProvider(token_http, clock=clock)
    endpoint = endpoint_for(aad)
    await provider.get_token(endpoint)
    clock.now += 3400  # due for refresh, still valid
    aad.delay = 0.3
    refresher = asyncio.create_task(provider.get_token(endpoint))
    await asyncio.sleep(0.05)
    assert await asyncio.wait_for(provider.get_token(endpoint), 0.1) == "token-1"
    assert await refresher == "token-2"


async def test_bad_credentials_raise_without_the_secret(aad, token_http):
    provider = AzureADTokenProvider(token_http)
    wrong = "wrong-secret-do-not-log"
    with pytest.raises(UpstreamAuthError) as caught:
        await provider.get_token(endpoint_for(aad, secret=wrong))
    message = str(caught.value)
    assert "invalid_client" in message and "AADSTS7000215" in message and "401" in message
    assert wrong not in message and wrong not in repr(caught.value)
    assert caught.value.__cause__ is None


async def test_a_failure_is_remembered_briefly_instead_of_hammering_azure_ad(aad, token_http):
    clock = Clock()
    provider = AzureADTokenProvider(token_http, clock=clock, failure_backoff=5)
    endpoint = endpoint_for(aad, secret="wrong")
    for _ in range(10):
        with pytest.raises(UpstreamAuthError):
            await provider.get_token(endpoint)
    assert len(aad.calls) == 1
    clock.now += 6
    with pytest.raises(UpstreamAuthError):
        await provider.get_token(endpoint)
    assert len(aad.calls) == 2


async def test_a_failed_refresh_keeps_serving_the_still_valid_token(aad, token_http):
    clock = Clock()
    provider = AzureADTokenProvider(token_http, clock=clock)
    endpoint = endpoint_for(aad)
    assert await provider.get_token(endpoint) == "token-1"
    clock.now += 3400
    aad.status_override = 503
    assert await provider.get_token(endpoint) == "token-1"
    clock.now += 300  # now past expiry: nothing usable left
    with pytest.raises(UpstreamAuthError) as caught:
        await provider.get_token(endpoint)
    assert "503" in str(caught.value) and SECRET not in str(caught.value)


async def test_an_unreachable_authority_is_an_auth_error(token_http):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = EndpointView(
        id=1, name="ad", kind=AZURE, base_url="https://x", auth=AUTH_AZURE_AD, ad_tenant_id="t",
        ad_client_id="c", ad_client_secret=SECRET, ad_authority=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    with pytest.raises(UpstreamAuthError) as caught:
        await AzureADTokenProvider(token_http).get_token(endpoint)
    assert SECRET not in str(caught.value)


async def test_a_secret_quoted_back_by_azure_ad_reaches_neither_the_error_nor_the_log(aad, token_http, caplog):
    clock = Clock()
    provider = AzureADTokenProvider(token_http, clock=clock)
    endpoint = endpoint_for(aad)
    assert await provider.get_token(endpoint) == "token-1"
    clock.now += 3400  # due for refresh: the failure is logged and the current token kept
    aad.echo_secret = True
    with caplog.at_level(logging.DEBUG):
        assert await provider.get_token(endpoint) == "token-1"
        clock.now += 300
        with pytest.raises(UpstreamAuthError) as caught:
            await provider.get_token(endpoint)
    assert "invalid_request" in str(caught.value) and "[redacted]" in str(caught.value)
    assert "refresh failed" in caplog.text and "[redacted]" in caplog.text
    assert SECRET not in str(caught.value) and SECRET not in caplog.text
    assert caught.value.__cause__ is None


async def test_the_endpoint_first_byte_timeout_bounds_the_token_request(aad, token_http):
    aad.delay = 1.0
    endpoint = endpoint_for(aad, first_byte_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(UpstreamAuthError) as caught:
        await AzureADTokenProvider(token_http).get_token(endpoint)
    assert time.monotonic() - started < 1.0
    assert "ReadTimeout" in str(caught.value) and SECRET not in str(caught.value)


async def test_the_endpoint_total_timeout_bounds_the_whole_token_request(aad, token_http):
    aad.delay = 1.0
    endpoint = endpoint_for(aad, first_byte_timeout=30.0, total_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamAuthError) as caught:
        await AzureADTokenProvider(token_http).get_token(endpoint)
    assert time.monotonic() - started < 1.0
    assert "no answer within 0.3s" in str(caught.value)


async def test_the_process_token_client_is_created_once_and_closed_at_runtime_shutdown(aad):
    first = azure_ad.get_http_client()
    assert azure_ad.get_http_client() is first and not first.is_closed
    assert await azure_ad.azure_ad_token(endpoint_for(aad)) == "token-1"  # the provider uses it
    runtime = Runtime()
    runtime.started, runtime.loop = True, asyncio.get_running_loop()
    await runtime.shutdown()
    assert first.is_closed
    second = azure_ad.get_http_client()
    assert second is not first and not second.is_closed
    await azure_ad.aclose_http_client()
    assert second.is_closed
