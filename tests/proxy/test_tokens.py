"""Token counting: the cookbook's API-verified figures, prompt forms, allowances, streams."""

from __future__ import annotations

import pytest
import tiktoken.model

from gateway.proxy import encodings, tokens
from gateway.proxy.tokens import StreamTokenCounter, completion_allowance, count_prompt_tokens, encoding_name_for


@pytest.fixture(scope="module", autouse=True)
def loaded_encodings():
    encodings.warm()


# The cookbook's example conversation ("How to count tokens with tiktoken", section 6). The API
# itself reported 129 prompt tokens for gpt-3.5-turbo-0125 / gpt-4-0613 and 124 for gpt-4o /
# gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]
# Section 7: with this tool the API reported 105 (gpt-3.5-turbo, gpt-4) and 101 (gpt-4o, -mini).
COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 129), ("gpt-4-0613", 129), ("gpt-4", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_cookbook_conversation_matches_the_api(model, expected):
    assert count_prompt_tokens("chat", {"model": model, "messages": COOKBOOK_MESSAGES}, model) == expected


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)]
)
def test_cookbook_tools_example_matches_the_api(model, expected):
    body = {"messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert count_prompt_tokens("chat", body, model) == expected


def test_legacy_functions_count_like_tools():
    functions = [tool["function"] for tool in COOKBOOK_TOOLS]
    body = {"messages": COOKBOOK_TOOL_MESSAGES, "functions": functions}
    assert count_prompt_tokens("chat", body, "gpt-4o") == 101


@pytest.mark.parametrize(
    ("name", "hint", "expected"),
    [
        ("gpt-4o", "", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "", "o200k_base"),
        ("chatgpt-4o-latest", "", "o200k_base"),
        ("gpt-4.1-nano", "", "o200k_base"),
        ("gpt-4.5-preview", "", "o200k_base"),
        ("gpt-5-mini", "", "o200k_base"),
        ("o1-mini", "", "o200k_base"),
        ("o3", "", "o200k_base"),
        ("o4-mini", "", "o200k_base"),
        ("gpt-4", "", "cl100k_base"),
        ("gpt-4-32k", "", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "", "cl100k_base"),
        ("gpt-35-turbo", "", "cl100k_base"),
        ("text-embedding-3-large", "", "cl100k_base"),
        ("text-embedding-ada-002", "", "cl100k_base"),
        ("davinci-002", "", "cl100k_base"),
        ("babbage-002", "", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:org::abc", "", "cl100k_base"),
        ("GPT-4", "", "cl100k_base"),
        ("llama-3.1-70b", "", "o200k_base"),
        ("my-prod-deployment", "gpt-35-turbo-16k", "cl100k_base"),
        ("gpt-4o", "cl100k_base", "cl100k_base"),
        ("gpt-35-turbo", "something unknown", "cl100k_base"),
    ],
)
def test_encoding_choice(name, hint, expected):
    assert encoding_name_for(name, hint) == expected


def test_encoding_choice_agrees_with_tiktokens_own_table():
    for name, encoding in tiktoken.model.MODEL_TO_ENCODING.items():
        if encoding in ("cl100k_base", "o200k_base"):
            assert encoding_name_for(name) == encoding, name
    for prefix, encoding in tiktoken.model.MODEL_PREFIX_TO_ENCODING.items():
        if encoding in ("cl100k_base", "o200k_base"):
            assert encoding_name_for(prefix + "2099") == encoding, prefix


def test_encoding_for_returns_a_working_cached_encoding():
    enc = tokens.encoding_for("gpt-4o")
    assert enc.name == "o200k_base" and tokens.encoding_for("gpt-4o-mini") is enc


def test_special_token_text_is_counted_as_plain_text():
    text = "before <|endoftext|> after <|im_start|>"
    body = {"messages": [{"role": "user", "content": text}]}
    n = count_prompt_tokens("chat", body, "gpt-4o")
    assert n == 3 + 3 + 1 + len(tokens.encoding_for("gpt-4o").encode_ordinary(text))
    assert n > 3 + 3 + 1 + 4  # more than if <|endoftext|> had been one special token
    assert count_prompt_tokens("completions", {"prompt": text}, "gpt-3.5-turbo") > 5
    assert count_prompt_tokens("embeddings", {"input": [text]}, "text-embedding-3-small") > 5


def test_text_parts_count_like_string_content_and_images_are_approximated():
    as_string = {"messages": [{"role": "user", "content": "Describe this picture, please."}]}
    as_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this picture, please."}]}]}
    base = count_prompt_tokens("chat", as_string, "gpt-4o")
    assert count_prompt_tokens("chat", as_parts, "gpt-4o") == base

    def with_image(detail: str | None) -> int:
        image: dict[str, str] = {"url": "data:image/png;base64," + "A" * 10_000}
        if detail:
            image["detail"] = detail
        parts = as_parts["messages"][0]["content"] + [{"type": "image_url", "image_url": image}]
        return count_prompt_tokens("chat", {"messages": [{"role": "user", "content": parts}]}, "gpt-4o")

    assert with_image("low") == base + 85
    assert with_image("high") == base + 765
    assert with_image(None) == base + 765  # auto


def test_tool_calls_and_tool_results_are_counted():
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_current_weather", "arguments": '{"location":"Paris"}'},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}
    without = count_prompt_tokens("chat", {"messages": COOKBOOK_TOOL_MESSAGES}, "gpt-4o")
    with_calls = count_prompt_tokens("chat", {"messages": [*COOKBOOK_TOOL_MESSAGES, call, result]}, "gpt-4o")
    assert with_calls - without >= 3 + 3 + 5 + 3 + 5  # two messages, name + arguments, result


def test_json_schema_response_format_adds_its_schema():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    plain = {"messages": COOKBOOK_TOOL_MESSAGES}
    structured = dict(plain, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert count_prompt_tokens("chat", structured, "gpt-4o") > count_prompt_tokens("chat", plain, "gpt-4o") + 10


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hello world", 2), (["hello world", "hello"], 3), ([1, 2, 3], 3), ([[1, 2], [3, 4, 5]], 5), ([], 0), (None, 0)],
)
def test_completions_and_embeddings_prompt_forms(prompt, expected):
    assert count_prompt_tokens("completions", {"prompt": prompt}, "gpt-3.5-turbo-instruct") == expected
    assert count_prompt_tokens("embeddings", {"input": prompt}, "text-embedding-3-small") == expected


def test_malformed_bodies_do_not_raise():
    for body in (
        {},
        {"messages": "hi"},
        {"messages": [None, 3, {"role": "user", "content": 5}, {"content": [None, 7, {"type": "text", "text": 9}]}]},
        {"messages": [], "tools": [None, {"type": "function", "function": {"parameters": {"properties": {"a": 1}}}}]},
        {
            "messages": [],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"properties": {"a": {"type": ["string", "null"], "anyOf": [{}]}}},
                    },
                }
            ],
        },
    ):
        assert count_prompt_tokens("chat", body, "gpt-4o") >= 3
    assert count_prompt_tokens("embeddings", {"input": {"a": 1}}, "x") == 0


