"""``/metrics`` through the gateway's ASGI application: what requests, attempts and the balancer's
state show, label values that clients cannot invent, and the scrape token.

The series of this process accumulate over the suite, so each test compares a scrape before and
after what it does.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone
from prometheus_client import CollectorRegistry

from billing.models import Price
from gateway import snapshot
from gateway.observability.metrics import GatewayMetrics, metrics_install
from gateway.proxy.runtime import runtime
from gateway.simulator.faults import parse_fault
from tests.e2e.servers import free_port
from tests.observability.exposition import Exposition, delta

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hello"}]
PTU, PAYGO = "east/gpt4o-ptu", "east/gpt4o-paygo"
ROOT = Path(__file__).resolve().parents[2]


async def scrape(gateway_http, authorization: str | None = None, url: str = "http://gateway.test") -> httpx.Response:
    headers = {"Authorization": authorization} if authorization else {}
    transport = httpx.ASGITransport(app=gateway_http.app)
    async with httpx.AsyncClient(transport=transport, base_url=url) as http:
        return await http.get("/metrics", headers=headers)


async def exposition(gateway_http) -> Exposition:
    response = await scrape(gateway_http)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Exposition(response.text)


def fault(recording_sim, deployment: str, spec: dict[str, Any]) -> None:
    recording_sim.state.deployments[deployment].faults.add(parse_fault(spec, where="test"))


async def test_a_served_request_is_counted_with_its_tokens_cost_and_timings(gateway_http):
    await sync_to_async(Price.objects.create)(
        model="gpt-4o",
        input_per_million=Decimal("2.5"),
        output_per_million=Decimal("10"),
        effective_from=timezone.now() - timedelta(days=1),
    )
    before = await exposition(gateway_http)  # starts the runtime, which reads the price

    response = await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 200
    record = await gateway_http.the_usage_record()
    after = await exposition(gateway_http)

    def grew(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    assert grew("gateway_requests_total", model="gpt-4o", deployment=PTU, status="200", outcome="ok") == 1
    assert grew("gateway_tokens_total", model="gpt-4o", kind="prompt") == record.prompt_tokens > 0
    assert grew("gateway_tokens_total", model="gpt-4o", kind="completion") == record.completion_tokens > 0
    assert record.cost > 0
    assert grew("gateway_cost_total", model="gpt-4o") == pytest.approx(float(record.cost))
    for histogram in ("gateway_request_duration_seconds", "gateway_time_to_first_token_seconds"):
        assert grew(f"{histogram}_count", model="gpt-4o", deployment=PTU) == 1
        assert 0 < grew(f"{histogram}_sum", model="gpt-4o", deployment=PTU) < 5
    assert grew("gateway_queue_wait_seconds_count", model="gpt-4o") == 1
    assert grew("gateway_upstream_attempts_total", deployment=PTU, result="ok") == 1
    assert grew("gateway_upstream_retries_total") == 0
    assert grew("gateway_spillovers_total") == 0


async def test_made_up_models_share_one_label_value(gateway_http):
    for model in ("no-such-model-1", "no-such-model-2"):
        response = await gateway_http.post("/v1/chat/completions", {"model": model, "messages": HELLO})
        assert response.status_code == 404
    await gateway_http.with_key("sk-gw-not-a-key").post("/v1/chat/completions", {"model": "x", "messages": HELLO})
    after = await exposition(gateway_http)

    models = after.label_values("gateway_requests_total", "model")
    assert not any(m.startswith("no-such-model") for m in models)
    assert after.value("gateway_requests_total", model="other", deployment="none", status="404") >= 2
    # A refused key: no model was read at all.
    assert after.value("gateway_requests_total", model="none", status="401") >= 1


async def test_an_upstream_429_shows_as_a_rate_limited_attempt_a_retry_and_a_spill_over(gateway_http, recording_sim):
    before = await exposition(gateway_http)
    fault(recording_sim, "gpt4o-ptu", {"kind": "rate_limit", "retry_after_ms": 5000, "count": 1})

    response = await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 200
    record = await gateway_http.the_usage_record()
    assert (record.deployment_name, record.retries) == ("gpt4o-paygo", 1)
    after = await exposition(gateway_http)

    assert delta(before, after, "gateway_upstream_attempts_total", deployment=PTU, result="rate_limited") == 1
    assert delta(before, after, "gateway_upstream_attempts_total", deployment=PAYGO, result="ok") == 1
    assert delta(before, after, "gateway_upstream_retries_total", deployment=PTU) == 1
    # The PTU was cooling down: the lease went to the standard tier although the PTU's tier is better.
    assert delta(before, after, "gateway_spillovers_total", model="gpt-4o", deployment=PAYGO) == 1
    assert after.value("gateway_deployment_cool_down_seconds", deployment=PTU) > 3
    assert after.value("gateway_requests_total", model="gpt-4o", deployment=PAYGO, status="200", outcome="ok") >= 1


async def test_breaker_window_and_queue_gauges_are_read_from_the_balancer_at_scrape_time(
    gateway_http, ptu_deployment, settings
):
    await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    shown = await exposition(gateway_http)
    assert shown.value("gateway_shared_state_up") == 1
    assert shown.value("gateway_deployment_breaker_state", deployment=PTU, model="gpt-4o") == 0
    assert shown.value("gateway_deployment_available", deployment=PTU) == 1
    windows = shown.label_values("gateway_deployment_window_use_ratio", "window")
    assert {"requests_60s", "tokens_60s"} <= windows
    assert shown.value("gateway_deployment_window_use_ratio", deployment=PTU, window="requests_60s") > 0
    assert shown.has("gateway_queue_depth", model="gpt-4o")

    assert runtime.dispatcher is not None
    for _ in range(settings.GATEWAY["BREAKER_FAILURES"]):
        await runtime.dispatcher.state.record_failure(ptu_deployment.id)
    tripped = await exposition(gateway_http)
    assert tripped.value("gateway_deployment_breaker_state", deployment=PTU, model="gpt-4o") == 2
    assert tripped.value("gateway_deployment_available", deployment=PTU) == 0
    assert tripped.value("gateway_deployment_breaker_state", deployment=PAYGO, model="gpt-4o") == 0


async def test_the_usage_buffer_and_the_snapshot_of_this_process_are_shown(gateway_http):
    await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    before = await exposition(gateway_http)  # the record may still be buffered
    await gateway_http.usage_records()  # written now
    after = await exposition(gateway_http)

    assert after.value("gateway_usage_buffer_records") == 0
    assert after.value("gateway_usage_database_down") == 0
    assert delta(before, after, "gateway_usage_written_records_total") >= 1
    assert after.has("gateway_usage_flush_failures_total")
    assert after.has("gateway_usage_parked_records_total")
    assert after.value("gateway_snapshot_version") == snapshot.current().version
    assert 0 <= after.value("gateway_snapshot_age_seconds") < 5


async def test_the_tenant_label_is_a_setting(gateway_http, tenant_a):
    private = GatewayMetrics(tenant_label=True, registry=CollectorRegistry())
    previous = metrics_install(private)
    try:
        await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
        shown = await exposition(gateway_http)
    finally:
        metrics_install(previous)
    assert shown.value("gateway_requests_total", tenant=tenant_a.slug, model="gpt-4o", status="200") == 1
    assert shown.value("gateway_tokens_total", tenant=tenant_a.slug, kind="prompt") > 0
    assert shown.label_values("gateway_tokens_total", "tenant") == {tenant_a.slug}
    # Never a key: not as a label, not as a value.
    assert "key" not in {label for _, labels, _ in shown.samples for label in labels}
    # Off (the default): no tenant label anywhere.
    default = await exposition(gateway_http)
    assert not default.label_values("gateway_requests_total", "tenant")


async def test_an_anonymous_scrape_is_refused_where_the_token_is_set(gateway_http, settings):
    settings.OBSERVABILITY = {**settings.OBSERVABILITY, "METRICS_TOKEN": "scrape-token-for-the-test"}
    anonymous = await scrape(gateway_http)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    wrong = await scrape(gateway_http, "Bearer scrape-token-for-another")
    assert wrong.status_code == 401
    # A client key is not the scrape token either.
    assert (await scrape(gateway_http, f"Bearer {gateway_http.secret}")).status_code == 401
    right = await scrape(gateway_http, "Bearer scrape-token-for-the-test")
    assert right.status_code == 200
    assert "gateway_requests_total" in right.text


async def test_with_an_internal_port_metrics_are_served_there_only(gateway_http, settings):
    port = free_port()
    settings.OBSERVABILITY = {**settings.OBSERVABILITY, "METRICS_PORT": port, "METRICS_HOST": "127.0.0.1"}
    await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})  # starts the runtime
    public = await scrape(gateway_http)
    assert public.status_code == 404
    assert public.json()["error"]["code"] == "unknown_url"
    async with httpx.AsyncClient() as http:
        internal = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert internal.status_code == 200
    assert Exposition(internal.text).value("gateway_requests_total", model="gpt-4o", status="200") >= 1


async def test_the_grafana_dashboard_queries_only_series_the_gateway_exports(gateway_http):
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"\bgateway_[a-z_]+", target["expr"])
    }
    queried |= {
        name
        for variable in dashboard["templating"]["list"]
        for name in re.findall(r"\bgateway_[a-z_]+", variable.get("definition", ""))
    }
    assert len(queried) > 20
    await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    exported = (await exposition(gateway_http)).names
    assert queried - exported == set()


async def test_metrics_off_serve_no_metrics(gateway_http):
    previous = metrics_install(None)
    try:
        response = await scrape(gateway_http)
        served = await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    finally:
        metrics_install(previous)
    assert response.status_code == 404
    assert served.status_code == 200
    assert (await gateway_http.the_usage_record()).status == 200  # recorded as ever
