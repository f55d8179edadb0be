"""Two gateway processes, one Prometheus view: their series add up (multiprocess files in one
``PROMETHEUS_MULTIPROC_DIR``, as the image runs its workers) and equal the usage records; the
scrape needs the token; and their JSON log lines tell what happened to each request.

The processes share the database (and Redis when ``REDIS_URL`` is set); the upstream is a
simulator process with two deployments, one of which fails once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from tests.e2e.balancing import MODEL, SIM_KEY
from tests.e2e.servers import ProcessGateway
from tests.e2e.usage import wait_for_records
from tests.observability.exposition import Exposition

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "scrape-token-of-the-e2e-test"
REQUESTS_PER_PROCESS = 12


def chat(url: str, secret: str, *, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count to three"}], "max_tokens": 16}
    if stream:
        body |= {"stream": True}
    return httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=30
    )


def scrape(url: str, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{url}/metrics", headers=headers, timeout=10)


def json_lines(path: Path) -> list[dict]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))  # every line of the gateway's own loggers is JSON
    return lines


@pytest.fixture
def two_gateways(tmp_path, start_sim, deploy, tenant_key, balancer_prefix):
    sim = start_sim([{"name": "east-chat"}, {"name": "west-chat"}], minute=60.0)
    deploy(sim, [{"name": "east-chat", "tier": 1}, {"name": "west-chat", "tier": 1}])
    secret = tenant_key("observed")
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "GATEWAY_METRICS_TOKEN": TOKEN,
        "GATEWAY_LOG_FORMAT": "json",
        "GATEWAY_REQUEST_LOG_LEVEL": "INFO",
        "LOG_LEVEL": "INFO",
        "GATEWAY_BALANCER_REDIS_PREFIX": balancer_prefix,
        "GATEWAY_SNAPSHOT_POLL_SECONDS": "0.05",
        "GATEWAY_USAGE_FLUSH_SECONDS": "0.05",
    }
    gateways = [ProcessGateway(env, log_path=tmp_path / f"gateway-{i}.log") for i in (1, 2)]
    try:
        for gateway in gateways:
            gateway.start()
        yield sim, secret, gateways, metrics_dir
    finally:
        for gateway in gateways:
            gateway.stop()


def test_two_processes_are_scraped_as_one_and_their_counters_equal_the_usage_records(two_gateways):
    sim, secret, gateways, metrics_dir = two_gateways
    sim.inject("east-chat", {"kind": "status", "status": 500, "count": 1})
    sim.inject("west-chat", {"kind": "status", "status": 500, "count": 1})
    statuses = []
    for i in range(REQUESTS_PER_PROCESS):
        for gateway in gateways:
            statuses.append(chat(gateway.url, secret, stream=i % 3 == 0).status_code)
    statuses.append(chat(gateways[0].url, "sk-gw-not-a-key").status_code)
    assert statuses.count(200) == 2 * REQUESTS_PER_PROCESS and statuses[-1] == 401
    records = wait_for_records(2 * REQUESTS_PER_PROCESS + 1)

    # Both processes wrote their series there.
    assert len(list(metrics_dir.glob("counter_*.db"))) == 2

    # Anonymous and wrong-token scrapes are refused by either process.
    for gateway in gateways:
        assert scrape(gateway.url, None).status_code == 401
        assert scrape(gateway.url, "not-the-token").status_code == 401

    # Each process writes its counts at most a second after the requests: wait for them.
    deadline = time.monotonic() + 10
    while True:
        shown = Exposition(scrape(gateways[0].url).text)
        if shown.value("gateway_requests_total") >= len(records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    assert shown.value("gateway_requests_total") == len(records)
    by_outcome = Counter((str(r.status), r.outcome) for r in records)
    for (status, outcome), count in by_outcome.items():
        assert shown.value("gateway_requests_total", status=status, outcome=outcome) == count
    assert shown.value("gateway_tokens_total", kind="prompt") == sum(r.prompt_tokens for r in records) > 0
    assert shown.value("gateway_tokens_total", kind="completion") == sum(r.completion_tokens for r in records) > 0
    assert shown.value("gateway_request_duration_seconds_count") == len(records)
    served = [r for r in records if r.status == 200]
    assert shown.value("gateway_time_to_first_token_seconds_count") == len(served)
    # One failed attempt per injected fault (both in the first request), each followed by a retry.
    assert shown.value("gateway_upstream_attempts_total", result="failed") == 2
    assert shown.value("gateway_upstream_retries_total") == 2 == sum(r.retries for r in records)
    # The other process answers for both too.
    other = Exposition(scrape(gateways[1].url).text)
    assert other.value("gateway_requests_total") == len(records)
    # Per-process gauges: one snapshot version per live process.
    assert len([s for s in other.samples if s[0] == "gateway_snapshot_version"]) == 2


def test_json_log_lines_tell_the_retry_under_the_request_id_the_client_saw(two_gateways, tmp_path):
    sim, secret, gateways, _ = two_gateways
    sim.inject("east-chat", {"kind": "status", "status": 500, "count": 1})
    sim.inject("west-chat", {"kind": "status", "status": 500, "count": 1})
    first = chat(gateways[0].url, secret)
    assert first.status_code == 200
    request_id = first.headers["x-request-id"]
    wait_for_records(1)
    for gateway in gateways:
        gateway.stop()  # the log is complete once the processes are gone

    lines = json_lines(tmp_path / "gateway-1.log") + json_lines(tmp_path / "gateway-2.log")
    [line] = [x for x in lines if x.get("message") == "request" and x["request_id"] == request_id]
    # Both deployments fail once: the one it tried, the untried one, then the first again.
    assert line["retries"] == 2
    assert [a.split(":")[1] for a in line["attempts"]] == ["failed", "failed", "ok"]
    assert line["status"] == 200 and line["tenant"] == "observed"
    assert line["key_prefix"] == secret[:12]
    text = "\n".join(json.dumps(x) for x in lines)
    assert secret not in text and SIM_KEY not in text
    assert {x["level"] for x in lines} <= {"DEBUG", "INFO", "WARNING", "ERROR"}


@pytest.mark.skipif(
    not settings.REDIS_URL,
    reason="several workers need REDIS_URL (gateway.workers refuses them on in-process state): nothing to scrape",
)
def test_one_uvicorn_with_two_workers_is_scraped_whole(tmp_path, start_sim, deploy, tenant_key, balancer_prefix):
    """The image's shape: ``uvicorn --workers 2`` on one port, one multiprocess directory."""
    sim = start_sim([{"name": "east-chat"}], minute=60.0)
    deploy(sim, [{"name": "east-chat"}])
    secret = tenant_key("workers")
    metrics_dir = tmp_path / "prometheus"
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),  # made by the gateway when missing
        "GATEWAY_BALANCER_REDIS_PREFIX": balancer_prefix,
        "GATEWAY_USAGE_FLUSH_SECONDS": "0.05",
        "LOG_LEVEL": "WARNING",
    }
    gateway = ProcessGateway(env, uvicorn_args=["--workers", "2"]).start()
    try:
        for _ in range(20):
            assert chat(gateway.url, secret).status_code == 200  # a new connection each: either worker
        records = wait_for_records(20)
        deadline = time.monotonic() + 10
        while True:
            shown = Exposition(scrape(gateway.url, None).text)
            if shown.value("gateway_requests_total") >= len(records) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert shown.value("gateway_requests_total", status="200", outcome="ok") == 20
        assert shown.value("gateway_tokens_total", kind="completion") == sum(r.completion_tokens for r in records)
        # One snapshot version per live worker: both workers report into the one directory.
        assert len([s for s in shown.samples if s[0] == "gateway_snapshot_version"]) == 2
    finally:
        gateway.stop()
