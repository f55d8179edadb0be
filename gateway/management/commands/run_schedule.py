"""``manage.py run_schedule``: the beat schedule in this process, for deployments without Redis.

``make run`` does this in its demo process already. With a broker configured, Celery beat and a
worker do the work and this command refuses to run (it would do everything twice).
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from gateway.scheduler import EmbeddedScheduler, broker_configured


class Command(BaseCommand):
    help = "Run the periodic tasks (roll-ups, statements, purge, ...) on a timer in this process."

    def handle(self, *args: Any, **options: Any) -> None:
        if broker_configured():
            raise CommandError(
                "a Celery broker is configured: run `celery -A gateway.celery beat` and a worker instead"
            )
        scheduler = EmbeddedScheduler().start()
        self.stdout.write("running the beat schedule in process; Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            scheduler.stop()
