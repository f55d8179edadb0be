"""What observing one request costs, in microseconds of CPU: ``python -m tests.bench observe``.

The hook the consumer calls once per request (``RequestWatch.begin`` + ``finish(record)``) and
the observed dispatcher's part (one lease, one outcome) are timed with ``timeit`` in child
processes, each configuration in a process of its own (prometheus client picks its value class
when first imported): metrics in memory (one process), metrics in multiprocess mode (mmap files),
the request log line (JSON, written by the background writer to /dev/null), both, and neither.
A shared machine makes end-to-end latency deltas of a few microseconds unmeasurable; this is
the reliable figure (the bench's ``observability`` phase reports the end-to-end one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONFIGURATIONS = {
    "off": {"GATEWAY_METRICS": "false", "GATEWAY_REQUEST_LOG_LEVEL": "off"},
    "metrics (one process)": {"GATEWAY_METRICS": "true", "GATEWAY_REQUEST_LOG_LEVEL": "off"},
    "metrics (multiprocess files)": {"GATEWAY_METRICS": "true", "GATEWAY_REQUEST_LOG_LEVEL": "off", "MULTIPROC": "1"},
    "request log (json)": {"GATEWAY_METRICS": "false", "GATEWAY_REQUEST_LOG_LEVEL": "INFO"},
    "metrics + log (multiprocess)": {"GATEWAY_METRICS": "true", "GATEWAY_REQUEST_LOG_LEVEL": "INFO", "MULTIPROC": "1"},
}


def child() -> None:
    """Time the hooks in this process, as its environment configures them; print JSON."""
    import asyncio
    import time
    import timeit
    from decimal import Decimal

    import django

    django.setup()
    from gateway import snapshot
    from gateway.balancer.dispatcher import Demand, Lease
    from gateway.observability.dispatch import dispatcher_observed
    from gateway.observability.request import RequestWatch
    from gateway.proxy.context import RequestContext
    from gateway.snapshot.types import DeploymentView, EndpointView, KeyView, TenantView

    endpoint = EndpointView(id=1, name="east", kind="azure", base_url="http://127.0.0.1:9")
    deployments = tuple(
        DeploymentView(id=i, endpoint=endpoint, name=f"dep-{i}", model="gpt-4o", tier=i) for i in (1, 2)
    )
    tenant = TenantView(id=1, slug="team-a", name="Team A")
    key = KeyView(id=1, tenant=tenant, name="app", prefix="sk-gw-abcdef")
    snapshot.install(
        snapshot.Snapshot(
            version=3,
            keys_by_hash={"h": key},
            deployments_by_model={"gpt-4o": deployments},
            all_deployments=deployments,
        )
    )
    scope = {"method": "POST", "path": "/v1/chat/completions", "headers": [], "client": ("127.0.0.1", 1)}

    class Inner:  # the balancer, as cheap as possible: what is timed is the observing around it
        state = notes = None

        async def acquire(self, candidates, demand, exclude, *, wait=True):
            return Lease(candidates[0], None, 0.0, {"request": 1})

        async def succeeded(self, lease, prompt, completion, headers):
            pass

    dispatcher = dispatcher_observed(Inner())
    demand = Demand("gpt-4o", 11, 16, 27, 5, "team-a", 30.0)

    def one_request() -> None:
        ctx = RequestContext.begin(scope)
        watch = RequestWatch.begin(scope, ctx)
        ctx.route, ctx.model, ctx.tenant_id, ctx.key_id = "chat", "gpt-4o", 1, 1
        ctx.deployment_id, ctx.deployment_name, ctx.status = 1, "dep-1", 200
        ctx.served, ctx.prompt_tokens, ctx.completion_tokens, ctx.ttft = True, 11, 7, 0.002
        ctx.estimated_prompt_tokens = 11
        record = ctx.usage_record({})
        record["cost"] = Decimal("0.0001")
        watch.finish(record)

    async def one_attempt() -> None:
        lease = await dispatcher.acquire(deployments, demand, frozenset())
        await dispatcher.succeeded(lease, 11, 7, ())

    loop = asyncio.new_event_loop()

    def attempt() -> None:
        coroutine = one_attempt()
        try:
            coroutine.send(None)
        except StopIteration:
            pass

    results = {}
    for name, fn in (("request", one_request), ("attempt", attempt)):
        for _ in range(2000):
            fn()  # warm: label children created, files grown
        best = min(timeit.repeat(fn, timer=time.process_time, number=20_000, repeat=5)) / 20_000
        results[name] = best * 1e6
    loop.close()
    import logging

    from gateway.observability.logs import BackgroundStreamHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundStreamHandler):
            handler.flush()
    print(json.dumps(results))


def main(argv: list[str] | None = None) -> int:
    rows = []
    for name, knobs in CONFIGURATIONS.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROMETHEUS_", "OTEL_"))}
        env.update({k: v for k, v in knobs.items() if k != "MULTIPROC"})
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "gateway.settings",
                "GATEWAY_LOG_FORMAT": "json",
                "PYTHONPATH": str(REPO),
            }
        )
        with tempfile.TemporaryDirectory(prefix="bench-observe-") as directory:
            if knobs.get("MULTIPROC"):
                env["PROMETHEUS_MULTIPROC_DIR"] = directory
            with open(os.devnull, "w") as devnull:
                out = subprocess.run(
                    [sys.executable, "-m", "tests.bench.observe", "--child"],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=devnull,
                    check=True,
                    text=True,
                ).stdout
        rows.append((name, json.loads(out.strip().splitlines()[-1])))
    base = dict(rows)["off"]
    print(f"{'configuration':30} {'request hook':>13} {'one attempt':>12} {'added per request':>18}")
    for name, r in rows:
        added = r["request"] + r["attempt"] - base["request"] - base["attempt"]
        print(f"{name:30} {r['request']:>10.2f} µs {r['attempt']:>9.2f} µs {added:>+15.2f} µs")
    print(
        "(CPU time of the process (all its threads) per call, best of 5 x 20,000; the request hook includes making the usage record)"
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child()
    else:
        sys.exit(main(sys.argv[1:]))
