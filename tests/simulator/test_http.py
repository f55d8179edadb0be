"""The simulator over real HTTP: OpenAI/Azure SDKs and raw httpx against a started server."""

from __future__ import annotations

import base64
import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import AzureOpenAI, OpenAI

from gateway.proxy import tokens
from gateway.proxy.encodings import get_encoding
from tests.fakes.prompts import EVERYTHING_CHAT, IMAGE_CHAT, TOOL_CALL_CHAT
from tests.fakes.simulator import SimulatorError, start_simulator

KEY = "sim-key"
API_VERSION = "2024-10-21"
CHAT = [{"role": "user", "content": "Hello there"}]

SHARED_CONFIG = {
    "api_key": KEY,
    "deployments": [
        {"name": "gpt-4o"},
        {"name": "gpt-35", "model": "gpt-35-turbo"},
        {"name": "annotated", "model": "gpt-4o", "azure_annotations": True},
        {"name": "no-usage", "send_usage_in_stream": False},
        {"name": "emb", "model": "text-embedding-3-small", "embedding_dims": 16},
        {"name": "faulty"},
        {"name": "slow", "token_delay_ms": 20},
        {"name": "fast-count", "model": "gpt-4o", "token_estimate": "fast"},
    ],
    "azure_ad": {"tenant": "tenant-1", "client_id": "app", "client_secret": "s3cret", "expires_in": 1},
}


@pytest.fixture(scope="module")
def sim():
    handle = start_simulator(SHARED_CONFIG)
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "sim" in request.fixturenames:
        handle = request.getfixturevalue("sim")
        handle.clear_faults("faulty")
        handle.reset()


@pytest.fixture
def http(sim):
    with httpx.Client(base_url=sim.url, headers={"api-key": KEY}, trust_env=False, timeout=5) as client:
        yield client


@pytest.fixture
def oai(sim):
    client = OpenAI(base_url=sim.url + "/v1", api_key=KEY, max_retries=0)
    yield client
    client.close()


def cookbook_tokens(messages, encoding="o200k_base"):
    enc = get_encoding(encoding)
    total = 3
    for message in messages:
        total += 3 + sum(len(enc.encode_ordinary(v)) for v in message.values())
        total += "name" in message
    return total


