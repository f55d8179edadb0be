"""Run the load generator (``tests.bench.loadgen``) as its own pinned process and read its result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.bench.procs import cpu_list
from tests.bench.stack import REPO


@dataclass
class Request:
    """One kind of request the generator sends; ``tags`` group its measurements."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)

    def to_spec(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "headers": self.headers,
            "tags": self.tags,
            "body": json.dumps(self.body, separators=(",", ":")),
        }


def pinned(command: list[str], cpus: Sequence[int] | None) -> list[str]:
    """``command`` under ``taskset -c`` when pinning is asked for and the binary exists."""
    if cpus is not None and shutil.which("taskset"):
        return ["taskset", "-c", cpu_list(cpus), *command]
    return command


def affinity_setter(cpus: Sequence[int] | None):
    """A ``preexec_fn`` that pins the child where there is no ``taskset`` (else None)."""
    if cpus is None or shutil.which("taskset"):
        return None
    wanted = set(cpus)
    return lambda: os.sched_setaffinity(0, wanted)


def run_load(
    url: str,
    requests: Sequence[Request],
    *,
    cpus: Sequence[int] | None,
    duration: float,
    warmup: float = 0.0,
    concurrency: int = 1,
    rate: float | None = None,
    max_connections: int = 2000,
    sse: bool = False,
    drain: float = 10.0,
    ramp: float = 0.0,
    retry_after: bool = False,
) -> dict[str, Any]:
    """Closed loop at ``concurrency`` (or open loop at ``rate`` req/s); returns the generator's result."""
    host, port = url.removeprefix("http://").split(":")
    spec = {
        "host": host,
        "port": int(port),
        "mode": "open" if rate else "closed",
        "concurrency": concurrency,
        "rate": rate or 0,
        "max_connections": max_connections,
        "warmup_s": warmup,
        "duration_s": duration,
        "drain_s": drain,
        "sse": sse,
        "ramp_s": ramp,
        "retry_after": retry_after,
        "variants": [r.to_spec() for r in requests],
    }
    with tempfile.NamedTemporaryFile("w", prefix="bench-load-", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    command = [sys.executable, "-m", "tests.bench.loadgen", f.name]
    try:
        # subprocess.run kills the generator if anything (Ctrl-C included) interrupts the wait.
        result = subprocess.run(
            pinned(command, cpus),
            cwd=REPO,
            capture_output=True,
            text=True,
            preexec_fn=affinity_setter(cpus),
            timeout=warmup + duration + drain + max(60.0, concurrency / 10.0),
        )
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        raise RuntimeError(f"the load generator failed ({result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout)
