"""A record the database refuses is parked with its error; it never holds back the others."""

from __future__ import annotations

import logging

import pytest
from django.db import OperationalError, connection

from billing import usage_store
from billing.models import ParkedUsageRecord, UsageRecord
from billing.usage_sink import UsageSink
from billing.usage_store import DatabaseUnavailable, usage_batch_write
from tenants.models import ClientKey, Tenant
from tenants.services import key_issue
from tests.billing.records import usage

pytestmark = pytest.mark.django_db(transaction=True)  # the sink manages its own connection, as in production


def stored() -> set[str]:
    return set(UsageRecord.objects.values_list("request_id", flat=True))


def test_a_refused_record_is_parked_and_the_rest_of_its_batch_is_written(caplog):
    sink = UsageSink(batch_size=50)
    for i in range(20):
        # Negative tokens break a CHECK constraint on PostgreSQL and SQLite alike.
        sink.record(usage(f"r{i}", prompt_tokens=-1 if i == 7 else 10))
    with caplog.at_level(logging.ERROR, logger="billing.usage_store"):
        assert sink.flush_sync() == 20

    assert stored() == {f"r{i}" for i in range(20)} - {"r7"}
    parked = ParkedUsageRecord.objects.get()
    assert parked.request_id == "r7" and parked.record["prompt_tokens"] == -1
    assert "IntegrityError" in parked.error and parked.first_seen is not None
    assert [r.getMessage() for r in caplog.records if "r7" in r.getMessage()] == [
        f"usage record r7 refused by the database, parked: {parked.error}"
    ]
    assert (sink.written, sink.parked, sink.pending) == (19, 1, 0)


def test_every_refused_record_of_a_batch_is_found():
    batch = [usage(f"r{i}", completion_tokens=-5 if i in (0, 13, 49) else 1) for i in range(50)]
    outcome = usage_batch_write(batch)
    assert (outcome.written, outcome.parked) == (47, 3)
    assert set(ParkedUsageRecord.objects.values_list("request_id", flat=True)) == {"r0", "r13", "r49"}
    assert len(stored()) == 47


def test_records_of_a_key_and_tenant_deleted_before_the_flush_are_still_written():
    tenant = Tenant.objects.create(slug="gone", name="Gone soon")
    key = key_issue(tenant, name="short-lived").key
    sink = UsageSink(batch_size=10)
    sink.record(usage("of-a-deleted-key", key))
    # No record of them is stored yet, so nothing protects them from deletion.
    key_id, tenant_id = key.id, tenant.id
    ClientKey.objects.filter(pk=key_id).delete()
    Tenant.objects.filter(pk=tenant_id).delete()

    assert sink.flush_sync() == 1
    row = UsageRecord.objects.get(request_id="of-a-deleted-key")
    assert (row.key_id, row.tenant_id) == (key_id, tenant_id)
    assert ParkedUsageRecord.objects.count() == 0


def test_a_key_with_stored_records_still_cannot_be_deleted(key_a):
    from django.db.models import ProtectedError

    usage_batch_write([usage("kept", key_a.key)])
    with pytest.raises(ProtectedError):
        key_a.key.delete()


@pytest.mark.parametrize(
    ("address", "stored_as"),
    [
        ("1.2.3", None),  # PostgreSQL's inet refuses it
        ("not an address", None),
        ("/run/gateway.sock", None),
        ("", None),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("192.0.2.7", "192.0.2.7"),
    ],
)
def test_a_client_address_is_validated_before_it_is_recorded(address, stored_as):
    usage_batch_write([usage("r", client_ip=address)])
    assert UsageRecord.objects.get(request_id="r").client_ip == stored_as
    assert ParkedUsageRecord.objects.count() == 0


def test_text_the_database_would_refuse_is_cleaned_not_parked():
    usage_batch_write([usage("r", model="gpt\x00-4o" + "x" * 400, deployment_name="d" * 500, error_code="e" * 300)])
    row = UsageRecord.objects.get(request_id="r")
    assert row.model == ("gpt-4o" + "x" * 400)[:200]
    assert len(row.deployment_name) == 300 and len(row.error_code) == 100


def test_a_value_of_the_wrong_type_parks_only_its_record():
    outcome = usage_batch_write([usage("good"), usage("bad", prompt_tokens="many"), usage("late", started_at="soon")])
    assert stored() == {"good"}
    assert (outcome.written, outcome.parked) == (1, 2)
    errors = dict(ParkedUsageRecord.objects.values_list("request_id", "error"))
    assert errors["bad"].startswith("ValueError") and errors["late"].startswith("ValueError")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite stores any integer in any integer column")
def test_a_number_out_of_its_column_range_is_parked_on_postgresql():
    outcome = usage_batch_write([usage("ok"), usage("huge", status=70_000)])
    assert (outcome.written, outcome.parked) == (1, 1)
    assert "DataError" in ParkedUsageRecord.objects.get(request_id="huge").error


def test_an_unreachable_database_parks_nothing_and_hands_every_record_back(monkeypatch):
    def down(*args):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(usage_store, "_insert", down)
    batch = [usage("a"), usage("b", prompt_tokens=-1), usage("c")]
    with pytest.raises(DatabaseUnavailable) as failure:
        usage_batch_write(batch)
    assert [r["request_id"] for r in failure.value.unwritten] == ["a", "b", "c"]
    assert ParkedUsageRecord.objects.count() == 0


def test_an_outage_during_a_split_hands_back_only_what_was_not_written(monkeypatch):
    real_insert = usage_store._insert
    calls = []

    def insert_then_fail(connection, sql, chunk):
        calls.append(len(chunk))
        if len(calls) == 3:  # whole batch refused, first half written, then the database goes away
            raise OperationalError("terminating connection due to administrator command")
        return real_insert(connection, sql, chunk)

    monkeypatch.setattr(usage_store, "_insert", insert_then_fail)
    batch = [usage(f"r{i}", prompt_tokens=-1 if i == 3 else 1) for i in range(4)]
    with pytest.raises(DatabaseUnavailable) as failure:
        usage_batch_write(batch)
    assert stored() == {"r0", "r1"}
    assert {r["request_id"] for r in failure.value.unwritten} == {"r2", "r3"}


def test_parking_the_same_record_twice_keeps_one_row():
    bad = usage("twice", prompt_tokens=-1)
    usage_batch_write([bad])
    usage_batch_write([bad])  # a spill file replayed again after a crash
    assert ParkedUsageRecord.objects.filter(request_id="twice").count() == 1


def test_a_record_without_a_start_time_is_parked_even_with_a_key(key_a):
    incomplete = usage("no-start", key_a.key)
    del incomplete["started_at"]
    outcome = usage_batch_write([usage("fine", key_a.key), incomplete])
    assert (outcome.written, outcome.parked) == (1, 1)
    assert "IntegrityError" in ParkedUsageRecord.objects.get(request_id="no-start").error
