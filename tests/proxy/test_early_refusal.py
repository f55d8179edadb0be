"""Refuse early: a bad key before the body is read, a slow body on a deadline, a memory budget for
bodies not yet admitted. Every refusal leaves exactly one usage record."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.proxy.body import budget
from tests.proxy.asgi_call import HELLO, call, in_flight, post_json

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "gpt-4o", "messages": HELLO}).encode()


def headers(secret: str | None, length: int | None = None) -> list[tuple[str, str]]:
    out = [("content-type", "application/json")]
    if length is not None:
        out.append(("content-length", str(length)))
    if secret is not None:
        out.append(("authorization", f"Bearer {secret}"))
    return out


@pytest.fixture
def short_limits(settings):
    settings.GATEWAY = {
        **settings.GATEWAY,
        "BODY_READ_TIMEOUT_SECONDS": 0.3,
        "MAX_BODY_BYTES": 10_000,
        "MAX_BUFFERED_BODY_BYTES": 1_000,
    }
    return settings


@pytest.mark.parametrize("secret_sent", [None, "sk-gw-not-a-key"], ids=["missing", "unknown"])
async def test_a_missing_or_unknown_key_is_refused_before_the_body_is_read(
    gateway_runtime, records, short_limits, secret_sent
):
    # Headers and a first chunk of a 5 MB upload that never completes: the answer must not wait.
    answer = await call(
        "POST", CHAT, headers=headers(secret_sent, 5_000_000), chunks=[BODY[:10]], then="stall", timeout=2
    )

    assert answer.status == 401 and answer.error["code"] == "invalid_api_key"
    assert answer.receive_calls == 0  # not one body byte was asked for
    assert [(r["status"], r["outcome"], r["route"]) for r in records] == [(401, "auth_error", "chat")]
    assert budget.used == 0


async def test_a_stalled_body_gets_408_and_a_record(gateway_runtime, secret, records, short_limits):
    answer = await call("POST", CHAT, headers=headers(secret, len(BODY)), chunks=[BODY[:20]], then="stall")

    assert answer.status == 408 and answer.error["code"] == "request_timeout"
    assert [(r["status"], r["error_code"], r["key_id"] is not None) for r in records] == [
        (408, "request_timeout", True)
    ]
    assert budget.used == 0


async def test_a_trickled_body_gets_408_when_its_deadline_passes(gateway_runtime, secret, records, short_limits):
    pieces = [BODY[i : i + 8] for i in range(0, len(BODY), 8)]
    answer = await call("POST", CHAT, headers=headers(secret, len(BODY)), chunks=pieces, chunk_delay=0.05)

    assert len(pieces) * 0.05 > 0.3
    assert answer.status == 408
    assert len(records) == 1 and budget.used == 0


async def test_a_body_that_arrives_in_time_in_pieces_is_served(gateway_runtime, secret, records, short_limits):
    pieces = [BODY[i : i + 16] for i in range(0, len(BODY), 16)]
    answer = await call("POST", CHAT, headers=headers(secret, len(BODY)), chunks=pieces, chunk_delay=0.01)

    assert answer.status == 200, answer.body
    assert [r["status"] for r in records] == [200]
    assert budget.used == 0 and set((await in_flight()).values()) == {0}


async def test_a_declared_length_above_the_limit_is_413_before_the_body(gateway_runtime, secret, records, short_limits):
    answer = await call("POST", CHAT, headers=headers(secret, 20_000), chunks=[b"{"], then="stall")

    assert answer.status == 413 and answer.error["code"] == "request_too_large"
    assert answer.receive_calls == 0 and len(records) == 1


async def test_an_undeclared_body_is_413_as_soon_as_it_passes_the_limit(gateway_runtime, secret, records, short_limits):
    short_limits.GATEWAY = {**short_limits.GATEWAY, "MAX_BUFFERED_BODY_BYTES": 1_000_000}
    # Chunked upload, no content-length: refused at the chunk that crosses 10 000 bytes, not at the end.
    answer = await call("POST", CHAT, headers=headers(secret), chunks=[b" " * 900] * 12, then="stall")

    assert answer.status == 413
    assert answer.receive_calls == 12 and len(records) == 1 and budget.used == 0


async def test_bodies_beyond_the_process_budget_get_503_with_retry_after(
    gateway_runtime, secret, records, short_limits
):
    # One client holds 800 of the 1 000 bytes the process may buffer and stalls.
    holder = asyncio.ensure_future(call("POST", CHAT, headers=headers(secret, 900), chunks=[b" " * 800], then="stall"))
    await asyncio.sleep(0.05)
    assert budget.used == 800

    declared = await call("POST", CHAT, headers=headers(secret, 400), chunks=[b" " * 400], then="stall")
    undeclared = await call("POST", CHAT, headers=headers(secret), chunks=[b" " * 100, b" " * 300], then="stall")
    assert (declared.status, declared.receive_calls) == (503, 0)
    assert (undeclared.status, undeclared.receive_calls) == (503, 2)
    assert declared.error["code"] == "gateway_overloaded"
    assert declared.headers[b"retry-after"] == b"1" and b"retry-after-ms" in declared.headers

    assert (await holder).status == 408  # its deadline frees the budget
    assert budget.used == 0
    assert (await post_json(CHAT, json.loads(BODY), secret)).status == 200
    assert sorted(r["status"] for r in records) == [200, 408, 503, 503]


async def test_a_client_that_leaves_mid_body_leaves_one_record(gateway_runtime, secret, records, short_limits):
    answer = await call("POST", CHAT, headers=headers(secret, len(BODY)), chunks=[BODY[:20]], then="disconnect")

    assert answer.status == 0  # nothing was sent: nobody is listening
    assert [(r["status"], r["outcome"]) for r in records] == [(499, "client_disconnect")]
    assert budget.used == 0


async def test_unknown_api_paths_and_methods_are_refused_before_the_body(gateway_runtime, secret, records):
    unknown = await call("POST", "/v1/chat/complete", headers=headers(secret, 100), chunks=[b"{"], then="stall")
    wrong = await call("GET", CHAT, headers=headers(secret))

    assert (unknown.status, unknown.error["code"], unknown.receive_calls) == (404, "unknown_url", 0)
    assert (wrong.status, wrong.error["code"], wrong.headers[b"allow"]) == (405, "method_not_allowed", b"POST")
    assert [r["status"] for r in records] == [404, 405]
