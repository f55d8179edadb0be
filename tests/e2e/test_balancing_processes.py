"""Two gateway processes sharing one Redis keep a shared upstream within its limits.

Each ``ProcessGateway`` is its own OS process (uvicorn) on the test database and the Redis of
REDIS_URL, with a unique balancer key prefix for this test. Without Redis the balancer's state is
per process and nothing is shared, so the test is skipped then.
"""

from __future__ import annotations

import pytest
from django.conf import settings

from tests.e2e.balancing import (
    MINUTE,
    PROMPT_TOKENS,
    Shot,
    assert_within_limits,
    chat_body,
    failures,
    median,
    run_load,
)
from tests.e2e.usage import wait_for_records

pytestmark = pytest.mark.django_db(transaction=True)

RPM, TPM = 120, 12_000
PAIR = ["std-a", "std-b"]


@pytest.fixture(params=["redis", "cluster"])
def shared_redis(request) -> str:
    """The Redis the gateway processes share: REDIS_URL's, or the local three-node Redis Cluster
    (``tests/redis_cluster.py``; the model's queue and its deployments in one slot)."""
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster").url
    if not settings.REDIS_URL:
        pytest.skip(
            "REDIS_URL is not set: gateway processes share the balancer's windows and queue only through "
            "Redis; with the in-process state each process would balance alone, so there is nothing shared to test"
        )
    return settings.REDIS_URL


def test_two_processes_sharing_redis_keep_the_upstream_within_its_limits(
    start_sim, deploy, tenant_key, start_process_gateway, balancer_prefix, shared_redis
):
    """60 requests of 300 tokens to each process, within 0.6 s: 36,000 tokens against 24,000 per
    minute. Each process alone would see room for 80 requests and send them all in the first
    minute (120 in all: 429s); together they send 80, then the rest as the windows free, and the
    waiters of both processes are served in one order."""
    sim = start_sim([{"name": n, "rpm": RPM, "tpm": TPM} for n in PAIR])
    deploy(sim, [{"name": n, "rpm": RPM, "tpm": TPM} for n in PAIR])
    secret = tenant_key("procs")
    env = {
        "REDIS_URL": shared_redis,
        "GATEWAY_WINDOW_MINUTE_SECONDS": str(MINUTE),
        "GATEWAY_BALANCER_REDIS_PREFIX": balancer_prefix,
        "GATEWAY_QUEUE_TIMEOUT_SECONDS": "30",
        "GATEWAY_SNAPSHOT_POLL_SECONDS": "0.05",
        "GATEWAY_USAGE_FLUSH_SECONDS": "0.05",
        "LOG_LEVEL": "WARNING",
    }
    first, second = start_process_gateway(env), start_process_gateway(env)
    per_process, demand = 60, 300
    # Alternately to each process, 5 ms apart (all within 0.6 s, long before the queue drains).
    urls = {"1": first.url, "2": second.url}
    shots = [
        Shot(i * 0.005, secret, chat_body(demand - PROMPT_TOKENS), tag="12"[i % 2], url=urls["12"[i % 2]])
        for i in range(2 * per_process)
    ]
    results = run_load(shots)

    assert failures(results) == []
    stats = sim.stats()["deployments"]
    for name in PAIR:
        assert stats[name]["rate_limited"] == 0, (name, stats[name])
        assert_within_limits(stats[name], RPM, TPM)
    assert sum(stats[name]["served"] for name in PAIR) == 2 * per_process

    # The first minute's capacity (80 requests) was used, in the order the requests arrived,
    # whichever process they arrived at (one queue across processes, first come first served
    # for one tenant at one priority), so each process had about half of it.
    records = wait_for_records(2 * per_process)
    by_id = {r.request_id: r for r in records}
    t0 = results.wall0
    first_minute = [
        i
        for i, r in enumerate(results)
        if by_id[r.request_id].started_at.timestamp() + by_id[r.request_id].queue_wait_ms / 1000.0 < t0 + MINUTE
    ]
    per_minute = len(PAIR) * TPM // demand
    share = len(first_minute) * demand / (len(PAIR) * TPM)
    assert share >= 0.9, f"the first minute used {share:.1%} of the capacity"
    in_order = sum(1 for i in first_minute if i < per_minute) / len(first_minute)
    assert in_order >= 0.9, f"only {in_order:.0%} of the first minute went to the first {per_minute} arrivals"
    from_first = sum(1 for i in first_minute if results[i].shot.tag == "1") / len(first_minute)
    assert 0.4 <= from_first <= 0.6, f"process 1 had {from_first:.0%} of the first minute"
    m1 = median(r.latency for r in results if r.shot.tag == "1")
    m2 = median(r.latency for r in results if r.shot.tag == "2")
    # And the two deployments shared the load.
    for name in PAIR:
        assert stats[name]["served"] >= 0.4 * 2 * per_process, stats[name]
    print(
        f"\nfirst minute: {share:.1%} of capacity, {from_first:.0%} from process 1, {in_order:.0%} in order; "
        f"median latency {m1:.2f} s / {m2:.2f} s; done at {max(r.done for r in results):.2f} s"
    )