def sse_events(text: str) -> list:
    """Parse an SSE body strictly: every event is one ``data:`` line then a blank line."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]"
    return events[:-1]


# ---------------------------------------------------------------- chat, completions


def test_chat_non_streaming(oai):
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o", messages=CHAT, max_tokens=5)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert completion.choices[0].finish_reason == "length"
    prompt = cookbook_tokens(CHAT)
    assert completion.usage.prompt_tokens == prompt
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == prompt + 5
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert raw.headers["x-request-id"] == raw.headers["apim-request-id"]
    assert len(raw.headers["x-request-id"]) == 36
    # Unlimited deployment: no limit, so no remaining-* headers.
    assert "x-ratelimit-remaining-requests" not in raw.headers


def test_chat_generates_configured_tokens_with_n(oai):
    completion = oai.chat.completions.create(model="gpt-35", messages=CHAT, max_tokens=100, n=2)
    assert [c.finish_reason for c in completion.choices] == ["stop", "stop"]
    assert completion.choices[1].message.content.split() == [f"tok{i}" for i in range(16)]
    assert completion.usage.completion_tokens == 32
    assert completion.usage.prompt_tokens == cookbook_tokens(CHAT, "cl100k_base")


def test_stream_with_include_usage(http):
    body = {
        "model": "gpt-4o",
        "messages": CHAT,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = sse_events(response.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"]["content"] for e in events[1:4]] == ["tok0 ", "tok1 ", "tok2 "]
    assert events[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(e["usage"] is None for e in events[:5])
    usage_event = events[5]
    assert usage_event["choices"] == []
    assert usage_event["usage"]["completion_tokens"] == 3
    assert usage_event["usage"]["prompt_tokens"] == cookbook_tokens(CHAT)
    assert len(events) == 6
    assert len({e["id"] for e in events}) == 1


def test_stream_without_include_usage_has_no_usage(http):
    response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": CHAT, "stream": True})
    events = sse_events(response.text)
    assert len(events) == 1 + 16 + 1
    assert all("usage" not in e for e in events)
    assert all(e["choices"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_usage_suppressed_by_upstream(http):
    body = {"model": "no-usage", "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(http.post("/v1/chat/completions", json=body).text)
    assert all(e["choices"] for e in events)  # no usage chunk although asked


def test_stream_with_sdk(oai):
    stream = oai.chat.completions.create(
        model="gpt-4o", messages=CHAT, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 "
    assert chunks[-1].usage.completion_tokens == 4


def test_azure_annotations(http):
    url = f"/openai/deployments/annotated/chat/completions?api-version={API_VERSION}"
    events = sse_events(http.post(url, json={"messages": CHAT, "stream": True, "max_tokens": 1}).text)
    first = events[0]
    assert (first["id"], first["object"], first["created"], first["model"], first["choices"]) == ("", "", 0, "", [])
    assert first["prompt_filter_results"][0]["prompt_index"] == 0
    assert events[1]["choices"][0]["delta"]["role"] == "assistant"
    body = http.post(url, json={"messages": CHAT, "max_tokens": 1}).json()
    assert body["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"] is False
    assert "content_filter_results" in body["choices"][0]


def test_completions(oai, http):
    completion = oai.completions.create(model="gpt-35", prompt="Say this", max_tokens=2)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "tok0 tok1 "
    assert completion.usage.prompt_tokens == len(get_encoding("cl100k_base").encode_ordinary("Say this"))
    body = {"model": "gpt-35", "prompt": [1, 2, 3], "max_tokens": 2, "stream": True}
    events = sse_events(http.post("/v1/completions", json=body).text)
    assert all(e["object"] == "text_completion" for e in events)
    assert [e["choices"][0]["text"] for e in events] == ["tok0 ", "tok1 ", ""]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("deployment", "model", "upstream_model", "mode"),
    [
        ("gpt-4o", "gpt-4o", "gpt-4o", "tiktoken"),
        ("gpt-35", "chat", "gpt-35-turbo", "tiktoken"),
        ("faulty", "faulty", "", "tiktoken"),  # an unknown model name: the family fallback
        ("fast-count", "gpt-4o", "gpt-4o", "fast"),
    ],
)
def test_served_prompt_tokens_and_arrival_charge_are_the_gateways_count(
    sim, http, deployment, model, upstream_model, mode
):
    """What the simulator reports as prompt tokens and charges on arrival, over HTTP, equals what a
    gateway deployment mirroring it reserves, for prompts with images, tools and tool calls."""
    expected_charge = 0
    for body in (IMAGE_CHAT, TOOL_CALL_CHAT, EVERYTHING_CHAT):
        response = http.post("/v1/chat/completions", json={"model": deployment, **body})
        assert response.status_code == 200, response.text
        prompt = tokens.count_prompt_tokens("chat", body, model, mode=mode, family_hint=upstream_model)
        assert response.json()["usage"]["prompt_tokens"] == prompt
        expected_charge += prompt + tokens.completion_allowance("chat", body, 1024)
    assert sim.deployment_stats(deployment)["tokens_counted"] == expected_charge


@pytest.mark.e2e
def test_completions_and_embeddings_lists_are_counted_as_the_gateway_does(sim, http):
    completion = {"model": "gpt-35", "prompt": [[1, 2], [3, 4, 5]], "max_tokens": 2, "best_of": 2}
    usage = http.post("/v1/completions", json=completion).json()["usage"]
    assert usage["prompt_tokens"] == tokens.count_prompt_tokens("completions", completion, "gpt-35-turbo") == 5
    texts = {"model": "emb", "input": ["alpha", "beta gamma", "<|endoftext|>"]}
    usage = http.post("/v1/embeddings", json=texts).json()["usage"]
    assert usage["prompt_tokens"] == tokens.count_prompt_tokens("embeddings", texts, "text-embedding-3-small")
    assert sim.deployment_stats("gpt-35")["tokens_counted"] == 5 + 2 * 2


# ---------------------------------------------------------------- embeddings


def test_embeddings_base64_default_and_float(oai, http):
    # The SDK asks for base64 by default and decodes little-endian float32 itself.
    result = oai.embeddings.create(model="emb", input=["alpha", "beta"])
    assert [d.index for d in result.data] == [0, 1]
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == 16 for v in vectors)
    assert sum(x * x for x in vectors[0]) == pytest.approx(1.0, abs=1e-5)
    assert vectors[0] != vectors[1]
    assert result.usage.prompt_tokens == 2 and result.usage.total_tokens == 2

    raw = http.post("/v1/embeddings", json={"model": "emb", "input": ["alpha", "beta"], "encoding_format": "base64"})
    b64 = raw.json()["data"][0]["embedding"]
    assert list(struct.unpack("<16f", base64.b64decode(b64))) == vectors[0]
    floats = http.post("/v1/embeddings", json={"model": "emb", "input": "alpha"}).json()
    assert floats["data"][0]["embedding"] == vectors[0]  # same input, same vector
    assert len(floats["data"]) == 1
    tokens = http.post("/v1/embeddings", json={"model": "emb", "input": [[1, 2], [3]], "dimensions": 4}).json()
    assert [len(d["embedding"]) for d in tokens["data"]] == [4, 4]
    assert tokens["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


# ---------------------------------------------------------------- Azure routes, auth, routing


def test_azure_client(sim):
    client = AzureOpenAI(azure_endpoint=sim.url, api_version=API_VERSION, api_key=KEY, max_retries=0)
    try:
        completion = client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
        assert completion.choices[0].message.content == "tok0 tok1 "
        models = client.models.list()
        assert {m.id for m in models.data} >= {"gpt-4o", "gpt-35-turbo", "text-embedding-3-small"}
        emb = client.embeddings.create(model="emb", input="x")
        assert len(emb.data[0].embedding) == 16
    finally:
        client.close()
    assert sim.deployment_stats("gpt-4o")["served"] == 1


def test_openai_models(oai):
    assert {m.id for m in oai.models.list().data} >= {"gpt-4o", "emb", "faulty"}


def test_missing_api_version(http):
    response = http.post("/openai/deployments/gpt-4o/chat/completions", json={"messages": CHAT})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MissingApiVersionParameter"
    assert http.get("/openai/models").status_code == 400


def test_auth(sim):
    url = sim.url + "/v1/chat/completions"
    body = {"model": "gpt-4o", "messages": CHAT}
    with httpx.Client(trust_env=False) as client:
        for headers in ({}, {"api-key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            response = client.post(url, json=body, headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["x-request-id"]
            if "wrong" in str(headers):
                assert "wrong" in response.json()["error"]["message"], "the 401 quotes the key it was sent"
        assert client.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.post(url, json=body, headers={"api-key": KEY}).status_code == 200
        assert client.get(sim.url + "/v1/models").status_code == 401
        assert client.get(sim.url + "/healthz").status_code == 200  # no auth
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=sim.url + "/v1", api_key="nope", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=CHAT
        )
    # 401s are not model calls: nothing reached the deployment.
    assert sim.deployment_stats("gpt-4o")["requests"] == 2


def test_unknown_deployment_and_bad_bodies(http, sim):
    response = http.post(
        f"/openai/deployments/nope/chat/completions?api-version={API_VERSION}", json={"messages": CHAT}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "DeploymentNotFound"
    assert response.headers["x-request-id"] == response.headers["apim-request-id"]
    assert http.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT}).status_code == 404
    assert http.post("/v1/chat/completions", json={"messages": CHAT}).status_code == 400
    assert http.post("/v1/chat/completions", content=b"{not json").status_code == 400
    assert http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": []}).status_code == 400
    assert http.post("/v1/nothing", json={}).status_code == 404
    assert "nope" not in sim.stats()["deployments"]


def test_auto_deployments():
    with start_simulator({"auto_deployments": True, "defaults": {"completion_tokens": 2}}) as sim:
        with httpx.Client(trust_env=False) as client:
            response = client.post(sim.url + "/v1/chat/completions", json={"model": "anything", "messages": CHAT})
        assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 "
        assert sim.deployment_stats("anything")["served"] == 1


# ---------------------------------------------------------------- rate limits


def test_rpm_short_window():
    # rpm=60 over a 6 s minute: windows (0.1 s, 1), (1 s, 10), (6 s, 60).
    config = {"minute_seconds": 6, "deployments": [{"name": "d", "rpm": 60}]}
    with start_simulator(config) as sim, httpx.Client(base_url=sim.url, trust_env=False) as client:
        body = {"model": "d", "messages": CHAT, "max_tokens": 1}
        first = client.post("/v1/chat/completions", json=body)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-remaining-requests"] == "0"  # the 0.1 s window is full
        second = client.post("/v1/chat/completions", json=body)
        assert second.status_code == 429
        retry_ms = float(second.headers["retry-after-ms"])
        assert 0 < retry_ms <= 101
        assert second.headers["retry-after"] == "1"
        error = second.json()["error"]
        assert error["code"] == "429" and "call rate limit" in error["message"]
        assert "Please retry after 1 second" in error["message"]
        assert second.headers["x-request-id"]
        time.sleep(retry_ms / 1000)
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        stats = sim.deployment_stats("d")
        assert (stats["requests"], stats["served"], stats["rate_limited"]) == (3, 2, 1)
        assert stats["by_status"] == {"200": 2, "429": 1}
        assert stats["max_requests_in_window"] == {"0.1": 1, "1": 2, "6": 2}


def test_tpm_counts_arrival_estimate_with_max_tokens():
    config = {"minute_seconds": 6, "deployments": [{"name": "d", "tpm": 1000, "model": "gpt-4o"}]}
    prompt = cookbook_tokens(CHAT)
    with start_simulator(config) as sim, httpx.Client(base_url=sim.url, trust_env=False) as client:

        def call(**extra):
            return client.post("/v1/chat/completions", json={"model": "d", "messages": CHAT, **extra})

        first = call(max_tokens=600)
        assert first.status_code == 200
        assert first.json()["usage"]["completion_tokens"] == 16  # generated 16, counted 600
        assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - prompt - 600)
        refused = call(max_tokens=600)
        assert refused.status_code == 429
        assert "token rate limit" in refused.json()["error"]["message"]
        # The t=0 entry must leave the 6 s window.
        assert 5000 < float(refused.headers["retry-after-ms"]) <= 6001
        assert refused.headers["retry-after"] == "6"
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(1000 - prompt - 600)
        assert call(max_completion_tokens=300).status_code == 200  # fits: 600 + 300 + 2 prompts
        # No max_tokens: default_max_tokens (1024) is counted, more than the whole limit.
        assert call().status_code == 429
        stats = sim.deployment_stats("d")
        assert stats["tokens_counted"] == (prompt + 600) + (prompt + 300)
        assert stats["max_tokens_in_window"] == {"6": 2 * prompt + 900}
        assert stats["prompt_tokens"] == 2 * prompt and stats["completion_tokens"] == 32


def test_tpm_charges_the_configured_arrival_rule_and_reports_tiktoken_usage():
    """``arrival_count: characters`` + ``arrival_factor``: the window and the remaining-tokens
    header follow the upstream's own estimate, the usage the exact prompt."""
    text = "The quick brown fox jumps over the lazy dog, twice. " * 6
    messages = [{"role": "user", "content": text}]
    body = {"model": "d", "messages": messages, "max_tokens": 40}
    config = {
        "minute_seconds": 6,
        "deployments": [
            {"name": "d", "tpm": 5000, "model": "gpt-4o", "arrival_count": "characters", "arrival_factor": 1.5}
        ],
    }
    charged = -(-tokens.count_prompt_tokens("chat", body, "gpt-4o", mode="fast") * 3 // 2) + 40
    with start_simulator(config) as sim, httpx.Client(base_url=sim.url, trust_env=False) as client:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == cookbook_tokens(messages)
        assert response.headers["x-ratelimit-remaining-tokens"] == str(5000 - charged)
        assert sim.deployment_stats("d")["tokens_counted"] == charged


def test_ptu_fast_429_and_recovery():
    # 1000 tokens per 0.5 s minute: drains 2000 tokens/s.
    config = {
        "minute_seconds": 0.5,
        "deployments": [{"name": "p", "sku": "provisioned", "ptu_tokens_per_minute": 1000, "completion_tokens": 2000}],
    }
    with start_simulator(config) as sim, httpx.Client(base_url=sim.url, trust_env=False) as client:
        body = {"model": "p", "messages": CHAT, "max_tokens": 2000}
        first = client.post("/v1/chat/completions", json=body)
        assert first.status_code == 200
        assert float(first.headers["azure-openai-deployment-utilization"].rstrip("%")) > 190
        assert "x-ratelimit-remaining-requests" not in first.headers
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429
        assert "x-ratelimit-remaining-tokens" not in refused.headers
        retry_ms = float(refused.headers["retry-after-ms"])
        assert 100 < retry_ms < 520  # ~1000 tokens over 100% at 2000/s, minus drain so far
        time.sleep(retry_ms / 1000)
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        stats = sim.deployment_stats("p")
        assert (stats["served"], stats["rate_limited"]) == (2, 1)


def test_ptu_utilisation_counts_in_flight_and_is_corrected_on_completion():
    config = {
        "minute_seconds": 600,  # drains 1.7 tokens/s: negligible during the test
        "deployments": [
            {"name": "p", "model": "gpt-4o", "sku": "provisioned", "ptu_tokens_per_minute": 1000, "latency_ms": 400}
        ],
    }
    prompt = cookbook_tokens(CHAT)
    body = {"model": "p", "messages": CHAT, "max_tokens": 900}

    def utilization(response):
        return float(response.headers["azure-openai-deployment-utilization"].rstrip("%"))

    with start_simulator(config) as sim, httpx.Client(base_url=sim.url, trust_env=False) as client:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/chat/completions", json=body)
            time.sleep(0.1)
            second = pool.submit(client.post, "/v1/chat/completions", json=body)
            time.sleep(0.1)
            # Two in flight, each counted at prompt + 900 on arrival: 181.6 %, so refused fast.
            started = time.monotonic()
            refused = client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 429 and time.monotonic() - started < 0.2
            assert utilization(refused) == pytest.approx(2 * (prompt + 900) / 10, abs=0.5)
            assert utilization(first.result()) == pytest.approx((prompt + 900) / 10, abs=0.5)
            assert second.result().status_code == 200
        # Both completed with 16 tokens: corrected from prompt+900 to prompt+16 each.
        third = client.post("/v1/chat/completions", json=body)
        assert third.status_code == 200
        assert utilization(third) == pytest.approx((3 * prompt + 2 * 16 + 900) / 10, abs=0.5)
        assert sim.deployment_stats("p")["utilization_pct"] == pytest.approx(3 * (prompt + 16) / 10, abs=0.5)


# ---------------------------------------------------------------- faults


def test_status_fault(sim, http):
    sim.inject("faulty", {"kind": "status", "status": 500, "count": 2})
    body = {"model": "faulty", "messages": CHAT, "max_tokens": 1}
    statuses = [http.post("/v1/chat/completions", json=body).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    stats = sim.deployment_stats("faulty")
    assert (stats["errors"], stats["served"], stats["by_status"]) == (2, 1, {"200": 1, "500": 2})
    assert stats["faults"] == []
    # Refused ones are not counted. "faulty" is no known model name: o200k, as in the gateway.
    assert stats["tokens_counted"] == cookbook_tokens(CHAT) + 1


def test_status_fault_shapes_its_body_and_can_quote_the_credential(sim, http):
    fault = {
        "kind": "status",
        "status": 400,
        "message": "Invalid 'temperature' (request signed with {credential})",
        "code": "invalid_value",
        "param": "temperature",
        "count": 1,
    }
    sim.inject("faulty", fault)
    response = http.post("/v1/chat/completions", json={"model": "faulty", "messages": CHAT})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": f"Invalid 'temperature' (request signed with {KEY})",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "invalid_value",
    }


def test_rate_limit_fault(sim, oai):
    sim.inject("faulty", {"kind": "rate_limit", "retry_after_ms": 5000, "count": 1})
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(model="faulty", messages=CHAT)
    headers = caught.value.response.headers
    assert (headers["retry-after-ms"], headers["retry-after"]) == ("5000.0", "5")
    assert oai.chat.completions.create(model="faulty", messages=CHAT, max_tokens=1).choices
    assert sim.deployment_stats("faulty")["rate_limited"] == 1


def test_timeout_fault(sim, http):
    sim.inject("faulty", {"kind": "timeout", "seconds": 0.6})
    body = {"model": "faulty", "messages": CHAT, "max_tokens": 1}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=0.2)
    sim.clear_faults("faulty")
    started = time.monotonic()
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert time.monotonic() - started < 0.3
    time.sleep(0.05)
    stats = sim.deployment_stats("faulty")
    assert stats["client_disconnects"] == 1 and stats["served"] == 1


