"""Upstream failures through the official SDK, against the simulated upstream and a live gateway:
refused credentials are the gateway's 502 (never the upstream's words), a hung upstream is
answered within its first-byte timeout, random 500s are retried until served, and only what the
upstream served is billed. On PostgreSQL + Redis when configured, else the embedded defaults."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import httpx
import openai
import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from openai import AzureOpenAI, OpenAI

from billing.models import Price, UsageRecord
from gateway.models import Deployment, Endpoint
from tenants.models import Tenant
from tenants.services import key_issue
from tests.e2e.servers import ThreadGateway
from tests.e2e.usage import wait_for_records
from tests.fakes.simulator import start_simulator

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SIM_KEY = "sim-upstream-key-for-failures"
# What a rotated-away key looks like; the simulator's 401 quotes it back.
WRONG_KEY = "sk-rotated-" + "Q7x" * 12
AD_SECRET = "ad-client-secret-that-must-stay-home"
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def sim():
    handle = start_simulator(
        {
            "api_key": SIM_KEY,
            "azure_ad": {"tenant": "contoso", "client_id": "gateway-app", "client_secret": "the-right-one"},
            "deployments": [
                {"name": "chat-a", "model": "gpt-4o-2024-08-06", "completion_tokens": 5},
                {"name": "chat-b", "model": "gpt-4o-2024-08-06", "completion_tokens": 5},
                {"name": "embed-a", "model": "text-embedding-3-small", "embedding_dims": 8},
            ],
        }
    )
    yield handle
    handle.stop()


@pytest.fixture
def make_gateway(transactional_db, settings, sim):
    """``make_gateway({deployment: endpoint kwargs}, first_byte=...)`` -> (gateway, client key secret).

    Each deployment gets its own endpoint on the simulator (Azure kind unless given), so one can
    hold a wrong key while the other holds the right one; ``model`` among the fields names the
    client-facing model (default gpt-4o). Tier order follows the mapping's order.
    """
    settings.GATEWAY = {
        **settings.GATEWAY,
        "SNAPSHOT_POLL_SECONDS": 0.05,
        "USAGE_FLUSH_SECONDS": 0.05,
        "BALANCER_REDIS_PREFIX": f"test-upfail-{uuid.uuid4().hex[:12]}",
        "MAX_RETRIES": 2,
    }
    Price.objects.create(
        model="gpt-4o",
        input_per_million=Decimal("2.5"),
        output_per_million=Decimal("10"),
        effective_from=timezone.now() - timezone.timedelta(days=1),
    )
    gateways = []

    def make(deployments: dict[str, dict], *, first_byte: float = 60.0):
        for tier, (name, endpoint_fields) in enumerate(deployments.items(), start=1):
            fields = {"kind": Endpoint.Kind.AZURE, "base_url": sim.url, "api_key": SIM_KEY, **endpoint_fields}
            model = fields.pop("model", "gpt-4o")  # the client-facing model name
            endpoint = Endpoint.objects.create(name=f"ep-{name}", first_byte_timeout=first_byte, **fields)
            Deployment.objects.create(endpoint=endpoint, name=name, model=model, tier=tier)
        secret = key_issue(Tenant.objects.create(slug=f"t{uuid.uuid4().hex[:6]}", name="Team"), name="app").secret
        gateway = ThreadGateway().start()
        gateways.append(gateway)
        return gateway, secret

    yield make
    for gateway in gateways:
        gateway.stop()


def sdk(gateway, secret) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0)


def staff_status(gateway) -> dict:
    user = User.objects.create_user(f"ops{uuid.uuid4().hex[:6]}", password="x-very-long-password", is_staff=True)
    django_client = Client()
    django_client.force_login(user)
    cookie = {"sessionid": django_client.cookies["sessionid"].value}
    return httpx.get(gateway.url + "/api/status/deployments", cookies=cookie).json()


def assert_secret_free(exc: openai.APIStatusError, *secrets: str) -> None:
    text = str(exc) + exc.response.text
    for secret in secrets:
        assert secret not in text and secret[:12] not in text, text


# -- refused credentials ---------------------------------------------------------------------------


def test_a_wrong_upstream_key_is_a_502_without_the_key_plain_streamed_azure_and_embeddings(make_gateway, sim):
    gateway, secret = make_gateway(
        {"chat-a": {"api_key": WRONG_KEY}, "embed-a": {"api_key": WRONG_KEY, "model": "text-embedding-3-small"}}
    )
    client = sdk(gateway, secret)
    azure = AzureOpenAI(azure_endpoint=gateway.url, api_key=secret, api_version="2024-10-21", max_retries=0)
    calls = [
        lambda: client.chat.completions.create(model="gpt-4o", messages=HELLO),
        lambda: client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True),
        lambda: azure.chat.completions.create(model="gpt-4o", messages=HELLO),
        lambda: azure.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True),
        lambda: client.embeddings.create(model="text-embedding-3-small", input="hi"),
    ]
    for call in calls:
        with pytest.raises(openai.InternalServerError) as caught:
            call()
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_auth_failed"
        assert "refused the gateway's credentials" in caught.value.message
        assert "Incorrect API key" not in caught.value.message
        assert_secret_free(caught.value, WRONG_KEY, SIM_KEY)
    records = wait_for_records(len(calls))
    assert {(r.status, r.outcome) for r in records} == {(502, "upstream_error")}
    assert all(r.prompt_tokens == 0 and r.completion_tokens == 0 and r.cost == 0 for r in records)
    assert all(r.estimated_prompt_tokens > 0 for r in records)


def test_the_good_deployment_serves_while_the_refusing_one_feeds_its_breaker(make_gateway, sim):
    # The refusing deployment is tier 1, so every request tries it first.
    gateway, secret = make_gateway({"chat-a": {"api_key": WRONG_KEY}, "chat-b": {}})
    client = sdk(gateway, secret)
    for _ in range(3):
        assert client.chat.completions.create(model="gpt-4o", messages=HELLO).choices[0].message.content
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sim.deployment_stats("chat-b")["served"] == 6
    rows = {d["name"]: d for d in staff_status(gateway)["deployments"]}
    assert rows["chat-a"]["breaker"]["failures"] == 5 and rows["chat-a"]["breaker"]["state"] == "open"
    assert rows["chat-a"]["last_failure"]["reason"].startswith("upstream refused credentials (401)")
    assert WRONG_KEY not in rows["chat-a"]["last_failure"]["reason"]
    assert rows["chat-b"]["last_failure"] is None
    records = wait_for_records(6)
    assert all(r.status == 200 and r.deployment_name == "chat-b" and r.cost > 0 for r in records)
    assert [r.retries for r in records] == [1, 1, 1, 1, 1, 0], "the open breaker keeps the sixth off chat-a"


def test_an_azure_ad_secret_the_token_endpoint_refuses_is_a_502_without_the_secret(make_gateway, sim):
    ad = {
        "auth": Endpoint.Auth.AZURE_AD,
        "api_key": "",
        "ad_tenant_id": "contoso",
        "ad_client_id": "gateway-app",
        "ad_client_secret": AD_SECRET,
        "ad_authority": sim.url,
    }
    gateway, secret = make_gateway({"chat-a": ad})
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(gateway, secret).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_auth_failed"
    assert_secret_free(caught.value, AD_SECRET)
    [row] = staff_status(gateway)["deployments"]
    assert row["last_failure"]["reason"].startswith("Azure AD token refused")
    assert AD_SECRET not in row["last_failure"]["reason"]


def test_a_client_caused_400_keeps_its_fields_and_loses_the_quoted_key(make_gateway, sim):
    gateway, secret = make_gateway({"chat-a": {}, "embed-a": {"model": "text-embedding-3-small"}})
    fault = {
        "kind": "status",
        "status": 400,
        "message": "Invalid value for 'temperature' (request authenticated with {credential})",
        "code": "invalid_value",
        "param": "temperature",
    }
    sim.inject("chat-a", fault)
    sim.inject("embed-a", {**fault, "param": "dimensions"})
    client = sdk(gateway, secret)
    azure = AzureOpenAI(azure_endpoint=gateway.url, api_key=secret, api_version="2024-10-21", max_retries=0)
    calls = [
        lambda: client.chat.completions.create(model="gpt-4o", messages=HELLO, temperature=1.5),
        lambda: client.chat.completions.create(model="gpt-4o", messages=HELLO, temperature=1.5, stream=True),
        lambda: azure.chat.completions.create(model="gpt-4o", messages=HELLO, temperature=1.5, stream=True),
        lambda: client.embeddings.create(model="text-embedding-3-small", input="hi", dimensions=3),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.code == "invalid_value" and caught.value.param in ("temperature", "dimensions")
        assert caught.value.body["message"] == "Invalid value for 'temperature' (request authenticated with [redacted])"
        assert_secret_free(caught.value, SIM_KEY)
    records = wait_for_records(len(calls))
    assert all(r.outcome == "client_error" and r.cost == 0 and r.prompt_tokens == 0 for r in records)


# -- only what the upstream served costs money -----------------------------------------------------


def test_a_client_that_leaves_before_the_answer_costs_nothing_and_mid_stream_pays_what_arrived(make_gateway, sim):
    gateway, secret = make_gateway({"chat-a": {}})
    auth = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=gateway.url, headers=auth) as http:
        sim.inject("chat-a", {"kind": "timeout", "seconds": 3, "count": 1})
        with pytest.raises(httpx.TimeoutException):
            http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}, timeout=0.3)
        sim.configure("chat-a", token_delay_ms=200)
        body = {"model": "gpt-4o", "messages": HELLO, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body, timeout=5) as response:
            for line in response.iter_lines():
                if '"content":"' in line.replace(" ", "") and "tok" in line:
                    break  # the first token, then hang up
    abandoned, streamed = wait_for_records(2)
    assert abandoned.outcome == "client_disconnect" and not abandoned.streamed
    assert (abandoned.prompt_tokens, abandoned.completion_tokens, abandoned.cost) == (0, 0, 0)
    assert abandoned.estimated_prompt_tokens > 0
    assert streamed.outcome == "client_disconnect" and streamed.streamed
    assert streamed.prompt_tokens > 0 and 1 <= streamed.completion_tokens < 5 and streamed.cost > 0


# -- one deadline per request ----------------------------------------------------------------------


def test_a_hung_upstream_is_answered_504_within_first_byte_plus_a_second(make_gateway, sim):
    gateway, secret = make_gateway({"chat-a": {}, "chat-b": {}}, first_byte=1.0)
    for name in ("chat-a", "chat-b"):
        sim.inject(name, {"kind": "timeout", "seconds": 10})
    client = sdk(gateway, secret)
    for stream in (False, True):
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=stream)
        elapsed = time.monotonic() - started
        assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"
        assert elapsed < 2.0, elapsed
    records = wait_for_records(2)
    assert all(r.outcome == "upstream_timeout" and r.cost == 0 and r.prompt_tokens == 0 for r in records)


# -- retries that help -----------------------------------------------------------------------------


def test_random_500s_on_two_deployments_are_retried_until_served(make_gateway, sim):
    """30% random 500s on each of two deployments, MAX_RETRIES=2: each request has three tries,
    so about 1 - 0.3^3 = 97.3% are served (89.5% before retries went back to a tried deployment).
    The faults' seeds and the tier order make the run repeatable (the draws are taken in request
    order: one request at a time); this sequence serves 96.25%, and every request that failed had
    used its three tries."""
    gateway, secret = make_gateway({"chat-a": {}, "chat-b": {}})
    sim.inject("chat-a", {"kind": "probability", "status": 500, "p": 0.3, "seed": 11})
    sim.inject("chat-b", {"kind": "probability", "status": 500, "p": 0.3, "seed": 12})
    client = sdk(gateway, secret)
    total, served, failed = 400, 0, []
    for i in range(total):
        try:
            client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=i % 2 == 1)
            served += 1
        except openai.InternalServerError as exc:
            failed.append(exc.status_code)
    assert served / total >= 0.96, served
    assert set(failed) <= {502}
    records = wait_for_records(total, timeout=15)
    assert all(r.retries == 2 for r in records if r.outcome != "ok")
    attempts = sum(r.retries + 1 for r in records)
    assert UsageRecord.objects.filter(outcome="ok").count() == served
    assert attempts / total < 1.5, attempts
    assert all(r.cost == 0 for r in records if r.outcome != "ok")
