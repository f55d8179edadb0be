"""The usage sink: one record per request, buffered in memory and written in batches.

``record_usage`` only appends to a deque, so the request path never waits on the database.
Two tasks of the process's event loop do the rest, each through a thread of its own (the
writer's holds the sink's one database connection; the spiller's never touches the database,
so it keeps working while a database write hangs):

* The flusher writes batches (``billing.usage_store``: idempotent on the request id; a record
  the database refuses is parked, never retried forever in front of the others) every
  ``flush_seconds`` or as soon as a batch is full, then replays spilled records, if any.
* The spiller keeps memory bounded: when more than ``memory_limit`` records wait (the database
  is slow, or a write hangs), and at every interval while the database is down, it moves them
  to an append-only file (``billing.usage_spill``), fsync'd per batch, which the flusher
  replays when the database answers again. Nothing is dropped unless the disk refuses too and
  memory reaches ``4 × memory_limit``; then the oldest records go, with an error in the log.

While the database is down the flusher retries with backoff (up to 30 s). At shutdown
(lifespan, or the exit hook for servers without one) what is left is written, or spilled if
the database does not answer within ``STOP_WRITE_SECONDS``. A SIGKILL loses what is in memory:
at most the records of one flush interval (plus one batch being written or spilled at that moment).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from billing.usage_spill import SpillDirectory
from billing.usage_store import DatabaseUnavailable, Record, usage_batch_write
from gateway.database_thread import DatabaseThread

log = logging.getLogger(__name__)

HARD_LIMIT_FACTOR = 4  # memory ceiling, as a multiple of memory_limit, when the disk refuses too
SPILL_CHUNK = 5000  # records per spill-file write (one fsync each)
REPLAY_BATCHES_PER_TICK = 20  # then new records get their turn before the replay goes on
MAX_BACKOFF_SECONDS = 30.0
STOP_WRITE_SECONDS = 10.0  # at shutdown, how long the database may take before the rest is spilled


class UsageSink:
    """Buffer of usage records (plain dicts with UsageRecord field names), its flusher and spiller."""

    def __init__(
        self,
        batch_size: int = 500,
        flush_seconds: float = 1.0,
        *,
        memory_limit: int = 20_000,
        spill: SpillDirectory | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.memory_limit = max(memory_limit, 1)
        self.hard_limit = self.memory_limit * HARD_LIMIT_FACTOR
        self.spill = spill
        self._buffer: deque[Record] = deque()
        self._wakeup: asyncio.Event | None = None
        self._spill_wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._writer = DatabaseThread("usage-writer")  # database work: one thread, one connection
        self._disk: ThreadPoolExecutor | None = None  # spill-file writes
        self._write_lock = threading.Lock()  # one database writer at a time: the flusher or the exit hook
        self.database_down = False
        self._disk_failing = False
        self.written = 0
        self.parked = 0
        self.spilled = 0
        self.replayed = 0
        self.dropped = 0
        self.flush_failures = 0  # flushes that raised (the database down, or a bug): retried later

    def record(self, record: Record) -> None:
        """Queue one record. Never blocks and never raises."""
        buffer = self._buffer
        buffer.append(record)
        waiting = len(buffer)
        if waiting >= self.batch_size and self._wakeup is not None:
            self._wakeup.set()
        if waiting >= self.memory_limit:
            if self._spill_wakeup is not None:
                self._spill_wakeup.set()
            if waiting > self.hard_limit:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        """The last resort: neither the database nor the disk takes records, and memory is full."""
        while len(self._buffer) > self.hard_limit:
            try:
                self._buffer.popleft()
            except IndexError:
                break
            self.dropped += 1
            if self.dropped % 10_000 == 1:
                log.error(
                    "usage buffer full (%d records) and nowhere to put them: dropping the oldest", self.hard_limit
                )

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def stats(self) -> dict[str, Any]:
        return {
            "in_memory": len(self._buffer),
            "database_down": self.database_down,
            "written": self.written,
            "parked": self.parked,
            "spilled": self.spilled,
            "replayed": self.replayed,
            "dropped": self.dropped,
            "flush_failures": self.flush_failures,
        }

    # -- tasks ---------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._tasks and all(not t.done() and t.get_loop() is loop for t in self._tasks):
            return
        self._wakeup = asyncio.Event()
        self._spill_wakeup = asyncio.Event()
        if self._disk is None:
            self._disk = ThreadPoolExecutor(1, thread_name_prefix="usage-spill")
        self._tasks = [loop.create_task(self._run_flusher(), name="usage-flusher")]
        if self.spill is not None:
            self._tasks.append(loop.create_task(self._run_spiller(), name="usage-spiller"))

    async def stop(self) -> None:
        """Stop the tasks and write everything still buffered (to the spill file if the database
        does not answer)."""
        tasks, self._tasks = self._tasks, []
        loop = asyncio.get_running_loop()
        for task in tasks:
            if task.get_loop() is loop:
                while not task.done():  # re-cancel: a cancellation can be swallowed mid-await
                    task.cancel()
                    await asyncio.wait({task}, timeout=0.1)
        try:
            async with asyncio.timeout(STOP_WRITE_SECONDS):
                await self.flush()
        except (DatabaseUnavailable, TimeoutError) as exc:
            log.error("usage database unavailable at shutdown (%r): spilling %d records", exc, self.pending)
            try:
                await self._on_disk(self.spill_sync, 0)
            except OSError as disk_error:
                log.error("could not spill usage records at shutdown: %s", disk_error)
        if self._buffer:
            log.error("lost %d usage records at shutdown: neither the database nor the disk took them", self.pending)
        self._writer.stop()
        disk, self._disk = self._disk, None
        if disk is not None:
            disk.shutdown(wait=False)

    async def flush(self) -> None:
        """Write everything in memory now (in a worker thread). Raises ``DatabaseUnavailable``."""
        while self._buffer:
            if not await self._on_writer(self.flush_sync):
                break

    async def _run_flusher(self) -> None:
        assert self._wakeup is not None and self._spill_wakeup is not None
        loop = asyncio.get_running_loop()
        backoff = self.flush_seconds
        retry_at = 0.0
        while True:
            if self.database_down:
                # Not woken by full batches meanwhile: the spiller keeps memory on disk until then.
                await asyncio.sleep(max(retry_at - loop.time(), 0.0))
                self._wakeup.clear()
            else:
                await _wait(self._wakeup, self.flush_seconds)
            try:
                await self.flush()
                more = await self._on_writer(self.replay_sync, REPLAY_BATCHES_PER_TICK)
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable as exc:
                self.flush_failures += 1
                if not self.database_down:
                    log.error("usage records cannot be written (%s); keeping them on disk, retrying", exc)
                self.database_down = True
                backoff = min(max(backoff, self.flush_seconds) * 2, MAX_BACKOFF_SECONDS)
                retry_at = loop.time() + backoff
                self._spill_wakeup.set()
                continue
            except Exception:
                self.flush_failures += 1
                log.exception("the usage flusher failed; retrying")
                continue
            if self.database_down:
                log.warning("usage records are written again")
                self.database_down = False
            backoff = self.flush_seconds
            if more:
                self._wakeup.set()

    async def _run_spiller(self) -> None:
        assert self._spill_wakeup is not None
        while True:
            await _wait(self._spill_wakeup, self.flush_seconds)
            if self.database_down and self._buffer:
                keep = 0
            elif len(self._buffer) > self.memory_limit:
                keep = self.memory_limit // 2
            else:
                continue
            try:
                await self._on_disk(self.spill_sync, keep)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if not self._disk_failing:
                    log.error("could not spill usage records to %s: %s", self.spill and self.spill.path, exc)
                self._disk_failing = True
                await asyncio.sleep(self.flush_seconds)  # not woken by every record meanwhile
                continue
            except Exception:
                log.exception("the usage spiller failed; retrying")
            if self._disk_failing:
                log.warning("usage records are spilled to disk again")
                self._disk_failing = False

    async def _on_writer(self, function, *args):
        """Run ``function`` on the writer thread."""
        return await self._writer.run(function, *args)

    async def _on_disk(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._disk, function, *args)

    # -- the work (sync, in worker threads) ----------------------------------------------------

    def flush_sync(self) -> int:
        """Write one batch from memory. Returns how many records it took (written or parked);
        on ``DatabaseUnavailable`` the records not written go back to the front first."""
        with self._write_lock:
            batch = self._take(self.batch_size)
            if not batch:
                return 0
            try:
                outcome = usage_batch_write(batch)
            except DatabaseUnavailable as exc:
                self._buffer.extendleft(reversed(exc.unwritten))
                raise
            self.written += outcome.written
            self.parked += outcome.parked
            return len(batch)

    def spill_sync(self, keep: int) -> int:
        """Move records from memory to the spill file until at most ``keep`` are left; returns how
        many moved. If the disk refuses (``OSError``), the records not moved stay in memory."""
        if self.spill is None:
            return 0
        moved = 0
        while len(self._buffer) > keep:
            chunk = self._take(min(len(self._buffer) - keep, SPILL_CHUNK))
            if not chunk:
                break
            try:
                self.spill.append(chunk)
            except OSError:
                self._buffer.extendleft(reversed(chunk))
                self._drop_oldest()
                self.spilled += moved
                raise
            moved += len(chunk)
        self.spilled += moved
        return moved

    def replay_sync(self, max_batches: int) -> bool:
        """Write up to ``max_batches`` batches of spilled records; True if more are left."""
        if self.spill is None:
            return False
        with self._write_lock:
            replayed, more = self.spill.replay(self._write_replayed, self.batch_size, max_batches)
        if replayed:
            log.info("replayed %d spilled usage records", replayed)
        return more

    def _write_replayed(self, records: list[Record]) -> None:
        outcome = usage_batch_write(records)
        self.written += outcome.written
        self.parked += outcome.parked
        self.replayed += outcome.written + outcome.parked

    def _take(self, count: int) -> list[Record]:
        taken: list[Record] = []
        popleft = self._buffer.popleft
        try:
            while len(taken) < count:
                taken.append(popleft())
        except IndexError:  # emptied meanwhile by the other task's thread
            pass
        return taken

    def flush_at_exit(self) -> None:
        """Last chance at interpreter exit (servers without an ASGI lifespan, such as daphne)."""
        try:
            while self.flush_sync():
                pass
        except DatabaseUnavailable:
            try:
                self.spill_sync(0)
            except OSError as disk_error:
                log.error("could not spill usage records at exit: %s", disk_error)
        except Exception:
            log.exception("the usage flush at exit failed")
        if self._buffer:
            log.error("lost %d usage records at exit: neither the database nor the disk took them", self.pending)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout)
    event.clear()


def database_tag() -> str:
    """A short name for the database records are written to (for the spill files' names)."""
    from django.db import connections

    db = connections["default"].settings_dict
    identity = "|".join(str(db.get(k) or "") for k in ("ENGINE", "HOST", "PORT", "NAME"))
    return hashlib.sha256(identity.encode()).hexdigest()[:10]


_sink: UsageSink | None = None


def get_sink() -> UsageSink:
    """The process's sink, created on first use from the settings."""
    global _sink
    if _sink is None:
        from django.conf import settings

        g = settings.GATEWAY
        _sink = UsageSink(
            g["USAGE_BATCH_SIZE"],
            g["USAGE_FLUSH_SECONDS"],
            memory_limit=g["USAGE_MEMORY_RECORDS"],
            spill=SpillDirectory(Path(g["USAGE_SPILL_DIR"]), database_tag),
        )
        atexit.register(_sink.flush_at_exit)
    return _sink


def record_usage(record: Record) -> None:
    """Hand one usage record to the process's sink (non-blocking)."""
    get_sink().record(record)
