"""OpenTelemetry traces, optional: on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, exported over OTLP/HTTP in batches by the SDK's
own thread. Off, nothing of OpenTelemetry is imported and the request path pays one ``is None``.

A proxied request is one trace (continuing the client's, when it sent ``traceparent``):

* ``gateway.request`` (server span): the whole request; attributes: request id, route, model,
  deployment, status, outcome, queue wait, retries, tenant.
* ``gateway.queue_wait``: each wait for a lease (the balancer's queue), with the deployment it
  got or the refusal.
* ``gateway.upstream_attempt`` (client span): each attempt on a deployment, from the lease to
  the result (``ok``, ``rate_limited``, ``failed``, ``abandoned``); its context goes to the
  upstream as ``traceparent``.

The OTel SDK reads its usual variables (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_TRACES_SAMPLER``...); the service is ``llm-gateway``
unless they name it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gateway.observability.context import current_watch

log = logging.getLogger(__name__)

REQUEST_SPAN = "gateway.request"
QUEUE_WAIT_SPAN = "gateway.queue_wait"
ATTEMPT_SPAN = "gateway.upstream_attempt"

_tracer: Any = None  # an opentelemetry Tracer once configured
_provider: Any = None
_propagator: Any = None
_kinds: Any = None  # opentelemetry.trace.SpanKind
_status: Any = None  # (Status, StatusCode)


def tracing_enabled() -> bool:
    return _tracer is not None


def tracing_configure_from_env() -> bool:
    """Configure the OTLP exporter if the environment names an endpoint; True when tracing is on."""
    if _tracer is not None:
        return True
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    tracing_configure(OTLPSpanExporter())
    log.info("tracing on: spans exported over OTLP/HTTP")
    return True


def tracing_configure(exporter: Any, *, batch: bool = True) -> Any:
    """Send spans to ``exporter`` (any OTel SpanExporter; tests pass an in-memory one with
    ``batch=False``). Returns the TracerProvider. The global OTel provider is left alone."""
    global _tracer, _provider, _propagator, _kinds, _status
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": "llm-gateway"}))
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    _provider, _propagator, _kinds, _status = provider, TraceContextTextMapPropagator(), SpanKind, (Status, StatusCode)
    _tracer = provider.get_tracer("gateway")
    return provider


def tracing_shutdown() -> None:
    """Export what is buffered and stop (blocking: call it off the event loop). Tracing is off after."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None:
        provider.shutdown()


def request_span_start(scope: dict, request_id: str) -> Any:
    """The request's server span, a child of the client's ``traceparent`` if it sent one."""
    carrier = {}
    for name, value in scope["headers"]:
        if name in (b"traceparent", b"tracestate"):
            carrier[name.decode()] = value.decode("latin-1")
    parent = _propagator.extract(carrier) if carrier else None
    return _tracer.start_span(
        REQUEST_SPAN,
        context=parent,
        kind=_kinds.SERVER,
        attributes={
            "http.request.method": scope["method"],
            "url.path": scope["path"],
            "gateway.request_id": request_id,
        },
    )


def child_span_start(parent: Any, name: str, attributes: dict[str, Any], *, client: bool = False) -> Any:
    from opentelemetry.trace import set_span_in_context

    return _tracer.start_span(
        name,
        context=set_span_in_context(parent),
        kind=_kinds.CLIENT if client else _kinds.INTERNAL,
        attributes=attributes,
    )


def span_end(span: Any, attributes: dict[str, Any], *, error: str | None = None) -> None:
    span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if error is not None:
        status, code = _status
        span.set_status(status(code.ERROR, error))
    span.end()


def traceparent_headers(span: Any) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) naming ``span``, for a request sent on its behalf."""
    from opentelemetry.trace import set_span_in_context

    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=set_span_in_context(span))
    return carrier


def upstream_headers_traced(headers: list[tuple[str, str]]) -> None:
    """Name the current upstream attempt's span in ``headers`` (the upstream request's, in place):
    the client's ``traceparent``/``tracestate`` are replaced by the attempt's. Does nothing while
    tracing is off (the client's pass through untouched, as before)."""
    if _tracer is None:
        return
    watch = current_watch.get()
    span = watch.attempt_span if watch is not None else None
    if span is None:
        return
    headers[:] = [(k, v) for k, v in headers if k not in ("traceparent", "tracestate")]
    headers.extend(traceparent_headers(span).items())
