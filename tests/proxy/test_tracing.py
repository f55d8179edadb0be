"""Traces: with an exporter configured (here in memory, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` sets one
up for OTLP), a request is one trace: the request's span, a child per wait for capacity and per
upstream attempt, and the attempt's context sent upstream as ``traceparent``."""

from __future__ import annotations

import httpx
import pytest

from gateway.observability import tracing
from gateway.simulator.faults import parse_fault

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hi"}]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


def by_name(spans, name: str) -> list:
    return [s for s in spans if s.name.startswith(name)]


async def test_a_request_is_a_trace_with_its_queue_waits_and_attempts(gateway_http, recording_sim, span_exporter):
    recording_sim.state.deployments["gpt4o-ptu"].faults.add(
        parse_fault({"kind": "rate_limit", "retry_after_ms": 5000, "count": 1}, where="test")
    )
    response = await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 200
    spans = span_exporter.get_finished_spans()

    [request] = by_name(spans, tracing.REQUEST_SPAN)
    waits = by_name(spans, tracing.QUEUE_WAIT_SPAN)
    attempts = by_name(spans, tracing.ATTEMPT_SPAN)
    assert len(waits) >= 2 and len(attempts) == 2
    assert {s.context.trace_id for s in spans} == {request.context.trace_id}
    assert all(s.parent.span_id == request.context.span_id for s in waits + attempts)
    assert request.attributes["gateway.request_id"] == response.headers["x-request-id"]
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["gateway.retries"] == 1
    assert request.attributes["gateway.deployment"] == "east/gpt4o-paygo"
    assert request.kind.name == "SERVER"
    first, second = sorted(attempts, key=lambda s: s.start_time)
    assert (first.attributes["gateway.deployment"], first.attributes["gateway.result"]) == (
        "east/gpt4o-ptu",
        "rate_limited",
    )
    assert (second.attributes["gateway.deployment"], second.attributes["gateway.result"]) == ("east/gpt4o-paygo", "ok")
    assert first.kind.name == "CLIENT"
    assert all(w.attributes["gateway.result"] == "granted" for w in waits if w.attributes.get("gateway.deployment"))

    # Each attempt went upstream under its own span.
    sent = [call.headers["traceparent"].rsplit("-", 1)[0] for call in recording_sim.calls]  # less the flags
    assert sent == [f"00-{request.context.trace_id:032x}-{attempt.context.span_id:016x}" for attempt in (first, second)]


async def test_the_clients_trace_is_continued(gateway_http, recording_sim, span_exporter):
    transport = httpx.ASGITransport(app=gateway_http.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": HELLO},
            headers={
                "Authorization": f"Bearer {gateway_http.secret}",
                "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01",
            },
        )
    assert response.status_code == 200
    [request] = by_name(span_exporter.get_finished_spans(), tracing.REQUEST_SPAN)
    assert f"{request.context.trace_id:032x}" == CLIENT_TRACE
    assert f"{request.parent.span_id:016x}" == CLIENT_PARENT
    [call] = recording_sim.calls
    assert call.headers["traceparent"].startswith(f"00-{CLIENT_TRACE}-")
    assert not call.headers["traceparent"].endswith(f"-{CLIENT_PARENT}-01")  # the attempt's span, not the client's


async def test_a_refused_request_is_a_trace_of_one_span(gateway_http, span_exporter):
    response = await gateway_http.with_key(None).post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 401
    [request] = span_exporter.get_finished_spans()
    assert request.name.startswith(tracing.REQUEST_SPAN)
    assert request.attributes["gateway.error_code"] == "invalid_api_key"


async def test_without_an_exporter_nothing_is_traced_and_the_clients_traceparent_passes(gateway_http, recording_sim):
    assert not tracing.tracing_enabled()
    transport = httpx.ASGITransport(app=gateway_http.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": HELLO},
            headers={
                "Authorization": f"Bearer {gateway_http.secret}",
                "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01",
            },
        )
    assert response.status_code == 200
    [call] = recording_sim.calls
    assert call.headers["traceparent"] == f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"


def test_tracing_is_off_unless_an_otlp_endpoint_is_set(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.tracing_configure_from_env() is False
    assert not tracing.tracing_enabled()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: nothing is sent yet
    try:
        assert tracing.tracing_configure_from_env() is True
        assert tracing.tracing_enabled()
    finally:
        tracing.tracing_shutdown()
    assert not tracing.tracing_enabled()
