"""Live deployment status: window use, headroom, in flight, cool-down, breaker, last failure, queue depth.

Read from the balancer's state (in this process, or from Redis where every process shares it),
for the admin console's status page and the staff-only JSON API. Never on the request path.
"""

from __future__ import annotations

import time

from django.conf import settings

from billing.usage_sink import get_sink
from gateway import snapshot
from gateway.balancer.contract import StateUnavailable
from gateway.proxy.runtime import runtime

# What the request path does while the shared state cannot be reached (gateway.proxy.shared_state).
WHEN_UNREACHABLE = (
    "Proxied requests are refused with 503 state_unavailable (Retry-After: 1) until Redis answers again; "
    "the gateway does not fall back to per-process limits, which would let N processes send N times a "
    "deployment's limits."
)


async def deployment_status() -> dict:
    """Status of every configured deployment and the queue depth of every model.

    ``shared_state`` says where the balancer's state lives and whether it answered; while it
    does not, the live columns are left out and ``deployments`` lists the configuration only.
    ``usage_buffer``: this process's usage records in memory, written, parked, spilled to disk.
    """
    await runtime.ensure_started()
    snap = snapshot.current()
    shared = {"backend": "redis" if settings.REDIS_URL else "memory", "reachable": True, "error": None}
    if settings.REDIS_URL:
        shared["when_unreachable"] = WHEN_UNREACHABLE
    try:
        per_id, queues = await _live_state(snap.all_deployments)
        assert runtime.dispatcher is not None  # started by ensure_started
        last_failures = await runtime.dispatcher.notes.read(d.id for d in snap.all_deployments)
    except StateUnavailable as exc:
        per_id, queues, last_failures = {}, {}, {}
        shared.update(reachable=False, error=str(exc))
    deployments = snap.all_deployments
    assert runtime.dispatcher is not None
    calibration = runtime.dispatcher.calibration
    guard = runtime.dispatcher.guard
    rows = []
    for d in deployments:
        rows.append(
            {
                "id": d.id,
                "endpoint": d.endpoint.name,
                "name": d.name,
                "model": d.model,
                "sku": d.sku,
                "tier": d.tier,
                "rpm": d.rpm,
                "tpm": d.tpm,
                "weight": d.weight,
                "enabled": d.enabled,
                **per_id.get(d.id, {}),
                # The learned upstream charge per token reserved (gateway.balancer.calibration).
                "calibration": calibration.status(d.id),
                # The request windows' guard this process measured (gateway.balancer.guard).
                "window_guard": guard.status(d.id),
                # {"reason": "upstream refused credentials (401)", "at": unix time}, or None
                "last_failure": last_failures.get(d.id),
            }
        )
    return {
        "generated_at": time.time(),
        "config_version": snap.version,
        "shared_state": shared,
        "usage_buffer": get_sink().stats(),  # of the process that answered
        "deployments": rows,
        "queues": queues,
    }


async def _live_state(deployments) -> tuple[dict, dict]:
    assert runtime.dispatcher is not None  # started by ensure_started
    state = runtime.dispatcher.state
    per_id = await state.status(deployments) if deployments else {}
    queues = {}
    for model in sorted({d.model for d in deployments}):
        depths = await state.depth(model)
        queues[model] = {"total": sum(depths.values()), "by_priority": {str(p): n for p, n in sorted(depths.items())}}
    return per_id, queues
