"""Keeping each process's snapshot fresh: poll the configuration version, rebuild when it moved."""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async

from gateway.snapshot import Snapshot, current, install
from gateway.snapshot.build import snapshot_build

log = logging.getLogger(__name__)


class SnapshotRefresher:
    """Keeps ``current()`` up to date by polling the configuration version.

    One per process, started by ``gateway.proxy.runtime``. ``version_source`` is an async callable
    returning the current version number (Redis GET, or the database row read in a thread).
    """

    def __init__(self, poll_seconds: float, version_source) -> None:
        self.poll_seconds = poll_seconds
        self.version_source = version_source
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def load_now(self) -> Snapshot:
        """Build and install a snapshot (in a worker thread; the ORM is sync)."""
        snapshot = await sync_to_async(snapshot_build, thread_sensitive=False)()
        install(snapshot)
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
        if task is None:
            return
        self._stopping = True
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.poll_seconds)
            try:
                version = await self.version_source()
                if version != current().version:
                    snapshot = await self.load_now()
                    log.info(
                        "configuration snapshot v%s loaded (%d keys, %d models)",
                        snapshot.version,
                        len(snapshot.keys_by_hash),
                        len(snapshot.deployments_by_model),
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                # Keep serving from the last good snapshot; the next poll tries again.
                log.exception("could not refresh the configuration snapshot")
