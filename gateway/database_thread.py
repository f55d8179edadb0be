"""One worker thread for the ORM work of an asyncio component.

Django's ORM is synchronous and its connections belong to the thread that opened them. A component
running on the event loop (the snapshot refresher, the usage writer, the quota seeding and
reconciliation) does its database work in a thread of its own, so that a slow query never holds
the loop, and closes that thread's connection there when it stops: a thread of asyncio's default
executor would keep its connection open until the garbage collector happened to find it (a test
suite starting a runtime per test ran out of PostgreSQL connections that way). Before each call the
thread drops a connection that failed or outlived ``CONN_MAX_AGE`` (a restarted database), as
Django does between requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class DatabaseThread:
    """Started on first use, again after ``stop``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``function(*args)`` in the thread, as a future of the running loop."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        return asyncio.get_running_loop().run_in_executor(self._executor, _with_usable_connection, function, args)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await self.submit(function, *args)

    def stop(self) -> None:
        """Close the thread's database connection in the thread, after what is queued; never waits."""
        executor, self._executor = self._executor, None
        if executor is not None:
            from django.db import connections

            executor.submit(connections.close_all)
            executor.shutdown(wait=False)


def _with_usable_connection(function: Callable[..., T], args: tuple[Any, ...]) -> T:
    from django.db import close_old_connections

    close_old_connections()
    return function(*args)
