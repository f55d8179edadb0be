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

How an answer reaches the client is ``gateway.proxy.relay``: non-streamed answers read whole
(a broken one can still be retried), streams passed on as they arrive. A stream the upstream
breaks is that deployment's failure, billed for what arrived.
"""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings

from gateway.balancer.dispatcher import UNHEALTHY_CODE, Lease, NoCapacity
from gateway.observability.tracing import upstream_headers_traced
from gateway.proxy import azure_ad, errors, upstream, upstream_errors
from gateway.proxy.relay import AnswerBroke, AnswerRelay, read_bounded
from gateway.proxy.retries import MIN_ATTEMPT_SECONDS, FirstByteBudget, RetryPlan
from gateway.proxy.routes import UPSTREAM_PATH
from gateway.snapshot.types import AUTH_AZURE_AD, EndpointView

log = logging.getLogger(__name__)


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
        self.relay = AnswerRelay(consumer, ctx, plan)

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
                if exc.code == UNHEALTHY_CODE:
                    raise errors.deployments_unavailable(str(exc), exc.retry_after) from None
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
        self.dispatcher.sending(lease)
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
                await self.relay.client_error(response, self.secrets(deployment.endpoint))
            elif self.plan.stream:
                broken = await self.relay.stream(response)
                if broken:
                    await self.dispatcher.failed(lease, reached_upstream=True, reason=broken)
                    reported = True
                    return None
            else:
                try:
                    await self.relay.whole(response)
                except AnswerBroke as broke:
                    failure = AttemptFailed(broke.error, reason=broke.reason, reached_upstream=True)
                    await self.report(lease, failure)
                    reported = True
                    raise failure from None
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
        body = await read_bounded(response)
        reason = upstream_errors.failure_reason(status, body, self.secrets(endpoint))
        if kind == upstream_errors.REFUSED:
            # Nothing was generated: release the reservation rather than keep it.
            return AttemptFailed(
                upstream_errors.refusal(status, self.plan.model), reason=reason, reached_upstream=False, refused=True
            )
        return AttemptFailed(
            errors.bad_gateway(f"The upstream deployment answered HTTP {status}."), reason=reason, reached_upstream=True
        )


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


def _cut(timeouts: upstream.Timeouts, left: float) -> upstream.Timeouts:
    """``timeouts`` with connect and first byte no longer than ``left`` (the same object if they fit,
    which keeps the upstream client's per-Timeouts cache warm on first attempts)."""
    if timeouts.first_byte <= left and timeouts.connect <= left:
        return timeouts
    left = max(left, 0.001)
    return upstream.Timeouts(min(timeouts.connect, left), min(timeouts.first_byte, left), timeouts.total)
