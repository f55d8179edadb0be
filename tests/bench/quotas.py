"""What admission costs: the same gateway process measured with and without quotas.

One uvicorn gateway (in-process state, or Redis with ``--redis``) serves two tenants on the fast
upstream: ``bench-a`` without quotas and ``bench-q`` with a tenant and a key quota (every limit
set, none ever reached). Rounds alternate off, on, on, off, twice (so drift over the run cancels
out), each a c=1 latency run and a c=32 throughput run. The figures, medians over the rounds:
added p50 at c=1 and the c=32 throughput with quotas as a share of without (issue 14's targets:
+0.15 ms, 90 %). On a machine shared with other work, compare the rounds too (in the JSON).
"""

from __future__ import annotations

import statistics
from typing import Any

from tests.bench.driver import run_load
from tests.bench.procs import ProcessGroup
from tests.bench.scenarios import (
    CHAT_MODEL,
    Durations,
    Pinning,
    Target,
    gateway_request,
    log_errors,
    measured_throughput,
    smoke,
    warm_up,
)
from tests.bench.stack import BenchEnv, settle, start_gateway

TARGET_ADDED_P50_MS = 0.15
TARGET_THROUGHPUT_SHARE = 90.0
ROUNDS = ("off", "on", "on", "off") * 2

# Limits high enough that nothing is refused during the bench, so every request pays the whole
# admission and settlement (windows and budgets of the tenant and of the key).
TENANT_QUOTA = {
    "rpm": 1_000_000_000,
    "tpm": 2_000_000_000,
    "daily_tokens": 10**15,
    "monthly_tokens": 10**15,
    "monthly_cost": "9999999999.99",
    "alert_thresholds": [80, 100],
}
KEY_QUOTA = {"rpm": 1_000_000_000, "tpm": 2_000_000_000, "monthly_tokens": 10**15}


def quota_tenants() -> list[dict[str, Any]]:
    """The seed entries: ``bench-q`` with its tenant and key quotas."""
    return [{"slug": "bench-q", "keys": ["app"], "quota": TENANT_QUOTA, "key_quota": KEY_QUOTA}]


def run_quota_comparison(
    group: ProcessGroup,
    env: BenchEnv,
    keys: dict[str, str],
    pinning: Pinning,
    durations: Durations,
    *,
    extra_env: dict[str, str] | None = None,
    label: str = "gateway-quotas",
) -> dict[str, Any]:
    gateway = start_gateway(group, env, "uvicorn", pinning.gateway, extra_env=extra_env, name=label)
    secrets = {"off": keys["bench-a/app"], "on": keys["bench-q/app"]}
    results: dict[str, Any] = {"pid": gateway.pid, "rounds": []}
    try:
        for secret in secrets.values():
            smoke(gateway, secret)
            warm_up(gateway, secret, pinning, durations)
        settle(1.0)
        for quotas in ROUNDS:
            request = gateway_request(secrets[quotas], CHAT_MODEL)
            c1 = run_load(
                gateway.url, [request], cpus=pinning.load, concurrency=1, warmup=0.5, duration=durations.latency
            )
            c32 = measured_throughput(Target(gateway.url, request, request), pinning, durations, gateway.pid)
            results["rounds"].append({"quotas": quotas, "c1": c1, "c32": c32})
        results.update(summarize(results["rounds"]))
    finally:
        group.stop(gateway.child)
        results["log_lines"], results["log_errors"] = log_errors(gateway)
    return results


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def of(quotas: str, run: str, *path: str) -> list[float]:
        values = []
        for r in rounds:
            if r["quotas"] == quotas:
                value: Any = r[run]
                for part in path:
                    value = value[part]
                values.append(float(value))
        return values

    p50_off = statistics.median(of("off", "c1", "overall", "latency_ms", "p50"))
    p50_on = statistics.median(of("on", "c1", "overall", "latency_ms", "p50"))
    rps_off = statistics.median(of("off", "c32", "rps"))
    rps_on = statistics.median(of("on", "c32", "rps"))
    # The gateway's CPU per request under c=32: what its throughput is when it has its core to
    # itself, and much less disturbed than req/s by other work on a shared machine.
    cpu_off = statistics.median(of("off", "c32", "server", "cpu_ms_per_request"))
    cpu_on = statistics.median(of("on", "c32", "server", "cpu_ms_per_request"))
    non_200 = sum(
        count
        for r in rounds
        for run in ("c1", "c32")
        for status, count in (r[run].get("overall", {}).get("status") or {}).items()
        if status != "200"
    )
    return {
        "c1_p50_ms": {"off": p50_off, "on": p50_on, "added": p50_on - p50_off},
        "c32_rps": {"off": rps_off, "on": rps_on, "share_percent": 100.0 * rps_on / rps_off if rps_off else None},
        "c32_cpu_ms_per_request": {
            "off": cpu_off,
            "on": cpu_on,
            "added": cpu_on - cpu_off,
            "throughput_share_percent": 100.0 * cpu_off / cpu_on if cpu_on else None,
        },
        "non_200": non_200,
    }


def quota_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows for the printed table: per backend, the figures and whether the targets are met."""
    rows = []
    for backend, run in (results.get("quotas") or {}).items():
        if not run or "c1_p50_ms" not in run:
            continue
        added, share = run["c1_p50_ms"]["added"], run["c32_rps"]["share_percent"]
        cpu = run["c32_cpu_ms_per_request"]
        cpu_share = cpu["throughput_share_percent"]
        rows.append(
            [
                backend,
                f"{run['c1_p50_ms']['off']:.3f} / {run['c1_p50_ms']['on']:.3f}",
                f"{added:+.3f} ms ({'met' if added <= TARGET_ADDED_P50_MS else 'NOT met'})",
                f"{run['c32_rps']['off']:,.0f} / {run['c32_rps']['on']:,.0f} ({share:.1f} %)",
                f"{cpu['off']:.3f} / {cpu['on']:.3f}",
                f"{cpu_share:.1f} % ({'met' if cpu_share is not None and cpu_share >= TARGET_THROUGHPUT_SHARE else 'NOT met'})",
                str(run["non_200"]),
            ]
        )
    return rows
