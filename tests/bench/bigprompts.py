"""Big prompts beside streams (issue 13): does parsing and counting a 5 MB prompt stall other streams?

One uvicorn gateway; ``streams`` clients stream 64-token completions (5 ms per token upstream)
without pause. After a baseline window, 5 MB prompts arrive at 2 per second for a model served
by its own simulated upstream (so the upstream of the streams never sees them). The gateway
parses, validates and counts every big prompt (tiktoken, ~1.1 M tokens each) before forwarding
it; the streams' inter-chunk gaps show whether that work blocked its event loop. The
generator runs in its own process (``tests.bench.gaps``) on the load CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from tests.bench.driver import affinity_setter, pinned
from tests.bench.procs import ProcessGroup
from tests.bench.scenarios import STREAM_MODEL, Pinning, log_errors, smoke
from tests.bench.stack import REPO, BenchEnv, start_gateway

BIG_DEPLOYMENT, BIG_MODEL = "bench-big", "bench-big"
STREAM_TOKENS = 64
BIG_MB = 5.0
BIG_RATE = 2.0


def big_upstream(api_key: str) -> dict[str, Any]:
    """The simulator that answers the big prompts: no limits, one completion token, a cheap estimate."""
    return {
        "api_key": api_key,
        "token_estimate": "fast",
        "deployments": [{"name": BIG_DEPLOYMENT, "completion_tokens": 1}],
    }


def big_gateway_deployment() -> dict[str, Any]:
    """The gateway's side: a context window that holds the prompt, and tiktoken counting as in production."""
    return {"name": BIG_DEPLOYMENT, "model": BIG_MODEL, "upstream_model": "gpt-4o", "context_window": 4_000_000}


def run_big_prompts(
    group: ProcessGroup,
    env: BenchEnv,
    key: str,
    pinning: Pinning,
    *,
    window: float = 8.0,
    streams: int = 8,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a gateway, measure stream gaps without and with big prompts, stop it."""
    gateway = start_gateway(group, env, "uvicorn", pinning.gateway, extra_env=extra_env, name="gateway-bigprompts")
    results: dict[str, Any] = {"server": "uvicorn", "pid": gateway.pid}
    try:
        results["smoke"] = smoke(gateway, key)
        auth = {"authorization": f"Bearer {key}"}
        stream_body = {
            "model": STREAM_MODEL,
            "stream": True,
            "max_tokens": STREAM_TOKENS,
            "messages": [{"role": "user", "content": "Tell me a story."}],
        }
        spec = {
            "host": "127.0.0.1",
            "port": gateway.port,
            "streams": streams,
            "window_s": window,
            "warmup_s": 1.0,
            "stream": {"path": "/v1/chat/completions", "headers": auth, "body": json.dumps(stream_body)},
            "big": {"path": "/v1/chat/completions", "headers": auth, "model": BIG_MODEL},
            "big_rate": BIG_RATE,
            "big_mb": BIG_MB,
        }
        results.update(_run_gaps(spec, pinning, timeout=2 * window + 90))
    finally:
        group.stop(gateway.child)
        results["exit_code"] = gateway.child.process.returncode
        results["log_lines"], results["log_errors"] = log_errors(gateway)
    return results


def _run_gaps(spec: dict[str, Any], pinning: Pinning, timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", prefix="bench-gaps-", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        result = subprocess.run(
            pinned([sys.executable, "-m", "tests.bench.gaps", f.name], pinning.load),
            cwd=REPO,
            capture_output=True,
            text=True,
            preexec_fn=affinity_setter(pinning.load),
            timeout=timeout,
        )
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        raise RuntimeError(f"the gap generator failed ({result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout)


def big_prompt_lines(results: dict[str, Any]) -> list[str]:
    """The report's lines for this phase."""
    run = results.get("bigprompts")
    if not run or "gap_ms" not in run:
        return []

    def row(name: str) -> str:
        g = run["gap_ms"][name]
        if not g.get("count"):
            return f"  {name:9s} no gaps measured"
        return f"  {name:9s} {g['count']:6d} gaps  p50 {g['p50']:6.2f}  p99 {g['p99']:6.2f}  max {g['max']:7.2f} ms"

    big = run["big"]
    rise = run.get("p99_rise_ms")
    lines = [
        f"Big prompts beside streams ({run['streams']} streams of {STREAM_TOKENS} tokens at 5 ms/token; "
        f"{big['rate']:g}/s prompts of {big['body_mb'] or 0:.1f} MB in the second window):",
        row("baseline"),
        row("loaded"),
    ]
    if rise is not None:
        latency = big["latency_ms"]
        lines.append(
            f"  p99 gap rise {rise:.2f} ms (target < 20 ms); big prompts: {big['status']}, "
            f"latency p50 {latency['p50'] or 0:.0f} ms, p99 {latency['p99'] or 0:.0f} ms"
        )
    if run.get("errors"):
        lines.append(f"  generator errors: {run['errors']}")
    return lines