def test_unknown_route_or_mode_is_refused():
    with pytest.raises(ValueError):
        count_prompt_tokens("responses", {}, "gpt-4o")
    with pytest.raises(ValueError):
        count_prompt_tokens("chat", {}, "gpt-4o", mode="guess")


ENGLISH = (
    "The gateway sends each request to a deployment that has capacity for it, streams the answer "
    "back as it arrives, retries or spills over when a deployment is saturated, and records every "
    "request so that teams can see their usage and spend. "
) * 20


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_fast_mode_is_in_the_right_ballpark(model):
    for body in ({"messages": COOKBOOK_MESSAGES}, {"messages": [{"role": "user", "content": ENGLISH}]}):
        exact = count_prompt_tokens("chat", body, model)
        fast = count_prompt_tokens("chat", body, model, mode="fast")
        assert 0.7 * exact <= fast <= 1.5 * exact
    assert count_prompt_tokens("completions", {"prompt": "abcdefgh"}, model, mode="fast") == 2
    assert count_prompt_tokens("completions", {"prompt": "abcdefghi"}, model, mode="fast") == 3


@pytest.mark.parametrize(
    ("route", "body", "default", "expected"),
    [
        ("chat", {}, 1024, 1024),
        ("chat", {"max_tokens": 100}, 1024, 100),
        ("chat", {"max_completion_tokens": 50, "max_tokens": 100}, 1024, 50),
        ("chat", {"max_tokens": 100, "n": 3}, 1024, 300),
        ("chat", {"n": 2}, 500, 1000),
        ("chat", {"max_tokens": None, "n": None}, 700, 700),
        ("chat", {"max_tokens": True, "n": -2}, 700, 700),
        ("completions", {"max_tokens": 10, "n": 2, "best_of": 5}, 1024, 50),
        ("completions", {"max_tokens": 10, "n": 3}, 1024, 30),
        ("completions", {"best_of": 3}, 1024, 48),  # the upstream's default of 16 per candidate
        ("chat", {"max_completion_tokens": 50, "n": 2}, 1024, 100),
        ("chat", {"max_completion_tokens": 0, "max_tokens": 40, "n": 2}, 1024, 80),
        ("completions", {}, 1024, 16),
        ("embeddings", {"max_tokens": 10}, 1024, 0),
    ],
)
def test_completion_allowance(route, body, default, expected):
    assert completion_allowance(route, body, default) == expected


