"""Azure AD (Entra ID) client-credentials tokens for endpoints with ``auth = azure_ad``.

A token is fetched from ``{ad_authority}/{ad_tenant_id}/oauth2/v2.0/token`` and cached per
(authority, tenant, client id, scope). It is refreshed ahead of expiry, when less than
min(5 minutes, 10% of its lifetime) remains. Concurrent requests share one fetch (an
``asyncio.Lock`` per cache key); while a refresh is in flight, or if it fails, callers keep
using the current token as long as it is comfortably valid. A failed fetch is remembered for a
few seconds so that a bad secret does not turn every request into a call to Azure AD.

Requests go through ``httpx.AsyncClient`` (one per process and event loop, created on first use,
closed by ``aclose_http_client`` at runtime shutdown), not the upstream client: a token request
is rare, so httpx's per-request cost does not matter here. Each request gets the endpoint's own
timeouts: ``connect_timeout`` to connect, ``first_byte_timeout`` per read (and write),
``total_timeout`` for the whole exchange.

Error messages and log lines never contain the client secret or a token: they name the tenant,
the client id and Azure AD's own ``error`` / ``error_description`` (or the transport failure),
with the secret redacted defensively; the transport's exception is not chained, since it holds
the request, whose form carries the secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from gateway.proxy.upstream import UpstreamAuthError
from gateway.snapshot.types import EndpointView

logger = logging.getLogger(__name__)

CacheKey = tuple[str, str, str, str]

REFRESH_MARGIN_MAX = 300.0  # seconds
REFRESH_MARGIN_FRACTION = 0.10
# A token this close to expiry is no longer handed out while a refresh is pending or failing.
USABLE_MARGIN_MAX = 30.0
USABLE_MARGIN_FRACTION = 0.05
DEFAULT_LIFETIME = 300.0  # when the response names none: short, so we refresh soon
FAILURE_BACKOFF = 5.0
MAX_RESPONSE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Token:
    value: str = ""
    refresh_at: float = 0.0  # fetch a new one from here on
    usable_until: float = 0.0  # and stop handing this one out from here on


@dataclass(frozen=True, slots=True)
class _Failure:
    message: str
    until: float


def cache_key(endpoint: EndpointView) -> CacheKey:
    return (endpoint.ad_authority.rstrip("/"), endpoint.ad_tenant_id, endpoint.ad_client_id, endpoint.ad_scope)


def token_url(endpoint: EndpointView) -> str:
    return f"{endpoint.ad_authority.rstrip('/')}/{quote(endpoint.ad_tenant_id, safe='')}/oauth2/v2.0/token"


def _redact(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def _timeout(endpoint: EndpointView) -> httpx.Timeout:
    return httpx.Timeout(
        connect=endpoint.connect_timeout,
        read=endpoint.first_byte_timeout,
        write=endpoint.first_byte_timeout,
        pool=endpoint.connect_timeout,
    )


class AzureADTokenProvider:
    """Caches and refreshes client-credentials tokens. One per event loop (its locks are)."""

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        failure_backoff: float = FAILURE_BACKOFF,
    ) -> None:
        self._client = client  # None: the process's shared token client (``get_http_client``)
        self._clock = clock
        self._failure_backoff = failure_backoff
        self._tokens: dict[CacheKey, _Token] = {}
        self._failures: dict[CacheKey, _Failure] = {}
        self._locks: dict[CacheKey, asyncio.Lock] = {}

    async def get_token(self, endpoint: EndpointView) -> str:
        """A bearer token for ``endpoint``, from the cache when fresh. Raises ``UpstreamAuthError``."""
        key = cache_key(endpoint)
        now = self._clock()
        token = self._tokens.get(key)
        if token is not None and now < token.refresh_at:
            return token.value
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        if token is not None and now < token.usable_until and lock.locked():
            return token.value  # a refresh is under way; the current token is still good
        async with lock:
            now = self._clock()
            token = self._tokens.get(key)
            if token is not None and now < token.refresh_at:
                return token.value  # someone refreshed while we waited
            failure = self._failures.get(key)
            if failure is not None and now < failure.until:
                if token is not None and now < token.usable_until:
                    return token.value
                raise UpstreamAuthError(failure.message)
            try:
                fresh = await self._fetch(endpoint, now)
            except UpstreamAuthError as exc:
                self._failures[key] = _Failure(str(exc), self._clock() + self._failure_backoff)
                if token is not None and self._clock() < token.usable_until:
                    logger.warning("Azure AD token refresh failed; using the current token: %s", exc)
                    return token.value
                raise
            self._failures.pop(key, None)
            self._tokens[key] = fresh
            return fresh.value

    async def _fetch(self, endpoint: EndpointView, started: float) -> _Token:
        client = self._client or get_http_client()
        secret = endpoint.ad_client_secret
        where = f"Azure AD token request (tenant {endpoint.ad_tenant_id!r}, client {endpoint.ad_client_id!r})"
        form = {
            "grant_type": "client_credentials",
            "client_id": endpoint.ad_client_id,
            "client_secret": secret,
            "scope": endpoint.ad_scope,
        }
        try:
            async with asyncio.timeout(endpoint.total_timeout):
                status, body = await _post_form(client, token_url(endpoint), form, _timeout(endpoint))
        except TimeoutError:
            raise UpstreamAuthError(f"{where} failed: no answer within {endpoint.total_timeout:g}s") from None
        except (httpx.HTTPError, httpx.InvalidURL, _TooLarge) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise UpstreamAuthError(_redact(f"{where} failed: {detail}", secret)) from None
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise UpstreamAuthError(f"{where} failed: HTTP {status}, not a JSON object")
        access_token = payload.get("access_token")
        if status != 200 or not isinstance(access_token, str) or not access_token:
            error = str(payload.get("error") or "no access_token")
            description = str(payload.get("error_description") or "").splitlines()[0:1]
            detail = f"{error}: {description[0][:300]}" if description else error
            raise UpstreamAuthError(_redact(f"{where} failed: HTTP {status}, {detail}", secret, access_token or ""))
        lifetime = _lifetime(payload.get("expires_in"))
        # Expiry counts from when we asked: the token cannot have been issued earlier.
        return _Token(
            value=access_token,
            refresh_at=started + lifetime - min(REFRESH_MARGIN_MAX, REFRESH_MARGIN_FRACTION * lifetime),
            usable_until=started + lifetime - min(USABLE_MARGIN_MAX, USABLE_MARGIN_FRACTION * lifetime),
        )


class _TooLarge(Exception):
    """The token endpoint's answer exceeded ``MAX_RESPONSE_BYTES``."""


