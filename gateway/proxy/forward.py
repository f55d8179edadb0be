"""Forwarding one planned request upstream: dispatch, attempt, retry, relay, settle.

What an answer means is ``gateway.proxy.upstream_errors``; when to try again is
``gateway.proxy.retries`` (one first-byte deadline per request, retries up to ``MAX_RETRIES``).
Retries happen only before the first byte reaches the client:

* 429: the dispatcher cools the deployment and the request tries again (not the client's failure).
* 5xx, 408, connect errors, timeouts, a non-streamed answer that broke: counted towards the
  deployment's circuit breaker, and retried (untried deployments first, then after a short back-off).
* 401/403/404/407 or a redirect, or no Azure AD token: the upstream refused *the gateway*. Counted
  against the deployment like a failure, never relayed; the request goes to another deployment,
  and if none serves, the client gets a 502 that says so, without the upstream's words.
* Other 4xx (the client's request was wrong): relayed with the upstream's status, type, code and
  param in a rebuilt body, its message scrubbed of secrets.

Non-streamed answers are read whole (they are needed whole for their usage, and reading them
whole lets a broken one be retried); streamed answers are passed on event by event as they
arrive. A stream the upstream breaks is that deployment's failure, billed for what arrived.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from django.conf import settings

from gateway.balancer.dispatcher import Lease, NoCapacity
from gateway.observability.tracing import upstream_headers_traced
from gateway.proxy import azure_ad, errors, upstream, upstream_errors
from gateway.proxy.pressure import pressure
from gateway.proxy.retries import MIN_ATTEMPT_SECONDS, FirstByteBudget, RetryPlan
from gateway.proxy.routes import UPSTREAM_PATH
from gateway.proxy.sse import SseRelay, usage_from_json_body
from gateway.proxy.tokens import StreamTokenCounter
from gateway.snapshot.types import AUTH_AZURE_AD, EndpointView

log = logging.getLogger(__name__)

# Upstream response headers a client may see. Others (server, set-cookie, upstream ids, the
# deployment's utilisation, its x-ratelimit-* headers: a client's limits are its team's and
# key's, sent by admission) are the gateway's business.
PASS_HEADERS = frozenset(
    {
        b"content-type",
        b"openai-processing-ms",
        b"openai-version",
        b"retry-after",
        b"retry-after-ms",
        b"x-should-retry",
    }
)
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


_STREAM_INTERRUPTED = {
    "error": {
        "message": "The upstream stream was interrupted.",
        "type": "api_error",
        "param": None,
        "code": "stream_interrupted",
    }
}


class ClientDisconnected(Exception):
    """The client went away; the upstream request was cancelled."""


class AttemptFailed(Exception):
    """An attempt that failed before any byte reached the client; the request may try again.

    ``refused``: the upstream refused the gateway (not to be tried again for this request).
    ``reached_upstream``: the upstream may have counted the request against its limits.
    ``reason``: for operators (log, status page), without secrets. ``breaker_open``: set once the
    dispatcher has heard of it, when this failure left the deployment's breaker open.
    """

    def __init__(self, error: errors.GatewayError, *, reason: str, reached_upstream: bool, refused: bool = False):
        super().__init__(error.message)
        self.error = error
        self.reason = reason
        self.reached_upstream = reached_upstream
        self.refused = refused
        self.breaker_open = False


class Forwarder:
    def __init__(self, consumer, ctx, plan, dispatcher) -> None:
        self.consumer, self.ctx, self.plan, self.dispatcher = consumer, ctx, plan, dispatcher
        ctx.estimated_prompt_tokens = plan.demand.prompt_tokens
        # The candidates' longest first-byte timeout: with one endpoint, simply its own.
        self.budget = FirstByteBudget(max(d.endpoint.first_byte_timeout for d in plan.candidates))
        self.retry = RetryPlan((d.id for d in plan.candidates), settings.GATEWAY["MAX_RETRIES"], self.budget)
        self.ad_token: str | None = None  # the Azure AD token of the current attempt (scrubbed from errors)

    async def run(self) -> None:
        """Forward the request, watching for the client leaving while we wait or stream."""
        work = asyncio.ensure_future(self.forward())
        watch = asyncio.ensure_future(_until_disconnect(self.consumer.asgi_receive))
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            watch.cancel()
            raise
        if work.done() or self.consumer.response_done:
            watch.cancel()
            return await work
        # The client left: stop waiting or streaming; the attempt's cleanup settles usage.
        while not work.done():  # re-cancel: redis-py can swallow a cancellation mid-command
            work.cancel()
            await asyncio.wait({work}, timeout=0.1)
        if not work.cancelled():
            work.exception()  # retrieved, so asyncio does not log it as never retrieved
        raise ClientDisconnected()

    async def forward(self) -> None:
        """Attempts until one is relayed to the client, or the errors say to give up.

        Raises the GatewayError to answer: the last failure's 502/504 once retries, candidates
        or the first-byte budget are spent, or a 429 when no deployment has room in time.
        """
        plan, ctx, retry = self.plan, self.ctx, self.retry
        rate_limit_budget = 3 * len(plan.candidates) + 3
        while True:
            try:
                lease = await self.lease()
            except NoCapacity as exc:
                ctx.queue_wait += exc.queue_wait  # a 429 after 30 s in the queue says so in its record
                if retry.last_error is not None:
                    raise retry.last_error from None
                # A request larger than any deployment's minute will never fit: tell the SDK not to retry.
                raise errors.rate_limited(
                    str(exc), exc.retry_after, code=exc.code, should_retry=exc.code != "request_too_large"
                ) from None
            ctx.queue_wait += lease.queue_wait
            ctx.deployment_id, ctx.deployment_name = lease.deployment.id, lease.deployment.name
            try:
                retry_after = await self.attempt(lease)
            except AttemptFailed as failure:
                backoff = retry.after_failure(
                    lease.deployment.id, failure.error, refused=failure.refused, breaker_open=failure.breaker_open
                )
                if backoff is None:
                    raise failure.error from None
                ctx.retries += 1
                if backoff:
                    await self.back_off(backoff)
                continue
            if retry_after is None:
                return
            # Upstream 429: the dispatcher cooled that deployment; try again (elsewhere, or after waiting).
            rate_limit_budget -= 1
            ctx.retries += 1
            if rate_limit_budget <= 0 or self.budget.left() < MIN_ATTEMPT_SECONDS:
                raise errors.rate_limited("The upstream deployments are rate limited; retry later.", retry_after or 1.0)

    async def lease(self) -> Lease:
        """The next attempt's lease. Before any failure only the queue timeout bounds the wait. After
        one the request is on the clock: untried deployments are taken only if one has room now
        (waiting for one whose breaker others opened stalled retries for 30 s, measured), else a
        tried one after a back-off; and the wait is bounded by, and charged to, the first-byte budget.
        """
        plan, retry = self.plan, self.retry
        if retry.last_error is None:
            return await self.dispatcher.acquire(plan.candidates, plan.demand, retry.exclude())
        self.budget.resume()
        try:
            preferred, fallback = retry.exclude(), retry.exclude(untried_first=False)
            if preferred != fallback:
                try:
                    return await self.dispatcher.acquire(plan.candidates, plan.demand, preferred, wait=False)
                except NoCapacity:
                    pause = retry.backoff()
                    if pause is None:
                        raise
                    await asyncio.sleep(pause)
            # The dispatcher counts the queue timeout over the request's attempts from the time they waited.
            plan.demand.timeout = min(plan.demand.timeout, self.ctx.queue_wait + max(self.budget.left(), 0.0))
            return await self.dispatcher.acquire(plan.candidates, plan.demand, fallback)
        finally:
            self.budget.pause()

    async def back_off(self, seconds: float) -> None:
        """Wait before trying a deployment again; the wait is charged to the first-byte budget."""
        self.budget.resume()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.budget.pause()

    async def attempt(self, lease: Lease) -> float | None:
        """One attempt on ``lease``'s deployment. Returns None when answered, else the 429's wait.

        Raises ``AttemptFailed`` (already reported to the dispatcher) when another try may help.
        Whatever happens, the dispatcher hears of the attempt exactly once: succeeded, rate
        limited, failed, or (cancelled by a client that left) abandoned.
        """
        deployment = lease.deployment
        body = upstream.upstream_body(deployment, self.plan.body, self.plan.payload)
        reported = False
        left = self.budget.left()  # taken before the clock runs again: exact, and on a first attempt
        self.budget.resume()  # the endpoint's whole first_byte, so its own Timeouts object is used
        try:
            try:
                response = await self.open(deployment, body, left)
            except upstream.UpstreamError as exc:
                failure = await self.report(lease, self.open_failure(exc, deployment.endpoint))
                reported = True
                raise failure from None
            kind = upstream_errors.classify(response.status)
            if kind == upstream_errors.RATE_LIMITED:
                retry_after = _retry_after(response.headers)
                await response.aclose()
                await self.dispatcher.rate_limited(lease, retry_after, response.headers)
                reported = True
                return retry_after if retry_after is not None else 0.0
            if kind in (upstream_errors.REFUSED, upstream_errors.TRANSIENT):
                failure = await self.report(lease, await self.failed_answer(response, kind, deployment.endpoint))
                reported = True
                raise failure
            if kind == upstream_errors.CLIENT_ERROR:
                await self.relay_client_error(response, deployment.endpoint)
            elif self.plan.stream:
                broken = await self.relay_stream(response)
                if broken:
                    await self.dispatcher.failed(lease, reached_upstream=True, reason=broken)
                    reported = True
                    return None
            else:
                try:
                    await self.relay_whole(response)
                except AttemptFailed as failure:
                    await self.report(lease, failure)
                    reported = True
                    raise
            await self.dispatcher.succeeded(lease, self.ctx.prompt_tokens, self.ctx.completion_tokens, response.headers)
            reported = True
            return None
        finally:
            self.budget.pause()
            if not reported:
                # Cancelled (client gone) or broken mid-relay: settle what was used, no verdict.
                await asyncio.shield(
                    self.dispatcher.abandoned(lease, self.ctx.prompt_tokens, self.ctx.completion_tokens)
                )

    async def report(self, lease: Lease, failure: AttemptFailed) -> AttemptFailed:
        """Tell the dispatcher (breaker, status page); returns ``failure`` for the caller to raise."""
        # Refusals are configuration problems an operator must fix; transient failures are routine.
        level = logging.WARNING if failure.refused else logging.DEBUG
        log.log(
            level, "request %s: deployment %s failed: %s", self.ctx.request_id, lease.deployment.name, failure.reason
        )
        opened = await self.dispatcher.failed(lease, reached_upstream=failure.reached_upstream, reason=failure.reason)
        failure.breaker_open = bool(opened)
        return failure

    async def open(self, deployment, body: bytes, left: float) -> upstream.UpstreamResponse:
        """Send the attempt; its connect and first-byte timeouts cut to ``left``, the budget left."""
        endpoint = deployment.endpoint
        url = upstream.deployment_url(deployment, UPSTREAM_PATH[self.plan.route.operation])
        token = None
        if endpoint.auth == AUTH_AZURE_AD:
            try:
                async with asyncio.timeout(left):
                    token = self.ad_token = await azure_ad.azure_ad_token(endpoint)
            except TimeoutError:
                raise upstream.UpstreamTimeout(upstream.PHASE_CONNECT, left) from None
            left = self.budget.left()
        headers = upstream.build_headers(self.consumer.scope["headers"], endpoint, token)
        upstream_headers_traced(headers)  # the attempt's traceparent, when tracing is on
        timeouts = _cut(upstream.Timeouts.for_endpoint(endpoint), left)
        return await upstream.open_stream("POST", url, headers, body, timeouts)

    def secrets(self, endpoint: EndpointView) -> tuple[str, ...]:
        """What must never reach a client or a log: the endpoint's key and AD secret, the AD token."""
        return tuple(s for s in (endpoint.api_key, endpoint.ad_client_secret, self.ad_token) if s)

    def open_failure(self, exc: upstream.UpstreamError, endpoint: EndpointView) -> AttemptFailed:
        """The failure for an attempt that got no answer at all."""
        detail = upstream_errors.scrub(str(exc), self.secrets(endpoint))
        if isinstance(exc, upstream.UpstreamTimeout):
            sent = exc.phase != upstream.PHASE_CONNECT
            return AttemptFailed(
                errors.gateway_timeout(
                    f"The upstream deployment did not answer within {self.budget.seconds:g}s."
                    if sent
                    else "The upstream deployment could not be reached in time."
                ),
                reason=f"timed out ({exc.phase})",
                reached_upstream=sent,
            )
        if isinstance(exc, upstream.UpstreamAuthError):
            return AttemptFailed(
                errors.bad_gateway(
                    f"The gateway could not obtain credentials for the upstream of model '{self.plan.model}' "
                    "(Azure AD). This is not a problem with your API key; please contact the gateway's operators.",
                    code="upstream_auth_failed",
                    should_retry=False,
                ),
                reason=f"Azure AD token refused: {detail}",
                reached_upstream=False,
                refused=True,
            )
        # A protocol error before any response (a stale keep-alive connection) is safe to retry.
        return AttemptFailed(
            errors.bad_gateway("Could not reach the upstream deployment."),
            reason=f"could not connect: {detail}",
            reached_upstream=False,
        )

    async def failed_answer(self, response, kind: str, endpoint: EndpointView) -> AttemptFailed:
        """The failure for an answer the gateway does not relay (refused, or transient)."""
        status = response.status
        body = await _read_bounded(response)
        reason = upstream_errors.failure_reason(status, body, self.secrets(endpoint))
        if kind == upstream_errors.REFUSED:
            # Nothing was generated: release the reservation rather than keep it.
            return AttemptFailed(
                upstream_errors.refusal(status, self.plan.model), reason=reason, reached_upstream=False, refused=True
            )
        return AttemptFailed(
            errors.bad_gateway(f"The upstream deployment answered HTTP {status}."), reason=reason, reached_upstream=True
        )

    async def relay_client_error(self, response, endpoint: EndpointView) -> None:
        """A client-caused upstream 4xx: its status, type, code and param in a rebuilt, scrubbed body."""
        body = await _read_bounded(response)
        error = upstream_errors.client_error(response.status, body, self.secrets(endpoint))
        error.headers = [(k, v) for k, v in _passed_headers(response.headers) if k != b"content-type"]
        await self.consumer.send_error(self.ctx, error)

    async def relay_whole(self, response) -> None:
        """Read the whole 2xx answer, then send it; a body that breaks raises ``AttemptFailed``."""
        ctx = self.ctx
        try:
            chunks = [chunk async for chunk in response]
        except upstream.UpstreamTimeout:
            raise AttemptFailed(
                errors.gateway_timeout("The upstream deployment did not finish its answer in time."),
                reason="timed out reading the answer",
                reached_upstream=True,
            ) from None
        except Exception as exc:
            raise AttemptFailed(
                errors.bad_gateway("The upstream connection broke."),
                reason=f"answer broke off: {type(exc).__name__}",
                reached_upstream=True,
            ) from None
        finally:
            await response.aclose()
        body = b"".join(chunks)
        self.take_usage(usage_from_json_body(body))
        ctx.served = True
        ctx.status = response.status
        ctx.ttft = time.monotonic() - ctx.t0
        headers = [
            *_passed_headers(response.headers),
            (b"x-request-id", ctx.request_id.encode()),
            *ctx.response_headers,
        ]
        self.consumer.headers_sent = True
        await self.consumer.send_response(response.status, body, headers=headers)

    async def relay_stream(self, response) -> str | None:
        """Pass the event stream on as it arrives and count usage. Returns None when it ended well,
        else why the upstream broke it (after ending the client's stream with an error event).

        Each upstream read becomes at most one ASGI message with the complete events it brought,
        exactly as the upstream wrote them (``SseRelay``); the messages go to the server's
        ``send`` directly, without Channels' wrappers, since this loop runs once per token. Under
        CPU pressure the loop holds its upstream reads for a moment, so that events go out in
        bursts, one write each (``gateway.proxy.pressure``); the first event is never held.
        """
        ctx, consumer = self.ctx, self.consumer
        relay = SseRelay(self.plan.client_wants_usage, counter=self.stream_token_counter)
        ctx.status = response.status
        ctx.served = True  # from here on, what arrives is billed
        consumer.headers_sent = True
        await consumer.send_headers(
            status=response.status,
            headers=[*STREAM_HEADERS, (b"x-request-id", ctx.request_id.encode()), *ctx.response_headers],
        )
        read, feed, send = response.read_some, relay.feed, consumer.base_send
        try:
            while True:  # until the first event has gone out: its time is the TTFT
                chunk = await read()
                if not chunk:
                    break
                out = feed(chunk)
                if out:
                    ctx.ttft = time.monotonic() - ctx.t0
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    break
            while chunk:
                hold = pressure.stream_hold  # 0 unless the process is pressed: see gateway.proxy.pressure
                if hold and not relay.done:
                    await response.hold(hold)
                chunk = await read()
                if chunk:
                    out = feed(chunk)
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
            tail = relay.finish()
            if relay.error is not None:
                return await self.upstream_stream_error(relay.error, tail)
            if not relay.done:
                raise upstream.UpstreamConnectError("the stream ended before [DONE]")
            await consumer.send_body(tail, more_body=False)
            return None
        except (upstream.UpstreamError, OSError, ValueError) as exc:
            log.warning("upstream stream for %s broke: %s", ctx.request_id, exc)
            if relay.error is not None:  # the client already has the upstream's own error event
                return await self.upstream_stream_error(relay.error, b"")
            # Headers are out: report in-stream as the SDK expects, then close.
            ctx.outcome, ctx.error_code = "upstream_error", "stream_interrupted"
            await consumer.send_body(b"data: " + json.dumps(_STREAM_INTERRUPTED).encode() + b"\n\n", more_body=False)
            return f"stream broke off: {type(exc).__name__}"
        finally:
            await response.aclose()
            self.take_stream_usage(relay)

    async def upstream_stream_error(self, error: dict, tail: bytes) -> str:
        """The upstream ended its stream with an error event (relayed as it came): the deployment's
        failure, recorded with the upstream's code."""
        ctx = self.ctx
        code = error.get("code") or error.get("type")
        ctx.outcome = "upstream_error"
        ctx.error_code = str(code)[:64] if code else "upstream_stream_error"
        await self.consumer.send_body(tail, more_body=False)
        return f"upstream error event: {ctx.error_code}"

    def take_usage(self, usage: dict | None) -> None:
        if not usage:
            return
        ctx = self.ctx
        ctx.prompt_tokens = _int(usage.get("prompt_tokens"), ctx.prompt_tokens)
        ctx.completion_tokens = _int(usage.get("completion_tokens"), 0)
        details = usage.get("prompt_tokens_details") or {}
        ctx.cached_tokens = _int(details.get("cached_tokens") if isinstance(details, dict) else 0, 0)
        ctx.tokens_estimated = False

    def take_stream_usage(self, relay: SseRelay) -> None:
        """Usage from the upstream's usage chunk, or counted from the stream when it sent none."""
        if relay.usage:
            self.take_usage(relay.usage)
            return
        self.ctx.completion_tokens = relay.counted_completion_tokens()
        self.ctx.tokens_estimated = True

    def stream_token_counter(self) -> StreamTokenCounter:
        first = self.plan.candidates[0]
        return StreamTokenCounter(self.plan.model, family_hint=first.upstream_model, mode=first.token_estimate)


