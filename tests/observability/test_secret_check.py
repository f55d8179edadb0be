"""The suite-wide check that no log line holds a secret (``tests/log_secrets.py``) can fail: what
it finds and what it lets pass."""

from __future__ import annotations

import pytest

from gateway.models import Endpoint
from tenants.keys import key_generate, key_visible_prefix
from tests.log_secrets import endpoint_secrets, leaked_secret


def test_a_full_client_key_is_a_leak_and_its_visible_prefix_is_not():
    secret = key_generate()
    assert leaked_secret(f"request from {secret}") == secret
    assert leaked_secret(f"request request_id=req_1 key_prefix={key_visible_prefix(secret)} model=gpt-4o") is None


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345",
        "bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl",
        "token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl",
    ],
)
def test_bearer_credentials_and_jwts_are_leaks(text):
    assert leaked_secret(text) is not None


def test_redacted_text_passes():
    assert leaked_secret("upstream refused credentials (401): Incorrect API key provided: [redacted]") is None
    assert leaked_secret("Authorization: Bearer [redacted]") is None


@pytest.mark.django_db
def test_an_endpoint_secret_saved_during_the_test_is_a_leak():
    Endpoint.objects.create(
        name="leaky", kind=Endpoint.Kind.AZURE, base_url="http://127.0.0.1:9/", api_key="k3y-of-leaky"
    )
    assert "k3y-of-leaky" in endpoint_secrets
    assert leaked_secret("sent api-key k3y-of-leaky upstream") == "k3y-of-leaky"
    endpoint_secrets.clear()  # this test logged nothing; leave the check nothing to find
