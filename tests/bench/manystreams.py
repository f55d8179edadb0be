"""Many long streams at once (issue 20): TTFT beside direct, gateway CPU per relayed event, RSS per stream.

LLM traffic is mostly long streams, many at a time. Here every stream is 100 tokens at 50 ms per
token (about 5 s, 103 events: role, 100 tokens, finish, ``[DONE]``) from a simulated upstream of
its own, and ``concurrency`` clients each stream one completion after another (a closed loop whose
first requests are spread over one stream's length, so streams start at a steady rate rather than
in waves). Each concurrency runs straight to the upstream, then through one uvicorn gateway
process (one worker, pinned to its own CPU).

Figures per run: TTFT p50/p99 (request written to the first ``data:`` byte), streams served per
second (200s started in the window), statuses (an overloaded gateway answers 503 rather than making new streams wait), the gateway's
CPU time over the run divided by the events the clients received (connection set-up and the
per-request work included: what a relayed event costs all told), and its peak RSS above idle
divided by the concurrency.

Placement: direct runs have the upstream alone on the gateway's CPU and the generator on the
other (the upstream's best case); gateway runs move the upstream beside the generator, as every
gateway phase of the bench does.

Last, at the highest concurrency, a bare relay (``tests.bench.rawrelay``: one upstream read and one
client write per event, nothing else) takes the gateway's place: its CPU per event is the floor
that any relay pays here, mostly in the kernel.
"""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

from tests.bench.driver import Request, run_load
from tests.bench.procs import ProcessGroup, cpu_seconds, pin, rss_mb, wait_until
from tests.bench.scenarios import PROMPT, Pinning, log_errors
from tests.bench.stack import (
    REPO,
    SIM_API_KEY,
    BenchEnv,
    azure_path,
    free_port,
    post_json,
    settle,
    start_gateway,
)

LONG_DEPLOYMENT = LONG_MODEL = "bench-long"
LONG_TOKENS = 100
LONG_TOKEN_DELAY_MS = 50.0
STREAM_SECONDS = LONG_TOKENS * LONG_TOKEN_DELAY_MS / 1000.0
CONCURRENCIES = (100, 250, 500, 1000)

# Issue 20's targets.
TARGET_CPU_US_PER_EVENT = 20.0
TARGET_TTFT_P99_VS_DIRECT = 2.0


@dataclass(frozen=True)
class ManyStreamsConfig:
    """The concurrencies to run and the seconds of each run's parts."""

    concurrencies: tuple[int, ...] = CONCURRENCIES
    ramp: float = STREAM_SECONDS  # first requests spread over one stream's length, not measured
    window: float = 10.0  # streams started in this window are measured
    drain: float = STREAM_SECONDS + 10.0

    @classmethod
    def quick(cls, concurrencies: tuple[int, ...] = (100, 500)) -> ManyStreamsConfig:
        return cls(concurrencies=concurrencies, window=4.0)


def long_upstream(api_key: str) -> dict[str, Any]:
    """The simulator of the long streams: no limits, a cheap prompt estimate, 100 tokens at 50 ms."""
    return {
        "api_key": api_key,
        "token_estimate": "fast",
        "deployments": [
            {"name": LONG_DEPLOYMENT, "completion_tokens": LONG_TOKENS, "token_delay_ms": LONG_TOKEN_DELAY_MS}
        ],
    }


def long_gateway_deployment() -> dict[str, Any]:
    """The gateway's side of it, counting tokens as in production (tiktoken through ``upstream_model``)."""
    return {"name": LONG_DEPLOYMENT, "model": LONG_MODEL, "upstream_model": "gpt-4o"}


def _body(model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": LONG_TOKENS,
        "stream": True,
    }
    if model is not None:
        body["model"] = model
    return body


def direct_request() -> Request:
    return Request(azure_path(LONG_DEPLOYMENT), {"api-key": SIM_API_KEY}, _body(None))


def gateway_request(key: str) -> Request:
    return Request("/v1/chat/completions", {"authorization": f"Bearer {key}"}, _body(LONG_MODEL))


class PeakRss:
    """Samples a process's RSS every ``interval`` seconds in a thread, keeping the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_run(
    url: str, request: Request, concurrency: int, pid: int, pinning: Pinning, config: ManyStreamsConfig
) -> dict[str, Any]:
    """One closed loop of ``concurrency`` streams; the server ``pid``'s CPU per event and RSS beside it."""
    settle(1.0)
    rss_before = rss_mb(pid)
    cpu_before = cpu_seconds(pid)
    with PeakRss(pid) as rss:
        result = run_load(
            url,
            [request],
            cpus=pinning.load,
            concurrency=concurrency,
            warmup=config.ramp,
            duration=config.window,
            drain=config.drain,
            ramp=config.ramp,
            sse=True,
            retry_after=True,
        )
    used = cpu_seconds(pid) - cpu_before
    events = result.get("events") or 0
    # Streams served per second: the 200s started in the window (refusals complete too, and fast).
    served = result["overall"]["status"].get("200", 0)
    result["streams_per_second"] = served / result["window_s"] if result["window_s"] else None
    result["server"] = {
        "pid": pid,
        "cpu_seconds": used,
        "events": events,
        "cpu_us_per_event": 1e6 * used / events if events else None,
        "rss_before_mb": rss_before,
        "rss_peak_mb": rss.peak,
        "rss_kb_per_stream": 1024.0 * max(rss.peak - rss_before, 0.0) / concurrency,
    }
    return result


