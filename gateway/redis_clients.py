"""Redis clients whose every call answers or fails within a bound, on one Redis or a Cluster.

redis-py's defaults wait 5 s to connect, 5 s for each reply, and retry ten times with backoff
up to a second: a paused or unreachable Redis would hold a request for about a minute. Every
client the gateway makes comes from here instead: connect and reply timeouts of
``REDIS_TIMEOUT_SECONDS`` (0.5 s), and a single immediate retry on a *broken connection* only
(a pooled connection left over from before a Redis restart fails once, then reconnects), never
on a timeout, which would double the wait.

Redis Cluster: a URL with the scheme ``redis+cluster://host:port`` (``rediss+cluster://`` for
TLS) names any node of a cluster; the clients are then redis-py's cluster clients, which route
each command (and each script call, whose keys share one slot: see docs/architecture.md,
"Redis Cluster") to the node holding its slot, following ``MOVED`` when slots move. The scheme
rather than a separate setting, so the one URL carries its kind to every place that builds a
client from it (the balancer's and quota states, tests, the benchmark). Django's Redis cache,
the channel layer and Celery's broker do not speak Cluster: settings keep them off it.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from django.conf import settings
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

BROKEN_CONNECTION_RETRIES = 1
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def redis_timeout() -> float:
    return settings.REDIS_TIMEOUT_SECONDS


def is_cluster_url(url: str | None) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` / ``rediss+cluster://``)."""
    return bool(url) and str(url).lower().startswith(CLUSTER_SCHEMES)


def is_cluster_client(client: Any) -> bool:
    """Whether ``client`` is one of redis-py's cluster clients (asyncio or blocking)."""
    return isinstance(client, (redis.asyncio.cluster.RedisCluster, redis.cluster.RedisCluster))


def plain_url(url: str) -> str:
    """``url`` with the cluster marker dropped: what redis-py's ``from_url`` understands."""
    if is_cluster_url(url):
        scheme, rest = url.split("://", 1)
        return f"{scheme.split('+', 1)[0]}://{rest}"
    return url


def _options(timeout: float | None) -> dict[str, Any]:
    seconds = redis_timeout() if timeout is None else timeout
    return {"socket_timeout": seconds, "socket_connect_timeout": seconds}


# Connections per cluster node and client. redis-py's cluster pools fail a call at once past their
# maximum (100 by default) instead of waiting: a burst of concurrent requests would get 503s. The
# single-node client has no maximum; this one as good as none.
CLUSTER_MAX_CONNECTIONS = 10_000


class _AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """redis-py's asyncio cluster client, learning the cluster before the first command runs.

    The client learns its nodes lazily; concurrent first commands (a burst at start-up) raced
    that and failed with broken connections (redis-py 8.1: 4-12 of 20-50 concurrent first SETs).
    ``initialize`` takes a lock, so the first commands wait for one initialisation instead."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


def redis_async_client(url: str | None = None, *, timeout: float | None = None, **options: Any) -> Any:
    """An asyncio client on ``url`` (default ``REDIS_URL``) with bounded waits: a
    ``redis.asyncio.Redis``, or a ``redis.asyncio.cluster.RedisCluster`` for a cluster URL."""
    chosen = _url(url)
    retry = AsyncRetry(NoBackoff(), BROKEN_CONNECTION_RETRIES, supported_errors=(redis.ConnectionError,))
    if is_cluster_url(chosen):
        options.setdefault("max_connections", CLUSTER_MAX_CONNECTIONS)
        return _AsyncCluster.from_url(plain_url(chosen), retry=retry, **_options(timeout), **options)
    return redis.asyncio.Redis.from_url(chosen, retry=retry, **_options(timeout), **options)


def redis_sync_client(url: str | None = None, *, timeout: float | None = None, **options: Any) -> Any:
    """A blocking client (management commands, signal handlers, threads) with bounded waits;
    a ``redis.cluster.RedisCluster`` for a cluster URL."""
    chosen = _url(url)
    retry = Retry(NoBackoff(), BROKEN_CONNECTION_RETRIES, supported_errors=(redis.ConnectionError,))
    if is_cluster_url(chosen):
        return redis.cluster.RedisCluster.from_url(plain_url(chosen), retry=retry, **_options(timeout), **options)
    return redis.Redis.from_url(chosen, retry=retry, **_options(timeout), **options)


def _url(url: str | None) -> str:
    chosen = url or settings.REDIS_URL
    if not chosen:
        raise ValueError("no Redis URL: REDIS_URL is not set")
    return chosen
