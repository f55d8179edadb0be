"""The small pipelined Redis client of the quota scripts (``tenants/quota_state/resp.py``)."""

from __future__ import annotations

import asyncio

import pytest

from tenants.quota_state.resp import RespClient, RespConnectionError, RespError, encode_command
from tests.e2e.servers import RedisServer


def test_a_command_is_encoded_as_resp_bulk_strings():
    assert encode_command(("EVALSHA", b"ab", 2)) == b"*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n"


async def test_concurrent_calls_on_one_connection_get_their_own_replies(quota_redis_url: str):
    client = RespClient(quota_redis_url)
    sha = client.register("return ARGV[1] .. '|' .. KEYS[1]")
    try:
        replies = await asyncio.gather(*(client.evalsha(sha, [f"k{i}"], [str(i)]) for i in range(200)))
    finally:
        await client.aclose()

    assert replies == [f"{i}|k{i}".encode() for i in range(200)]


async def test_a_script_error_is_raised_and_the_connection_goes_on(quota_redis_url: str):
    client = RespClient(quota_redis_url)
    failing = client.register("return redis.call('INCR', KEYS[1], 'too', 'many')")
    fine = client.register("return 'ok'")
    try:
        with pytest.raises(RespError, match=r"(?i)wrong number of arg"):
            await client.evalsha(failing, ["k"], [])
        assert await client.evalsha(fine, [], []) == b"ok"
    finally:
        await client.aclose()


@pytest.fixture
def own_redis():
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    yield server
    server.stop()


async def test_after_a_redis_restart_the_next_call_reconnects_and_reloads_the_script(own_redis: RedisServer):
    client = RespClient(own_redis.url)
    sha = client.register("return 'hello'")
    try:
        assert await client.evalsha(sha, [], []) == b"hello"
        await asyncio.to_thread(own_redis.restart)  # an empty Redis: the connection and the scripts are gone
        await asyncio.sleep(0.05)

        assert await client.evalsha(sha, [], []) == b"hello"
    finally:
        await client.aclose()


@pytest.fixture
async def silent_server():
    """A server that accepts connections and never answers; ``drop()`` closes them."""
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(1024):
            pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    server.drop = lambda: [w.close() for w in writers]  # type: ignore[attr-defined]
    server.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"  # type: ignore[attr-defined]
    yield server
    server.close()


async def test_calls_in_flight_fail_when_the_connection_drops(silent_server):
    client = RespClient(silent_server.url)
    try:
        calls = [asyncio.ensure_future(client.execute("PING")) for _ in range(3)]
        await asyncio.sleep(0.05)
        silent_server.drop()

        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await client.aclose()

    assert all(isinstance(r, RespConnectionError) for r in results), results


async def test_a_call_unanswered_within_the_timeout_fails(silent_server):
    client = RespClient(silent_server.url, timeout=0.3)
    try:
        with pytest.raises(RespConnectionError, match="did not answer"):
            await asyncio.wait_for(client.execute("PING"), timeout=3)
    finally:
        await client.aclose()


async def test_a_cancelled_call_does_not_take_the_next_calls_reply(quota_redis_url: str):
    client = RespClient(quota_redis_url)
    slow = client.register(
        "local t = redis.call('TIME'); while true do local n = redis.call('TIME'); "
        "if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 50000 then return 'slow' end end"
    )
    fast = client.register("return ARGV[1]")
    try:
        task = asyncio.ensure_future(client.evalsha(slow, [], []))
        await asyncio.sleep(0.01)
        task.cancel()
        assert await client.evalsha(fast, [], ["mine"]) == b"mine"
    finally:
        await client.aclose()
