"""How many gateway worker processes to run, and whether that many may run here.

One process serves one core's worth of streams: the image runs one uvicorn worker per core the
container may use (``python -m gateway.workers`` prints the number for its start command), or
``WEB_CONCURRENCY`` when set. Several processes must share their limits, queues and breakers
through Redis: with in-process state each would balance alone, and together they would send up
to N times each deployment's limits. So:

* ``WEB_CONCURRENCY`` above 1 without ``REDIS_URL`` is refused, at start-up, with a message that
  says why (here, by the ``gateway.E020`` system check that ``migrate`` runs, and by the runtime
  of each process, which also reads a ``--workers`` given on the server's command line);
* without ``WEB_CONCURRENCY`` and without ``REDIS_URL``, one worker runs, and the start-up says so.

No Django here: the image's start command calls this before anything else is loaded.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class WorkersRefused(Exception):
    """More than one worker process was asked for without shared (Redis) state."""


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container's
    ``--cpus``), rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(cpus, 1)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), or None for no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def asked_workers(environ: Mapping[str, str], server_command: str = "") -> int | None:
    """The worker processes asked for: ``WEB_CONCURRENCY``, else a ``--workers N`` (uvicorn,
    gunicorn; gunicorn's ``-w N``) on the server's command line; None when neither says."""
    value = environ.get("WEB_CONCURRENCY", "").strip()
    if value:
        try:
            workers = int(value)
        except ValueError:
            raise WorkersRefused(
                f"WEB_CONCURRENCY must be a whole number of worker processes, not {value!r}."
            ) from None
        if workers < 1:
            raise WorkersRefused(f"WEB_CONCURRENCY must be at least 1, not {workers}.")
        return workers
    found = re.search(r"(?:--workers[= ]|(?<!\S)-w ?)(\d+)", server_command)
    return int(found.group(1)) if found else None


def refusal(workers: int, redis_url: str | None) -> str | None:
    """Why ``workers`` processes may not run without shared state (None when they may)."""
    if workers <= 1 or redis_url:
        return None
    return (
        f"{workers} worker processes were asked for (WEB_CONCURRENCY or --workers), but REDIS_URL is not set. "
        "Without Redis every process keeps its own rate-limit windows, queue and circuit breakers, so "
        f"together they would send up to {workers} times each deployment's limits. Set REDIS_URL to share "
        "them, or run one worker (WEB_CONCURRENCY=1)."
    )


def worker_count(environ: Mapping[str, str] = os.environ, cpus: int | None = None) -> tuple[int, str]:
    """How many workers the image starts, and a line saying why. Raises ``WorkersRefused``."""
    redis_url = environ.get("REDIS_URL", "").strip()
    cpus = cpus if cpus is not None else available_cpus()
    asked = asked_workers(environ)
    if asked is not None:
        problem = refusal(asked, redis_url)
        if problem:
            raise WorkersRefused(problem)
        return asked, f"gateway: {asked} worker process(es) (WEB_CONCURRENCY)"
    if not redis_url:
        return 1, (
            f"gateway: 1 worker process: REDIS_URL is not set, and processes without it cannot share their "
            f"limits (set REDIS_URL to run one per core, {cpus} here)"
        )
    return cpus, f"gateway: {cpus} worker processes, one per core (set WEB_CONCURRENCY to choose)"


def server_command_line() -> str:
    """The command line of the process that started this one (uvicorn's or gunicorn's supervisor,
    whose ``--workers`` tells a worker it is one of several), or ""."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main() -> int:
    """Print the number of workers for the image's start command (the reason goes to stderr)."""
    try:
        count, why = worker_count()
    except WorkersRefused as refused:
        print(f"gateway: refusing to start: {refused}", file=sys.stderr)
        return 2
    print(why, file=sys.stderr)
    print(count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
