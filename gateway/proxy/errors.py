"""OpenAI-shaped errors: the body the SDKs parse, with the status that picks their exception class.

The SDK chooses its exception by status alone (400 BadRequestError, 401 AuthenticationError, 404
NotFoundError, 429 RateLimitError, >=500 InternalServerError) and reads ``retry-after-ms``,
``retry-after`` and ``x-should-retry`` to decide whether and when to retry.
"""

from __future__ import annotations

import json
import math


class GatewayError(Exception):
    """An error answered to the client before any response byte was sent.

    ``outcome`` is the usage record's outcome for it; ``headers`` are extra response headers
    (for example ``retry-after-ms`` on a 429); ``reason``, when given, is what the usage record
    keeps as its error code instead of ``code`` (which limit refused a request, for example).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        outcome: str = "client_error",
        headers: list[tuple[bytes, bytes]] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.outcome = outcome
        self.headers = headers or []
        self.extra: dict | None = None  # more members of the error object (Azure's innererror)
        self.reason = reason

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, code=self.code, param=self.param, extra=self.extra)


def error_body(
    message: str, *, type: str | None, code: str | None = None, param: str | None = None, extra: dict | None = None
) -> bytes:
    error = {"message": message, "type": type, "param": param, "code": code}
    if extra:
        error.update(extra)
    return json.dumps({"error": error}).encode()


def retry_headers(seconds: float, *, should_retry: bool = True) -> list[tuple[bytes, bytes]]:
    """Headers telling the SDK when to retry: ms precision for new SDKs, whole seconds for old ones."""
    seconds = max(seconds, 0.001)
    headers = [
        (b"retry-after-ms", str(math.ceil(seconds * 1000)).encode()),
        (b"retry-after", str(math.ceil(seconds)).encode()),
    ]
    if not should_retry:
        headers.append((b"x-should-retry", b"false"))
    return headers


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type="invalid_request_error", code="invalid_api_key", outcome="auth_error")


def forbidden(message: str, *, code: str = "permission_denied") -> GatewayError:
    return GatewayError(403, message, type="invalid_request_error", code=code, outcome="forbidden")


def not_found(message: str, *, code: str = "not_found") -> GatewayError:
    return GatewayError(404, message, code=code)


def method_not_allowed(method: str, allowed: tuple[str, ...]) -> GatewayError:
    err = GatewayError(
        405, f"Method {method} is not allowed here; use {', '.join(allowed)}.", code="method_not_allowed"
    )
    err.headers = [(b"allow", ", ".join(allowed).encode())]
    return err


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large")


def body_timeout(seconds: float) -> GatewayError:
    return GatewayError(408, f"The request body did not arrive within {seconds:g} seconds.", code="request_timeout")


def overloaded(retry_after: float = 1.0) -> GatewayError:
    """The process holds as many unadmitted request bodies as it may: come back shortly."""
    return GatewayError(
        503,
        "The gateway is busy receiving other requests; retry shortly.",
        type="api_error",
        code="gateway_overloaded",
        outcome="rate_limited",
        headers=retry_headers(retry_after),
    )


def server_overloaded(retry_after: float) -> GatewayError:
    """This process's event loop is saturated: a new request would wait seconds for its first byte.

    503 with ``Retry-After``: the SDKs retry it after the pause, and a load balancer can send it to
    another process at once. Nothing was reserved or sent upstream.
    """
    return GatewayError(
        503,
        "The gateway process is overloaded; retry shortly.",
        type="api_error",
        code="server_overloaded",
        outcome="rate_limited",
        headers=retry_headers(retry_after),
    )


def rate_limited(
    message: str, retry_after: float, *, code: str = "rate_limit_exceeded", should_retry: bool = True
) -> GatewayError:
    return GatewayError(
        429,
        message,
        type="rate_limit_error",
        code=code,
        outcome="rate_limited",
        headers=retry_headers(retry_after, should_retry=should_retry),
    )


def bad_gateway(message: str, *, code: str = "upstream_error", should_retry: bool = True) -> GatewayError:
    """502. ``should_retry=False`` tells the SDK not to retry (a refusal that will not go away by itself)."""
    headers = [] if should_retry else [(b"x-should-retry", b"false")]
    return GatewayError(502, message, type="api_error", code=code, outcome="upstream_error", headers=headers)


def gateway_timeout(message: str) -> GatewayError:
    return GatewayError(504, message, type="api_error", code="upstream_timeout", outcome="upstream_timeout")


def deployments_unavailable(message: str, retry_after: float) -> GatewayError:
    """503: every deployment that could serve the request is failing (their circuit breakers are
    open); nothing was sent upstream. Retry-After: when the first breaker lets a trial through."""
    return GatewayError(
        503,
        message,
        type="api_error",
        code="deployments_unavailable",
        outcome="upstream_error",
        headers=retry_headers(retry_after),
    )


def state_unavailable(retry_after: float) -> GatewayError:
    """The balancer's shared state (Redis) cannot be reached: nothing was sent upstream; retry shortly."""
    return GatewayError(
        503,
        "The gateway cannot reach its shared rate-limit state right now; nothing was sent upstream. Retry shortly.",
        type="api_error",
        code="state_unavailable",
        outcome="upstream_error",
        headers=retry_headers(retry_after),
    )
