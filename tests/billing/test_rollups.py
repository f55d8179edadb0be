"""Roll-ups: hour, day and month totals equal the records they summarise, run after run, with
records that arrive late, and without tenants; the purge keeps them."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command

from billing.histograms import percentile
from billing.models import HISTOGRAM_COLUMNS, Rollup, RollupCursor, UsageRecord
from billing.rollups import usage_purge, usage_rollup
from billing.usage_sink import UsageSink
from tests.billing.usage import insert, raw_totals, rollup_rows, rollup_totals, usage

HOUR, DAY, MONTH = Rollup.Granularity.HOUR, Rollup.Granularity.DAY, Rollup.Granularity.MONTH
NOW = datetime.now(UTC)
# What the request path hands the sink: every column but the id and recorded_at.
FIELDS = [f for f in UsageRecord._meta.concrete_fields if not f.primary_key and f.name != "recorded_at"]


@pytest.fixture
def mixed_usage(key_a, key_b, tenant_a, ptu_deployment, standard_deployment):
    """Three days of varied records: two tenants, two deployments, errors, streams, 401s."""
    rng = random.Random(7)
    start = NOW - timedelta(days=3)
    records = []
    for _ in range(400):
        key = rng.choice([key_a.key, key_b.key, None])
        deployment = rng.choice([ptu_deployment, standard_deployment, None]) if key else None
        outcome = rng.choice(["ok", "ok", "ok", "upstream_error", "rate_limited", "client_disconnect"])
        fields = {
            "started_at": start + timedelta(seconds=rng.uniform(0, 3 * 86400)),
            "outcome": outcome if key else "auth_error",
            "status": 200 if outcome == "ok" else 500,
            "prompt_tokens": rng.randint(0, 5000) if key else 0,
            "cached_tokens": rng.randint(0, 100) if key else 0,
            "completion_tokens": rng.randint(0, 2000) if key else 0,
            "cost": Decimal(rng.randint(0, 10**7)) / 10**8 if key else Decimal(0),
            "latency_ms": rng.uniform(1, 90_000),
            "ttft_ms": rng.uniform(1, 5000) if rng.random() < 0.5 else None,
            "streamed": rng.random() < 0.5,
            "queue_wait_ms": rng.choice([0.0, rng.uniform(0, 3000)]),
            "model": rng.choice(["gpt-4o", "gpt-4o-mini"]) if deployment is None else deployment.model,
        }
        records.append(usage(key=key, deployment=deployment, **fields))
    return insert(*records)


def test_rollups_equal_the_records_per_tenant_and_model_after_one_and_two_runs(mixed_usage):
    raw = raw_totals()
    assert {tenant for tenant, _ in raw} >= {0}, "the cast has unauthenticated requests"
    usage_rollup()
    first = rollup_rows()
    for granularity in (HOUR, DAY, MONTH):
        assert rollup_totals(granularity) == raw, granularity
    usage_rollup()
    assert rollup_rows() == first
    usage_rollup(since=NOW - timedelta(days=10))
    assert rollup_rows() == first


def test_outcomes_add_up_to_the_requests_and_histograms_to_what_they_count(mixed_usage):
    usage_rollup()
    for row in Rollup.objects.all():
        outcomes = sum(getattr(row, o) for o in ("ok", "client_error", "auth_error", "forbidden", "rate_limited"))
        outcomes += row.upstream_error + row.upstream_timeout + row.client_disconnect
        assert outcomes == row.requests
        assert sum(getattr(row, c) for c in HISTOGRAM_COLUMNS["queue_wait"]) == row.requests
    hours = Rollup.objects.filter(granularity=HOUR)
    forwarded = UsageRecord.objects.filter(deployment__isnull=False).count()
    assert sum(sum(getattr(r, c) for c in HISTOGRAM_COLUMNS["latency"]) for r in hours) == forwarded
    with_ttft = UsageRecord.objects.filter(ttft_ms__isnull=False).count()
    assert sum(sum(getattr(r, c) for c in HISTOGRAM_COLUMNS["ttft"]) for r in hours) == with_ttft


def test_a_record_arriving_after_its_hour_was_rolled_up_is_counted(key_a, standard_deployment):
    hour = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    insert(usage(hour + timedelta(minutes=10), key=key_a.key, deployment=standard_deployment))
    usage_rollup()
    # Written now (recorded_at = now), started five hours ago, into an hour already rolled up.
    insert(usage(hour + timedelta(minutes=50), key=key_a.key, deployment=standard_deployment, prompt_tokens=7))
    usage_rollup()
    for granularity in (HOUR, DAY, MONTH):
        assert rollup_totals(granularity) == raw_totals()
    row = Rollup.objects.get(granularity=HOUR, period_start=hour)
    assert (row.requests, row.prompt_tokens) == (2, 107)


def test_a_batch_committed_after_a_run_but_stamped_before_it_is_counted(key_a, standard_deployment):
    """A usage transaction that began before a run and committed after it: its recorded_at is older
    than what the run saw, by less than the overlap."""
    insert(usage(NOW - timedelta(hours=2), key=key_a.key, deployment=standard_deployment))
    usage_rollup()
    seen = RollupCursor.objects.get().recorded_through
    insert(
        usage(
            NOW - timedelta(hours=3),
            key=key_a.key,
            deployment=standard_deployment,
            recorded_at=seen - timedelta(seconds=30),
        )
    )
    usage_rollup()
    assert rollup_totals(DAY) == raw_totals()
    assert rollup_totals(MONTH) == raw_totals()


def test_requests_without_a_tenant_are_rolled_up(db):
    insert(*(usage(NOW - timedelta(minutes=5), outcome="auth_error", status=401, prompt_tokens=0) for _ in range(3)))
    usage_rollup()
    row = Rollup.objects.get(granularity=HOUR)
    assert (row.tenant_ref, row.key_ref, row.deployment_ref, row.requests, row.auth_error) == (0, 0, 0, 3, 3)


def test_rows_are_per_key_model_and_deployment_with_their_labels(key_a, ptu_deployment, standard_deployment):
    at = NOW - timedelta(hours=1)
    insert(
        usage(at, key=key_a.key, deployment=ptu_deployment),
        usage(at, key=key_a.key, deployment=standard_deployment),
        usage(at, key=key_a.key, deployment=standard_deployment),
    )
    usage_rollup()
    rows = {r.deployment_ref: r for r in Rollup.objects.filter(granularity=HOUR)}
    assert rows[ptu_deployment.pk].requests == 1 and rows[standard_deployment.pk].requests == 2
    ptu = rows[ptu_deployment.pk]
    assert (ptu.endpoint_name, ptu.deployment_name, ptu.sku) == ("east", "east/gpt4o-ptu", "provisioned")
    assert (ptu.key_ref, ptu.key_name, ptu.key_prefix) == (key_a.key.pk, "app-a", key_a.key.prefix)


def test_percentiles_from_rollups_are_within_a_bucket_of_the_records(key_a, standard_deployment):
    rng = random.Random(3)
    latencies = [rng.lognormvariate(6.5, 0.8) for _ in range(500)]
    insert(
        *(
            usage(NOW - timedelta(hours=1), key=key_a.key, deployment=standard_deployment, latency_ms=v)
            for v in latencies
        )
    )
    usage_rollup()
    row = Rollup.objects.get(granularity=DAY)
    counts = [getattr(row, c) for c in HISTOGRAM_COLUMNS["latency"]]
    ordered = sorted(latencies)
    for q in (0.5, 0.95):
        exact = ordered[int(q * len(ordered)) - 1]
        estimate = percentile(counts, q)
        assert estimate is not None and abs(estimate - exact) / exact < 0.35, (q, exact, estimate)


def test_a_backfill_drops_buckets_whose_records_are_gone(key_a, standard_deployment):
    old = insert(usage(NOW - timedelta(hours=4), key=key_a.key, deployment=standard_deployment))
    insert(usage(NOW - timedelta(hours=1), key=key_a.key, deployment=standard_deployment))
    usage_rollup()
    assert Rollup.objects.filter(granularity=HOUR).count() == 2
    UsageRecord.objects.filter(pk=old[0].pk).delete()
    usage_rollup(since=NOW - timedelta(days=1))
    assert Rollup.objects.filter(granularity=HOUR).count() == 1
    assert rollup_totals(DAY) == raw_totals()


def test_the_purge_deletes_old_rolled_up_records_in_batches_and_keeps_rollups(settings, key_a, standard_deployment):
    settings.GATEWAY = {**settings.GATEWAY, "USAGE_RETENTION_DAYS": 30}
    old = [usage(NOW - timedelta(days=40, minutes=i), key=key_a.key, deployment=standard_deployment) for i in range(25)]
    recent = usage(NOW - timedelta(days=2), key=key_a.key, deployment=standard_deployment)
    insert(*old, recent)
    assert usage_purge() == 0, "nothing is purged before the roll-ups have read it"
    usage_rollup()
    rolled = rollup_totals(MONTH)
    # Stamp the records as written well before the roll-up's overlap window, as they would be.
    UsageRecord.objects.update(recorded_at=NOW - timedelta(days=1))
    RollupCursor.objects.update(recorded_through=NOW)
    assert usage_purge(batch_size=10) == 25
    assert list(UsageRecord.objects.values_list("request_id", flat=True)) == [recent.request_id]
    assert rollup_totals(MONTH) == rolled


def test_records_arriving_past_the_retention_period_leave_the_rollups_alone(settings, key_a, standard_deployment):
    settings.GATEWAY = {**settings.GATEWAY, "USAGE_RETENTION_DAYS": 30}
    insert(usage(NOW - timedelta(days=1), key=key_a.key, deployment=standard_deployment))
    usage_rollup()
    insert(usage(NOW - timedelta(days=31), key=key_a.key, deployment=standard_deployment))
    run = usage_rollup()
    assert len(run.too_old) == 1
    assert not Rollup.objects.filter(period_start__lt=NOW - timedelta(days=30), granularity=HOUR).exists()


def test_the_rollup_command_backfills_and_reports(key_a, standard_deployment, capsys):
    insert(usage(NOW - timedelta(hours=30), key=key_a.key, deployment=standard_deployment))
    call_command("rollup_usage", "--since", (NOW - timedelta(days=2)).isoformat())
    assert "rolled up 1 hour(s), 1 day(s), 1 month(s)" in capsys.readouterr().out
    assert rollup_totals(HOUR) == raw_totals()


@pytest.mark.django_db(transaction=True)  # the sink manages its own connection, as in production
def test_records_the_usage_sink_writes_are_stamped_by_the_database_and_rolled_up(key_a, standard_deployment):
    sink = UsageSink(batch_size=10)
    record = {f.attname: getattr(usage(NOW, key=key_a.key, deployment=standard_deployment), f.attname) for f in FIELDS}
    sink.record(record)
    assert sink.flush_sync() == 1
    row = UsageRecord.objects.get()
    assert abs(row.recorded_at - datetime.now(UTC)) < timedelta(minutes=1)
    usage_rollup()
    assert rollup_totals(HOUR) == raw_totals() and raw_totals()[(key_a.key.tenant_id, "gpt-4o")]["requests"] == 1