async def _until_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _header(headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _retry_after(headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (preferred) or ``retry-after``; None if absent."""
    for name, scale in ((b"retry-after-ms", 0.001), (b"retry-after", 1.0)):
        value = _header(headers, name)
        if value:
            try:
                return max(float(value) * scale, 0.0)
            except ValueError:
                continue
    return None


def _passed_headers(headers) -> list:
    return [(k, v) for k, v in headers if k in PASS_HEADERS]


async def _read_bounded(response, limit: int = upstream_errors.MAX_ERROR_BODY_BYTES) -> bytes:
    """Up to ``limit`` bytes of an error answer, then close it. A broken body gives what arrived."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in response:
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    except upstream.UpstreamError:
        pass
    finally:
        await response.aclose()
    return b"".join(parts)[:limit]


def _cut(timeouts: upstream.Timeouts, left: float) -> upstream.Timeouts:
    """``timeouts`` with connect and first byte no longer than ``left`` (the same object if they fit,
    which keeps the upstream client's per-Timeouts cache warm on first attempts)."""
    if timeouts.first_byte <= left and timeouts.connect <= left:
        return timeouts
    left = max(left, 0.001)
    return upstream.Timeouts(min(timeouts.connect, left), min(timeouts.first_byte, left), timeouts.total)


def _int(value, default: int) -> int:
    return value if isinstance(value, int) and value >= 0 else default
