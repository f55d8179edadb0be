"""A local three-node Redis Cluster for tests (issue 19): started once per test session.

``redis-server --cluster-enabled yes`` on three loopback ports (``GATEWAY_TEST_CLUSTER_PORTS``,
e.g. ``7301,7302,7303``, or three free ports whose cluster-bus ports, +10000, are free too),
without persistence, joined by ``redis-cli --cluster create`` with no replicas, so the 16384
slots are spread over three primaries and a script whose keys span two slots fails as it would in
production. Skipped when ``redis-server`` or ``redis-cli`` is missing; the servers are shut down
and their files removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

START_SECONDS = 15


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports() -> list[int]:
    given = os.environ.get("GATEWAY_TEST_CLUSTER_PORTS", "").strip()
    if given:
        return [int(p) for p in given.split(",")]
    ports: list[int] = []
    while len(ports) < 3:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


class RedisCluster:
    """Three cluster-enabled redis-servers joined into one cluster; ``url`` is the gateway's
    ``redis+cluster://`` URL of its first node."""

    def __init__(self) -> None:
        self.ports = _ports()
        self.dir = tempfile.mkdtemp(prefix="gw-cluster-")
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def _cli(self, port: int, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10)
        return done.stdout

    def start(self) -> RedisCluster:
        for port in self.ports:
            subprocess.run(
                [
                    "redis-server",
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", os.path.join(self.dir, f"nodes-{port}.conf"),
                    "--dir", self.dir,
                    "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "yes",
                    "--pidfile", os.path.join(self.dir, f"{port}.pid"),
                    "--logfile", os.path.join(self.dir, f"{port}.log"),
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_SECONDS
        for port in self.ports:
            while self._cli(port, "ping").strip() != "PONG":
                assert time.monotonic() < deadline, f"redis-server on {port} did not start"
                time.sleep(0.05)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for port in self.ports:  # every node must know every slot's owner before tests send commands
            while "cluster_state:ok" not in self._cli(port, "cluster", "info"):
                assert time.monotonic() < deadline, f"the cluster did not settle (node {port})"
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        for port in self.ports:
            self._cli(port, "shutdown", "nosave")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster():
    """A running three-node cluster for the whole session (the tests use their own key prefixes)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed: no local Redis Cluster")
    cluster = RedisCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
