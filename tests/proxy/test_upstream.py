"""The upstream client: URLs, headers, timeouts, raw streaming and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.proxy import upstream
from gateway.proxy.upstream import Timeouts, UpstreamConnectError, UpstreamTimeout
from gateway.snapshot.types import AUTH_AZURE_AD, AZURE, OPENAI, DeploymentView, EndpointView

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

AZURE_EP = EndpointView(id=1, name="east", kind=AZURE, base_url="https://res.openai.azure.com/", api_key="upstream-key")
OPENAI_EP = EndpointView(id=2, name="oai", kind=OPENAI, base_url="https://api.example.com/v1/", api_key="upstream-key")
AD_EP = EndpointView(id=3, name="ad", kind=AZURE, base_url="https://res.openai.azure.com", auth=AUTH_AZURE_AD)
CLIENT_KEY = b"sk-client-secret-123"


def deployment(endpoint: EndpointView, name: str = "my-gpt4o") -> DeploymentView:
    return DeploymentView(id=1, endpoint=endpoint, name=name, model="gpt-4o")


# --- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base", ["https://res.openai.azure.com", "https://res.openai.azure.com/", "https://res.openai.azure.com/openai/"]
)
def test_azure_deployment_url_uses_the_endpoints_api_version(base):
    endpoint = EndpointView(id=1, name="e", kind=AZURE, base_url=base, api_version="2024-10-21")
    url = upstream.deployment_url(deployment(endpoint), "/chat/completions", "api-version=2099-01-01-preview")
    assert url == "https://res.openai.azure.com/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"


def test_azure_url_keeps_other_client_query_parameters_and_quotes_the_name():
    url = upstream.deployment_url(deployment(AZURE_EP, "a b/c"), "embeddings", "foo=1&api-version=x")
    assert url == "https://res.openai.azure.com/openai/deployments/a%20b%2Fc/embeddings?foo=1&api-version=2024-10-21"


@pytest.mark.parametrize(
    "base", ["https://api.example.com/v1", "https://api.example.com/v1/", "https://api.example.com/v1//"]
)
def test_openai_url_appends_the_path_to_the_base(base):
    endpoint = EndpointView(id=2, name="o", kind=OPENAI, base_url=base)
    assert (
        upstream.deployment_url(deployment(endpoint), "chat/completions")
        == "https://api.example.com/v1/chat/completions"
    )
    assert (
        upstream.deployment_url(deployment(endpoint), "/embeddings", "api-version=1")
        == "https://api.example.com/v1/embeddings"
    )


def test_models_and_other_non_deployment_urls():
    assert upstream.models_url(AZURE_EP) == "https://res.openai.azure.com/openai/models?api-version=2024-10-21"
    assert upstream.models_url(OPENAI_EP) == "https://api.example.com/v1/models"
    assert (
        upstream.endpoint_url(AZURE_EP, "/responses")
        == "https://res.openai.azure.com/openai/responses?api-version=2024-10-21"
    )


# --- bodies -----------------------------------------------------------------------------------


def test_body_is_untouched_for_azure_and_when_the_model_already_matches():
    body = b'{"model": "gpt-4o", "messages": []}'
    assert upstream.upstream_body(deployment(AZURE_EP), body, json.loads(body)) is body
    assert upstream.upstream_body(deployment(OPENAI_EP, "gpt-4o"), body, json.loads(body)) is body
    assert upstream.upstream_body(deployment(OPENAI_EP), b"not json", None) == b"not json"


def test_openai_body_gets_the_deployment_name_as_model_and_keeps_everything_else():
    body = b'{"messages":[{"role":"user","content":"h\\u00e9 \\"model\\": x"}],"model":"alias","stream":true,"n":1.5}'
    out = upstream.upstream_body(deployment(OPENAI_EP, "gpt-4o-2024-08-06"), body, json.loads(body))
    parsed = json.loads(out)
    assert parsed["model"] == "gpt-4o-2024-08-06"
    assert list(parsed) == ["messages", "model", "stream", "n"]
    assert parsed["messages"] == json.loads(body)["messages"] and parsed["n"] == 1.5


# --- headers ----------------------------------------------------------------------------------

CLIENT_HEADERS = [
    (b"host", b"gw.example"),
    (b"authorization", b"Bearer " + CLIENT_KEY),
    (b"api-key", CLIENT_KEY),
    (b"x-api-key", CLIENT_KEY),
    (b"openai-organization", b"org-1"),
    (b"openai-project", b"proj-1"),
    (b"cookie", b"sessionid=abc"),
    (b"content-length", b"123"),
    (b"content-type", b"application/json"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive, x-hop"),
    (b"keep-alive", b"timeout=5"),
    (b"x-hop", b"1"),
    (b"proxy-authorization", b"Basic xyz"),
    (b"transfer-encoding", b"chunked"),
    (b"te", b"trailers"),
    (b"upgrade", b"h2c"),
    (b"user-agent", b"OpenAI/Python 3.54.0"),
    (b"x-stainless-retry-count", b"0"),
    (b"aoai-evals", b"preview"),
]


def test_client_credentials_and_hop_by_hop_headers_are_stripped():
    headers = upstream.build_headers(CLIENT_HEADERS, AZURE_EP)
    names = [name for name, _ in headers]
    assert names == [
        "content-type",
        "user-agent",
        "x-stainless-retry-count",
        "aoai-evals",
        "accept-encoding",
        "api-key",
    ]
    assert dict(headers)["accept-encoding"] == "identity"
    assert dict(headers)["api-key"] == "upstream-key"
    assert not any(CLIENT_KEY.decode() in value for _, value in headers)


def test_openai_and_azure_ad_auth_use_bearer_tokens():
    assert ("authorization", "Bearer upstream-key") in upstream.build_headers(CLIENT_HEADERS, OPENAI_EP)
    ad = upstream.build_headers(CLIENT_HEADERS, AD_EP, ad_token="aad-token")
    assert ("authorization", "Bearer aad-token") in ad and "api-key" not in dict(ad)
    with pytest.raises(ValueError):
        upstream.build_headers(CLIENT_HEADERS, AD_EP)


# --- a tiny raw HTTP server in the test's loop ------------------------------------------------


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    tasks: set[asyncio.Task[None]] = set()

    async def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
FAST = Timeouts(connect=2, first_byte=5, total=10)


@pytest.fixture
async def upstream_client():
    c = upstream.UpstreamClient()
    yield c
    await c.aclose()


async def test_the_upstream_receives_no_client_credentials(upstream_client):
    seen: dict[str, bytes] = {}

    async def handler(reader, writer):
        seen["head"], seen["body"] = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: r1\r\n\r\nok")
        await writer.drain()

    async with serve(handler) as base:
        headers = upstream.build_headers(CLIENT_HEADERS, AZURE_EP)
        response = await upstream_client.open_stream("POST", base + "/x", headers, b'{"a":1}', FAST)
        assert response.status == 200 and response.header("x-request-id") == "r1"
        assert await response.aread() == b"ok"
    head = seen["head"].lower()
    assert CLIENT_KEY.lower() not in head and b"cookie" not in head and b"openai-organization" not in head
    assert b"api-key: upstream-key" in head
    assert [line for line in head.split(b"\r\n") if line.startswith(b"accept-encoding")] == [
        b"accept-encoding: identity"
    ]
    assert seen["body"] == b'{"a":1}'


async def test_http_error_statuses_are_responses_not_exceptions(upstream_client):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b'HTTP/1.1 429 Too Many Requests\r\nRetry-After-Ms: 250\r\nContent-Length: 11\r\n\r\n{"error":1}')
        await writer.drain()

    async with serve(handler) as base:
        response = await upstream_client.open_stream("POST", base, [], b"{}", FAST)
        assert response.status == 429 and response.header("retry-after-ms") == "250"
        assert await response.aread() == b'{"error":1}'


async def test_connection_refused_is_a_connect_error(upstream_client):
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamConnectError):
        await upstream_client.open_stream("POST", f"http://127.0.0.1:{port}/", [], b"{}", FAST)


async def test_a_silent_upstream_times_out_in_the_first_byte_phase(upstream_client):
    async def handler(reader, writer):
        await read_request(reader)
        await asyncio.sleep(30)

    async with serve(handler) as base:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamTimeout) as caught:
            await upstream_client.open_stream("POST", base, [], b"{}", Timeouts(connect=2, first_byte=0.3, total=10))
        assert caught.value.phase == "first_byte"
        assert loop.time() - start < 2


async def test_a_stalled_body_hits_the_total_timeout(upstream_client):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        await asyncio.sleep(30)

    async with serve(handler) as base:
        response = await upstream_client.open_stream(
            "POST", base, [], b"{}", Timeouts(connect=2, first_byte=0.5, total=0.6)
        )
        assert await response.__anext__() == b"data: 1\n\n"
        with pytest.raises(UpstreamTimeout) as caught:
            await response.__anext__()
        assert caught.value.phase == "total"
        await response.aclose()


async def test_chunks_arrive_as_they_are_sent(upstream_client):
    got_first = asyncio.Event()
    last_written = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: first\n\n"))
        await writer.drain()
        await asyncio.wait_for(got_first.wait(), 5)  # the last chunk waits for the client
        writer.write(chunk(b"data: last\n\n") + b"0\r\n\r\n")
        await writer.drain()
        last_written.set()

    async with serve(handler) as base, await upstream_client.open_stream("POST", base, [], b"{}", FAST) as response:
        chunks = []
        async for data in response:
            if not chunks:
                assert not last_written.is_set()
                got_first.set()
            chunks.append(data)
    assert b"".join(chunks) == b"data: first\n\ndata: last\n\n"
    assert chunks[0] == b"data: first\n\n"


async def test_compressed_bodies_pass_through_undecoded(upstream_client):
    payload = gzip.compress(b'{"ok":true}')

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
        )
        await writer.drain()

    async with serve(handler) as base:
        response = await upstream_client.open_stream("GET", base, [], None, FAST)
        assert response.header("content-encoding") == "gzip"
        assert await response.aread() == payload


async def test_cancelling_the_consumer_closes_the_upstream_connection(upstream_client):
    upstream_closed = asyncio.Event()
    reading = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(STREAM_HEAD)
        hung_up = asyncio.ensure_future(reader.read())  # completes once the client closes
        try:
            while not hung_up.done():  # an endless stream, one event every 50 ms
                writer.write(chunk(b"data: tick\n\n"))
                await writer.drain()
                await asyncio.wait([hung_up], timeout=0.05)
        except ConnectionError:
            pass
        finally:
            hung_up.cancel()
        upstream_closed.set()

    async def consume(base: str) -> None:
        response = await upstream_client.open_stream("POST", base, [], b"{}", FAST)
        try:
            async for _ in response:
                reading.set()
        finally:
            await response.aclose()

    async with serve(handler) as base:
        task = asyncio.create_task(consume(base))
        await asyncio.wait_for(reading.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(upstream_closed.wait(), 2)


async def test_cancelling_while_waiting_for_headers_closes_the_upstream_connection(upstream_client):
    request_seen = asyncio.Event()
    upstream_closed = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        request_seen.set()
        await reader.read()  # the upstream is "thinking"; returns when the client hangs up
        upstream_closed.set()

    async with serve(handler) as base:
        task = asyncio.create_task(upstream_client.open_stream("POST", base, [], b"{}", FAST))
        await asyncio.wait_for(request_seen.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(upstream_closed.wait(), 2)


async def test_a_fully_read_response_returns_its_connection_to_the_pool(upstream_client):
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with serve(handler) as base:
        for _ in range(3):
            response = await upstream_client.open_stream("POST", base, [], b"{}", FAST)
            assert await response.aread() == b"ok"
    assert connections == 1


async def test_the_shared_client_is_one_per_loop_and_closes():
    first = upstream.get_client()
    assert upstream.get_client() is first
    await upstream.aclose_client()
    second = upstream.get_client()
    assert second is not first
    await upstream.aclose_client()
