"""What admission leaves to background work: settling on Redis in batches, handing budget alerts
off the event loop, and reconciling budget counters with the usage records.

Settling happens after the response went out, so on Redis it need not cost a round trip of its
own: settlements queue here, per tenant, and the tenant's next admission carries them in its own
script call (``RedisQuotaState.admit_carrying``), so that under steady traffic a request costs
one state call in all. What no admission picked up within ``CARRY_SECONDS`` one task sends, one
script call per tenant and batch (``settle_many``). Until a settlement lands, the reservation
keeps holding the budget and the window (the safe side).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from gateway import snapshot
from gateway.database_thread import DatabaseThread
from tenants.alerts import AlertNotice, alert_raise
from tenants.quota_state import KEY, BudgetUse, QuotaState, Reservation, ScopeLimits, Seed
from tenants.quota_state.contract import COST_UNITS, MONTHLY_COST
from tenants.quotas import PeriodClock, scopes_for, thresholds_reached
from tenants.selectors import quota_usage_totals

if TYPE_CHECKING:
    from gateway.proxy.admission import Admission

log = logging.getLogger(__name__)

BATCH_LIMIT = 200  # reservations per script call: keeps each call short for Redis
CARRY_SECONDS = 0.02  # how long a settlement waits for an admission of its tenant to carry it


@dataclass(slots=True)
class _Settlement:
    admission: Admission
    tokens: int
    cost: int
    dispatched: bool

    @property
    def item(self) -> tuple[Reservation, int, int, bool]:
        return (self.admission.reservation, self.tokens, self.cost, self.dispatched)


@dataclass(slots=True)
class _Alerts:
    """(scope, budget, threshold, period) already handed off by this process: the database decides
    for all processes, this only keeps a process from asking it on every request."""

    seen: set[tuple[Any, ...]] = field(default_factory=set)
    day: int = 0


class QuotaUpkeep:
    def __init__(
        self, state: QuotaState, clock: PeriodClock, redis: Any = None, database: DatabaseThread | None = None
    ) -> None:
        self.state = state
        self.clock = clock
        self.redis = redis  # for the reconciliation lock; None: in process
        self.database = database or DatabaseThread("quota-db")  # reconciliation's reads
        # Alerts write their record and call webhooks: apart, so a slow webhook never delays seeding.
        self.alerts_thread = DatabaseThread("quota-alerts")
        self._pending: dict[int, list[_Settlement]] = {}  # per tenant id
        self._wakeup: asyncio.Event | None = None
        self._settler: asyncio.Task | None = None
        self._flushing: asyncio.Lock | None = None
        self._alerts = _Alerts()
        self._background: set[asyncio.Future[Any]] = set()

    # -- settlements ------------------------------------------------------------------------------

    def settle_later(self, admission: Admission, tokens: int, cost: int, dispatched: bool) -> None:
        """Queue a settlement; never blocks, never raises."""
        tenant_id = admission.reservation.scopes[0].tenant_id
        self._pending.setdefault(tenant_id, []).append(_Settlement(admission, tokens, cost, dispatched))
        if self._settler is None or self._settler.done():
            self._wakeup = asyncio.Event()
            self._settler = asyncio.get_running_loop().create_task(self._settle_forever(), name="quota-settler")
        assert self._wakeup is not None
        self._wakeup.set()

    def take(self, tenant_id: int) -> list[_Settlement]:
        """The tenant's queued settlements (up to a batch), for its next admission to carry."""
        pending = self._pending.get(tenant_id)
        if not pending:
            return []
        if len(pending) <= BATCH_LIMIT:
            del self._pending[tenant_id]
            return pending
        taken, self._pending[tenant_id] = pending[:BATCH_LIMIT], pending[BATCH_LIMIT:]
        return taken

    def carried(self, settlements: list[_Settlement], results: list[list[BudgetUse]]) -> None:
        """An admission carried these settlements: note the thresholds their use reached."""
        for settlement, uses in zip(settlements, results, strict=True):
            if uses:
                self.notice(uses, settlement.admission)

    async def _settle_forever(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(CARRY_SECONDS)  # time for admissions to carry them instead
            await self.flush()

    async def flush(self) -> None:
        """Send every queued settlement now (after the batch already under way, if any)."""
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            while self._pending:
                pending, self._pending = self._pending, {}
                chunks = [
                    group[i : i + BATCH_LIMIT] for group in pending.values() for i in range(0, len(group), BATCH_LIMIT)
                ]
                await asyncio.gather(*(self._settle_chunk(chunk) for chunk in chunks))

    async def _settle_chunk(self, chunk: list[_Settlement]) -> None:
        try:
            results = await self.state.settle_many([s.item for s in chunk])
        except Exception as exc:
            # The reservations keep holding until their lease lapses; reconciliation corrects the rest.
            log.warning("could not settle %d quota reservations: %s", len(chunk), exc)
            return
        self.carried(chunk, results)

    async def close(self) -> None:
        """Send what is queued and stop the settler (shutdown)."""
        await self.flush()
        if self._settler is not None:
            self._settler.cancel()
            await asyncio.wait({self._settler}, timeout=5)
            self._settler = None
        await self.drain()
        self.alerts_thread.stop()

    # -- alerts -----------------------------------------------------------------------------------

    def notice(self, uses: list[BudgetUse], admission: Admission) -> None:
        """Hand every threshold the settled use reached, and this process has not handed off this
        period yet, to a worker thread that records (and so sends) each alert once."""
        key, periods = admission.key, admission.periods
        alerts = self._alerts
        for use in uses:
            quota = key.quota if use.scope.kind == KEY else key.tenant.quota
            if not quota.alert_thresholds:
                continue
            if alerts.day != periods.ids.day:
                alerts.seen.clear()
                alerts.day = periods.ids.day
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
                self._in_background(alert_raise, notice)

    def _in_background(self, fn: Any, *args: Any) -> None:
        future = self.alerts_thread.submit(fn, *args)
        self._background.add(future)
        future.add_done_callback(self._background_done)

    def _background_done(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("budget alert hand-off failed", exc_info=future.exception())

    async def drain(self) -> None:
        """Wait for settlements and alert hand-offs still under way (shutdown, tests)."""
        await self.flush()
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)

    # -- reconciliation ---------------------------------------------------------------------------

    async def reconcile_once(self, lock_seconds: float = 0.0) -> int:
        """Raise every seeded budget counter to what the usage records show. With Redis, one
        process per ``lock_seconds`` does it. Returns how many counters rose."""
        if self.redis is not None and lock_seconds > 0:
            prefix = getattr(self.state, "prefix", "gw")
            if not await self.redis.set(f"{prefix}:q:reconcile-lock", b"1", nx=True, px=int(lock_seconds * 1000)):
                return 0
        periods = self.clock.at(time.time())
        scopes: dict[tuple[str, int], ScopeLimits] = {}
        for key in snapshot.current().keys_by_hash.values():
            for scope in scopes_for(key, periods):
                if scope.budgeted:
                    scopes.setdefault(scope.ref, scope)
        if not scopes:
            return 0
        totals = await self.database.run(quota_usage_totals, list(scopes.values()), periods)
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
