"""``/metrics``: the Prometheus text exposition, on the public port (bearer token optional) or only
on an internal one.

A scrape renders three things: the written series (this process's, or with
``PROMETHEUS_MULTIPROC_DIR`` every process's files, read in a worker thread since it is file
I/O), this process's sampled values (refreshed first), and series read from the balancer's state
at that moment: breaker state, window use, in flight and cool-down per deployment, queue depth
per model, whether the shared state answered. With Redis every process shares that state, so any
process answers for all; with the in-process state each process reports its own.

Guarding: ``GATEWAY_METRICS_TOKEN`` makes every scrape present ``Authorization: Bearer <token>``
(else 401); ``GATEWAY_METRICS_PORT`` serves ``/metrics`` only on that port, which every worker
binds with ``SO_REUSEPORT`` (the kernel spreads scrapes over them; each answers for all).
"""

from __future__ import annotations

import asyncio
import glob
import hmac
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway import snapshot
from gateway.balancer.breaker import HALF_OPEN, OPEN
from gateway.balancer.contract import StateUnavailable
from gateway.observability.labels import deployment_label
from gateway.observability.metrics import gateway_metrics

log = logging.getLogger(__name__)

BREAKER_VALUES = {OPEN: 2, HALF_OPEN: 1}  # closed: 0


async def balancer_families() -> list[Metric]:
    """Gauges read from the balancer's state now (one status read, one depth read per model)."""
    from gateway.proxy.runtime import runtime

    await runtime.ensure_started()
    assert runtime.dispatcher is not None  # started by ensure_started
    state = runtime.dispatcher.state
    deployments = snapshot.current().all_deployments
    up = GaugeMetricFamily("gateway_shared_state_up", "1 when the balancer's state (Redis, if configured) answered.")
    try:
        status = await state.status(deployments) if deployments else {}
        depths = {model: await state.depth(model) for model in sorted({d.model for d in deployments})}
    except StateUnavailable:
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)
    labels = ["deployment", "model"]
    breaker = GaugeMetricFamily(
        "gateway_deployment_breaker_state",
        "Circuit breaker: 0 closed, 1 half-open (one probe may go), 2 open.",
        labels=labels,
    )
    window = GaugeMetricFamily(
        "gateway_deployment_window_use_ratio",
        "Share of a rolling window's limit in use (reserved and settled), per window (unit_seconds).",
        labels=[*labels, "window"],
    )
    in_flight = GaugeMetricFamily("gateway_deployment_in_flight", "Reservations not yet settled.", labels=labels)
    cool_down = GaugeMetricFamily(
        "gateway_deployment_cool_down_seconds", "Seconds left of the cool-down after an upstream 429.", labels=labels
    )
    available = GaugeMetricFamily(
        "gateway_deployment_available", "1 when the deployment could take a request now.", labels=labels
    )
    for d in deployments:
        row = status.get(d.id)
        if row is None:
            continue
        values = [deployment_label(d), d.model]
        breaker.add_metric(values, BREAKER_VALUES.get(row["breaker"]["state"], 0))
        for w in row["windows"]:
            if w["limit"] > 0:
                window.add_metric([*values, f"{w['unit']}_{w['seconds']:g}s"], w["used"] / w["limit"])
        in_flight.add_metric(values, row["in_flight"])
        cool_down.add_metric(values, row["cool_down"])
        available.add_metric(values, 1 if row["available"] and d.enabled else 0)
    queue = GaugeMetricFamily("gateway_queue_depth", "Requests waiting for capacity.", labels=["model", "priority"])
    for model, by_priority in depths.items():
        if not by_priority:
            queue.add_metric([model, "all"], 0)
        for priority, count in sorted(by_priority.items()):
            queue.add_metric([model, str(priority)], count)
    return [up, breaker, window, in_flight, cool_down, available, queue]


class _Families:
    """A collector of already computed families (for ``generate_latest``)."""

    def __init__(self, *sources: Iterable[Metric]) -> None:
        self.sources = sources

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            yield from source


def forget_dead_processes(path: str) -> None:
    """Drop the live gauges of processes that are gone (a worker restarted by its server), so a
    process's buffer depth or snapshot version is not reported after its death."""
    seen: set[int] = set()
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        try:
            pid = int(os.path.basename(name).rsplit("_", 1)[1][:-3])
        except ValueError:
            continue
        if pid in seen:
            continue
        seen.add(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, path)
        except PermissionError:
            pass  # alive, another user's


def _render_multiprocess(path: str, live: list[Metric]) -> bytes:
    forget_dead_processes(path)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)
    registry.register(_Families(live))  # any object with collect() will do
    return generate_latest(registry)


async def metrics_render() -> bytes:
    """The exposition text of every series (see the module's docstring)."""
    from gateway.observability.service import sample_now

    live = await balancer_families()
    metrics = gateway_metrics()
    if metrics is not None:
        metrics.flush()  # this process's requests, up to now
    sample_now()
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        return await asyncio.to_thread(_render_multiprocess, path, live)
    registry = metrics.registry if metrics is not None and metrics.registry is not None else REGISTRY
    return generate_latest(_Families(registry.collect(), live))


def scrape_authorized(authorization: bytes | None) -> bool:
    """Whether a scrape may read the metrics: always without a token, else with ``Bearer <token>``."""
    token = settings.OBSERVABILITY["METRICS_TOKEN"]
    if not token:
        return True
    if not authorization or authorization[:7].lower() != b"bearer ":
        return False
    return hmac.compare_digest(authorization[7:].strip(), token.encode())


def _error(status: int, message: str, code: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return json.dumps({"error": error}).encode()


async def metrics_scrape(method: str, authorization: bytes | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) for a scrape with this method and Authorization header."""
    json_type = (b"content-type", b"application/json")
    if method not in ("GET", "HEAD"):
        return 405, [json_type, (b"allow", b"GET, HEAD")], _error(405, "Use GET.", "method_not_allowed")
    if not scrape_authorized(authorization):
        return (
            401,
            [json_type, (b"www-authenticate", b'Bearer realm="metrics"')],
            _error(401, "The metrics need the scrape token (Authorization: Bearer ...).", "invalid_api_key"),
        )
    try:
        body = await metrics_render()
    except Exception:
        log.exception("rendering /metrics failed")
        return 500, [json_type], _error(500, "The metrics could not be rendered.", "internal_error")
    return 200, [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"cache-control", b"no-store")], body


async def metrics_asgi(scope: dict, receive: Any, send: Any) -> None:
    """``/metrics`` on the public port (``gateway.proxy.application`` routes it before Django):
    404 when metrics are off or served only on their internal port."""
    options = settings.OBSERVABILITY
    if gateway_metrics() is None or options["METRICS_PORT"]:
        status, headers = 404, [(b"content-type", b"application/json")]
        body = _error(404, f"Unknown request URL: {scope['method']} /metrics.", "unknown_url")
    else:
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
        status, headers, body = await metrics_scrape(scope["method"], authorization)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


class InternalMetricsServer:
    """``/metrics`` on ``GATEWAY_METRICS_PORT`` (aiohttp's server, on the process's event loop)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            authorization = request.headers.get("Authorization")
            status, headers, body = await metrics_scrape(
                request.method, authorization.encode("latin-1") if authorization is not None else None
            )
            return web.Response(status=status, body=body, headers={k.decode(): v.decode() for k, v in headers})

        app = web.Application()
        app.router.add_route("*", "/metrics", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, reuse_port=True).start()
        self._runner = runner
        log.info("metrics served on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
