"""A database outage longer than memory should hold: records go to an append-only file, fsync'd
per batch, and are replayed when the database answers again. Memory stays bounded; nothing is lost."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import time

import pytest
from django.db import OperationalError

from billing import usage_store
from billing.models import UsageRecord
from billing.usage_sink import UsageSink
from billing.usage_spill import SpillDirectory
from tests.billing.records import usage

pytestmark = pytest.mark.django_db(transaction=True)  # the sink manages its own connection, as in production

TAG = "testdb"


def spill_dir(tmp_path) -> SpillDirectory:
    return SpillDirectory(tmp_path, lambda: TAG)


def spilled_lines(tmp_path) -> int:
    return sum(len(path.read_bytes().splitlines()) for path in tmp_path.glob("*.jsonl"))


class Outage:
    """The database refusing connections until ``end()`` (patched below the sink, above the driver)."""

    def __init__(self, monkeypatch) -> None:
        self.down = True
        real = usage_store._insert

        def insert(connection, sql, chunk):
            if self.down:
                raise OperationalError("connection to server failed: Connection refused")
            return real(connection, sql, chunk)

        monkeypatch.setattr(usage_store, "_insert", insert)

    def end(self) -> None:
        self.down = False


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_an_outage_longer_than_memory_holds_spills_to_disk_and_replays_everything(tmp_path, monkeypatch):
    outage = Outage(monkeypatch)
    sink = UsageSink(batch_size=10, flush_seconds=0.05, memory_limit=100, spill=spill_dir(tmp_path))
    sink.start()
    try:
        most_in_memory = 0
        for step in range(100):  # 1,000 records over ~1 s, 10 times what memory may hold
            for i in range(10):
                sink.record(usage(f"r{step}-{i}"))
            most_in_memory = max(most_in_memory, sink.pending)
            await asyncio.sleep(0.01)
        await wait_until(lambda: sink.pending == 0, timeout=5)  # the outage goes on: all on disk
        assert most_in_memory <= sink.hard_limit and sink.dropped == 0
        assert spilled_lines(tmp_path) == 1000
        assert await asyncio.to_thread(UsageRecord.objects.count) == 0

        outage.end()
        await wait_until(lambda: UsageRecord.objects.count() == 1000, timeout=20)  # after the flusher's backoff
        await wait_until(lambda: not list(tmp_path.glob("*.jsonl")))
        assert sink.replayed == 1000 and not sink.database_down
    finally:
        await sink.stop()
    print(f"\nmost records in memory: {most_in_memory} (limit 100, hard limit {sink.hard_limit})")


async def test_a_hung_database_write_does_not_grow_memory_past_its_bound(tmp_path, monkeypatch):
    release = threading.Event()
    real = usage_store._insert

    def hung_insert(connection, sql, chunk):
        release.wait(10)  # a write that waits on a lock or a dead TCP connection
        return real(connection, sql, chunk)

    monkeypatch.setattr(usage_store, "_insert", hung_insert)
    sink = UsageSink(batch_size=10, flush_seconds=0.05, memory_limit=50, spill=spill_dir(tmp_path))
    sink.start()
    try:
        most_in_memory = 0
        for step in range(30):
            for i in range(20):
                sink.record(usage(f"h{step}-{i}"))
            most_in_memory = max(most_in_memory, sink.pending)
            await asyncio.sleep(0.01)
        assert most_in_memory <= sink.hard_limit and sink.dropped == 0
        assert sink.spilled > 0 and sink.pending <= 50
        release.set()
        await wait_until(lambda: UsageRecord.objects.count() == 600)
    finally:
        release.set()
        await sink.stop()


async def test_shutdown_while_the_database_is_down_spills_what_is_left(tmp_path, monkeypatch):
    outage = Outage(monkeypatch)
    sink = UsageSink(batch_size=10, flush_seconds=30, memory_limit=1000, spill=spill_dir(tmp_path))
    sink.start()
    for i in range(25):
        sink.record(usage(f"s{i}"))
    await sink.stop()
    assert sink.pending == 0 and spilled_lines(tmp_path) == 25

    outage.end()  # the next process replays them
    successor = UsageSink(batch_size=10, spill=spill_dir(tmp_path))
    while await asyncio.to_thread(successor.replay_sync, 100):
        pass
    assert await asyncio.to_thread(UsageRecord.objects.count) == 25
    assert not list(tmp_path.glob("*.jsonl"))


def test_spill_files_of_a_process_that_died_are_replayed(tmp_path):
    SpillDirectory(tmp_path, lambda: TAG).append([usage(f"d{i}") for i in range(7)])  # its writer is gone
    sink = UsageSink(batch_size=3, spill=spill_dir(tmp_path))
    assert sink.replay_sync(max_batches=2) is True  # 2 batches of 3, one record left
    assert UsageRecord.objects.count() == 6
    assert sink.replay_sync(max_batches=2) is False
    assert UsageRecord.objects.count() == 7 and not list(tmp_path.glob("*.jsonl"))


def test_a_file_locked_by_its_writer_is_left_alone(tmp_path):
    spill = spill_dir(tmp_path)
    spill.append([usage("busy")])
    [path] = tmp_path.glob("*.jsonl")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer appending, or another process replaying, holds it
        assert UsageSink(spill=spill_dir(tmp_path)).replay_sync(10) is False
        assert UsageRecord.objects.count() == 0 and path.exists()
        spill.append([usage("busy-2")])  # the writer goes on in a new file
        assert len(list(tmp_path.glob("*.jsonl"))) == 2
    finally:
        os.close(fd)
    UsageSink(spill=spill_dir(tmp_path)).replay_sync(10)
    assert UsageRecord.objects.count() == 2


def test_a_torn_last_line_is_skipped_and_the_rest_replayed(tmp_path):
    spill_dir(tmp_path).append([usage("whole-1"), usage("whole-2")])
    [path] = tmp_path.glob("*.jsonl")
    with path.open("ab") as f:
        f.write(json.dumps({"request_id": "torn"}).encode()[:10])  # the writer died mid-line
    UsageSink(spill=spill_dir(tmp_path)).replay_sync(10)
    assert set(UsageRecord.objects.values_list("request_id", flat=True)) == {"whole-1", "whole-2"}


def test_files_meant_for_another_database_are_not_replayed(tmp_path):
    SpillDirectory(tmp_path, lambda: "otherdb").append([usage("elsewhere")])
    assert UsageSink(spill=spill_dir(tmp_path)).replay_sync(10) is False
    assert UsageRecord.objects.count() == 0 and len(list(tmp_path.glob("*.jsonl"))) == 1


def test_a_spilled_record_comes_back_with_its_exact_values(tmp_path, key_a):
    original = usage("exact", key_a.key, ttft_ms=3.25, streamed=True, client_ip="2001:db8::5")
    spill_dir(tmp_path).append([original])
    UsageSink(spill=spill_dir(tmp_path)).replay_sync(10)
    row = UsageRecord.objects.get(request_id="exact")
    assert (row.started_at, row.cost, row.key_id, row.ttft_ms, row.streamed, row.client_ip) == (
        original["started_at"],
        original["cost"],
        key_a.key.id,
        3.25,
        True,
        "2001:db8::5",
    )
