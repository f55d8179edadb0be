"""The request path's side of a shared-state outage: a 503 on acquire, nothing spoiled after."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.balancer.contract import StateUnavailable
from gateway.balancer.dispatcher import Demand, Lease
from gateway.proxy.errors import GatewayError
from gateway.proxy.shared_state import GuardedDispatcher


class Unreachable:
    """A dispatcher whose state cannot be reached."""

    state = object()

    async def acquire(self, candidates, demand, exclude, *, wait=True):
        raise StateUnavailable("Redis did not answer (TimeoutError: Timeout reading from socket)", 1.0)

    async def succeeded(self, *args):
        raise StateUnavailable("down")

    async def rate_limited(self, *args):
        raise StateUnavailable("down")

    async def failed(self, *args, **kwargs):
        raise StateUnavailable("down")

    async def abandoned(self, *args):
        raise StateUnavailable("down")


class Deployment:
    name = "east/gpt4o"


DEMAND = Demand("gpt-4o", 10, 10, 20, 5, "team-a", 30.0)


async def test_an_unreachable_state_answers_503_state_unavailable_with_retry_after():
    with pytest.raises(GatewayError) as refused:
        await GuardedDispatcher(Unreachable()).acquire((), DEMAND, frozenset())
    err = refused.value
    assert (err.status, err.type, err.code, err.outcome) == (503, "api_error", "state_unavailable", "upstream_error")
    assert (b"retry-after", b"1") in err.headers and (b"retry-after-ms", b"1000") in err.headers
    assert json.loads(err.body())["error"]["code"] == "state_unavailable"


async def test_reports_after_an_answer_are_dropped_not_turned_into_errors(caplog):
    guarded = GuardedDispatcher(Unreachable())
    lease = Lease(Deployment())
    with caplog.at_level(logging.WARNING, logger="gateway.proxy.shared_state"):
        await guarded.succeeded(lease, 10, 5, [])
        await guarded.rate_limited(lease, 1.0, [])
        await guarded.failed(lease, reached_upstream=True)
        await guarded.abandoned(lease, 10, 2)
    assert len(caplog.records) == 4 and all("east/gpt4o" in r.getMessage() for r in caplog.records)


def test_the_guard_exposes_the_state_for_the_status_page():
    inner = Unreachable()
    assert GuardedDispatcher(inner).state is inner.state
