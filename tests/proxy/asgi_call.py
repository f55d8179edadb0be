"""Raw ASGI calls into the gateway: each request message exactly as a test chooses it.

``call(...)`` builds an HTTP scope, hands the body over in the chunks the test chooses (or
stops after some of them, as a slow or stalled client would), and collects the response. The
upstream is the simulator in a thread of this process; usage records are collected from the
consumer as they are made, so a test can say "exactly one". The balancer state is the one the
settings name (in process, or Redis under a fresh key prefix).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway import snapshot
from gateway.proxy.runtime import runtime

SIM_KEY = "sim-proxy-key"
HELLO = [{"role": "user", "content": "hi"}]


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    receive_calls: int  # how often the application asked for a request message

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]


async def call(
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    chunks: Sequence[bytes] = (b"",),
    then: str = "end",
    chunk_delay: float = 0.0,
    query: bytes = b"",
    timeout: float = 10.0,
) -> Answer:
    """One request into ``gateway.asgi.application``.

    ``chunks`` are the body's ``http.request`` messages, each after ``chunk_delay`` seconds but
    the first. ``then``: ``"end"`` (the last chunk ends the body), ``"stall"`` (it says
    ``more_body`` and nothing more comes) or ``"disconnect"`` (the client leaves after the
    chunks). Once the messages are used up, ``receive`` waits until the response is complete
    and then reports ``http.disconnect``, as servers do.
    """
    from gateway.asgi import application

    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1 or then != "end"}
        for i, chunk in enumerate(chunks)
    ]
    if then == "disconnect":
        messages.append({"type": "http.disconnect"})
    done = asyncio.Event()
    start: dict[str, Any] = {}
    body: list[bytes] = []
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if messages:
            if chunk_delay and calls > 1:
                await asyncio.sleep(chunk_delay)
            return messages.pop(0)
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await asyncio.wait_for(application(scope, receive, send), timeout)
    response_headers = {name.lower(): value for name, value in start.get("headers", [])}
    return Answer(start.get("status", 0), response_headers, b"".join(body), calls)


def post_json(path: str, payload: Any, secret: str | None, **kwargs: Any):
    """``call`` for a JSON POST (``payload`` may be bytes, sent as they are)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
    if secret is not None:
        headers.append(("authorization", f"Bearer {secret}"))
    return call("POST", path, headers=headers, chunks=[data], **kwargs)


async def reload_snapshot() -> None:
    """Take configuration written during the test into the snapshot now, not at the next poll."""
    await runtime.refresher.load_now()


async def in_flight() -> dict[str, int]:
    """Reservations the balancer holds, per deployment name (every one should be 0 after a request)."""
    deployments = snapshot.current().all_deployments
    await runtime.dispatcher.state.drain()  # settlements queued to ride along (Redis: settle_later)
    status = await runtime.dispatcher.state.status(deployments)
    return {d.name: status[d.id]["in_flight"] for d in deployments}
