"""What the shared state costs Redis per request (issue 19): round trips, commands, CPU, ceiling.

Two gateway processes (uvicorn ``--workers 2``) share a private ``redis-server`` that the bench
starts on a loopback port (so no other client's work is counted), in front of two deployments
of one model on the fast upstream whose limits are configured but never bind, for a tenant with
a tenant and a key quota (every limit and budget set, none reached): every request pays the
quota admission and settlement and the balancer's acquire and settle. 8 clients in a closed loop.

Measured between two readings of the server around the run (after the processes' warm-up):

* round trips per request: ``total_reads_processed`` (the read events Redis served on client
  sockets: one per client write, so a pipelined batch is one) over the requests served;
* script calls (``EVALSHA``/``EVAL``) and commands (``total_commands_processed``, which counts
  the commands scripts run too) per request;
* Redis CPU per request: the redis-server process's user + system CPU time (``/proc``) over the
  requests, and the projected ceiling of one Redis primary: 1 s / that, in requests per second.

The gateways' background calls (the configuration mirror's ``GET`` every 0.5 s per process) are
counted too: a few per second against thousands of requests.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

from tests.bench.driver import run_load
from tests.bench.procs import ProcessGroup, cpu_seconds, wait_until
from tests.bench.scenarios import Durations, Pinning, chat_body, gateway_request, log_errors, smoke
from tests.bench.stack import REPO, BenchEnv, Gateway, _healthy, free_port, post_json, server_command, settle

PAIR_MODEL = "bench-pair"
PAIR_DEPLOYMENTS = ("pair-a", "pair-b")
# Configured, so the balancer keeps every window, and far above what the bench can send.
PAIR_RPM = 60_000_000
PAIR_TPM = 6_000_000_000
CONCURRENCY = 8
WORKERS = 2
# The bench's own Redis: a loopback port set aside for throw-away servers (7100-7105).
REDIS_PORT = 7105
TARGET_ROUND_TRIPS = 1.0  # to admit; settling adds at most one more, batched
TARGET_CPU_US = 30.0


def pair_upstream_deployments() -> list[dict[str, Any]]:
    return [{"name": name, "completion_tokens": 16} for name in PAIR_DEPLOYMENTS]


def pair_gateway_deployments() -> list[dict[str, Any]]:
    return [
        {"name": name, "model": PAIR_MODEL, "upstream_model": "gpt-4o", "rpm": PAIR_RPM, "tpm": PAIR_TPM}
        for name in PAIR_DEPLOYMENTS
    ]


class RedisServer:
    """A throw-away ``redis-server`` (no persistence) on the loopback, stopped with the group."""

    def __init__(self, group: ProcessGroup, root: Path, port: int = REDIS_PORT) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: the Redis scenario needs its own server")
        if _port_taken(port):
            raise RuntimeError(f"port {port} is taken: the Redis scenario starts its own server there")
        data = root / f"redis-{port}"
        data.mkdir(exist_ok=True)
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.child = group.start(
            f"redis-{port}",
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data),
            ],
        )
        wait_until(lambda: _port_taken(port), timeout=10, what="redis-server listening")
        import redis

        self.client = redis.Redis.from_url(self.url, decode_responses=True)
        # Every command in the slow log (kept in memory, cleared before the run): script time
        # by script, from the SHA1 each EVALSHA names.
        self.client.config_set("slowlog-log-slower-than", 0)
        self.client.config_set("slowlog-max-len", 1_000_000)

    def script_usec_by_name(self, requests: int) -> dict[str, dict[str, float]]:
        """µs inside each script per request, and calls per request, from the slow log."""
        names = _script_names()
        totals: dict[str, list[float]] = {}
        for entry in self.client.slowlog_get(1_000_000):
            command = entry.get("command") or ""
            if isinstance(command, bytes):
                command = command.decode(errors="replace")
            parts = command.split()
            if not parts or parts[0].upper() != "EVALSHA" or len(parts) < 2:
                continue
            name = names.get(parts[1], parts[1][:8])
            row = totals.setdefault(name, [0.0, 0.0])
            row[0] += entry["duration"]
            row[1] += 1
        return {
            name: {"usec_per_request": usec / requests, "calls_per_request": calls / requests}
            for name, (usec, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])
        }

    @property
    def pid(self) -> int:
        return self.child.pid

    def ping_cpu_us(self, count: int = 3000) -> float:
        """Redis CPU of one PING round trip, in µs: the unit that makes figures taken on a busy
        shared machine comparable (every CPU figure here moved 3-6x with the load of the
        2-core development machine; a quiet one spends ~3-5 µs per PING)."""
        before = cpu_seconds(self.pid)
        for _ in range(count):
            self.client.ping()
        return 1e6 * (cpu_seconds(self.pid) - before) / count

    def reading(self) -> dict[str, float]:
        """The counters compared before and after a run."""
        stats = self.client.info("stats")
        commands = self.client.info("commandstats")
        scripts = sum(commands.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))
        script_usec = sum(commands.get(f"cmdstat_{name}", {}).get("usec", 0) for name in ("evalsha", "eval"))
        return {
            "cpu_s": cpu_seconds(self.pid),
            "reads": float(stats["total_reads_processed"]),
            "commands": float(stats["total_commands_processed"]),
            "scripts": float(scripts),
            "script_usec": float(script_usec),
            "by_command": {k.removeprefix("cmdstat_"): v["calls"] for k, v in commands.items()},
        }


def _script_names() -> dict[str, str]:
    """SHA1 -> name of the gateway's Lua scripts (balancer and quotas)."""
    import hashlib

    balancer, quotas = REPO / "gateway" / "balancer" / "lua", REPO / "tenants" / "quota_state" / "lua"
    names = {}
    for folder, label in ((balancer, "balancer"), (quotas, "quota")):
        lib = (folder / "lib.lua").read_text()
        for path in folder.glob("*.lua"):
            if path.name != "lib.lua":
                source = lib + "\n" + path.read_text()
                names[hashlib.sha1(source.encode()).hexdigest()] = f"{label} {path.stem}"
    return names


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_redis_state(
    group: ProcessGroup, env: BenchEnv, key: str, pinning: Pinning, durations: Durations, port: int = REDIS_PORT
) -> dict[str, Any]:
    if shutil.which("redis-server") is None:
        return {"skipped": "redis-server is not installed: the Redis scenario starts a server of its own"}
    server = RedisServer(group, env.root, port)
    gateway_port = free_port()
    command = [*server_command("uvicorn", gateway_port), "--workers", str(WORKERS)]
    child = group.start(
        "gateway-redis-state",
        command,
        cpus=pinning.gateway,
        env=env.child_env({"REDIS_URL": server.url}),
        cwd=REPO,
    )
    gateway = Gateway("uvicorn", f"http://127.0.0.1:{gateway_port}", gateway_port, child)
    results: dict[str, Any] = {"workers": WORKERS, "concurrency": CONCURRENCY, "redis_port": port}
    try:
        wait_until(lambda: _healthy(gateway), timeout=60, interval=0.1, what="gateway workers healthy")
        request = gateway_request(key, PAIR_MODEL)
        smoke_pair(gateway, key)
        # Warm-up: both workers' connection pools, script loads, quota seeds.
        run_load(gateway.url, [request], cpus=pinning.load, concurrency=CONCURRENCY, duration=durations.gateway_warmup)
        settle(1.0)
        results["ping_cpu_us"] = server.ping_cpu_us()
        server.client.slowlog_reset()
        before = server.reading()
        load = run_load(
            gateway.url, [request], cpus=pinning.load, concurrency=CONCURRENCY, duration=durations.throughput
        )
        settle(0.5)  # settlements batched after the responses land
        after = server.reading()
        results["load"] = load
        results.update(summarize(before, after, load))
        results["scripts"] = server.script_usec_by_name(results["served_200"])
        results["ping_cpu_us_after"] = server.ping_cpu_us()
        ping = (results["ping_cpu_us"] + results["ping_cpu_us_after"]) / 2
        results["redis_cpu_per_request_in_pings"] = results["redis_cpu_us_per_request"] / ping if ping else None
    finally:
        group.stop(gateway.child)
        group.stop(server.child)
        results["log_lines"], results["log_errors"] = log_errors(gateway)
    return results


