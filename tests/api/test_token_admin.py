"""Management tokens issued from the admin: the secret shown once, on a page never cached."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from tenants.keys import key_hash
from tenants.models import ManagementToken

pytestmark = pytest.mark.django_db


def test_the_admin_issues_a_tenant_token_shown_once(admin_client, admin_user, tenant_a):
    expires = timezone.now() + timedelta(days=7)
    response = admin_client.post(
        reverse("admin:tenants_managementtoken_add"),
        {"tenant": tenant_a.pk, "name": "lead", "expires_at_0": f"{expires:%Y-%m-%d}", "expires_at_1": "12:00:00"},
    )
    assert response.status_code == 200, response.content[:500]
    token = ManagementToken.objects.get()
    secret = response.context["secret"]
    assert secret.startswith("gwm-") and token.token_hash == key_hash(secret)
    assert token.created_by == admin_user and token.tenant == tenant_a
    assert "no-cache" in response["Cache-Control"]
    listing = admin_client.get(reverse("admin:tenants_managementtoken_changelist")).content.decode()
    assert token.prefix in listing and secret not in listing
