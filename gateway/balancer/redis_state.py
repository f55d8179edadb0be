"""The Redis backend: the same state shared by every gateway process.

Each operation is one Lua script call (``lua/*.lua``, with ``lua/lib.lua`` prepended), so it is
atomic across processes and costs one round trip: ``try_acquire`` reads, decides and reserves
in one step, ``renew`` moves a late grant in one step. Settlements go off the response path
(``settle_later``): they ride along this process's next acquire, or go in one batched call
within ``SETTLE_DELAY_SECONDS``. Windows are bucket counters (contract.py, "Window"), a few hash
fields per window instead of a per-request log, so a call costs a handful of commands. Every
key carries an expiry, renewed at most once a minute, so a deployment or queue that is no
longer used leaves nothing behind.

Faults: every call is bounded (``gateway.redis_clients``: connect and reply timeouts, one retry
on a broken connection). A call that fails raises ``StateUnavailable``. When Redis did not answer
(connection refused or broken, timeout, still loading), for ``UNAVAILABLE_HOLD_SECONDS`` after it
every call fails the same way at once, without waiting on Redis again: a request's exit from the queue after its failed acquire, and the requests that
arrive meanwhile, are answered at once. The first call after the hold tries Redis again, so
the state recovers by itself when Redis answers.

Time is the caller's ``time.time()``: gateway hosts must keep their clocks in sync (NTP keeps
them within a few ms, which the window guard absorbs). Keys are passed in ``KEYS``.

Redis Cluster: every key carries its *model* as the hash tag (``<prefix>:bal:{m:<model>}:...``):
a model's queue and the deployments serving it (a deployment serves one model) live in one
slot, so an acquire, which reads the queue and every candidate, stays one atomic script call.
Settlements ride along only an acquire of their own model's slot (on one Redis, any acquire),
and the batched ones go in one call per model. A deployment's model comes from the candidates
this state was given (``Capacity.model``; one without a model is tagged ``{m:}``): signals and
settlements follow a grant, so the state has seen it; for a deployment it has not seen, it asks
``model_of`` (the gateway's: the configuration snapshot). The price: one model's traffic is one
slot, on one node; models spread over the nodes, a single hot model does not.

Waking waiters: whenever a queue's head changes because tickets left (served, gave up,
lease lapsed), the script PUBLISHes ``"<queue>\n<ticket>"`` on ``<prefix>:bal:wake``; one
listener task per process (started by the first enqueue) sets that ticket's event if
it waits here. So a waiter behind the head sleeps until its turn instead of polling, and a
queue drains at the speed of capacity, not of polling. A ticket evicted from a full queue by
a better-priority arrival is announced the same way, so its waiter learns it at once. Freed
capacity is not announced: the head polls at least every ``poll_max``. A lost message
(listener reconnecting) only costs a wait of up to a third of the lease, after which the
waiter polls anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from redis import ConnectionError as RedisConnectionError
from redis import RedisError
from redis import TimeoutError as RedisTimeoutError
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException

from gateway.balancer.breaker import CLOSED, HALF_OPEN, OPEN
from gateway.balancer.contract import (
    BalancerState,
    Capacity,
    Denied,
    Grant,
    Reason,
    StateConfig,
    StateUnavailable,
    build_status,
    check_ticket,
    new_id,
    window_status,
)
from gateway.redis_clients import is_cluster_client
from gateway.snapshot.types import SKU_PROVISIONED, SKU_STANDARD

_LUA = Path(__file__).with_name("lua")
log = logging.getLogger(__name__)

# After a failed call, how long every call fails at once instead of waiting on Redis again.
UNAVAILABLE_HOLD_SECONDS = 0.5
# What callers are told to wait before asking again (clients see it as Retry-After).
UNAVAILABLE_RETRY_AFTER = 1.0
# settle_later: how long a settlement waits for an acquire to ride along before it goes on its
# own (with the others queued meanwhile), and how many make a call by themselves.
SETTLE_DELAY_SECONDS = 0.02
SETTLE_BATCH_MAX = 64


@cache
def _source(name: str) -> str:
    return (_LUA / "lib.lua").read_text() + "\n" + (_LUA / f"{name}.lua").read_text()


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


class RedisState(BalancerState):
    """``BalancerState`` in Redis. Build with ``from_url`` or around an existing client."""

    wakes_on_turn = True
    wakes_on_capacity = False

    def __init__(
        self,
        redis: Redis,
        config: StateConfig | None = None,
        *,
        prefix: str = "gw",
        owns_client: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(config or StateConfig())
        self._redis = redis
        self._owns_client = owns_client
        self._prefix = f"{prefix}:bal"
        self._rng = rng or random.Random()
        self._scripts = {
            name: redis.register_script(_source(name))
            for name in ("acquire", "settle", "renew", "signal", "queue", "status")
        }
        cfg = self.config
        self._config_args = [
            repr(cfg.retention),
            repr(cfg.upstream_age),
            str(cfg.breaker_failures),
            repr(cfg.probe_seconds),
            repr(cfg.inflight_ttl),
            repr(cfg.key_ttl),
            repr(cfg.breaker_open_seconds),
        ]
        self._candidate_args: dict[tuple[int, int, int, float], list[str]] = {}
        self._dep_keys_cache: dict[tuple[int, str], list[str]] = {}
        self._models: dict[int, str] = {}  # deployment id -> the model (hash tag) it was last seen with
        # Where the model of a deployment not seen yet comes from (None: it has none, ``{m:}``).
        self.model_of: Callable[[int], str | None] | None = None
        self._settle_args_cache: dict[tuple, list[str]] = {}
        # On a cluster, keys of different models live in different slots: settlements are kept
        # per model (on one Redis, all in group "": any acquire carries them all).
        self._cluster = is_cluster_client(redis)
        # Settlements waiting to ride along the next acquire (settle_later): group -> [keys, args, count].
        self._later: dict[str, list] = {}
        self._later_count = 0
        self._flush_task: asyncio.Task | None = None
        self._channel = f"{self._prefix}:wake"
        self._waiters: dict[str, asyncio.Event] = {}  # ticket -> event, for tickets waiting here
        self._listener: asyncio.Task | None = None
        self._subscribed = asyncio.Event()
        self._unavailable_until = 0.0  # time.monotonic() before which calls fail at once
        self._unavailable_reason = ""
        self.available = True  # what the last call found

    @classmethod
    def from_url(
        cls, url: str, config: StateConfig | None = None, *, prefix: str = "gw", timeout: float | None = None
    ) -> RedisState:
        """A state on its own client, with bounded waits (``timeout``: connect and reply, seconds)."""
        from gateway.redis_clients import redis_async_client

        client = redis_async_client(url, timeout=timeout, decode_responses=True)
        return cls(client, config, prefix=prefix, owns_client=True)

    # -- calls ---------------------------------------------------------------------------

    async def _run(self, script: str, keys: list[str], args: list[str]):
        """One script call, or ``StateUnavailable`` within the client's timeout (at once during
        the hold that follows a failure)."""
        if self._unavailable_until and time.monotonic() < self._unavailable_until:
            raise StateUnavailable(self._unavailable_reason, UNAVAILABLE_RETRY_AFTER)
        try:
            result = await self._scripts[script](keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError, RedisClusterException) as exc:
            # (RedisClusterException: the cluster client found no node to ask, or no owner of the
            # slot; it is not a RedisError.)
            self._unavailable_until = time.monotonic() + UNAVAILABLE_HOLD_SECONDS
            self._unavailable_reason = f"Redis did not answer ({type(exc).__name__}: {exc})"
            if self.available:
                self.available = False
                log.error("balancer state unavailable: %s; requests are refused until it answers", exc)
            raise StateUnavailable(self._unavailable_reason, UNAVAILABLE_RETRY_AFTER) from exc
        except RedisError as exc:
            # Redis answered, with an error (out of memory, read-only replica, a script error):
            # this call fails, the next ones still try.
            log.error("balancer state call %s failed: %s", script, exc)
            raise StateUnavailable(f"Redis refused the call ({type(exc).__name__}: {exc})") from exc
        if not self.available:
            self.available = True
            self._unavailable_until = 0.0
            log.warning("balancer state available again")
        return result

    # -- keys and arguments --------------------------------------------------------------

    def _dep_keys(self, deployment_id: int, model: str | None = None) -> list[str]:
        """The deployment's keys, in its model's slot (``model``: as given now; None: as last seen)."""
        if model is None:
            model = self._models.get(deployment_id)
            if model is None:
                model = self._models[deployment_id] = (self.model_of and self.model_of(deployment_id)) or ""
        ref = (deployment_id, model)
        keys = self._dep_keys_cache.get(ref)
        if keys is None:
            base = f"{self._prefix}:{{m:{model}}}:d:{int(deployment_id)}"
            keys = self._dep_keys_cache[ref] = [f"{base}:s", f"{base}:b", f"{base}:infl"]
        return keys

    def _queue_keys(self, queue: str) -> list[str]:
        base = f"{self._prefix}:{{m:{queue}}}:q"
        return [f"{base}:z", f"{base}:t", f"{base}:l", f"{base}:m", f"{base}:r", f"{base}:e"]

    def _model_of(self, c: Capacity) -> str:
        model = getattr(c, "model", "") or ""
        if self._models.get(c.id) != model:
            self._models[c.id] = model
        return model

    def _cand_args(self, c: Capacity) -> list[str]:
        key = (c.rpm, c.tpm, c.weight, getattr(c, "guard", 0.0))
        args = self._candidate_args.get(key)
        if args is None:
            if len(self._candidate_args) > 4096:
                self._candidate_args.clear()  # bounded: measured guards come in 0.5 ms steps
            plan = self.planner.plan_for(c)
            args = [str(int(c.weight)), str(plan.request_ref), str(plan.token_ref), str(len(plan.windows))]
            for w in plan.windows:
                args += [w.name, w.unit, repr(w.span), str(w.limit), repr(w.bucket)]
            self._candidate_args[key] = args
        return args

    def _candidates(self, candidates: Sequence[Capacity]) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        args = [str(len(candidates))]
        for c in candidates:
            keys += self._dep_keys(c.id, self._model_of(c))
            args += self._cand_args(c)
        return keys, args

    # -- acquisition ---------------------------------------------------------------------

    async def _acquire(self, queue, ticket_id, candidates, demand, now) -> Grant | Denied:
        demand = int(demand)
        rid = new_id()
        ckeys, cargs = self._candidates(candidates)
        keys = (self._queue_keys(queue) + ckeys) if queue is not None else ckeys
        riding = 0
        if self._later_count:
            group = (
                "" if not self._cluster else (queue if queue is not None else self._models.get(candidates[0].id, ""))
            )
            later_keys, later_args, riding = self._take_later(group)
            keys = keys + later_keys
            cargs = cargs + later_args
        args = [
            repr(_now(now)),
            str(demand),
            rid,
            repr(self._rng.random()),
            "queue" if queue is not None else "raw",
            ticket_id or "",
            self._channel,
            queue or "",
            *self._config_args,
            *cargs,
        ]
        try:
            res = await self._run("acquire", keys, args)
        except StateUnavailable as exc:
            if riding:
                _dropped_settlements(riding, exc)
            raise
        if ticket_id is not None:
            if _s(res[0]) == "G" or _s(res[2]) == Reason.NOT_QUEUED:
                self._waiters.pop(ticket_id, None)  # served or gone: nothing more to wake
            elif _s(res[2]) == Reason.EVICTED:
                # Gone too; until its waiter leaves, a wait_change returns at once (as in memory).
                self._waiters.setdefault(ticket_id, asyncio.Event()).set()
        return self._result(res, candidates, demand, rid)

    def _result(self, res, candidates, demand: int, rid: str) -> Grant | Denied:
        if _s(res[0]) == "G":
            c = candidates[int(res[1]) - 1]
            return Grant(
                c.id,
                rid,
                demand,
                float(res[3]),
                getattr(c, "sku", SKU_STANDARD),
                float(res[4]),
                _s(res[5]) == "1",
                self.planner.plan_for(c).windows,
            )
        return Denied(float(res[1]), Reason(_s(res[2])))

    async def try_acquire(self, candidates, demand_tokens, now=None):
        return await self._acquire(None, None, candidates, demand_tokens, now)

    async def try_acquire_queued(self, queue, ticket_id, candidates, demand_tokens, now=None):
        if ticket_id is not None:
            check_ticket(ticket_id)
        return await self._acquire(queue, ticket_id, candidates, demand_tokens, now)

    def _finish_args(self, mode: str, grant: Grant, actual: int, sku: str | None, now, ok: bool) -> list[str]:
        provisioned = (sku or grant.sku) == SKU_PROVISIONED
        keep = self.config.retention_window
        return [
            mode,
            grant.reservation_id,
            str(int(actual)),
            "1" if provisioned else "0",
            repr(_now(now)),
            str(int(grant.tokens)),
            repr(grant.reserved_at),
            "1" if ok else "0",
            repr(keep.span),
            repr(keep.bucket),
            *self._settle_args(grant.windows),
        ]

    async def _finish(self, mode: str, grant: Grant, actual: int, sku: str | None, now, ok: bool = False) -> bool:
        args = self._finish_args(mode, grant, actual, sku, now, ok)
        (done,) = await self._run("settle", self._dep_keys(grant.deployment_id), args)
        return bool(done)

    async def settle_later(self, grant, actual_tokens, sku=None, *, ok=False, now=None):
        """Queue the settlement: it rides along this process's next acquire (any model), or goes
        in one batched call within ``SETTLE_DELAY_SECONDS``. So a request's own settlement costs
        no round trip on its response path, and under load hardly any at all (measured below).
        Until it lands, the reservation keeps holding the windows as reserved: the safe side."""
        keys = self._dep_keys(grant.deployment_id)
        group = self._models[grant.deployment_id] if self._cluster else ""
        batch = self._later.get(group)
        if batch is None:
            batch = self._later[group] = [[], [], 0]
        batch[0] += keys
        batch[1] += self._finish_args("settle", grant, actual_tokens, sku, now, ok)
        batch[2] += 1
        self._later_count += 1
        if self._later_count >= SETTLE_BATCH_MAX:
            self._start_flush(0.0)
        elif self._flush_task is None:
            self._start_flush(SETTLE_DELAY_SECONDS)

    def _take_later(self, group: str) -> tuple[list[str], list[str], int]:
        """The settlements waiting in ``group`` (those an acquire in its slot may carry)."""
        batch = self._later.pop(group, None)
        if batch is None:
            return [], [], 0
        self._later_count -= batch[2]
        return batch[0], batch[1], batch[2]

    def _start_flush(self, delay: float) -> None:
        if self._flush_task is not None and not self._flush_task.done():
            if delay > 0:
                return
            self._flush_task.cancel()
        self._flush_task = asyncio.get_running_loop().create_task(self._flush_after(delay))

    async def _flush_after(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        self._flush_task = None
        await self.drain()

    async def drain(self):
        """Send the queued settlements now (tests, shutdown): one call (on a cluster, per model)."""
        batches, self._later, self._later_count = self._later, {}, 0
        if len(batches) == 1:  # always on one Redis
            (batch,) = batches.values()
            await self._send_settlements(*batch)
        elif batches:
            await asyncio.gather(*(self._send_settlements(*batch) for batch in batches.values()))

    async def _send_settlements(self, keys: list[str], args: list[str], count: int) -> None:
        try:
            await self._run("settle", keys, args)
        except StateUnavailable as exc:
            _dropped_settlements(count, exc)

    def _settle_args(self, windows) -> list[str]:
        args = self._settle_args_cache.get(windows)
        if args is None:
            args = [str(len(windows))]
            for w in windows:
                args += [w.name, w.unit, repr(w.bucket)]
            self._settle_args_cache[windows] = args
        return args

    async def settle(self, grant, actual_tokens, sku=None, now=None):
        return await self._finish("settle", grant, actual_tokens, sku, now)

    async def settle_success(self, grant, actual_tokens, sku=None, now=None):
        """``settle`` and ``record_success`` in one script call (one round trip)."""
        return await self._finish("settle", grant, actual_tokens, sku, now, ok=True)

    async def release(self, grant, now=None):
        return await self._finish("release", grant, 0, None, now)

    async def renew(self, grant, candidate, now=None):
        rid = new_id()
        _, cargs = self._candidates((candidate,))
        args = [
            repr(_now(now)),
            str(int(grant.tokens)),
            rid,
            repr(self._rng.random()),
            grant.reservation_id,
            repr(grant.reserved_at),
            *self._config_args,
            repr(self.config.retention_window.bucket),
            *cargs,
        ]
        res = await self._run("renew", self._dep_keys(candidate.id, self._model_of(candidate)), args)
        return self._result(res, (candidate,), int(grant.tokens), rid)

    # -- upstream signals ----------------------------------------------------------------

    async def _signal(self, op: str, deployment_id: int, now, a: str = "", b: str = "") -> str:
        cfg = self.config
        args = [op, repr(_now(now)), a, b, str(cfg.breaker_failures), repr(cfg.breaker_open_seconds), repr(cfg.key_ttl)]
        return _s(await self._run("signal", [self._dep_keys(deployment_id)[0]], args))

    async def observe(self, deployment_id, remaining_requests, remaining_tokens, now=None):
        def arg(v):
            return "" if v is None else str(max(0, int(v)))

        await self._signal("observe", deployment_id, now, arg(remaining_requests), arg(remaining_tokens))

    async def cool(self, deployment_id, until, now=None):
        await self._signal("cool", deployment_id, now, repr(float(until)))

    async def record_failure(self, deployment_id, now=None):
        return OPEN if await self._signal("fail", deployment_id, now) == "open" else CLOSED

    async def record_success(self, deployment_id):
        await self._signal("ok", deployment_id, None)

    # -- queue ---------------------------------------------------------------------------

    async def _queue_op(
        self, op: str, queue: str, ticket: str = "", now=None, priority: int = 0, tenant: str = "", lease: float = 0.0
    ):
        cfg = self.config
        args = [
            op,
            repr(_now(now)),
            ticket,
            str(int(priority)),
            tenant,
            repr(float(lease)),
            str(cfg.queue_max_depth),
            repr(cfg.key_ttl),
            self._channel,
            queue,
        ]
        return await self._run("queue", self._queue_keys(queue), args)

    async def enqueue(self, queue, ticket_id, priority, tenant, now=None, lease_seconds=None):
        check_ticket(ticket_id)
        lease = lease_seconds or self.config.lease_seconds
        # Listen before joining: the turn may be announced before this waiter first sleeps.
        self._ensure_listener()
        self._waiters.setdefault(ticket_id, asyncio.Event())
        if not self._subscribed.is_set():  # only while the listener (re)starts: one round trip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_max):
                    await self._subscribed.wait()
        added = bool(await self._queue_op("enqueue", queue, ticket_id, now, priority, tenant, lease))
        if not added:
            self._waiters.pop(ticket_id, None)
        return added

    async def touch(self, queue, ticket_id, now=None):
        return bool(await self._queue_op("touch", queue, ticket_id, now))

    async def leave(self, queue, ticket_id):
        self._waiters.pop(ticket_id, None)
        return bool(await self._queue_op("leave", queue, ticket_id))

    async def depth(self, queue, now=None):
        flat = await self._queue_op("depth", queue, "", now)
        pairs = {int(_s(flat[i])): int(_s(flat[i + 1])) for i in range(0, len(flat), 2)}
        return dict(sorted(pairs.items()))

    async def wait_change(self, queue, ticket_id, timeout):
        """Sleep up to ``timeout``; return early when ``ticket_id`` is announced as the head.

        The event stays registered between polls (until the ticket is served or leaves), so an
        announcement that lands while the waiter is polling is not lost.
        """
        self._ensure_listener()
        event = self._waiters.setdefault(ticket_id, asyncio.Event())
        if not event.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(timeout, 0.0)):
                    await event.wait()
        event.clear()

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._subscribed.clear()
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        pubsub = None
        try:
            if self._cluster:
                # A cluster client learns its nodes on first use; its pub/sub needs them. A PUBLISH
                # (from a script) reaches the subscribers of every node of a cluster.
                await self._redis.initialize()
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(self._channel)
            self._subscribed.set()
            async for message in pubsub.listen():
                _, _, ticket = _s(message["data"]).partition("\n")
                event = self._waiters.get(ticket)
                if event is not None:
                    event.set()
        except asyncio.CancelledError:
            raise
        except Exception:  # the next wait_change restarts us; until then waiters poll
            log.warning("balancer wake-up listener stopped", exc_info=True)
        finally:
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # -- status --------------------------------------------------------------------------

    async def status(self, deployments, now=None):
        now = _now(now)
        cfg = self.config
        if not deployments:
            return {}
        groups: dict[str, list] = {}  # one call per slot (model) on a cluster, one call on one Redis
        for c in deployments:
            groups.setdefault(self._model_of(c) if self._cluster else "", []).append(c)
        if len(groups) == 1:
            replies = [await self._status_rows(deployments, now)]
        else:
            replies = await asyncio.gather(*(self._status_rows(group, now) for group in groups.values()))
        rows_of = {
            c.id: row
            for group, rows in zip(groups.values(), replies, strict=True)
            for c, row in zip(group, rows, strict=True)
        }
        out: dict[int, dict] = {}
        for c in deployments:
            row = rows_of[c.id]
            row = [_s(x) for x in row]
            plan = self.planner.plan_for(c)
            fails, open_until = int(float(row[4])), float(row[5])
            if fails < cfg.breaker_failures:
                state, open_for = CLOSED, 0.0
            else:
                state = OPEN if now < open_until else HALF_OPEN
                open_for = max(0.0, open_until - now)
            out[c.id] = build_status(
                windows=[
                    window_status(w.unit, w.seconds, w.limit, int(float(used)))
                    for w, used in zip(plan.windows, row[9:], strict=True)
                ],
                headroom=float(row[1]),
                wait=float(row[0]),
                in_flight=int(row[2]),
                cool_down=max(0.0, float(row[3]) - now),
                breaker_state=state,
                failures=fails,
                open_for=open_for,
                probe=row[6] == "1",
                upstream_requests=int(float(row[7])) if row[7] else None,
                upstream_tokens=int(float(row[8])) if row[8] else None,
            )
        return out

    async def _status_rows(self, deployments, now: float) -> list:
        keys, cargs = self._candidates(deployments)
        return await self._run("status", keys, [repr(now), *self._config_args, *cargs])

    # -- lifecycle -----------------------------------------------------------------------

    async def reset(self):
        """Delete every key under this state's prefix (tests; never on a shared production prefix)."""
        pattern = _glob_escape(self._prefix) + ":*"
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                await self._redis.delete(*batch)
                batch.clear()
        if batch:
            await self._redis.delete(*batch)

    async def aclose(self):
        if self._flush_task is not None:
            self._flush_task.cancel()
            self._flush_task = None
        with contextlib.suppress(Exception):
            await self.drain()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        if self._owns_client:
            await self._redis.aclose()


def _dropped_settlements(count: int, exc: StateUnavailable) -> None:
    # As the request path does with any report after an attempt (gateway/proxy/shared_state.py):
    # the reservations age out of the windows as reserved.
    log.warning("could not send %d settlement(s) to the balancer state: %s", count, exc)


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
