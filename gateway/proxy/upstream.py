"""The upstream HTTP client: URLs, headers and a raw streaming request for Azure and OpenAI.

* URLs: an Azure endpoint gets ``{base}/openai/deployments/{deployment}/{path}?api-version=V``
  with V the *endpoint's* version (the client's api-version is never forwarded: the upstream
  may not support it). An OpenAI-compatible endpoint (base URL including ``/v1``; Azure's v1
  API is configured this way as ``https://res.openai.azure.com/openai/v1``) gets
  ``{base}/{path}``, and the body's ``model`` becomes the deployment's upstream name.
* Headers: the client's own, minus its credentials, hop-by-hop headers and cookies, with
  ``accept-encoding: identity`` so streamed bytes pass through untouched and can be counted;
  then the endpoint's credentials.
* ``open_stream`` sends one request and returns status, headers and an async iterator over the
  raw body bytes as they arrive (no decompression, no buffering). Three timeouts: ``connect``,
  ``first_byte`` (from sending until the response headers, connect included) and ``total``
  (the whole exchange, body included). Failures raise ``UpstreamConnectError``,
  ``UpstreamTimeout`` (with ``phase``) or ``UpstreamProtocolError``; HTTP error statuses are
  *not* exceptions, they are returned like any response.

One client per process (per event loop), with keep-alive pools, on a plain
``aiohttp.ClientSession``: the request path's only transport. httpx, the project's HTTP client
elsewhere, costs several times more CPU per request here; ``tests/bench/transports.py``
measures the difference (figures in docs/architecture.md, "Upstream transport, measured").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import aiohttp

from gateway import defaults
from gateway.snapshot.types import AUTH_AZURE_AD, AZURE, DeploymentView, EndpointView

PHASE_CONNECT = "connect"
PHASE_FIRST_BYTE = "first_byte"
PHASE_TOTAL = "total"

Headers = list[tuple[str, str]]
Content = bytes | AsyncIterable[bytes] | None


# --- errors -----------------------------------------------------------------------------------


class UpstreamError(Exception):
    """The upstream could not be reached or did not complete a response."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, DNS, TLS, bad URL): the request was never sent."""


class UpstreamTimeout(UpstreamError):
    """A timeout elapsed; ``phase`` is ``connect``, ``first_byte`` or ``total``."""

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"upstream {phase} timeout after {seconds:g}s")
        self.phase = phase
        self.seconds = seconds


class UpstreamProtocolError(UpstreamError):
    """The connection broke, or the upstream sent something that is not HTTP, mid-exchange."""


class UpstreamAuthError(UpstreamError):
    """The upstream credentials could not be obtained (e.g. an Azure AD token request failed)."""


# --- URLs and bodies --------------------------------------------------------------------------


def _azure_root(endpoint: EndpointView) -> str:
    base = endpoint.base_url.rstrip("/")
    # Accept a base URL configured with the "/openai" suffix as well as without it.
    return base if base.endswith("/openai") else base + "/openai"


def _query(endpoint: EndpointView, client_query: str) -> str:
    """The query string to send: the client's parameters minus ``api-version``, plus ours."""
    pairs = (
        [(k, v) for k, v in parse_qsl(client_query, keep_blank_values=True) if k != "api-version"]
        if client_query
        else []
    )
    if endpoint.kind == AZURE:
        pairs.append(("api-version", endpoint.api_version))
    return ("?" + urlencode(pairs)) if pairs else ""


def deployment_url(deployment: DeploymentView, path: str, client_query: str = "") -> str:
    """The upstream URL for a deployment route (``chat/completions``, ``embeddings``, ...).

    ``path`` is relative to the deployment (leading slashes ignored); ``client_query`` is the
    client's raw query string, forwarded without its ``api-version``.
    """
    endpoint = deployment.endpoint
    path = path.lstrip("/")
    if endpoint.kind == AZURE:
        name = quote(deployment.name, safe="")
        return f"{_azure_root(endpoint)}/deployments/{name}/{path}{_query(endpoint, client_query)}"
    return f"{endpoint.base_url.rstrip('/')}/{path}{_query(endpoint, client_query)}"


def endpoint_url(endpoint: EndpointView, path: str, client_query: str = "") -> str:
    """The upstream URL for a route without a deployment (``models``, ``responses``, ``files``)."""
    path = path.lstrip("/")
    root = _azure_root(endpoint) if endpoint.kind == AZURE else endpoint.base_url.rstrip("/")
    return f"{root}/{path}{_query(endpoint, client_query)}"


def models_url(endpoint: EndpointView) -> str:
    """``{base}/openai/models?api-version=V`` (Azure) or ``{base}/models`` (OpenAI-compatible)."""
    return endpoint_url(endpoint, "models")


def upstream_body(deployment: DeploymentView, body: bytes, parsed: dict[str, Any] | None) -> bytes:
    """The body to send: unchanged for Azure (the deployment is in the path) and whenever
    ``model`` already equals the deployment name; otherwise re-serialised with ``model``
    replaced, keeping key order and every other field. ``parsed`` is the body already decoded by
    the caller (None for bodies that are not a JSON object, which are sent as they are).
    """
    if deployment.endpoint.kind == AZURE or not isinstance(parsed, dict):
        return body
    if parsed.get("model") == deployment.name:
        return body
    rewritten = {**parsed, "model": deployment.name}
    return json.dumps(rewritten, ensure_ascii=False, separators=(",", ":")).encode()


