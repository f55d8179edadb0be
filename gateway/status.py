"""Live deployment status: window use, headroom, in flight, cool-down, breaker, last failure, queue depth.

Read from the balancer's state (in this process, or from Redis where every process shares it),
for the admin console's status page and the staff-only JSON API. Never on the request path.
"""

from __future__ import annotations

import time

from gateway import snapshot
from gateway.proxy.runtime import runtime


async def deployment_status() -> dict:
    """Status of every configured deployment and the queue depth of every model."""
    await runtime.ensure_started()
    snap = snapshot.current()
    state = runtime.dispatcher.state
    deployments = snap.all_deployments
    per_id = await state.status(deployments) if deployments else {}
    notes = runtime.dispatcher.notes
    last_failures = await notes.read(d.id for d in deployments) if deployments else {}
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
                # {"reason": "upstream refused credentials (401)", "at": unix time}, or None
                "last_failure": last_failures.get(d.id),
            }
        )
    queues = {}
    for model in sorted({d.model for d in deployments}):
        depths = await state.depth(model)
        queues[model] = {"total": sum(depths.values()), "by_priority": {str(p): n for p, n in sorted(depths.items())}}
    return {"generated_at": time.time(), "config_version": snap.version, "deployments": rows, "queues": queues}
