"""Writes to tenants and keys. The admin, the management commands and (later) the REST API call these."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from gateway import defaults
from tenants.keys import key_generate, key_hash, key_visible_prefix, management_token_generate
from tenants.models import ClientKey, ManagementToken, Quota, Tenant


@dataclass(frozen=True)
class IssuedKey:
    """A key just issued. ``secret`` exists only here: it is shown once and never stored."""

    key: ClientKey
    secret: str


@transaction.atomic
def key_issue(
    tenant: Tenant,
    *,
    name: str,
    expires_at: datetime | None = None,
    allowed_models: list[str] | None = None,
    default_priority: int = defaults.DEFAULT_PRIORITY,
    best_priority: int | None = None,
) -> IssuedKey:
    """Create a key for ``tenant`` and return its secret, which the caller must show exactly once.

    ``best_priority``: the best priority its requests may ask for (None: ``default_priority``).
    """
    secret = key_generate()
    key = ClientKey.objects.create(
        tenant=tenant,
        name=name,
        prefix=key_visible_prefix(secret),
        key_hash=key_hash(secret),
        expires_at=expires_at,
        allowed_models=list(allowed_models or []),
        default_priority=default_priority,
        best_priority=best_priority,
    )
    return IssuedKey(key=key, secret=secret)


def key_revoke(key: ClientKey) -> None:
    """Refuse the key from now on. Idempotent: a revoked key keeps its first revocation time."""
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])


def key_expire(key: ClientKey) -> None:
    """Make the key expire now (unlike revocation, this reads as a planned end of life)."""
    now = timezone.now()
    if key.expires_at is None or key.expires_at > now:
        key.expires_at = now
        key.save(update_fields=["expires_at"])


COUNTER_PERIODS = {"day": "day_counters_reset_at", "month": "month_counters_reset_at"}


def quota_counters_reset(quota: Quota, period: str) -> None:
    """Start the quota's budget counters for the current day or month afresh, from now on.

    Every gateway process sees the new reset time with the next configuration snapshot and counts
    that period again from the usage records made since: requests in flight at the reset no
    longer count. The rate-limit windows are not reset (they empty within a minute anyway).
    """
    field = COUNTER_PERIODS[period]
    setattr(quota, field, timezone.now())
    quota.save(update_fields=[field, "updated_at"])


@dataclass(frozen=True)
class IssuedManagementToken:
    """A management token just issued. ``secret`` exists only here: it is shown once."""

    token: ManagementToken
    secret: str


def management_token_issue(
    *, name: str, created_by: Any, expires_at: datetime, tenant: Tenant | None = None
) -> IssuedManagementToken:
    """Create a management API token (a tenant's, or with no tenant a staff token acting as ``created_by``)."""
    secret = management_token_generate()
    token = ManagementToken.objects.create(
        tenant=tenant,
        name=name,
        prefix=key_visible_prefix(secret),
        token_hash=key_hash(secret),
        created_by=created_by,
        expires_at=expires_at,
    )
    return IssuedManagementToken(token=token, secret=secret)


def management_token_revoke(token: ManagementToken) -> None:
    """Refuse the token from now on. Idempotent."""
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
