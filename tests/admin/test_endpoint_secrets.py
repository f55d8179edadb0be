"""Endpoint secrets in the admin, for staff who may only view and staff who may change.

Neither ever gets a secret back in a page, and moving an endpoint (base URL, kind, auth, Azure AD
authority or tenant) without typing its secrets again removes them, with a warning.
"""

from __future__ import annotations

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.contrib.messages import WARNING
from django.test import Client

from gateway.models import Deployment, Endpoint
from tests.admin.test_admin_pages import endpoint_data, url

API_KEY = "sk-live-upstream-key-7Q4Z"
AD_SECRET = "ad-client-secret-9XK2"
SECRETS = (API_KEY, AD_SECRET)


@pytest.fixture
def guarded(db, admin_client) -> Endpoint:
    """An endpoint with both secrets, typed through the admin so its history has an entry."""
    endpoint = Endpoint.objects.create(
        name="guarded",
        base_url="https://guarded.example.com",
        api_key="placeholder",
        ad_tenant_id="contoso",
        ad_client_id="gateway-app",
    )
    Deployment.objects.create(endpoint=endpoint, name="gpt4o", model="gpt-4o")
    data = endpoint_data(endpoint, api_key=API_KEY, ad_client_secret=AD_SECRET)
    response = admin_client.post(url(Endpoint, "change", endpoint.pk), data)
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    endpoint.refresh_from_db()
    assert (endpoint.api_key, endpoint.ad_client_secret) == SECRETS
    return endpoint


def staff_client(django_user_model, username: str, *codenames: str) -> Client:
    user = django_user_model.objects.create_user(username=username, password="unused", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="gateway", codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def assert_no_secret(client: Client, page: str) -> str:
    response = client.get(page)
    assert response.status_code == 200, page
    html = response.content.decode()
    for secret in SECRETS:
        assert secret not in html, page
    return html


def test_view_only_staff_see_whether_secrets_are_set_but_never_their_values(django_user_model, guarded):
    viewer = staff_client(django_user_model, "viewer", "view_endpoint", "view_deployment")
    change_page = viewer.get(url(Endpoint, "change", guarded.pk))
    assert change_page.context["has_change_permission"] is False  # really the read-only page

    html = assert_no_secret(viewer, url(Endpoint, "change", guarded.pk))
    assert "API key:" in html and "Client secret:" in html and ">set<" in html
    history = assert_no_secret(viewer, url(Endpoint, "history", guarded.pk))
    assert "Changed API key and Azure AD client secret." in history  # labels, not values
    for page in (
        url(Endpoint, "changelist"),
        url(Deployment, "changelist"),
        url(Deployment, "change", guarded.deployments.get().pk),
    ):
        assert_no_secret(viewer, page)


def test_change_only_staff_never_get_a_secret_back(django_user_model, guarded):
    editor = staff_client(django_user_model, "editor", "change_endpoint")
    html = assert_no_secret(editor, url(Endpoint, "change", guarded.pk))
    assert 'name="api_key"' in html  # the editable form, with an empty write-only input
    assert "removes the stored" in html  # the help text says what moving the endpoint does

    response = editor.post(url(Endpoint, "change", guarded.pk), endpoint_data(guarded, api_version="2025-01-01"))
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    guarded.refresh_from_db()
    assert (guarded.api_key, guarded.ad_client_secret) == SECRETS
    assert_no_secret(editor, url(Endpoint, "history", guarded.pk))


def test_changing_the_base_url_without_retyping_the_key_clears_the_secrets(django_user_model, guarded):
    editor = staff_client(django_user_model, "editor", "change_endpoint")
    data = endpoint_data(guarded, base_url="https://attacker.example.net")

    response = editor.post(url(Endpoint, "change", guarded.pk), data, follow=True)

    assert response.status_code == 200
    guarded.refresh_from_db()
    assert guarded.base_url == "https://attacker.example.net"
    assert (guarded.api_key, guarded.ad_client_secret) == ("", "")
    warnings = [str(m) for m in response.context["messages"] if m.level == WARNING]
    assert len(warnings) == 1
    assert "Base url changed" in warnings[0] and "API key and Azure AD client secret" in warnings[0]
    assert "were removed" in warnings[0]
    entry = LogEntry.objects.filter(object_id=str(guarded.pk)).latest("pk")
    assert entry.get_change_message() == "Changed Base url, API key and Azure AD client secret."
    history = assert_no_secret(editor, url(Endpoint, "history", guarded.pk))
    assert "Changed Base url, API key and Azure AD client secret." in history


def test_a_key_typed_again_with_the_new_base_url_is_kept(django_user_model, guarded):
    editor = staff_client(django_user_model, "editor", "change_endpoint")
    data = endpoint_data(guarded, base_url="https://moved.example.com", api_key="sk-for-the-new-host")

    response = editor.post(url(Endpoint, "change", guarded.pk), data, follow=True)

    guarded.refresh_from_db()
    assert (guarded.api_key, guarded.ad_client_secret) == ("sk-for-the-new-host", "")
    (warning,) = [str(m) for m in response.context["messages"] if m.level == WARNING]
    assert "Azure AD client secret" in warning and "API key" not in warning and "was removed" in warning


@pytest.mark.parametrize(
    "overrides",
    [
        {"kind": "openai"},
        {"ad_authority": "https://login.attacker.example.net"},
        {"ad_tenant_id": "another-tenant"},
    ],
    ids=lambda o: next(iter(o)),
)
def test_other_destination_changes_clear_the_secrets_too(admin_client, guarded, overrides):
    response = admin_client.post(url(Endpoint, "change", guarded.pk), endpoint_data(guarded, **overrides))
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    guarded.refresh_from_db()
    assert (guarded.api_key, guarded.ad_client_secret) == ("", "")


def test_switching_to_azure_ad_keeps_only_the_secret_typed_with_it(admin_client, guarded):
    data = endpoint_data(guarded, auth="azure_ad", ad_client_secret="fresh-ad-secret")
    assert admin_client.post(url(Endpoint, "change", guarded.pk), data).status_code == 302
    guarded.refresh_from_db()
    assert (guarded.auth, guarded.api_key, guarded.ad_client_secret) == ("azure_ad", "", "fresh-ad-secret")
