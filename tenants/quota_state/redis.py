"""The Redis quota state: every gateway process admits against the same counters.

Each operation is one Lua script call (``lua/*.lua`` with ``lua/lib.lua`` prepended), so
checking and reserving across a tenant's and a key's windows and budgets is one atomic step and
one round trip. Every key expires: windows two minutes after their last use, budgets 40 days
after theirs (a budget that loses its keys is seeded again from the usage records).

Keys are ``<prefix>:q:{t<tenant id>}:<scope>:<b|z|w>``: the hash tag puts a tenant's scopes and
its keys' in one Redis Cluster slot, so the scripts stay single-slot (admission and settlement
are per tenant; settlements ride along or are batched per tenant; the reconciliation and the
admin's read take a tenant's scopes per call on a cluster, see ``reconcile`` and ``read``).
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from gateway.redis_clients import is_cluster_client, is_cluster_url
from tenants.quota_state.contract import (
    TENANT,
    Admitted,
    Ask,
    BudgetUse,
    PeriodIds,
    QuotaState,
    QuotaStateConfig,
    Refused,
    Reservation,
    ScopeLimits,
    ScopeUse,
    Seed,
    Unseeded,
    WindowUse,
    new_reservation_id,
)
from tenants.quota_state.resp import RespClient
from tenants.quota_state.resp_cluster import RespClusterClient

_LUA = Path(__file__).with_name("lua")
SCRIPTS = ("admit", "settle", "read", "reconcile")


@cache
def lua_source(name: str) -> str:
    """A script with the shared library in front (also used by the admin's synchronous reader)."""
    return (_LUA / "lib.lua").read_text() + "\n" + (_LUA / f"{name}.lua").read_text()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def scope_keys(prefix: str, scope: ScopeLimits) -> list[str]:
    """The scope's budget hash, hold leases and window keys."""
    name = "t" if scope.kind == TENANT else f"k{scope.id}"
    base = f"{prefix}:q:{{t{scope.tenant_id}}}:{name}"
    return [f"{base}:b", f"{base}:z", f"{base}:w"]


def read_args(scopes: list[ScopeLimits], periods: PeriodIds, now: float, bucket_seconds: float) -> list[str]:
    args = [repr(now), repr(bucket_seconds), str(periods.day), str(periods.month), str(len(scopes))]
    for scope in scopes:
        args += [str(scope.day_stamp), str(scope.month_stamp)]
    return args


def slot_groups(scopes: list[ScopeLimits], cluster: bool) -> list[list[int]]:
    """Indexes of ``scopes`` per script call: all in one on a single Redis; on a cluster one call
    per tenant (its hash tag), as a script's keys must share a slot."""
    if not cluster:
        return [list(range(len(scopes)))]
    groups: dict[int, list[int]] = {}
    for i, scope in enumerate(scopes):
        groups.setdefault(scope.tenant_id, []).append(i)
    return list(groups.values())


def read_rows(rows: list) -> list[ScopeUse]:
    out = []
    for row in rows:
        n, k, seeded, ud, umt, umc, hmt, hmc = (int(_s(x)) for x in row)
        out.append(ScopeUse(n, k, ud, umt, umc, hmt, hmc, bool(seeded)))
    return out


class RedisQuotaState(QuotaState):
    def __init__(
        self,
        redis: Redis,
        config: QuotaStateConfig | None = None,
        *,
        prefix: str = "gw",
        owns_client: bool = False,
        fast: RespClient | RespClusterClient | None = None,
    ) -> None:
        """``redis`` serves every call; ``fast`` (owned), when given, serves the two calls of the
        request path, admit and settle (``resp.py`` says why)."""
        super().__init__(config or QuotaStateConfig())
        self._redis = redis
        self._owns_client = owns_client
        self.prefix = prefix
        self._scripts = {name: redis.register_script(lua_source(name)) for name in SCRIPTS}
        self._cluster = is_cluster_client(redis)
        self._fast = fast
        self._shas = {name: fast.register(lua_source(name)) for name in ("admit", "settle")} if fast else {}
        self._keys: dict[tuple[str, int, int], list[str]] = {}
        self._scope_args: dict[ScopeLimits, str] = {}
        cfg = self.config
        self._fixed = f"{cfg.bucket!r}|{int(cfg.budget_ttl * 1000)}|{int((cfg.window * 2 + 5) * 1000)}"

    @classmethod
    def from_url(
        cls, url: str, config: QuotaStateConfig | None = None, *, prefix: str = "gw", timeout: float = 0.5
    ) -> RedisQuotaState:
        """A state with clients of its own on ``url``, every wait bounded by ``timeout`` seconds."""
        from gateway.redis_clients import redis_async_client

        client = redis_async_client(url, timeout=timeout)
        return cls(client, config, prefix=prefix, owns_client=True, fast=fast_client(url, timeout, client))

    async def _hot(self, name: str, keys: list[str], args: list[str]) -> Any:
        if self._fast is not None:
            return await self._fast.evalsha(self._shas[name], keys, args)
        return await self._scripts[name](keys=keys, args=args)

    def keys(self, scope: ScopeLimits) -> list[str]:
        ref = (scope.kind, scope.id, scope.tenant_id)
        keys = self._keys.get(ref)
        if keys is None:
            keys = self._keys[ref] = scope_keys(self.prefix, scope)
        return keys

    def _limits(self, scope: ScopeLimits) -> str:
        text = self._scope_args.get(scope)
        if text is None:
            if len(self._scope_args) > 10_000:  # scopes change with the configuration: keep it bounded
                self._scope_args.clear()
            text = self._scope_args[scope] = "|".join(
                (
                    "1" if scope.budgeted else "0",
                    "1" if scope.windowed else "0",
                    str(scope.rpm),
                    str(scope.tpm),
                    str(scope.daily_tokens),
                    str(scope.monthly_tokens),
                    str(scope.monthly_cost),
                    str(scope.day_stamp),
                    str(scope.month_stamp),
                )
            )
        return text

    async def admit(self, ask: Ask, now: float | None = None) -> Admitted | Refused | Unseeded:
        result, _ = await self.admit_carrying(ask, now, [])
        return result

    async def admit_carrying(
        self, ask: Ask, now: float | None, items: list[tuple[Reservation, int, int, bool]]
    ) -> tuple[Admitted | Refused | Unseeded, list[list[BudgetUse]]]:
        """``admit``, with settlements of earlier requests (of the same tenant, on Redis Cluster)
        done first in the same script call; returns what ``settle_many`` would for them too."""
        now = time.time() if now is None else now
        rid = new_reservation_id()
        keys: list[str] = []
        args = [
            f"{now!r}|{rid}|{ask.tokens}|{ask.cost}|{ask.periods.day}|{ask.periods.month}|"
            f"{now + self.config.hold_seconds!r}|{self._fixed}|{len(ask.scopes)}"
        ]
        seeds = ask.seeds
        for scope in ask.scopes:
            keys += self.keys(scope)
            seed = seeds.get(scope.ref) if seeds else None
            if seed is None:
                args.append(self._limits(scope))
            else:
                args.append(f"{self._limits(scope)}|{seed.day_tokens}|{seed.month_tokens}|{seed.month_cost}")
        if items:
            args += self._settlement_args(items, keys)
        verdict_text, _, settled_text = _s(await self._hot("admit", keys, args)).partition("#")
        reply = verdict_text.split("|")
        settled = _settled(items, settled_text) if items else []
        verdict = reply[0]
        if verdict == "A":
            uses = _window_uses(ask.scopes, reply[2:])
            reservation = Reservation(rid, ask.scopes, ask.tokens, ask.cost, ask.periods, int(reply[1]))
            return Admitted(reservation, uses), settled
        if verdict == "U":
            return Unseeded([ask.scopes[int(i) - 1] for i in reply[1:]]), settled
        wait = float(reply[5])
        refused = Refused(
            scope=ask.scopes[int(reply[1]) - 1],
            limit=reply[2],
            used=int(reply[3]),
            held=int(reply[4]),
            retry_after=None if wait < 0 else wait,
            windows=_window_uses(ask.scopes, reply[6:]),
        )
        return refused, settled

    async def settle(
        self, reservation: Reservation, tokens: int, cost: int, *, dispatched: bool, now: float | None = None
    ) -> list[BudgetUse]:
        (uses,) = await self.settle_many([(reservation, tokens, cost, dispatched)])
        return uses

    async def settle_many(self, items: list[tuple[Reservation, int, int, bool]]) -> list[list[BudgetUse]]:
        """Settle several reservations in one script call (one atomic step); per reservation,
        what ``settle`` returns. Give reservations of one tenant only when on Redis Cluster (their
        keys share its slot)."""
        keys: list[str] = []
        args = self._settlement_args(items, keys)
        return _settled(items, _s(await self._hot("settle", keys, args)))

    def _settlement_args(self, items: list[tuple[Reservation, int, int, bool]], keys: list[str]) -> list[str]:
        """One argument per settlement (as settle.lua takes them); their keys are added to ``keys``."""
        args = []
        for reservation, tokens, cost, dispatched in items:
            periods = reservation.periods
            parts = [
                f"{reservation.id}|{int(tokens)}|{int(cost)}|{reservation.tokens}|{1 if dispatched else 0}|"
                f"{periods.day}|{periods.month}|{reservation.bucket}|{len(reservation.scopes)}"
            ]
            for scope in reservation.scopes:
                keys += self.keys(scope)
                parts.append(
                    f"{1 if scope.budgeted else 0}|{1 if scope.windowed else 0}|{scope.day_stamp}|{scope.month_stamp}"
                )
            args.append("|".join(parts))
        return args

    async def reconcile(self, items: list[tuple[ScopeLimits, Seed]], periods: PeriodIds) -> int:
        raised = 0
        for group in slot_groups([scope for scope, _ in items], self._cluster):
            for start in range(0, len(group), 200):  # a few hundred scopes per call keeps each call short
                raised += await self._reconcile_chunk([items[i] for i in group[start : start + 200]], periods)
        return raised

    async def _reconcile_chunk(self, chunk: list[tuple[ScopeLimits, Seed]], periods: PeriodIds) -> int:
        keys = [self.keys(scope)[0] for scope, _ in chunk]
        args = [str(periods.day), str(periods.month), str(len(chunk))]
        for scope, seed in chunk:
            args += [
                str(scope.day_stamp),
                str(scope.month_stamp),
                str(seed.day_tokens),
                str(seed.month_tokens),
                str(seed.month_cost),
            ]
        return int(await self._scripts["reconcile"](keys=keys, args=args))

    async def read(self, scopes: list[ScopeLimits], periods: PeriodIds, now: float | None = None) -> list[ScopeUse]:
        if not scopes:
            return []
        now = time.time() if now is None else now
        out: list[ScopeUse | None] = [None] * len(scopes)
        for group in slot_groups(scopes, self._cluster):
            part = [scopes[i] for i in group]
            keys = [key for scope in part for key in self.keys(scope)]
            rows = await self._scripts["read"](keys=keys, args=read_args(part, periods, now, self.config.bucket))
            for i, use in zip(group, read_rows(rows), strict=True):
                out[i] = use
        return [use for use in out if use is not None]

    async def reset_all(self) -> None:
        """Delete every quota key under this prefix (tests; never on a shared production prefix)."""
        pattern = _glob_escape(f"{self.prefix}:q:") + "*"
        batch = []
        async for key in self._redis.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                await self._redis.delete(*batch)
                batch.clear()
        if batch:
            await self._redis.delete(*batch)

    async def aclose(self) -> None:
        if self._fast is not None:
            await self._fast.aclose()
        if self._owns_client:
            await self._redis.aclose()


def fast_client(url: str, timeout: float, cluster: Any = None) -> RespClient | RespClusterClient | None:
    """The small pipelined client for ``url``, or None where it cannot go (e.g. a unix socket).

    On a Redis Cluster (``redis+cluster://``) one such connection per primary, routed by slot
    with ``cluster``'s slot map (``resp_cluster.py``); without ``cluster``, None: the hot calls
    then go through redis-py's cluster client (~80 us more gateway CPU per call).
    ``timeout`` bounds connecting and each reply, as for every other Redis client of the gateway
    (``REDIS_TIMEOUT_SECONDS``): a paused Redis must turn into a 503 within a second."""
    if is_cluster_url(url):
        if cluster is None or not is_cluster_client(cluster):
            return None
        return RespClusterClient(cluster, url, connect_timeout=timeout, timeout=timeout)
    try:
        return RespClient(url, connect_timeout=timeout, timeout=timeout)
    except ValueError:
        return None


def _settled(items: list[tuple[Reservation, int, int, bool]], reply: str) -> list[list[BudgetUse]]:
    """settle.lua's rows: per reservation, the budgeted scopes' settled use in its periods."""
    out = []
    for (reservation, *_), rows in zip(items, reply.split("/"), strict=True):
        uses = []
        for scope, row in zip(reservation.scopes, rows.split(";"), strict=True):
            ok, day_tokens, month_tokens, month_cost = row.split(",")
            if scope.budgeted and ok == "1":
                uses.append(BudgetUse(scope, int(day_tokens), int(month_tokens), int(month_cost)))
        out.append(uses)
    return out


def _window_uses(scopes: tuple[ScopeLimits, ...], flat: list[str]) -> list[WindowUse]:
    return [
        WindowUse(scope, int(flat[2 * i]), int(flat[2 * i + 1])) for i, scope in enumerate(scopes) if scope.windowed
    ]


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
