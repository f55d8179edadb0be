"""``python -m tests.bench transports``: what the upstream HTTP transport costs the gateway.

The request path sends upstream through ``gateway.proxy.upstream.UpstreamClient`` (a plain
``aiohttp.ClientSession``). This bench is why: it drives the same ``open_stream`` call, with the
same timeout handling and raw (undecoded) body iteration, over three transports:

* ``aiohttp``: the production client, imported as is;
* ``httpx-aiohttp``: ``httpx.AsyncClient`` over httpx-aiohttp's transport (httpx's request and
  response layer, aiohttp's sockets);
* ``httpx``: ``httpx.AsyncClient`` on its own transport (httpcore).

The two httpx variants live here, not in the gateway. Each transport runs 32 concurrent closed
loops (send, read the whole body, send again) against the fast simulated upstream for a few
seconds, once with a JSON answer and once with an SSE stream (16 tokens, no per-token delay).
The client runs in this process on one CPU and the upstream on the other (``taskset``-style
affinity), with uvloop as under uvicorn. Reported per transport and body: requests per second
and the client process's CPU milliseconds per request (steadier than req/s when other work
shares the machine). With ``--rounds N`` each figure is the best of N runs (the quietest).
Results are printed as a table and written to ``var/bench/transports.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from gateway.proxy.upstream import (
    PHASE_CONNECT,
    PHASE_FIRST_BYTE,
    PHASE_TOTAL,
    Content,
    Headers,
    Timeouts,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from tests.bench.procs import usable_cpus
from tests.bench.scenarios import CHAT_DEPLOYMENT, Pinning, chat_body
from tests.bench.stack import REPO, SIM_API_KEY, azure_path
from tests.fakes.simulator import start_simulator_process

TRANSPORT_AIOHTTP = "aiohttp"
TRANSPORT_HTTPX_AIOHTTP = "httpx-aiohttp"
TRANSPORT_HTTPX = "httpx"
TRANSPORTS = (TRANSPORT_AIOHTTP, TRANSPORT_HTTPX_AIOHTTP, TRANSPORT_HTTPX)
LABELS = {
    TRANSPORT_AIOHTTP: "aiohttp `ClientSession` (the gateway's)",
    TRANSPORT_HTTPX_AIOHTTP: "httpx API over aiohttp (`httpx-aiohttp`)",
    TRANSPORT_HTTPX: "httpx's own transport",
}
BODIES = ("json", "sse")
CONCURRENCY = 32
COMPLETION_TOKENS = 16
TIMEOUTS = Timeouts(connect=5.0, first_byte=30.0, total=60.0)
OUTPUT = REPO / "var" / "bench" / "transports.json"


# --- the transports under comparison -------------------------------------------------------------


class StreamResponse(Protocol):
    status: int

    def __aiter__(self) -> StreamResponse: ...
    async def __anext__(self) -> bytes: ...
    async def aclose(self) -> None: ...


class StreamClient(Protocol):
    async def open_stream(
        self, method: str, url: str, headers: Headers, content: Content, timeouts: Timeouts
    ) -> StreamResponse: ...
    async def aclose(self) -> None: ...


def _header_deadline(timeouts: Timeouts) -> tuple[float, str]:
    # As in the gateway's client: the wait for the headers is bounded by first_byte (or total).
    if timeouts.first_byte < timeouts.total:
        return timeouts.first_byte, PHASE_FIRST_BYTE
    return timeouts.total, PHASE_TOTAL


class _HttpxResponse:
    """The body of an ``httpx`` response as raw chunks, with the total deadline on each read."""

    __slots__ = ("_chunks", "_deadline", "_resp", "_total", "headers", "status")

    def __init__(self, resp: httpx.Response, deadline: float, total: float) -> None:
        self.status = resp.status_code
        self.headers = [(k.lower(), v) for k, v in resp.headers.raw]
        self._resp = resp
        self._chunks = resp.aiter_raw()  # raw: no decompression, as the gateway relays bytes
        self._deadline = deadline
        self._total = total

    def __aiter__(self) -> _HttpxResponse:
        return self

    async def __anext__(self) -> bytes:
        try:
            async with asyncio.timeout_at(self._deadline):
                return await self._chunks.__anext__()
        except StopAsyncIteration:
            raise
        except BaseException as exc:
            await self._resp.aclose()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(PHASE_TOTAL, self._total) from exc
            if isinstance(exc, httpx.HTTPError):
                raise UpstreamProtocolError(f"upstream body broken: {exc!r}") from exc
            raise

    async def aclose(self) -> None:
        await self._resp.aclose()


class HttpxStreamClient:
    """``open_stream`` on ``httpx.AsyncClient``, over httpx-aiohttp's transport or httpx's own.

    The same contract as ``UpstreamClient.open_stream`` (timeouts per phase, raw chunks, errors
    mapped to the gateway's), so the comparison measures the transport and nothing else.
    """

    def __init__(self, transport: str, max_connections: int = 512, keepalive_expiry: float = 15.0) -> None:
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
        )
        if transport == TRANSPORT_HTTPX_AIOHTTP:
            from httpx_aiohttp import AiohttpTransport  # requirements-dev.txt

            self._client = httpx.AsyncClient(
                transport=AiohttpTransport(limits=limits, trust_env=False), follow_redirects=False, trust_env=False
            )
        elif transport == TRANSPORT_HTTPX:
            self._client = httpx.AsyncClient(limits=limits, follow_redirects=False, trust_env=False)
        else:
            raise ValueError(f"not an httpx transport: {transport!r}")

    async def open_stream(
        self, method: str, url: str, headers: Headers, content: Content, timeouts: Timeouts
    ) -> _HttpxResponse:
        deadline = asyncio.get_running_loop().time() + timeouts.total
        header_seconds, header_phase = _header_deadline(timeouts)
        request = self._client.build_request(
            method, url, headers=headers, content=content,
            timeout=httpx.Timeout(connect=timeouts.connect, read=None, write=None, pool=None),
        )  # fmt: skip
        try:
            async with asyncio.timeout(header_seconds):
                resp = await self._client.send(request, stream=True)
        except httpx.ConnectTimeout as exc:
            raise UpstreamTimeout(PHASE_CONNECT, timeouts.connect) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(header_phase, header_seconds) from exc
        except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
            raise UpstreamConnectError(f"cannot connect to upstream: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamProtocolError(f"upstream failed before responding: {exc!r}") from exc
        return _HttpxResponse(resp, deadline, timeouts.total)

    async def aclose(self) -> None:
        await self._client.aclose()


def make_client(transport: str) -> StreamClient:
    """A client on ``transport``; call it inside the event loop that will use it."""
    if transport == TRANSPORT_AIOHTTP:
        return UpstreamClient()
    return HttpxStreamClient(transport)


# --- one measurement -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    url: str
    headers: Headers
    body: bytes

    @classmethod
    def for_body(cls, upstream_url: str, kind: str) -> Load:
        body = json.dumps(chat_body(None, stream=kind == "sse")).encode()
        headers = [("api-key", SIM_API_KEY), ("content-type", "application/json")]
        return cls(upstream_url + azure_path(CHAT_DEPLOYMENT), headers, body)


async def measure(transport: str, load: Load, *, warmup: float, seconds: float) -> dict[str, Any]:
    """``CONCURRENCY`` closed loops for ``warmup + seconds``; the figures cover the last ``seconds``.

    A request counts when its whole body has been read with status 200; anything else is an
    error (kept, with the first message), so a misconfigured run cannot pass for a fast one.
    """
    client = make_client(transport)
    done = errors = 0
    first_error: str | None = None
    stop = asyncio.Event()

    def failed(what: str) -> None:
        nonlocal errors, first_error
        errors += 1
        first_error = first_error or what

    async def loop() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                response = await client.open_stream("POST", load.url, load.headers, load.body, TIMEOUTS)
                try:
                    async for _chunk in response:
                        pass
                finally:
                    await response.aclose()
            except Exception as exc:  # counted and reported, never hidden
                failed(repr(exc))
                continue
            if response.status == 200:
                done += 1
            else:
                failed(f"HTTP {response.status}")

    workers = [asyncio.create_task(loop()) for _ in range(CONCURRENCY)]
    try:
        await asyncio.sleep(warmup)
        count0, cpu0, wall0, errors0 = done, time.process_time(), time.perf_counter(), errors
        await asyncio.sleep(seconds)
        count1, cpu1, wall1, errors1 = done, time.process_time(), time.perf_counter(), errors
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        await client.aclose()
    requests = count1 - count0
    return {
        "requests": requests,
        "seconds": wall1 - wall0,
        "req_per_s": requests / (wall1 - wall0),
        "cpu_ms_per_request": 1000.0 * (cpu1 - cpu0) / requests if requests else None,
        "errors": errors1 - errors0,
        "first_error": first_error,
    }


def run_measurement(transport: str, load: Load, *, warmup: float, seconds: float) -> dict[str, Any]:
    """``measure`` in a fresh uvloop event loop (the loop the gateway runs on under uvicorn)."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(measure(transport, load, warmup=warmup, seconds=seconds))


# --- the run -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench transports",
        description="Compare upstream HTTP transports: 32 concurrent requests, JSON and SSE, "
        "against the fast simulator.",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured lead-in per run (default 0.5)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per transport and body; the best is kept")
    parser.add_argument(
        "--transports",
        default=",".join(TRANSPORTS),
        help=f"comma-separated subset of {','.join(TRANSPORTS)} (default: all)",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="JSON results (default var/bench/transports.json)")
    args = parser.parse_args(argv)
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in args.transports if t not in TRANSPORTS]
    if unknown:
        parser.error(f"unknown transport(s) {', '.join(unknown)}; choose from {', '.join(TRANSPORTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = Pinning.for_cpus(usable_cpus())
    if pinning.load is not None:
        os.sched_setaffinity(0, set(pinning.load))
    upstream = {
        "api_key": SIM_API_KEY,
        "token_estimate": "fast",
        "deployments": [{"name": CHAT_DEPLOYMENT, "completion_tokens": COMPLETION_TOKENS}],
    }
    results: dict[str, Any] = {
        "meta": {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "concurrency": CONCURRENCY,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "pinning": {"client": pinning.load, "upstream": pinning.upstream_direct},
            "python": sys.version.split()[0],
            "loadavg_at_start": _loadavg(),
        },
        "runs": {t: {b: [] for b in BODIES} for t in args.transports},
    }
    sim = start_simulator_process(upstream, cpus=pinning.upstream_direct)
    failed = False
    try:
        for round_ in range(args.rounds):
            for transport in args.transports:
                for kind in BODIES:
                    print(f"round {round_ + 1}: {transport} {kind}", file=sys.stderr, flush=True)
                    run = run_measurement(
                        transport, Load.for_body(sim.url, kind), warmup=args.warmup, seconds=args.seconds
                    )
                    results["runs"][transport][kind].append(run)
                    failed = failed or bool(run["errors"]) or not run["requests"]
    finally:
        sim.stop()
    results["meta"]["loadavg_at_end"] = _loadavg()
    results["best"] = {
        t: {b: max(runs, key=lambda r: r["req_per_s"]) for b, runs in bodies.items()}
        for t, bodies in results["runs"].items()
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render(results))
    print(f"\nJSON: {args.output}")
    return 1 if failed else 0


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"{meta['concurrency']} concurrent requests through open_stream, {meta['seconds']:g} s per run, "
        f"best of {meta['rounds']}; load average {meta['loadavg_at_start']} -> {meta['loadavg_at_end']}",
        "",
        "| transport | JSON req/s | SSE req/s | JSON CPU ms/req | SSE CPU ms/req | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for transport, best in results["best"].items():
        json_run, sse_run = best["json"], best["sse"]
        errors = sum(r["errors"] for runs in results["runs"][transport].values() for r in runs)
        lines.append(
            f"| {LABELS[transport]} | {json_run['req_per_s']:,.0f} | {sse_run['req_per_s']:,.0f} "
            f"| {_ms(json_run['cpu_ms_per_request'])} | {_ms(sse_run['cpu_ms_per_request'])} | {errors} |"
        )
        first_error = json_run["first_error"] or sse_run["first_error"]
        if first_error:
            lines.append(f"|   first error: {first_error} | | | | | |")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
