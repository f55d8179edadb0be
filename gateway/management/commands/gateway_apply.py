"""``manage.py gateway_apply FILE [--dry-run] [--prune]``: make the database match a configuration file.

The file is read and checked in full before anything is written; every problem is reported at
once. The plan is printed one change per line (secrets by field name only, never by value),
then written in a single transaction. Applying the same file again changes nothing.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from gateway.configfile.apply import ApplyPlan, config_apply
from gateway.configfile.loader import ConfigError, config_load, config_parse
from gateway.configfile.schema import ConfigFile


class Command(BaseCommand):
    help = "Create, update and (with --prune) remove endpoints, deployments, tenants and prices to match a YAML file."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="The YAML configuration file; '-' reads standard input.")
        parser.add_argument("--dry-run", action="store_true", help="Print the plan and write nothing.")
        parser.add_argument(
            "--prune",
            action="store_true",
            help="Also delete endpoints, deployments, prices and tenant quotas/policies the file does not name, "
            "and deactivate (never delete) tenants it does not name.",
        )

    def handle(self, *args: Any, file: str, dry_run: bool, prune: bool, verbosity: int, **options: Any) -> None:
        config = self._load(file)
        try:
            plan = config_apply(config, prune=prune, dry_run=dry_run)
        except DatabaseError as exc:
            raise CommandError(f"{file}: the database refused the apply and nothing was changed: {exc}") from exc
        self._report(plan, verbosity)
        if dry_run:
            self.stdout.write("Dry run: nothing was written.")
        elif not plan.changes:
            self.stdout.write("No changes; nothing was written.")
        else:
            self.stdout.write(self.style.SUCCESS(f"Applied {len(plan.changes)} change(s)."))

    def _load(self, file: str) -> ConfigFile:
        try:
            if file == "-":
                return config_parse(sys.stdin.read(), source="<stdin>")
            return config_load(file)
        except ConfigError as exc:
            count = len(exc.messages)
            noun = "problem" if count == 1 else "problems"
            raise CommandError(f"{exc}\n{count} {noun} found; nothing was written.") from None

    def _report(self, plan: ApplyPlan, verbosity: int) -> None:
        for change in plan.changes:
            self.stdout.write(change.describe())
        if verbosity >= 2:
            for label in plan.unchanged:
                self.stdout.write(f"= {label}")
            for label in plan.untouched:
                self.stdout.write(f"  {label}: not in the file, left alone")
        self.stdout.write(f"Plan: {plan.summary()}.")
