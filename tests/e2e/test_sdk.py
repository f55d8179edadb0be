"""The official OpenAI SDK cannot tell the gateway from the upstream."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from billing.models import UsageRecord
from tests.e2e.usage import wait_for_records

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Say hello"}]


def test_chat_completion_through_openai_client(sdk_client, sim):
    reply = sdk_client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO, max_tokens=20)
    completion = reply.parse()
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 8
    assert reply.headers["x-request-id"].startswith("req_")
    assert sim.deployment_stats("chat-a")["served"] == 1
    [record] = wait_for_records(1)
    assert record.request_id == reply.headers["x-request-id"]
    assert (record.status, record.outcome, record.model, record.deployment_name) == (200, "ok", "gpt-4o", "chat-a")
    assert record.completion_tokens == 8 and record.prompt_tokens == completion.usage.prompt_tokens
    assert not record.tokens_estimated


def test_chat_through_azure_client(azure_sdk_client):
    completion = azure_sdk_client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=20)
    assert completion.choices[0].message.content
    stream = azure_sdk_client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=20, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text


def test_stream_without_include_usage_leaks_no_usage_chunk(sdk_client):
    chunks = list(sdk_client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=20, stream=True))
    assert chunks, "no chunks"
    assert all(chunk.choices for chunk in chunks), "a choices-less usage chunk reached a client that did not ask"
    assert all(chunk.usage is None for chunk in chunks)
    [record] = wait_for_records(1)
    assert record.streamed and record.completion_tokens == 8 and not record.tokens_estimated


def test_stream_with_include_usage_gets_usage(sdk_client):
    chunks = list(
        sdk_client.chat.completions.create(
            model="gpt-4o", messages=HELLO, max_tokens=20, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_stream_usage_is_counted_when_upstream_sends_none(sdk_client):
    chunks = list(
        sdk_client.chat.completions.create(model="no-usage-model", messages=HELLO, max_tokens=20, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [record] = wait_for_records(1)
    assert record.tokens_estimated and record.completion_tokens >= 6


def test_stream_is_not_buffered(sdk_client):
    """The upstream waits 100 ms per token: the first chunk must arrive long before the last."""
    started = time.monotonic()
    arrivals = []
    for chunk in sdk_client.chat.completions.create(model="slow-model", messages=HELLO, max_tokens=20, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 10
    assert arrivals[-1] - arrivals[0] > 0.7, arrivals
    assert arrivals[0] < arrivals[-1] / 2, arrivals


def test_embeddings_base64_default_and_floats(sdk_client):
    default = sdk_client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(default.data) == 2 and len(default.data[0].embedding) == 16
    floats = sdk_client.embeddings.create(model="text-embedding-3-small", input="one", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(default.data[0].embedding)
    assert floats.usage.prompt_tokens > 0


def test_models_list_and_retrieve(sdk_client):
    ids = {m.id for m in sdk_client.models.list()}
    assert ids == {"gpt-4o", "slow-model", "text-embedding-3-small", "no-usage-model"}
    assert sdk_client.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        sdk_client.models.retrieve("nope")


def test_models_list_shows_only_allowed(sdk_client, key_a):
    key_a.key.allowed_models = ["gpt-4o"]
    key_a.key.save()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if {m.id for m in sdk_client.models.list()} == {"gpt-4o"}:
            break
        time.sleep(0.05)
    assert {m.id for m in sdk_client.models.list()} == {"gpt-4o"}
    with pytest.raises(openai.NotFoundError):
        sdk_client.chat.completions.create(model="slow-model", messages=HELLO)


def test_sdk_raises_authentication_error(gateway):
    bad = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-gw-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="gpt-4o", messages=HELLO)


def test_revoked_key_is_refused_within_a_second(sdk_client, key_a):
    from tenants.services import key_revoke

    sdk_client.models.list()
    key_revoke(key_a.key)
    time.sleep(1.0)
    with pytest.raises(openai.AuthenticationError):
        sdk_client.models.list()


def test_sdk_raises_not_found_for_unknown_model(sdk_client):
    with pytest.raises(openai.NotFoundError) as exc:
        sdk_client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert exc.value.code == "model_not_found"


def test_sdk_raises_bad_request(sdk_client):
    with pytest.raises(openai.BadRequestError):
        sdk_client.chat.completions.create(model="gpt-4o", messages="not a list")


def test_errors_are_openai_shaped_with_the_right_status(gateway, key_a):
    auth = {"Authorization": f"Bearer {key_a.secret}"}
    with httpx.Client(base_url=gateway.url) as http:
        cases = [
            (http.post("/v1/chat/completions", content=b"{not json", headers=auth), 400),
            (http.post("/v1/chat/completions", json={"model": "gpt-4o"}, headers=auth), 400),
            (http.get("/v1/chat/completions", headers=auth), 405),
            (http.post("/v1/nothing-here", json={}, headers=auth), 404),
            (http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": []}), 401),
            (http.post("/openai/deployments/gpt-4o/chat/completions", json={"messages": HELLO}, headers=auth), 400),
        ]
        for response, status in cases:
            assert response.status_code == status, (response.request.url, response.text)
            error = response.json()["error"]
            assert error["message"] and "type" in error and "code" in error
            assert response.headers["x-request-id"]
    assert len(wait_for_records(len(cases))) == len(cases)


def test_body_over_the_limit_is_refused_with_413(gateway, key_a, settings):
    settings.GATEWAY = {**settings.GATEWAY, "MAX_BODY_BYTES": 1000}
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]}
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {key_a.secret}"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    [record] = wait_for_records(1)
    assert record.status == 413


def test_upstream_4xx_passes_through(sdk_client, sim):
    sim.inject("chat-a", {"kind": "status", "status": 400, "count": 1})
    with pytest.raises(openai.BadRequestError):
        sdk_client.chat.completions.create(model="gpt-4o", messages=HELLO)


def test_upstream_5xx_becomes_502_and_timeout_504(sdk_client, sim, upstream):
    sim.inject("chat-a", {"kind": "status", "status": 500})
    with pytest.raises(openai.InternalServerError) as exc:
        sdk_client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert exc.value.status_code == 502
    sim.clear_faults("chat-a")
    upstream.first_byte_timeout = 0.3
    upstream.save()
    time.sleep(0.3)
    sim.inject("chat-a", {"kind": "timeout", "seconds": 2})
    with pytest.raises(openai.InternalServerError) as exc:
        sdk_client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert exc.value.status_code == 504
    records = wait_for_records(2)
    assert sorted(r.outcome for r in records) == ["upstream_error", "upstream_timeout"]


def test_health_probes(gateway):
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    assert UsageRecord.objects.count() == 0
