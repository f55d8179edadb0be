"""Observability: Prometheus metrics, structured logs, optional OpenTelemetry traces.

Hooks in the request path are few and named: ``RequestWatch.begin``/``finish`` in the consumer
(``request``), the observed dispatcher around the balancer (``dispatch``), the traceparent of an
upstream attempt (``tracing.upstream_headers_traced``). The rest runs beside the requests:
``metrics`` (the series), ``sampler`` (per-process values), ``scrape`` (``/metrics``), ``logs``
(JSON lines, the request id on every line, the request line), ``service`` (start and stop with
the runtime). docs/architecture.md, "Observability", says what each series means.
"""
