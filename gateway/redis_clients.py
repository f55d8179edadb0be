"""Redis clients whose every call answers or fails within a bound.

redis-py's defaults wait 5 s to connect, 5 s for each reply, and retry ten times with backoff
up to a second: a paused or unreachable Redis would hold a request for about a minute. Every
client the gateway makes comes from here instead: connect and reply timeouts of
``REDIS_TIMEOUT_SECONDS`` (0.5 s), and a single immediate retry on a *broken connection* only
(a pooled connection left over from before a Redis restart fails once, then reconnects), never
on a timeout, which would double the wait.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from django.conf import settings
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

BROKEN_CONNECTION_RETRIES = 1


def redis_timeout() -> float:
    return settings.REDIS_TIMEOUT_SECONDS


def _options(timeout: float | None) -> dict[str, Any]:
    seconds = redis_timeout() if timeout is None else timeout
    return {"socket_timeout": seconds, "socket_connect_timeout": seconds}


def redis_async_client(url: str | None = None, *, timeout: float | None = None, **options: Any) -> redis.asyncio.Redis:
    """An asyncio client on ``url`` (default ``REDIS_URL``) with bounded waits."""
    retry = AsyncRetry(NoBackoff(), BROKEN_CONNECTION_RETRIES, supported_errors=(redis.ConnectionError,))
    return redis.asyncio.Redis.from_url(_url(url), retry=retry, **_options(timeout), **options)


def redis_sync_client(url: str | None = None, *, timeout: float | None = None, **options: Any) -> redis.Redis:
    """A blocking client (management commands, signal handlers, threads) with bounded waits."""
    retry = Retry(NoBackoff(), BROKEN_CONNECTION_RETRIES, supported_errors=(redis.ConnectionError,))
    return redis.Redis.from_url(_url(url), retry=retry, **_options(timeout), **options)


def _url(url: str | None) -> str:
    chosen = url or settings.REDIS_URL
    if not chosen:
        raise ValueError("no Redis URL: REDIS_URL is not set")
    return chosen
