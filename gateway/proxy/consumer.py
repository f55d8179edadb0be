"""The proxy consumer: the OpenAI- and Azure-compatible API, one request at a time.

``handle`` reads as the steps of DESIGN.md: authenticate -> check -> estimate -> balance ->
forward -> settle -> record. Nothing here queries the database: keys, tenants and deployments
come from the in-memory snapshot, usage goes to a non-blocking buffer.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings

from billing.usage_sink import record_usage
from gateway import snapshot
from gateway.proxy import errors
from gateway.proxy.checks import RequestChecks
from gateway.proxy.context import RequestContext
from gateway.proxy.errors import GatewayError
from gateway.proxy.forward import ClientDisconnected, Forwarder
from gateway.proxy.routes import MODEL, MODELS, query_param, route_for
from gateway.proxy.runtime import runtime
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
    """Serves ``/v1/...`` and ``/openai/...``; every other path goes to Django."""

    # The proxy never talks to other consumers. Without a channel layer Channels creates no
    # channel and no second receive task for each request (a measurable cost per request).
    channel_layer_alias = "__the_proxy_has_no_channel_layer__"

    async def __call__(self, scope, receive, send):
        # Kept so the forwarder can notice a client that disconnects while we wait upstream.
        self.asgi_receive = receive
        self.body_size = 0
        self.refused = False
        self.headers_sent = False
        self.response_done = False
        await super().__call__(scope, receive, send)

    async def dispatch(self, message):
        """Channels' dispatch without its ``aclose_old_connections()``: that closes stale database
        connections around every message, two hops to a worker thread and back per request
        (measured at ~12% of the gateway's CPU), and the proxy uses no database connection."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def http_disconnect(self, message):
        await self.disconnect()
        raise StopConsumer()

    async def send_body(self, body, *, more_body=False):
        await super().send_body(body, more_body=more_body)
        if not more_body:
            # Servers report http.disconnect once the response is complete; that is not the
            # client leaving, and the settling that follows must not be cancelled for it.
            self.response_done = True

    async def http_request(self, message):
        """Collect the body, refusing it with 413 as soon as it passes the configured limit."""
        limit = settings.GATEWAY["MAX_BODY_BYTES"]
        if not self.refused:
            chunk = message.get("body", b"")
            self.body_size += len(chunk)
            if self.body_size > limit or (self.body_size == len(chunk) and _declared_length(self.scope) > limit):
                self.refused = True
                self.body = []
                await self.respond_once(errors.too_large(limit))
            else:
                self.body.append(chunk)
        if message.get("more_body"):
            return
        if not self.refused:
            try:
                await self.handle(b"".join(self.body))
            finally:
                await self.disconnect()
        raise StopConsumer()

    async def respond_once(self, err: GatewayError) -> None:
        """Answer a body that is too large and record it; the rest of the body is discarded."""
        await runtime.ensure_started()
        ctx = RequestContext.begin(self.scope)
        route = route_for(self.scope["path"])
        ctx.route = route.operation if route else "unknown"
        self.attribute_key(ctx)
        await self.send_error(ctx, err)
        record_usage(ctx.usage_record(snapshot.current().prices_by_model))

    async def handle(self, body: bytes) -> None:
        if self.scope["method"] == "OPTIONS":
            # CORS preflight: no key, no accounting (it is not an API call).
            await self.send_response(204, b"", headers=CORS_HEADERS)
            return
        await runtime.ensure_started()
        ctx = RequestContext.begin(self.scope)
        try:
            await self.serve(ctx, body)
        except GatewayError as err:
            await self.send_error(ctx, err)
        except ClientDisconnected:
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
                runtime.quotas.settle(ctx, record)

    async def serve(self, ctx: RequestContext, body: bytes) -> None:
        """Route, authenticate, then answer locally (models) or forward upstream."""
        scope = self.scope
        route = route_for(scope["path"])
        if route is None:
            ctx.route = "unknown"
            raise errors.not_found(f"Unknown request URL: {scope['method']} {scope['path']}.", code="unknown_url")
        ctx.route = route.operation
        if scope["method"] not in route.methods:
            raise errors.method_not_allowed(scope["method"], route.methods)
        key = self.authenticated_key(ctx)
        if scope["path"].startswith("/openai/") and not scope["path"].startswith("/openai/v1/"):
            if not query_param(scope.get("query_string", b""), "api-version"):
                raise errors.bad_request(
                    "The api-version query parameter (?api-version=) is required.",
                    param="api-version",
                    code="missing_api_version",
                )
        if route.operation == MODELS:
            return await self.send_json(ctx, 200, models_list(key))
        if route.operation == MODEL:
            return await self.send_json(ctx, 200, model_object(key, route.model))
        payload = parse_json_object(body)
        checks = RequestChecks(route, key, payload, ctx, scope["headers"])
        plan = checks.run(snapshot.current(), body)
        ctx.admission = await runtime.quotas.admit(ctx, key, plan)
        forwarder = Forwarder(self, ctx, plan, runtime.dispatcher)
        await forwarder.run()

    # -- authentication ------------------------------------------------------------------------

    def presented_secret(self) -> str | None:
        authorization = api_key = None
        for name, value in self.scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"api-key":
                api_key = value
        return key_from_headers(authorization, api_key)

    def authenticated_key(self, ctx: RequestContext):
        """The caller's KeyView from the snapshot, or a 401 the SDK raises as AuthenticationError."""
        try:
            key = authenticate(self.presented_secret(), snapshot.current().keys_by_hash, datetime.now(UTC))
        except AuthFailure as failure:
            raise errors.unauthorized(str(failure)) from None
        ctx.tenant_id, ctx.key_id, ctx.priority = key.tenant.id, key.id, key.default_priority
        return key

    def attribute_key(self, ctx: RequestContext) -> None:
        """Attribute a refused request to its key when the key is valid; never raises."""
        try:
            self.authenticated_key(ctx)
        except GatewayError:
            pass

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


def _declared_length(scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def parse_json_object(body: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not body:
        raise errors.bad_request("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise errors.bad_request("The request body must be a JSON object.", code="invalid_json")
    return payload


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
