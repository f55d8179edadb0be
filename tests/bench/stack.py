"""The system under test: a throw-away database, simulated upstreams and gateway processes.

Everything lives in one temporary directory (the SQLite file, the tiktoken cache, the logs).
The benchmark process never imports Django: migrations, encodings and the configuration are
put in place by child processes that get the same ``DATABASE_URL`` and ``GATEWAY_VAR_DIR`` as
the gateways, so what the gateway reads is exactly what was written.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.bench.procs import Child, ProcessGroup, wait_until
from tests.fakes.simulator import ProcessSimulatorHandle, start_simulator_process

REPO = Path(__file__).resolve().parents[2]
SIM_API_KEY = "bench-sim-key"
API_VERSION = "2024-10-21"

# Inherited settings that would change what is measured: the bench sets each one itself.
_SCRUBBED_PREFIXES = ("GATEWAY_", "DATABASE_URL", "REDIS_URL", "CELERY_", "TIKTOKEN_CACHE_DIR", "DB_CONN_MAX_AGE")


def free_port() -> int:
    """A port free right now on the loopback (the usual small race before it is bound is accepted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchEnv:
    """The temporary directory and the environment every gateway-side child gets."""

    def __init__(self, root: Path, redis_url: str | None = None) -> None:
        self.root = root
        self.var_dir = root / "var"
        self.var_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = root / "bench.sqlite3"
        self.redis_url = redis_url

    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The parent's environment without gateway knobs, plus the bench's database and state."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "gateway.settings",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                "DATABASE_URL": f"sqlite:///{self.db_path}",
                "GATEWAY_VAR_DIR": str(self.var_dir),
                # Set even when empty: an empty value also overrides a developer's .env file.
                "REDIS_URL": self.redis_url or "",
                "LOG_LEVEL": "WARNING",
                "DEBUG": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra or {})
        return env

    def run(self, *args: str, stdin: str | None = None, timeout: float = 120.0) -> str:
        """Run ``python ARGS`` in the repository with the child environment; returns stdout."""
        result = subprocess.run(
            [sys.executable, *args],
            cwd=REPO,
            env=self.child_env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"python {' '.join(args)} failed ({result.returncode}):\n{result.stderr or result.stdout}"
            )
        return result.stdout

    def prepare_database(self) -> None:
        """Migrate the fresh SQLite file and seed the tiktoken cache (offline)."""
        self.run("manage.py", "migrate", "--noinput")
        self.run("manage.py", "seed_encodings")

    def seed(self, spec: dict[str, Any]) -> dict[str, str]:
        """Write endpoints, deployments, tenants and keys (see ``tests.bench.seed``); returns the keys."""
        return json.loads(self.run("-m", "tests.bench.seed", stdin=json.dumps(spec)))["keys"]

    def staff_session(self) -> str:
        """A staff session's cookie value, for ``/api/status/deployments`` (see ``tests.bench.seed``)."""
        return json.loads(self.run("-m", "tests.bench.seed", stdin=json.dumps({"staff_session": True})))[
            "staff_session"
        ]


# --- the simulated upstream -------------------------------------------------------------------


def start_simulator(group: ProcessGroup, config: dict[str, Any], cpus: list[int] | None) -> ProcessSimulatorHandle:
    """A simulator subprocess (``python -m gateway.simulator``) pinned to ``cpus``, stopped with ``group``."""
    handle = start_simulator_process(config, cpus=cpus)
    group.adopt(handle)
    return handle


def azure_path(deployment: str, operation: str = "chat/completions") -> str:
    return f"/openai/deployments/{deployment}/{operation}?api-version={API_VERSION}"


# --- gateway processes ------------------------------------------------------------------------


@dataclass
class Gateway:
    """A running gateway process: its server, URL and process (for /proc measurements)."""

    server: str
    url: str
    port: int
    child: Child

    @property
    def pid(self) -> int:
        return self.child.pid


def server_command(server: str, port: int) -> list[str]:
    """The command that serves ``gateway.asgi:application`` with ``server`` (uvicorn or daphne)."""
    if server == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "gateway.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
            "--lifespan",
            "on",
        ]
    if server == "daphne":
        return [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "-v",
            "0",
            "gateway.asgi:application",
        ]
    raise ValueError(f"unknown server {server!r}")


def start_gateway(
    group: ProcessGroup,
    env: BenchEnv,
    server: str,
    cpus: list[int] | None,
    extra_env: dict[str, str] | None = None,
    name: str | None = None,
    profile_to: Path | None = None,
) -> Gateway:
    """Start one gateway process and wait until ``/healthz`` answers.

    ``profile_to``: run uvicorn under ``tests.bench.profiled`` (cProfile switched on by SIGUSR1,
    written to this file on SIGUSR2).
    """
    port = free_port()
    command = server_command(server, port)
    if profile_to is not None:
        if server != "uvicorn":
            raise ValueError("profiling runs use uvicorn")
        command = [sys.executable, "-m", "tests.bench.profiled", str(profile_to), *command[3:]]
    child = group.start(name or f"gateway-{server}", command, cpus=cpus, env=env.child_env(extra_env), cwd=REPO)
    gateway = Gateway(server, f"http://127.0.0.1:{port}", port, child)
    try:
        wait_until(lambda: _healthy(gateway), timeout=60, interval=0.1, what=f"{server} gateway healthy")
    except TimeoutError:
        raise RuntimeError(f"the {server} gateway did not start:\n{child.log_tail()}") from None
    return gateway


def _healthy(gateway: Gateway) -> bool:
    if not gateway.child.alive():
        raise RuntimeError(
            f"the {gateway.server} gateway exited with {gateway.child.process.returncode}:\n{gateway.child.log_tail()}"
        )
    try:
        return httpx.get(gateway.url + "/healthz", timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def post_json(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float = 30.0) -> httpx.Response:
    """One request from the benchmark process (smoke checks, not measurements)."""
    return httpx.post(url, json=body, headers=headers, timeout=timeout, trust_env=False)


def settle(seconds: float) -> None:
    """Let a process go idle (timers, flushes) before a resource reading."""
    time.sleep(seconds)
