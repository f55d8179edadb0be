"""Where a gateway process spends its CPU under the c=32 load: ``--profile cprofile|py-spy``.

* ``cprofile`` (always available): uvicorn runs under ``tests.bench.profiled``; profiling covers
  exactly the measured window (switched by signals). Deterministic profiling slows Python code
  more than C code, so shares lean towards Python functions; throughput under it is lower.
* ``py-spy`` (when the binary is on PATH or given): samples the unmodified process from outside
  at 250 Hz, no slowdown; stacks of the threads that were busy (every thread, so the usage
  flusher's thread shows beside the event loop). Time in uvloop's C code has no Python frame
  of its own and is reported as the event loop's.

Both give the top functions by self time (share of all sampled/profiled time) and the same
shares summed per package (django, channels, asyncio, the gateway's own modules...).
"""

from __future__ import annotations

import os
import pstats
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.bench.driver import affinity_setter, pinned, run_load
from tests.bench.procs import ProcessGroup, cpu_seconds, wait_until
from tests.bench.scenarios import CHAT_MODEL, Durations, Pinning, gateway_request, warm_up
from tests.bench.stack import REPO, BenchEnv, start_gateway

TOP = 25


def run_profile(
    group: ProcessGroup,
    env: BenchEnv,
    key: str,
    pinning: Pinning,
    durations: Durations,
    tool: str,
    out_dir: Path,
    py_spy: str | None = None,
) -> dict[str, Any]:
    """Profile one uvicorn gateway process during a c=32 run; returns the summary."""
    out = out_dir / ("gateway.prof" if tool == "cprofile" else "gateway-pyspy.txt")
    gateway = start_gateway(
        group,
        env,
        "uvicorn",
        pinning.gateway,
        name=f"gateway-profile-{tool}",
        profile_to=out if tool == "cprofile" else None,
    )
    try:
        warm_up(gateway, key, pinning, durations)
        request = gateway_request(key, CHAT_MODEL)
        before = cpu_seconds(gateway.pid)
        if tool == "cprofile":
            os.kill(gateway.pid, signal.SIGUSR1)
            load = run_load(gateway.url, [request], cpus=pinning.load, concurrency=32, duration=durations.throughput)
            os.kill(gateway.pid, signal.SIGUSR2)
            wait_until(lambda: out.exists() and out.stat().st_size > 0, timeout=30, what="profile written")
        else:
            sampler = subprocess.Popen(
                pinned(
                    [
                        py_spy or "py-spy",
                        "record",
                        "--pid",
                        str(gateway.pid),
                        "--rate",
                        "250",
                        "--format",
                        "raw",
                        "--duration",
                        str(round(durations.throughput + 2)),
                        "--nonblocking",
                        "--output",
                        str(out),
                    ],
                    pinning.load,
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=affinity_setter(pinning.load),
            )
            try:
                load = run_load(
                    gateway.url, [request], cpus=pinning.load, concurrency=32, duration=durations.throughput
                )
                _, err = sampler.communicate(timeout=60)
            finally:
                if sampler.poll() is None:
                    sampler.kill()
            if sampler.returncode != 0:
                raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")
        used = cpu_seconds(gateway.pid) - before
    finally:
        group.stop(gateway.child)
    summary = summarize_cprofile(out) if tool == "cprofile" else summarize_pyspy(out)
    summary.update(
        {
            "tool": tool,
            "file": str(out),
            "rps_while_profiled": load["rps"],
            "cpu_ms_per_request_while_profiled": 1000.0 * used / max(1, load["total_completed"]),
        }
    )
    return summary


# --- attribution ----------------------------------------------------------------------------------


def package_of(path: str, name: str = "") -> str:
    """``django``, ``gateway``, ``stdlib:asyncio``, ``C:uvloop``... for a code location."""
    if path in ("~", "") or path.startswith("<"):
        owner = re.search(r"([A-Za-z_]\w*)\.", name)
        return f"C:{owner.group(1) if owner else 'builtins'}"
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    repo = str(REPO) + "/"
    if path.startswith(repo):
        return path[len(repo) :].split("/", 1)[0].removesuffix(".py")
    stdlib = re.search(r"python3\.\d+/([^/]+)", path)
    if stdlib:
        return "stdlib:" + stdlib.group(1).removesuffix(".py")
    if not path.startswith("/"):  # py-spy shortens paths to module paths: "aiohttp/client.py"
        top = path.split("/", 1)[0].removesuffix(".py")
        return f"stdlib:{top}" if top in sys.stdlib_module_names else top
    return path


def _short(path: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    stdlib = re.search(r"python3\.\d+/(.*)", path)
    return stdlib.group(1) if stdlib else path


def summarize_cprofile(path: Path) -> dict[str, Any]:
    stats = pstats.Stats(str(path))
    total = stats.total_tt or 1e-9
    rows = []
    by_package: Counter = Counter()
    for (filename, line, func), (_cc, calls, self_time, cumulative, _callers) in stats.stats.items():
        package = package_of(filename, func)
        by_package[package] += self_time
        rows.append(
            {
                "function": f"{_short(filename)}:{line}({func})" if filename != "~" else func,
                "package": package,
                "calls": calls,
                "self_percent": 100.0 * self_time / total,
                "cumulative_percent": 100.0 * cumulative / total,
            }
        )
    rows.sort(key=lambda r: r["self_percent"], reverse=True)
    gateway_cumulative = sorted(
        (r for r in rows if r["package"] in ("gateway", "tenants", "billing")),
        key=lambda r: r["cumulative_percent"],
        reverse=True,
    )
    return {
        "profiled_seconds": total,
        "top_self": rows[:TOP],
        "by_package_self_percent": {k: 100.0 * v / total for k, v in by_package.most_common(20)},
        "gateway_functions_by_cumulative": gateway_cumulative[:15],
    }


_FRAME = re.compile(r"^(?P<name>.*) \((?P<path>[^()]*?):(?P<line>\d+)\)$")


def summarize_pyspy(path: Path) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks: ``frame;frame;... count`` per line."""
    self_counts: Counter = Counter()
    inclusive: Counter = Counter()
    by_package: Counter = Counter()
    by_thread: Counter = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_FRAME.match(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        leaf = frames[-1]
        key = f"{_short(leaf['path'])}:{leaf['line']}({leaf['name']})"
        self_counts[key] += count
        package = package_of(leaf["path"], leaf["name"])
        if leaf["name"] == "Runner.run":  # no Python frame above the loop: uvloop's own C code
            package = "event loop (uvloop C code, syscalls)"
        by_package[package] += count
        by_thread[_thread_of(stack)] += count
        for fn in {f"{_short(f['path'])}({f['name']})" for f in frames}:
            inclusive[fn] += count
    total = total or 1
    return {
        "samples": total,
        "top_self": [{"function": k, "self_percent": 100.0 * v / total} for k, v in self_counts.most_common(TOP)],
        "by_package_self_percent": {k: 100.0 * v / total for k, v in by_package.most_common(20)},
        "by_thread_percent": {k: 100.0 * v / total for k, v in by_thread.most_common()},
        "top_inclusive": [
            {"function": k, "inclusive_percent": 100.0 * v / total} for k, v in inclusive.most_common(TOP)
        ],
    }


def _thread_of(stack: str) -> str:
    """Which thread a sampled stack ran on. Stacks read while the process runs (--nonblocking)
    may lack their root frames; a stack without a worker thread's frames is the event loop's."""
    if "concurrent/futures/thread.py" in stack or "(threading.py" in stack:
        return "worker threads (sync_to_async: usage flush, close_old_connections, ...)"
    return "event loop (main thread)"
