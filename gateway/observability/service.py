"""What a gateway process runs for observability, started and stopped with its runtime: tracing
(when configured), the per-process sampler, the internal metrics port (when configured)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from django.conf import settings

from gateway.observability import tracing
from gateway.observability.metrics import gateway_metrics
from gateway.observability.sampler import ProcessSampler
from gateway.observability.scrape import InternalMetricsServer

log = logging.getLogger(__name__)

_sampler: ProcessSampler | None = None
_server: InternalMetricsServer | None = None
_refresher: Any = None  # the runtime's SnapshotRefresher


def _checked_at() -> float | None:
    return getattr(_refresher, "checked_at", None)


def sample_now() -> None:
    """Refresh this process's sampled values (before a scrape renders them)."""
    if _sampler is not None:
        _sampler.sample(_checked_at())


async def observability_start(refresher: Any) -> None:
    """Start what this process runs for observability (on the runtime's event loop)."""
    global _sampler, _server, _refresher
    _refresher = refresher
    tracing.tracing_configure_from_env()
    metrics = gateway_metrics()
    if metrics is None:
        return
    if _sampler is None or _sampler.metrics is not metrics:
        _sampler = ProcessSampler(metrics)
    _sampler.start(_checked_at)
    options = settings.OBSERVABILITY
    if options["METRICS_PORT"] and _server is None:
        server = InternalMetricsServer(options["METRICS_HOST"], options["METRICS_PORT"])
        try:
            await server.start()
        except OSError as exc:
            # Refusing to start would take the proxy down for its metrics; say so loudly instead.
            log.error("cannot serve metrics on %s:%s: %s", server.host, server.port, exc)
        else:
            _server = server


async def observability_stop() -> None:
    """Stop the sampler and the internal server; export the spans still buffered."""
    global _server
    if _sampler is not None:
        _sampler.sample(_checked_at())  # the last values of this process
        await _sampler.stop()
    server, _server = _server, None
    if server is not None:
        await server.stop()
    if tracing.tracing_enabled():
        await asyncio.to_thread(tracing.tracing_shutdown)
