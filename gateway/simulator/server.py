"""HTTP layer of the simulated upstream (aiohttp low-level server, uvloop when available).

Routes (see the package docstring for behaviour):

* Azure: ``POST /openai/deployments/{d}/chat/completions|completions|embeddings?api-version=V``,
  ``GET /openai/models?api-version=V``.
* OpenAI-compatible: ``POST /v1/chat/completions|completions|embeddings`` (``body.model`` is
  the deployment), ``GET /v1/models``; the same under ``/openai/v1/`` (Azure's v1 API).
* Entra ID: ``POST /{tenant}/oauth2/v2.0/token``.
* Control (no auth): ``/_sim/...``, delegated to :mod:`.control`; ``GET /healthz``.

Order of checks on a model call: route -> api-version (Azure) -> auth -> JSON body ->
deployment (404) -> body shape (400) -> refusing faults -> arrival charge (:mod:`.arrival`: the
gateway's prompt count plus the completion allowance) -> admission (429) -> timeout/drop faults ->
latency and generation -> response.

The low-level :class:`aiohttp.web.Server` with one dispatch function is used rather than an
``Application``: no router, middleware or signal machinery on the hot path (measured faster).
Handler cancellation is on, so a caller that disconnects cancels its handler (its sleep or
stream) and is counted in ``client_disconnects``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import web

from gateway.proxy.tokens import ROUTE_CHAT as CHAT
from gateway.proxy.tokens import ROUTE_COMPLETIONS as COMPLETIONS
from gateway.proxy.tokens import ROUTE_EMBEDDINGS as EMBEDDINGS

from . import arrival, generation, ids, responses
from .control import handle_control
from .faults import DROP, RATE_LIMIT, REFUSING, TIMEOUT
from .httputil import BadRequest, json_response, not_found, read_json
from .limiter import RETRY_SLACK_S
from .state import SimulatorState
from .stats import DeploymentStats

_OPERATIONS = {"chat/completions": CHAT, "completions": COMPLETIONS, "embeddings": EMBEDDINGS}
_STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# How long a drop fault waits for already-written SSE events to leave the socket buffer
# before aborting (abort discards unsent data, which would make "after K chunks" a lie).
_DROP_FLUSH_TIMEOUT_S = 1.0


def _retry_headers(seconds: float) -> dict[str, str]:
    """``retry-after-ms`` (float, rounded up to 0.1 ms) and ``retry-after`` (whole seconds).

    The limiter's waits already include RETRY_SLACK_S (1 ms) beyond the true boundary, so the
    whole-second value may drop up to 1 ms of it: a wait of exactly 6 s (+ slack, + float
    noise) says "6", not "7", and is still never earlier than the true boundary.
    """
    ms = max(math.ceil(seconds * 10000) / 10, 0.1)
    whole = max(1, math.ceil((ms - RETRY_SLACK_S * 1000) / 1000))
    return {"retry-after-ms": f"{ms:.1f}", "retry-after": str(whole)}


class _Dropped(Exception):
    """Raised inside a stream when a drop fault fires (the transport is already aborted)."""


class SimulatorApp:
    """Request dispatch over a :class:`SimulatorState`."""

    def __init__(self, state: SimulatorState) -> None:
        self.state = state

    # ------------------------------------------------------------------ dispatch

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        method = request.method
        try:
            if path.startswith("/openai/deployments/"):
                rest = path[len("/openai/deployments/") :]
                deployment, _, operation = rest.partition("/")
                kind = _OPERATIONS.get(operation)
                if kind is None or not deployment:
                    return not_found(path)
                if method != "POST":
                    return self._method_not_allowed()
                return await self._azure_call(request, kind, deployment)
            for prefix in ("/v1/", "/openai/v1/"):
                if path.startswith(prefix):
                    operation = path[len(prefix) :]
                    if operation == "models":
                        return self._models(request, azure=False, method=method)
                    kind = _OPERATIONS.get(operation)
                    if kind is None:
                        return not_found(path)
                    if method != "POST":
                        return self._method_not_allowed()
                    return await self._openai_call(request, kind)
            if path == "/openai/models":
                return self._models(request, azure=True, method=method)
            if path.startswith("/_sim/"):
                return await handle_control(self.state, request, path[len("/_sim/") :])
            if path == "/healthz":
                return json_response(200, b'{"status":"ok"}')
            if path.endswith("/oauth2/v2.0/token") and method == "POST":
                return await self._token(request, path.split("/")[1])
            return not_found(path)
        except BadRequest as exc:
            return json_response(400, responses.openai_error(str(exc)))

    @staticmethod
    def _method_not_allowed() -> web.Response:
        return json_response(405, responses.openai_error("Method not allowed.", code="method_not_allowed"))

    # ------------------------------------------------------------------ model calls

    def _unauthorized(self, request: web.BaseRequest) -> web.Response | None:
        reason = self.state.auth.check(request.headers)
        if reason is None:
            return None
        return json_response(
            401,
            responses.openai_error(reason, code="invalid_api_key"),
            {"WWW-Authenticate": "Bearer"},
        )

    async def _azure_call(self, request: web.BaseRequest, kind: str, deployment: str) -> web.StreamResponse:
        api_version = request.query.get("api-version", "")
        if not api_version:
            return _missing_api_version()
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        body = await read_json(request)
        return await self._model_call(request, kind, deployment, body, api_version)

    async def _openai_call(self, request: web.BaseRequest, kind: str) -> web.StreamResponse:
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        body = await read_json(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter")
        # Only 429 messages quote the version; /v1 routes have none unless a preview is asked.
        return await self._model_call(request, kind, model, body, None)

    async def _model_call(
        self,
        request: web.BaseRequest,
        kind: str,
        name: str,
        body: dict,
        api_version: str | None,
    ) -> web.StreamResponse:
        state = self.state
        dep = state.get(name)
        if dep is None:
            return json_response(
                404,
                responses.azure_error(
                    "DeploymentNotFound",
                    f"The API deployment {name} does not exist. If you created the deployment "
                    "within the last 5 minutes, please wait a moment and try again.",
                ),
            )
        # Everything about this request lands on the counters current at arrival (see
        # state.py: reset contract).
        stats = dep.stats
        stats.requests += 1
        request_id = ids.request_id()
        headers = {"x-request-id": request_id, "apim-request-id": request_id}
        problem = _problem(kind, body)
        if problem is not None:
            stats.status(400)
            headers.update(dep.limit_headers(state.clock()))
            return json_response(400, responses.openai_error(problem), headers)

        if dep.faults:
            fault = dep.faults.take(REFUSING)
            if fault is not None:
                headers.update(dep.limit_headers(state.clock()))
                if fault.kind == RATE_LIMIT:
                    return self._too_many(stats, kind, api_version, "injected", fault.retry_after_ms / 1000, headers)
                stats.status(fault.status)
                message = fault.message
                if message is not None and "{credential}" in message:
                    message = message.replace("{credential}", state.auth.presented(request.headers))
                error_body = responses.status_error(fault.status, message, fault.type, fault.code, fault.param)
                return json_response(fault.status, error_body, headers)

        cfg = dep.config
        encoding_name = dep.encoding_name
        if encoding_name is not None and not state.encodings.ready(encoding_name):
            await state.encodings.load(encoding_name)
        prompt, counted = arrival.charge(kind, body, cfg)

        now = state.clock()
        decision = dep.admit(now, counted)
        headers.update(dep.limit_headers(now))
        if not decision.admitted:
            return self._too_many(stats, kind, api_version, decision.reason, decision.retry_after or 0.0, headers)

        stats.tokens_counted += counted
        stats.prompt_tokens += prompt
        meter = dep.ptu
        progress = _Progress()
        stats.enter()
        try:
            action = dep.faults.take(_ACTING) if dep.faults else None
            delay = cfg.latency_ms / 1000.0
            if action is not None and action.kind == TIMEOUT:
                delay += action.seconds
            drop_after = action.after_chunks if action is not None and action.kind == DROP else None

            if kind == EMBEDDINGS:
                if delay > 0:
                    await asyncio.sleep(delay)
                if drop_after is not None:
                    return self._drop(request, stats)
                items = responses.embedding_items(body.get("input"))
                dims = body.get("dimensions")  # text-embedding-3 lets callers shorten vectors
                if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
                    dims = cfg.embedding_dims
                payload = responses.embeddings_body(cfg.model, items, dims, body.get("encoding_format"), prompt)
                stats.status(200)
                return json_response(200, payload, headers)

            per_choice, capped = generation.generated_tokens(kind, body, cfg.completion_tokens)
            plan = _ReplyPlan(
                kind=kind,
                model=cfg.model,
                prompt=prompt,
                per_choice=per_choice,
                n=generation.choices(body),
                finish="length" if capped else "stop",
                delay=delay,
                token_delay=cfg.token_delay_ms / 1000.0,
                drop_after=drop_after,
                annotations=cfg.azure_annotations,
            )
            if body.get("stream") is True:
                options = body.get("stream_options")
                include_usage = (
                    isinstance(options, dict) and options.get("include_usage") is True and cfg.send_usage_in_stream
                )
                return await self._stream(request, plan, include_usage, headers, stats, progress)
            return await self._complete(request, plan, headers, stats, progress)
        except asyncio.CancelledError:
            stats.client_disconnects += 1
            raise
        finally:
            stats.leave()
            stats.completion_tokens += progress.produced
            if meter is not None:
                meter.settle(state.clock(), counted, prompt + progress.produced)

    async def _complete(
        self,
        request: web.BaseRequest,
        plan: _ReplyPlan,
        headers: dict[str, str],
        stats: DeploymentStats,
        progress: _Progress,
    ) -> web.StreamResponse:
        """Non-streaming: the whole generation time, then one body (or a dropped connection)."""
        delay = plan.delay + plan.per_choice * plan.token_delay
        if delay > 0:
            await asyncio.sleep(delay)
        if plan.drop_after is not None:
            return self._drop(request, stats)
        payload = responses.completion_body(
            plan.kind,
            _response_id(plan.kind),
            int(time.time()),
            plan.model,
            plan.n,
            plan.per_choice,
            plan.finish,
            plan.prompt,
            plan.annotations,
        )
        progress.produced = plan.per_choice * plan.n
        stats.status(200)
        return json_response(200, payload, headers)

    async def _stream(
        self,
        request: web.BaseRequest,
        plan: _ReplyPlan,
        include_usage: bool,
        headers: dict[str, str],
        stats: DeploymentStats,
        progress: _Progress,
    ) -> web.StreamResponse:
        """SSE: latency, headers, then one event per token with ``token_delay`` between."""
        if plan.delay > 0:
            await asyncio.sleep(plan.delay)
        response = web.StreamResponse(status=200, headers={**headers, **_STREAM_HEADERS})
        fmt = responses.StreamFormat(plan.kind, _response_id(plan.kind), int(time.time()), plan.model, include_usage)
        sent = 0

        async def emit(event: bytes, tokens: int = 0) -> None:
            nonlocal sent
            # aiohttp writes each chunk straight to the transport: no buffering to flush.
            await response.write(event)
            sent += 1
            progress.produced += tokens
            if plan.drop_after is not None and sent >= plan.drop_after:
                await self._abort(request)
                raise _Dropped

        try:
            await response.prepare(request)
            if plan.drop_after == 0:
                await self._abort(request)
                raise _Dropped
            if plan.annotations:
                await emit(fmt.annotation())
            for index in range(plan.n):
                event = fmt.role(index)
                if event is not None:
                    await emit(event)
            for i in range(plan.per_choice):
                if plan.token_delay > 0:
                    await asyncio.sleep(plan.token_delay)
                piece = responses.token_piece(i)
                for index in range(plan.n):
                    await emit(fmt.token(index, piece), tokens=1)
            for index in range(plan.n):
                await emit(fmt.finish(index, plan.finish))
            if include_usage:
                await emit(fmt.usage(plan.prompt, plan.per_choice * plan.n))
            await response.write(responses.SSE_DONE)
        except _Dropped:
            stats.drop()
            return response  # aiohttp's write_eof fails on the aborted transport, quietly
        except ConnectionError:
            stats.client_disconnects += 1
            return response
        stats.status(200)
        return response

    @staticmethod
    async def _abort(request: web.BaseRequest) -> None:
        """Close the connection abruptly, once what was written has left the buffer."""
        transport = request.transport
        if transport is None:
            return
        deadline = time.monotonic() + _DROP_FLUSH_TIMEOUT_S
        # A transport signals no "buffer empty" event (drain only waits below the high-water
        # mark), so poll it.
        while transport.get_write_buffer_size() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        transport.abort()

    def _drop(self, request: web.BaseRequest, stats: DeploymentStats) -> web.StreamResponse:
        """Non-streaming drop: no response at all, the connection just closes."""
        stats.drop()
        if request.transport is not None:
            request.transport.abort()
        # aiohttp's attempt to send this fails on the closed transport and is ignored.
        return web.Response(status=500)

    def _too_many(
        self,
        stats: DeploymentStats,
        kind: str,
        api_version: str | None,
        reason: str,
        retry_after: float,
        headers: dict[str, str],
    ) -> web.Response:
        retry = _retry_headers(retry_after)
        headers.update(retry)
        stats.status(429)
        body = responses.rate_limit_body(kind, api_version or "v1", reason, int(retry["retry-after"]))
        return json_response(429, body, headers)

    # ------------------------------------------------------------------ models, token, control

    def _models(self, request: web.BaseRequest, azure: bool, method: str) -> web.Response:
        if method != "GET":
            return self._method_not_allowed()
        if azure and not request.query.get("api-version"):
            return _missing_api_version()
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        pairs = [(d.config.name, d.config.model) for d in self.state.deployments.values()]
        created = int(time.time())
        body = responses.azure_models(pairs, created) if azure else responses.openai_models(pairs, created)
        return json_response(200, body)

    async def _token(self, request: web.BaseRequest, tenant: str) -> web.Response:
        raw = await request.content.read()
        form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        status, body = self.state.auth.issue(tenant, form)
        return json_response(status, responses.dumps(body))


@dataclass(slots=True)
class _ReplyPlan:
    """What an admitted chat/completions request will produce, and how slowly."""

    kind: str
    model: str
    prompt: int
    per_choice: int
    n: int
    finish: str
    delay: float
    token_delay: float
    drop_after: int | None
    annotations: bool


@dataclass(slots=True)
class _Progress:
    produced: int = 0  # completion tokens generated so far (all choices)


_ACTING = frozenset({TIMEOUT, DROP})


def _problem(kind: str, body: dict) -> str | None:
    """Why the body is unusable for ``kind`` (None = fine). Deliberately lenient otherwise:
    unknown fields pass, as on the real service."""
    if kind == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty array."
    elif kind == EMBEDDINGS and ("input" not in body or body["input"] in ("", [])):
        return "'input' is a required property and must not be empty."
    return None


def _response_id(kind: str) -> str:
    return ids.response_id("chatcmpl-" if kind == CHAT else "cmpl-")


def build_server(state: SimulatorState) -> web.Server:
    app = SimulatorApp(state)
    return web.Server(app.handle, handler_cancellation=True, access_log=None)


def _missing_api_version() -> web.Response:
    """Azure's answer to a call without ``?api-version=``."""
    return json_response(
        400,
        responses.azure_error(
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        ),
    )
