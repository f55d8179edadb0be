"""Where each HTTP request goes: the proxy consumer, a health probe, or ordinary Django views."""

from __future__ import annotations

import logging

from channels.routing import ProtocolTypeRouter
from django.conf import settings

from gateway.observability.scrape import metrics_asgi
from gateway.proxy import probes
from gateway.proxy.consumer import ProxyConsumer
from gateway.proxy.runtime import runtime

log = logging.getLogger(__name__)

PROXY_PREFIXES = ("/v1/", "/openai/")


def build_application(django_app):
    """The ASGI application: Channels' protocol router with the proxy before Django."""
    proxy = ProxyConsumer.as_asgi()
    in_flight = runtime.in_flight

    async def http(scope, receive, send):
        path = scope["path"]
        if path.startswith(PROXY_PREFIXES):
            in_flight.enter()
            try:
                return await proxy(scope, receive, send)
            finally:
                in_flight.leave()
        if path == "/healthz":
            return await probes.healthz(scope, receive, send)
        if path == "/readyz":
            return await probes.readyz(scope, receive, send)
        if path == "/metrics":
            return await metrics_asgi(scope, receive, send)
        return await django_app(scope, receive, send)

    return ProtocolTypeRouter({"http": http, "lifespan": lifespan})


async def lifespan(scope, receive, send):
    """ASGI lifespan (uvicorn has it; daphne does not, where the first request starts the runtime
    and an exit hook flushes the usage buffer).

    Shutdown waits for the proxied requests in flight, up to ``SHUTDOWN_GRACE_SECONDS``, then
    stops the runtime, which writes the usage buffer out (to the spill file if the database is down).
    """
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await runtime.ensure_started()
            except Exception as exc:  # report, so the server refuses to start half-configured
                log.exception("gateway startup failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await runtime.drain(settings.GATEWAY["SHUTDOWN_GRACE_SECONDS"])
            await runtime.shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
