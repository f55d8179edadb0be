"""Relaying an upstream's answer to the client: a 2xx read whole or streamed as it arrives, a
client-caused 4xx rebuilt; the usage each reports goes into the request's context.

Non-streamed answers are read whole: they are needed whole for their usage, and reading them whole
lets a broken one be retried (``AnswerBroke``, which the forwarder turns into a failed attempt).
Streamed answers are passed on as they arrive, exactly as the upstream wrote them (``SseRelay``
looks inside only for the usage chunk, the end and errors); from the headers on, what arrives is
billed, and a stream the upstream breaks ends with an error event the SDKs understand.
"""

from __future__ import annotations

import json
import logging
import time

from gateway.proxy import errors, upstream, upstream_errors
from gateway.proxy.pressure import pressure
from gateway.proxy.sse import SseRelay, usage_from_json_body
from gateway.proxy.tokens import StreamTokenCounter

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


class AnswerBroke(Exception):
    """A 2xx answer that broke before the client got a byte of it: the attempt failed, and the
    request may try again."""

    def __init__(self, error: errors.GatewayError, reason: str) -> None:
        super().__init__(error.message)
        self.error, self.reason = error, reason


class AnswerRelay:
    """The answer of one request's attempt, relayed to its consumer; usage into ``ctx``."""

    def __init__(self, consumer, ctx, plan) -> None:
        self.consumer, self.ctx, self.plan = consumer, ctx, plan

    async def client_error(self, response, secrets: tuple[str, ...]) -> None:
        """A client-caused upstream 4xx: its status, type, code and param in a rebuilt body, scrubbed
        of ``secrets``."""
        body = await read_bounded(response)
        error = upstream_errors.client_error(response.status, body, secrets)
        error.headers = [(k, v) for k, v in passed_headers(response.headers) if k != b"content-type"]
        await self.consumer.send_error(self.ctx, error)

    async def whole(self, response) -> None:
        """Read the whole 2xx answer, then send it; a body that breaks raises ``AnswerBroke``."""
        ctx = self.ctx
        try:
            chunks = [chunk async for chunk in response]
        except upstream.UpstreamTimeout:
            raise AnswerBroke(
                errors.gateway_timeout("The upstream deployment did not finish its answer in time."),
                "timed out reading the answer",
            ) from None
        except Exception as exc:
            raise AnswerBroke(
                errors.bad_gateway("The upstream connection broke."), f"answer broke off: {type(exc).__name__}"
            ) from None
        finally:
            await response.aclose()
        body = b"".join(chunks)
        self.take_usage(usage_from_json_body(body))
        ctx.served = True
        ctx.status = response.status
        ctx.ttft = time.monotonic() - ctx.t0
        headers = [
            *passed_headers(response.headers),
            (b"x-request-id", ctx.request_id.encode()),
            *ctx.response_headers,
        ]
        self.consumer.headers_sent = True
        await self.consumer.send_response(response.status, body, headers=headers)

    async def stream(self, response) -> str | None:
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
                return await self.stream_error(relay.error, tail)
            if not relay.done:
                raise upstream.UpstreamConnectError("the stream ended before [DONE]")
            await consumer.send_body(tail, more_body=False)
            return None
        except (upstream.UpstreamError, OSError, ValueError) as exc:
            log.warning("upstream stream for %s broke: %s", ctx.request_id, exc)
            if relay.error is not None:  # the client already has the upstream's own error event
                return await self.stream_error(relay.error, b"")
            # Headers are out: report in-stream as the SDK expects, then close.
            ctx.outcome, ctx.error_code = "upstream_error", "stream_interrupted"
            await consumer.send_body(b"data: " + json.dumps(_STREAM_INTERRUPTED).encode() + b"\n\n", more_body=False)
            return f"stream broke off: {type(exc).__name__}"
        finally:
            await response.aclose()
            self.take_stream_usage(relay)

    async def stream_error(self, error: dict, tail: bytes) -> str:
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


def passed_headers(headers) -> list:
    return [(k, v) for k, v in headers if k in PASS_HEADERS]


async def read_bounded(response, limit: int = upstream_errors.MAX_ERROR_BODY_BYTES) -> bytes:
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


def _int(value, default: int) -> int:
    return value if isinstance(value, int) and value >= 0 else default