async def _post_form(
    client: httpx.AsyncClient, url: str, form: dict[str, str], timeout: httpx.Timeout
) -> tuple[int, bytes]:
    """POST ``form`` and return the status and body (at most ``MAX_RESPONSE_BYTES``)."""
    headers = {"accept": "application/json"}
    async with client.stream("POST", url, data=form, headers=headers, timeout=timeout) as response:
        parts: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise _TooLarge(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
            parts.append(chunk)
        return response.status_code, b"".join(parts)


def _lifetime(expires_in: object) -> float:
    # v2.0 sends an integer; v1.0 endpoints sent a string.
    try:
        seconds = float(expires_in)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_LIFETIME
    return seconds if seconds > 0 else DEFAULT_LIFETIME


class _Shared:
    """The process's token client and provider, bound to the loop that created them (a test
    suite's fresh loop per test gets fresh ones rather than broken ones)."""

    loop: asyncio.AbstractEventLoop | None = None
    provider: AzureADTokenProvider | None = None
    client: httpx.AsyncClient | None = None


def _bind_to_running_loop() -> None:
    loop = asyncio.get_running_loop()
    if _Shared.loop is not loop:
        _Shared.loop, _Shared.provider, _Shared.client = loop, None, None


def get_http_client() -> httpx.AsyncClient:
    """The process's httpx client for token requests, created on first use. Call inside the loop.

    No redirects (a token endpoint answers, it does not redirect a secret elsewhere) and no
    environment (proxies, ``.netrc``), like the upstream client.
    """
    _bind_to_running_loop()
    if _Shared.client is None:
        _Shared.client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
    return _Shared.client


async def aclose_http_client() -> None:
    """Close the token client (runtime shutdown). Safe to call when none was created."""
    loop, client = _Shared.loop, _Shared.client
    _Shared.client = None
    if client is not None and loop is asyncio.get_running_loop():
        await client.aclose()


def get_token_provider() -> AzureADTokenProvider:
    """The process's provider (per event loop), using the shared token client."""
    _bind_to_running_loop()
    if _Shared.provider is None:
        _Shared.provider = AzureADTokenProvider()
    return _Shared.provider


async def azure_ad_token(endpoint: EndpointView) -> str:
    """A bearer token for an ``auth = azure_ad`` endpoint (cached). Raises ``UpstreamAuthError``."""
    return await get_token_provider().get_token(endpoint)
