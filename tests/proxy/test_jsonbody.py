"""The body parser: the same objects as ``json.loads``, bounded depth, and changed bodies rebuilt by
splicing so that what the gateway did not change reaches the upstream byte for byte."""

from __future__ import annotations

import json

import pytest

from gateway.proxy import jsonbody
from gateway.proxy.errors import GatewayError
from gateway.proxy.jsonbody import MAX_DEPTH, parse_json_body


@pytest.fixture(params=["whole", "spliced"], autouse=True)
def way(request, monkeypatch):
    """Every test runs both ways: small bodies are parsed whole, large ones member by member."""
    monkeypatch.setattr(jsonbody, "SPLICE_MIN_BYTES", 1 << 30 if request.param == "whole" else 0)
    return request.param


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b' \n{ "a" : 1 , "b":[1, 2.5, "x", null, true, {"c": {}}] }\t',
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"caf\\u00e9 \\ud83d\\ude00"}]}',
        '{"emoji":"😀","é":"ü"}'.encode(),
        b'{"a":1,"a":2}',
    ],
)
def test_parses_like_json_loads(raw):
    assert parse_json_body(raw).payload == json.loads(raw)


def test_an_unchanged_body_is_forwarded_as_it_came():
    raw = b'{"model": "gpt-4o",  "messages": []}'
    assert parse_json_body(raw).encoded() is raw


def test_changes_are_spliced_and_everything_else_is_kept_verbatim(way):
    raw = (
        b'{ "model" : "gpt-4o", "priority": 1, "metadata": {"z": 1.50,  "a": [1, 2]},'
        b' "stream": true, "note": "caf\\u00e9" }'
    )
    body = parse_json_body(raw)
    assert body.pop("priority") == 1
    body.set("stream_options", {"include_usage": True})
    body.set("model", "renamed")

    out = body.encoded()
    if way == "spliced":
        assert b'"metadata": {"z": 1.50,  "a": [1, 2]}' in out  # spacing and number spelling kept
        assert b'"note": "caf\\u00e9"' in out  # escapes kept
    assert json.loads(out) == {
        "model": "renamed",
        "metadata": {"z": 1.5, "a": [1, 2]},
        "stream": True,
        "note": "café",
        "stream_options": {"include_usage": True},
    }
    assert body.payload == json.loads(out)


def test_a_changed_duplicate_name_appears_once(way):
    body = parse_json_body(b'{"a": 1, "b": 2, "a": 3}')
    body.set("a", 4)
    assert body.encoded() == (b'{"b": 2,"a":4}' if way == "spliced" else b'{"a":4,"b":2}')


def test_setting_on_an_empty_object():
    body = parse_json_body(b"{ }")
    body.set("k", [1])
    assert body.encoded() == b'{"k":[1]}'


def _nested(levels: int) -> bytes:
    """A body whose deepest value sits ``levels`` containers deep, the body itself counted."""
    return b'{"x":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


def test_nesting_up_to_the_limit_passes_and_one_more_level_is_refused():
    assert parse_json_body(_nested(MAX_DEPTH)).payload
    with pytest.raises(GatewayError) as refused:
        parse_json_body(_nested(MAX_DEPTH + 1))
    assert (refused.value.status, refused.value.code) == (400, "nesting_too_deep")


def test_many_shallow_brackets_are_not_mistaken_for_depth():
    raw = json.dumps({"model": "m", "input": [[1, 2, 3]] * 50_000}).encode()
    assert len(parse_json_body(raw).payload["input"]) == 50_000


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"a": "\\udc00"}', "invalid_string"),
        (b'{"a": ["ok", {"b": "x\\uD800y"}]}', "invalid_string"),
        (b'{"a": 1e309}', "invalid_number"),
        (b'{"a": NaN}', "invalid_number"),
        (b'{"a": ' + b"1" * 4301 + b"}", "invalid_number"),
        (b'{"a": 1}{', "invalid_json"),
        (b'{"a" 1}', "invalid_json"),
        (b'{"a": 1,}', "invalid_json"),
        (b"{'a': 1}", "invalid_json"),
        (b"null", "invalid_json"),
        (b"\xef\xbb\xbf{}", "invalid_json"),  # a BOM is not JSON text
    ],
)
def test_what_the_gateway_cannot_carry_is_a_400(raw, code):
    with pytest.raises(GatewayError) as refused:
        parse_json_body(raw)
    assert (refused.value.status, refused.value.code) == (400, code)
