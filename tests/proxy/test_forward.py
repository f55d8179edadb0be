"""The forwarding path in process, against a scripted upstream: refusals of the gateway's
credentials, scrubbed client errors, one first-byte deadline, retries, and what is billed.

Runs on the balancer backend the environment configures (Redis when ``REDIS_URL`` is set).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest

from gateway import status
from gateway.models import Deployment
from gateway.proxy import retries
from gateway.proxy.runtime import runtime
from tests.proxy.forwarding import (
    SECRET_EAST,
    SECRET_WEST,
    USAGE,
    FakeResponse,
    answer,
    build_gateway,
    error,
    hang,
    refuse_connection,
    sse,
    stop_runtime,  # noqa: F401 (a fixture)
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("stop_runtime")]

SECRETS = (SECRET_EAST, SECRET_WEST, SECRET_EAST[:12], SECRET_WEST[:12])


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


def only_record(gw) -> dict:
    [record] = gw.records
    return record


# -- 1. refusals of the gateway are the gateway's fault --------------------------------------------


async def test_upstream_401_quoting_the_key_is_a_502_without_the_upstream_words(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch)
    for name in ("east-a", "west-b"):
        gw.upstream.script(
            name, lambda call: error(401, f"Incorrect API key provided: {call.headers['api-key']}.")(call)
        )
    async with gw.client() as http:
        response = await gw.chat(http)
    assert response.status_code == 502
    assert_no_secret(response.text)
    assert "Incorrect API key" not in response.text
    err = response.json()["error"]
    assert err["code"] == "upstream_auth_failed" and err["type"] == "api_error"
    assert "refused the gateway's credentials" in err["message"]
    assert response.headers["x-should-retry"] == "false"
    assert len(gw.upstream.calls) == 2, "each deployment is tried once, a refusal is not retried on the same one"
    record = only_record(gw)
    assert (record["status"], record["outcome"]) == (502, "upstream_error")
    assert record["error_code"] == "upstream_auth_failed"


async def test_a_refusing_deployment_is_skipped_and_its_breaker_fed(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch)
    gw.upstream.script("east-a", error(401, f"Incorrect API key provided: {SECRET_EAST}"))
    gw.upstream.script("west-b", answer())
    async with gw.client() as http:
        for _ in range(4):
            response = await gw.chat(http)
            assert response.status_code == 200, response.text
    # Each request tries the deployment with the most headroom first; the refusing one drops out once
    # tried, and its failures count towards its breaker.
    east_calls = len(gw.upstream.calls_to("east-a"))
    assert east_calls >= 1
    assert all(r["status"] == 200 for r in gw.records)
    assert sum(r["retries"] for r in gw.records) == east_calls
    report = await status.deployment_status()
    [east] = [d for d in report["deployments"] if d["name"] == "east-a"]
    assert east["breaker"]["failures"] == east_calls
    assert east["last_failure"]["reason"].startswith("upstream refused credentials (401)")
    assert_no_secret(json.dumps(report))
    [west] = [d for d in report["deployments"] if d["name"] == "west-b"]
    assert west["last_failure"] is None


@pytest.mark.parametrize(
    ("status_code", "code", "words"),
    [
        (403, "upstream_auth_failed", "refused the gateway access"),
        (404, "upstream_deployment_not_found", "has no deployment"),
    ],
)
async def test_upstream_403_and_404_are_the_gateways_fault(settings, monkeypatch, status_code, code, words):
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    gw.upstream.script("east-a", error(status_code, f"DeploymentNotFound for key {SECRET_EAST}", code="Whatever"))
    async with gw.client() as http:
        response = await gw.chat(http)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == code and words in response.json()["error"]["message"]
    assert_no_secret(response.text)


async def test_streamed_request_refused_before_any_event_gets_a_502(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch)
    for name in ("east-a", "west-b"):
        gw.upstream.script(name, error(401, f"Incorrect API key provided: {SECRET_WEST}"))
    async with gw.client() as http:
        response = await gw.chat(http, stream=True)
    assert response.status_code == 502 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "upstream_auth_failed"
    assert_no_secret(response.text)


async def test_client_caused_400_keeps_type_code_param_with_the_message_scrubbed(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch)
    body = {
        "error": {
            "message": f"Invalid 'temperature': 7 (key {SECRET_EAST}, Bearer abc.def, sk-proj-XYZ123456)",
            "type": "invalid_request_error",
            "code": "invalid_value",
            "param": "temperature",
            "debug": {"api_key": SECRET_EAST},
        }
    }
    for name in ("east-a", "west-b"):
        gw.upstream.script(
            name,
            answer(
                400, body, [(b"content-type", b"application/json"), (b"set-cookie", b"s=1"), (b"x-ms-region", b"x")]
            ),
        )
    async with gw.client() as http:
        response = await gw.chat(http, temperature=7)
        streamed = await gw.chat(http, temperature=7, stream=True)
    for reply in (response, streamed):
        assert reply.status_code == 400
        err = reply.json()["error"]
        assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "invalid_value", "temperature")
        assert err["message"].startswith("Invalid 'temperature': 7 (key [redacted]")
        assert "abc.def" not in err["message"] and "sk-proj" not in err["message"]
        assert "debug" not in err
        assert "set-cookie" not in reply.headers and "x-ms-region" not in reply.headers
        assert_no_secret(reply.text)
    assert len(gw.upstream.calls) == 2, "a client error is not retried"
    assert [r["outcome"] for r in gw.records] == ["client_error", "client_error"]
    assert all(r["error_code"] == "invalid_value" for r in gw.records)


async def test_content_filter_verdict_is_kept(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    verdict = {"hate": {"filtered": True, "severity": "high"}, "violence": {"filtered": False, "severity": "safe"}}
    body = {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": verdict},
        }
    }
    gw.upstream.script("east-a", answer(400, body))
    async with gw.client() as http:
        response = await gw.chat(http)
    err = response.json()["error"]
    assert response.status_code == 400 and err["code"] == "content_filter" and err["param"] == "prompt"
    assert err["innererror"] == {"code": "ResponsibleAIPolicyViolation", "content_filter_result": verdict}


async def test_non_json_client_error_gets_a_generic_message(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    gw.upstream.script("east-a", answer(413, b"<html>Request Entity Too Large " + SECRET_EAST.encode() + b"</html>"))
    async with gw.client() as http:
        response = await gw.chat(http)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "The upstream rejected the request (HTTP 413)."


# -- 2. one deadline per request -------------------------------------------------------------------


async def test_hung_upstreams_are_answered_504_within_the_first_byte_timeout(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch, first_byte=0.5)
    gw.upstream.script("east-a", hang)
    gw.upstream.script("west-b", hang)
    await runtime.ensure_started()  # before the clock: a start collects the whole heap
    async with gw.client() as http:
        started = time.monotonic()
        response = await gw.chat(http)
        elapsed = time.monotonic() - started
    assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"
    # A retry given a fresh timeout would take twice the budget; answered in one (0.5 s and some
    # milliseconds when idle, more on a machine busy with other work).
    assert 0.5 <= elapsed < 2 * 0.5, elapsed
    assert len(gw.upstream.calls) == 1, "no time was left for a retry"
    assert only_record(gw)["outcome"] == "upstream_timeout"


async def test_a_retry_gets_only_what_is_left_of_the_first_byte_budget(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch, first_byte=1.0)

    async def slow_500(call):
        import asyncio

        await asyncio.sleep(0.6)
        return error(500, "boom")(call)

    gw.upstream.script("east-a", slow_500)
    gw.upstream.script("west-b", slow_500)
    # Started before the clock: a start collects the whole heap (gc), 0.25 s late in a full suite run.
    await runtime.ensure_started()
    async with gw.client() as http:
        started = time.monotonic()
        response = await gw.chat(http)
        elapsed = time.monotonic() - started
    first, second = gw.upstream.calls
    assert first.timeouts.first_byte == 1.0
    assert second.timeouts.first_byte == pytest.approx(0.4, abs=0.1)
    # The retry's upstream answers no sooner than the first did: it runs out of the deadline.
    assert response.status_code == 504
    assert elapsed < 1.0 + 1.0, elapsed  # first_byte + 1 s, the bound (0.6 + 0.4 when idle)


# -- 3. retries that help --------------------------------------------------------------------------


async def test_a_transient_500_is_retried_on_the_same_deployment_after_a_back_off(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    gw.upstream.script("east-a", error(500, "boom"), error(503, "busy"), answer())
    async with gw.client() as http:
        response = await gw.chat(http)
    assert response.status_code == 200
    calls = gw.upstream.calls
    assert len(calls) == 3
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert all(0.05 <= gap < 0.3 for gap in gaps), gaps
    assert only_record(gw)["retries"] == 2


async def test_untried_deployments_come_first(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch)
    gw.upstream.script("east-a", error(500, "boom"), answer())
    gw.upstream.script("west-b", error(500, "boom"), answer())
    async with gw.client() as http:
        response = await gw.chat(http)
    assert response.status_code == 200
    first, second, third = (c.deployment for c in gw.upstream.calls)
    assert first != second and third in (first, second)


async def test_a_retry_does_not_wait_for_an_untried_deployment_whose_breaker_is_open(settings, monkeypatch):
    settings.GATEWAY = {**settings.GATEWAY, "BREAKER_FAILURES": 2, "BREAKER_OPEN_SECONDS": 30.0}
    gw = await build_gateway(settings, monkeypatch)
    await runtime.ensure_started()
    for _ in range(2):  # other requests opened east's breaker
        await runtime.dispatcher.state.record_failure(gw.deployments["east-a"].id)
    gw.upstream.script("west-b", error(500, "boom"), answer())
    async with gw.client() as http:
        started = time.monotonic()
        response = await gw.chat(http)
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert [c.deployment for c in gw.upstream.calls] == ["west-b", "west-b"]
    assert elapsed < 1.0, elapsed


async def test_a_model_whose_every_deployment_is_broken_is_refused_at_once_not_held(settings, monkeypatch):
    """Breakers others opened: the client hears so at once (503, Retry-After until the first trial),
    instead of waiting the open period out in the queue (30 s by default: a hang to the client)."""
    settings.GATEWAY = {**settings.GATEWAY, "BREAKER_FAILURES": 2, "BREAKER_OPEN_SECONDS": 20.0}
    gw = await build_gateway(settings, monkeypatch)
    await runtime.ensure_started()
    for name in ("east-a", "west-b"):
        for _ in range(2):
            await runtime.dispatcher.state.record_failure(gw.deployments[name].id)
    async with gw.client() as http:
        started = time.monotonic()
        response = await gw.chat(http)
        elapsed = time.monotonic() - started

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "deployments_unavailable"
    assert 15 < float(response.headers["retry-after"]) <= 20
    assert gw.upstream.calls == [] and elapsed < 1.0, elapsed
    record = only_record(gw)
    assert (record["status"], record["error_code"]) == (503, "deployments_unavailable")


async def test_a_retry_does_not_wait_for_a_tried_deployment_whose_breaker_others_opened(settings, monkeypatch):
    """The request's own failure leaves the breaker closed; other requests' failures open it during
    the back-off. The retry must not sit out the open period (30 s) on the client's clock."""
    settings.GATEWAY = {**settings.GATEWAY, "BREAKER_FAILURES": 3, "BREAKER_OPEN_SECONDS": 30.0}
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    east = gw.deployments["east-a"].id
    monkeypatch.setattr(retries, "BACKOFF_SECONDS", (0.3, 0.3))  # room for the others' failures

    async def others_fail_meanwhile():
        await asyncio.sleep(0.02)  # after this attempt's failure is recorded, within the back-off
        for _ in range(3):
            await runtime.dispatcher.state.record_failure(east)

    def failing_while_others_fail_too(call):
        asyncio.get_running_loop().create_task(others_fail_meanwhile())
        return error(500, "boom")(call)

    gw.upstream.script("east-a", failing_while_others_fail_too)
    async with gw.client() as http:
        started = time.monotonic()
        response = await gw.chat(http)
        elapsed = time.monotonic() - started

    assert response.status_code == 502  # the attempt's own failure, not a wait for the breaker
    assert len(gw.upstream.calls) == 1 and elapsed < 1.0, elapsed


