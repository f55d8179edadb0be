"""The metrics' parts alone: aggregation per process, label values, the sampler, dead processes'
gauges in multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway import snapshot
from gateway.observability.labels import LabelIndex
from gateway.observability.metrics import LATENCY_BUCKETS, GatewayMetrics
from gateway.observability.sampler import ProcessSampler
from gateway.snapshot.types import DeploymentView, EndpointView, KeyView, TenantView
from tests.observability.exposition import Exposition

REPO = Path(__file__).resolve().parents[2]

EAST = EndpointView(id=1, name="east", kind="azure", base_url="http://127.0.0.1:9")
WEST = EndpointView(id=2, name="west", kind="azure", base_url="http://127.0.0.1:9")
# The same deployment name on two endpoints: labels must tell them apart.
DEPLOYMENTS = (
    DeploymentView(id=11, endpoint=EAST, name="chat", model="gpt-4o", tier=1),
    DeploymentView(id=12, endpoint=WEST, name="chat", model="gpt-4o", tier=2),
)
TENANT = TenantView(id=7, slug="team-a", name="Team A")
KEY = KeyView(id=70, tenant=TENANT, name="app", prefix="sk-gw-abcdef")
SNAPSHOT = snapshot.Snapshot(
    version=4,
    keys_by_hash={"hash": KEY},
    deployments_by_model={"gpt-4o": DEPLOYMENTS},
    all_deployments=DEPLOYMENTS,
)


def record(**fields: Any) -> dict[str, Any]:
    base = {
        "request_id": "req_1",
        "tenant_id": 7,
        "key_id": 70,
        "deployment_id": 11,
        "model": "gpt-4o",
        "route": "chat",
        "status": 200,
        "outcome": "ok",
        "error_code": "",
        "prompt_tokens": 10,
        "estimated_prompt_tokens": 9,
        "cached_tokens": 4,
        "completion_tokens": 5,
        "cost": Decimal("0.25"),
        "latency_ms": 120.0,
        "ttft_ms": 30.0,
        "queue_wait_ms": 0.0,
        "retries": 0,
        "streamed": False,
        "priority": 5,
        "client_ip": "10.0.0.1",
    }
    return {**base, **fields}


def test_observations_flushed_together_equal_observations_made_one_by_one():
    values = [0.0, 0.004, 0.01, 0.0100001, 0.3, 2.5, 7.0, 400.0, 0.3]
    aggregated = GatewayMetrics(registry=CollectorRegistry())
    for value in values:
        aggregated._observe(aggregated.latency, ("gpt-4o", "east/chat"), value)
    aggregated.flush()
    registry = CollectorRegistry()
    direct = Histogram(
        "gateway_request_duration_seconds", "x", ("model", "deployment"), buckets=LATENCY_BUCKETS, registry=registry
    )
    for value in values:
        direct.labels("gpt-4o", "east/chat").observe(value)

    def samples(registry: CollectorRegistry) -> list[tuple[str, list, float]]:
        shown = Exposition(generate_latest(registry).decode())
        return sorted(
            (n, sorted(ls.items()), v) for n, ls, v in shown.samples if n.startswith("gateway_request_duration_seconds")
        )

    assert samples(aggregated.registry) == samples(registry)


def test_a_request_is_counted_once_per_series_and_only_after_a_flush():
    metrics = GatewayMetrics(registry=CollectorRegistry())
    index = LabelIndex(SNAPSHOT)
    metrics.request_observe(record(), index)
    metrics.request_observe(record(deployment_id=12, status=502, outcome="upstream_error", prompt_tokens=0), index)
    assert Exposition(generate_latest(metrics.registry).decode()).value("gateway_requests_total") == 0
    metrics.flush()
    shown = Exposition(generate_latest(metrics.registry).decode())
    assert shown.value("gateway_requests_total") == 2
    assert shown.value("gateway_requests_total", deployment="east/chat", status="200", outcome="ok") == 1
    assert shown.value("gateway_requests_total", deployment="west/chat", status="502", outcome="upstream_error") == 1
    assert shown.value("gateway_tokens_total", kind="prompt") == 10
    assert shown.value("gateway_tokens_total", kind="cached") == 4
    assert shown.value("gateway_tokens_total", kind="completion") == 10
    assert shown.value("gateway_cost_total", model="gpt-4o") == 0.5
    assert shown.value("gateway_queue_wait_seconds_count", model="gpt-4o") == 2
    metrics.request_observe(record(status=401, estimated_prompt_tokens=None, deployment_id=None), index)
    metrics.flush()  # refused before the balancer: no queue wait to speak of
    assert Exposition(generate_latest(metrics.registry).decode()).value("gateway_queue_wait_seconds_count") == 2
    metrics.flush()  # nothing new: nothing counted twice
    assert Exposition(generate_latest(metrics.registry).decode()).value("gateway_requests_total") == 3


def test_label_values_come_from_the_configuration_only():
    index = LabelIndex(SNAPSHOT)
    assert index.model("gpt-4o") == "gpt-4o"
    assert index.model("gpt-4o\n{evil}") == "other"
    assert index.model("") == "none"
    assert (index.deployment(11), index.deployment(12)) == ("east/chat", "west/chat")
    assert index.deployment(None) == "none"
    assert index.deployment(99) == "other"
    assert (index.tenant(7), index.key_prefix(70)) == ("team-a", "sk-gw-abcdef")
    assert (index.tenant(None), index.key_prefix(None)) == ("none", "")


def test_the_sampler_turns_the_sinks_totals_into_counters_and_its_state_into_gauges(monkeypatch):
    class Sink:
        stats_now: dict[str, Any] = {
            "in_memory": 12,
            "database_down": True,
            "written": 100,
            "parked": 1,
            "spilled": 30,
            "replayed": 0,
            "dropped": 0,
            "flush_failures": 2,
        }

        def stats(self) -> dict[str, Any]:
            return dict(self.stats_now)

    sink = Sink()
    monkeypatch.setattr("gateway.observability.sampler.get_sink", lambda: sink)
    monkeypatch.setattr(snapshot, "_current", SNAPSHOT)
    metrics = GatewayMetrics(registry=CollectorRegistry())
    sampler = ProcessSampler(metrics)
    sampler.sample(snapshot_checked_at=None)
    sink.stats_now = {**sink.stats_now, "in_memory": 0, "database_down": False, "written": 142, "flush_failures": 3}
    import time

    sampler.sample(snapshot_checked_at=time.time() - 2.0)
    shown = Exposition(generate_latest(metrics.registry).decode())
    assert shown.value("gateway_usage_buffer_records") == 0
    assert shown.value("gateway_usage_database_down") == 0
    assert shown.value("gateway_usage_written_records_total") == 142
    assert shown.value("gateway_usage_flush_failures_total") == 3
    assert shown.value("gateway_usage_parked_records_total") == 1
    assert shown.value("gateway_usage_spilled_records_total") == 30
    assert shown.value("gateway_snapshot_version") == 4
    assert 2.0 <= shown.value("gateway_snapshot_age_seconds") < 3.0


CHILD = """
import os, sys
from prometheus_client import Counter, Gauge
requests = Counter("gateway_requests", "r", ("model",))
requests.labels("gpt-4o").inc(int(sys.argv[1]))
depth = Gauge("gateway_usage_buffer_records", "d", multiprocess_mode="livesum")
depth.set(int(sys.argv[1]))
"""


def test_several_processes_add_up_and_a_dead_ones_gauges_are_dropped(tmp_path):
    """Multiprocess mode (PROMETHEUS_MULTIPROC_DIR): counters of every process, dead or alive, add
    up; live gauges of a process that is gone are no longer reported."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for count in ("3", "4"):  # two processes, both gone once run
        subprocess.run([sys.executable, "-c", CHILD, count], env=env, check=True, cwd=REPO)
    assert len(list(tmp_path.glob("counter_*.db"))) == 2
    code = (
        "from gateway.observability.scrape import _render_multiprocess; import sys; "
        f"sys.stdout.write(_render_multiprocess({str(tmp_path)!r}, []).decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "DJANGO_SETTINGS_MODULE": "gateway.settings"},
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    shown = Exposition(out)
    assert shown.value("gateway_requests_total", model="gpt-4o") == 7
    assert not shown.has("gateway_usage_buffer_records")
    assert not list(tmp_path.glob("gauge_livesum_*.db"))


@pytest.mark.parametrize(("tier", "spilled"), [(1, False), (2, True)])
def test_a_lease_on_a_worse_tier_than_the_best_available_is_a_spill_over(tier, spilled):
    from gateway.observability.dispatch import _spilled_over

    leased = DEPLOYMENTS[tier - 1]
    assert _spilled_over(leased, DEPLOYMENTS, frozenset()) is spilled
    # The better tier was excluded (tried and failed): going to the next is a retry, not a spill-over.
    assert _spilled_over(DEPLOYMENTS[1], DEPLOYMENTS, frozenset({11})) is False
