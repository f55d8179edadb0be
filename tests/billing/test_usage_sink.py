"""The usage sink: batched, idempotent on request id, nothing lost while the database is down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billing import usage_sink
from billing.models import UsageRecord
from billing.usage_sink import UsageSink


def record(request_id: str, key=None, **fields) -> dict:
    base = {
        "request_id": request_id,
        "tenant_id": key.tenant_id if key else None,
        "key_id": key.id if key else None,
        "deployment_id": None,
        "deployment_name": "east/gpt4o",
        "model": "gpt-4o",
        "route": "chat",
        "status": 200,
        "outcome": "ok",
        "error_code": "",
        "prompt_tokens": 12,
        "cached_tokens": 2,
        "completion_tokens": 30,
        "tokens_estimated": False,
        "cost": Decimal("0.00031250"),
        "latency_ms": 12.5,
        "ttft_ms": None,
        "streamed": False,
        "priority": 5,
        "queue_wait_ms": 0.0,
        "retries": 0,
        "client_ip": "10.1.2.3",
        "started_at": datetime(2026, 11, 25, 12, 0, tzinfo=UTC),
    }
    return {**base, **fields}


@pytest.mark.django_db(transaction=True)  # the sink manages its own connection, as in production
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


@pytest.mark.django_db(transaction=True)  # the sink manages its own connection, as in production
def test_a_request_id_written_twice_is_stored_once():
    sink = UsageSink(batch_size=10)
    sink.record(record("same"))
    sink.record(record("same", status=500))
    sink.flush_sync()
    sink.record(record("same"))
    sink.flush_sync()
    assert UsageRecord.objects.filter(request_id="same").count() == 1


@pytest.mark.django_db(transaction=True)  # the sink manages its own connection, as in production
def test_records_wait_in_the_buffer_while_the_database_fails(monkeypatch):
    sink = UsageSink(batch_size=2)
    for i in range(3):
        sink.record(record(f"r{i}"))

    def down(batch):
        raise RuntimeError("database unavailable")

    monkeypatch.setattr(usage_sink, "write_batch", down)
    with pytest.raises(RuntimeError):
        sink.flush_sync()
    assert sink.pending == 3
    monkeypatch.undo()
    while sink.flush_sync():
        pass
    assert UsageRecord.objects.count() == 3 and sink.pending == 0


@pytest.mark.django_db(transaction=True)  # the sink manages its own connection, as in production
def test_batches_are_capped_at_the_batch_size():
    sink = UsageSink(batch_size=2)
    for i in range(5):
        sink.record(record(f"r{i}", started_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)))
    assert [sink.flush_sync(), sink.flush_sync(), sink.flush_sync(), sink.flush_sync()] == [2, 2, 1, 0]
