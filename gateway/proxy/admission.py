"""Admission: a request's demand reserved against its tenant's and key's limits and budgets.

Between preflight and balance, ``Admitter.admit`` reserves the most the request can use (prompt
+ completion allowance, and that at the model's price) in every scope with a quota, in one state
call (one Lua script on Redis); a refusal is an OpenAI-shaped 429. When the request ends, however
it ends, ``Admitter.settle`` replaces the reservation with what its usage record says it used,
or releases it when no upstream took the request (refused later, client gone before dispatch).

The completion allowance here is a true upper bound: the request's ``max_completion_tokens`` /
``max_tokens`` (the tenant's cap was written into the body by preflight when it gave none),
else the largest ``max_output_tokens`` of the deployments it may go to. (The balancer reserves
a smaller default, since its windows are corrected within the minute anyway.)

A scope whose budget counters the state does not hold (a new process with the in-memory state,
an emptied Redis, a period an admin reset) is seeded from the usage records: one query in a
worker thread per scope, shared by the requests that wait for it, not one per request.

This runs for every request of a team with a quota, so it caches what it can: a key's scopes per
snapshot and day, each price's per-token rates; the in-process state is called without a
coroutine, and settlements on Redis go in batches (``quota_upkeep``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from billing.prices import price_for
from gateway import snapshot
from gateway.database_thread import DatabaseThread
from gateway.proxy import errors, tokens
from gateway.proxy.quota_upkeep import QuotaUpkeep
from gateway.snapshot.types import KeyView
from tenants.quota_state import Admitted, Ask, QuotaState, Refused, Reservation, ScopeLimits, Seed, Unseeded
from tenants.quota_state.contract import TPM
from tenants.quotas import (
    PeriodClock,
    Periods,
    budget_refusal_message,
    cost_units,
    limit_headers,
    rate_refusal_message,
    refusal_code,
    refusal_reason,
    scopes_for,
)
from tenants.selectors import quota_usage_totals

log = logging.getLogger(__name__)

# The most Retry-After says: OpenAI SDKs 1.x honour up to 60 s (newer ones 120 s).
MAX_RETRY_AFTER = 60.0
SCOPE_CACHE_SIZE = 50_000


@dataclass(slots=True)
class Admission:
    """What an admitted request holds until it settles (``RequestContext.admission``)."""

    reservation: Reservation
    key: KeyView
    periods: Periods
    settled: bool = False


def unavailable() -> errors.GatewayError:
    return errors.GatewayError(
        503,
        "The gateway cannot check this team's quota right now; retry shortly.",
        type="api_error",
        code="quota_state_unavailable",
        outcome="upstream_error",
        headers=errors.retry_headers(1.0),
    )


class Admitter:
    """Admission for one gateway process, on its quota state."""

    def __init__(self, state: QuotaState, tz_name: str, window_seconds: float, redis: Any = None) -> None:
        self.state = state
        self.synchronous = state.synchronous
        self.clock = PeriodClock(tz_name)
        self.window_seconds = window_seconds
        # Seeding reads the usage records: on a thread of its own, whose connection closes with it.
        self.database = DatabaseThread("quota-db")
        self.upkeep = QuotaUpkeep(state, self.clock, redis, self.database)
        self._seeding: dict[tuple[Any, ...], asyncio.Future[dict[tuple[str, int], Seed]]] = {}
        self._scopes: dict[int, tuple[KeyView, int, tuple[ScopeLimits, ...]]] = {}
        self._rates: dict[int, tuple[Any, float, float]] = {}

    # -- admission -------------------------------------------------------------------------------

    async def admit(self, ctx: Any, key: KeyView, plan: Any) -> Admission | None:
        """Reserve ``plan``'s demand for ``key``'s tenant and key, or raise the 429 that says which
        limit refused it. None when neither has a quota. Sets the response's rate-limit headers."""
        now = time.time()
        periods = self.clock.at(now)
        scopes = self.scopes(key, periods)
        if not scopes:
            return None
        prompt = plan.demand.prompt_tokens
        allowance = tokens.completion_allowance(
            plan.route.operation, plan.payload, max(d.max_output_tokens for d in plan.candidates)
        )
        ask = Ask(
            scopes, prompt + allowance, self.cost_bound(plan.model, ctx.started_at, prompt, allowance), periods.ids
        )
        try:
            if self.synchronous:
                result = self.state.admit_now(ask, now)  # type: ignore[attr-defined]
            else:
                result = await self.admit_carrying(ask, now)
            for _ in range(3):  # a reset landing meanwhile can ask once more
                if not isinstance(result, Unseeded):
                    break
                ask.seeds = {**(ask.seeds or {}), **await self.seeds(result.scopes, periods)}
                result = await self.state.admit(ask)
        except Exception as exc:
            log.warning("quota state unavailable for request %s: %s", ctx.request_id, exc)
            raise unavailable() from None
        if isinstance(result, Unseeded):
            raise unavailable()
        ctx.response_headers = limit_headers(result.windows, now, self.window_seconds)
        if isinstance(result, Refused):
            # Nothing was served: the record bills nothing (the preflight's estimate is not usage).
            ctx.prompt_tokens, ctx.tokens_estimated = 0, False
            raise self.refusal(result, key, periods, ask.tokens)
        assert isinstance(result, Admitted)
        return Admission(result.reservation, key, periods)

    async def admit_carrying(self, ask: Ask, now: float) -> Admitted | Refused | Unseeded:
        """One state call that also settles the tenant's queued settlements (Redis)."""
        carry = getattr(self.state, "admit_carrying", None)
        carried = self.upkeep.take(ask.scopes[0].tenant_id) if carry is not None else []
        if not carried:
            return await self.state.admit(ask, now)
        assert carry is not None
        try:
            result, settled = await carry(ask, now, [s.item for s in carried])
        except BaseException:
            # Whether the script ran is unknown: the reservations lapse with their leases rather
            # than risk counting a request twice; reconciliation restores what they used.
            log.warning("%d quota settlements were lost with a failed admission", len(carried))
            raise
        self.upkeep.carried(carried, settled)
        return result

    def scopes(self, key: KeyView, periods: Periods) -> tuple[ScopeLimits, ...]:
        """The key's scopes, cached while the snapshot keeps this KeyView and the day lasts."""
        entry = self._scopes.get(id(key))
        if entry is not None and entry[0] is key and entry[1] == periods.ids.day:
            return entry[2]
        if len(self._scopes) >= SCOPE_CACHE_SIZE:
            self._scopes.clear()
        scopes = scopes_for(key, periods)
        self._scopes[id(key)] = (key, periods.ids.day, scopes)  # holding the key keeps its id unique
        return scopes

    def cost_bound(self, model: str, started_at: datetime, prompt: int, allowance: int) -> int:
        """The most the request can cost, in COST_UNITS, at the price in effect when it started.

        Float arithmetic on the price's rates, rounded up and one unit more: an upper bound is
        what is needed here, not the exact cost (settlement uses the record's exact one).
        """
        price = price_for(snapshot.current().prices_by_model.get(model, ()), started_at)
        if price is None:
            return 0
        rates = self._rates.get(id(price))
        if rates is None or rates[0] is not price:
            # Per million tokens -> COST_UNITS (10^-8) per token: x 10^8 / 10^6.
            rates = (price, float(price.input_per_million) * 100.0, float(price.output_per_million) * 100.0)
            self._rates[id(price)] = rates
        return math.ceil(prompt * rates[1] + allowance * rates[2]) + 1

    def refusal(self, refused: Refused, key: KeyView, periods: Periods, requested: int) -> errors.GatewayError:
        """The 429 for a refusal: a budget as OpenAI's ``insufficient_quota`` (never retried), a
        rate limit with the wait in ``retry-after-ms`` / ``Retry-After``."""
        if refused.is_budget:
            return errors.GatewayError(
                429,
                budget_refusal_message(refused, key, periods),
                type="insufficient_quota",
                code="insufficient_quota",
                outcome="rate_limited",
                headers=[(b"x-should-retry", b"false")],
                reason=refusal_reason(refused),
            )
        if refused.retry_after is None:  # larger than the TPM: waiting cannot help
            headers = [(b"x-should-retry", b"false")]
        else:
            headers = errors.retry_headers(min(refused.retry_after, MAX_RETRY_AFTER))
        return errors.GatewayError(
            429,
            rate_refusal_message(refused, key, requested),
            type="tokens" if refused.limit == TPM else "requests",
            code=refusal_code(refused),
            outcome="rate_limited",
            headers=headers,
            reason=refusal_reason(refused),
        )

    async def seeds(self, scopes: list[ScopeLimits], periods: Periods) -> dict[tuple[str, int], Seed]:
        """The scopes' use from the usage records, read in a worker thread; requests asking for the
        same scope meanwhile share one read."""
        futures: dict[tuple[str, int], asyncio.Future[dict[tuple[str, int], Seed]]] = {}
        missing = []
        for scope in scopes:
            pending = self._seeding.get(_seed_ref(scope, periods))
            if pending is None:
                missing.append(scope)
            else:
                futures[scope.ref] = pending
        if missing:
            future = self.database.submit(quota_usage_totals, missing, periods)
            for scope in missing:
                ref = _seed_ref(scope, periods)
                self._seeding[ref] = futures[scope.ref] = future
                future.add_done_callback(functools.partial(self._seeded, ref))
        out: dict[tuple[str, int], Seed] = {}
        for scope in scopes:
            totals = await asyncio.shield(futures[scope.ref])
            out[scope.ref] = totals.get(scope.ref, Seed())
        return out

    def _seeded(self, ref: tuple[Any, ...], _: asyncio.Future[Any]) -> None:
        self._seeding.pop(ref, None)

    # -- settlement ------------------------------------------------------------------------------

    def settle(self, ctx: Any, record: dict[str, Any]) -> None:
        """Replace the request's reservation with what its usage record says it used: once, never
        blocking and never raising (on Redis it is queued; a settlement that fails leaves the
        reservation to lapse with its lease)."""
        admission: Admission | None = ctx.admission
        if admission is None or admission.settled:
            return
        admission.settled = True
        used_tokens = int(record["prompt_tokens"]) + int(record["completion_tokens"])
        used_cost = cost_units(record["cost"])
        # A request no upstream took (no capacity, the client gone first) leaves the windows too.
        dispatched = ctx.deployment_id is not None
        if not self.synchronous:
            self.upkeep.settle_later(admission, used_tokens, used_cost, dispatched)
            return
        try:
            uses = self.state.settle_now(  # type: ignore[attr-defined]
                admission.reservation, used_tokens, used_cost, dispatched=dispatched
            )
        except Exception:
            log.exception("could not settle the quota reservation of %s", ctx.request_id)
            return
        if uses:
            self.upkeep.notice(uses, admission)

    async def drain(self) -> None:
        """Wait for settlements and alert hand-offs under way (tests)."""
        await self.upkeep.drain()

    async def aclose(self) -> None:
        await self.upkeep.close()
        self.database.stop()
        serve_locally = getattr(self.state, "serve_locally", None)
        if serve_locally is not None:
            serve_locally(False)
        await self.state.aclose()


def _seed_ref(scope: ScopeLimits, periods: Periods) -> tuple[Any, ...]:
    return (scope.ref, scope.day_stamp, scope.month_stamp, periods.ids)
