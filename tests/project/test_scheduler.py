"""The beat schedule: one place (settings), every entry's task registered, and the embedded
scheduler runs each entry, whichever app added it, on its interval without a broker."""

from __future__ import annotations

import logging
import time

import pytest
from django.conf import settings

from gateway.celery import app
from gateway.scheduler import EmbeddedScheduler, broker_configured

calls: list[str] = []


@app.task(name="tests.scheduler_probe")
def probe(label: str) -> str:
    calls.append(label)
    return label


@app.task(name="tests.scheduler_failure")
def failure() -> None:
    raise RuntimeError("boom")


@pytest.fixture(autouse=True)
def _no_calls():
    calls.clear()


def test_every_scheduled_task_is_registered_with_the_celery_app():
    app.loader.import_default_modules()
    assert {"billing.usage_rollup", "billing.usage_purge"} <= {
        e["task"] for e in settings.CELERY_BEAT_SCHEDULE.values()
    }
    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        assert entry["task"] in app.tasks, entry["task"]
    EmbeddedScheduler()  # refuses a schedule naming an unknown task, see below


def test_an_unknown_task_in_the_schedule_is_refused():
    with pytest.raises(LookupError, match="nobody registered"):
        EmbeddedScheduler({"typo": {"task": "billing.usage_rolup", "schedule": 60}})


def test_each_entry_runs_at_once_then_on_its_interval():
    scheduler = EmbeddedScheduler(
        {
            "fast": {"task": "tests.scheduler_probe", "schedule": 0.2, "args": ("fast",)},
            "slow": {"task": "tests.scheduler_probe", "schedule": 3600, "kwargs": {"label": "slow"}},
        },
        max_sleep=0.05,
    ).start()
    try:
        deadline = time.monotonic() + 5
        while calls.count("fast") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.stop()
    assert calls.count("fast") >= 3
    assert calls.count("slow") == 1


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# The scheduler drops stale database connections around each task (close_old_connections), here on
# the test's own thread: that is database access, however little, and allowed only with the mark.
@pytest.mark.django_db
def test_a_failing_task_is_logged_and_the_others_still_run():
    scheduler = EmbeddedScheduler(
        {
            "bad": {"task": "tests.scheduler_failure", "schedule": 3600},
            "good": {"task": "tests.scheduler_probe", "schedule": 3600, "args": ("good",)},
        }
    )
    # A handler on the module's logger itself: Celery rearranges the root logger's handlers.
    collect = _Collect()
    logger = logging.getLogger("gateway.scheduler")
    logger.addHandler(collect)
    try:
        scheduler.run_due()
    finally:
        logger.removeHandler(collect)
    assert calls == ["good"]
    [message] = collect.messages
    assert "tests.scheduler_failure failed" in message and "boom" in message
    assert [(e.runs, e.failures) for e in scheduler.entries] == [(1, 1), (1, 0)]


def test_without_a_broker_the_embedded_scheduler_is_the_one_to_run(settings):
    settings.CELERY_BROKER_URL = "memory://"
    assert not broker_configured()
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"
    assert broker_configured()
