"""``resp.py`` on a Redis Cluster: one pipelined connection per primary, chosen by slot.

On a cluster the quota scripts' keys share their tenant's slot (``{t<id>}``), so a call goes to
the one primary that owns it. Which one is read from redis-py's cluster client (its slot map,
learnt from the cluster and refreshed when a reply says a slot moved); the call itself goes
through a ``RespClient`` to that node, which costs the gateway a fifth of what redis-py's
cluster client does per call (docs/architecture.md, "Redis Cluster"). A reply redirecting the
call (``MOVED``, ``ASK``: a slot moving between primaries; ``TRYAGAIN``, ``CLUSTERDOWN``) is not
followed here: the call is made again through redis-py's cluster client, which follows it and
updates the slot map the next calls read.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlsplit

from redis.crc import key_slot

from tenants.quota_state.resp import RespClient, RespError

REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


class RespClusterClient:
    """``RespClient``'s ``register``/``evalsha``/``aclose`` over the primaries of ``cluster``
    (a ``redis.asyncio.cluster.RedisCluster``, not owned); ``url``: the cluster's URL, whose
    scheme and credentials the node connections take."""

    def __init__(self, cluster: Any, url: str, *, connect_timeout: float, timeout: float) -> None:
        parts = urlsplit(url)
        self._scheme = parts.scheme.split("+", 1)[0]  # redis+cluster -> redis, rediss+cluster -> rediss
        self._userinfo = parts.netloc.rpartition("@")[0]
        self._cluster = cluster
        self._connect_timeout, self._timeout = connect_timeout, timeout
        self._nodes: dict[str, RespClient] = {}
        self._sources: dict[bytes, str] = {}
        self._scripts: dict[bytes, Any] = {}  # sha -> redis-py Script, for redirected calls

    def register(self, source: str) -> bytes:
        sha = hashlib.sha1(source.encode()).hexdigest().encode()
        self._sources[sha] = source
        for client in self._nodes.values():
            client.register(source)
        return sha

    def _node(self, keys: list[str]) -> RespClient:
        node = self._cluster.nodes_manager.get_node_from_slot(key_slot(keys[0].encode()))
        client = self._nodes.get(node.name)
        if client is None:
            userinfo = f"{self._userinfo}@" if self._userinfo else ""
            client = RespClient(
                f"{self._scheme}://{userinfo}{node.host}:{node.port}",
                connect_timeout=self._connect_timeout,
                timeout=self._timeout,
            )
            for source in self._sources.values():
                client.register(source)
            self._nodes[node.name] = client
        return client

    async def evalsha(self, sha: bytes, keys: list[str], args: list[str]) -> Any:
        if self._cluster._initialize:  # the slot map is learnt on first use
            await self._cluster.initialize()
        try:
            return await self._node(keys).evalsha(sha, keys, args)
        except RespError as exc:
            if not str(exc).startswith(REDIRECTS):
                raise
        script = self._scripts.get(sha)
        if script is None:
            script = self._scripts[sha] = self._cluster.register_script(self._sources[sha])
        return await script(keys=keys, args=args)

    async def aclose(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for client in nodes.values():
            await client.aclose()
