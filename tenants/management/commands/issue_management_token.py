"""``manage.py issue_management_token USERNAME --name NAME [--tenant SLUG] [--days N]``.

Issues a management API token (``/api/v1/``) and prints its secret once. Without ``--tenant`` it
is a staff token acting as USERNAME (who must be active staff); with one, a team lead's token
scoped to that tenant. The same service as the admin and the API (``management_token_issue``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from tenants.models import Tenant
from tenants.services import management_token_issue


class Command(BaseCommand):
    help = "Issue a management API token and print its secret once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", help="Who issues it (a staff token acts as this user).")
        parser.add_argument("--name", required=True, help="What the token is for (e.g. the pipeline's name).")
        parser.add_argument("--tenant", default=None, help="A tenant's slug: the token is scoped to that tenant.")
        parser.add_argument("--days", type=int, default=90, help="Days until it expires (default 90).")

    def handle(self, *args: Any, username: str, name: str, tenant: str | None, days: int, **options: Any) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user {username!r}.")
        if tenant is None and not (user.is_active and user.is_staff):
            raise CommandError(f"{username!r} is not active staff: a staff token would not work.")
        if days < 1:
            raise CommandError("--days must be at least 1.")
        scope = None
        if tenant is not None:
            scope = Tenant.objects.filter(slug=tenant).first()
            if scope is None:
                raise CommandError(f"No tenant {tenant!r}.")
        issued = management_token_issue(
            name=name, created_by=user, expires_at=timezone.now() + timedelta(days=days), tenant=scope
        )
        self.stdout.write(issued.secret)
