"""Health probes for load balancers and orchestrators, answered without Django's middleware.

``/healthz``: the process is up and its event loop answers. ``/readyz``: it can do its job: the
database answers and, when configured, Redis answers. Neither needs a key or leaves a usage record.
"""

from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection


def _database_ok() -> bool:
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        return False
    finally:
        connection.close_if_unusable_or_obsolete()


async def _redis_ok() -> bool | None:
    if not settings.REDIS_URL:
        return None
    from gateway.redis_clients import redis_async_client

    client = redis_async_client()
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def _respond(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def healthz(scope, receive, send) -> None:
    await _respond(send, 200, {"status": "ok"})


async def readyz(scope, receive, send) -> None:
    database = await sync_to_async(_database_ok, thread_sensitive=False)()
    redis_state = await _redis_ok()
    ready = database and redis_state is not False
    checks = {"database": "ok" if database else "down"}
    if redis_state is not None:
        checks["redis"] = "ok" if redis_state else "down"
    await _respond(send, 200 if ready else 503, {"status": "ready" if ready else "not ready", "checks": checks})
