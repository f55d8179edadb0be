"""A bounded schemathesis run: every operation of the OpenAPI schema, fed generated requests
through the WSGI application as staff, answers without a server error."""

from __future__ import annotations

from datetime import timedelta

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from tenants.services import management_token_issue

schema = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))
# The whole Django stack (middleware, URL routing, DRF) in process, no server.
schema.app = WSGIHandler()


@pytest.fixture
def staff_bearer(transactional_db, django_user_model, tenant_a, key_a, endpoint, standard_deployment) -> str:
    """A staff management token, and a little data for the generated requests to find."""
    user = django_user_model.objects.create_user("fuzz", password="pw-fuzz-123456", is_staff=True)
    issued = management_token_issue(name="fuzz", created_by=user, expires_at=timezone.now() + timedelta(days=1))
    return f"Bearer {issued.secret}"


# Real commits (transactional_db): the WSGI handler closes the connection after each request.
@schema.parametrize()
@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_operation_answers_a_server_error(case, staff_bearer):
    case.call_and_validate(headers={"Authorization": staff_bearer}, checks=[not_a_server_error])
