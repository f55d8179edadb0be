"""Lifecycle of a simulator server: bind, warm up, serve, stop.

Contract:

* ``SimulatorServer(config, host, port)``; ``await start()`` binds (port 0 = ephemeral, the
  bound port is then in ``.port``/``.url``), loads the tiktoken encodings the deployments
  need in a worker thread, and starts accepting connections. It returns once the socket is
  listening, so a caller can connect immediately.
* ``await stop()`` stops accepting, cancels in-flight handlers after ``shutdown_timeout``
  seconds, and closes the socket.
* ``new_event_loop()`` is uvloop's when installed (the benchmark target assumes it), else
  asyncio's.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from aiohttp import web

from .config import SimConfig
from .server import build_server
from .state import SimulatorState


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


class SimulatorServer:
    """One listening simulator. Create and use it on the event loop that will serve it."""

    def __init__(
        self,
        config: SimConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        shutdown_timeout: float = 1.0,
    ) -> None:
        self.config = config
        self.host = host
        self.requested_port = port
        self.shutdown_timeout = shutdown_timeout
        self.state = SimulatorState(config)
        self.port: int | None = None
        self._runner: web.ServerRunner | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("simulator not started")
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        # Warm the encodings before listening so the first requests do not pay ~0.3 s each.
        await asyncio.gather(*(self.state.encodings.load(n) for n in self.state.needed_encodings()))
        sock = _bind(self.host, self.requested_port)
        try:
            runner = web.ServerRunner(
                build_server(self.state), handle_signals=False, shutdown_timeout=self.shutdown_timeout
            )
            await runner.setup()
            site = web.SockSite(runner, sock, shutdown_timeout=self.shutdown_timeout, backlog=1024)
            await site.start()
        except BaseException:
            sock.close()
            raise
        self._runner = runner
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def banner(self) -> str:
        """The one start-up line the CLI prints."""
        count = len(self.state.deployments)
        noun = "deployment" if count == 1 else "deployments"
        return f"simulated upstream listening on {self.url} ({count} {noun})"


async def serve_forever(
    config: SimConfig,
    host: str,
    port: int,
    on_ready: Callable[[SimulatorServer], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set (or the task is cancelled)."""
    server = SimulatorServer(config, host, port)
    await server.start()
    try:
        if on_ready is not None:
            on_ready(server)
        await (stop or asyncio.Event()).wait()
    finally:
        await server.stop()
