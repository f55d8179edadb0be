"""One request, watched: the hook the consumer calls at its start and at its usage record.

``RequestWatch.begin`` makes the request current for its task (log lines get its id, the
observed dispatcher notes its attempts) and, with tracing on, starts its span.
``RequestWatch.finish(record)`` does the rest from the usage record, once: the metrics, the
request log line, the span's end. Both are cheap and never raise into the request path.
"""

from __future__ import annotations

import logging
from contextvars import Token
from typing import Any

from gateway.observability import tracing
from gateway.observability.context import current_watch
from gateway.observability.labels import LabelIndex, label_index
from gateway.observability.logs import request_line_emit, request_log, request_log_level
from gateway.observability.metrics import gateway_metrics

log = logging.getLogger(__name__)


class Attempt:
    """One upstream attempt of a request: its deployment, how it ended, its span (tracing on)."""

    __slots__ = ("deployment", "result", "span")

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self.result = ""
        self.span: Any = None

    def __str__(self) -> str:
        return f"{self.deployment}:{self.result or 'unfinished'}"


class RequestWatch:
    __slots__ = ("_token", "attempt_span", "attempts", "ctx", "span")

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx  # the RequestContext
        self.attempts: list[Attempt] = []
        self.span: Any = None  # the request's span (tracing on)
        self.attempt_span: Any = None  # the span of the attempt under way (its traceparent goes upstream)
        self._token: Token | None = None

    @classmethod
    def begin(cls, scope: dict, ctx: Any) -> RequestWatch:
        """Watch the request of ``ctx`` (a ``RequestContext`` just begun) in this task."""
        watch = cls(ctx)
        watch._token = current_watch.set(watch)
        if tracing.tracing_enabled():
            watch.span = tracing.request_span_start(scope, ctx.request_id)
        return watch

    def finish(self, record: dict[str, Any]) -> None:
        """Metrics, the request log line and the span's end, from the request's usage record."""
        try:
            metrics = gateway_metrics()
            level = _log_level()
            if metrics is not None or level is not None or self.span is not None:
                index = label_index()
                if metrics is not None:
                    metrics.request_observe(record, index)
                    for attempt in self.attempts[:-1]:  # each was followed by another try
                        metrics.retry_observe(attempt.deployment)
                if level is not None and request_log.isEnabledFor(level):
                    request_line_emit(level, self.fields(record, index))
                if self.span is not None:
                    self._end_span(record, index)
        except Exception:
            log.exception("observing request %s failed", record.get("request_id"))
        finally:
            if self._token is not None:
                try:
                    current_watch.reset(self._token)
                except ValueError:  # finished in another context than it began: leave that one be
                    pass

    def fields(self, record: dict[str, Any], index: LabelIndex) -> dict[str, Any]:
        """The request log line's fields. Ids, names, numbers: never a secret, a key or a prompt.
        (Milliseconds are written with one decimal by both formats.)"""
        return {
            "request_id": record["request_id"],
            "route": record["route"],
            "tenant": index.tenant(record["tenant_id"]) if record["tenant_id"] is not None else None,
            "key_prefix": index.key_prefix(record["key_id"]) or None,
            "model": record["model"] or None,
            "deployment": index.deployment(record["deployment_id"]) if record["deployment_id"] is not None else None,
            "status": record["status"],
            "outcome": record["outcome"],
            "error_code": record["error_code"] or None,
            "latency_ms": record["latency_ms"],
            "ttft_ms": record["ttft_ms"],
            "queue_wait_ms": record["queue_wait_ms"],
            "retries": record["retries"],
            "attempts": [str(a) for a in self.attempts],
            "streamed": record["streamed"],
            "priority": record["priority"],
            "prompt_tokens": record["prompt_tokens"],
            "completion_tokens": record["completion_tokens"],
            "cost": str(record["cost"]),
            "client_ip": record["client_ip"],
        }

    def _end_span(self, record: dict[str, Any], index: LabelIndex) -> None:
        status = record["status"]
        self.span.update_name(f"{tracing.REQUEST_SPAN} {record['route'] or 'unknown'}")
        tracing.span_end(
            self.span,
            {
                "http.response.status_code": status,
                "gateway.route": record["route"],
                "gateway.model": record["model"] or None,
                "gateway.deployment": index.deployment(record["deployment_id"]) if record["deployment_id"] else None,
                "gateway.outcome": record["outcome"],
                "gateway.error_code": record["error_code"] or None,
                "gateway.tenant": index.tenant(record["tenant_id"]) if record["tenant_id"] is not None else None,
                "gateway.queue_wait_ms": record["queue_wait_ms"],
                "gateway.retries": record["retries"],
                "gateway.prompt_tokens": record["prompt_tokens"],
                "gateway.completion_tokens": record["completion_tokens"],
            },
            error=f"HTTP {status}" if status >= 500 else None,
        )


_level: int | None = None
_level_resolved = False


def _log_level() -> int | None:
    global _level, _level_resolved
    if not _level_resolved:
        from django.conf import settings

        _level, _level_resolved = request_log_level(settings.OBSERVABILITY["REQUEST_LOG_LEVEL"]), True
    return _level


def request_log_configure(setting: str) -> None:
    """Use ``setting`` (a level name, or "off") for the request line from now on (tests)."""
    global _level, _level_resolved
    _level, _level_resolved = request_log_level(setting), True
