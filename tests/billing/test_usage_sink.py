"""The usage sink: batched, idempotent on request id, nothing lost while the database is down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import OperationalError

from billing import usage_store
from billing.models import ParkedUsageRecord, UsageRecord
from billing.usage_sink import UsageSink
from billing.usage_store import DatabaseUnavailable
from tests.billing.records import usage as record

pytestmark = pytest.mark.django_db(transaction=True)  # the sink manages its own connection, as in production


def test_batch_is_written_with_every_field(key_a):
    sink = UsageSink(batch_size=10)
    sink.record(record("r1", key_a.key, streamed=True, ttft_ms=3.5))
    assert sink.flush_sync() == 1
    row = UsageRecord.objects.get(request_id="r1")
    assert (row.tenant_id, row.key_id, row.cost, row.client_ip, row.ttft_ms, row.streamed) == (
        key_a.key.tenant_id,
        key_a.key.id,
        Decimal("0.00031250"),
        "10.1.2.3",
        3.5,
        True,
    )
    assert row.started_at == datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    key_a.key.refresh_from_db()
    assert key_a.key.last_used_at == row.started_at


def test_a_request_id_written_twice_is_stored_once():
    sink = UsageSink(batch_size=10)
    sink.record(record("same"))
    sink.record(record("same", status=500))
    sink.flush_sync()
    sink.record(record("same"))
    sink.flush_sync()
    assert UsageRecord.objects.filter(request_id="same").count() == 1


def test_records_wait_in_the_buffer_while_the_database_is_unreachable(monkeypatch):
    sink = UsageSink(batch_size=2)
    for i in range(3):
        sink.record(record(f"r{i}"))

    def down(*args):
        raise OperationalError("connection refused")

    monkeypatch.setattr(usage_store, "_insert", down)
    with pytest.raises(DatabaseUnavailable):
        sink.flush_sync()
    assert sink.pending == 3
    assert ParkedUsageRecord.objects.count() == 0, "an outage is not the records' fault"
    monkeypatch.undo()
    while sink.flush_sync():
        pass
    assert UsageRecord.objects.count() == 3 and sink.pending == 0


def test_batches_are_capped_at_the_batch_size():
    sink = UsageSink(batch_size=2)
    for i in range(5):
        sink.record(record(f"r{i}", started_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)))
    assert [sink.flush_sync(), sink.flush_sync(), sink.flush_sync(), sink.flush_sync()] == [2, 2, 1, 0]