# --- headers ----------------------------------------------------------------------------------

# Never forwarded: the client's credentials for the gateway (and the usual spellings of other
# vendors' key headers), cookies for the gateway's domain, framing the client library sets again,
# hop-by-hop headers (RFC 9110 7.6.1), and accept-encoding, replaced by identity.
_DROP = frozenset(
    {
        b"authorization", b"api-key", b"x-api-key", b"ocp-apim-subscription-key",
        b"openai-organization", b"openai-project", b"cookie",
        b"host", b"content-length", b"expect", b"accept-encoding",
        b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)  # fmt: skip


def build_headers(
    client_headers: Iterable[tuple[bytes, bytes]], endpoint: EndpointView, ad_token: str | None = None
) -> Headers:
    """The upstream request headers for a client request.

    ``client_headers`` are ASGI header pairs (bytes, lower-case names). Everything safe is kept
    in order (``content-type``, ``user-agent``, ``x-stainless-*``, ``aoai-*`` ...). The upstream
    credential is ``api-key`` (Azure key auth), ``Authorization: Bearer <key>`` (OpenAI-compatible)
    or ``Authorization: Bearer <ad_token>`` (Azure AD; the caller fetches the token first, see
    ``gateway.proxy.azure_ad``). Raises ``ValueError`` if an AD endpoint is given no token.
    """
    pairs = client_headers if isinstance(client_headers, list) else list(client_headers)
    drop = _DROP
    # "Connection: x-foo" makes x-foo hop-by-hop too.
    for name, value in pairs:
        if name.lower() == b"connection":
            drop = drop | {t.strip().lower() for t in value.split(b",") if t.strip()}
    headers: Headers = []
    for name, value in pairs:
        lname = name.lower()
        if lname in drop or lname.startswith(b"proxy-"):
            continue
        headers.append((lname.decode("latin-1"), value.decode("latin-1")))
    headers.append(("accept-encoding", "identity"))
    if endpoint.auth == AUTH_AZURE_AD:
        if not ad_token:
            raise ValueError(f"endpoint {endpoint.name!r} uses Azure AD auth but no token was given")
        headers.append(("authorization", f"Bearer {ad_token}"))
    elif endpoint.kind == AZURE:
        headers.append(("api-key", endpoint.api_key))
    else:
        headers.append(("authorization", f"Bearer {endpoint.api_key}"))
    return headers


# --- timeouts and responses -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed to connect, to receive the response headers, and for the whole exchange."""

    connect: float = defaults.CONNECT_TIMEOUT
    first_byte: float = defaults.FIRST_BYTE_TIMEOUT
    total: float = defaults.TOTAL_TIMEOUT

    @classmethod
    def for_endpoint(cls, endpoint: EndpointView) -> Timeouts:
        return cls(endpoint.connect_timeout, endpoint.first_byte_timeout, endpoint.total_timeout)


def _header_timeout_phase(timeouts: Timeouts) -> tuple[float, str]:
    if timeouts.first_byte < timeouts.total:
        return timeouts.first_byte, PHASE_FIRST_BYTE
    return timeouts.total, PHASE_TOTAL


class UpstreamResponse:
    """An upstream response whose body has not been read yet.

    ``status``; ``headers`` as (lower-case name, value) byte pairs, ready for ASGI. Iterate it
    (``async for chunk in response``) for the raw body bytes as they arrive; a broken body
    raises ``UpstreamProtocolError`` or ``UpstreamTimeout(total)``. The caller must call
    ``aclose()`` when done (or use ``async with``): it returns a fully read connection to the
    pool and closes an unfinished one, so a cancelled consumer (client disconnect) stops the
    upstream generating. A cancellation that arrives while a chunk is awaited closes the
    connection at once.
    """

    __slots__ = ("_resp", "_total", "headers", "reason", "status")

    def __init__(self, resp: aiohttp.ClientResponse, total: float) -> None:
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = [(k.lower(), v) for k, v in resp.raw_headers]
        self._resp = resp
        self._total = total

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), decoded, or None."""
        key = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read_some()
        if chunk:
            return chunk
        raise StopAsyncIteration

    async def read_some(self) -> bytes:
        """Whatever body bytes have arrived (waiting for some if none has), or b"" at the end.

        The stream relay's read: one call per upstream read, without the iterator protocol.
        """
        try:
            # readany returns whatever has arrived, without waiting to fill a buffer.
            chunk = await self._resp.content.readany()
        except BaseException as exc:
            self._resp.close()  # cancelled or broken: drop the connection, stop the upstream
            if isinstance(exc, TimeoutError):  # aiohttp's total timer, which covers the body
                raise UpstreamTimeout(PHASE_TOTAL, self._total) from exc
            if isinstance(exc, aiohttp.ClientError):
                raise UpstreamProtocolError(f"upstream body broken: {exc!r}") from exc
            raise
        if not chunk:
            self._resp.release()
        return chunk

    async def hold(self, seconds: float) -> None:
        """Read nothing from the upstream for ``seconds``: what it sends meanwhile waits in the
        socket and arrives as one read, instead of one read (and one wake-up) per event.

        The transport is paused, not aiohttp's protocol: pausing the protocol also pauses its
        parser, which then stops after the first chunk of the next read, one event per read.
        """
        connection = self._resp.connection
        transport = connection.transport if connection is not None else None
        if transport is None or transport.is_closing():
            await asyncio.sleep(seconds)
            return
        transport.pause_reading()
        try:
            await asyncio.sleep(seconds)
        finally:
            if not transport.is_closing():
                transport.resume_reading()

    async def aclose(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()  # fully read: the connection goes back to the pool
        else:
            self._resp.close()  # unfinished: drop the connection so the upstream stops

    async def aread(self, limit: int = 16 * 1024 * 1024) -> bytes:
        """Read the whole body (up to ``limit`` bytes, else ``UpstreamProtocolError``), then close."""
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in self:
                size += len(chunk)
                if size > limit:
                    raise UpstreamProtocolError(f"upstream response body exceeds {limit} bytes")
                parts.append(chunk)
        finally:
            await self.aclose()
        return b"".join(parts)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@lru_cache(maxsize=256)
def _aiohttp_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    # aiohttp's total timer also bounds the body reads; sock_connect bounds the TCP+TLS connect;
    # open_stream's own timeout bounds the wait for the headers.
    return aiohttp.ClientTimeout(total=timeouts.total, sock_connect=timeouts.connect)


class UpstreamClient:
    """A pooled ``aiohttp.ClientSession``; ``open_stream`` is its only request method.

    Create it inside the event loop that will use it: aiohttp binds its session to that loop.
    """

    def __init__(self, max_connections: int = 0, keepalive_expiry: float = 15.0) -> None:
        connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=keepalive_expiry)
        # auto_decompress=False: bytes go to the client exactly as the upstream sent them.
        # trust_env stays off: with it aiohttp reads ~/.netrc in a thread on *every* request.
        # The dummy cookie jar keeps one upstream's cookies from leaking into another's requests.
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def open_stream(
        self, method: str, url: str, headers: Headers, content: Content, timeouts: Timeouts
    ) -> UpstreamResponse:
        """Send a request and return once the response headers have arrived.

        ``content`` is the body (bytes, an async iterable of bytes for an upload streamed in
        chunks, or None). Never raises for an HTTP status; raises ``UpstreamConnectError``,
        ``UpstreamTimeout`` (``connect`` / ``first_byte`` / ``total``) or ``UpstreamProtocolError``.
        """
        header_seconds, header_phase = _header_timeout_phase(timeouts)
        try:
            async with asyncio.timeout(header_seconds):
                resp = await self._session.request(
                    method, url, headers=headers, data=content, timeout=_aiohttp_timeout(timeouts),
                    allow_redirects=False, auto_decompress=False,
                )  # fmt: skip
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamTimeout(PHASE_CONNECT, timeouts.connect) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(header_phase, header_seconds) from exc
        except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as exc:
            raise UpstreamConnectError(f"cannot connect to upstream: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(f"upstream failed before responding: {exc!r}") from exc
        return UpstreamResponse(resp, timeouts.total)

    async def aclose(self) -> None:
        await self._session.close()


# --- the shared client ------------------------------------------------------------------------


def client_from_settings() -> UpstreamClient:
    """An ``UpstreamClient`` sized from ``settings.GATEWAY`` (defaults outside Django)."""
    config: dict[str, Any] = {}
    try:
        from django.conf import settings

        if settings.configured:
            config = getattr(settings, "GATEWAY", {})
    except ImportError:
        pass
    return UpstreamClient(
        max_connections=config.get("UPSTREAM_MAX_CONNECTIONS", 0),
        keepalive_expiry=config.get("UPSTREAM_KEEPALIVE_SECONDS", 15.0),
    )


class _Shared:
    """The process's client. It is bound to the loop that created it; another running loop (a
    test suite's fresh loop per test) gets a fresh client rather than a broken one."""

    loop: asyncio.AbstractEventLoop | None = None
    client: UpstreamClient | None = None


def get_client() -> UpstreamClient:
    """The process's shared client, created on first use from settings. Call inside the loop."""
    loop = asyncio.get_running_loop()
    if _Shared.client is None or _Shared.loop is not loop:
        _Shared.loop, _Shared.client = loop, client_from_settings()
    return _Shared.client


async def aclose_client() -> None:
    """Close the shared client (ASGI lifespan shutdown). Safe to call when none was created."""
    loop, client = _Shared.loop, _Shared.client
    _Shared.loop = _Shared.client = None
    if client is not None and loop is asyncio.get_running_loop():
        await client.aclose()


async def open_stream(
    method: str, url: str, headers: Headers, content: Content, timeouts: Timeouts
) -> UpstreamResponse:
    """``UpstreamClient.open_stream`` on the shared client."""
    return await get_client().open_stream(method, url, headers, content, timeouts)
