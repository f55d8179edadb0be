"""The in-process backend: the embedded default (``make run``, tests, one process).

Every public coroutine does its work in one synchronous block with no ``await`` inside, so on
one event loop it is atomic: that is the critical section. (It is not thread-safe; use it
from the loop that serves requests.)

Time: ``now`` is expected not to go backwards (it is ``time.time()`` read just before the
call). The log never rewinds: a call with an earlier time sees the windows as of the latest
time seen, and its entry is recorded at that latest time. Only a clock step back can make that
differ from Redis (which counts by score from any ``now``), by at most the step.

Cost: per candidate, O(number of windows) amortised. A deployment's reservations sit in one
time-ordered log; each window is a cursor into it with running sums, advanced past expired
entries (amortised O(1) each) and the log's dead prefix is compacted when it is at least half
of it. Only a denial walks entries, to find when enough of them expire, and stops as soon as
it has.

Waiters are woken instead of polling: each ticket has an ``asyncio.Event``, set when its
ticket becomes the head or, while it is the head, when capacity is freed on a deployment it
waits for (settle, release, breaker closing).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence

from gateway.balancer.breaker import Breaker
from gateway.balancer.contract import (
    INF,
    MIN_WAIT,
    REQUESTS,
    TIE_EPSILON,
    BalancerState,
    Capacity,
    Denied,
    Grant,
    Reason,
    StateConfig,
    WindowPlan,
    WindowSpec,
    build_status,
    check_ticket,
    score,
    settled_tokens,
    window_status,
)
from gateway.snapshot.types import SKU_STANDARD


class _Entry:
    __slots__ = ("requests", "seq", "t", "tokens")

    def __init__(self, t: float, tokens: int, seq: int) -> None:
        self.t = t
        self.requests = 1
        self.tokens = tokens
        self.seq = seq


class _Cursor:
    """Entries with ``seq >= self.seq`` are inside the window; their sums."""

    __slots__ = ("requests", "seq", "spec", "tokens")

    def __init__(self, spec: WindowSpec, seq: int) -> None:
        self.spec = spec
        self.seq = seq
        self.requests = 0
        self.tokens = 0


class _Log:
    """One deployment's reservations in time order, with a cursor per window (by name)."""

    __slots__ = ("base", "cursors", "items", "keep", "last_t")

    def __init__(self, retention: WindowSpec) -> None:
        self.items: list[_Entry] = []
        self.base = 0  # seq of items[0]
        self.keep = _Cursor(retention, 0)  # the longest span: decides what the log retains
        self.cursors: dict[str, _Cursor] = {retention.name: self.keep}
        self.last_t = -INF

    def append(self, now: float, tokens: int) -> _Entry:
        # Clamp to the newest entry so the log stays ordered; an entry only ever counts longer.
        t = now if now > self.last_t else self.last_t
        self.last_t = t
        self.advance(self.keep, now)
        entry = _Entry(t, tokens, self.base + len(self.items))
        self.items.append(entry)
        for c in self.cursors.values():
            c.requests += 1
            c.tokens += tokens
        return entry

    def cursor(self, spec: WindowSpec, now: float) -> _Cursor:
        c = self.cursors.get(spec.name)
        if c is None:
            c = self.cursors[spec.name] = self._new_cursor(spec)
        elif c.spec is not spec:
            # The window's span moved with the measured guard (its buckets never do). As on
            # Redis, where the buckets that left are gone, a longer span counts only from here.
            c.spec = spec
        self.advance(c, now)
        return c

    def _new_cursor(self, spec: WindowSpec) -> _Cursor:
        # Only when a new window length appears (once per span): sum what the log retains.
        c = _Cursor(spec, self.keep.seq)
        for e in self.items[self.keep.seq - self.base :]:
            c.requests += e.requests
            c.tokens += e.tokens
        return c

    def advance(self, c: _Cursor, now: float) -> None:
        # Bucketed as in Redis (contract, "Window"): an entry leaves with its whole bucket.
        spec = c.spec
        lo, size = spec.oldest_counted(now), spec.bucket
        items, base = self.items, self.base
        i, n = c.seq - base, len(items)
        while i < n and math.floor(items[i].t / size) < lo:
            e = items[i]
            c.requests -= e.requests
            c.tokens -= e.tokens
            i += 1
        c.seq = base + i
        if c is self.keep and i > 64 and i * 2 > n:
            self._compact(now)

    def _compact(self, now: float) -> None:
        for c in self.cursors.values():
            if c is not self.keep:
                self.advance(c, now)  # shorter spans end past the retention cursor
        drop = self.keep.seq - self.base
        del self.items[:drop]
        self.base += drop

    def adjust(self, entry: _Entry, requests: int, tokens: int) -> None:
        for c in self.cursors.values():
            if entry.seq >= c.seq:
                c.requests += requests
                c.tokens += tokens
        entry.requests += requests
        entry.tokens += tokens

    def free_at(self, c: _Cursor, unit: str, need: int) -> float:
        """When ``need`` units of this window will have expired (the oldest go first)."""
        freed, items = 0, self.items
        for i in range(c.seq - self.base, len(items)):
            e = items[i]
            freed += e.requests if unit == REQUESTS else e.tokens
            if freed >= need:
                return c.spec.counted_until(e.t)
        return INF