async def test_retries_stop_at_max_retries(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch)
    gw.upstream.script("east-a", error(500, f"internal error near {SECRET_EAST}"))
    gw.upstream.script("west-b", refuse_connection)
    async with gw.client() as http:
        response = await gw.chat(http)
    assert response.status_code == 502
    assert len(gw.upstream.calls) == 1 + settings.GATEWAY["MAX_RETRIES"]
    assert_no_secret(response.text)
    assert only_record(gw)["retries"] == settings.GATEWAY["MAX_RETRIES"]


async def test_nothing_is_retried_once_the_stream_started(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch)
    gw.upstream.script("east-a", sse(2, broken=True))
    gw.upstream.script("west-b", sse(2, broken=True))
    async with gw.client() as http:
        response = await gw.chat(http, stream=True)
    assert response.status_code == 200
    assert b"tok1" in response.content and b'"code": "stream_interrupted"' in response.content
    assert len(gw.upstream.calls) == 1


async def test_a_deployment_whose_breaker_opened_is_not_retried(settings, monkeypatch):
    settings.GATEWAY = {**settings.GATEWAY, "BREAKER_FAILURES": 1}
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    gw.upstream.script("east-a", error(500, "boom"), answer())
    async with gw.client() as http:
        response = await gw.chat(http)
    assert response.status_code == 502
    assert len(gw.upstream.calls) == 1


