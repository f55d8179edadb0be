"""Redis faults are bounded: with Redis paused or gone, proxied requests get a clear 503 within a
second, and the gateway recovers by itself when Redis returns.

The test starts its own redis-server on a free port (never the shared one), and a gateway
process pointed at it.
"""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
from django.contrib.auth.models import User
from django.test import Client

from tests.e2e.servers import ProcessGateway, RedisServer
from tests.e2e.usage import wait_for_records

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
BOUND_SECONDS = 1.0

STATE_CODES = {"state_unavailable", "quota_state_unavailable"}


def staff_cookie() -> dict[str, str]:
    user = User.objects.create_user("ops", password="x-very-long-password", is_staff=True)
    django_client = Client()
    django_client.force_login(user)
    return {"sessionid": django_client.cookies["sessionid"].value}


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


class Chat:
    """Chat requests to one gateway, timed and counted (each leaves one usage record)."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.sent = 0

    def __call__(self, **extra) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        self.sent += 1
        response = self.http.post("/v1/chat/completions", json={**CHAT, **extra})
        return response, time.monotonic() - started

    def assert_state_unavailable(self) -> None:
        for extra in ({}, {"stream": True}):
            response, elapsed = self(**extra)
            assert response.status_code == 503, response.text
            assert elapsed < BOUND_SECONDS, f"answered after {elapsed:.2f}s"
            error = response.json()["error"]
            # Admission (quotas) or the balancer, whichever asks Redis first, names the state it lacks.
            assert error["type"] == "api_error" and error["code"] in STATE_CODES, error
            assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) >= 1

    def wait_until_served(self, timeout: float = 5.0) -> float:
        started = time.monotonic()
        while True:
            response, _ = self()
            if response.status_code == 200:
                return time.monotonic() - started
            assert response.status_code == 503, response.text
            assert time.monotonic() - started < timeout, f"still refused after {timeout}s"
            time.sleep(0.1)


def test_requests_are_refused_within_a_second_while_redis_is_paused_or_gone_and_served_again_after(
    upstream, key_a, redis_server
):
    gateway = ProcessGateway({"REDIS_URL": redis_server.url, "LOG_LEVEL": "CRITICAL"}).start()
    try:
        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {key_a.secret}"}, timeout=10
        ) as http:
            chat = Chat(http)
            assert chat()[0].status_code == 200

            redis_server.pause()
            chat.assert_state_unavailable()
            chat.assert_state_unavailable()  # again: at once while Redis is known to be down, or after its timeout
            started = time.monotonic()
            ready = httpx.get(gateway.url + "/readyz", timeout=5)
            assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "down"
            assert time.monotonic() - started < BOUND_SECONDS
            status = httpx.get(gateway.url + "/api/status/deployments", cookies=staff_cookie(), timeout=5).json()
            shared = status["shared_state"]
            assert (shared["backend"], shared["reachable"]) == ("redis", False)
            assert "503 state_unavailable" in shared["when_unreachable"]
            assert [d["name"] for d in status["deployments"] if d["name"] == "chat-a"] == ["chat-a"]
            redis_server.resume()
            after_resume = chat.wait_until_served()

            redis_server.kill()
            chat.assert_state_unavailable()
            redis_server.start()  # the same port, empty
            after_restart = chat.wait_until_served()
    finally:
        gateway.stop()
    print(f"\nserved again {after_resume:.2f}s after SIGCONT, {after_restart:.2f}s after the restart")
    records = wait_for_records(chat.sent)  # one per request, refusals included
    refused = [r for r in records if r.status == 503]
    assert len(refused) >= 6 and {r.error_code for r in refused} <= STATE_CODES
