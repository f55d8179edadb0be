"""The request being served, as a context variable: set by ``RequestWatch.begin`` for the request's
task (tasks it starts inherit it), read by the log filter and the observed dispatcher."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.observability.request import RequestWatch

current_watch: ContextVar[RequestWatch | None] = ContextVar("gateway_request", default=None)


def current_request_id() -> str | None:
    """The id of the request this code runs for (its ``x-request-id``), or None outside one."""
    watch = current_watch.get()
    return watch.ctx.request_id if watch is not None else None
