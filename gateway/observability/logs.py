"""Logs: JSON lines for log pipelines, the request id on every line of a request, and the one line
per proxied request.

* ``JsonFormatter`` (``GATEWAY_LOG_FORMAT=json``): one JSON object per line with ``time``,
  ``level``, ``logger``, ``message``, ``request_id`` when the line was logged while serving a
  request, ``exception`` when there is one, and the request line's fields at the top level.
* ``RequestIdFilter`` stamps ``record.request_id`` from the request being served (a context
  variable set by ``gateway.observability.request``), so a warning or a traceback logged deep in
  the request path carries the id the client saw in ``x-request-id``.
* ``BackgroundStreamHandler`` formats on the caller's thread and writes on a thread of its own: a
  slow or blocked log pipe delays the log, never the event loop. Lines beyond ``capacity``
  waiting are dropped and counted, rather than held in memory or blocking.
* ``RequestLine``: the per-request line (logger ``gateway.request``), built from the usage record:
  ids, tenant, key prefix, model, deployment, status, outcome, timings, retries and the attempts.
  It never carries a secret, a full key or prompt text: the usage record has none.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import re
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, TextIO

from gateway.observability.context import current_request_id

request_log = logging.getLogger("gateway.request")

# LogRecord attributes that are not the caller's ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the request being served in this context, or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


class RequestLine:
    """The message of the per-request log line: ``fields`` as JSON fields, or ``key=value`` text."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        parts = ["request"]
        for name, value in self.fields.items():
            if value is None or value == "" or value == []:
                continue
            kind = type(value)
            if kind is str:
                text = json.dumps(value) if _UNSAFE.search(value) else value  # quoted: cannot forge a field
            elif kind is float:
                text = f"{value:.1f}"
            elif kind is list:
                text = ",".join(map(str, value))
            else:
                text = str(value)
            parts.append(f"{name}={text}")
        return " ".join(parts)


_UNSAFE = re.compile(r'[\s"=]')


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Fields given as ``extra`` and the request line's fields are
    top-level keys; values JSON cannot hold are written as their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.msg
        if type(msg) is RequestLine and not record.exc_info:
            # The per-request line, once per request: its fields are JSON's own types.
            head = f'{{"time":"{_utc_iso(record.created)}","level":"{record.levelname}","logger":"{record.name}","message":"request",'
            return head + request_json(msg.fields)[1:]
        out: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        if isinstance(msg, RequestLine):
            out["message"] = "request"
            out.update(msg.fields)
        else:
            out["message"] = record.getMessage()
            request_id = getattr(record, "request_id", None)
            if request_id is not None:
                out["request_id"] = request_id
            for name, value in vars(record).items():
                if name not in _STANDARD and not name.startswith("_"):
                    out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


# The request line's fields, in order (``RequestWatch.fields`` makes them).
REQUEST_FIELDS = (
    "request_id",
    "route",
    "tenant",
    "key_prefix",
    "model",
    "deployment",
    "status",
    "outcome",
    "error_code",
    "latency_ms",
    "ttft_ms",
    "queue_wait_ms",
    "retries",
    "attempts",
    "streamed",
    "priority",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "client_ip",
)
_encode = json.JSONEncoder(default=str).encode


def _s(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def _f(value: float | None) -> str:
    return "null" if value is None else f"{value:.1f}"


def request_json(fields: dict[str, Any]) -> str:
    """``fields`` as a JSON object: by a template when they are the request line's (half the cost
    of the json module, which formats floats in Python), else by the json module."""
    f = fields
    if len(f) != len(REQUEST_FIELDS):
        return _encode(f)
    try:
        return (
            f'{{"request_id":{_quote(f["request_id"])},"route":{_quote(f["route"])},"tenant":{_s(f["tenant"])},'
            f'"key_prefix":{_s(f["key_prefix"])},"model":{_s(f["model"])},"deployment":{_s(f["deployment"])},'
            f'"status":{int(f["status"])},"outcome":{_quote(f["outcome"])},"error_code":{_s(f["error_code"])},'
            f'"latency_ms":{_f(f["latency_ms"])},"ttft_ms":{_f(f["ttft_ms"])},"queue_wait_ms":{_f(f["queue_wait_ms"])},'
            f'"retries":{int(f["retries"])},"attempts":[{",".join(map(_quote, f["attempts"]))}],'
            f'"streamed":{"true" if f["streamed"] else "false"},"priority":{int(f["priority"])},'
            f'"prompt_tokens":{int(f["prompt_tokens"])},"completion_tokens":{int(f["completion_tokens"])},'
            f'"cost":{_quote(f["cost"])},"client_ip":{_s(f["client_ip"])}}}'
        )
    except (KeyError, TypeError, ValueError):
        return _encode(f)


_second = -1
_second_text = ""


def _utc_iso(created: float) -> str:
    """``2026-12-02T03:50:04.766Z``; the seconds part is formatted once per second."""
    global _second, _second_text
    seconds = int(created)
    if seconds != _second:
        _second_text, _second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)), seconds
    return f"{_second_text}.{int((created - seconds) * 1000):03d}Z"


