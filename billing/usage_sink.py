"""The usage sink: one record per request, buffered in memory and written in batches.

``record_usage`` only appends to a deque, so the request path never waits on the database. A
flusher task writes batches in a worker thread with ``bulk_create(ignore_conflicts=True)`` on the
unique request id, so a batch written twice (a retry after an error that happened after the
commit) adds nothing. If the database is down the records stay in the buffer and the flusher
retries with backoff; at process exit whatever is left is written synchronously.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import threading
from collections import deque
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async

log = logging.getLogger(__name__)

# A ceiling on the buffer, so a database outage that lasts for hours cannot exhaust memory.
# At a few hundred bytes a record this is a few hundred MB; past it the oldest records are
# dropped with an error in the log, which is the only case in which a record can be lost.
MAX_BUFFERED = 1_000_000


class UsageSink:
    """Buffer of usage records (plain dicts with UsageRecord field names) and its flusher."""

    def __init__(self, batch_size: int = 500, flush_seconds: float = 1.0) -> None:
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self._buffer: deque[dict[str, Any]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()  # one writer at a time: the flusher or the exit hook
        self.written = 0
        self.dropped = 0

    def record(self, record: dict[str, Any]) -> None:
        """Queue one record. Never blocks and never raises."""
        if len(self._buffer) >= MAX_BUFFERED:
            self._buffer.popleft()
            self.dropped += 1
            if self.dropped % 10_000 == 1:
                log.error("usage buffer full (%d records): dropping the oldest", MAX_BUFFERED)
        self._buffer.append(record)
        if self._wakeup is not None and len(self._buffer) >= self.batch_size:
            self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-flusher")

    async def stop(self) -> None:
        """Stop the flusher and write everything still buffered."""
        task, self._task = self._task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            while not task.done():  # re-cancel: a cancellation can be swallowed mid-await
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
        await self.flush()

    async def flush(self) -> None:
        """Write everything buffered now (in a worker thread)."""
        while self._buffer:
            written = await sync_to_async(self.flush_sync, thread_sensitive=False)()
            if not written:
                break

    def flush_sync(self) -> int:
        """Write one batch; on failure put it back at the front. Returns how many were written."""
        with self._lock:
            batch: list[dict[str, Any]] = []
            while self._buffer and len(batch) < self.batch_size:
                batch.append(self._buffer.popleft())
            if not batch:
                return 0
            try:
                write_batch(batch)
            except Exception:
                self._buffer.extendleft(reversed(batch))
                raise
            self.written += len(batch)
            return len(batch)

    async def _run(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None, "start() creates the event before the task"
        backoff = self.flush_seconds
        while True:
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=backoff)
            except TimeoutError:
                pass
            wakeup.clear()
            try:
                await self.flush()
                backoff = self.flush_seconds
            except asyncio.CancelledError:
                raise
            except Exception:
                backoff = min(backoff * 2, 30.0)
                log.exception("could not write %d usage records; retrying in %.1fs", self.pending, backoff)

    def flush_at_exit(self) -> None:
        """Last chance at interpreter exit (servers without an ASGI lifespan, such as daphne)."""
        try:
            while self.flush_sync():
                pass
        except Exception:
            log.exception("lost %d usage records at exit: the database did not answer", self.pending)


def write_batch(batch: list[dict[str, Any]]) -> None:
    """Insert records, skipping request ids already stored, and note when each key was last used.

    One ``INSERT ... ON CONFLICT (request_id) DO NOTHING`` run with ``executemany`` (PostgreSQL
    and SQLite both speak it) rather than ``bulk_create``: building model instances cost about
    four times as much CPU, and this runs in a thread beside the event loop, under the same GIL.
    """
    from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections, transaction

    from tenants.models import ClientKey

    close_old_connections()
    connection = connections[DEFAULT_DB_ALIAS]  # the real object, not the per-access proxy
    sql, columns = _insert_statement(connection)
    rows = [
        [convert(record.get(name)) if convert else record.get(name) for name, convert in columns] for record in batch
    ]
    last_used: dict[int, datetime] = {}
    for record in batch:
        key_id = record.get("key_id")
        if key_id is not None:
            started = record["started_at"]
            if key_id not in last_used or last_used[key_id] < started:
                last_used[key_id] = started
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.executemany(sql, rows)
        # One UPDATE per key per batch (not per request); `last_used_at` is for humans, so a
        # concurrent flush from another process moving it slightly back is acceptable.
        for key_id, when in last_used.items():
            ClientKey.objects.filter(pk=key_id).update(last_used_at=when)


_statements: dict[str, tuple[str, list]] = {}


def _insert_statement(connection) -> tuple[str, list]:
    """The INSERT for every UsageRecord column the request gives, and per column (record key, adapter).

    Records hold plain Python values of the right types already; only decimals, datetimes and
    IP addresses need the backend's adaptation. Doing just that, instead of each field's full
    ``get_db_prep_save``, is what makes a batch cheap.
    """
    cached = _statements.get(connection.vendor)
    if cached is None:
        from django.db import models

        from billing.models import UsageRecord

        ops = connection.ops
        meta = UsageRecord._meta
        # Columns the database fills itself (the id, ``recorded_at``) are left out.
        fields = [f for f in meta.concrete_fields if not f.primary_key and not f.has_db_default()]
        columns = []
        for f in fields:
            convert = None
            if isinstance(f, models.DecimalField):
                convert = functools.partial(_decimal, ops.adapt_decimalfield_value, f.max_digits, f.decimal_places)
            elif isinstance(f, models.DateTimeField):
                convert = ops.adapt_datetimefield_value
            elif isinstance(f, models.GenericIPAddressField):
                convert = ops.adapt_ipaddressfield_value
            columns.append((f.attname, convert))
        quote = ops.quote_name
        names = ", ".join(quote(f.column) for f in fields)
        placeholders = ", ".join(["%s"] * len(fields))
        sql = (
            f"INSERT INTO {quote(meta.db_table)} ({names}) VALUES ({placeholders}) "
            f"ON CONFLICT ({quote(meta.get_field('request_id').column)}) DO NOTHING"
        )
        cached = _statements[connection.vendor] = (sql, columns)
    return cached


def _decimal(adapt, max_digits, decimal_places, value):
    return adapt(value, max_digits, decimal_places)


_sink: UsageSink | None = None


def get_sink() -> UsageSink:
    """The process's sink, created on first use with the settings' batch size and interval."""
    global _sink
    if _sink is None:
        from django.conf import settings

        g = settings.GATEWAY
        _sink = UsageSink(g["USAGE_BATCH_SIZE"], g["USAGE_FLUSH_SECONDS"])
        atexit.register(_sink.flush_at_exit)
    return _sink


def record_usage(record: dict[str, Any]) -> None:
    """Hand one usage record to the process's sink (non-blocking)."""
    get_sink().record(record)
