"""Command line of the simulator, shared by ``python -m gateway.simulator`` and
``manage.py simulate_upstream``.

``--minute-seconds`` and ``--api-key`` override the config file; ``--auto-deployments`` turns
on on-the-fly deployments. On start it prints exactly one line to stdout::

    simulated upstream listening on http://HOST:PORT (N deployments)

(with the real port when ``--port 0``), then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections.abc import Sequence

from .config import ConfigError, SimConfig, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9100, help="port to bind; 0 = ephemeral (default 9100)")
    parser.add_argument("--config", help="YAML or JSON config file")
    parser.add_argument("--minute-seconds", type=float, default=None, help="length of a rate-limit minute in seconds")
    parser.add_argument("--api-key", default=None, help="require this API key")
    parser.add_argument(
        "--auto-deployments",
        action="store_true",
        help="create unknown deployments on the fly with the default limits",
    )


def build_config(
    config_path: str | None,
    minute_seconds: float | None = None,
    api_key: str | None = None,
    auto_deployments: bool = False,
) -> SimConfig:
    """The config file (or an empty config) with the command-line overrides applied."""
    config = load_config(config_path) if config_path else SimConfig()
    changes: dict = {}
    if minute_seconds is not None:
        if minute_seconds <= 0:
            raise ConfigError("--minute-seconds: must be > 0")
        changes["minute_seconds"] = minute_seconds
    if api_key is not None:
        changes["api_key"] = api_key
    if auto_deployments:
        changes["auto_deployments"] = True
    return dataclasses.replace(config, **changes)


async def _serve(config: SimConfig, host: str, port: int) -> None:
    from .runner import serve_forever

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass

    def ready(server) -> None:
        print(server.banner(), flush=True)

    await serve_forever(config, host, port, on_ready=ready, stop=stop)


def run(
    host: str = "127.0.0.1",
    port: int = 9100,
    config: str | None = None,
    minute_seconds: float | None = None,
    api_key: str | None = None,
    auto_deployments: bool = False,
) -> None:
    """Load the config and serve until interrupted. Raises ConfigError on a bad config."""
    from .runner import new_event_loop

    sim_config = build_config(config, minute_seconds, api_key, auto_deployments)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve(sim_config, host, port))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.simulator", description="Simulated Azure OpenAI / OpenAI upstream."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args.host, args.port, args.config, args.minute_seconds, args.api_key, args.auto_deployments)
    except ConfigError as exc:
        print(f"simulator: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