class BackgroundStreamHandler(logging.Handler):
    """A ``StreamHandler`` whose writes happen on a daemon thread.

    ``emit`` formats the record (on the caller's thread, where the request's context is) and
    queues the line; the writer thread writes what has queued up in one write and flushes. At
    most ``capacity`` lines wait; more are dropped and counted (said in the log when it can
    write again) rather than held in memory or blocking the event loop. ``flush`` waits (at most
    a second) until what was queued is written; ``logging.shutdown`` at exit calls it.
    ``synchronous`` (on the class): write on the caller's thread instead. The test suite sets it,
    so that each test's lines are captured with that test's output (and every instance: Django
    configures logging again whenever ``django.setup()`` runs).
    """

    synchronous = False

    def __init__(self, stream: TextIO | None = None, capacity: int = 10_000) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self.dropped = 0
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # None: stop
        self._queued = itertools.count(1)  # next() is atomic: lines queued, from any thread
        self._last_queued = 0
        self._written = 0  # lines written or dropped by the writer (its thread only)
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if self.synchronous:
            self._write([line])
            return
        if self._writer is None:
            self._start_writer()
        if self._lines.qsize() >= self.capacity:
            self.dropped += 1
            return
        self._lines.put(line)
        self._last_queued = next(self._queued)

    def _start_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_lines, name="log-writer", daemon=True)
                self._writer.start()

    def _write_lines(self) -> None:
        lines = self._lines
        while True:
            line = lines.get()
            if line is None:
                return
            batch = [line]
            while len(batch) < 1000:
                try:
                    line = lines.get_nowait()
                except queue.Empty:
                    break
                if line is None:
                    lines.put(None)  # stop after this batch
                    break
                batch.append(line)
            self._write(batch)
            self._written += len(batch)

    def _write(self, batch: list[str]) -> None:
        try:
            stream = self.stream or sys.stderr
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                stream.write(f"(log writer: {dropped} lines dropped, the log stream was too slow)\n")
            stream.write("\n".join(batch) + "\n")
            stream.flush()
        except Exception:
            pass  # a closed or broken stream: nothing sensible to log it to

    def flush(self) -> None:
        """Wait until every line queued so far is written (at most one second)."""
        target = self._last_queued
        deadline = time.monotonic() + 1.0
        while self._written < target and self._writer is not None and time.monotonic() < deadline:
            time.sleep(0.002)

    def close(self) -> None:
        """Write what is queued, then stop the writer (logging is being configured again, or the
        process exits)."""
        self.flush()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._lines.put(None)
        super().close()


def request_line_emit(level: int, fields: dict[str, Any]) -> None:
    """Log the per-request line at ``level`` (the caller checked that the level is enabled).

    The record is made directly rather than through ``Logger.log``, which would walk the stack
    for the caller's file and line (always this function; a fifth of the line's cost)."""
    request_log.handle(request_log.makeRecord(request_log.name, level, "", 0, RequestLine(fields), (), None))


def request_log_level(setting: str) -> int | None:
    """``GATEWAY_REQUEST_LOG_LEVEL`` as a logging level; None for "off" (or "none", "")."""
    name = setting.strip().upper()
    if name in ("", "OFF", "NONE"):
        return None
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"GATEWAY_REQUEST_LOG_LEVEL: unknown level {setting!r}")
    return level
