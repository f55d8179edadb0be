"""``wrk``, where installed, as an independent check of the Python generator on the plain rows.

wrk (C, one thread here) can only time whole responses and sends one request body, so it checks
the non-streaming closed-loop figures; it is skipped when the binary is missing (a fresh CI
machine), and the table says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

from tests.bench.driver import Request, affinity_setter, pinned

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def available() -> str | None:
    """The wrk binary's path, or None."""
    return shutil.which("wrk")


def lua_string(text: str) -> str:
    """A double-quoted Lua string literal (backslashes, quotes and control characters escaped)."""
    return '"' + "".join(c if c.isprintable() and c not in '\\"' else f"\\{ord(c):03d}" for c in text) + '"'


def _lua(request: Request) -> str:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {lua_string(request.to_spec()['body'])}",
        'wrk.headers["content-type"] = "application/json"',
    ]
    lines += [f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in request.headers.items()]
    return "\n".join(lines) + "\n"


def run_wrk(
    url: str, request: Request, *, concurrency: int, duration: float, cpus: Sequence[int] | None
) -> dict[str, Any]:
    """One closed-loop wrk run (1 thread); returns req/s, p50/p99 in ms and non-2xx responses."""
    binary = available()
    if binary is None:
        raise RuntimeError("wrk is not installed")
    with tempfile.NamedTemporaryFile("w", prefix="bench-wrk-", suffix=".lua", delete=False) as f:
        f.write(_lua(request))
    command = [
        binary,
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        f.name,
        url + request.path,
    ]
    try:
        result = subprocess.run(
            pinned(command, cpus),
            capture_output=True,
            text=True,
            preexec_fn=affinity_setter(cpus),
            timeout=duration + 30,
        )
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    return parse(result.stdout)


def parse(text: str) -> dict[str, Any]:
    """Requests/sec, the 50% and 99% latencies, errors and non-2xx counts from wrk's output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rps is None:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    distribution = re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\b", text, re.M)
    latencies = {int(p): float(v) * _UNITS_MS[u] for p, v, u in distribution}
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:(.*)", text)
    total = re.search(r"(\d+) requests in", text)
    return {
        "generator": "wrk (1 thread)",
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)) if total else None,
        "p50_ms": latencies.get(50),
        "p99_ms": latencies.get(99),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else "",
    }
