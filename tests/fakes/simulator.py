"""Start the simulated upstream from tests and benchmarks.

::

    from tests.fakes.simulator import start_simulator

    sim = start_simulator({"api_key": "k", "deployments": [{"name": "gpt-4o", "rpm": 60}]})
    try:
        client = OpenAI(base_url=sim.url + "/v1", api_key="k")
        ...
        assert sim.stats()["deployments"]["gpt-4o"]["served"] == 1
        sim.configure("gpt-4o", tpm=1000)                      # PUT /_sim/deployments/gpt-4o
        sim.inject("gpt-4o", {"kind": "status", "status": 500, "count": 1})
        sim.clear_faults("gpt-4o")
        sim.reset()
    finally:
        sim.stop()

or ``with start_simulator(cfg) as sim: ...``.

* :func:`start_simulator` runs the server in a background **thread** with its own (uv)loop:
  cheap to start (tens of ms once tiktoken is warm), fine for functional tests. The
  simulator then shares the test process's CPU and GIL.
* :func:`start_simulator_process` runs ``python -m gateway.simulator`` as a **subprocess**
  (optionally pinned to CPUs), for benchmarks and multi-process tests.
* :func:`serve_simulator_here` serves it on the **running loop** (no thread), for tests that
  drive the gateway's ASGI application in that same loop; it also notes every model call it
  receives (``sim.calls``: deployment, api-version and the body as sent), so a test can see what
  the gateway forwarded. Its state is read directly (``sim.state``), not through HTTP.

Both bind an ephemeral port by default and return a handle with the same control methods,
which go through the HTTP control API (``/_sim/...``) so they work across threads and
processes alike and never touch the server's state from the wrong thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from gateway.simulator.config import SimConfig
from gateway.simulator.server import SimulatorApp
from gateway.simulator.state import SimulatorState

_REPO_ROOT = Path(__file__).resolve().parents[2]
_BANNER = re.compile(r"simulated upstream listening on (http://\S+) \((\d+) deployments?\)")


class SimulatorError(RuntimeError):
    """The simulator failed to start or a control call failed."""


class SimulatorHandle:
    """A running simulator: its base URL plus the control API as methods."""

    def __init__(self, url: str) -> None:
        self.url = url
        # trust_env=False: a developer's HTTP(S)_PROXY must never capture loopback calls.
        self._client = httpx.Client(base_url=url, trust_env=False, timeout=10.0)

    # -- control API ---------------------------------------------------------

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        response = self._client.request(method, path, json=payload)
        if response.status_code >= 400:
            raise SimulatorError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json()

    def stats(self) -> dict[str, Any]:
        """``GET /_sim/stats``: ``{"deployments": {name: {...}}, "token_issued": N, ...}``."""
        return self._call("GET", "/_sim/stats")

    def deployment_stats(self, name: str) -> dict[str, Any]:
        return self.stats()["deployments"][name]

    def reset(self) -> None:
        """Zero counters, windows and utilisation (config and faults stay)."""
        self._call("POST", "/_sim/reset")

    def configure(self, name: str, **fields: Any) -> dict[str, Any]:
        """Create or update a deployment; returns its full config."""
        return self._call("PUT", f"/_sim/deployments/{name}", fields)

    def inject(self, name: str, fault: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Add a fault (see gateway.simulator.faults); returns the active faults."""
        return self._call("POST", f"/_sim/deployments/{name}/faults", dict(fault))["faults"]

    def clear_faults(self, name: str) -> None:
        self._call("DELETE", f"/_sim/deployments/{name}/faults")

    def config(self) -> dict[str, Any]:
        """The live configuration (``GET /_sim/config``)."""
        return self._call("GET", "/_sim/config")

    # -- lifecycle -----------------------------------------------------------

    def stop(self) -> None:
        self._client.close()

    def __enter__(self) -> SimulatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadSimulatorHandle(SimulatorHandle):
    """A simulator served by a daemon thread of this process."""

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop, thread: threading.Thread, server: Any) -> None:
        super().__init__(url)
        self._loop = loop
        self._thread = thread
        self._server = server

    def stop(self) -> None:
        if not self._thread.is_alive():
            super().stop()
            return
        future = asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop)
        try:
            future.result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            super().stop()


def start_simulator(
    config: SimConfig | Mapping[str, Any] | None = None,
    port: int = 0,
    host: str = "127.0.0.1",
) -> ThreadSimulatorHandle:
    """Serve ``config`` (a SimConfig or a dict in the config-file format) in a thread.

    Returns once the port is listening; configuration errors raise ``ConfigError`` here.
    """
    from gateway.simulator.runner import SimulatorServer, new_event_loop

    sim_config = SimConfig.coerce(config)
    loop = new_event_loop()
    server = SimulatorServer(sim_config, host, port)
    started = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    thread = threading.Thread(target=serve, name=f"simulator-{port}", daemon=True)
    thread.start()
    started.wait()
    if failure:
        raise failure[0]
    return ThreadSimulatorHandle(server.url, loop, thread, server)


