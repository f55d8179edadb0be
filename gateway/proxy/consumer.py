"""The proxy consumer: the OpenAI- and Azure-compatible API, one request at a time.

``serve`` reads as the steps of DESIGN.md: authenticate -> check -> estimate -> balance ->
forward -> settle -> record. Nothing here queries the database: keys, tenants and deployments
come from the in-memory snapshot, usage goes to a non-blocking buffer.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from channels.generic.http import AsyncHttpConsumer
from django.conf import settings

from billing.usage_sink import record_usage
from gateway import snapshot
from gateway.observability.request import RequestWatch
from gateway.proxy import errors
from gateway.proxy.body import BodyReader, ClientLeft, offload
from gateway.proxy.checks import ForwardPlan, RequestChecks
from gateway.proxy.context import RequestContext
from gateway.proxy.errors import GatewayError
from gateway.proxy.forward import ClientDisconnected, Forwarder
from gateway.proxy.jsonbody import parse_json_body
from gateway.proxy.pressure import pressure
from gateway.proxy.routes import MODEL, MODELS, Route, query_param, route_for
from gateway.proxy.runtime import runtime
from gateway.snapshot.types import KeyView
from tenants.auth import AuthFailure, authenticate, key_from_headers

log = logging.getLogger(__name__)

CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
    (
        b"access-control-allow-headers",
        b"authorization, api-key, content-type, openai-organization, openai-project, x-stainless-*",
    ),
    (b"access-control-max-age", b"600"),
]


class ProxyConsumer(AsyncHttpConsumer):
    """Serves ``/v1/...`` and ``/openai/...``; every other path goes to Django.

    It reads the request itself rather than through Channels' message dispatch, so that the key
    is checked from the headers before a byte of the body is read (an unknown key costs the
    gateway no buffer), and the body is read under a deadline and a per-process memory budget
    (``gateway.proxy.body``). Channels' response helpers (``send_headers``, ``send_body``) stay;
    its channel layer, message dispatch and per-message ``close_old_connections`` (two thread
    hops per request, ~12 % of the gateway's CPU when measured) are not used: the proxy talks
    to no other consumer and uses no database connection.
    """

    async def __call__(self, scope, receive, send) -> None:
        self.scope, self.base_send = scope, send
        # Kept so the forwarder can notice a client that disconnects while we wait upstream.
        self.asgi_receive = receive
        self.headers_sent = False
        self.response_done = False
        if scope["method"] == "OPTIONS":
            # CORS preflight: no key, no accounting (it is not an API call).
            await self.send_response(204, b"", headers=CORS_HEADERS)
            return
        await runtime.ensure_started()
        ctx = RequestContext.begin(scope)
        watch = RequestWatch.begin(scope, ctx)  # metrics, the request log line, the trace
        try:
            await self.serve(ctx)
        except GatewayError as err:
            await self.send_error(ctx, err)
        except (ClientDisconnected, ClientLeft):
            ctx.outcome, ctx.status = "client_disconnect", 499
        except Exception:
            log.exception("request %s failed inside the gateway", ctx.request_id)
            await self.send_error(
                ctx,
                GatewayError(
                    500,
                    "The gateway failed to handle the request.",
                    type="api_error",
                    code="internal_error",
                    outcome="upstream_error",
                ),
            )
        finally:
            record = ctx.usage_record(snapshot.current().prices_by_model)
            record_usage(record)
            if ctx.admission is not None:
                try:
                    runtime.quotas.settle(ctx, record)
                except Exception:  # the reservation lapses with its lease; the log line must still go out
                    log.exception("request %s: settling its quota reservation failed", ctx.request_id)
            watch.finish(record)

    async def send_body(self, body, *, more_body=False):
        await super().send_body(body, more_body=more_body)
        if not more_body:
            # Servers report http.disconnect once the response is complete; that is not the
            # client leaving, and the settling that follows must not be cancelled for it.
            self.response_done = True

    async def serve(self, ctx: RequestContext) -> None:
        """The steps of one request: from the headers route, authenticate (both before the body is
        read), then read the body, check and count it, and forward it (or answer the models list)."""
        scope = self.scope
        route = route_for(scope["path"])
        if route is None:
            ctx.route = "unknown"
            raise errors.not_found(f"Unknown request URL: {scope['method']} {scope['path']}.", code="unknown_url")
        ctx.route = route.operation
        if scope["method"] not in route.methods:
            raise errors.method_not_allowed(scope["method"], route.methods)
        key = self.authenticated_key(ctx)
        path = scope["path"]
        if (
            path.startswith("/openai/")
            and not path.startswith("/openai/v1/")
            and not query_param(scope.get("query_string", b""), "api-version")
        ):
            raise errors.bad_request(
                "The api-version query parameter (?api-version=) is required.",
                param="api-version",
                code="missing_api_version",
            )
        if route.operation == MODELS:
            return await self.send_json(ctx, 200, models_list(key))
        if route.operation == MODEL:
            return await self.send_json(ctx, 200, model_object(key, route.model or ""))
        pressure.admit()  # an overloaded process refuses before it reads the body or reserves capacity
        reader = BodyReader(self.asgi_receive, scope["headers"])
        try:
            raw = await reader.read()
            pressure.admit()  # again: the process may have become overloaded while the body came in
            plan = await self.prepare(ctx, route, key, raw)
        finally:
            reader.release()  # admitted or refused: the body no longer counts as waiting
        ctx.admission = await runtime.quotas.admit(ctx, key, plan)
        await Forwarder(self, ctx, plan, runtime.dispatcher).run()

    async def prepare(self, ctx: RequestContext, route: Route, key: KeyView, raw: bytes) -> ForwardPlan:
        """Parse, check and count the body: the forward plan, or a GatewayError.

        Bodies above ``OFFLOAD_BODY_BYTES`` do this in a worker thread (``body.offload``); it is
        pure work on the body and the snapshot, and the event loop keeps serving other streams.
        """
        snap, headers = snapshot.current(), self.scope["headers"]

        def work() -> ForwardPlan:
            return RequestChecks(route, key, parse_json_body(raw), ctx, headers).run(snap)

        if len(raw) > settings.GATEWAY["OFFLOAD_BODY_BYTES"]:
            return await offload(work)
        return work()

    # -- authentication ------------------------------------------------------------------------

    def presented_secret(self) -> str | None:
        authorization = api_key = None
        for name, value in self.scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"api-key":
                api_key = value
        return key_from_headers(authorization, api_key)

    def authenticated_key(self, ctx: RequestContext) -> KeyView:
        """The caller's KeyView from the snapshot, or a 401 the SDK raises as AuthenticationError."""
        try:
            key = authenticate(self.presented_secret(), snapshot.current().keys_by_hash, datetime.now(UTC))
        except AuthFailure as failure:
            raise errors.unauthorized(str(failure)) from None
        ctx.tenant_id, ctx.key_id, ctx.priority = key.tenant.id, key.id, key.default_priority
        return key

    # -- responses -----------------------------------------------------------------------------

    def base_headers(self, ctx: RequestContext, content_type: bytes = b"application/json") -> list:
        return [(b"content-type", content_type), (b"x-request-id", ctx.request_id.encode()), *ctx.response_headers]

    async def send_json(self, ctx: RequestContext, status: int, payload) -> None:
        ctx.status = status
        await self.send_response(status, json.dumps(payload).encode(), headers=self.base_headers(ctx))
        self.headers_sent = True

    async def send_error(self, ctx: RequestContext, err: GatewayError) -> None:
        """An OpenAI-shaped error, unless the response had already started (then only record it)."""
        ctx.status, ctx.outcome, ctx.error_code = err.status, err.outcome, err.reason or err.code or ""
        if self.headers_sent:
            return
        self.headers_sent = True
        await self.send_response(err.status, err.body(), headers=self.base_headers(ctx) + err.headers)


def allowed_models(key) -> list[str]:
    """Models this key may use: the snapshot's models, narrowed by the tenant's and the key's lists."""
    models = snapshot.current().models
    if key.tenant.allowed_models:
        models = [m for m in models if m in key.tenant.allowed_models]
    if key.allowed_models:
        models = [m for m in models if m in key.allowed_models]
    return models


def _model_entry(model: str) -> dict:
    return {"id": model, "object": "model", "created": 0, "owned_by": "llm-gateway"}


def models_list(key) -> dict:
    return {"object": "list", "data": [_model_entry(m) for m in allowed_models(key)]}


def model_object(key, model: str) -> dict:
    if model not in allowed_models(key):
        raise errors.not_found(
            f"The model '{model}' does not exist or you do not have access to it.", code="model_not_found"
        )
    return _model_entry(model)
