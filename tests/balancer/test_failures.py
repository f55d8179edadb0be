"""Failure notes: the last failure of each deployment, per process and shared through Redis."""

from __future__ import annotations

import os
import uuid

import pytest

from gateway.balancer.failures import FailureNotes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_notes_in_process_keep_the_latest_reason():
    clock = Clock()
    notes = FailureNotes(clock=clock)
    await notes.note(1, "upstream error (500)")
    clock.now += 1
    await notes.note(1, "upstream refused credentials (401)")
    assert await notes.read([1, 2]) == {1: {"reason": "upstream refused credentials (401)", "at": 1001.0}}


@pytest.fixture
async def redis_client():
    url = os.environ.get("BALANCER_TEST_REDIS_URL") or os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("REDIS_URL is not set")
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    prefix = f"test-notes-{uuid.uuid4().hex[:10]}"
    yield client, prefix
    await client.delete(f"{prefix}:bal:lastfail")
    await client.aclose()


async def test_notes_are_shared_through_redis(redis_client):
    client, prefix = redis_client
    clock = Clock()
    one, other = FailureNotes(client, prefix, clock), FailureNotes(client, prefix, clock)
    await one.note(7, "timed out (first_byte)")
    assert await other.read([7, 8]) == {7: {"reason": "timed out (first_byte)", "at": 1000.0}}
    assert 0 < await client.ttl(f"{prefix}:bal:lastfail") <= 86_400


async def test_a_redis_that_fails_leaves_the_local_note():
    class Broken:
        def pipeline(self, transaction=False):
            raise ConnectionError("down")

        async def hmget(self, key, fields):
            raise ConnectionError("down")

    notes = FailureNotes(Broken(), "gw", Clock())
    await notes.note(3, "could not connect")
    assert (await notes.read([3]))[3]["reason"] == "could not connect"