def test_drop_fault_non_streaming(sim, http):
    sim.inject("faulty", {"kind": "drop", "count": 1})
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/v1/chat/completions", json={"model": "faulty", "messages": CHAT})
    assert http.post("/v1/chat/completions", json={"model": "faulty", "messages": CHAT}).status_code == 200
    stats = sim.deployment_stats("faulty")
    assert (stats["dropped"], stats["errors"], stats["served"]) == (1, 1, 1)


def test_drop_fault_streaming(sim, http):
    sim.inject("faulty", {"kind": "drop", "after_chunks": 3, "count": 1})
    received = []
    body = {"model": "faulty", "messages": CHAT, "stream": True}

    def read_stream() -> None:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    received.append(json.loads(line[len("data: ") :]))

    with pytest.raises(httpx.RemoteProtocolError):
        read_stream()
    assert len(received) == 3  # role + 2 tokens, then the connection died
    assert received[-1]["choices"][0]["delta"]["content"] == "tok1 "
    stats = sim.deployment_stats("faulty")
    assert (stats["dropped"], stats["completion_tokens"]) == (1, 2)


def test_probability_fault(sim, http):
    sim.inject("faulty", {"kind": "probability", "status": 503, "p": 1.0})
    body = {"model": "faulty", "messages": CHAT, "max_tokens": 1}
    assert http.post("/v1/chat/completions", json=body).status_code == 503
    response = http.delete("/_sim/deployments/faulty/faults")
    assert response.json() == {"faults": []}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    sim.inject("faulty", {"kind": "probability", "status": 500, "p": 0.5, "seed": 7})
    statuses = [http.post("/v1/chat/completions", json=body).status_code for _ in range(40)]
    assert 5 < statuses.count(500) < 35 and set(statuses) == {200, 500}


