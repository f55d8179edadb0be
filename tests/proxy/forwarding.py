"""A scripted upstream for in-process tests of the forwarding path.

``FakeUpstream`` replaces ``gateway.proxy.upstream.open_stream``: each deployment (by the name in
its Azure URL) answers from a script of steps, one per attempt, the last repeated. The gateway
around it is real: the ASGI application, checks, the balancer (in process, or on Redis when
``REDIS_URL`` is set), the forwarder, usage records (captured instead of written).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from billing.models import Price
from gateway.models import Deployment, Endpoint
from gateway.proxy import upstream
from gateway.proxy.runtime import runtime
from tenants.models import Tenant
from tenants.services import key_issue

SECRET_EAST = "east-upstream-key-0123456789abcdef0123"
SECRET_WEST = "sk-west-live-ABCDEFGHIJKLMNOPQRSTUVWX"
HELLO = [{"role": "user", "content": "Say hello"}]
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


class FakeResponse(upstream.UpstreamResponse):
    """An upstream answer: ``chunks`` arrive one by one; ``broken`` is raised after them."""

    __slots__ = ("_broken", "_chunks")

    def __init__(self, status: int, chunks: list[bytes], headers=None, broken: Exception | None = None) -> None:
        # Not the aiohttp-backed constructor: only what the forwarder reads is set.
        self.status, self.reason = status, ""
        self.headers = headers or [(b"content-type", b"application/json")]
        self._chunks = list(chunks)
        self._broken = broken

    async def read_some(self) -> bytes:
        if self._chunks:
            return self._chunks.pop(0)
        if self._broken is not None:
            raise self._broken
        return b""

    async def hold(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        self._chunks = []


def answer(status: int = 200, body: Any = None, headers=None) -> Callable:
    payload = body if body is not None else {"id": "c1", "object": "chat.completion", "choices": [], "usage": USAGE}
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return lambda call: FakeResponse(status, [raw], headers)


def error(status: int, message: str, **fields: Any) -> Callable:
    return answer(status, {"error": {"message": message, **fields}})


def sse(events: int = 3, *, broken: bool = False, usage: bool = True) -> Callable:
    """A chat stream of ``events`` content chunks (then usage and [DONE]), or broken after them."""

    def step(call: Call) -> FakeResponse:
        chunks = [
            b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}).encode() + b"\n\n"
            for i in range(events)
        ]
        if broken:
            return FakeResponse(
                200, chunks, [(b"content-type", b"text/event-stream")], upstream.UpstreamProtocolError("reset")
            )
        if usage:
            chunks.append(b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        return FakeResponse(200, chunks, [(b"content-type", b"text/event-stream")])

    return step


def hang(call: Call) -> Any:
    """An upstream that never answers: the real client gives up after the timeouts it was given."""

    async def wait() -> None:
        await asyncio.sleep(call.timeouts.first_byte)
        raise upstream.UpstreamTimeout(upstream.PHASE_FIRST_BYTE, call.timeouts.first_byte)

    return wait()


def refuse_connection(call: Call) -> Any:
    raise upstream.UpstreamConnectError("cannot connect to upstream: connection refused")


@dataclass
class Call:
    deployment: str
    url: str
    headers: dict[str, str]
    body: bytes
    timeouts: upstream.Timeouts
    at: float


@dataclass
class FakeUpstream:
    scripts: dict[str, list[Callable]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    def script(self, deployment: str, *steps: Callable) -> None:
        self.scripts[deployment] = list(steps)

    def calls_to(self, deployment: str) -> list[Call]:
        return [c for c in self.calls if c.deployment == deployment]

    async def open_stream(self, method, url, headers, content, timeouts) -> upstream.UpstreamResponse:
        name = url.split("/deployments/")[1].split("/")[0]
        call = Call(name, url, dict(headers), content, timeouts, asyncio.get_running_loop().time())
        self.calls.append(call)
        steps = self.scripts.get(name) or [answer()]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        result = step(call)
        if asyncio.iscoroutine(result):
            # As the real client does: the headers must come within the attempt's first-byte timeout.
            try:
                result = await asyncio.wait_for(result, timeouts.first_byte)
            except TimeoutError:
                raise upstream.UpstreamTimeout(upstream.PHASE_FIRST_BYTE, timeouts.first_byte) from None
        return result


@dataclass
class Gateway:
    """The in-process gateway of one test: an httpx client on the ASGI app, and what it recorded."""

    secret: str
    upstream: FakeUpstream
    records: list[dict]
    deployments: dict[str, Deployment]

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        from gateway.asgi import application

        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application),
            base_url="http://gateway.test",
            headers={"Authorization": f"Bearer {self.secret}"},
            **kwargs,
        )

    async def chat(self, http: httpx.AsyncClient, **fields: Any) -> httpx.Response:
        return await http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO, **fields})


async def build_gateway(
    settings, monkeypatch, *, first_byte: float = 60.0, deployments=("east-a", "west-b")
) -> Gateway:
    """Two Azure endpoints with one ``gpt-4o`` deployment each (same tier), a key, a price."""
    settings.GATEWAY = {
        **settings.GATEWAY,
        "BALANCER_REDIS_PREFIX": f"test-fwd-{uuid.uuid4().hex[:12]}",
        "MAX_RETRIES": 2,
    }
    fake = FakeUpstream()
    monkeypatch.setattr(upstream, "open_stream", fake.open_stream)
    records: list[dict] = []
    monkeypatch.setattr("gateway.proxy.consumer.record_usage", records.append)
    secret, created = await sync_to_async(_configure)(first_byte, deployments)
    return Gateway(secret, fake, records, created)


def _configure(first_byte: float, deployments) -> tuple[str, dict[str, Deployment]]:
    created = {}
    for name in deployments:
        region = name.split("-")[0]
        endpoint, _ = Endpoint.objects.get_or_create(
            name=region,
            defaults={
                "kind": Endpoint.Kind.AZURE,
                "base_url": f"http://{region}.upstream.test",
                "api_key": SECRET_EAST if region == "east" else SECRET_WEST,
                "first_byte_timeout": first_byte,
            },
        )
        created[name] = Deployment.objects.create(endpoint=endpoint, name=name, model="gpt-4o", tier=1)
    Price.objects.create(
        model="gpt-4o",
        input_per_million=Decimal("2.5"),
        output_per_million=Decimal("10"),
        effective_from=timezone.now() - timezone.timedelta(days=1),
    )
    tenant = Tenant.objects.create(slug="fwd", name="Forwarding")
    return key_issue(tenant, name="fwd-app").secret, created


@pytest.fixture
async def stop_runtime():
    """Stops the runtime this test's event loop started (and deletes its Redis keys)."""
    yield
    prefix = None
    from django.conf import settings

    prefix = settings.GATEWAY["BALANCER_REDIS_PREFIX"]
    redis = runtime.redis
    if redis is not None and prefix.startswith("test-fwd-"):
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await redis.delete(*keys)
    await runtime.shutdown()
