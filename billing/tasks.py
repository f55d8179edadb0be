"""Celery tasks of billing: thin shells around the services, safe to run twice or at once.

Scheduled in ``settings.CELERY_BEAT_SCHEDULE``; beat sends them to the worker on Redis, and
without a broker ``gateway.scheduler`` runs the same schedule in process.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.db import DatabaseError

from billing.rollups import usage_purge, usage_rollup
from billing.statements import statements_refresh

log = logging.getLogger(__name__)


@shared_task(
    name="billing.usage_rollup",
    autoretry_for=(DatabaseError,),
    retry_backoff=5,
    retry_backoff_max=60,
    max_retries=3,
)
def usage_rollup_task() -> dict[str, Any]:
    """Roll up what arrived since the last run, then recompute draft statements and freeze the
    statements of closed months."""
    run = usage_rollup()
    result = run.as_dict()
    if not run.skipped:
        statements = statements_refresh()
        result.update(statement_drafts=statements.drafts, statements_frozen=statements.frozen)
    log.info("usage roll-up: %s", result)
    return result


@shared_task(name="billing.usage_purge", autoretry_for=(DatabaseError,), retry_backoff=30, max_retries=3)
def usage_purge_task() -> int:
    """Delete raw usage records past ``GATEWAY_USAGE_RETENTION_DAYS`` (already rolled up)."""
    deleted = usage_purge()
    if deleted:
        log.info("usage purge: %d records older than the retention period deleted", deleted)
    return deleted
