"""Reading a request body without letting clients hold the process hostage, and preparing big ones
off the event loop.

* Time: the whole body must arrive within ``BODY_READ_TIMEOUT_SECONDS`` of the first read
  (a client that stalls or trickles gets 408), so slow senders cannot pin connections and
  buffers for ever.
* Size: ``MAX_BODY_BYTES`` per request (413, from the declared ``content-length`` when there is
  one, else as soon as the bytes pass it).
* Memory: the bytes of every body read but not yet admitted (parsed, checked and handed to
  the balancer) count against ``MAX_BUFFERED_BODY_BYTES`` for the whole process; a body that
  would pass it gets 503 with ``Retry-After``. The key is checked before any of this, so only
  clients holding a valid key can make the gateway buffer at all.
* CPU: bodies above ``OFFLOAD_BODY_BYTES`` are parsed, checked and counted in a small thread
  pool (``offload``): a 5 MB prompt takes ~100 ms to count, which on the event loop would
  stall every stream of the process for as long.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.conf import settings

from gateway.proxy import errors

T = TypeVar("T")


class ClientLeft(Exception):
    """The client disconnected before its body was complete."""


class BodyBudget:
    """Bytes of request bodies this process holds before admission; one instance, ``budget``.

    Only touched from the event loop, so plain arithmetic is enough.
    """

    def __init__(self) -> None:
        self.used = 0

    def fits(self, size: int) -> bool:
        return self.used + size <= settings.GATEWAY["MAX_BUFFERED_BODY_BYTES"]


budget = BodyBudget()


class BodyReader:
    """Reads one request's body; its bytes count against ``budget`` until ``release()``."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]], headers) -> None:
        self.receive = receive
        self.declared = declared_length(headers)
        self.held = 0

    def check_declared(self) -> None:
        """Refuse from the headers alone: a declared length above the limit (413) or above what the
        process can still buffer (503)."""
        limit = settings.GATEWAY["MAX_BODY_BYTES"]
        if self.declared > limit:
            raise errors.too_large(limit)
        if self.declared and not budget.fits(self.declared):
            raise errors.overloaded()

    async def read(self) -> bytes:
        """The whole body, or GatewayError (408, 413, 503) or ClientLeft."""
        self.check_declared()
        timeout = settings.GATEWAY["BODY_READ_TIMEOUT_SECONDS"]
        try:
            async with asyncio.timeout(timeout):
                return await self._read_all()
        except TimeoutError:
            raise errors.body_timeout(timeout) from None

    async def _read_all(self) -> bytes:
        limit = settings.GATEWAY["MAX_BODY_BYTES"]
        chunks: list[bytes] = []
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft()
            chunk = message.get("body", b"")
            if chunk:
                if self.held + len(chunk) > limit:
                    raise errors.too_large(limit)
                if not budget.fits(len(chunk)):
                    raise errors.overloaded()
                budget.used += len(chunk)
                self.held += len(chunk)
                chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def release(self) -> None:
        """The request was admitted or refused: its bytes no longer count. Idempotent."""
        budget.used -= self.held
        self.held = 0


def declared_length(headers) -> int:
    """The ``content-length`` the client declared, or 0 (none, or not a number)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return max(int(value), 0)
            except ValueError:
                return 0
    return 0


# The preparation threads run at a lower CPU priority (nice) than the event loop: on a core they
# share, the scheduler then lets the loop in at once when a stream's chunk arrives, instead of
# after the thread's time slice. (Linux applies a thread's own nice value; elsewhere this is a no-op.)
WORKER_NICENESS = 10

_executor: ThreadPoolExecutor | None = None


def _lower_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


async def offload(work: Callable[[], T]) -> T:
    """Run ``work`` in the body-preparation pool: two threads (enough to keep big bodies moving, few
    enough that they cannot take every core from the event loop) at a lower CPU priority."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(
            max_workers=min(2, os.cpu_count() or 1), thread_name_prefix="gateway-body", initializer=_lower_priority
        )
    return await asyncio.get_running_loop().run_in_executor(_executor, work)
