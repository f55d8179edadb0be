"""A bounded schemathesis run: every operation of the OpenAPI schema, fed generated requests
through the WSGI application as staff, answers without a server error.

Two depths. By default (the fast loop): three generated requests per operation. With
``GATEWAY_TEST_FUZZ=deep`` (``make test``, so CI): six, and schemathesis' coverage phase, dozens of
boundary and invalid values per parameter (the kind that found a NUL byte answered with a 500 on
PostgreSQL), about a minute on two workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from tenants.services import management_token_issue

schema = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))
# The whole Django stack (middleware, URL routing, DRF) in process, no server.
schema.app = WSGIHandler()

DEEP = os.environ.get("GATEWAY_TEST_FUZZ") == "deep"
# Hypothesis' explicit phase is where schemathesis adds its coverage cases.
PHASES = [Phase.explicit, Phase.generate] if DEEP else [Phase.generate]
EXAMPLES = 6 if DEEP else 3


@pytest.fixture
def wsgi_keeps_the_connection() -> Iterator[None]:
    """The WSGI handler closes the database connection around each request, which would end the
    test's transaction; Django's own test client unhooks the same two receivers for the same reason."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def staff_bearer(
    db, wsgi_keeps_the_connection, django_user_model, tenant_a, key_a, endpoint, standard_deployment
) -> str:
    """A staff management token, and a little data for the generated requests to find."""
    user = django_user_model.objects.create_user("fuzz", password="pw-fuzz-123456", is_staff=True)
    issued = management_token_issue(name="fuzz", created_by=user, expires_at=timezone.now() + timedelta(days=1))
    return f"Bearer {issued.secret}"


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=PHASES,
    suppress_health_check=list(HealthCheck),
)
def test_no_operation_answers_a_server_error(case, staff_bearer):
    case.call_and_validate(headers={"Authorization": staff_bearer}, checks=[not_a_server_error])
