"""The benchmark's phases in order, with clean-up whatever happens.

1. A temporary directory: fresh SQLite database (migrated), tiktoken cache, logs.
2. Two simulated upstreams: a fast one (no limits, no delay for plain calls, 5 ms per token on
   the streaming deployment) and a small one for saturation (short "minute", small limits).
3. The configuration (endpoints, deployments, two tenants with a key each) written by a child.
4. Direct runs: the generator straight to the fast upstream (upstream alone on the second CPU).
5. Gateway runs, one process at a time on the second CPU (the upstream moves to the first CPU,
   beside the generator): uvicorn (every scenario), daphne (c=32), and with ``--redis`` uvicorn
   on Redis state.
6. Saturation on a gateway with short windows (and again on Redis with ``--redis``).
7. Big prompts: stream gaps while 5 MB prompts arrive at 2/s (``tests.bench.bigprompts``).
8. Dashboards (``tests.bench.dashboards``, its own database): roll-up speed on raw records, and
   the staff overview and a team page on a month of roll-ups for 50 tenants x 5 models x 3 keys.
9. Observability: uvicorn again with metrics and the request log off, then with metrics in
   multiprocess mode and the JSON request line on (the ``uvicorn`` row has metrics on and the
   request line below its log level); ``python -m tests.bench observe`` gives the CPU per request.
10. Quotas: one uvicorn process measured with and without a tenant and a key quota, alternately
    (and again on Redis with ``--redis``).
11. Many streams: 100 to 1,000 concurrent 100-token streams, direct and through one gateway worker
    (``tests.bench.manystreams``).
12. With ``--profile``: one more uvicorn process, profiled during a c=32 run.

A phase that fails is reported (its error verbatim) and the next one still runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.bench import report, wrk
from tests.bench.bigprompts import big_gateway_deployment, big_upstream, run_big_prompts
from tests.bench.loadgen import GENERATOR_NAME
from tests.bench.manystreams import ManyStreamsConfig, long_gateway_deployment, long_upstream, run_many_streams
from tests.bench.procs import ProcessGroup, pin, usable_cpus
from tests.bench.quotas import quota_tenants, run_quota_comparison
from tests.bench.redisstate import pair_gateway_deployments, pair_upstream_deployments, run_redis_state
from tests.bench.saturation import SaturationConfig, run_saturation
from tests.bench.scenarios import (
    CHAT_DEPLOYMENT,
    CHAT_MODEL,
    STREAM_DEPLOYMENT,
    STREAM_MODEL,
    Durations,
    Pinning,
    run_direct,
    run_gateway,
)
from tests.bench.stack import REPO, SIM_API_KEY, BenchEnv, start_simulator

OUTPUT = REPO / "var" / "bench" / "latest.json"
STREAM_TOKEN_DELAY_MS = 5.0
PHASES = (
    "direct",
    "uvicorn",
    "daphne",
    "saturation",
    "bigprompts",
    "manystreams",
    "observability",
    "quotas",
    "redisstate",
    "dashboards",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Benchmark the gateway against its simulated upstream (loopback, pinned with taskset).",
    )
    parser.add_argument(
        "--redis", metavar="URL", help="also measure the gateway on Redis state (e.g. redis://127.0.0.1:6379/15)"
    )
    parser.add_argument(
        "--redis-port",
        type=int,
        default=7105,
        help="loopback port of the redis-server the redisstate phase starts for itself (default 7105)",
    )
    parser.add_argument("--profile", choices=("cprofile", "py-spy"), help="profile a uvicorn gateway during a c=32 run")
    parser.add_argument("--py-spy", dest="py_spy", help="path of the py-spy binary (default: from PATH)")
    parser.add_argument(
        "--only",
        type=_phases,
        default=PHASES,
        metavar="PHASES",
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="short windows, for checking the bench itself")
    parser.add_argument(
        "--streams",
        type=_concurrencies,
        default=None,
        metavar="N,N,...",
        help="concurrencies of the many-streams phase (default 100,250,500,1000; --quick: 100,500)",
    )
    parser.add_argument("--saturation-seconds", type=float, default=None, help="offered-load window (default 20)")
    parser.add_argument(
        "--saturation-minute",
        type=float,
        default=10.0,
        help="length of a rate-limit 'minute' on both sides in the saturation run (default 10 s)",
    )
    parser.add_argument(
        "--saturation-overload",
        type=float,
        default=1.5,
        help="offered load as a multiple of the combined request capacity (default 1.5)",
    )
    parser.add_argument(
        "--output", type=Path, default=OUTPUT, help=f"JSON results (default {OUTPUT.relative_to(REPO)})"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (database, logs)")
    return parser.parse_args(argv)


def _phases(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PHASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    return chosen


def _concurrencies(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrencies must be positive integers")
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM both end the run through KeyboardInterrupt, which stops every child.
    # (SIGINT explicitly: a shell starting the bench in the background would leave it ignored.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    _raise_open_file_limit()
    durations = Durations.quick() if args.quick else Durations()
    sat_config = SaturationConfig(
        duration=args.saturation_seconds or (8.0 if args.quick else 20.0),
        minute_seconds=args.saturation_minute,
        overload=args.saturation_overload,
    )
    pinning = Pinning.for_cpus(usable_cpus())
    root = Path(tempfile.mkdtemp(prefix="llm-gateway-bench-"))
    results: dict[str, Any] = {
        "meta": _meta(args, pinning, durations),
        "direct": {},
        "gateways": {},
        "saturation": {},
        "quotas": {},
        "failures": [],
    }
    started = time.monotonic()
    code = 0
    try:
        with ProcessGroup(root) as group:
            results["meta"]["pinning_tool"] = group.pinning_tool
            _run(group, BenchEnv(root), args, pinning, durations, sat_config, results, started)
    except KeyboardInterrupt:
        results["failures"].append({"phase": "run", "error": "interrupted"})
        code = 130
    except Exception:  # set-up failed: nothing to compare, but say why
        results["failures"].append({"phase": "set-up", "error": traceback.format_exc()})
        code = 1
    finally:
        results["meta"]["elapsed_s"] = time.monotonic() - started
        results["meta"]["loadavg_at_end"] = _loadavg()
        report.write_json(results, args.output)
        print(report.render(results))
        print(f"\nJSON: {args.output}" + (f"; logs and database kept in {root}" if args.keep else ""))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return code or (1 if results["failures"] else 0)


def _run(
    group: ProcessGroup,
    env: BenchEnv,
    args: argparse.Namespace,
    pinning: Pinning,
    durations: Durations,
    sat_config: SaturationConfig,
    results: dict[str, Any],
    started: float,
) -> None:
    def phase(name: str, action: Callable[[], Any]) -> Any:
        _progress(started, name)
        try:
            return action()
        except Exception:
            results["failures"].append({"phase": name, "error": traceback.format_exc()})
            _progress(started, f"{name} FAILED (see the report)")
            return None

    _progress(started, "set-up: database, encodings, simulators, configuration")
    env.prepare_database()
    sim = start_simulator(group, _fast_upstream(), pinning.upstream_direct)
    sat_sim = start_simulator(group, _saturation_upstream(sat_config), pinning.upstream_with_gateway)
    big_sim = start_simulator(group, big_upstream(SIM_API_KEY), pinning.upstream_with_gateway)
    long_sim = start_simulator(group, long_upstream(SIM_API_KEY), pinning.upstream_direct)
    keys = env.seed(_gateway_config(sim.url, sat_sim.url, big_sim.url, long_sim.url, sat_config))
    key = keys["bench-a/app"]

    if "direct" in args.only:
        results["direct"] = phase("direct runs", lambda: run_direct(sim.url, sim.pid, pinning, durations)) or {}
    if pinning.upstream_with_gateway is not None:
        pin(sim.pid, pinning.upstream_with_gateway)  # beside the generator, for the gateway runs

    gateways = results["gateways"]
    if "uvicorn" in args.only:
        gateways["uvicorn"] = phase(
            "gateway uvicorn", lambda: run_gateway(group, env, "uvicorn", key, pinning, durations, full=True)
        )
    if "daphne" in args.only:
        gateways["daphne"] = phase(
            "gateway daphne (c=32)", lambda: run_gateway(group, env, "daphne", key, pinning, durations, full=False)
        )
    if args.redis and "uvicorn" in args.only:
        gateways["uvicorn+redis"] = phase(
            "gateway uvicorn on Redis",
            lambda: run_gateway(
                group,
                env,
                "uvicorn",
                key,
                pinning,
                durations,
                full=True,
                extra_env=_redis_env(args.redis),
                label="gateway-uvicorn-redis",
            ),
        )
    results["gateways"] = {k: v for k, v in gateways.items() if v}

    if "saturation" in args.only:
        results["saturation"]["in-process"] = phase(
            "saturation", lambda: run_saturation(group, env, sat_sim.url, keys, pinning, sat_config)
        )
        if args.redis:
            results["saturation"]["redis"] = phase(
                "saturation on Redis",
                lambda: run_saturation(
                    group,
                    env,
                    sat_sim.url,
                    keys,
                    pinning,
                    sat_config,
                    label="gateway-saturation-redis",
                    extra_env=_redis_env(args.redis),
                ),
            )
        results["saturation"] = {k: v for k, v in results["saturation"].items() if v}

    if "bigprompts" in args.only:
        results["bigprompts"] = phase(
            "big prompts beside streams",
            lambda: run_big_prompts(group, env, key, pinning, window=4.0 if args.quick else 8.0),
        )
    if "observability" in args.only:
        for label, knobs in _observability_runs(env.root).items():
            gateways[label] = phase(
                f"gateway {label}",
                lambda knobs=knobs, label=label: run_gateway(
                    group, env, "uvicorn", key, pinning, durations, full=True, extra_env=knobs, label=f"gateway-{label}"
                ),
            )
        results["gateways"] = {k: v for k, v in gateways.items() if v}

    if "quotas" in args.only:
        results["quotas"]["in-process"] = phase(
            "quotas on / off", lambda: run_quota_comparison(group, env, keys, pinning, durations)
        )
        if args.redis:
            results["quotas"]["redis"] = phase(
                "quotas on / off on Redis",
                lambda: run_quota_comparison(
                    group,
                    env,
                    keys,
                    pinning,
                    durations,
                    extra_env=_redis_env(args.redis),
                    label="gateway-quotas-redis",
                ),
            )
        results["quotas"] = {k: v for k, v in results["quotas"].items() if v}

    if "redisstate" in args.only:
        # Its own redis-server (whatever --redis says): the CPU and counters are then ours alone.
        results["redis_state"] = phase(
            "shared state on Redis (2 processes, c=8)",
            lambda: run_redis_state(group, env, keys["bench-q/app"], pinning, durations, args.redis_port),
        )

    if "dashboards" in args.only:
        from tests.bench.dashboards import run_child

        # Its own database (the roll-ups of a month are large), after the load runs: it takes both CPUs.
        hours, records = (48, 5000) if args.quick else (720, 100_000)
        results["dashboards"] = phase("dashboards (roll-ups and pages)", lambda: run_child(hours, records)) or {}

    if "manystreams" in args.only:
        streams_config = ManyStreamsConfig(concurrencies=args.streams) if args.streams else ManyStreamsConfig()
        if args.quick:
            streams_config = ManyStreamsConfig.quick(*([args.streams] if args.streams else []))
        results["manystreams"] = phase(
            "many streams", lambda: run_many_streams(group, env, long_sim, key, pinning, streams_config)
        )

    if args.profile:
        from tests.bench.profiling import run_profile

        results["profile"] = phase(
            f"profile ({args.profile})",
            lambda: run_profile(group, env, key, pinning, durations, args.profile, env.root, args.py_spy),
        )


# --- configuration ------------------------------------------------------------------------------


def _fast_upstream() -> dict[str, Any]:
    """No limits, cheap prompt count (``fast``), 16-token completions; 5 ms per token when streaming."""
    return {
        "api_key": SIM_API_KEY,
        "token_estimate": "fast",
        "deployments": [
            {"name": CHAT_DEPLOYMENT, "completion_tokens": 16},
            {"name": STREAM_DEPLOYMENT, "completion_tokens": 16, "token_delay_ms": STREAM_TOKEN_DELAY_MS},
            *pair_upstream_deployments(),
        ],
    }


def _saturation_upstream(config: SaturationConfig) -> dict[str, Any]:
    """The limited pair. Its prompts are counted as the gateway's deployments count them (tiktoken),
    so an upstream 429 here is the balancer's doing, not a difference between two counts."""
    return {
        "api_key": SIM_API_KEY,
        "token_estimate": "tiktoken",
        "minute_seconds": config.minute_seconds,
        "deployments": config.simulator_deployments(),
    }


