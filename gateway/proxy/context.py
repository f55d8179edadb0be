"""Everything the gateway learns about one request, turned into its usage record at the end.

Only what the upstream served costs money: a request whose answer never started (refused by the
gateway, 429, 502/504, a client-caused upstream 4xx, a client that left before the answer) is
recorded with 0 tokens and 0 cost; the gateway's own prompt estimate stays in
``estimated_prompt_tokens``. An answer that started (a 2xx relayed, a stream the upstream or the
client broke off) is billed for what arrived: the upstream's usage, else the gateway's count.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from billing.prices import cost_of, price_for
from gateway.proxy.client_address import client_address

# Request ids: a random per-process prefix and a counter. Unique across processes and restarts
# (64 random bits), ordered within a process, and without uuid4's system call per request.
_ID_PREFIX = ""
_id_counter = itertools.count(1)


def _new_id_prefix() -> None:
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = "req_" + os.urandom(8).hex()
    _id_counter = itertools.count(1)


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # a forked worker must not repeat its parent's ids


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started_at: datetime
    t0: float  # monotonic start
    client_ip: str | None
    route: str = ""
    model: str = ""
    tenant_id: int | None = None
    key_id: int | None = None
    deployment_id: int | None = None
    deployment_name: str = ""
    status: int = 0
    outcome: str = "ok"
    error_code: str = ""
    prompt_tokens: int = 0
    estimated_prompt_tokens: int | None = None  # the preflight's count (None: never counted)
    served: bool = False  # the upstream's answer started reaching the client: tokens are billed
    cached_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: bool = False
    ttft: float | None = None
    streamed: bool = False
    priority: int = 5
    queue_wait: float = 0.0
    retries: int = 0
    # Quota admission (gateway.proxy.admission): the reservation to settle once the request ends,
    # and the caller's rate-limit headers that every answer carries.
    admission: Any = None
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def begin(cls, scope) -> RequestContext:
        """A new request's context. The client address is worked out here, once per request:
        the TCP peer, or the address trusted proxies forwarded (``client_address``)."""
        return cls(
            request_id=new_request_id(),
            started_at=datetime.now(UTC),
            t0=time.monotonic(),
            client_ip=client_address(scope),
        )

    def usage_record(self, prices_by_model) -> dict:
        """The fields of this request's UsageRecord, with its cost at the prices then in effect."""
        price = price_for(prices_by_model.get(self.model, ()), self.started_at)
        if self.served:
            prompt, cached, completion = self.prompt_tokens, self.cached_tokens, self.completion_tokens
        else:
            prompt = cached = completion = 0
        return {
            "request_id": self.request_id,
            "tenant_id": self.tenant_id,
            "key_id": self.key_id,
            "deployment_id": self.deployment_id,
            "deployment_name": self.deployment_name,
            "model": self.model[:200],
            "route": self.route,
            "status": self.status,
            "outcome": self.outcome,
            "error_code": (self.error_code or "")[:100],
            "prompt_tokens": prompt,
            "estimated_prompt_tokens": self.estimated_prompt_tokens,
            "cached_tokens": cached,
            "completion_tokens": completion,
            "tokens_estimated": self.tokens_estimated and self.served,
            "cost": cost_of(price, prompt, cached, completion),
            "latency_ms": (time.monotonic() - self.t0) * 1000.0,
            "ttft_ms": self.ttft * 1000.0 if self.ttft is not None else None,
            "streamed": self.streamed,
            "priority": self.priority,
            "queue_wait_ms": self.queue_wait * 1000.0,
            "retries": self.retries,
            "client_ip": self.client_ip,
            "started_at": self.started_at,
        }