class _Deployment:
    __slots__ = ("breaker", "cool", "inflight", "log", "ur", "ur_at", "ur_used", "ut", "ut_at", "ut_used")

    def __init__(self, retention: WindowSpec) -> None:
        self.log = _Log(retention)
        self.inflight: OrderedDict[str, float] = OrderedDict()  # reservation -> forget-at
        self.cool = 0.0
        self.breaker = Breaker()
        self.ur: int | None = None  # the upstream's remaining requests, when observed, and
        self.ur_at = 0.0  # what we reserved there since
        self.ur_used = 0
        self.ut: int | None = None
        self.ut_at = 0.0
        self.ut_used = 0


class _Ticket:
    __slots__ = ("event", "id", "lease_seconds", "lease_until", "priority", "round", "seq", "tenant")

    def __init__(self, id, priority, round_, seq, tenant, lease_until, lease_seconds) -> None:
        self.id = id
        self.priority = priority
        self.round = round_
        self.seq = seq
        self.tenant = tenant
        self.lease_until = lease_until
        self.lease_seconds = lease_seconds
        self.event = asyncio.Event()


class _Queue:
    """Waiting tickets of one queue name, ordered by (priority, round, arrival).

    A ticket's round is ``max(v, min(last + 1, v + waiting + 1))`` where, at its priority, ``v``
    is the round of the ticket served last, ``last`` its tenant's previous ticket's round and
    ``waiting`` how many of the tenant's tickets wait. Enqueued together from an idle queue,
    a tenant's tickets get rounds 0, 1, 2... (its number already waiting), so tenants
    alternate. The virtual clock ``v`` stops a tenant that keeps one ticket waiting at a
    time from starving another tenant's second ticket; the ``waiting + 1`` cap stops tickets
    that left unserved (timeouts) from pushing their tenant back. ``lua/lib.lua`` mirrors this.

    A full queue admits a newcomer of a better priority than its last ticket (the one that
    would be served last) by evicting that ticket: ``tail`` finds it, and ``evicted`` keeps a
    tombstone (ticket -> expiry) so its waiter learns why it is gone.
    """

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, int, str]] = []  # lazy: stale entries skipped
        self.tail: list[tuple[int, int, int, str]] = []  # the same, negated: the last ticket first
        self.evicted: OrderedDict[str, float] = OrderedDict()  # tombstones: ticket -> expiry
        self.leases: list[tuple[float, int, str]] = []  # lazy: refreshed leases re-pushed
        self.tickets: dict[str, _Ticket] = {}
        self.depth: Counter[int] = Counter()
        self.vclock: dict[int, int] = {}
        self.last: dict[tuple[int, str], int] = {}
        self.waiting: Counter[tuple[int, str]] = Counter()
        self.seq = itertools.count()

    def add(self, ticket_id: str, priority: int, tenant: str, now: float, lease: float) -> None:
        v = self.vclock.get(priority, 0)
        last = self.last.get((priority, tenant))
        rnd = v if last is None else max(v, min(last + 1, v + self.waiting[priority, tenant] + 1))
        t = _Ticket(ticket_id, priority, rnd, next(self.seq), tenant, now + lease, lease)
        self.tickets[ticket_id] = t
        self.last[priority, tenant] = rnd
        self.waiting[priority, tenant] += 1
        self.depth[priority] += 1
        heapq.heappush(self.heap, (priority, rnd, t.seq, ticket_id))
        heapq.heappush(self.tail, (-priority, -rnd, -t.seq, ticket_id))
        heapq.heappush(self.leases, (t.lease_until, t.seq, ticket_id))

    def remove(self, ticket_id: str, served: bool) -> _Ticket | None:
        t = self.tickets.pop(ticket_id, None)
        if t is None:
            return None
        p = t.priority
        self.depth[p] -= 1
        if not self.depth[p]:
            del self.depth[p]
        self.waiting[p, t.tenant] -= 1
        if not self.waiting[p, t.tenant]:
            del self.waiting[p, t.tenant]
        if served and t.round > self.vclock.get(p, 0):
            self.vclock[p] = t.round
        if len(self.heap) > 2 * len(self.tickets) + 64:
            self.heap = [(x.priority, x.round, x.seq, x.id) for x in self.tickets.values()]
            heapq.heapify(self.heap)
        if len(self.tail) > 2 * len(self.tickets) + 64:
            self.tail = [(-x.priority, -x.round, -x.seq, x.id) for x in self.tickets.values()]
            heapq.heapify(self.tail)
        t.event.set()  # a waiter on a removed ticket must not sleep on
        return t

    def evict(self, t: _Ticket, now: float) -> None:
        """Push ``t`` out (a better newcomer needs its place); its tombstone lasts its lease."""
        self.remove(t.id, served=False)  # wakes its waiter, which then learns it was evicted
        self.evicted[t.id] = now + t.lease_seconds

    def take_tombstone(self, ticket_id: str, now: float) -> bool:
        """True, once, if ``ticket_id`` was evicted no longer than its lease ago."""
        until = self.evicted.pop(ticket_id, None)
        return until is not None and until > now

    def prune(self, now: float) -> bool:
        """Drop tickets whose lease expired (their process died) and stale tombstones.

        True if any ticket went.
        """
        evicted = self.evicted
        while evicted:  # roughly in expiry order (leases may differ): lookups check it anyway
            tid, until = next(iter(evicted.items()))
            if until > now:
                break
            del evicted[tid]
        leases, gone = self.leases, False
        while leases and leases[0][0] <= now:
            _, seq, tid = heapq.heappop(leases)
            t = self.tickets.get(tid)
            if t is None or t.seq != seq:
                continue
            if t.lease_until > now:
                heapq.heappush(leases, (t.lease_until, seq, tid))
            else:
                self.remove(tid, served=False)
                gone = True
        return gone

    def head(self) -> _Ticket | None:
        heap = self.heap
        while heap:
            tid = heap[0][3]
            t = self.tickets.get(tid)
            if t is not None and t.seq == heap[0][2]:
                return t
            heapq.heappop(heap)
        return None

    def tail_ticket(self) -> _Ticket | None:
        """The ticket that would be served last: worst priority, then latest round, then arrival."""
        tail = self.tail
        while tail:
            tid = tail[0][3]
            t = self.tickets.get(tid)
            if t is not None and t.seq == -tail[0][2]:
                return t
            heapq.heappop(tail)
        return None

    def wake_head(self) -> None:
        h = self.head()
        if h is not None:
            h.event.set()