# -- 4. only what the upstream served costs money --------------------------------------------------


async def test_served_requests_are_billed_with_the_upstream_usage(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    async with gw.client() as http:
        assert (await gw.chat(http)).status_code == 200
    record = only_record(gw)
    assert record["prompt_tokens"] == USAGE["prompt_tokens"]
    assert record["completion_tokens"] == USAGE["completion_tokens"]
    assert record["cost"] > 0 and record["estimated_prompt_tokens"] > 0 and not record["tokens_estimated"]


@pytest.mark.parametrize(
    "script",
    [error(500, "boom"), error(401, "no"), error(400, "bad", param="temperature"), hang],
    ids=["502", "refused", "client-400", "504"],
)
async def test_failed_and_refused_requests_cost_nothing(settings, monkeypatch, script):
    gw = await build_gateway(settings, monkeypatch, first_byte=0.2, deployments=("east-a",))
    gw.upstream.script("east-a", script)
    async with gw.client() as http:
        response = await gw.chat(http)
    assert response.status_code >= 400
    record = only_record(gw)
    assert (record["prompt_tokens"], record["completion_tokens"], record["cost"]) == (0, 0, 0)
    assert record["estimated_prompt_tokens"] > 0


async def test_a_request_refused_for_capacity_costs_nothing(settings, monkeypatch):
    settings.GATEWAY = {**settings.GATEWAY, "QUEUE_TIMEOUT_SECONDS": 0.2}
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    await Deployment.objects.filter(pk=gw.deployments["east-a"].pk).aupdate(tpm=100)  # before the snapshot loads
    async with gw.client() as http:
        response = await gw.chat(http, max_tokens=500)
    assert response.status_code == 429
    record = only_record(gw)
    assert (record["prompt_tokens"], record["cost"], record["outcome"]) == (0, 0, "rate_limited")
    assert not gw.upstream.calls


async def test_a_stream_the_upstream_broke_is_its_failure_billed_for_what_arrived(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    gw.upstream.script("east-a", sse(4, broken=True))
    async with gw.client() as http:
        response = await gw.chat(http, stream=True)
    assert response.status_code == 200 and b"stream_interrupted" in response.content
    record = only_record(gw)
    assert (record["outcome"], record["error_code"]) == ("upstream_error", "stream_interrupted")
    assert record["prompt_tokens"] == record["estimated_prompt_tokens"] > 0
    assert record["completion_tokens"] >= 4 and record["tokens_estimated"] and record["cost"] > 0
    report = await status.deployment_status()
    [east] = report["deployments"]
    assert east["breaker"]["failures"] == 1 and east["last_failure"]["reason"].startswith("stream broke off")


async def test_an_error_event_from_the_upstream_is_relayed_as_sent_and_is_its_failure(settings, monkeypatch):
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    content = b'data: {"choices":[{"index":0,"delta":{"content":"tok0 "}}]}\n\n'
    failure = b'data: {"error":{"message":"The server had an error.","type":"server_error","code":"server_error"}}\n\n'
    gw.upstream.script(
        "east-a", lambda call: FakeResponse(200, [content, failure], [(b"content-type", b"text/event-stream")])
    )
    async with gw.client() as http:
        response = await gw.chat(http, stream=True)
    assert response.status_code == 200
    assert response.content == content + failure  # the upstream's error, and no second one of the gateway's
    record = only_record(gw)
    assert (record["outcome"], record["error_code"]) == ("upstream_error", "server_error")
    assert record["completion_tokens"] >= 1 and record["tokens_estimated"]
    [east] = (await status.deployment_status())["deployments"]
    assert east["breaker"]["failures"] == 1 and east["last_failure"]["reason"] == "upstream error event: server_error"


async def test_the_status_page_shows_what_this_process_noted_without_redis(settings, monkeypatch):
    settings.REDIS_URL = None
    gw = await build_gateway(settings, monkeypatch, deployments=("east-a",))
    gw.upstream.script("east-a", error(404, "The API deployment east-a does not exist."))
    async with gw.client() as http:
        await gw.chat(http)
    assert runtime.redis is None
    [east] = (await status.deployment_status())["deployments"]
    assert east["last_failure"]["reason"] == (
        "upstream has no such deployment (404): The API deployment east-a does not exist."
    )