def test_client_disconnect_mid_stream(sim, http):
    body = {"model": "slow", "messages": CHAT, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 2
    while sim.deployment_stats("slow")["client_disconnects"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = sim.deployment_stats("slow")
    assert stats["client_disconnects"] == 1 and stats["in_flight"] == 0
    assert stats["completion_tokens"] < 16


def test_streaming_is_paced_and_flushed(http):
    # 16 tokens 20 ms apart: events must arrive spread out, not in one buffered burst.
    arrivals = []
    with http.stream("POST", "/v1/chat/completions", json={"model": "slow", "messages": CHAT, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 18
    assert arrivals[-1] - arrivals[0] >= 0.3
    assert arrivals[2] - arrivals[0] < arrivals[-1] - arrivals[0] - 0.2


# ---------------------------------------------------------------- control API, Entra ID


def test_control_api(sim, http):
    created = sim.configure("runtime", model="gpt-4o", rpm=600, completion_tokens=3)
    assert (created["model"], created["rpm"], created["completion_tokens"]) == ("gpt-4o", 600, 3)
    response = http.post("/v1/chat/completions", json={"model": "runtime", "messages": CHAT})
    assert response.json()["usage"]["completion_tokens"] == 3
    assert response.headers["x-ratelimit-remaining-requests"] == "9"  # 600 rpm: 10 per second
    sim.configure("runtime", completion_tokens=1)
    assert sim.config()["deployments"][-1]["completion_tokens"] == 1
    with pytest.raises(SimulatorError, match=r"unknown key deployments\.runtime\.rmp"):
        sim.configure("runtime", rmp=5)
    with pytest.raises(SimulatorError, match="kind"):
        sim.inject("runtime", {"kind": "explode"})
    stats = sim.stats()
    assert stats["deployments"]["runtime"]["requests"] == 1
    sim.reset()
    assert sim.stats()["deployments"]["runtime"]["requests"] == 0


def test_entra_id_tokens(sim):
    token_url = sim.url + "/tenant-1/oauth2/v2.0/token"
    form = {
        "grant_type": "client_credentials",
        "client_id": "app",
        "client_secret": "s3cret",
        "scope": "https://cognitiveservices.azure.com/.default",
    }
    with httpx.Client(trust_env=False) as client:
        assert client.post(token_url, data={**form, "client_secret": "bad"}).status_code == 401
        assert client.post(token_url, data={**form, "client_id": "other"}).status_code == 401
        assert client.post(token_url, data={**form, "grant_type": "password"}).status_code == 400
        assert client.post(token_url, data={k: v for k, v in form.items() if k != "scope"}).status_code == 400
        wrong_tenant = client.post(sim.url + "/other/oauth2/v2.0/token", data=form)
        assert wrong_tenant.status_code == 400 and wrong_tenant.json()["error"] == "invalid_tenant"
        issued = client.post(token_url, data=form)
        assert issued.status_code == 200
        token = issued.json()
        assert (token["token_type"], token["expires_in"]) == ("Bearer", 1)
    azure = AzureOpenAI(
        azure_endpoint=sim.url, api_version=API_VERSION, azure_ad_token=token["access_token"], max_retries=0
    )
    try:
        assert azure.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=1).choices
        assert sim.stats()["token_issued"] == 1
        time.sleep(1.05)
        with pytest.raises(openai.AuthenticationError, match="expired"):
            azure.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=1)
    finally:
        azure.close()
