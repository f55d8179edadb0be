"""What a gateway process runs beside the requests: the snapshot refresher, the usage flusher,
the dispatcher, the upstream client and the Azure AD token client. Started on the first request
(or the ASGI lifespan startup, where the server has one) and stopped on shutdown, after the
requests in flight (up to the grace period), flushing the usage buffer.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os

import redis.asyncio
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from billing.usage_sink import get_sink
from gateway import snapshot, workers
from gateway.balancer import make_state
from gateway.balancer.calibration import Calibration, CalibrationSync
from gateway.balancer.failures import FailureNotes
from gateway.balancer.policy import BalancedDispatcher
from gateway.balancer.redis_state import RedisState
from gateway.observability.dispatch import ObservedDispatcher, dispatcher_observed
from gateway.observability.service import observability_start, observability_stop
from gateway.proxy.admission import Admitter
from gateway.proxy.pressure import pressure
from gateway.proxy.shared_state import GuardedDispatcher
from gateway.snapshot.refresher import SnapshotRefresher
from gateway.snapshot.version import VersionMirror, config_version_read

log = logging.getLogger(__name__)


_heap_collected = False


class InFlight:
    """How many proxied requests this process is serving, so that shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count <= 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most ``timeout`` seconds; True if none is left."""
        if self.count <= 0:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._idle = None


class Runtime:
    """The per-process services of the request path. One instance: ``runtime``."""

    def __init__(self) -> None:
        self.started = False
        self._lock: asyncio.Lock | None = None
        self.refresher: SnapshotRefresher | None = None
        self.dispatcher: GuardedDispatcher | ObservedDispatcher | None = None
        self.redis: redis.asyncio.Redis | None = None
        self.admitter: Admitter | None = None
        self.reconciler: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = InFlight()

    @property
    def quotas(self) -> Admitter:
        """Quota admission (``gateway.proxy.admission``); exists once the runtime started."""
        assert self.admitter is not None, "the gateway runtime has not started"
        return self.admitter

    async def ensure_started(self) -> None:
        """Start everything once per event loop; later calls return at once."""
        if self.started and self.loop is asyncio.get_running_loop():
            return
        if self._lock is None or self.loop is not asyncio.get_running_loop():
            # A new loop (tests start several): forget state bound to the old one.
            self._lock = asyncio.Lock()
            self.loop = asyncio.get_running_loop()
            self.started = False
        async with self._lock:
            if self.started:
                return
            await self._start()
            self.started = True
            # Everything loaded so far (Django, the snapshot, encodings) lives as long as the
            # process. Freezing it keeps full collections from scanning it again and again:
            # under load they ran every ~0.7 s for 40-65 ms each, freeing nothing. The collection
            # before it only on a process's first start: a test suite starts a runtime per event
            # loop, and a full collection of its heap each time cost 0.2-0.5 s per test.
            global _heap_collected
            if not _heap_collected:
                gc.collect()
                _heap_collected = True
            gc.freeze()

    async def _start(self) -> None:
        refuse_several_workers_without_redis()
        g = settings.GATEWAY
        # A runtime from an earlier event loop (tests start several) must leave nothing behind.
        self.redis = None
        mirror = None
        if settings.REDIS_URL:
            from gateway.redis_clients import redis_async_client

            self.redis = redis_async_client()
            mirror = VersionMirror(self.redis)
        self.refresher = SnapshotRefresher(
            g["SNAPSHOT_POLL_SECONDS"],
            config_version_read,
            mirror=mirror,
            database_seconds=g["SNAPSHOT_DB_POLL_SECONDS"],
        )
        await self.refresher.load_now()  # also loads the tiktoken encodings its deployments use
        self.refresher.start()
        get_sink().start()
        self.dispatcher = dispatcher_observed(GuardedDispatcher(make_dispatcher(self.redis)))
        await observability_start(self.refresher)
        self.admitter = make_admitter(self.redis)
        self.reconciler = asyncio.get_running_loop().create_task(
            self.admitter.upkeep.run_reconciler(g["QUOTA_RECONCILE_SECONDS"]), name="quota-reconciler"
        )
        pressure.configure(g["OVERLOAD_LAG_MS"] / 1000.0, g["STREAM_COALESCE_MS"] / 1000.0)
        pressure.start()
        log.info("gateway runtime started (config v%s, redis=%s)", snapshot.current().version, bool(self.redis))

    async def drain(self, grace: float) -> None:
        """Wait for the requests in flight to finish, at most ``grace`` seconds.

        uvicorn already waits for open connections (``--timeout-graceful-shutdown``) before the
        lifespan shutdown; this covers servers that do not, and the requests uvicorn cancelled
        at its deadline, whose usage records are made as they unwind.
        """
        if not await self.in_flight.wait_idle(grace):
            log.warning("shutting down with %d requests still in flight after %.0fs", self.in_flight.count, grace)

    async def shutdown(self) -> None:
        """Stop background work and write out buffered usage. Safe to call more than once."""
        if not self.started:
            await get_sink().stop()  # writes (or spills) whatever was recorded
            return
        self.started = False
        await pressure.stop()
        if self.refresher is not None:
            await self.refresher.stop()
        if self.reconciler is not None:
            self.reconciler.cancel()
            await asyncio.wait({self.reconciler}, timeout=5)
            self.reconciler = None
        if self.admitter is not None:
            await self.admitter.aclose()
        await get_sink().stop()
        await observability_stop()
        from gateway.proxy import azure_ad, upstream

        await upstream.aclose_client()
        await azure_ad.aclose_http_client()
        if self.dispatcher is not None and hasattr(self.dispatcher, "aclose"):
            await self.dispatcher.aclose()
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        # Undo start's gc.freeze(): what this runtime leaves behind (a test suite starts one per
        # event loop) must stay collectable, or the database connections it opened never close.
        gc.unfreeze()
        log.info("gateway runtime stopped")


def refuse_several_workers_without_redis() -> None:
    """Raise ``ImproperlyConfigured`` (the server then refuses to start) when this process is one of
    several workers (``WEB_CONCURRENCY``, or ``--workers`` on the server's command line) and
    ``REDIS_URL`` is not set: their limits, queues and breakers would not be shared."""
    try:
        asked = workers.asked_workers(os.environ, workers.server_command_line())
    except workers.WorkersRefused as refused:
        raise ImproperlyConfigured(str(refused)) from None
    problem = workers.refusal(asked or 1, settings.REDIS_URL)
    if problem:
        log.error("refusing to start: %s", problem)
        raise ImproperlyConfigured(problem)


def make_dispatcher(redis_client=None) -> BalancedDispatcher:
    """The capacity-aware balancer on this process's state backend (Redis when configured)."""
    g = settings.GATEWAY
    state = make_state(
        settings.REDIS_URL,
        minute=g["WINDOW_MINUTE_SECONDS"],
        prefix=g["BALANCER_REDIS_PREFIX"],
        redis_timeout=settings.REDIS_TIMEOUT_SECONDS,
        breaker_failures=g["BREAKER_FAILURES"],
        breaker_open_seconds=g["BREAKER_OPEN_SECONDS"],
        queue_max_depth=g["QUEUE_MAX_DEPTH"],
        guard_floor=g["WINDOW_GUARD_FLOOR_MS"] / 1000.0,
    )
    if isinstance(state, RedisState):  # a deployment's keys are in its model's slot
        state.model_of = deployment_model
    calibration = Calibration(state.config.minute)
    sync = None
    if redis_client is not None:
        # Every second with Azure's minute (what another process reserved a second ago is close
        # enough to now within a 60 s window); proportionally faster with a test's short minute.
        interval = min(max(state.config.minute / 60.0, 0.05), 1.0)
        sync = CalibrationSync(calibration, redis_client, g["BALANCER_REDIS_PREFIX"], interval)
        sync.start()
    return BalancedDispatcher(
        state,
        notes=FailureNotes(redis_client, g["BALANCER_REDIS_PREFIX"]),
        calibration=calibration,
        calibration_sync=sync,
    )


def deployment_model(deployment_id: int) -> str | None:
    """The model a deployment serves, from the configuration (None: not configured)."""
    for d in snapshot.current().all_deployments:
        if d.id == deployment_id:
            return d.model
    return None


def make_admitter(redis_client=None) -> Admitter:
    """Quota admission on this process's state: Redis (sharing the runtime's client) when configured."""
    from tenants.quota_state import QuotaStateConfig
    from tenants.quota_state.memory import MemoryQuotaState
    from tenants.quota_state.redis import RedisQuotaState, fast_client

    g = settings.GATEWAY
    config = QuotaStateConfig(window=g["QUOTA_WINDOW_SECONDS"], hold_seconds=g["QUOTA_HOLD_SECONDS"])
    state: RedisQuotaState | MemoryQuotaState
    if redis_client is not None:
        fast = fast_client(str(settings.REDIS_URL), settings.REDIS_TIMEOUT_SECONDS, redis_client)
        state = RedisQuotaState(redis_client, config, prefix=g["BALANCER_REDIS_PREFIX"], fast=fast)
    else:
        state = MemoryQuotaState(config)
        state.serve_locally()  # the admin, served by this process too, shows its counters
    return Admitter(state, g["BUDGET_TIMEZONE"], g["QUOTA_WINDOW_SECONDS"], redis=redis_client)


runtime = Runtime()
