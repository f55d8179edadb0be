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
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db import close_old_connections

from billing.prices import cost_of, price_for
from gateway import snapshot
from gateway.proxy import errors, tokens
from gateway.snapshot.types import KeyView
from tenants.alerts import AlertNotice, alert_raise
from tenants.quota_state import (
    KEY,
    Admitted,
    Ask,
    BudgetUse,
    QuotaState,
    Refused,
    Reservation,
    ScopeLimits,
    Seed,
    Unseeded,
)
from tenants.quota_state.contract import COST_UNITS, MONTHLY_COST, TPM
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
    thresholds_reached,
)
from tenants.selectors import quota_usage_totals

log = logging.getLogger(__name__)

# The most Retry-After says: OpenAI SDKs 1.x honour up to 60 s (newer ones 120 s).
MAX_RETRY_AFTER = 60.0


@dataclass(slots=True)
class Admission:
    """What an admitted request holds until it settles (``RequestContext.admission``)."""

    reservation: Reservation
    key: KeyView
    periods: Periods
    settled: bool = False


@dataclass(slots=True)
class _Alerts:
    """(scope, budget, threshold, period) already handed off by this process: the database decides
    for all processes, this only keeps a process from asking it on every request."""

    seen: set[tuple[Any, ...]] = field(default_factory=set)
    day: int = 0