def _gateway_config(
    sim_url: str, sat_url: str, big_url: str, long_url: str, sat_config: SaturationConfig
) -> dict[str, Any]:
    """The gateway's side: unlimited deployments on the fast upstream, the limited pair on the other,
    the big-prompt deployment on a third, the long streams on a fourth.

    Token counting stays on (tiktoken, o200k through ``upstream_model``), as in production.
    """
    fast = [
        {"name": CHAT_DEPLOYMENT, "model": CHAT_MODEL, "upstream_model": "gpt-4o"},
        {"name": STREAM_DEPLOYMENT, "model": STREAM_MODEL, "upstream_model": "gpt-4o"},
        *pair_gateway_deployments(),
    ]
    return {
        "endpoints": [
            {"name": "sim-fast", "base_url": sim_url, "api_key": SIM_API_KEY, "deployments": fast},
            {
                "name": "sim-saturation",
                "base_url": sat_url,
                "api_key": SIM_API_KEY,
                "deployments": sat_config.gateway_deployments(),
            },
            {"name": "sim-big", "base_url": big_url, "api_key": SIM_API_KEY, "deployments": [big_gateway_deployment()]},
            {
                "name": "sim-long",
                "base_url": long_url,
                "api_key": SIM_API_KEY,
                "deployments": [long_gateway_deployment()],
            },
        ],
        "tenants": [{"slug": "bench-a", "keys": ["app"]}, {"slug": "bench-b", "keys": ["app"]}, *quota_tenants()],
    }


