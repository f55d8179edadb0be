"""``manage.py issue_key TENANT --name NAME [--expires WHEN] [--models m1,m2] [--priority N] [--best-priority N]``.

Issues a client key through ``tenants.services.key_issue`` (the same service the admin uses) and
prints its secret exactly once: only its hash is stored, so it can never be shown again.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError
from django.utils import timezone

from gateway import defaults
from gateway.models import Deployment
from tenants.models import ClientKey, Tenant
from tenants.services import key_issue

PRIORITY_MAX = 32_767  # ClientKey.default_priority is a PositiveSmallIntegerField


class Command(BaseCommand):
    help = "Issue a client key for a tenant and print its secret once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant", help="The tenant's slug.")
        parser.add_argument(
            "--name", required=True, help="A name for the key, unique within the tenant (e.g. the application's)."
        )
        parser.add_argument(
            "--expires",
            default=None,
            help="When the key stops working: YYYY-MM-DD (00:00 UTC that day) or an ISO datetime (UTC if no zone).",
        )
        parser.add_argument(
            "--models", default="", help="Comma-separated models this key may use; default: whatever the tenant allows."
        )
        parser.add_argument(
            "--priority",
            type=int,
            default=defaults.DEFAULT_PRIORITY,
            help=f"Default queue priority, lower first (default {defaults.DEFAULT_PRIORITY}).",
        )
        parser.add_argument(
            "--best-priority",
            type=int,
            default=None,
            help="The best priority a request may ask for in its body (default: the --priority).",
        )

    def handle(
        self,
        *args: Any,
        tenant: str,
        name: str,
        expires: str | None,
        models: str,
        priority: int,
        best_priority: int | None,
        **options: Any,
    ) -> None:
        owner = _tenant(tenant)
        name = name.strip()
        if not name:
            raise CommandError("--name must not be empty")
        if not 0 <= priority <= PRIORITY_MAX:
            raise CommandError(f"--priority must be between 0 and {PRIORITY_MAX}, got {priority}")
        if best_priority is not None and not 0 <= best_priority <= priority:
            raise CommandError(
                f"--best-priority must be between 0 and the --priority ({priority}), got {best_priority}"
            )
        expires_at = _expiry(expires) if expires else None
        allowed = [model.strip() for model in models.split(",") if model.strip()]
        taken = f"tenant {owner.slug!r} already has a key named {name!r}; choose another --name"
        if ClientKey.objects.filter(tenant=owner, name=name).exists():
            raise CommandError(taken)
        try:
            issued = key_issue(
                owner,
                name=name,
                expires_at=expires_at,
                allowed_models=allowed,
                default_priority=priority,
                best_priority=best_priority,
            )
        except IntegrityError:
            # Someone issued a key with this name between the check above and now.
            raise CommandError(taken) from None

        self._warn(owner, allowed)
        key = issued.key
        self.stdout.write(f"Issued key {key.name!r} for tenant {owner.slug} (id {key.pk}, prefix {key.prefix}).")
        if key.expires_at:
            self.stdout.write(f"Expires at {key.expires_at.isoformat()}.")
        self.stdout.write("Secret (shown only this once; it is not stored and cannot be recovered):")
        self.stdout.write(issued.secret)

    def _warn(self, owner: Tenant, allowed: list[str]) -> None:
        """Point out what would make the new key fail at its first request."""
        if not owner.active:
            self.stderr.write(f"Warning: tenant {owner.slug} is inactive; its keys are refused until it is activated.")
        served = set(Deployment.objects.filter(model__in=allowed).values_list("model", flat=True))
        for model in allowed:
            if model not in served:
                self.stderr.write(f"Warning: no deployment serves model {model!r}.")


def _tenant(slug: str) -> Tenant:
    try:
        return Tenant.objects.get(slug=slug)
    except Tenant.DoesNotExist:
        known = ", ".join(Tenant.objects.order_by("slug").values_list("slug", flat=True)) or "none"
        raise CommandError(f"unknown tenant {slug!r}; known: {known}") from None


def _expiry(text: str) -> datetime:
    """``YYYY-MM-DD`` (midnight UTC) or an ISO datetime (UTC when it names no zone), in the future."""
    try:
        moment = (
            datetime.combine(date.fromisoformat(text), time.min) if len(text) == 10 else datetime.fromisoformat(text)
        )
    except ValueError:
        raise CommandError(
            f"--expires {text!r} is not a date (YYYY-MM-DD) or an ISO datetime (e.g. 2026-12-31T18:00:00+01:00)"
        ) from None
    if timezone.is_naive(moment):
        moment = moment.replace(tzinfo=UTC)
    if moment <= timezone.now():
        raise CommandError(f"--expires {text!r} is in the past; a key must expire in the future")
    return moment
