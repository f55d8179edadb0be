"""The same client address under uvicorn (as the image runs it) and daphne (as `make run` does).

Each server runs as its own process trusting 127.0.0.2 as a proxy. Requests sent from
127.0.0.1 are from an untrusted peer, whose X-Forwarded-For must be ignored: uvicorn's own
proxy-header handling (on by default, trusting 127.0.0.1) would believe it, so this also checks
that the image turns it off.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

import httpx
import pytest
from django.conf import settings

from tenants.models import AccessPolicy
from tests.e2e.servers import ROOT, database_url_for_children, free_port

pytestmark = pytest.mark.e2e

TRUSTED_PROXY = "127.0.0.2"


def image_uvicorn_command(port: int) -> list[str]:
    """The Dockerfile's uvicorn command line, on a local port."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    match = re.search(r"exec (uvicorn [^\"]+)\"\]", dockerfile)
    assert match, "the Dockerfile's CMD no longer execs uvicorn"
    # The image's ENV lines give the values its shell substitutes (the shutdown grace).
    image_env = dict(re.findall(r"^ENV (\w+)=(\S+)$", dockerfile, flags=re.M))
    # WEB_CONCURRENCY is worked out at start (python -m gateway.workers): one worker here.
    image_env.setdefault("WEB_CONCURRENCY", "1")
    command = re.sub(r"\$\{(\w+)\}", lambda m: image_env[m.group(1)], match.group(1))
    args = shlex.split(command)
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    return [sys.executable, "-m", *args]


def daphne_command(port: int) -> list[str]:
    return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "gateway.asgi:application"]


@pytest.fixture(params=["uvicorn", "daphne"])
def server(request, transactional_db, key_a, ptu_deployment):
    AccessPolicy.objects.filter(tenant=key_a.key.tenant).update(ip_allow=["10.0.0.0/8"])
    port = free_port()
    command = image_uvicorn_command(port) if request.param == "uvicorn" else daphne_command(port)
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_children(),
        "DJANGO_SETTINGS_MODULE": "gateway.settings",
        "GATEWAY_TRUSTED_PROXIES": f"{TRUSTED_PROXY}/32",
    }
    env.pop("FORWARDED_ALLOW_IPS", None)
    if settings.REDIS_URL:
        env["REDIS_URL"] = settings.REDIS_URL
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"{request.param} exited with {process.returncode}"
            assert time.monotonic() < deadline, f"{request.param} did not become healthy"
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def post(url: str, secret: str, source: str, forwarded: str) -> tuple[int, str]:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, base_url=url, timeout=10) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o"},  # no messages: a 400 once past the address check
            headers={"authorization": f"Bearer {secret}", "x-forwarded-for": forwarded},
        )
    return response.status_code, response.json()["error"]["message"]


def test_forwarded_for_is_believed_from_the_trusted_proxy_only(server, key_a):
    # From the trusted proxy: the forwarded, allowed address is the client.
    assert post(server, key_a.secret, TRUSTED_PROXY, "10.1.2.3")[0] == 400
    # From an untrusted peer the header is ignored, whatever the server would make of it alone.
    assert post(server, key_a.secret, "127.0.0.1", "10.1.2.3") == (
        403,
        "Requests from 127.0.0.1 are not allowed for this team.",
    )
    # Through the trusted proxy, what the client wrote left of the address the proxy saw is ignored.
    assert post(server, key_a.secret, TRUSTED_PROXY, "10.1.2.3, 127.0.0.9") == (
        403,
        "Requests from 127.0.0.9 are not allowed for this team.",
    )
