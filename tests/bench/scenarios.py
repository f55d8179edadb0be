"""The latency, throughput and resource scenarios: direct to the upstream, then through gateways.

Each function runs one phase and returns plain dicts (the load generator's results plus what was
read from /proc), which ``report`` turns into the table and the JSON file. Nothing here decides
a figure: every number comes from a run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tests.bench import wrk
from tests.bench.driver import Request, run_load
from tests.bench.procs import ProcessGroup, cpu_seconds, rss_mb
from tests.bench.stack import SIM_API_KEY, BenchEnv, Gateway, azure_path, post_json, settle, start_gateway

PROMPT = "Say hello in one short sentence."
CHAT_MAX_TOKENS = 16  # non-streaming completions
STREAM_MAX_TOKENS = 8  # streamed completions: 8 tokens at the upstream's per-token delay

# Upstream deployments (simulator) and the model names clients ask the gateway for.
CHAT_DEPLOYMENT, CHAT_MODEL = "bench-chat", "bench-chat"
STREAM_DEPLOYMENT, STREAM_MODEL = "bench-stream", "bench-stream"


@dataclass(frozen=True)
class Durations:
    """Seconds of each measured window (warm-ups are not measured)."""

    latency: float = 4.0
    throughput: float = 5.0
    stream: float = 5.0
    gateway_warmup: float = 2.0

    @classmethod
    def quick(cls) -> Durations:
        return cls(latency=1.5, throughput=2.0, stream=1.5, gateway_warmup=1.0)


@dataclass(frozen=True)
class Pinning:
    """Which CPUs each party gets (None: no pinning, on a machine with a single CPU)."""

    gateway: list[int] | None
    upstream_with_gateway: list[int] | None
    upstream_direct: list[int] | None
    load: list[int] | None

    @classmethod
    def for_cpus(cls, cpus: list[int]) -> Pinning:
        if len(cpus) < 2:
            return cls(None, None, None, None)
        first, second = cpus[0], cpus[1]
        return cls(gateway=[second], upstream_with_gateway=[first], upstream_direct=[second], load=[first])

    def describe(self) -> dict[str, str]:
        def cpus(value: list[int] | None) -> str:
            return "unpinned" if value is None else "CPU " + ",".join(map(str, value))

        return {
            "direct runs": f"upstream {cpus(self.upstream_direct)}; load generator {cpus(self.load)}",
            "gateway runs": (
                f"gateway {cpus(self.gateway)}; upstream and load generator {cpus(self.upstream_with_gateway)}"
            ),
        }


def chat_body(model: str | None, *, stream: bool = False, priority: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": STREAM_MAX_TOKENS if stream else CHAT_MAX_TOKENS,
    }
    if model is not None:
        body["model"] = model
    if stream:
        body["stream"] = True
    if priority is not None:
        body["priority"] = priority
    return body


def direct_request(deployment: str, stream: bool = False) -> Request:
    """The same call as the gateway's, made straight to the upstream's Azure route."""
    return Request(azure_path(deployment), {"api-key": SIM_API_KEY}, chat_body(None, stream=stream))


def gateway_request(key: str, model: str, stream: bool = False) -> Request:
    return Request("/v1/chat/completions", {"authorization": f"Bearer {key}"}, chat_body(model, stream=stream))


# --- one phase each -------------------------------------------------------------------------------


@dataclass
class Target:
    """Where the load goes and what it sends."""

    url: str
    chat: Request
    stream: Request
    results: dict[str, Any] = field(default_factory=dict)


def run_core(
    target: Target,
    pinning: Pinning,
    durations: Durations,
    *,
    pid: int | None = None,
    with_stream: bool = True,
    with_latency: bool = True,
) -> dict[str, Any]:
    """c=1 latency, c=32 throughput (with the server's CPU when ``pid`` is given), c=1 TTFT, wrk check."""
    results = target.results
    if with_latency:
        results["c1"] = run_load(
            target.url, [target.chat], cpus=pinning.load, concurrency=1, warmup=0.5, duration=durations.latency
        )
    results["c32"] = measured_throughput(target, pinning, durations, pid)
    if with_stream:
        results["stream_c1"] = run_load(
            target.url,
            [target.stream],
            cpus=pinning.load,
            concurrency=1,
            warmup=0.5,
            duration=durations.stream,
            sse=True,
        )
    if wrk.available():
        try:
            results["c32_wrk"] = wrk.run_wrk(
                target.url, target.chat, concurrency=32, duration=durations.throughput, cpus=pinning.load
            )
        except RuntimeError as exc:
            results["c32_wrk"] = {"error": str(exc)}
    return results


def measured_throughput(target: Target, pinning: Pinning, durations: Durations, pid: int | None) -> dict[str, Any]:
    """The c=32 closed loop; with ``pid``, that process's CPU time over the whole generator run."""
    before_cpu, before_wall = (cpu_seconds(pid), time.monotonic()) if pid else (0.0, 0.0)
    result = run_load(
        target.url, [target.chat], cpus=pinning.load, concurrency=32, warmup=1.0, duration=durations.throughput
    )
    if pid:
        used = cpu_seconds(pid) - before_cpu
        wall = time.monotonic() - before_wall
        requests = result["total_completed"]
        result["server"] = {
            "pid": pid,
            "cpu_seconds": used,
            "requests": requests,
            "cpu_ms_per_request": 1000.0 * used / requests if requests else None,
            # Over the generator's whole life, connection set-up and drain included: a lower bound.
            "cpu_percent_of_core": 100.0 * used / wall if wall else None,
        }
    return result


def run_direct(sim_url: str, sim_pid: int, pinning: Pinning, durations: Durations) -> dict[str, Any]:
    """The load generator straight to the upstream: the baseline every gateway row is compared with."""
    target = Target(sim_url, direct_request(CHAT_DEPLOYMENT), direct_request(STREAM_DEPLOYMENT, stream=True))
    return run_core(target, pinning, durations, pid=sim_pid)


def run_gateway(
    group: ProcessGroup,
    env: BenchEnv,
    server: str,
    key: str,
    pinning: Pinning,
    durations: Durations,
    *,
    full: bool,
    extra_env: dict[str, str] | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Start one gateway process, warm it up, measure it, stop it; its errors are kept verbatim.

    ``full``: every scenario (c=1, c=32, streaming, wrk); otherwise only c=32 (the daphne row).
    """
    gateway = start_gateway(group, env, server, pinning.gateway, extra_env=extra_env, name=label)
    results: dict[str, Any] = {"server": server, "pid": gateway.pid}
    try:
        results["smoke"] = smoke(gateway, key)
        warm_up(gateway, key, pinning, durations)
        settle(1.5)
        results["rss_idle_mb"] = rss_mb(gateway.pid)
        target = Target(
            gateway.url, gateway_request(key, CHAT_MODEL), gateway_request(key, STREAM_MODEL, stream=True), results
        )
        run_core(target, pinning, durations, pid=gateway.pid, with_stream=full, with_latency=full)
        settle(0.5)
        results["rss_after_load_mb"] = rss_mb(gateway.pid)
    finally:
        group.stop(gateway.child)
        results["exit_code"] = gateway.child.process.returncode
        results["log_lines"], results["log_errors"] = log_errors(gateway)
    return results


def smoke(gateway: Gateway, key: str) -> dict[str, Any]:
    """One plain and one streamed request; a failure stops the phase with the gateway's own answer."""
    headers = {"authorization": f"Bearer {key}"}
    plain = post_json(gateway.url + "/v1/chat/completions", chat_body(CHAT_MODEL), headers)
    streamed = post_json(gateway.url + "/v1/chat/completions", chat_body(STREAM_MODEL, stream=True), headers)
    for response in (plain, streamed):
        if response.status_code != 200:
            raise RuntimeError(
                f"{gateway.server} gateway smoke request failed: {response.status_code} "
                f"{response.text}\n{gateway.child.log_tail()}"
            )
    return {
        "chat_status": plain.status_code,
        "usage": plain.json().get("usage"),
        "stream_events": streamed.text.count("data:"),
    }


def warm_up(gateway: Gateway, key: str, pinning: Pinning, durations: Durations) -> dict[str, Any]:
    """A few thousand requests (plain and streamed) before anything is measured."""
    plain = run_load(
        gateway.url,
        [gateway_request(key, CHAT_MODEL)],
        cpus=pinning.load,
        concurrency=8,
        duration=durations.gateway_warmup,
    )
    streamed = run_load(
        gateway.url,
        [gateway_request(key, STREAM_MODEL, stream=True)],
        cpus=pinning.load,
        concurrency=4,
        duration=0.5,
        sse=True,
    )
    return {"requests": plain["total_completed"] + streamed["total_completed"]}


def log_errors(gateway: Gateway, limit: int = 60) -> tuple[int, list[str]]:
    """How many lines the gateway logged, and the first ``limit`` of them verbatim.

    The gateway runs with LOG_LEVEL and uvicorn's log level at WARNING and no access log, so
    every line is a warning, an error or a traceback; the per-request lines of the observability
    run (``gateway.request``) are not counted.
    """
    try:
        lines = gateway.child.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return 0, []
    lines = [line for line in lines if '"logger":"gateway.request"' not in line]
    return len(lines), lines[:limit]