def _observability_runs(root: Path) -> dict[str, dict[str, str]]:
    """Metrics and the request log off; then both on as in production (multiprocess files, JSON)."""
    metrics_dir = root / "prometheus"
    metrics_dir.mkdir(exist_ok=True)
    return {
        "uvicorn obs off": {"GATEWAY_METRICS": "false", "GATEWAY_REQUEST_LOG_LEVEL": "off"},
        "uvicorn metrics+json log": {
            "GATEWAY_METRICS": "true",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "GATEWAY_LOG_FORMAT": "json",
            "GATEWAY_REQUEST_LOG_LEVEL": "WARNING",  # the bench's LOG_LEVEL: one line per request
        },
    }


def _redis_env(url: str) -> dict[str, str]:
    # A fresh key prefix per process: no state left by an earlier run (or another bench) is shared.
    return {"REDIS_URL": url, "GATEWAY_BALANCER_REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}"}


# --- process helpers ------------------------------------------------------------------------------


def _meta(args: argparse.Namespace, pinning: Pinning, durations: Durations) -> dict[str, Any]:
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "usable_cpus": usable_cpus(),
            "cpu_model": _cpu_model(),
            "kernel": platform.release(),
        },
        "python": sys.version.split()[0],
        "generator": GENERATOR_NAME,
        "wrk": wrk.available(),
        "pinning": pinning.describe(),
        "durations_s": durations.__dict__,
        "redis": args.redis,
        "loadavg_at_start": _loadavg(),
    }


def _loadavg() -> float | None:
    """The 1-minute load average: other work on these 2 cores makes every figure noisier."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _progress(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:5.0f}s] {text}", file=sys.stderr, flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _raise_open_file_limit() -> None:
    """Saturation holds a connection per queued request: lift the soft limit for every child."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