def smoke_pair(gateway: Gateway, key: str) -> None:
    smoke(gateway, key)  # the fast deployments answer too
    response = post_json(
        gateway.url + "/v1/chat/completions", chat_body(PAIR_MODEL), {"authorization": f"Bearer {key}"}
    )
    if response.status_code != 200:
        raise RuntimeError(f"smoke request to {PAIR_MODEL} failed: {response.status_code} {response.text}")


def summarize(before: dict[str, Any], after: dict[str, Any], load: dict[str, Any]) -> dict[str, Any]:
    requests = int(load.get("total_completed") or 0)
    statuses = (load.get("overall") or {}).get("status") or {}
    ok = int(statuses.get("200", 0))
    if not ok:
        raise RuntimeError(f"no request was served: statuses {statuses}")
    cpu_us = 1e6 * (after["cpu_s"] - before["cpu_s"]) / ok
    by_command = {
        name: (after["by_command"].get(name, 0) - before["by_command"].get(name, 0)) / ok
        for name in after["by_command"]
        if after["by_command"].get(name, 0) != before["by_command"].get(name, 0) and name != "info"
    }
    return {
        "requests": requests,
        "served_200": ok,
        "statuses": statuses,
        "rps": load.get("rps"),
        "round_trips_per_request": (after["reads"] - before["reads"]) / ok,
        "script_calls_per_request": (after["scripts"] - before["scripts"]) / ok,
        "commands_per_request": (after["commands"] - before["commands"]) / ok,
        "script_usec_per_request": (after["script_usec"] - before["script_usec"]) / ok,
        "redis_cpu_us_per_request": cpu_us,
        "ceiling_rps_per_primary": 1e6 / cpu_us if cpu_us > 0 else None,
        "commands_by_name_per_request": dict(sorted(by_command.items(), key=lambda kv: -kv[1])),
    }


