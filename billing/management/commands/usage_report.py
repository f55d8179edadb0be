"""``manage.py usage_report --tenant T --month YYYY-MM [--format csv|json]``: a month's statement.

Prints the stored statement (final once the month has closed, else the latest draft), or, when
none is stored yet, a draft computed now from the roll-ups. The same document the team page and
the admin offer for download.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.exports import FORMATS, statement_text
from billing.periods import parse_month
from billing.statements import statement_document, statement_for
from tenants.models import Tenant


class Command(BaseCommand):
    help = "Print a tenant's statement for a month as CSV or JSON."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="The tenant's slug.")
        parser.add_argument("--month", required=True, help="YYYY-MM (UTC).")
        parser.add_argument("--format", choices=FORMATS, default="csv")

    def handle(self, *args: Any, tenant: str, month: str, format: str, **options: Any) -> None:
        owner = Tenant.objects.filter(slug=tenant).first()
        if owner is None:
            raise CommandError(f"no tenant {tenant!r}")
        try:
            start = parse_month(month)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        statement = statement_for(owner.pk, start)
        statement.tenant = owner
        self.stdout.write(statement_text(statement_document(statement), format), ending="")
