"""Strict where the gateway relies on a field, open elsewhere: every unusable value is a 400 naming
its field, no JSON input is a 500, and each refusal leaves one usage record and no reservation."""

from __future__ import annotations

import json

import pytest

from gateway.proxy import consumer as consumer_module
from gateway.proxy import jsonbody
from tests.proxy.asgi_call import HELLO, in_flight, post_json

pytestmark = pytest.mark.django_db(transaction=True)

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


def chat(**fields):
    return {"model": "gpt-4o", "messages": HELLO, **fields}


def completion(**fields):
    return {"model": "gpt-4o", "prompt": "Say hi", **fields}


def embedding(**fields):
    return {"model": "text-embedding-3-small", "input": "hello", **fields}


FIELD_CASES = [
    # (path, body, param, code)
    (CHAT, chat(max_tokens=-5), "max_tokens", "integer_below_min_value"),
    (CHAT, chat(max_tokens=0), "max_tokens", "integer_below_min_value"),
    (CHAT, chat(max_tokens="lots"), "max_tokens", "invalid_type"),
    (CHAT, chat(max_tokens=1.5), "max_tokens", "invalid_type"),
    (CHAT, chat(max_tokens=True), "max_tokens", "invalid_type"),
    (CHAT, chat(max_completion_tokens=-1), "max_completion_tokens", "integer_below_min_value"),
    (CHAT, chat(max_completion_tokens=[10]), "max_completion_tokens", "invalid_type"),
    (CHAT, chat(n=0), "n", "integer_below_min_value"),
    (CHAT, chat(n="2"), "n", "invalid_type"),
    (CHAT, chat(n=129), "n", "integer_above_max_value"),
    (CHAT, chat(stream="yes"), "stream", "invalid_type"),
    (CHAT, chat(stream=1), "stream", "invalid_type"),
    (CHAT, chat(stream=True, stream_options=[]), "stream_options", "invalid_type"),
    (CHAT, chat(stream=True, stream_options="usage"), "stream_options", "invalid_type"),
    (CHAT, chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", "invalid_type"),
    (CHAT, chat(priority=-1), "priority", "integer_below_min_value"),
    (CHAT, chat(priority=256), "priority", "integer_above_max_value"),
    (CHAT, chat(priority="high"), "priority", "invalid_type"),
    (CHAT, chat(priority=1.0), "priority", "invalid_type"),
    (CHAT, {"model": "gpt-4o"}, "messages", "missing_required_parameter"),
    (CHAT, chat(messages=None), "messages", "missing_required_parameter"),
    (CHAT, chat(messages="hi"), "messages", "invalid_type"),
    (CHAT, chat(messages={"role": "user"}), "messages", "invalid_type"),
    (CHAT, chat(messages=[]), "messages", "empty_array"),
    (CHAT, chat(messages=[{"role": "user", "content": "hi"}, "hi"]), "messages[1]", "invalid_type"),
    (COMPLETIONS, {"model": "gpt-4o"}, "prompt", "missing_required_parameter"),
    (COMPLETIONS, completion(prompt=5), "prompt", "invalid_type"),
    (COMPLETIONS, completion(prompt=[]), "prompt", "empty_array"),
    (COMPLETIONS, completion(prompt=[[]]), "prompt[0]", "empty_array"),
    (COMPLETIONS, completion(prompt=[1, "a"]), "prompt", "invalid_type"),
    (COMPLETIONS, completion(prompt=[[1, "a"]]), "prompt[0]", "invalid_type"),
    (COMPLETIONS, completion(prompt=[1, -2]), "prompt", "integer_below_min_value"),
    (COMPLETIONS, completion(prompt=[True]), "prompt", "invalid_type"),
    (COMPLETIONS, completion(best_of=0), "best_of", "integer_below_min_value"),
    (COMPLETIONS, completion(stream="true"), "stream", "invalid_type"),
    (EMBEDDINGS, {"model": "text-embedding-3-small"}, "input", "missing_required_parameter"),
    (EMBEDDINGS, embedding(input=""), "input", "empty_string"),
    (EMBEDDINGS, embedding(input=["a", ""]), "input", "empty_string"),
    (EMBEDDINGS, embedding(input=[]), "input", "empty_array"),
    (EMBEDDINGS, embedding(input=[1.5]), "input", "invalid_type"),
    (EMBEDDINGS, embedding(input={"text": "a"}), "input", "invalid_type"),
    (EMBEDDINGS, embedding(priority="urgent"), "priority", "invalid_type"),
]


@pytest.mark.parametrize(("path", "body", "param", "code"), FIELD_CASES)
async def test_a_field_the_gateway_relies_on_is_refused_with_its_name(
    gateway_runtime, secret, records, path, body, param, code
):
    answer = await post_json(path, body, secret)

    assert answer.status == 400, answer.body
    assert (answer.error["param"], answer.error["code"], answer.error["type"]) == (
        param,
        code,
        "invalid_request_error",
    )
    assert answer.headers[b"content-type"] == b"application/json"
    assert [(r["status"], r["outcome"], r["error_code"]) for r in records] == [(400, "client_error", code)]
    assert set((await in_flight()).values()) == {0}


DEEP = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"metadata":' + b"[" * 65 + b"]" * 65 + b"}"
DEEPEST = b'{"model":"gpt-4o","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BIG_INT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"seed":' + b"9" * 5000 + b"}"


def _chat_with(raw_field: bytes) -> bytes:
    return b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],' + raw_field + b"}"


