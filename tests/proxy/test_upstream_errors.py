"""What an upstream's error answer means, and what of it a client may see."""

from __future__ import annotations

import json

import pytest

from gateway.proxy import upstream_errors as ue

SECRET = "0123456789abcdef0123456789abcdef"  # an Azure key: 32 hex digits


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, ue.SERVED),
        (201, ue.SERVED),
        (429, ue.RATE_LIMITED),
        (401, ue.REFUSED),
        (403, ue.REFUSED),
        (404, ue.REFUSED),
        (407, ue.REFUSED),
        (301, ue.REFUSED),
        (500, ue.TRANSIENT),
        (503, ue.TRANSIENT),
        (408, ue.TRANSIENT),
        (400, ue.CLIENT_ERROR),
        (413, ue.CLIENT_ERROR),
        (422, ue.CLIENT_ERROR),
        (409, ue.CLIENT_ERROR),
    ],
)
def test_statuses_are_classified(status, kind):
    assert ue.classify(status) == kind


@pytest.mark.parametrize(
    "text",
    [
        f"Incorrect API key provided: {SECRET}.",
        "Incorrect API key provided: sk-proj-abc123DEF456ghi789.",
        "Incorrect API key provided: sk-proj-********************************************Xy9Z.",
        "Authorization: Bearer eyJ0eXAiOiJKV1QiLCJhbGciOi.eyJhdWQiOiJodHRwczovL2NvZ25pdGl2ZS.sig-part",
        "token eyJ0eXAiOiJKV1QiLCJhbGciOi.eyJhdWQiOiJodHRwczovL2NvZ25pdGl2ZS.sig",
        "key dGhpcyBpcyBhIGJhc2U2NCBrZXkgb2YgNDggY2hhcnM0MmFi== was refused",
    ],
)
def test_key_shaped_text_is_redacted(text):
    scrubbed = ue.scrub(text)
    assert ue.REDACTED in scrubbed
    for word in ("abc123", "Xy9Z", "eyJ0eXAi", "dGhpcyBp", SECRET[:8]):
        assert word not in scrubbed, scrubbed


def test_the_endpoint_secrets_are_redacted_even_cut_short():
    secret = "my-upstream-password-that-is-long"
    assert ue.scrub(f"bad key {secret}!", [secret]) == f"bad key {ue.REDACTED}!"
    assert secret[:8] not in ue.scrub(f"bad key {secret[:14]}...", [secret])


def test_ordinary_messages_are_left_alone():
    text = (
        "Invalid value for 'messages[0].content': expected a string. See "
        "https://platform.openai.com/docs/api-reference/chat/create for the parameters."
    )
    assert ue.scrub(text) == text
    assert ue.scrub("a" * 40) == "a" * 40
    assert ue.scrub("1" * 40) == "1" * 40


def test_a_client_error_is_rebuilt_from_its_fields():
    body = json.dumps(
        {
            "error": {
                "message": f"'temperature' is invalid; your key {SECRET} was used",
                "type": "invalid_request_error",
                "code": "invalid_value",
                "param": "temperature",
                "internal": {"trace": "x"},
            }
        }
    ).encode()
    error = ue.client_error(400, body, [SECRET])
    assert error.status == 400 and error.outcome == "client_error"
    assert json.loads(error.body()) == {
        "error": {
            "message": f"'temperature' is invalid; your key {ue.REDACTED} was used",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }


def test_an_azure_error_without_type_gets_one():
    body = b'{"error": {"code": "OperationNotSupported", "message": "The embeddings operation does not work."}}'
    error = json.loads(ue.client_error(400, body, ()).body())["error"]
    assert error == {
        "message": "The embeddings operation does not work.",
        "type": "invalid_request_error",
        "param": None,
        "code": "OperationNotSupported",
    }


@pytest.mark.parametrize("body", [b"", b"<html>oops</html>", b"[1, 2]", b'{"error": 5}', b"\xff\xfe"])
def test_unreadable_error_bodies_get_a_generic_message(body):
    error = ue.client_error(422, body, ())
    assert error.message == "The upstream rejected the request (HTTP 422)."
    assert error.type == "invalid_request_error" and error.code is None


def test_content_filter_verdict_keeps_flags_only():
    inner = {
        "code": "ResponsibleAIPolicyViolation",
        "content_filter_result": {
            "hate": {"filtered": True, "severity": "high", "details": {"x": 1}, "text": "a long echo of the prompt"},
        },
        "other": "dropped",
    }
    body = json.dumps({"error": {"message": "filtered", "code": "content_filter", "innererror": inner}}).encode()
    error = json.loads(ue.client_error(400, body, ()).body())["error"]
    assert error["innererror"] == {
        "code": "ResponsibleAIPolicyViolation",
        "content_filter_result": {"hate": {"filtered": True, "severity": "high"}},
    }


def test_refusals_say_whose_fault_it_is():
    for status in (401, 407):
        error = ue.refusal(status, "gpt-4o")
        assert error.status == 502 and error.code == "upstream_auth_failed"
        assert "refused the gateway's credentials" in error.message
        assert (b"x-should-retry", b"false") in error.headers
    assert ue.refusal(403, "gpt-4o").code == "upstream_auth_failed"
    assert ue.refusal(404, "gpt-4o").code == "upstream_deployment_not_found"
    assert ue.refusal(302, "gpt-4o").code == "upstream_misconfigured"


def test_failure_reasons_for_operators_are_scrubbed():
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {SECRET}"}}).encode()
    assert ue.failure_reason(401, body, [SECRET]) == (
        f"upstream refused credentials (401): Incorrect API key provided: {ue.REDACTED}"
    )
    assert ue.failure_reason(503, b"", ()) == "upstream error (503)"
