"""A real Celery worker and beat, on Redis, roll records up and freeze last month's statement."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings

from billing.models import Rollup, Statement
from billing.periods import month_start
from tests.billing.usage import insert, raw_totals, rollup_totals, usage
from tests.e2e.servers import ROOT, database_url_for_children

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def celery(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "gateway.celery", *args, "--loglevel", "info"],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_a_celery_worker_and_beat_roll_up_records_and_freeze_last_months_statement(
    key_a, standard_deployment, tmp_path
):
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL) for Celery's broker")
    this_month = month_start(datetime.now(UTC))
    last_month = month_start(this_month - timedelta(days=1))
    insert(
        usage(last_month + timedelta(days=3), key=key_a.key, deployment=standard_deployment, cost=Decimal("0.5")),
        usage(last_month + timedelta(days=9), key=key_a.key, deployment=standard_deployment, cost=Decimal("0.25")),
        usage(datetime.now(UTC) - timedelta(minutes=2), key=key_a.key, deployment=standard_deployment),
    )
    queue = f"test-billing-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "gateway.settings",
        "DATABASE_URL": database_url_for_children(),
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.REDIS_URL,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "GATEWAY_ROLLUP_SECONDS": "1",
        "GATEWAY_STATEMENT_GRACE_HOURS": "0",
    }
    worker = celery(
        ["worker", "--pool", "solo", "--without-gossip", "--without-mingle", "-n", f"{queue}@%h"],
        env,
        tmp_path / "worker.log",
    )
    beat = celery(["beat", "--schedule", str(tmp_path / "beat-schedule")], env, tmp_path / "beat.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (
                Statement.objects.filter(month=last_month.date(), status="final").exists()
                and rollup_totals(Rollup.Granularity.MONTH) == raw_totals()
            ):
                break
            assert worker.poll() is None and beat.poll() is None, "a Celery process exited"
            time.sleep(0.5)
    finally:
        for process in (beat, worker):
            process.terminate()
        for process in (beat, worker):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        _drop_queue(queue)
    logs = "\n".join(f"--- {name}\n{(tmp_path / name).read_text()[-3000:]}" for name in ("worker.log", "beat.log"))
    statement = Statement.objects.filter(month=last_month.date()).first()
    assert statement is not None and statement.status == "final", logs
    assert (statement.requests, statement.payg_cost) == (2, Decimal("0.75"))
    for granularity in (Rollup.Granularity.HOUR, Rollup.Granularity.DAY, Rollup.Granularity.MONTH):
        assert rollup_totals(granularity) == raw_totals(), logs
    assert "billing.usage_rollup" in (tmp_path / "worker.log").read_text()


def _drop_queue(queue: str) -> None:
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.delete(queue, f"_kombu.binding.{queue}")
    finally:
        client.close()
