"""The configuration version: bumped whenever something the request path reads changes.

Processes compare it with the version their in-memory snapshot was built from and rebuild when
it moved. The database row is the truth. When Redis is configured the number is also mirrored
to a Redis key, a hint that lets processes notice a change with one GET every poll; but a bump
made where ``REDIS_URL`` is unset (a shell, a cron job) or while Redis is down never reaches
the mirror, so processes read the row as well (``gateway.snapshot.refresher``) and repair the
mirror when it lags.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.db.models.signals import post_delete, post_save

log = logging.getLogger(__name__)


def mirror_key() -> str:
    """The mirror's key, under the installation's Redis prefix: two gateways sharing one Redis
    (staging and production, or a test suite's workers) must not read each other's versions."""
    return f"{settings.GATEWAY['BALANCER_REDIS_PREFIX']}:config-version"


def config_version_read() -> int:
    """The current version from the database (sync; callers on the event loop use a thread)."""
    from gateway.models import ConfigVersion

    row = ConfigVersion.objects.filter(pk=1).values_list("version", flat=True).first()
    return row or 0


def config_version_bump() -> None:
    """Move the version on, after the surrounding transaction commits (so readers see the change)."""
    connection = transaction.get_connection()
    # Django keeps (savepoints, callback, robust) tuples; a rollback drops ours with them.
    if any(entry[1] is _bump_now for entry in connection.run_on_commit):
        return
    transaction.on_commit(_bump_now)


def _bump_now() -> None:
    from gateway.models import ConfigVersion

    updated = ConfigVersion.objects.filter(pk=1).update(version=F("version") + 1)
    if not updated:
        ConfigVersion.objects.get_or_create(pk=1, defaults={"version": 1})
    if settings.REDIS_URL:
        _mirror_to_redis(config_version_read())


def _mirror_to_redis(version: int) -> None:
    import redis

    from gateway.redis_clients import redis_sync_client

    try:
        client = redis_sync_client()
        try:
            client.set(mirror_key(), version)
        finally:
            client.close()
    except (redis.RedisError, redis.exceptions.RedisClusterException):  # (a cluster with no node to ask)
        # The database holds the version; every process also reads it there, within a second or so.
        log.warning("could not mirror config version %s to Redis", version, exc_info=True)


class VersionMirror:
    """The Redis copy of the version, for a process's refresher (asyncio; one GET or SET per call).

    Never the truth: ``read`` answers None when Redis has no copy or cannot be reached, and
    the caller falls back to the database.
    """

    def __init__(self, client, key: str | None = None) -> None:
        self.client = client
        self.key = key or mirror_key()
        self.reachable = True  # whether the last read got an answer

    async def read(self) -> int | None:
        try:
            value = await self.client.get(self.key)
        except Exception as exc:  # Redis down or paused (bounded by the client's timeout)
            self.reachable = False
            log.debug("could not read the config version from Redis: %s", exc)
            return None
        self.reachable = True
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None  # garbage in the key: repaired from the database

    async def write(self, version: int) -> None:
        try:
            await self.client.set(mirror_key(), version)
        except Exception as exc:
            log.debug("could not repair the config version in Redis: %s", exc)


def _on_change(sender, **kwargs) -> None:
    config_version_bump()


def connect_config_signals() -> None:
    """Bump the version on every save or delete of a model the snapshot is built from."""
    from billing.models import Price
    from gateway.models import Deployment, Endpoint
    from tenants.models import AccessPolicy, ClientKey, Quota, Tenant

    for model in (Endpoint, Deployment, Tenant, ClientKey, Quota, AccessPolicy, Price):
        post_save.connect(_on_change, sender=model, dispatch_uid=f"config-version-save-{model.__name__}")
        post_delete.connect(_on_change, sender=model, dispatch_uid=f"config-version-delete-{model.__name__}")