def chat_chunk(content: str | None = None, index: int = 0, **delta: object) -> dict:
    if content is not None:
        delta["content"] = content
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": delta, "finish_reason": None}],
    }


def test_stream_counter_counts_chat_deltas():
    enc = tokens.encoding_for("gpt-4o")
    counter = StreamTokenCounter("gpt-4o")
    counter.feed(
        {"id": "", "object": "", "created": 0, "model": "", "prompt_filter_results": [], "choices": []}
    )  # Azure
    counter.feed(chat_chunk("", role="assistant"))
    for piece in ("Hel", "lo", " wor", "ld", "!"):
        counter.feed(chat_chunk(piece))
    counter.feed({"id": "", "choices": [{"index": 0, "content_filter_results": {}}]})  # no delta
    counter.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert counter.completion_tokens() == len(enc.encode_ordinary("Hello world!"))
    assert counter.usage is None


def test_stream_counter_keeps_choices_apart_and_counts_tool_calls():
    enc = tokens.encoding_for("gpt-4o")
    counter = StreamTokenCounter("gpt-4o")
    counter.feed(chat_chunk("Good", index=0))
    counter.feed(chat_chunk("Fine", index=1))
    counter.feed(chat_chunk(" morning", index=0))
    counter.feed(chat_chunk(" thanks", index=1))
    expected_text = len(enc.encode_ordinary("Good morning")) + len(enc.encode_ordinary("Fine thanks"))
    assert counter.completion_tokens() == expected_text

    calls = StreamTokenCounter("gpt-4o")
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    calls.feed(chat_chunk(tool_calls=[first]))
    for piece in ('{"loc', 'ation": "Pa', 'ris"}'):
        calls.feed(chat_chunk(tool_calls=[{"index": 0, "function": {"arguments": piece}}]))
    expected = len(enc.encode_ordinary('get_weather{"location": "Paris"}'))
    assert expected <= calls.completion_tokens() <= expected + tokens.TOOL_CALL_OVERHEAD


def test_stream_counter_counts_completions_text_and_keeps_upstream_usage():
    counter = StreamTokenCounter("gpt-3.5-turbo-instruct")
    for piece in ("Once", " upon", " a", " time"):
        counter.feed({"object": "text_completion", "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
    counter.feed({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    assert counter.completion_tokens() == 4
    assert counter.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_stream_counter_on_a_long_stream_matches_encoding_the_whole_text():
    enc = tokens.encoding_for("gpt-4o")
    text = ENGLISH * 5  # well past the buffer's flush size
    counter = StreamTokenCounter("gpt-4o")
    for i in range(0, len(text), 7):
        counter.feed(chat_chunk(text[i : i + 7]))
    assert counter.completion_tokens() == len(enc.encode_ordinary(text))
    fast = StreamTokenCounter("gpt-4o", mode="fast")
    fast.feed(chat_chunk(text))
    assert abs(fast.completion_tokens() - len(text) / 4) <= 4  # rounded up per flushed piece


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
def test_a_long_text_counted_in_pieces_matches_encoding_it_whole(encoding):
    """Texts above 64 Ki characters are encoded in pieces (the GIL is released between them)."""
    import random

    rng = random.Random(3)
    words = ["alpha", "beta,", "gamma.", "Delta", "x\n", "école", "1234", "“quoted”", "tab\tbed"]
    text = " ".join(rng.choice(words) for _ in range(60_000))
    assert len(text) > 4 * tokens._PIECE_CHARS
    whole = len(encodings.get_encoding(encoding).encode_ordinary(text))
    assert count_prompt_tokens("completions", {"prompt": text}, encoding) == whole
