"""``manage.py issue_management_token``: prints a working token once."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tests.api.conftest import bearer

pytestmark = pytest.mark.django_db


def issue(*args: str) -> str:
    out = StringIO()
    call_command("issue_management_token", *args, stdout=out)
    return out.getvalue().strip()


def test_the_command_issues_a_staff_token_that_manages_tenants(staff_user):
    secret = issue(staff_user.username, "--name", "pipeline")
    assert secret.startswith("gwm-")
    assert bearer(secret).get("/api/v1/tenants/").status_code == 200


def test_the_command_issues_a_tenant_token_that_sees_only_its_tenant(staff_user, tenant_a, key_a, key_b):
    secret = issue(staff_user.username, "--name", "lead", "--tenant", tenant_a.slug)
    assert bearer(secret).get("/api/v1/tenants/").status_code == 403
    assert [row["id"] for row in bearer(secret).get("/api/v1/keys/").json()["results"]] == [key_a.key.pk]


def test_the_command_refuses_a_staff_token_for_a_non_staff_user(django_user_model):
    django_user_model.objects.create_user("dev", password="pw-dev-123456")
    with pytest.raises(CommandError, match="not active staff"):
        issue("dev", "--name", "x")
