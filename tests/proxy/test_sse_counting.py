"""Stream completion tokens are counted as the events pass, in bounded batches, not kept to the end."""

from __future__ import annotations

import json

from gateway.proxy.sse import COUNT_BATCH_BYTES, SseRelay
from gateway.proxy.tokens import StreamTokenCounter


def event(content: str) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2000,"total_tokens":2003}}\n\n'
WORDS = [f" word{i % 97}" for i in range(5000)]


def counter() -> StreamTokenCounter:
    return StreamTokenCounter("gpt-4o")


def counted(words: list[str]) -> int:
    """The count of the same deltas fed in one go."""
    whole = counter()
    for word in words:
        whole.feed({"choices": [{"index": 0, "delta": {"content": word}}]})
    return whole.completion_tokens()


def test_a_stream_without_usage_is_counted_in_bounded_memory():
    relay = SseRelay(client_wants_usage=True, counter=counter)
    largest_batch = 0
    for word in WORDS:
        assert relay.feed(event(word))
        largest_batch = max(largest_batch, relay._batch_bytes)
    relay.feed(b"data: [DONE]\n\n")

    assert relay.counted_completion_tokens() == counted(WORDS)
    assert largest_batch < COUNT_BATCH_BYTES  # never more than one batch waits
    assert not hasattr(relay, "payloads")


def test_a_stream_that_ends_with_usage_needs_no_counting():
    made = []

    def spy() -> StreamTokenCounter:
        made.append(1)
        return counter()

    relay = SseRelay(client_wants_usage=False, counter=spy)
    for word in WORDS[:50]:
        relay.feed(event(word))
    assert relay.feed(USAGE) == b""  # the injected usage chunk is not the client's
    assert relay.usage == {"prompt_tokens": 3, "completion_tokens": 2000, "total_tokens": 2003}
    assert relay._batch == [] and made == []


def test_counting_stops_at_the_usage_chunk_of_a_long_stream():
    relay = SseRelay(client_wants_usage=True, counter=counter)
    for word in WORDS:
        relay.feed(event(word))
    relay.feed(USAGE)
    relay.feed(b"data: [DONE]\n\n")
    assert relay.usage["completion_tokens"] == 2000 and relay._batch == []


def test_a_broken_stream_is_counted_up_to_where_it_broke():
    relay = SseRelay(client_wants_usage=True, counter=counter)
    for word in WORDS[:10]:
        relay.feed(event(word))
    relay.feed(b'data: {"choices":[{"index":0,"delta":{"content":" half')  # cut mid-event
    assert relay.counted_completion_tokens() == counted(WORDS[:10])
