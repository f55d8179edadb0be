"""The load generator: ``python -m tests.bench.loadgen SPEC.json`` prints one JSON result on stdout.

Why not aiohttp: on the one core the generator gets, an aiohttp client tops out near the fake
upstream's own rate, so the direct run would measure the client. This generator writes
pre-built HTTP/1.1 requests on keep-alive connections with bare asyncio protocols on uvloop and
parses responses with httptools (C); each completion sends the next request from the parser's
callback, with no task switch. Its ceiling is reported by every run (``cpu_percent`` of its
core); ``wrk``, where installed, gives an independent check for the plain rows.

Modes:

* ``closed``: ``concurrency`` connections, each sending its next request as soon as the
  previous response is complete, until the end of the window. Latency is from writing the
  request to the end of the response.
* ``open``: requests at a fixed ``rate`` whatever the responses do (the saturation scenario),
  on as many connections as needed up to ``max_connections``; latency is from the scheduled
  send time, so a slow server cannot hide its queue (no coordinated omission).

With ``sse`` the time to the first byte of the first ``data:`` event is recorded too, and the
``data:`` events received are counted (``events``: what a gateway relayed, for its CPU per event).
``ramp_s`` (closed loop): the connections send their first requests spread evenly over that many
seconds rather than all at once, so long streams arrive at a steady rate instead of in waves.
``retry_after`` (closed loop): after a 429 or 503 with ``retry-after-ms`` / ``retry-after``, that
connection waits as long before its next request, as the OpenAI SDKs do (rather than hammering).

The spec (JSON)::

    {"host": "127.0.0.1", "port": 8000, "mode": "closed", "concurrency": 32,
     "rate": 0, "max_connections": 2000, "warmup_s": 1, "duration_s": 5, "drain_s": 10,
     "sse": false, "ramp_s": 0, "retry_after": false,
     "variants": [{"path": "/v1/chat/completions", "headers": {"authorization": "Bearer k"},
                   "body": "{...}", "tags": {"priority": "0"}}]}

Requests started during ``warmup_s`` are not measured. Variants are used in turn. Results:
overall and per tag value (``by_tag[name][value]``): request count, status counts, latency
(all responses, and 2xx only) and time-to-first-event summaries in ms, plus throughput over
the window and transport errors.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httptools

from tests.bench.stats import summarize

GENERATOR_NAME = "python (asyncio protocols + httptools on uvloop)"

perf_counter = time.perf_counter

# Longest an open-loop connection may sit idle before reuse (well under uvicorn's 5 s keep-alive).
MAX_IDLE = 2.0


@dataclass(slots=True)
class Variant:
    """One kind of request, pre-built as bytes; its measurements are kept apart."""

    data: bytes
    tags: dict[str, str]
    latencies: list[float] = field(default_factory=list)
    ok_latencies: list[float] = field(default_factory=list)  # 2xx responses only
    ttfbs: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)


def build_request(host: str, port: int, path: str, headers: dict[str, str], body: str) -> bytes:
    """A complete POST request (GET when there is no body) as bytes."""
    payload = body.encode()
    lines = [f"{'POST' if payload else 'GET'} {path} HTTP/1.1", f"host: {host}:{port}"]
    if payload:
        lines += ["content-type: application/json", f"content-length: {len(payload)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.variant: Variant | None = None
        self.t0 = 0.0
        self.ttfb: float | None = None
        self.busy = False
        self.idle_since = 0.0
        self.retry_after = 0.0  # seconds the server asked for (RetryAwareConnection only)

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(f"invalid HTTP response: {exc}")

    def connection_lost(self, exc) -> None:
        if self.busy:
            self.fail(f"connection lost: {exc or 'closed by the server'}")
        self.load.connection_closed(self)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        if self.load.sse:
            events = body.count(b"data:")
            if events:
                self.load.events += events
                if self.ttfb is None:
                    self.ttfb = perf_counter()

    def on_message_complete(self) -> None:
        done = perf_counter()
        self.busy = False
        reusable = self.parser.should_keep_alive()
        variant = self.variant
        self.load.completed(self, variant, self.parser.get_status_code(), self.t0, done, self.ttfb, reusable)

    # -- used by the load ----------------------------------------------------------------------

    def send(self, variant: Variant, t0: float | None = None) -> None:
        self.variant = variant
        self.ttfb = None
        self.retry_after = 0.0
        self.busy = True
        self.t0 = perf_counter() if t0 is None else t0
        self.transport.write(variant.data)

    def fail(self, reason: str) -> None:
        if self.busy:
            self.busy = False
            self.load.failed(self, self.variant, self.t0, reason)
        if self.transport is not None:
            self.transport.close()


class RetryAwareConnection(Connection):
    """A connection that notes the server's ``retry-after-ms`` / ``retry-after`` (httptools calls
    ``on_header`` only where it is defined, so plain runs do not pay for it)."""

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        try:
            if name == b"retry-after-ms":
                self.retry_after = float(value) / 1000.0
            elif name == b"retry-after" and not self.retry_after:
                self.retry_after = float(value)
        except ValueError:
            pass


class Load:
    """The state of one run: connections, the measured window and what was measured."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.host, self.port = spec["host"], int(spec["port"])
        self.sse = bool(spec.get("sse"))
        self.connection_class = RetryAwareConnection if spec.get("retry_after") else Connection
        self.variants = [
            Variant(
                build_request(self.host, self.port, v["path"], v.get("headers", {}), v.get("body", "")),
                {k: str(val) for k, val in v.get("tags", {}).items()},
            )
            for v in spec["variants"]
        ]
        self._next_variant = itertools.cycle(self.variants).__next__
        self.warmup = float(spec.get("warmup_s", 0.0))
        self.duration = float(spec["duration_s"])
        self.drain = float(spec.get("drain_s", 10.0))
        self.start = self.window_start = self.window_end = 0.0
        self.in_window = 0  # completions inside the window (throughput)
        self.total_completed = 0  # every completion, warm-up and drain included (CPU per request)
        self.events = 0  # SSE data events received, warm-up and drain included (CPU per event)
        self.errors: Counter = Counter()
        self.in_flight = 0
        self.idle: list[Connection] = []
        self.connections: set[Connection] = set()
        self.drained = asyncio.Event()
        self.issuing = True
        self.cpu_marks: list[float] = []

    # -- connections ---------------------------------------------------------------------------

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: self.connection_class(self), self.host, self.port)
        self.connections.add(conn)
        return conn

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    # -- outcomes ------------------------------------------------------------------------------

    def measured(self, t0: float) -> bool:
        """Whether a request started at ``t0`` counts (it started inside the window)."""
        return self.window_start <= t0 < self.window_end

    def completed(self, conn, variant, status, t0, done, ttfb, reusable) -> None:
        self.in_flight -= 1
        self.total_completed += 1
        if self.window_start <= done <= self.window_end:
            self.in_window += 1
        if self.measured(t0):
            variant.statuses[status] += 1
            latency = (done - t0) * 1000.0
            variant.latencies.append(latency)
            if 200 <= status < 300:
                variant.ok_latencies.append(latency)
                if ttfb is not None:
                    variant.ttfbs.append((ttfb - t0) * 1000.0)
        if not reusable:
            conn.transport.close()
            conn = None
        self.next_request(conn)

    def failed(self, conn, variant, t0, reason: str) -> None:
        self.in_flight -= 1
        if self.measured(t0):
            variant.statuses["transport_error"] += 1
        self.errors[reason] += 1
        asyncio.get_running_loop().call_soon(self.next_request, None)

    def next_request(self, conn: Connection | None) -> None:
        """Overridden: what a connection does once its response is complete (or it broke)."""
        raise NotImplementedError

    def check_drained(self) -> None:
        if not self.issuing and self.in_flight == 0:
            self.drained.set()

    async def _send_on_new_connection(self, variant: Variant, t0: float | None) -> None:
        """Open a connection and send on it; a refused connect counts as an error and retries."""
        try:
            conn = await self.connect()
        except OSError as exc:
            self.in_flight -= 1
            self.errors[f"connect failed: {exc}"] += 1
            self.check_drained()
            if self.issuing:
                await asyncio.sleep(0.05)
                self.next_request(None)
            return
        conn.send(variant, t0)

    # -- the window ----------------------------------------------------------------------------

    def open_window(self) -> None:
        """Fix the measured window from now, and read the generator's CPU time at its edges."""
        self.start = perf_counter()
        self.window_start = self.start + self.warmup
        self.window_end = self.window_start + self.duration
        asyncio.get_running_loop().call_later(self.warmup, self.mark_cpu)

    def mark_cpu(self) -> None:
        """Called at the start of the window (a timer) and at its end (by ``run``)."""
        self.cpu_marks.append(_cpu())

    @property
    def cpu_seconds(self) -> float:
        """The generator's CPU time inside the window (what share of its core it needed)."""
        return self.cpu_marks[1] - self.cpu_marks[0] if len(self.cpu_marks) == 2 else 0.0

    # -- results -------------------------------------------------------------------------------

    def result(self, cpu_seconds: float, unfinished: int) -> dict[str, Any]:
        window = self.window_end - self.window_start
        everything = Variant(b"", {})
        by_tag: dict[str, dict[str, Variant]] = {}
        for variant in self.variants:
            groups = [everything] + [
                by_tag.setdefault(name, {}).setdefault(value, Variant(b"", {})) for name, value in variant.tags.items()
            ]
            for group in groups:
                group.latencies += variant.latencies
                group.ok_latencies += variant.ok_latencies
                group.ttfbs += variant.ttfbs
                group.statuses.update(variant.statuses)
        return {
            "generator": GENERATOR_NAME,
            "window_s": window,
            "window_start_monotonic": self.window_start,
            "window_end_monotonic": self.window_end,
            "rps": self.in_window / window if window > 0 else 0.0,
            "total_completed": self.total_completed,
            "events": self.events,
            "unfinished": unfinished,
            "errors": dict(self.errors),
            "cpu_seconds": cpu_seconds,
            "cpu_percent": 100.0 * cpu_seconds / window if window > 0 else 0.0,
            "overall": _group_result(everything),
            "by_tag": {
                name: {value: _group_result(group) for value, group in values.items()}
                for name, values in by_tag.items()
            },
        }


