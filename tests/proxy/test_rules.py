"""The rules of the request path, one by one, through the ASGI application in-process.

Each test sends one request as tenant A (or without a valid key) to ``gateway.asgi.application``
and checks the answer, what reached the upstream (the in-process simulator notes every call),
and that the request left exactly one usage record. Fixtures: ``tests/proxy/conftest.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.models import Deployment
from tenants.models import AccessPolicy, Tenant
from tests.fakes.simulator import InLoopSimulator
from tests.proxy.asgi_client import COMPLETION_TOKENS, GatewayHTTP

pytestmark = pytest.mark.django_db(transaction=True)

CHAT_PATH = "/v1/chat/completions"
AZURE_CHAT_PATH = "/openai/deployments/gpt-4o/chat/completions"
HI = [{"role": "user", "content": "hi"}]
PROMPT_TOKENS = 8  # "hi" as one user message: 3 + 1 (role) + 1 (content) + 3 (reply priming)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": HI, **fields}


def error_of(response) -> dict[str, Any]:
    """The OpenAI-shaped error of a response (every field present)."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def set_policy(tenant: Tenant, **fields: Any) -> None:
    AccessPolicy.objects.filter(tenant=tenant).update(**fields)


# -- the client's address ------------------------------------------------------------------------


@pytest.fixture
def office_network_only(tenant_a: Tenant) -> None:
    """Tenant A may call from 10.0.0.0/8 (an office network), except from its guest Wi-Fi."""
    set_policy(tenant_a, ip_allow=["10.0.0.0/8"], ip_deny=["10.66.0.0/16"])


@pytest.mark.parametrize(
    ("client_ip", "why"),
    [("192.0.2.7", "outside every allowed network"), ("10.66.0.9", "inside a denied network that is also allowed")],
)
async def test_a_request_from_an_address_the_team_does_not_allow_is_refused_with_403(
    office_network_only, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, client_ip: str, why: str
):
    response = await gateway_http.post(CHAT_PATH, chat(), client_ip=client_ip)

    assert response.status_code == 403, why
    assert error_of(response)["code"] == "ip_not_allowed"
    assert client_ip in error_of(response)["message"]
    assert recording_sim.calls == []
    record = await gateway_http.the_usage_record()
    assert (record.status, record.outcome, record.error_code, record.client_ip) == (
        403,
        "forbidden",
        "ip_not_allowed",
        client_ip,
    )


async def test_a_request_from_an_allowed_address_passes(
    office_network_only, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(CHAT_PATH, chat(), client_ip="10.1.2.3")

    assert response.status_code == 200, response.text
    assert len(recording_sim.calls) == 1
    record = await gateway_http.the_usage_record()
    assert (record.status, record.client_ip) == (200, "10.1.2.3")


# -- the team's max_tokens cap -------------------------------------------------------------------


@pytest.fixture
def cap_of_50(tenant_a: Tenant) -> None:
    set_policy(tenant_a, max_tokens_cap=50)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_asking_for_more_tokens_than_the_cap_is_refused_with_400_naming_the_field(
    cap_of_50, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, field: str
):
    response = await gateway_http.post(CHAT_PATH, chat(**{field: 51}))

    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["code"]) == (field, "max_tokens_above_cap")
    assert recording_sim.calls == []
    record = await gateway_http.the_usage_record()
    assert (record.status, record.error_code) == (400, "max_tokens_above_cap")