class ProcessSimulatorHandle(SimulatorHandle):
    """A simulator running as ``python -m gateway.simulator`` in a child process."""

    def __init__(self, url: str, process: subprocess.Popen, files: list[Path], log_path: Path) -> None:
        super().__init__(url)
        self.process = process
        self.pid = process.pid
        self.log_path = log_path
        self._files = files

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for path in self._files:
            path.unlink(missing_ok=True)
        super().stop()


def start_simulator_process(
    config: SimConfig | Mapping[str, Any] | None = None,
    port: int = 0,
    host: str = "127.0.0.1",
    cpus: Iterable[int] | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 30.0,
) -> ProcessSimulatorHandle:
    """Run the simulator in a subprocess; ``cpus`` pins it (like ``taskset -c``).

    The config is validated here first (so errors surface in the caller), written to a
    temporary JSON file, and the child's start-up line gives the bound URL. The child's
    stdout/stderr go to ``handle.log_path`` (kept until ``stop()``).
    """
    sim_config = SimConfig.coerce(config)
    config_file = Path(tempfile.mkstemp(prefix="sim-config-", suffix=".json")[1])
    config_file.write_text(json.dumps(sim_config.to_dict()), encoding="utf-8")
    log_path = Path(tempfile.mkstemp(prefix="sim-log-", suffix=".txt")[1])
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), child_env.get("PYTHONPATH")]))
    child_env.update(env or {})
    command = [
        sys.executable, "-m", "gateway.simulator",
        "--host", host, "--port", str(port), "--config", str(config_file),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=_REPO_ROOT, env=child_env, stdout=log_file, stderr=subprocess.STDOUT)
    files = [config_file, log_path]
    try:
        if cpus is not None:
            os.sched_setaffinity(process.pid, set(cpus))
        url = _wait_for_banner(process, log_path, startup_timeout)
    except BaseException:
        process.kill()
        process.wait()
        config_file.unlink(missing_ok=True)
        raise
    return ProcessSimulatorHandle(url, process, files, log_path)


def _wait_for_banner(process: subprocess.Popen, log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        match = _BANNER.search(text)
        if match:
            return match.group(1)
        if process.poll() is not None:
            raise SimulatorError(f"simulator exited with {process.returncode}:\n{text}")
        if time.monotonic() > deadline:
            raise SimulatorError(f"simulator did not start within {timeout} s:\n{text}")
        time.sleep(0.02)


@dataclass(frozen=True)
class ModelCall:
    """One model call as the simulator received it."""

    deployment: str  # the deployment named in the path (Azure) or the body's model (OpenAI)
    kind: str  # "chat", "completions" or "embeddings"
    api_version: str | None  # the Azure api-version query parameter (None on /v1 routes)
    body: dict[str, Any]  # the parsed JSON body, copied before the simulator reads it
    headers: dict[str, str] = field(default_factory=dict)  # the request's headers (names lower-case)


class _NotingSimulatorApp(SimulatorApp):
    """The simulator's request handling, noting each model call before answering it."""

    def __init__(self, state: SimulatorState, calls: list[ModelCall]) -> None:
        super().__init__(state)
        self.calls = calls

    async def _model_call(
        self, request: web.BaseRequest, kind: str, name: str, body: dict, api_version: str | None
    ) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.calls.append(ModelCall(name, kind, api_version, copy.deepcopy(body), headers))
        return await super()._model_call(request, kind, name, body, api_version)


@dataclass
class InLoopSimulator:
    """A simulator served by the running event loop: its URL, state and the calls it received."""

    url: str
    state: SimulatorState
    calls: list[ModelCall] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serve_simulator_here(
    config: SimConfig | Mapping[str, Any] | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[InLoopSimulator]:
    """Serve ``config`` on the running loop, on an ephemeral port, until the block ends."""
    state = SimulatorState(SimConfig.coerce(config))
    # Warm the encodings first (process-wide, so only the first test pays for them).
    await asyncio.gather(*(state.encodings.load(n) for n in state.needed_encodings()))
    calls: list[ModelCall] = []
    app = _NotingSimulatorApp(state, calls)
    runner = web.ServerRunner(
        web.Server(app.handle, handler_cancellation=True, access_log=None), handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    sock = socket.create_server((host, 0))
    sock.setblocking(False)
    try:
        await web.SockSite(runner, sock).start()
        yield InLoopSimulator(f"http://{host}:{sock.getsockname()[1]}", state, calls)
    finally:
        await runner.cleanup()
        sock.close()