JSON_CASES = [
    # (body, code)
    (b"", "invalid_json"),
    (b"{broken", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b'"just a string"', "invalid_json"),
    (b'{"model":"gpt-4o"} trailing', "invalid_json"),
    (b'{"model":"gpt-4o","messages":[{"role":"user","content":"\xff\xfe"}]}', "invalid_json"),
    (_chat_with(b'"user":"\\ud800"'), "invalid_string"),
    (b'{"model":"gpt-4o-oai","messages":[{"role":"user","content":"\\ud800"}]}', "invalid_string"),
    (b'{"model":"gpt-4o","messages":[{"role":"user","content":"a\\udfffb"}]}', "invalid_string"),
    (b'{"model":"gpt-4o","messages":[{"role":"user","\\ud83d":"hi"}]}', "invalid_string"),
    (DEEP, "nesting_too_deep"),
    (DEEPEST, "nesting_too_deep"),
    (_chat_with(b'"temperature":1e999999'), "invalid_number"),
    (_chat_with(b'"temperature":-1e400'), "invalid_number"),
    (BIG_INT, "invalid_number"),
    (_chat_with(b'"temperature":NaN'), "invalid_number"),
    (_chat_with(b'"temperature":Infinity'), "invalid_number"),
    (_chat_with(b'"temperature":-Infinity'), "invalid_number"),
]


@pytest.mark.parametrize(("body", "code"), JSON_CASES, ids=lambda v: v[:40] if isinstance(v, bytes) else v)
async def test_no_json_input_makes_the_gateway_fail(gateway_runtime, secret, records, body, code):
    answer = await post_json(CHAT, body, secret)

    assert answer.status == 400, answer.body
    assert (answer.error["code"], answer.error["param"]) == (code, None)
    assert [(r["status"], r["error_code"]) for r in records] == [(400, code)]
    assert set((await in_flight()).values()) == {0}


async def test_a_paired_surrogate_escape_is_an_ordinary_character(gateway_runtime, secret, records):
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"smile \\ud83d\\ude00"}]}'
    answer = await post_json(CHAT, body, secret)

    assert answer.status == 200, answer.body
    assert records[0]["status"] == 200


VALID_CASES = [
    (CHAT, chat(max_tokens=None, n=None, stream=None, stream_options=None, priority=None)),
    (CHAT, chat(stream=False, stream_options={"include_usage": None}, n=2, max_completion_tokens=20)),
    (CHAT, {"model": "gpt-4o-oai", "messages": HELLO, "priority": 6, "stream": True}),
    (CHAT, chat(user="u-1", metadata={"a": [[[1]]]}, logit_bias={"50256": -100}, some_future_field={"x": 1})),
    (COMPLETIONS, completion(prompt="")),
    (COMPLETIONS, completion(prompt=[1, 2, 3], best_of=2, n=2)),
    (COMPLETIONS, completion(prompt=[[1, 2], [3]])),
    (COMPLETIONS, completion(prompt=["a", "b"])),
    (EMBEDDINGS, embedding(input=["a", "b"])),
    (EMBEDDINGS, embedding(input=[[1, 2, 3]], encoding_format="float")),
]


@pytest.mark.parametrize(("path", "body"), VALID_CASES)
async def test_valid_and_unknown_fields_pass(gateway_runtime, secret, records, path, body):
    answer = await post_json(path, body, secret)

    assert answer.status == 200, answer.body
    assert [r["status"] for r in records] == [200]
    assert set((await in_flight()).values()) == {0}


async def test_a_streamed_request_with_a_bad_field_is_refused_before_streaming(gateway_runtime, secret, records):
    answer = await post_json(CHAT, chat(stream=True, max_tokens="lots"), secret)

    assert answer.status == 400 and answer.headers[b"content-type"] == b"application/json"
    assert answer.error["param"] == "max_tokens"
    assert len(records) == 1 and records[0]["streamed"] is False


async def test_big_bodies_are_prepared_off_the_event_loop(gateway_runtime, secret, records, settings, monkeypatch):
    settings.GATEWAY = {**settings.GATEWAY, "OFFLOAD_BODY_BYTES": 4096}
    offloaded = []
    real = consumer_module.offload

    async def spy(work):
        offloaded.append(work)
        return await real(work)

    monkeypatch.setattr(consumer_module, "offload", spy)
    small = await post_json(CHAT, chat(), secret)
    big = await post_json(CHAT, chat(messages=[{"role": "user", "content": "word " * 2000}]), secret)
    refused = await post_json(CHAT, chat(messages=[{"role": "user", "content": "word " * 2000}], n=0), secret)

    assert (small.status, big.status, refused.status) == (200, 200, 400)
    assert len(offloaded) == 2  # the big ones, accepted or refused; not the small one
    assert records[1]["prompt_tokens"] > 2000 and refused.error["param"] == "n"


async def test_the_forwarded_body_keeps_unknown_fields_byte_for_byte(gateway_runtime, secret, records, monkeypatch):
    """A large forwarded body is the client's, with only the gateway's own changes spliced in."""
    monkeypatch.setattr(jsonbody, "SPLICE_MIN_BYTES", 0)  # as if this body were large
    sent = []
    from gateway.proxy import forward

    real_open = forward.Forwarder.open

    async def spy(self, deployment, body, *args):
        sent.append(body)
        return await real_open(self, deployment, body, *args)

    monkeypatch.setattr(forward.Forwarder, "open", spy)
    raw = (
        b'{"model":"gpt-4o", "priority": 7, "messages":[{"role":"user","content":"hi \\u00e9"}],'
        b' "metadata": {"b": 1.50, "a": [1,2]}, "stream": true}'
    )
    answer = await post_json(CHAT, raw, secret)

    assert answer.status == 200
    [body] = sent
    assert b'"metadata": {"b": 1.50, "a": [1,2]}' in body  # untouched, spacing and all
    assert b'"content":"hi \\u00e9"' in body
    assert b"priority" not in body
    assert json.loads(body)["stream_options"] == {"include_usage": True}
