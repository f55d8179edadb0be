"""Forwarding one planned request upstream: dispatch, attempt, retry, relay, settle.

Retries happen only before the first byte reaches the client: a 429 cools the deployment and
tries another (it is not the client's failure); a 5xx, connect error or timeout tries another up
to ``MAX_RETRIES`` and counts towards that deployment's circuit breaker. Non-streamed answers are
read whole (they are needed whole for their usage, and reading them whole lets a broken one be
retried); streamed answers are passed on event by event as they arrive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from django.conf import settings

from gateway.balancer.dispatcher import Lease, NoCapacity
from gateway.proxy import azure_ad, errors, upstream
from gateway.proxy.routes import UPSTREAM_PATH
from gateway.proxy.sse import SseRelay, usage_from_json_body
from gateway.proxy.tokens import StreamTokenCounter
from gateway.snapshot.types import AUTH_AZURE_AD

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


class ClientDisconnected(Exception):
    """The client went away; the upstream request was cancelled."""


class UpstreamFailed(Exception):
    """An attempt failed in a way another deployment might not (5xx, connect error, timeout)."""

    def __init__(self, error: errors.GatewayError, *, reached_upstream: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.reached_upstream = reached_upstream


class Forwarder:
    def __init__(self, consumer, ctx, plan, dispatcher) -> None:
        self.consumer, self.ctx, self.plan, self.dispatcher = consumer, ctx, plan, dispatcher

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
        """Attempts until one is relayed to the client, or the errors say to give up."""
        plan, ctx = self.plan, self.ctx
        max_failures = settings.GATEWAY["MAX_RETRIES"]
        rate_limit_budget = 3 * len(plan.candidates) + 3
        failures, exclude = 0, set()
        last_error: errors.GatewayError | None = None
        while True:
            try:
                lease = await self.dispatcher.acquire(plan.candidates, plan.demand, frozenset(exclude))
            except NoCapacity as exc:
                if last_error is not None and failures:
                    raise last_error from None
                # A request larger than any deployment's minute will never fit: tell the SDK not to retry.
                raise errors.rate_limited(
                    str(exc), exc.retry_after, code=exc.code, should_retry=exc.code != "request_too_large"
                ) from None
            ctx.queue_wait += lease.queue_wait
            ctx.deployment_id, ctx.deployment_name = lease.deployment.id, lease.deployment.name
            try:
                retry_after = await self.attempt(lease)
            except UpstreamFailed as failure:
                failures += 1
                last_error = failure.error
                exclude.add(lease.deployment.id)
                if failures > max_failures or len(exclude) >= len(plan.candidates):
                    raise failure.error from None
                ctx.retries += 1
                continue
            if retry_after is None:
                return
            # Upstream 429: the dispatcher cooled that deployment; try again (elsewhere, or after waiting).
            rate_limit_budget -= 1
            ctx.retries += 1
            if rate_limit_budget <= 0:
                raise errors.rate_limited("The upstream deployments are rate limited; retry later.", retry_after or 1.0)

    async def attempt(self, lease: Lease) -> float | None:
        """One attempt on ``lease``'s deployment. Returns None when answered, else the 429's wait."""
        deployment, plan = lease.deployment, self.plan
        body = upstream.upstream_body(deployment, plan.body, plan.payload)
        finished = False
        try:
            response = await self.open(deployment, body)
            if response.status == 429:
                retry_after = _retry_after(response.headers)
                await response.aclose()
                await self.dispatcher.rate_limited(lease, retry_after, response.headers)
                finished = True
                return retry_after if retry_after is not None else 0.0
            if response.status >= 500:
                detail = await _read_error_detail(response)
                await self.dispatcher.failed(lease, reached_upstream=True)
                finished = True
                raise UpstreamFailed(
                    errors.bad_gateway(f"The upstream deployment answered {response.status}: {detail}"),
                    reached_upstream=True,
                )
            if plan.stream and response.status < 300:
                await self.relay_stream(response)
            else:
                await self.relay_whole(response)
            await self.dispatcher.succeeded(lease, self.ctx.prompt_tokens, self.ctx.completion_tokens, response.headers)
            finished = True
            return None
        except upstream.UpstreamTimeout as exc:
            await self.dispatcher.failed(lease, reached_upstream=True)
            finished = True
            raise UpstreamFailed(
                errors.gateway_timeout(f"The upstream deployment did not answer in time ({exc})."),
                reached_upstream=True,
            ) from None
        except (upstream.UpstreamConnectError, upstream.UpstreamAuthError, upstream.UpstreamProtocolError) as exc:
            # A protocol error before any response (a stale keep-alive connection) is safe to retry.
            await self.dispatcher.failed(lease, reached_upstream=False)
            finished = True
            raise UpstreamFailed(
                errors.bad_gateway(f"Could not reach the upstream deployment: {exc}."), reached_upstream=False
            ) from None
        except UpstreamFailed:
            if not finished:  # the body broke while being read: a failure of this deployment
                await self.dispatcher.failed(lease, reached_upstream=True)
                finished = True
            raise
        finally:
            if not finished:
                # Cancelled (client gone) or broken mid-relay: settle what was used, no verdict.
                await asyncio.shield(
                    self.dispatcher.abandoned(lease, self.ctx.prompt_tokens, self.ctx.completion_tokens)
                )

    async def open(self, deployment, body: bytes):
        endpoint = deployment.endpoint
        url = upstream.deployment_url(deployment, UPSTREAM_PATH[self.plan.route.operation])
        token = await azure_ad.azure_ad_token(endpoint) if endpoint.auth == AUTH_AZURE_AD else None
        headers = upstream.build_headers(self.consumer.scope["headers"], endpoint, token)
        return await upstream.open_stream("POST", url, headers, body, upstream.Timeouts.for_endpoint(endpoint))

    async def relay_whole(self, response) -> None:
        """Read the whole answer, then send it with the upstream's status (2xx and 4xx alike)."""
        ctx = self.ctx
        try:
            chunks = [chunk async for chunk in response]
        except upstream.UpstreamTimeout:
            raise
        except Exception as exc:
            raise UpstreamFailed(
                errors.bad_gateway(f"The upstream connection broke: {exc}."), reached_upstream=True
            ) from None
        finally:
            await response.aclose()
        body = b"".join(chunks)
        if response.status < 300:
            self.take_usage(usage_from_json_body(body))
        else:
            ctx.outcome, ctx.error_code = "client_error", _error_code(body)
        ctx.status = response.status
        ctx.ttft = time.monotonic() - ctx.t0
        headers = [
            *_passed_headers(response.headers),
            (b"x-request-id", ctx.request_id.encode()),
            *ctx.response_headers,
        ]
        self.consumer.headers_sent = True
        await self.consumer.send_response(response.status, body, headers=headers)

    async def relay_stream(self, response) -> None:
        """Pass the event stream on as it arrives; count usage; end cleanly if the upstream breaks."""
        ctx, consumer = self.ctx, self.consumer
        relay = SseRelay(self.plan.client_wants_usage)
        ctx.status = response.status
        consumer.headers_sent = True
        await consumer.send_headers(
            status=response.status,
            headers=[*STREAM_HEADERS, (b"x-request-id", ctx.request_id.encode()), *ctx.response_headers],
        )
        try:
            async for chunk in response:
                out = relay.feed(chunk)
                if out:
                    if ctx.ttft is None:
                        ctx.ttft = time.monotonic() - ctx.t0
                    await consumer.send_body(out, more_body=True)
            tail = relay.finish()
            if not relay.done:
                raise upstream.UpstreamConnectError("the stream ended before [DONE]")
            await consumer.send_body(tail, more_body=False)
        except (upstream.UpstreamError, OSError, ValueError) as exc:
            # Headers are out: report in-stream as the SDK expects, then close.
            ctx.outcome, ctx.error_code = "upstream_error", "stream_interrupted"
            log.warning("upstream stream for %s broke: %s", ctx.request_id, exc)
            error = {
                "error": {
                    "message": "The upstream stream was interrupted.",
                    "type": "api_error",
                    "param": None,
                    "code": "stream_interrupted",
                }
            }
            await consumer.send_body(b"data: " + json.dumps(error).encode() + b"\n\n", more_body=False)
        finally:
            await response.aclose()
            self.take_stream_usage(relay)

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
        first = self.plan.candidates[0]
        counter = StreamTokenCounter(self.plan.model, family_hint=first.upstream_model, mode=first.token_estimate)
        for chunk in relay.parsed_payloads():
            counter.feed(chunk)
        self.ctx.completion_tokens = counter.completion_tokens()
        self.ctx.tokens_estimated = True


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


async def _read_error_detail(response) -> str:
    try:
        body = b"".join([chunk async for chunk in response])[:2000]
    except Exception:
        body = b""
    finally:
        await response.aclose()
    try:
        message = json.loads(body)["error"]["message"]
        return str(message)[:300]
    except Exception:
        return body[:200].decode("utf-8", "replace") or "no detail"


def _error_code(body: bytes) -> str:
    try:
        error = json.loads(body).get("error") or {}
        return str(error.get("code") or error.get("type") or "")[:100]
    except Exception:
        return ""


def _int(value, default: int) -> int:
    return value if isinstance(value, int) and value >= 0 else default
