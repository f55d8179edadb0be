"""What the official SDK sees of the gateway's own validation: BadRequestError with the field's name,
for plain and streamed calls alike, and a parseable NotFoundError for a wrong path."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.usage import wait_for_records

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"max_tokens": -5}, "max_tokens", "integer_below_min_value"),
        ({"n": 0}, "n", "integer_below_min_value"),
        ({"extra_body": {"max_tokens": "lots"}}, "max_tokens", "invalid_type"),
        ({"extra_body": {"priority": "urgent"}}, "priority", "invalid_type"),
    ],
)
def test_the_sdk_raises_bad_request_naming_the_field(sdk_client, sim, fields, param, code, stream):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk_client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=stream, **fields)

    assert (raised.value.status_code, raised.value.param, raised.value.code) == (400, param, code)
    assert raised.value.request_id and raised.value.request_id.startswith("req_")
    assert sim.deployment_stats("chat-a")["requests"] == 0  # refused before any capacity was taken
    [record] = wait_for_records(1)
    assert (record.status, record.error_code) == (400, code)


def test_the_sdk_raises_bad_request_for_stream_options_that_are_not_an_object(sdk_client):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk_client.chat.completions.create(
            model="gpt-4o", messages=HELLO, stream=True, extra_body={"stream_options": ["include_usage"]}
        )
    assert raised.value.param == "stream_options"


def test_the_sdk_raises_bad_request_for_an_empty_embedding_input(sdk_client):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk_client.embeddings.create(model="text-embedding-3-small", input=[])
    assert (raised.value.param, raised.value.code) == ("input", "empty_array")


def test_a_wrong_path_is_a_json_not_found(gateway, key_a):
    sdk = openai.OpenAI(base_url=gateway.url, api_key=key_a.secret, max_retries=0)  # forgot the /v1
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert raised.value.code == "unknown_url"
    assert httpx.get(gateway.url + "/no-such-page").headers["content-type"] == "application/json"
