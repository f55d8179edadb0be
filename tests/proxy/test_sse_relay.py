"""The stream relay passes the upstream's bytes on unchanged, cutting only the usage chunk the client
did not ask for, whatever the reads' boundaries; it still sees the usage, the end and errors."""

from __future__ import annotations

import json
import random

import pytest

from gateway.proxy.sse import SseRelay
from gateway.simulator.responses import SSE_DONE, StreamFormat, token_piece


def simulator_stream(tokens: int = 40, *, include_usage: bool = True) -> tuple[bytes, bytes]:
    """A chat stream exactly as the simulated upstream writes it, and its usage event."""
    fmt = StreamFormat("chat", "chatcmpl-x", 1700000000, "gpt-4o", include_usage)
    events = [fmt.role(0) or b""] + [fmt.token(0, token_piece(i)) for i in range(tokens)] + [fmt.finish(0, "stop")]
    usage = fmt.usage(11, tokens) if include_usage else b""
    return b"".join(events) + usage + SSE_DONE, usage


def relayed(relay: SseRelay, pieces: list[bytes]) -> bytes:
    return b"".join(relay.feed(piece) for piece in pieces) + relay.finish()


def cut(data: bytes, rng: random.Random, *, most: int = 40) -> list[bytes]:
    """``data`` in pieces of random length, as TCP reads may bring them."""
    pieces, at = [], 0
    while at < len(data):
        step = rng.randint(1, most)
        pieces.append(data[at : at + step])
        at += step
    return pieces


def by_event(data: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in data.split(b"\n\n") if e]


@pytest.mark.parametrize("reads", ["whole", "by_event", "random", "bytewise"])
def test_a_client_that_asked_for_usage_gets_the_upstreams_bytes_unchanged(reads: str):
    stream, _ = simulator_stream()
    rng = random.Random(reads)
    pieces = {
        "whole": [stream],
        "by_event": by_event(stream),
        "random": cut(stream, rng),
        "bytewise": [stream[i : i + 1] for i in range(len(stream))],
    }[reads]
    relay = SseRelay(client_wants_usage=True)

    assert relayed(relay, pieces) == stream
    assert relay.usage is not None
    assert (relay.usage["prompt_tokens"], relay.usage["completion_tokens"], relay.usage["total_tokens"]) == (11, 40, 51)
    assert relay.done and relay.error is None


@pytest.mark.parametrize("seed", range(5))
def test_a_client_that_did_not_ask_gets_everything_but_the_usage_chunk(seed: int):
    stream, usage = simulator_stream()
    relay = SseRelay(client_wants_usage=False)

    out = relayed(relay, cut(stream, random.Random(seed), most=300))

    assert out == stream.replace(usage, b"")
    assert b'"usage":{' not in out and out.endswith(SSE_DONE)
    assert relay.usage["completion_tokens"] == 40  # still known to the gateway


def test_a_usage_chunk_that_arrives_with_other_events_is_cut_out_of_that_read_alone():
    stream, usage = simulator_stream(3)
    relay = SseRelay(client_wants_usage=False)
    assert relay.feed(stream) == stream.replace(usage, b"")


def test_crlf_line_ends_pass_unchanged():
    stream, usage = simulator_stream(5)
    crlf = stream.replace(b"\n", b"\r\n")
    relay = SseRelay(client_wants_usage=False)

    out = relayed(relay, cut(crlf, random.Random(1)))

    assert out == crlf.replace(usage.replace(b"\n", b"\r\n"), b"")
    assert relay.usage is not None and relay.done


def test_an_incomplete_event_waits_for_its_end_and_a_complete_one_goes_at_once():
    relay = SseRelay(client_wants_usage=True)
    first = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    assert relay.feed(first + b'data: {"choi') == first
    assert relay.feed(b'ces":[]}\n') == b""
    assert relay.feed(b"\n") == b'data: {"choices":[]}\n\n'


def test_done_inside_a_tokens_text_is_not_the_end():
    relay = SseRelay(client_wants_usage=True)
    relay.feed(b'data: {"choices":[{"delta":{"content":"data: [DONE]"}}]}\n\n')
    assert not relay.done
    relay.feed(b"data:[DONE]\n\n")
    assert relay.done


def test_usage_nested_elsewhere_or_null_is_not_the_usage_chunk():
    relay = SseRelay(client_wants_usage=False)
    nested = b'data: {"choices":[],"usage": null,"x_groq":{"usage":{"completion_tokens":3}}}\n\n'
    assert relay.feed(nested) == nested  # kept: not a top-level usage object
    assert relay.usage is None
    spaced = b'data: {"choices": [], "usage" : {"prompt_tokens": 1, "completion_tokens": 2}}\n\n'
    assert relay.feed(spaced) == b""
    assert relay.usage == {"prompt_tokens": 1, "completion_tokens": 2}


def test_a_usage_chunk_that_also_carries_choices_is_passed_on():
    relay = SseRelay(client_wants_usage=False)
    event = b'data: {"choices":[{"index":0,"delta":{}}],"usage":{"completion_tokens":2}}\n\n'
    assert relay.feed(event) == event
    assert relay.usage == {"completion_tokens": 2}


def test_an_error_event_is_passed_on_and_noted():
    relay = SseRelay(client_wants_usage=True)
    error = {"error": {"message": "The server had an error", "type": "server_error", "code": "overloaded"}}
    event = b"data: " + json.dumps(error).encode() + b"\n\n"
    text = b'data: {"choices":[{"delta":{"content":"{\\"error\\": 1}"}}]}\n\n'  # an error in a token's text

    assert relay.feed(text) == text
    assert relay.error is None
    assert relay.feed(event) == event
    assert relay.error == error["error"]


def test_an_event_error_field_is_noted():
    relay = SseRelay(client_wants_usage=True)
    event = b'event: error\ndata: {"message":"boom","code":"server_error"}\n\n'
    assert relay.feed(event) == event
    assert relay.error == {"message": "boom", "code": "server_error"}


def test_what_is_left_when_the_upstream_closes_is_passed_on_as_it_came():
    relay = SseRelay(client_wants_usage=True)
    relay.feed(b'data: {"choices":[]}\n\ndata: [DONE]\n')
    assert relay.finish() == b"data: [DONE]\n"
    assert relay.done