class ClosedLoad(Load):
    """``concurrency`` connections, each sending the next request when its response is complete."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.concurrency = int(spec["concurrency"])
        self.ramp = float(spec.get("ramp_s", 0.0))

    async def run(self) -> None:
        conns = [await self.connect() for _ in range(self.concurrency)]
        self.open_window()
        step = self.ramp / len(conns) if conns else 0.0
        for i, conn in enumerate(conns):
            if step:
                delay = self.start + i * step - perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            self.in_flight += 1
            conn.send(self._next_variant())
        await asyncio.sleep(self.window_end - perf_counter())
        self.mark_cpu()
        self.issuing = False
        self.check_drained()

    def next_request(self, conn: Connection | None) -> None:
        if not self.issuing or perf_counter() >= self.window_end:
            self.issuing = False
            self.check_drained()
            return
        self.in_flight += 1
        if conn is not None and conn.retry_after > 0:
            asyncio.get_running_loop().call_later(min(conn.retry_after, 30.0), self._send_after_wait, conn)
        elif conn is not None:
            conn.send(self._next_variant())
        else:
            asyncio.get_running_loop().create_task(self._send_on_new_connection(self._next_variant(), None))

    def _send_after_wait(self, conn: Connection) -> None:
        if not self.issuing or conn.transport is None or conn.transport.is_closing():
            self.in_flight -= 1
            self.check_drained()
            if self.issuing:
                self.next_request(None)
            return
        conn.send(self._next_variant())


class OpenLoad(Load):
    """Requests at a fixed rate, whatever the responses do, up to ``max_connections`` in flight."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.rate = float(spec["rate"])
        self.max_connections = int(spec.get("max_connections", 2000))
        self.skipped = 0  # sends the generator could not make: every connection was busy
        self.opening = 0

    async def run(self) -> None:
        self.open_window()
        interval = 1.0 / self.rate
        due = self.start
        while due < self.window_end:
            now = perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            while due <= perf_counter() and due < self.window_end:
                self.issue(self._next_variant(), due)
                due += interval
        self.mark_cpu()
        self.issuing = False
        self.check_drained()

    def issue(self, variant: Variant, due: float) -> None:
        self.in_flight += 1
        conn = self.fresh_idle_connection()
        if conn is not None:
            conn.send(variant, due)
        elif len(self.connections) + self.opening < self.max_connections:
            self.opening += 1
            asyncio.get_running_loop().create_task(self._open_and_send(variant, due))
        else:
            self.in_flight -= 1
            self.skipped += 1
            self.errors["skipped: every generator connection busy"] += 1

    async def _open_and_send(self, variant: Variant, due: float) -> None:
        try:
            await self._send_on_new_connection(variant, due)
        finally:
            self.opening -= 1

    def fresh_idle_connection(self) -> Connection | None:
        """The most recently used idle connection, if it has not been idle for ``MAX_IDLE`` seconds.

        Servers close idle keep-alive connections (uvicorn after 5 s); a request written just as
        the server closes one is reset without ever reaching the application. Connections idle
        longer than ``MAX_IDLE`` are closed here instead, and since the list is in order of use,
        once the newest is stale, all are.
        """
        if not self.idle:
            return None
        conn = self.idle.pop()
        if perf_counter() - conn.idle_since <= MAX_IDLE:
            return conn
        for stale in [conn, *self.idle]:
            stale.transport.close()
        self.idle.clear()
        return None

    def next_request(self, conn: Connection | None) -> None:
        if conn is not None:
            conn.idle_since = perf_counter()
            self.idle.append(conn)
        self.check_drained()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one load as the spec says; returns the result document."""
    load = OpenLoad(spec) if spec.get("mode") == "open" else ClosedLoad(spec)
    await load.run()
    try:
        await asyncio.wait_for(load.drained.wait(), timeout=load.drain)
    except TimeoutError:
        pass
    unfinished = load.in_flight
    for conn in list(load.connections):
        conn.busy = False
        conn.transport.close()
    return load.result(load.cpu_seconds, unfinished)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _group_result(group: Variant) -> dict[str, Any]:
    return {
        "requests": sum(group.statuses.values()),
        "status": {str(k): v for k, v in sorted(group.statuses.items(), key=lambda kv: str(kv[0]))},
        "latency_ms": summarize(group.latencies),
        "latency_ok_ms": summarize(group.ok_latencies),
        "ttfb_ms": summarize(group.ttfbs),
    }


def main(argv: list[str]) -> int:
    import uvloop

    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    # The generator allocates only flat lists of floats: no cycles for the collector to find,
    # and no collection pause to show up in its latencies.
    gc.disable()
    result = uvloop.run(run(spec))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
