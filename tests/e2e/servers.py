"""Live gateways for end-to-end tests: in a thread (uvicorn, same process) or as OS processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


class ThreadGateway:
    """The real ASGI application under uvicorn in a background thread of the test process."""

    def __init__(self) -> None:
        config = uvicorn.Config(
            "gateway.asgi:application", host="127.0.0.1", port=0, lifespan="on", log_level="warning", loop="asyncio"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-gateway", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's loop, once it runs
        serve = self.server.serve

        async def serve_noting_loop(*args, **kwargs):
            self.loop = asyncio.get_running_loop()
            return await serve(*args, **kwargs)

        self.server.serve = serve_noting_loop  # type: ignore[method-assign]

    def start(self) -> ThreadGateway:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test gateway did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def stop_thread_gateway(server: ThreadGateway, timeout: float = 20.0) -> None:
    """Stop a ThreadGateway and make sure it has stopped before the next test starts one.

    The gateway's runtime (``gateway.proxy.runtime.runtime``, the usage sink) is global to the
    process: a gateway still shutting down while the next one starts takes the new one's Redis
    client and flusher with it, and that test loses its usage records. Its shutdown can hang: it
    cancels the snapshot refresher and awaits it, and redis-py's asyncio client sometimes loses
    a cancellation that lands during a command (see the report of the balancer tests), so the
    refresher runs on. Cancelling again the tasks still "cancelling" lets the shutdown finish.
    """
    server.server.should_exit = True
    server.thread.join(timeout=5)
    deadline = time.monotonic() + timeout
    while server.thread.is_alive() and time.monotonic() < deadline:
        loop = server.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(_cancel_again, loop)
        server.thread.join(timeout=0.5)
    assert not server.thread.is_alive(), "the test gateway did not stop"


def _cancel_again(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        if task.cancelling():
            logging.getLogger(__name__).warning("gateway shutdown stuck on %r: cancelling it again", task)
            task.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def database_url_for_children() -> str:
    """A DATABASE_URL that reaches the test database this pytest process created."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{db['NAME']}"


class ProcessGateway:
    """A gateway as its own OS process (uvicorn), sharing the test database and Redis.

    It spills usage records to a directory of its own unless ``extra_env`` names one
    (``GATEWAY_USAGE_SPILL_DIR``); ``uvicorn_args`` are added to uvicorn's command line; its
    standard error (the log) goes to ``log_path`` when given.
    """

    def __init__(
        self,
        extra_env: dict[str, str] | None = None,
        uvicorn_args: list[str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DATABASE_URL": database_url_for_children(), "DJANGO_SETTINGS_MODULE": "gateway.settings"}
        if settings.REDIS_URL:
            env["REDIS_URL"] = settings.REDIS_URL
        env["GATEWAY_USAGE_SPILL_DIR"] = tempfile.mkdtemp(prefix="gateway-usage-spill-")
        env.update(extra_env or {})
        self.log = open(log_path, "wb") if log_path is not None else None  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "gateway.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--lifespan",
                "on",
                *(uvicorn_args or []),
            ],
            cwd=ROOT,
            env=env,
            stderr=self.log,
        )

    def start(self) -> ProcessGateway:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway process exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway process did not become healthy")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.log is not None:
            self.log.close()


class RedisServer:
    """A private redis-server on a free port, without persistence: started, paused (SIGSTOP), resumed,
    killed, and restarted on the same port (``restart`` gives an empty Redis, as after a crash of a
    cache node without snapshots)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout != b"PONG\n":
            assert time.monotonic() < deadline and self.process.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        return self

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.resume()  # a stopped process would keep its port until it runs again
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def restart(self) -> None:
        """Stop and start again on the same port: everything it held is gone."""
        self.stop()
        self.start()
