"""Slow clients cannot starve the others: 200 connections that send their headers and then trickle
or stall their bodies, half with a valid key and half without, beside normal requests on a live
uvicorn gateway. The keyless ones are refused from their headers, the others at their body
deadline; the normal requests stay fast, and every request leaves exactly one usage record."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from tests.e2e.usage import wait_for_records

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SLOW_CLIENTS = 200
BODY_DEADLINE = 1.5
HELLO = [{"role": "user", "content": "hi"}]


async def slow_loris(url: str, key: str, trickle: bool) -> bytes:
    """Send headers that promise 100 kB, a few bytes, then trickle one byte a second or stall; return
    whatever the gateway answered (the connection ends when it gives up on us)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"host: {host}\r\n"
        f"authorization: Bearer {key}\r\n"
        "content-type: application/json\r\n"
        "content-length: 100000\r\n\r\n"
    )
    writer.write(head.encode() + b'{"model": "gpt-4o", ')
    await writer.drain()
    answer = b""
    try:
        deadline = time.monotonic() + BODY_DEADLINE + 4
        while time.monotonic() < deadline and b"\r\n\r\n" not in answer:
            try:
                answer += await asyncio.wait_for(reader.read(4096), timeout=1.0)
            except TimeoutError:
                if trickle:
                    writer.write(b" ")
                    await writer.drain()
    finally:
        writer.close()
    return answer


async def normal_requests(url: str, key: str, count: int) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(count):
            started = time.monotonic()
            response = await http.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "gpt-4o", "messages": HELLO},
            )
            assert response.status_code == 200, response.text
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
    return latencies


async def scenario(url: str, key: str) -> tuple[list[bytes], list[float]]:
    slow = [slow_loris(url, key if i % 2 else "sk-gw-wrong", trickle=i % 4 < 2) for i in range(SLOW_CLIENTS)]
    slow_tasks = [asyncio.ensure_future(s) for s in slow]
    await asyncio.sleep(0.3)  # every slow client is connected and holding its request open
    latencies = await normal_requests(url, key, 30)
    return await asyncio.gather(*slow_tasks), latencies


def test_slow_clients_do_not_starve_normal_requests(gateway, key_a, settings):
    settings.GATEWAY = {**settings.GATEWAY, "BODY_READ_TIMEOUT_SECONDS": BODY_DEADLINE}
    answers, latencies = asyncio.run(scenario(gateway.url, key_a.secret))

    p95 = statistics.quantiles(latencies, n=20)[-1]
    assert p95 < 2.0, latencies
    statuses = [a.split(b" ", 2)[1] if a.startswith(b"HTTP/1.1 ") else b"none" for a in answers]
    assert statuses.count(b"401") == SLOW_CLIENTS // 2, statuses
    assert statuses.count(b"408") == SLOW_CLIENTS // 2, statuses

    records = wait_for_records(SLOW_CLIENTS + len(latencies), timeout=15)
    by_status: dict[int, int] = {}
    for record in records:
        by_status[record.status] = by_status.get(record.status, 0) + 1
    assert by_status == {401: SLOW_CLIENTS // 2, 408: SLOW_CLIENTS // 2, 200: len(latencies)}
