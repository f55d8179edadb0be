"""Live gateways for end-to-end tests: in a thread (uvicorn, same process) or as OS processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
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
    """A gateway as its own OS process (uvicorn), sharing the test database and Redis."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DATABASE_URL": database_url_for_children(), "DJANGO_SETTINGS_MODULE": "gateway.settings"}
        if settings.REDIS_URL:
            env["REDIS_URL"] = settings.REDIS_URL
        env.update(extra_env or {})
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
            ],
            cwd=ROOT,
            env=env,
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


class RedisServer:
    """A redis-server of the test's own, on a free port, without persistence: ``restart`` gives an
    empty Redis, as after a crash of a cache node without snapshots."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port: everything it held is gone."""
        self.stop()
        self.start()