def _now(now: float | None) -> float:
    return time.time() if now is None else now


class MemoryState(BalancerState):
    """``BalancerState`` in this process's memory."""

    wakes_on_turn = True
    wakes_on_capacity = True

    def __init__(self, config: StateConfig | None = None, *, rng: random.Random | None = None) -> None:
        super().__init__(config or StateConfig())
        self._rng = rng or random.Random()
        self._ids = itertools.count(1)
        self.reset_sync()

    def reset_sync(self) -> None:
        self._deployments: dict[int, _Deployment] = {}
        self._reservations: dict[str, tuple[_Deployment, _Entry, int]] = {}
        self._queues: dict[str, _Queue] = {}
        self._dep_queues: dict[int, set[str]] = {}  # deployment -> queues whose waiters want it

    # -- deployments ---------------------------------------------------------------------

    def _dep(self, deployment_id: int) -> _Deployment:
        d = self._deployments.get(deployment_id)
        if d is None:
            d = self._deployments[deployment_id] = _Deployment(self.config.retention_window)
        return d

    def _evaluate(self, d: _Deployment, plan: WindowPlan, demand: int, now: float) -> tuple[bool, float, float, bool]:
        """(fits now, wait, headroom, held by its breaker) of a demand on a deployment (module
        docstring of state)."""
        cfg = self.config
        fits, wait, head = True, 0.0, 1.0
        if d.cool > now:
            fits, wait = False, d.cool - now
        blocked = d.breaker.blocked_until(now, cfg.breaker_failures)
        broken = blocked > now
        if broken:
            fits, wait = False, max(wait, blocked - now)
        log = d.log
        for w in plan.windows:
            need = 1 if w.unit == REQUESTS else demand
            if need > w.limit:
                return False, INF, -INF, False
            c = log.cursor(w, now)
            if w.unit == REQUESTS:
                left = w.limit - c.requests
                frac = left / w.limit
                left -= 1
            else:
                left = w.limit - c.tokens - demand
                frac = left / w.limit
            if left < 0:
                fits, wait = False, max(wait, log.free_at(c, w.unit, -left) - now)
            if frac < head:
                head = frac
        age = cfg.upstream_age
        if d.ur is not None and now < d.ur_at + age:
            left = d.ur - d.ur_used
            if left < 1:
                fits, wait = False, max(wait, d.ur_at + age - now)
            head = min(head, left / max(d.ur, plan.request_ref, 1))
        if d.ut is not None and now < d.ut_at + age:
            left = d.ut - d.ut_used - demand
            if left < 0:
                fits, wait = False, max(wait, d.ut_at + age - now)
            head = min(head, left / max(d.ut, plan.token_ref, 1))
        if not fits and wait < MIN_WAIT:
            wait = MIN_WAIT  # rounding at a boundary: never report "now" for a non-fit
        return fits, wait, head, broken

    def _choose(self, candidates: Sequence[Capacity], demand: int, now: float):
        """(index of the chosen candidate or None, its headroom, the soonest wait, the reason when
        none): the soonest wait is that of the healthy candidates; only when every candidate that
        could ever fit is held by its breaker, that of the first breaker to let a probe through
        (``Reason.UNHEALTHY``)."""
        best, ties, soonest, soonest_broken, heads = -INF, [], INF, INF, {}
        plan_of = self.planner.plan_for
        for i, c in enumerate(candidates):
            fits, wait, head, broken = self._evaluate(self._dep(c.id), plan_of(c), demand, now)
            if not fits:
                if broken:
                    soonest_broken = min(soonest_broken, wait)
                else:
                    soonest = min(soonest, wait)
                continue
            heads[i] = head
            s = score(head, c.weight)
            if s > best + TIE_EPSILON:
                best, ties = s, [i]
            elif s >= best - TIE_EPSILON:
                ties.append(i)
        if not ties:
            if soonest < INF:
                return None, 0.0, soonest, Reason.CAPACITY
            if soonest_broken < INF:
                return None, 0.0, soonest_broken, Reason.UNHEALTHY
            return None, 0.0, INF, Reason.NEVER
        pick = ties[int(self._rng.random() * len(ties))] if len(ties) > 1 else ties[0]
        return pick, heads[pick], 0.0, None

    def _acquire(self, candidates: Sequence[Capacity], demand: int, now: float) -> Grant | Denied:
        i, head, wait, reason = self._choose(candidates, demand, now)
        if i is None:
            return Denied(wait, reason)
        c = candidates[i]
        d = self._dep(c.id)
        cfg = self.config
        rid = f"m{next(self._ids)}"
        entry = d.log.append(now, demand)
        while d.inflight and next(iter(d.inflight.values())) <= now:
            self._reservations.pop(d.inflight.popitem(last=False)[0], None)
        d.inflight[rid] = now + cfg.inflight_ttl
        self._reservations[rid] = (d, entry, c.id)
        if d.ur is not None and entry.t >= d.ur_at:
            d.ur_used += 1
        if d.ut is not None and entry.t >= d.ut_at:
            d.ut_used += demand
        probe = d.breaker.on_grant(rid, now, cfg.breaker_failures, cfg.probe_seconds)
        plan = self.planner.plan_for(c)
        return Grant(c.id, rid, demand, entry.t, getattr(c, "sku", SKU_STANDARD), head, probe, plan.windows)

    async def try_acquire(self, candidates, demand_tokens, now=None):
        return self._acquire(candidates, demand_tokens, _now(now))

    async def try_acquire_queued(self, queue, ticket_id, candidates, demand_tokens, now=None):
        now = _now(now)
        q = self._queues.get(queue)
        if q is not None and q.prune(now):
            q.wake_head()
        if ticket_id is not None:
            check_ticket(ticket_id)
            t = q.tickets.get(ticket_id) if q is not None else None
            if t is None:
                if q is not None and q.take_tombstone(ticket_id, now):
                    return Denied(0.0, Reason.EVICTED)
                return Denied(0.0, Reason.NOT_QUEUED)
            t.lease_until = now + t.lease_seconds
            for c in candidates:
                self._dep_queues.setdefault(c.id, set()).add(queue)
            ahead = q.head() is not t
        else:
            ahead = q is not None and bool(q.tickets)
        if ahead:
            _, _, wait, reason = self._choose(candidates, demand_tokens, now)
            return Denied(wait, Reason.QUEUED if reason in (None, Reason.CAPACITY) else reason)
        result = self._acquire(candidates, demand_tokens, now)
        if ticket_id is not None and isinstance(result, Grant):
            q.remove(ticket_id, served=True)
            q.wake_head()
        return result

    def _notify(self, deployment_id: int) -> None:
        """Capacity may have been freed: wake the head waiter of every queue that wants it."""
        for name in self._dep_queues.get(deployment_id, ()):
            q = self._queues.get(name)
            if q is not None:
                q.wake_head()

    def _finish(self, grant: Grant) -> tuple[_Deployment, _Entry] | None:
        found = self._reservations.pop(grant.reservation_id, None)
        if found is None:
            return None
        d, entry, _ = found
        d.inflight.pop(grant.reservation_id, None)
        d.breaker.on_done(grant.reservation_id)
        return d, entry

    async def settle(self, grant, actual_tokens, sku=None, now=None):
        now = _now(now)
        found = self._finish(grant)
        if found is None:
            return False
        d, entry = found
        if self.config.retention_window.counted(entry.t, now):  # still counted (Redis has pruned it otherwise)
            delta = settled_tokens(entry.tokens, actual_tokens, sku or grant.sku) - entry.tokens
            d.log.adjust(entry, 0, delta)
            if d.ut is not None and entry.t >= d.ut_at:
                d.ut_used = max(0, d.ut_used + delta)
        self._notify(grant.deployment_id)
        return True

    async def renew(self, grant, candidate, now=None):
        now = _now(now)
        self._release(grant, now)  # no await between the two: atomic on this loop
        return self._acquire((candidate,), grant.tokens, now)

    async def release(self, grant, now=None):
        return self._release(grant, _now(now))

    def _release(self, grant: Grant, now: float) -> bool:
        found = self._finish(grant)
        if found is None:
            return False
        d, entry = found
        if self.config.retention_window.counted(entry.t, now):
            if d.ur is not None and entry.t >= d.ur_at:
                d.ur_used = max(0, d.ur_used - 1)
            if d.ut is not None and entry.t >= d.ut_at:
                d.ut_used = max(0, d.ut_used - entry.tokens)
            d.log.adjust(entry, -entry.requests, -entry.tokens)
        self._notify(grant.deployment_id)
        return True

    # -- upstream signals ----------------------------------------------------------------

    async def observe(self, deployment_id, remaining_requests, remaining_tokens, now=None):
        now = _now(now)
        d = self._dep(deployment_id)
        if remaining_requests is not None:
            d.ur, d.ur_at, d.ur_used = max(0, int(remaining_requests)), now, 0
        if remaining_tokens is not None:
            d.ut, d.ut_at, d.ut_used = max(0, int(remaining_tokens)), now, 0

    async def cool(self, deployment_id, until, now=None):
        d = self._dep(deployment_id)
        d.cool = max(d.cool, until)

    async def record_failure(self, deployment_id, now=None):
        cfg = self.config
        return self._dep(deployment_id).breaker.on_failure(_now(now), cfg.breaker_failures, cfg.breaker_open_seconds)

    async def record_success(self, deployment_id):
        self._dep(deployment_id).breaker.on_success()
        self._notify(deployment_id)

    # -- queue ---------------------------------------------------------------------------

    async def enqueue(self, queue, ticket_id, priority, tenant, now=None, lease_seconds=None):
        check_ticket(ticket_id)
        now = _now(now)
        lease = lease_seconds or self.config.lease_seconds
        q = self._queues.get(queue)
        if q is None:
            q = self._queues[queue] = _Queue()
        elif q.prune(now):
            q.wake_head()
        t = q.tickets.get(ticket_id)
        if t is not None:
            t.lease_until = now + t.lease_seconds
            return True
        priority = int(priority)
        if len(q.tickets) >= self.config.queue_max_depth:
            # Full: only a strictly better priority than the last ticket's gets in, in its place.
            victim = q.tail_ticket()
            if victim is None or priority >= victim.priority:
                return False
            q.evict(victim, now)
        q.evicted.pop(ticket_id, None)  # back in the queue: no longer evicted
        q.add(ticket_id, priority, tenant, now, lease)
        return True

    async def touch(self, queue, ticket_id, now=None):
        q = self._queues.get(queue)
        t = q.tickets.get(ticket_id) if q is not None else None
        if t is None:
            return False
        t.lease_until = _now(now) + t.lease_seconds
        return True

    async def leave(self, queue, ticket_id):
        q = self._queues.get(queue)
        if q is not None:
            q.evicted.pop(ticket_id, None)  # its waiter is done with it
        if q is None or q.remove(ticket_id, served=False) is None:
            return False
        q.wake_head()
        return True

    async def depth(self, queue, now=None):
        q = self._queues.get(queue)
        if q is None:
            return {}
        if q.prune(_now(now)):
            q.wake_head()
        return dict(sorted(q.depth.items()))

    async def wait_change(self, queue, ticket_id, timeout):
        q = self._queues.get(queue)
        t = q.tickets.get(ticket_id) if q is not None else None
        if t is None:
            return
        event = t.event
        if not event.is_set():
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    await event.wait()
            except TimeoutError:
                pass
        event.clear()

    # -- status --------------------------------------------------------------------------

    async def status(self, deployments, now=None):
        now = _now(now)
        cfg = self.config
        out: dict[int, dict] = {}
        for c in deployments:
            d = self._dep(c.id)
            plan = self.planner.plan_for(c)
            _, wait, head, _ = self._evaluate(d, plan, 0, now)
            windows = []
            for w in plan.windows:
                cur = d.log.cursor(w, now)
                used = cur.requests if w.unit == REQUESTS else cur.tokens
                windows.append(window_status(w.unit, w.seconds, w.limit, used))
            while d.inflight and next(iter(d.inflight.values())) <= now:
                self._reservations.pop(d.inflight.popitem(last=False)[0], None)
            b = d.breaker
            fresh_r = d.ur is not None and now < d.ur_at + cfg.upstream_age
            fresh_t = d.ut is not None and now < d.ut_at + cfg.upstream_age
            out[c.id] = build_status(
                windows=windows,
                headroom=head,
                wait=wait,
                in_flight=len(d.inflight),
                cool_down=max(0.0, d.cool - now),
                breaker_state=b.state(now, cfg.breaker_failures),
                failures=b.failures,
                open_for=max(0.0, b.open_until - now) if b.failures >= cfg.breaker_failures else 0.0,
                probe=b.probe is not None and now < b.probe_until,
                upstream_requests=d.ur - d.ur_used if fresh_r else None,
                upstream_tokens=d.ut - d.ut_used if fresh_t else None,
            )
        return out

    async def reset(self):
        self.reset_sync()

    async def aclose(self):
        pass
