"""issue_key: the secret is printed once, authenticates, and mistakes are refused clearly."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import pytest
from django.core.management import CommandError, call_command

from tenants.models import ClientKey


def issue(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("issue_key", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def secret_of(output: str) -> str:
    """The secret is the line after the one that says it is shown once."""
    lines = output.splitlines()
    index = next(i for i, line in enumerate(lines) if "shown only this once" in line)
    return lines[index + 1]


@pytest.mark.django_db
def test_issued_secret_authenticates_and_is_shown_once(tenant_a) -> None:
    output, _ = issue("team-a", "--name", "ci")

    key = ClientKey.objects.get(tenant=tenant_a, name="ci")
    secret = secret_of(output)
    assert hashlib.sha256(secret.encode()).hexdigest() == key.key_hash
    assert output.count(secret) == 1
    assert f"id {key.pk}" in output and f"prefix {key.prefix}" in output
    assert secret.startswith(key.prefix)
    # Only the hash and the prefix are stored: nothing in the row holds the secret.
    assert secret not in {str(value) for value in ClientKey.objects.filter(pk=key.pk).values().get().values()}


@pytest.mark.django_db
def test_expiry_models_and_priority_are_stored(tenant_a, ptu_deployment) -> None:
    issue("team-a", "--name", "batch", "--expires", "2999-12-31", "--models", "gpt-4o, gpt-4o-mini", "--priority", "9")

    key = ClientKey.objects.get(name="batch")
    assert key.expires_at == datetime(2999, 12, 31, tzinfo=UTC)
    assert key.allowed_models == ["gpt-4o", "gpt-4o-mini"]
    assert key.default_priority == 9


@pytest.mark.django_db
def test_best_priority_is_stored_and_defaults_to_the_priority(tenant_a) -> None:
    issue("team-a", "--name", "urgent", "--priority", "5", "--best-priority", "1")
    issue("team-a", "--name", "plain", "--priority", "4")

    urgent, plain = ClientKey.objects.get(name="urgent"), ClientKey.objects.get(name="plain")
    assert (urgent.best_priority, urgent.effective_best_priority) == (1, 1)
    assert (plain.best_priority, plain.effective_best_priority) == (None, 4)


@pytest.mark.django_db
def test_a_best_priority_worse_than_the_priority_is_refused(tenant_a) -> None:
    with pytest.raises(CommandError, match=r"--best-priority must be between 0 and the --priority \(5\), got 6"):
        issue("team-a", "--name", "odd", "--priority", "5", "--best-priority", "6")
    assert not ClientKey.objects.exists()


@pytest.mark.django_db
def test_expiry_accepts_an_iso_datetime(tenant_a) -> None:
    issue("team-a", "--name", "timed", "--expires", "2999-06-01T18:00:00+02:00")

    assert ClientKey.objects.get(name="timed").expires_at == datetime(2999, 6, 1, 16, tzinfo=UTC)


@pytest.mark.django_db
def test_a_model_no_deployment_serves_draws_a_warning(tenant_a, ptu_deployment) -> None:
    _, err = issue("team-a", "--name", "typo", "--models", "gpt-4o,gtp-4o")

    assert "no deployment serves model 'gtp-4o'" in err and "'gpt-4o'" not in err


@pytest.mark.django_db
def test_unknown_tenant_lists_the_known_ones(tenant_a, tenant_b) -> None:
    with pytest.raises(CommandError, match=r"unknown tenant 'team-x'; known: team-a, team-b"):
        issue("team-x", "--name", "ci")
    assert not ClientKey.objects.exists()


@pytest.mark.django_db
def test_a_name_already_used_by_the_tenant_is_refused(key_a) -> None:
    with pytest.raises(CommandError, match=r"tenant 'team-a' already has a key named 'app-a'"):
        issue("team-a", "--name", "app-a")
    assert ClientKey.objects.filter(tenant__slug="team-a").count() == 1


@pytest.mark.django_db
def test_the_same_name_is_fine_for_another_tenant(key_a, tenant_b) -> None:
    issue("team-b", "--name", "app-a")

    assert ClientKey.objects.filter(name="app-a").count() == 2


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("expires", "message"),
    [
        ("2026-13-45", "is not a date"),
        ("next tuesday", "is not a date"),
        ("2001-01-01", "is in the past"),
    ],
)
def test_a_bad_expiry_is_refused(tenant_a, expires: str, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        issue("team-a", "--name", "ci", "--expires", expires)
    assert not ClientKey.objects.exists()
