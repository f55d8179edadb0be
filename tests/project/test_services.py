"""endpoint_update: a stored secret is never kept for a destination it was not entered for."""

from __future__ import annotations

import pytest
from django.db.models.signals import post_save

from gateway.models import Endpoint
from gateway.services import DESTINATION_FIELDS, endpoint_update

API_KEY = "sk-stored-api-key-1111"
AD_SECRET = "ad-stored-client-secret-2222"

MOVES = {
    "kind": "openai",
    "base_url": "https://elsewhere.example.com",
    "auth": "azure_ad",
    "ad_authority": "https://login.elsewhere.example.com",
    "ad_tenant_id": "another-tenant",
}


@pytest.fixture
def stored(db) -> Endpoint:
    return Endpoint.objects.create(
        name="east",
        base_url="https://east.example.com",
        api_key=API_KEY,
        ad_tenant_id="contoso",
        ad_client_id="gateway-app",
        ad_client_secret=AD_SECRET,
    )


def test_every_destination_field_is_covered() -> None:
    assert set(MOVES) == set(DESTINATION_FIELDS)


@pytest.mark.parametrize("column", sorted(MOVES))
def test_changing_the_destination_clears_the_secrets_not_given_again(stored: Endpoint, column: str) -> None:
    result = endpoint_update(stored, {column: MOVES[column]})

    stored.refresh_from_db()
    assert (stored.api_key, stored.ad_client_secret) == ("", "")
    assert getattr(stored, column) == MOVES[column]
    assert result.moved == (column,)
    assert result.cleared == ("api_key", "ad_client_secret")


def test_a_secret_given_again_with_the_move_is_kept_and_the_other_cleared(stored: Endpoint) -> None:
    result = endpoint_update(stored, {"base_url": MOVES["base_url"], "api_key": API_KEY})

    stored.refresh_from_db()
    assert (stored.api_key, stored.ad_client_secret) == (API_KEY, "")
    assert result.cleared == ("ad_client_secret",)
    assert result.changed == ("base_url", "ad_client_secret")  # the key was given, with its old value


@pytest.mark.parametrize(
    "values",
    [{"api_version": "2025-01-01"}, {"ad_client_id": "other-app"}, {"connect_timeout": 2.0}, {"enabled": False}],
)
def test_changes_that_do_not_move_the_endpoint_keep_its_secrets(stored: Endpoint, values: dict) -> None:
    result = endpoint_update(stored, values)

    stored.refresh_from_db()
    assert (stored.api_key, stored.ad_client_secret) == (API_KEY, AD_SECRET)
    assert (result.moved, result.cleared, result.changed) == ((), (), tuple(values))


def test_a_destination_given_unchanged_is_no_move(stored: Endpoint) -> None:
    result = endpoint_update(stored, {"base_url": stored.base_url, "kind": stored.kind, "api_version": "2025-01-01"})
    stored.refresh_from_db()
    assert stored.api_key == API_KEY and result.moved == ()


def test_an_empty_secret_removes_it_and_a_new_one_replaces_it(stored: Endpoint) -> None:
    endpoint_update(stored, {"api_key": "", "ad_client_secret": "rotated-ad-secret"})
    stored.refresh_from_db()
    assert (stored.api_key, stored.ad_client_secret) == ("", "rotated-ad-secret")


def test_only_changed_columns_are_written_through_save(stored: Endpoint) -> None:
    # Someone else's edit, made after `stale` was read, must survive a save of other columns.
    stale = Endpoint.objects.get(pk=stored.pk)
    Endpoint.objects.filter(pk=stored.pk).update(api_version="2099-01-01")
    saved: list[frozenset[str] | None] = []

    def on_save(sender, update_fields=None, **kwargs) -> None:
        saved.append(update_fields)

    # post_save is also what bumps the config version for the gateway processes.
    post_save.connect(on_save, sender=Endpoint)
    try:
        endpoint_update(stale, {"connect_timeout": 2.0})
    finally:
        post_save.disconnect(on_save, sender=Endpoint)

    stored.refresh_from_db()
    assert (stored.api_version, stored.connect_timeout) == ("2099-01-01", 2.0)
    assert saved == [frozenset({"connect_timeout", "updated_at"})]


def test_without_save_nothing_is_written(stored: Endpoint) -> None:
    result = endpoint_update(stored, {"base_url": MOVES["base_url"]}, save=False)
    assert stored.api_key == "" and result.cleared == ("api_key", "ad_client_secret")
    assert Endpoint.objects.get(pk=stored.pk).api_key == API_KEY


def test_an_unknown_column_is_refused(stored: Endpoint) -> None:
    with pytest.raises(ValueError, match="not columns of Endpoint: api_secret"):
        endpoint_update(stored, {"api_secret": "x"})
