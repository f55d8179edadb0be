"""Saturation (issue 4): offered load above two deployments' combined limits, with priorities.

Two standard deployments of one model have the same small RPM/TPM limits in the simulated
upstream and in the gateway, with the same short "minute" on both sides. An open-loop load at
``overload`` times the combined request capacity comes from two tenants, half of it priority 0
and half priority 9 (the body's ``priority`` field). The gateway should queue rather than fail,
serve priority 0 first, keep the upstream within its limits and use the capacity it has.

Measured:

* the upstream's view (``GET /_sim/stats``): requests, 429s, peak use of each window;
* the clients' view (the generator): statuses and latency by priority and by tenant;
* the gateway's view (its usage records, read from the bench's SQLite file after the gateway
  has stopped and flushed): queue wait by priority, outcomes and error codes;
* the share of combined capacity used: requests (and counted tokens) the upstream served
  inside the offered-load window, over what the limits allow in that time, from stats
  sampled every half second and interpolated at the window's edges;
* what the gateway learned (issue 18, its staff status API): per deployment the calibration
  factor (the upstream's charge per token reserved) and the request windows' measured guard.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from contextlib import closing
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from tests.bench.driver import Request, run_load
from tests.bench.procs import ProcessGroup
from tests.bench.scenarios import Pinning, chat_body
from tests.bench.stack import BenchEnv, start_gateway
from tests.bench.stats import summarize

SAT_MODEL = "bench-sat"
SAT_DEPLOYMENTS = ("sat-a", "sat-b")
PRIORITIES = (0, 9)


@dataclass(frozen=True)
class SaturationConfig:
    rpm: int = 600
    tpm: int = 20_000
    minute_seconds: float = 10.0
    duration: float = 20.0
    overload: float = 1.5  # offered requests per second / combined request capacity
    queue_timeout: float = 15.0
    queue_max_depth: int = 1000  # the gateway's default, set explicitly so the report can say it

    @property
    def capacity_rps(self) -> float:
        """Combined requests per second the limits allow."""
        return len(SAT_DEPLOYMENTS) * self.rpm / self.minute_seconds

    @property
    def capacity_tps(self) -> float:
        """Combined (counted) tokens per second the limits allow."""
        return len(SAT_DEPLOYMENTS) * self.tpm / self.minute_seconds

    def simulator_deployments(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "model": "gpt-4o", "rpm": self.rpm, "tpm": self.tpm, "completion_tokens": 16}
            for name in SAT_DEPLOYMENTS
        ]

    def gateway_deployments(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "model": SAT_MODEL,
                "rpm": self.rpm,
                "tpm": self.tpm,
                "tier": 1,
                "sku": "standard",
                "upstream_model": "gpt-4o",
            }
            for name in SAT_DEPLOYMENTS
        ]

    def gateway_env(self) -> dict[str, str]:
        return {
            "GATEWAY_WINDOW_MINUTE_SECONDS": str(self.minute_seconds),
            "GATEWAY_QUEUE_TIMEOUT_SECONDS": str(self.queue_timeout),
            "GATEWAY_QUEUE_MAX_DEPTH": str(self.queue_max_depth),
        }


class StatsSampler:
    """Polls the simulator's counters in a thread, with monotonic timestamps."""

    def __init__(self, sim_url: str, interval: float = 0.5) -> None:
        self.client = httpx.Client(base_url=sim_url, trust_env=False, timeout=5.0)
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, served, tokens_counted)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-stats-sampler", daemon=True)

    def __enter__(self) -> StatsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        try:
            stats = self.client.get("/_sim/stats").json()["deployments"]
        except httpx.HTTPError:
            return
        now = time.monotonic()
        served = sum(stats[name]["served"] for name in SAT_DEPLOYMENTS)
        tokens = sum(stats[name]["tokens_counted"] for name in SAT_DEPLOYMENTS)
        self.samples.append((now, served, tokens))

    def at(self, moment: float, column: int) -> float:
        """A counter's value at ``moment``, linearly interpolated between samples."""
        samples = self.samples
        if not samples:
            return 0.0
        if moment <= samples[0][0]:
            return float(samples[0][column])
        for before, after in itertools.pairwise(samples):
            if before[0] <= moment <= after[0]:
                share = (moment - before[0]) / (after[0] - before[0]) if after[0] > before[0] else 0.0
                return before[column] + (after[column] - before[column]) * share
        return float(samples[-1][column])


