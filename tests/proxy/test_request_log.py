"""The request log: one line per proxied request with what the gateway did (JSON lines as
``GATEWAY_LOG_FORMAT=json`` writes them), the request id on every line logged for a request, and
nothing secret in any of them."""

from __future__ import annotations

import logging

import pytest

from gateway.observability.request import request_log_configure
from gateway.simulator.faults import parse_fault

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "a prompt nobody else may read"}]


@pytest.fixture(autouse=True)
def request_log_at_info():
    request_log_configure("INFO")
    yield
    request_log_configure("INFO")


def request_lines(json_log) -> list[dict]:
    return [line for line in json_log.lines() if line["logger"] == "gateway.request"]


async def test_a_retried_request_says_so_in_its_json_line_under_the_id_the_client_saw(
    gateway_http, recording_sim, json_log, key_a
):
    recording_sim.state.deployments["gpt4o-ptu"].faults.add(
        parse_fault({"kind": "status", "status": 500, "count": 1}, where="test")
    )
    response = await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    record = await gateway_http.the_usage_record()

    [line] = request_lines(json_log)
    assert line["message"] == "request"
    assert line["level"] == "INFO"
    assert line["request_id"] == request_id == record.request_id
    assert line["retries"] == record.retries == 1
    assert line["attempts"][0] == "east/gpt4o-ptu:failed"
    assert line["attempts"][-1].endswith(":ok")
    assert line["status"] == 200 and line["outcome"] == "ok"
    assert line["tenant"] == "team-a" and line["key_prefix"] == key_a.key.prefix
    assert line["deployment"] == f"east/{record.deployment_name}"
    assert line["prompt_tokens"] == record.prompt_tokens
    assert line["latency_ms"] >= line["ttft_ms"] > 0
    # The failed attempt's own line (DEBUG: transient failures are routine) names the same request.
    failures = [x for x in json_log.lines() if x["logger"] == "gateway.proxy.forward"]
    assert failures and all(x["request_id"] == request_id for x in failures)
    assert "HTTP 500" in failures[0]["message"] or "500" in failures[0]["message"]
    # Never the key, the upstream's key, or the prompt.
    text = json_log.getvalue()
    assert key_a.secret not in text
    assert recording_sim.state.config.api_key not in text
    assert "a prompt nobody else may read" not in text


async def test_an_error_inside_the_gateway_is_logged_with_the_request_id_the_client_saw(
    gateway_http, json_log, monkeypatch
):
    async def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr("gateway.proxy.forward.Forwarder.run", broken)
    response = await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]

    [error] = [x for x in json_log.lines() if x["level"] == "ERROR"]
    assert error["request_id"] == request_id
    assert request_id in error["message"]
    assert "RuntimeError: a bug" in error["exception"]
    [line] = request_lines(json_log)
    assert (line["request_id"], line["status"], line["error_code"]) == (request_id, 500, "internal_error")


async def test_refused_requests_have_their_line_too(gateway_http, json_log):
    response = await gateway_http.with_key(None).post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 401
    [line] = request_lines(json_log)
    assert (line["status"], line["error_code"], line["tenant"], line["key_prefix"]) == (
        401,
        "invalid_api_key",
        None,
        None,
    )
    assert line["attempts"] == []


async def test_the_request_line_has_the_configured_level_or_none(gateway_http, caplog):
    request_log_configure("WARNING")
    await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    request_log_configure("off")
    await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    lines = [r for r in caplog.records if r.name == "gateway.request"]
    assert [r.levelno for r in lines] == [logging.WARNING]
    assert lines[0].getMessage().startswith("request request_id=req_")
    assert len(await gateway_http.usage_records()) == 2  # logging or not, every request is recorded


async def test_lines_logged_outside_a_request_have_no_request_id(gateway_http, json_log):
    await gateway_http.post("/v1/chat/completions", {"model": "gpt-4o", "messages": HELLO})
    logging.getLogger("gateway.test").warning("between requests")
    [line] = [x for x in json_log.lines() if x["message"] == "between requests"]
    assert "request_id" not in line
