"""The billing side of the benchmark: roll-up speed, and the dashboards on a month of roll-ups.

``python -m tests.bench dashboards [--hours N] [--records N] [--database-url URL]`` (also a phase
of ``make bench``). In a child process with its own database (a fresh SQLite file unless
``--database-url`` names another):

1. Roll-ups from raw records: ``--records`` usage records over the last day are rolled up
   (first run), rolled up again (nothing new), and once more after 1,000 late records arrive.
2. A month of hourly roll-ups for 50 tenants x 5 models x 3 keys (540,000 hour rows with the
   default ``--hours 720``), from which the days and months are rolled up as in production;
   then the statements.
3. The staff overview and one team page rendered through Django's test client for each period,
   timed (median of 5 after one warm-up) with their query counts.

The child prints one JSON document; the parent prints a table. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TENANTS, MODELS, KEYS = 50, 5, 3
PERIODS = ("24h", "7d", "30d", "month")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench dashboards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=int, default=720, help="hours of synthetic roll-ups (default 720, a month)")
    parser.add_argument("--records", type=int, default=100_000, help="raw usage records rolled up (default 100,000)")
    parser.add_argument("--database-url", help="database to use (default: a fresh SQLite file in a temporary dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.hours, args.records), default=str))
        return 0
    results = run_child(args.hours, args.records, args.database_url)
    print(render(results))
    return 0


def run_child(hours: int, records: int, database_url: str | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Migrate a database and measure in a child process; returns its JSON."""
    with tempfile.TemporaryDirectory(prefix="gateway-bench-dashboards-") as root:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "DATABASE_URL", "REDIS_URL"))}
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "gateway.settings",
                "DATABASE_URL": database_url or f"sqlite:///{root}/dashboards.sqlite3",
                "GATEWAY_VAR_DIR": root,
                "REDIS_URL": "",
                "LOG_LEVEL": "WARNING",
                "DEBUG": "false",
            }
        )

        def run(*args: str) -> str:
            done = subprocess.run(
                [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
            )
            if done.returncode != 0:
                raise RuntimeError(f"python {' '.join(args)} failed:\n{done.stderr[-4000:]}")
            return done.stdout

        run("manage.py", "migrate", "--noinput")
        output = run("-m", "tests.bench.dashboards", "--child", "--hours", str(hours), "--records", str(records))
        return json.loads(output.strip().splitlines()[-1])


# --- in the child ---------------------------------------------------------------------------------


def measure(hours: int, records: int) -> dict[str, Any]:
    import django

    django.setup()
    from django.db import connection

    cast = _cast()
    result: dict[str, Any] = {"database": connection.vendor, "hours": hours}
    result["rollup"] = _rollup_speed(cast, records)
    result["seed"] = _month_of_rollups(cast, hours)
    result["pages"] = _pages(cast)
    return result


def _progress(text: str) -> None:
    print(f"  dashboards: {text}", file=sys.stderr, flush=True)


def _cast() -> dict[str, Any]:
    """50 tenants with 3 keys each and a budget; 5 models on 5 deployments, two of them PTU."""
    from gateway.models import Deployment, Endpoint
    from tenants.models import ClientKey, Quota, Tenant

    endpoint = Endpoint.objects.create(name="dash", base_url="http://127.0.0.1:9")
    deployments = [
        Deployment.objects.create(
            endpoint=endpoint,
            name=f"dep-{m}",
            model=f"model-{m}",
            sku="provisioned" if m < 2 else "standard",
            monthly_fixed_cost=Decimal("10000") if m < 2 else Decimal(0),
            rpm=6000,
            tpm=2_000_000,
        )
        for m in range(MODELS)
    ]
    tenants = Tenant.objects.bulk_create(Tenant(slug=f"dash-{t:02d}", name=f"Team {t:02d}") for t in range(TENANTS))
    Quota.objects.bulk_create(Quota(tenant=t, monthly_cost=Decimal(5000)) for t in tenants)
    keys = ClientKey.objects.bulk_create(
        ClientKey(tenant=t, name=f"app-{k}", prefix=f"sk-d{t.pk}{k}", key_hash=f"{t.pk:032x}{k:032x}")
        for t in tenants
        for k in range(KEYS)
    )
    by_tenant: dict[int, list[Any]] = {}
    for key in keys:
        by_tenant.setdefault(key.tenant_id, []).append(key)
    return {"tenants": tenants, "keys": by_tenant, "deployments": deployments}


def _rollup_speed(cast: dict[str, Any], count: int) -> dict[str, Any]:
    from django.utils import timezone

    from billing.models import Rollup, RollupCursor, UsageRecord
    from billing.rollups import usage_rollup

    rng = random.Random(1)
    now = timezone.now()
    tenants, deployments = cast["tenants"], cast["deployments"]

    def record(i: int, started, recorded=None) -> UsageRecord:
        tenant = tenants[i % TENANTS]
        deployment = deployments[(i // TENANTS) % MODELS]
        return UsageRecord(
            request_id=f"bench-{i}",
            tenant_id=tenant.pk,
            key_id=cast["keys"][tenant.pk][i % KEYS].pk,
            deployment_id=deployment.pk,
            deployment_name=deployment.name,
            model=deployment.model,
            route="chat",
            status=200,
            outcome="ok" if i % 50 else "upstream_error",
            prompt_tokens=rng.randint(10, 4000),
            cached_tokens=rng.randint(0, 10),
            completion_tokens=rng.randint(1, 1000),
            cost=Decimal(rng.randint(1, 10**6)) / 10**8,
            latency_ms=rng.lognormvariate(6.5, 0.7),
            ttft_ms=rng.lognormvariate(5.5, 0.5),
            streamed=True,
            queue_wait_ms=0.0,
            started_at=started,
            # As the sink writes them: a second after the request started (the late ones: now).
            **({"recorded_at": recorded} if recorded is not None else {}),
        )

    _progress(f"inserting {count:,} usage records over the last day")
    for start in range(0, count, 5000):
        moments = [now - timedelta(seconds=rng.uniform(1, 86_400)) for _ in range(start, min(count, start + 5000))]
        UsageRecord.objects.bulk_create(
            record(i, moment, moment + timedelta(seconds=1)) for i, moment in enumerate(moments, start)
        )
    _progress("rolling them up")
    first = usage_rollup()
    again = usage_rollup()
    late = 1000
    UsageRecord.objects.bulk_create(record(count + i, now - timedelta(hours=rng.uniform(1, 23))) for i in range(late))
    after_late = usage_rollup()
    result = {
        "records": count,
        "first_run_s": first.seconds,
        "records_per_s": count / first.seconds if first.seconds else None,
        "rows": first.rows,
        "hours": first.hours,
        "second_run_s": again.seconds,
        "second_run_hours": again.hours,
        "late_records": late,
        "late_run_s": after_late.seconds,
        "late_hours": after_late.hours,
    }
    # The month below is synthetic: start it from nothing.
    Rollup.objects.all().delete()
    UsageRecord.objects.all().delete()
    RollupCursor.objects.all().delete()
    return result


def _month_of_rollups(cast: dict[str, Any], hours: int) -> dict[str, Any]:
    """Hour rows for every tenant x model x key, written directly; days and months rolled up."""
    from django.utils import timezone

    from billing.models import HISTOGRAM_COLUMNS, SUM_COLUMNS
    from billing.periods import day_start, hour_start, month_start
    from billing.rollups import rollup_recompute, rollup_upsert
    from billing.statements import statements_refresh

    rng = random.Random(2)
    stamp = timezone.now()
    last = hour_start(stamp)
    latency, ttft = HISTOGRAM_COLUMNS["latency"], HISTOGRAM_COLUMNS["ttft"]
    started = time.monotonic()
    batch: list[dict[str, Any]] = []
    written = 0
    hour_list = [last - timedelta(hours=h) for h in range(hours)]
    for n, hour in enumerate(hour_list):
        for tenant in cast["tenants"]:
            for m, deployment in enumerate(cast["deployments"]):
                for key in cast["keys"][tenant.pk]:
                    requests = rng.randint(1, 40)
                    failed = rng.randint(0, 2) if requests > 2 else 0
                    prompt, completion = requests * rng.randint(200, 2000), requests * rng.randint(50, 500)
                    row = dict.fromkeys(SUM_COLUMNS, 0)
                    row.update(
                        period_start=hour,
                        tenant_ref=tenant.pk,
                        key_ref=key.pk,
                        key_name=key.name,
                        key_prefix=key.prefix,
                        model=deployment.model,
                        deployment_ref=deployment.pk,
                        deployment_name=deployment.name,
                        endpoint_name="dash",
                        sku=deployment.sku,
                        requests=requests,
                        ok=requests - failed,
                        upstream_error=failed,
                        streamed=requests,
                        prompt_tokens=prompt,
                        completion_tokens=completion,
                        cost=Decimal(prompt * 25 + completion * 100) / 10**7,
                        latency_us_sum=requests * 700_000,
                        ttft_us_sum=requests * 250_000,
                    )
                    row[latency[6 + m % 3]] = requests - 1
                    row[latency[10]] = 1
                    row[ttft[5]] = requests
                    row[HISTOGRAM_COLUMNS["queue_wait"][0]] = requests
                    batch.append(row)
        if len(batch) >= 7500 or n == len(hour_list) - 1:
            rollup_upsert("hour", batch, stamp)
            written += len(batch)
            batch = []
            if n % 48 == 0:
                _progress(f"{written:,} hour rows written")
    seeded = time.monotonic() - started
    _progress("rolling the days and months up from the hours")
    days = {day_start(h) for h in hour_list}
    started = time.monotonic()
    day_rows = rollup_recompute("day", days, stamp)
    month_rows = rollup_recompute("month", {month_start(d) for d in days}, stamp)
    derived = time.monotonic() - started
    started = time.monotonic()
    statements = statements_refresh()
    return {
        "hour_rows": written,
        "seed_s": seeded,
        "day_rows": day_rows,
        "month_rows": month_rows,
        "days_months_s": derived,
        "statements": statements.drafts + statements.frozen,
        "statements_s": time.monotonic() - started,
    }


def _pages(cast: dict[str, Any]) -> dict[str, Any]:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    from tenants.models import Membership

    staff = User.objects.create_superuser("bench-staff", "staff@example.com", "x")
    member = User.objects.create_user("bench-member", password="x")
    team = cast["tenants"][0]
    Membership.objects.create(user=member, tenant=team)
    pages: dict[str, Any] = {}
    for name, user, url in (
        ("overview", staff, reverse("billing-overview")),
        ("team page", member, reverse("team-page", args=[team.slug])),
    ):
        client = Client()
        client.force_login(user)
        for period in PERIODS:
            assert client.get(url, {"period": period}).status_code == 200  # warm-up (templates, connections)
            times = []
            for _ in range(5):
                started = time.perf_counter()
                with CaptureQueriesContext(connection) as queries:
                    response = client.get(url, {"period": period})
                times.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200
            pages[f"{name} {period}"] = {
                "median_ms": statistics.median(times),
                "max_ms": max(times),
                "queries": len(queries),
            }
    return pages


# --- the report -------------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    if not results:
        return ""
    rollup, seed = results["rollup"], results["seed"]
    lines = [
        f"Billing on {results['database']}: roll-ups and dashboards",
        f"  roll-up of {rollup['records']:,} records over a day: {rollup['first_run_s']:.2f} s "
        f"({rollup['records_per_s']:,.0f} records/s, {rollup['hours']} hours, {rollup['rows']:,} rows); "
        f"the next run ({rollup['second_run_hours']} hours in the overlap): {rollup['second_run_s']:.2f} s; after {rollup['late_records']:,} late records "
        f"({rollup['late_hours']} hours recomputed): {rollup['late_run_s']:.2f} s",
        f"  a month of roll-ups ({TENANTS} tenants x {MODELS} models x {KEYS} keys, {results['hours']} hours): "
        f"{seed['hour_rows']:,} hour rows written in {seed['seed_s']:.0f} s; {seed['day_rows']:,} day and "
        f"{seed['month_rows']:,} month rows rolled up from them in {seed['days_months_s']:.1f} s; "
        f"{seed['statements']} statements in {seed['statements_s']:.2f} s",
        "  page                  median ms   max ms   queries",
    ]
    for name, page in results["pages"].items():
        lines.append(f"  {name:<20} {page['median_ms']:>10.0f} {page['max_ms']:>8.0f} {page['queries']:>9}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