def requests_for(keys: dict[str, str]) -> list[Request]:
    """Two tenants x two priorities, used in turn: half priority 0, half priority 9."""
    return [
        Request(
            "/v1/chat/completions",
            {"authorization": f"Bearer {keys[f'{tenant}/app']}"},
            chat_body(SAT_MODEL, priority=priority),
            {"priority": str(priority), "tenant": tenant},
        )
        for priority in PRIORITIES
        for tenant in ("bench-a", "bench-b")
    ]


def run_saturation(
    group: ProcessGroup,
    env: BenchEnv,
    sim_url: str,
    keys: dict[str, str],
    pinning: Pinning,
    config: SaturationConfig,
    *,
    label: str = "gateway-saturation",
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a gateway with short windows, overload it for ``config.duration`` seconds, and measure.

    The upstream's counters and windows are reset first, so both sides start from empty windows.
    """
    gateway = start_gateway(
        group, env, "uvicorn", pinning.gateway, name=label, extra_env=config.gateway_env() | (extra_env or {})
    )
    since = _db_max_id(env)
    httpx.post(sim_url + "/_sim/reset", trust_env=False, timeout=5.0).raise_for_status()
    try:
        with StatsSampler(sim_url) as sampler:
            load = run_load(
                gateway.url,
                requests_for(keys),
                cpus=pinning.load,
                rate=config.overload * config.capacity_rps,
                duration=config.duration,
                max_connections=4000,
                drain=config.queue_timeout + 10.0,
            )
            sampler.sample()
        upstream = httpx.get(sim_url + "/_sim/stats", trust_env=False, timeout=5.0).json()["deployments"]
        learned = _learned(gateway.url, env.staff_session())
    finally:
        group.stop(gateway.child)
    records = _usage_records(env, since)
    return {
        "config": asdict(config)
        | {
            "capacity_rps": config.capacity_rps,
            "capacity_tps": config.capacity_tps,
            "offered_rps": config.overload * config.capacity_rps,
        },
        "client": _client_view(load),
        "upstream": _upstream_view(upstream, config),
        "capacity_used": _capacity_used(sampler, load, config),
        "learned": learned,
        "gateway": _gateway_view(records),
        "gateway_exit_code": gateway.child.process.returncode,
        "log_lines": len(gateway.child.log_tail(10**9).splitlines()),
        "log_errors": gateway.child.log_tail(60).splitlines(),
    }


# --- views ----------------------------------------------------------------------------------------


def _client_view(load: dict[str, Any]) -> dict[str, Any]:
    return {
        "sent": load["overall"]["requests"],
        "status": load["overall"]["status"],
        "unfinished": load["unfinished"],
        "transport_errors": load["errors"],
        "generator_cpu_percent": load["cpu_percent"],
        "by_priority": {
            p: {"status": v["status"], "latency_ms": v["latency_ms"], "latency_ok_ms": v["latency_ok_ms"]}
            for p, v in load["by_tag"].get("priority", {}).items()
        },
        "by_tenant": {
            t: {"status": v["status"], "latency_ms": v["latency_ms"], "latency_ok_ms": v["latency_ok_ms"]}
            for t, v in load["by_tag"].get("tenant", {}).items()
        },
        "window_s": load["window_s"],
    }


def _upstream_view(stats: dict[str, Any], config: SaturationConfig) -> dict[str, Any]:
    view = {}
    for name in SAT_DEPLOYMENTS:
        s = stats[name]
        view[name] = {
            "requests": s["requests"],
            "served": s["served"],
            "rate_limited_429": s["rate_limited"],
            "by_status": s["by_status"],
            "tokens_counted": s["tokens_counted"],
            "peak_requests_in_window": s["max_requests_in_window"],
            "peak_tokens_in_window": s["max_tokens_in_window"],
            "limits": {"rpm": config.rpm, "tpm": config.tpm, "minute_seconds": config.minute_seconds},
        }
    view["total_429"] = sum(stats[name]["rate_limited"] for name in SAT_DEPLOYMENTS)
    view["total_served"] = sum(stats[name]["served"] for name in SAT_DEPLOYMENTS)
    return view


def _learned(gateway_url: str, session: str) -> dict[str, Any]:
    """What the gateway learned per deployment (issue 18): the calibration factor (the upstream's
    charge per token reserved) and the request windows' guard, from the staff status API."""
    try:
        rows = httpx.get(
            gateway_url + "/api/status/deployments", cookies={"sessionid": session}, trust_env=False, timeout=5.0
        ).json()["deployments"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    return {
        r["name"]: {"calibration": r.get("calibration"), "window_guard": r.get("window_guard")}
        for r in rows
        if r["name"] in SAT_DEPLOYMENTS
    }


def _capacity_used(sampler: StatsSampler, load: dict[str, Any], config: SaturationConfig) -> dict[str, Any]:
    start, end = load["window_start_monotonic"], load["window_end_monotonic"]
    seconds = end - start
    served = sampler.at(end, 1) - sampler.at(start, 1)
    tokens = sampler.at(end, 2) - sampler.at(start, 2)
    allowed_requests = config.capacity_rps * seconds
    allowed_tokens = config.capacity_tps * seconds
    return {
        "window_s": seconds,
        "served_requests": served,
        "allowed_requests": allowed_requests,
        "request_share_percent": 100.0 * served / allowed_requests if allowed_requests else None,
        "counted_tokens": tokens,
        "allowed_tokens": allowed_tokens,
        "token_share_percent": 100.0 * tokens / allowed_tokens if allowed_tokens else None,
    }


def _gateway_view(records: list[sqlite3.Row]) -> dict[str, Any]:
    by_priority: dict[int, list[float]] = defaultdict(list)
    served_by: dict[str, Counter] = defaultdict(Counter)
    outcomes: Counter = Counter()
    retries = 0
    for row in records:
        outcomes[f"{row['status']} {row['outcome']}{' ' + row['error_code'] if row['error_code'] else ''}"] += 1
        retries += row["retries"]
        if row["status"] == 200:
            by_priority[row["priority"]].append(row["queue_wait_ms"])
            served_by[str(row["priority"])][row["tenant"] or "?"] += 1
    return {
        "records": len(records),
        "outcomes": dict(outcomes.most_common()),
        "retries": retries,
        "queue_wait_ms_by_priority": {str(p): summarize(v) for p, v in sorted(by_priority.items())},
        "served_by_priority_and_tenant": {p: dict(c) for p, c in sorted(served_by.items())},
    }


# --- the bench database ---------------------------------------------------------------------------


def _connect(env: BenchEnv) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{env.db_path}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    return db


def _db_max_id(env: BenchEnv) -> int:
    with closing(_connect(env)) as db:
        return db.execute("SELECT COALESCE(MAX(id), 0) FROM billing_usagerecord").fetchone()[0]


def _usage_records(env: BenchEnv, since: int) -> list[sqlite3.Row]:
    """This run's usage records (the gateway flushed them when it stopped)."""
    with closing(_connect(env)) as db:
        return db.execute(
            "SELECT u.priority, u.status, u.outcome, u.error_code, u.queue_wait_ms, u.retries, "
            "u.deployment_name, t.slug AS tenant FROM billing_usagerecord u "
            "LEFT JOIN tenants_tenant t ON t.id = u.tenant_id WHERE u.id > ? AND u.model = ?",
            (since, SAT_MODEL),
        ).fetchall()
