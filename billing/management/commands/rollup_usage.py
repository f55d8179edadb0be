"""``manage.py rollup_usage [--since DATETIME]``: run the roll-ups once, then the statements.

Without ``--since``: what the scheduled task does (the hours that got records since the last
run). With it: every hour from then on is recomputed from its records, for back-fills and after
repairs. Either way a second run changes nothing.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.rollups import usage_rollup
from billing.statements import statements_refresh


class Command(BaseCommand):
    help = "Roll usage records up into hourly, daily and monthly roll-ups, and refresh the statements."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since",
            type=_moment,
            default=None,
            help="Recompute every hour from this moment on: YYYY-MM-DD (00:00 UTC) or an ISO datetime (UTC if no zone).",
        )

    def handle(self, *args: Any, since: datetime | None, **options: Any) -> None:
        run = usage_rollup(since=since)
        if run.skipped:
            raise CommandError("another roll-up is running; try again when it has finished")
        statements = statements_refresh()
        self.stdout.write(
            f"rolled up {run.hours} hour(s), {run.days} day(s), {run.months} month(s): {run.rows} rows "
            f"in {run.seconds:.2f}s; statements: {statements.drafts} draft(s), {statements.frozen} frozen"
        )
        if run.too_old:
            self.stderr.write(f"{len(run.too_old)} hour(s) older than the retention period were left as they were")
        if options["verbosity"] > 1:
            self.stdout.write(json.dumps(run.as_dict()))


def _moment(text: str) -> datetime:
    try:
        moment = (
            datetime.combine(date.fromisoformat(text), time.min) if len(text) == 10 else datetime.fromisoformat(text)
        )
    except ValueError:
        raise CommandError(f"--since: not a date or ISO datetime: {text!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
