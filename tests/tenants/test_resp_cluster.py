"""The quota scripts' pipelined client on a Redis Cluster (``tenants/quota_state/resp_cluster.py``),
on the local three-node cluster of ``tests/redis_cluster.py``."""

from __future__ import annotations

import asyncio

from gateway.redis_clients import redis_async_client
from tenants.quota_state.redis import fast_client
from tenants.quota_state.resp_cluster import RespClusterClient

ECHO = "return ARGV[1] .. '|' .. redis.call('INCR', KEYS[1])"


async def test_each_call_goes_to_the_primary_of_its_slot_on_one_connection_each(redis_cluster):
    cluster = redis_async_client(redis_cluster.url, timeout=0.5)
    client = fast_client(redis_cluster.url, 0.5, cluster)
    assert isinstance(client, RespClusterClient)
    sha = client.register(ECHO)
    try:
        keys = [f"resp-cluster:{{t{i}}}:n" for i in range(60)]  # tenants spread over the primaries
        replies = await asyncio.gather(*(client.evalsha(sha, [key], [str(i)]) for i, key in enumerate(keys)))
        assert replies == [f"{i}|1".encode() for i in range(60)]
        assert len(client._nodes) == 3  # one connection per primary, not per call
        assert [int(await cluster.get(key)) for key in keys[:5]] == [1] * 5
    finally:
        await client.aclose()
        await cluster.delete(*keys)
        await cluster.aclose()


async def test_a_call_sent_to_a_node_that_does_not_own_the_slot_is_answered_through_redis_py(redis_cluster):
    """A slot that moved (MOVED): the call goes again through redis-py's cluster client, which
    follows the redirection, instead of failing the request."""
    cluster = redis_async_client(redis_cluster.url, timeout=0.5)
    client = RespClusterClient(cluster, redis_cluster.url, connect_timeout=0.5, timeout=0.5)
    sha = client.register(ECHO)
    key = "resp-cluster:{t7}:moved"
    try:
        await client.evalsha(sha, [key], ["warm"])
        owner = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(key)).name
        wrong = next(name for name in client._nodes if name != owner) if len(client._nodes) > 1 else None
        if wrong is None:  # give the router a connection to another primary to misuse
            await client.evalsha(sha, ["resp-cluster:{t1}:x"], ["x"])
            await client.evalsha(sha, ["resp-cluster:{t2}:x"], ["x"])
            wrong = next(name for name in client._nodes if name != owner)
        client._node = lambda keys: client._nodes[wrong]  # type: ignore[method-assign]  # a stale map

        assert await client.evalsha(sha, [key], ["again"]) == b"again|2"
    finally:
        await client.aclose()
        await cluster.delete(key, "resp-cluster:{t1}:x", "resp-cluster:{t2}:x")
        await cluster.aclose()
