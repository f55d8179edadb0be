"""``manage.py purge_usage``: delete raw usage records past ``GATEWAY_USAGE_RETENTION_DAYS`` now.

The scheduled task does the same every hour. Only records the roll-ups have read are deleted.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from billing.rollups import usage_purge


class Command(BaseCommand):
    help = "Delete usage records older than the retention period (roll-ups and statements stay)."

    def handle(self, *args: Any, **options: Any) -> None:
        days = settings.GATEWAY["USAGE_RETENTION_DAYS"]
        if days <= 0:
            self.stdout.write("GATEWAY_USAGE_RETENTION_DAYS is 0: usage records are kept forever")
            return
        self.stdout.write(f"deleted {usage_purge()} usage record(s) older than {days} days")
