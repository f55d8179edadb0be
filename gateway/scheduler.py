"""The beat schedule without a broker: ``settings.CELERY_BEAT_SCHEDULE`` run on a timer in process.

With the embedded defaults there is no Redis for Celery, so nothing would ever send the periodic
tasks. ``EmbeddedScheduler`` reads the same schedule as beat (every entry, whichever app added
it) and runs each due task in its own daemon thread with ``Task.apply`` (Celery's in-process
call: the same code a worker runs). ``make run``'s demo process (``gateway.demo``) starts one when
no broker is configured; ``manage.py run_schedule`` runs one in the foreground. Not the gateway
processes themselves: roll-ups would take the GIL from the request path, and several gateway
processes would each run them.

Tasks run one after another; one that fails is logged and runs again at its next time.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery.schedules import maybe_schedule
from django.conf import settings
from django.db import close_old_connections, connections
from django.utils import timezone

log = logging.getLogger(__name__)


def broker_configured() -> bool:
    """Whether Celery has a real broker (then beat and a worker do this work, not this module)."""
    return not str(settings.CELERY_BROKER_URL).startswith("memory://")


@dataclass
class _Entry:
    name: str
    task: str
    schedule: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    last_run_at: datetime | None = None  # None: due at once
    runs: int = 0
    failures: int = 0


class EmbeddedScheduler:
    """Runs the beat schedule in a background thread until ``stop()``."""

    def __init__(self, schedule: dict[str, dict[str, Any]] | None = None, max_sleep: float = 5.0) -> None:
        from gateway.celery import app

        self.app = app
        app.loader.import_default_modules()  # registers every app's tasks
        entries = settings.CELERY_BEAT_SCHEDULE if schedule is None else schedule
        self.entries = [
            _Entry(
                name=name,
                task=entry["task"],
                schedule=maybe_schedule(entry["schedule"], app=app),
                args=tuple(entry.get("args", ())),
                kwargs=dict(entry.get("kwargs", {})),
            )
            for name, entry in entries.items()
        ]
        unknown = [entry.task for entry in self.entries if entry.task not in app.tasks]
        if unknown:
            raise LookupError(f"the beat schedule names tasks nobody registered: {', '.join(unknown)}")
        self.max_sleep = max_sleep
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> EmbeddedScheduler:
        self._thread = threading.Thread(target=self.run_forever, name="embedded-scheduler", daemon=True)
        self._thread.start()
        log.info("embedded scheduler: %s", ", ".join(f"{e.task} every {e.schedule}" for e in self.entries))
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        try:
            while not self._stop.is_set():
                self._stop.wait(min(self.run_due(), self.max_sleep))
        finally:
            connections.close_all()

    def run_due(self) -> float:
        """Run every entry that is due now; returns the seconds until the next one is."""
        next_in = self.max_sleep
        for entry in self.entries:
            if self._stop.is_set():
                break
            due, wait = (True, 0.0) if entry.last_run_at is None else entry.schedule.is_due(entry.last_run_at)
            if due:
                entry.last_run_at = timezone.now()
                self._run(entry)
                wait = entry.schedule.remaining_estimate(entry.last_run_at).total_seconds()
            next_in = min(next_in, max(wait, 0.0))
        return next_in

    def _run(self, entry: _Entry) -> None:
        close_old_connections()
        started = time.monotonic()
        result = self.app.tasks[entry.task].apply(args=entry.args, kwargs=entry.kwargs)
        entry.runs += 1
        if result.failed():
            entry.failures += 1
            log.error("scheduled task %s failed:\n%s", entry.task, result.traceback)
        else:
            log.debug("scheduled task %s done in %.2fs", entry.task, time.monotonic() - started)
        close_old_connections()
