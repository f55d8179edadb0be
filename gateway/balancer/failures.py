"""The last failure of each deployment, for operators: "upstream refused credentials (401)".

Written on the failure path only (a dict entry, and with Redis one pipelined HSET + EXPIRE), read
by the status page. With Redis every process's failures are shared under
``<prefix>:bal:lastfail`` (a hash: deployment id -> JSON ``{"reason", "at"}``, expiring a day after
the last write); without Redis, or when Redis does not answer, each process shows its own.
Reasons are written by the forwarder already scrubbed of secrets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

KEEP_SECONDS = 86_400
# Noting a failure must never hold a request up: a Redis that does not answer is skipped.
REDIS_TIMEOUT_SECONDS = 0.25
MAX_REASON_CHARS = 300


class FailureNotes:
    """Last failure reason and time per deployment id; in process, mirrored to Redis if given."""

    def __init__(self, redis: Any = None, prefix: str = "gw", clock=time.time) -> None:
        self._redis = redis
        self._key = f"{prefix}:bal:lastfail"
        self._local: dict[int, dict[str, Any]] = {}
        self._clock = clock

    async def note(self, deployment_id: int, reason: str) -> None:
        """Remember ``reason`` as the deployment's last failure. Never raises."""
        entry = {"reason": reason[:MAX_REASON_CHARS], "at": self._clock()}
        self._local[deployment_id] = entry
        if self._redis is None:
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                pipe = self._redis.pipeline(transaction=False)
                pipe.hset(self._key, str(deployment_id), json.dumps(entry))
                pipe.expire(self._key, KEEP_SECONDS)
                await pipe.execute()
        except Exception:  # TimeoutError included: the local note stands
            log.debug("could not share the failure note of deployment %s", deployment_id, exc_info=True)

    async def read(self, deployment_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """``{id: {"reason", "at"}}`` for the deployments that have failed (the newest note wins)."""
        ids = list(deployment_ids)
        notes = {i: self._local[i] for i in ids if i in self._local}
        if self._redis is None or not ids:
            return notes
        try:
            async with asyncio.timeout(1.0):
                values = await self._redis.hmget(self._key, [str(i) for i in ids])
        except Exception:
            log.warning("could not read shared failure notes; showing this process's", exc_info=True)
            return notes
        for deployment_id, raw in zip(ids, values, strict=True):
            if raw is None:
                continue
            try:
                shared = json.loads(raw)
            except ValueError:
                continue
            mine = notes.get(deployment_id)
            if isinstance(shared, dict) and (mine is None or shared.get("at", 0) >= mine["at"]):
                notes[deployment_id] = shared
        return notes