class Admitter:
    """Admission for one gateway process, on its quota state."""

    def __init__(self, state: QuotaState, tz_name: str, window_seconds: float, redis: Any = None) -> None:
        self.state = state
        self.clock = PeriodClock(tz_name)
        self.window_seconds = window_seconds
        self.redis = redis  # for the reconciliation lock; None: in process
        self._seeding: dict[tuple[Any, ...], asyncio.Future[dict[tuple[str, int], Seed]]] = {}
        self._alerts = _Alerts()
        self._background: set[asyncio.Future[Any]] = set()

    # -- admission -------------------------------------------------------------------------------

    async def admit(self, ctx: Any, key: KeyView, plan: Any) -> Admission | None:
        """Reserve ``plan``'s demand for ``key``'s tenant and key, or raise the 429 that says which
        limit refused it. None when neither has a quota. Sets the response's rate-limit headers."""
        now = time.time()
        periods = self.clock.at(now)
        scopes = scopes_for(key, periods)
        if not scopes:
            return None
        demand = plan.demand
        allowance = tokens.completion_allowance(
            plan.route.operation, plan.payload, max(d.max_output_tokens for d in plan.candidates)
        )
        price = price_for(snapshot.current().prices_by_model.get(plan.model, ()), ctx.started_at)
        ask = Ask(
            scopes,
            demand.prompt_tokens + allowance,
            cost_units(cost_of(price, demand.prompt_tokens, 0, allowance)),
            periods.ids,
        )
        try:
            result = await self.state.admit(ask, now)
            for _ in range(3):  # a reset landing meanwhile can ask once more
                if not isinstance(result, Unseeded):
                    break
                ask.seeds = {**(ask.seeds or {}), **await self.seeds(result.scopes, periods)}
                result = await self.state.admit(ask)
        except Exception as exc:
            log.warning("quota state unavailable for request %s: %s", ctx.request_id, exc)
            raise errors.GatewayError(
                503,
                "The gateway cannot check this team's quota right now; retry shortly.",
                type="api_error",
                code="quota_state_unavailable",
                outcome="upstream_error",
                headers=errors.retry_headers(1.0),
            ) from None
        if isinstance(result, Unseeded):
            raise errors.GatewayError(
                503,
                "The gateway cannot check this team's quota right now; retry shortly.",
                type="api_error",
                code="quota_state_unavailable",
                outcome="upstream_error",
                headers=errors.retry_headers(1.0),
            )
        ctx.response_headers = limit_headers(result.windows, now, self.window_seconds)
        if isinstance(result, Refused):
            # Nothing was served: the record bills nothing (the preflight's estimate is not usage).
            ctx.prompt_tokens, ctx.tokens_estimated = 0, False
            raise self.refusal(result, key, periods, ask.tokens)
        assert isinstance(result, Admitted)
        return Admission(result.reservation, key, periods)

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
            future = asyncio.get_running_loop().run_in_executor(None, quota_usage_totals, missing, periods)
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

    async def settle(self, ctx: Any, record: dict[str, Any]) -> None:
        """Replace the request's reservation with what its usage record says it used: once, and
        never raising (a failed settlement leaves the reservation to lapse with its lease)."""
        admission: Admission | None = ctx.admission
        if admission is None or admission.settled:
            return
        admission.settled = True
        used_tokens = int(record["prompt_tokens"]) + int(record["completion_tokens"])
        used_cost = cost_units(record["cost"])
        # A request no upstream took (no capacity, the client gone first) leaves the windows too.
        dispatched = ctx.deployment_id is not None
        try:
            uses = await asyncio.shield(
                self.state.settle(admission.reservation, used_tokens, used_cost, dispatched=dispatched)
            )
        except Exception as exc:
            log.warning("could not settle the quota reservation of %s: %s", ctx.request_id, exc)
            return
        if uses:
            self.notice_thresholds(uses, admission)

    def notice_thresholds(self, uses: list[BudgetUse], admission: Admission) -> None:
        """Hand every threshold the settled use reached, and this process has not handed off this
        period yet, to a worker thread that records (and so sends) each alert once."""
        periods, key = admission.periods, admission.key
        alerts = self._alerts
        if alerts.day != periods.ids.day:
            alerts.seen.clear()
            alerts.day = periods.ids.day
        for use in uses:
            quota = key.quota if use.scope.kind == KEY else key.tenant.quota
            if not quota.alert_thresholds:
                continue
            for reached in thresholds_reached(use, quota.alert_thresholds):
                seen = (reached.scope.ref, reached.budget, reached.threshold, periods.start_of(reached.budget))
                if seen in alerts.seen:
                    continue
                alerts.seen.add(seen)
                money = reached.budget == MONTHLY_COST
                notice = AlertNotice(
                    tenant_id=key.tenant.id,
                    key_id=key.id if use.scope.kind == KEY else None,
                    budget=reached.budget,
                    threshold=reached.threshold,
                    period_start=periods.start_of(reached.budget),
                    period_end=periods.end_of(reached.budget),
                    used=Decimal(reached.used) / COST_UNITS if money else Decimal(reached.used),
                    limit=Decimal(reached.limit) / COST_UNITS if money else Decimal(reached.limit),
                )
                self._in_background(_alert_raise_in_thread, notice)

    def _in_background(self, fn: Any, *args: Any) -> None:
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._background.add(future)
        future.add_done_callback(self._background_done)

    def _background_done(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("budget alert hand-off failed", exc_info=future.exception())

    async def drain(self) -> None:
        """Wait for alert hand-offs still running (shutdown, tests)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)

    # -- reconciliation --------------------------------------------------------------------------

    async def reconcile_once(self, lock_seconds: float = 0.0) -> int:
        """Raise every seeded budget counter to what the usage records show. With Redis, one
        process per ``lock_seconds`` does it. Returns how many counters rose."""
        if self.redis is not None and lock_seconds > 0:
            prefix = getattr(self.state, "prefix", "gw")
            if not await self.redis.set(f"{prefix}:q:reconcile-lock", b"1", nx=True, px=int(lock_seconds * 1000)):
                return 0
        now = time.time()
        periods = self.clock.at(now)
        scopes: dict[tuple[str, int], ScopeLimits] = {}
        for key in snapshot.current().keys_by_hash.values():
            for scope in scopes_for(key, periods):
                if scope.budgeted:
                    scopes.setdefault(scope.ref, scope)
        if not scopes:
            return 0
        loop = asyncio.get_running_loop()
        totals = await loop.run_in_executor(None, quota_usage_totals, list(scopes.values()), periods)
        items = [(scope, totals.get(ref, Seed())) for ref, scope in scopes.items()]
        raised = await self.state.reconcile(items, periods.ids)
        if raised:
            log.info("quota reconciliation raised %d budget counters to the usage records", raised)
        return raised

    async def run_reconciler(self, interval: float) -> None:
        """Reconcile about every ``interval`` seconds until cancelled (jittered, so processes spread)."""
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await self.reconcile_once(lock_seconds=interval * 0.8)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("quota reconciliation failed; trying again later", exc_info=True)

    async def aclose(self) -> None:
        await self.drain()
        serve_locally = getattr(self.state, "serve_locally", None)
        if serve_locally is not None:
            serve_locally(False)
        await self.state.aclose()


def _alert_raise_in_thread(notice: AlertNotice) -> None:
    close_old_connections()  # a worker thread's connection may have outlived the database's patience
    alert_raise(notice)


def _seed_ref(scope: ScopeLimits, periods: Periods) -> tuple[Any, ...]:
    return (scope.ref, scope.day_stamp, scope.month_stamp, periods.ids)