def run_many_streams(
    group: ProcessGroup,
    env: BenchEnv,
    sim: Any,
    key: str,
    pinning: Pinning,
    config: ManyStreamsConfig,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Direct runs at every concurrency, then the same through one gateway process."""
    results: dict[str, Any] = {"config": asdict(config), "direct": {}, "gateway": {}}
    if pinning.upstream_direct is not None:
        pin(sim.pid, pinning.upstream_direct)
    for concurrency in config.concurrencies:
        results["direct"][str(concurrency)] = one_run(sim.url, direct_request(), concurrency, sim.pid, pinning, config)
    if pinning.upstream_with_gateway is not None:
        pin(sim.pid, pinning.upstream_with_gateway)
    gateway = start_gateway(group, env, "uvicorn", pinning.gateway, extra_env=extra_env, name="gateway-manystreams")
    results["gateway_pid"] = gateway.pid
    try:
        smoke = post_json(gateway.url + "/v1/chat/completions", _body(LONG_MODEL), {"authorization": f"Bearer {key}"})
        if smoke.status_code != 200:
            raise RuntimeError(f"long-stream smoke request failed: {smoke.status_code} {smoke.text}")
        results["smoke_events"] = smoke.text.count("data:")
        results["rss_idle_mb"] = rss_mb(gateway.pid)
        for concurrency in config.concurrencies:
            results["gateway"][str(concurrency)] = one_run(
                gateway.url, gateway_request(key), concurrency, gateway.pid, pinning, config
            )
    finally:
        group.stop(gateway.child)
        results["exit_code"] = gateway.child.process.returncode
        results["log_lines"], results["log_errors"] = log_errors(gateway)
    results["floor"] = run_floor(group, sim, pinning, config)
    return results


def run_floor(group: ProcessGroup, sim: Any, pinning: Pinning, config: ManyStreamsConfig) -> dict[str, Any]:
    """The bare relay (``tests.bench.rawrelay``) in the gateway's place, at the highest concurrency."""
    port = free_port()
    relay = group.start(
        "rawrelay",
        [sys.executable, "-m", "tests.bench.rawrelay", sim.url, azure_path(LONG_DEPLOYMENT), SIM_API_KEY, str(port)],
        cpus=pinning.gateway,
        cwd=REPO,
    )
    try:
        wait_until(lambda: _accepts(port), timeout=30, what="raw relay listening")
        concurrency = max(config.concurrencies)
        request = Request("/relay", {}, {"stream": True})
        return {
            "concurrency": concurrency,
            **one_run(f"http://127.0.0.1:{port}", request, concurrency, relay.pid, pinning, config),
        }
    finally:
        group.stop(relay)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- the report -----------------------------------------------------------------------------------


def _ttft(run: dict[str, Any] | None, q: str) -> float | None:
    return ((run or {}).get("overall", {}).get("ttfb_ms") or {}).get(q)


def _statuses(run: dict[str, Any] | None) -> str:
    if not run:
        return "-"
    status = {k: v for k, v in run["overall"]["status"].items() if k != "200"}
    parts = [f"{k}x{v}" for k, v in status.items()] + [f"{k}: {v}" for k, v in (run.get("errors") or {}).items()]
    return ", ".join(parts)


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def many_streams_lines(results: dict[str, Any]) -> list[str]:
    """The report's lines for this phase."""
    run = results.get("manystreams")
    if not run or not run.get("direct"):
        return []
    lines = [
        f"Many streams ({LONG_TOKENS} tokens at {LONG_TOKEN_DELAY_MS:g} ms/token, one gateway worker; "
        "TTFT ms direct / gateway; gateway CPU per relayed event and RSS per stream):",
        "  streams  TTFT p50       TTFT p99        streams/s     CPU/event  RSS/stream  gateway non-200",
    ]
    worst_cpu, worst_ratio = None, None
    for concurrency, direct in run["direct"].items():
        gateway = run["gateway"].get(concurrency)
        server = (gateway or {}).get("server", {})
        cpu = server.get("cpu_us_per_event")
        d99, g99 = _ttft(direct, "p99"), _ttft(gateway, "p99")
        if cpu is not None:
            worst_cpu = max(worst_cpu or 0.0, cpu)
        if d99 and g99 is not None and int(concurrency) == max(int(c) for c in run["direct"]):
            worst_ratio = g99 / d99
        lines.append(
            f"  {int(concurrency):7d}  {_f(_ttft(direct, 'p50')):>5} / {_f(_ttft(gateway, 'p50')):<6}  "
            f"{_f(d99):>6} / {_f(g99):<6}  {_f(direct.get('streams_per_second'), 1):>5} / {_f((gateway or {}).get('streams_per_second'), 1):<5}  "
            f"{_f(cpu, 1):>6} us  {_f(server.get('rss_kb_per_stream'), 1):>6} KB  {_statuses(gateway)}"
        )
    floor = run.get("floor") or {}
    floor_cpu = (floor.get("server") or {}).get("cpu_us_per_event")
    if floor_cpu is not None:
        lines.append(
            f"  floor: a bare uvloop relay (tests/bench/rawrelay.py, no ASGI, nothing looked at) in the gateway's "
            f"place at {floor['concurrency']} streams: {floor_cpu:.1f} us per event"
        )
    if worst_cpu is not None:
        lines.append(
            f"  worst CPU per event {worst_cpu:.1f} us (target <= {TARGET_CPU_US_PER_EVENT:g}: "
            f"{'met' if worst_cpu <= TARGET_CPU_US_PER_EVENT else 'NOT met'})"
            + (
                f"; TTFT p99 at the highest concurrency {worst_ratio:.2f}x direct's (target <= "
                f"{TARGET_TTFT_P99_VS_DIRECT:g}x: {'met' if worst_ratio <= TARGET_TTFT_P99_VS_DIRECT else 'NOT met'})"
                if worst_ratio is not None
                else ""
            )
        )
    return lines
