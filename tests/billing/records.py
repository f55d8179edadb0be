"""A usage record as the request path hands it to the sink."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any


def usage(request_id: str, key=None, **fields: Any) -> dict[str, Any]:
    """A record with every field set; ``key`` is a ClientKey row (its tenant is taken too)."""
    base = {
        "request_id": request_id,
        "tenant_id": key.tenant_id if key else None,
        "key_id": key.id if key else None,
        "deployment_id": None,
        "deployment_name": "east/gpt4o",
        "model": "gpt-4o",
        "route": "chat",
        "status": 200,
        "outcome": "ok",
        "error_code": "",
        "prompt_tokens": 12,
        "cached_tokens": 2,
        "completion_tokens": 30,
        "tokens_estimated": False,
        "cost": Decimal("0.00031250"),
        "latency_ms": 12.5,
        "ttft_ms": None,
        "streamed": False,
        "priority": 5,
        "queue_wait_ms": 0.0,
        "retries": 0,
        "client_ip": "10.1.2.3",
        "started_at": datetime(2026, 11, 25, 12, 0, tzinfo=UTC),
    }
    return {**base, **fields}