def redis_state_lines(results: dict[str, Any]) -> list[str]:
    run = results.get("redis_state")
    if run and run.get("skipped"):
        return [f"Shared state on Redis (issue 19): skipped, {run['skipped']}"]
    if not run or "redis_cpu_us_per_request" not in run:
        return []
    rt, cpu = run["round_trips_per_request"], run["redis_cpu_us_per_request"]
    top = ", ".join(f"{name} {calls:.1f}" for name, calls in list(run["commands_by_name_per_request"].items())[:10])
    return [
        f"Shared state on Redis (issue 19): {run['workers']} gateway processes, {run['concurrency']} clients, "
        f"{run['served_200']:,} requests at {run['rps']:,.0f} req/s (statuses {run['statuses']})",
        f"  round trips per request {rt:.2f} (all of them, settling included; target: 1 to admit), "
        f"script calls {run['script_calls_per_request']:.2f}, commands {run['commands_per_request']:.1f}",
        f"  Redis CPU per request {cpu:.1f} µs (target <= {TARGET_CPU_US:.0f}: "
        f"{'met' if cpu <= TARGET_CPU_US else 'NOT met'}); inside scripts {run['script_usec_per_request']:.1f} µs; "
        f"ceiling of one Redis primary ~{run['ceiling_rps_per_primary']:,.0f} req/s",
        f"  = {run['redis_cpu_per_request_in_pings']:.1f} PING round trips of Redis CPU "
        f"(a PING cost {run['ping_cpu_us']:.1f} / {run['ping_cpu_us_after']:.1f} µs before / after the run: "
        "compare runs in PINGs when the machine is busy)",
        f"  commands per request: {top}",
        "  inside each script per request: "
        + ", ".join(
            f"{name} {row['usec_per_request']:.1f} µs ({row['calls_per_request']:.2f} calls)"
            for name, row in (run.get("scripts") or {}).items()
        ),
    ]
