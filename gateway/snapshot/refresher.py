"""Keeping each process's snapshot fresh: watch the configuration version, rebuild when it moved."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.database_thread import DatabaseThread
from gateway.snapshot import Snapshot, current, install
from gateway.snapshot.build import snapshot_build
from gateway.snapshot.version import VersionMirror

log = logging.getLogger(__name__)


class SnapshotRefresher:
    """Keeps ``current()`` up to date. One per process, started by ``gateway.proxy.runtime``.

    The database row is the truth, read by ``read_version`` (sync). Without a ``mirror``
    it is read every ``poll_seconds``. With the Redis mirror, the mirror is read every
    ``poll_seconds`` (one GET) and the row every ``database_seconds``; a mirror that moved has
    the row read at once. So a change reaches this process within ``poll_seconds`` when it went
    through Redis, and within ``database_seconds`` when it did not (made where ``REDIS_URL`` is
    unset, or while Redis was down). A mirror that disagrees with the row is set to the row's
    number, so the other processes notice at their next GET.

    Database work (reading the version, building snapshots) runs on one thread of its own, so a
    process holds one database connection for it, not one per thread of a pool.
    """

    def __init__(
        self,
        poll_seconds: float,
        read_version: Callable[[], int],
        *,
        mirror: VersionMirror | None = None,
        database_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.poll_seconds = poll_seconds
        self.read_version = read_version
        self.mirror = mirror
        self.database_seconds = database_seconds
        self.clock = clock
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._mirrored: int | None = None  # the mirror's value at the last poll
        self._database_read_at = float("-inf")
        self._database = DatabaseThread("snapshot-db")
        # Wall time of the last look at the database's version (or load): how fresh this process
        # knows its snapshot to be (the metric gateway_snapshot_age_seconds).
        self.checked_at: float | None = None

    async def _on_database_thread(self, function: Callable):
        return await self._database.run(function)

    async def load_now(self) -> Snapshot:
        """Build and install a snapshot (on the refresher's database thread; the ORM is sync)."""
        snapshot = await self._on_database_thread(snapshot_build)
        install(snapshot)
        self.checked_at = time.time()
        return snapshot

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="snapshot-refresher")

    async def stop(self) -> None:
        """Stop polling. Cancels until the task has really ended: redis-py's asyncio client can
        swallow a cancellation that lands while it sends a command, and a bare cancel-and-await
        would then wait forever (seen as a hung shutdown)."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
        self._database.stop()

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Keep serving from the last good snapshot; the next poll tries again.
                log.exception("could not refresh the configuration snapshot")

    async def poll(self) -> None:
        """One look at the version: rebuild the snapshot if the database's moved away from it."""
        mirrored = await self.mirror.read() if self.mirror is not None else None
        mirror_moved = mirrored is not None and mirrored != self._mirrored
        self._mirrored = mirrored
        if not (self.mirror is None or mirror_moved or self.clock() - self._database_read_at >= self.database_seconds):
            return
        self._database_read_at = self.clock()
        version = await self._on_database_thread(self.read_version)
        self.checked_at = time.time()
        if version != current().version:
            snapshot = await self.load_now()
            log.info(
                "configuration snapshot v%s loaded (%d keys, %d models)",
                snapshot.version,
                len(snapshot.keys_by_hash),
                len(snapshot.deployments_by_model),
            )
        if self.mirror is not None and self.mirror.reachable and mirrored != version:
            # The mirror lags (or leads, after a database restore): the row wins.
            await self.mirror.write(version)
            self._mirrored = version