async def test_without_max_tokens_the_cap_is_set_in_the_forwarded_body(
    cap_of_50, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(CHAT_PATH, chat())

    assert response.status_code == 200, response.text
    [call] = recording_sim.calls
    assert call.body["max_completion_tokens"] == 50 and "max_tokens" not in call.body
    record = await gateway_http.the_usage_record()
    assert record.status == 200


async def test_max_tokens_within_the_cap_is_forwarded_unchanged(
    cap_of_50, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(CHAT_PATH, chat(max_tokens=50))

    assert response.status_code == 200, response.text
    [call] = recording_sim.calls
    assert call.body == chat(max_tokens=50)
    assert (await gateway_http.the_usage_record()).status == 200


# -- the context window ----------------------------------------------------------------------------


@pytest.fixture
def small_ptu_window(ptu_deployment: Deployment) -> None:
    """The PTU holds 100 tokens of context; the standard deployment keeps its 128,000."""
    ptu_deployment.context_window = 100
    ptu_deployment.save()


async def test_a_request_that_fits_every_window_goes_to_the_ptu_first(
    small_ptu_window, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(CHAT_PATH, chat(max_tokens=100 - PROMPT_TOKENS))

    assert response.status_code == 200, response.text
    assert [c.deployment for c in recording_sim.calls] == ["gpt4o-ptu"]
    assert (await gateway_http.the_usage_record()).deployment_name == "gpt4o-ptu"


async def test_a_request_too_large_for_one_window_goes_to_a_deployment_whose_window_fits(
    small_ptu_window, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(CHAT_PATH, chat(max_tokens=100 - PROMPT_TOKENS + 1))

    assert response.status_code == 200, response.text
    assert [c.deployment for c in recording_sim.calls] == ["gpt4o-paygo"]
    record = await gateway_http.the_usage_record()
    assert (record.status, record.deployment_name) == (200, "gpt4o-paygo")


async def test_a_request_too_large_for_every_window_is_refused_with_context_length_exceeded(
    small_ptu_window, standard_deployment: Deployment, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    standard_deployment.context_window = 200
    await standard_deployment.asave()

    response = await gateway_http.post(CHAT_PATH, chat(max_tokens=200))

    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert "maximum context length is 200 tokens" in error["message"]
    assert recording_sim.calls == []
    record = await gateway_http.the_usage_record()
    assert (record.status, record.error_code, record.model) == (400, "context_length_exceeded", "gpt-4o")


# -- priority --------------------------------------------------------------------------------------


async def test_the_priority_field_orders_the_request_and_is_not_forwarded(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(CHAT_PATH, chat(max_tokens=10, priority=9))

    assert response.status_code == 200, response.text
    [call] = recording_sim.calls
    assert call.body == chat(max_tokens=10)
    assert (await gateway_http.the_usage_record()).priority == 9


async def test_a_priority_better_than_the_keys_best_is_served_at_the_keys_best(
    key_a, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(CHAT_PATH, chat(max_tokens=10, priority=0))

    assert response.status_code == 200, response.text
    assert (await gateway_http.the_usage_record()).priority == key_a.key.default_priority


async def test_without_a_priority_field_the_keys_default_priority_applies(
    key_a, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(CHAT_PATH, chat(max_tokens=10))

    assert response.status_code == 200, response.text
    assert (await gateway_http.the_usage_record()).priority == key_a.key.default_priority


@pytest.mark.parametrize("priority", [-1, 256, 2.5, "high", True])
async def test_a_priority_out_of_range_is_refused_with_400_naming_priority(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, priority: Any
):
    response = await gateway_http.post(CHAT_PATH, chat(priority=priority))

    assert response.status_code == 400
    assert error_of(response)["param"] == "priority"
    assert recording_sim.calls == []
    assert (await gateway_http.the_usage_record()).status == 400


# -- api-version on Azure deployment paths -------------------------------------------------------


async def test_an_azure_deployment_path_without_api_version_is_refused_with_400(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(AZURE_CHAT_PATH, {"messages": HI})

    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["code"]) == ("api-version", "missing_api_version")
    assert recording_sim.calls == []
    record = await gateway_http.the_usage_record()
    assert (record.status, record.error_code, record.route) == (400, "missing_api_version", "chat")


async def test_an_azure_deployment_path_with_api_version_is_served(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.post(AZURE_CHAT_PATH + "?api-version=2024-10-21", {"messages": HI})

    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == COMPLETION_TOKENS
    assert [c.deployment for c in recording_sim.calls] == ["gpt4o-ptu"]
    record = await gateway_http.the_usage_record()
    assert (record.status, record.model, record.completion_tokens) == (200, "gpt-4o", COMPLETION_TOKENS)


# -- keys, models and methods ----------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["sk-gw-not-a-key-anyone-was-given", None])
async def test_a_request_without_a_known_key_is_refused_with_401(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator, secret: str | None
):
    response = await gateway_http.with_key(secret).post(CHAT_PATH, chat())

    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"
    assert recording_sim.calls == []
    record = await gateway_http.the_usage_record()
    assert (record.status, record.outcome, record.tenant_id, record.key_id) == (401, "auth_error", None, None)


async def test_an_unknown_model_is_refused_with_404(gateway_http: GatewayHTTP, recording_sim: InLoopSimulator):
    response = await gateway_http.post(CHAT_PATH, {"model": "gpt-9", "messages": HI})

    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"
    assert recording_sim.calls == []
    record = await gateway_http.the_usage_record()
    assert (record.status, record.model, record.error_code) == (404, "gpt-9", "model_not_found")


async def test_a_model_the_team_may_not_use_is_refused_with_404_like_an_unknown_one(
    tenant_a: Tenant, gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    await AccessPolicy.objects.filter(tenant=tenant_a).aupdate(allowed_models=["gpt-4o-mini"])

    response = await gateway_http.post(CHAT_PATH, chat())

    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"
    assert recording_sim.calls == []
    assert (await gateway_http.the_usage_record()).status == 404


async def test_a_wrong_method_is_refused_with_405_naming_the_allowed_one(
    gateway_http: GatewayHTTP, recording_sim: InLoopSimulator
):
    response = await gateway_http.request("GET", CHAT_PATH)

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert error_of(response)["code"] == "method_not_allowed"
    record = await gateway_http.the_usage_record()
    assert (record.status, record.route) == (405, "chat")
