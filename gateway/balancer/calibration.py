"""Per-deployment calibration: how many tokens the upstream charges per token the gateway reserves.

The gateway reserves, per request, the estimate Azure documents for its arrival charge: the
prompt plus ``(max_completion_tokens or max_tokens or the default) x max(n, best_of)``
(``gateway.proxy.tokens``). How the upstream counts the prompt is not documented and is not
tiktoken's count: an upstream charging characters / 4 charged 13 % more than the gateway
reserved for plain English (issue 18: 958 upstream 429s against 418 requests served at twice the
capacity), and far less for CJK. Which rule an upstream uses, and its mix of prompts, is learned
here, per deployment, from the upstream's own figures:

Sample
    Every answer carrying ``x-ratelimit-remaining-tokens`` (200s and 429s) says how much the
    upstream holds in its token window when it counted the request: ``used = limit - remaining``
    (``limit``: ``x-ratelimit-limit-tokens`` when sent, else the configured TPM). What the gateway
    had reserved on that deployment within the minute before it sent the request, ``R``, is known
    (this process's reservations, plus the other processes' as they last published them). The
    sample is ``used / R``. A 429 did not count its own request: it leaves ``R`` for it.
    Samples are taken only while ``R`` is at least ``MIN_SHARE`` of the limit (a ratio of two
    small numbers is mostly noise), only from requests sent at least ``TRANSIT_SECONDS`` (50 ms)
    after this process's previous one to the deployment (else the previous one may not have
    reached the upstream yet: ``R`` counts it, the upstream does not, and a burst of 12 sampled
    far below 1, so that the gateway let a 13th request into an exact 12-request window), and
    clamped to ``[LOWEST, HIGHEST]``.

Factor
    The upper ``QUANTILE`` (0.8) of the last ``SAMPLES`` samples, raised by ``SPREAD_MARGIN`` (2)
    times their relative spread (0.8 quantile - 0.2 quantile, over the median), by at most
    ``MAX_MARGIN`` (3 %; uncapped, the noisier samples of two processes cost 10 % of the TPM
    where 3 % already gave no 429). A quantile, so
    that one outlier (an answer that crossed a burst of another client's) moves it by one rank,
    not by its size; an upper one plus a margin for the spread, because what draws a 429 is the
    *last* request into a full window being charged by its own ratio, not the window's average
    (an English prompt with a small ``max_tokens`` costs a characters / 4 upstream 2x the
    gateway's count, a CJK one 0.7x), and the spread of the window's ratio grows with that of the
    requests'. When the upstream counts as the gateway does the samples agree and the factor is
    1: no capacity is given up. Measured (tests/e2e/test_capacity_calibration.py, 3 s minutes, 2x
    load): the median alone left 15 upstream 429s after the first minute at 98.5 % of the TPM
    used, the 0.8 quantile 1-2 at 97 %, with the margin 0 at 93-94 %; a fixed 3 % margin also
    gave 0, but cost the deployments that count exactly their last request of a full window.
    A factor less than ``DEADBAND`` (3 %) below 1 is 1: requests sent but not yet counted make ``R``
    run ahead of the upstream's figure during a burst, so an upstream counting exactly as the
    gateway does samples a little below 1 (a 60-request burst drew one 429 that way).
    A 429 without the remaining figure adds a sample 10 % above the current factor: the upstream
    counted more than the gateway thought. The factor is rounded up to 1 % so the state's window
    plans stay few.

Other processes
    ``R`` includes the other processes' reservations at the time the request went out: an answer
    waits (``pending``) until every other process has published after that time, and their
    figures are interpolated between the two publications around it. And the factor stays 1 until
    ``MIN_SAMPLES`` (5) samples are in, so that one early sample cannot set it alone.

Traffic outside the gateway
    Another client of the same deployment fills the upstream's window too, so ``used / R`` rises
    by its share: the factor then also carries it, and the gateway reserves proportionally less
    of the configured TPM. That is the cap the issue asks for (the upstream's remaining figure
    bounding a configured limit) without the stall of holding a near-zero remaining for a sixth
    of a minute (see ``policy._observe``): the factor moves by a quantile of many answers, and the
    gateway's own window still frees as it always did.

Applying it
    ``capacity(d)`` is the deployment as the balancer's state sees it: the configured TPM divided
    by the factor (the state counts every reservation in the gateway's units, so a TPM scaled by
    ``1 / factor`` is the upstream's TPM in those units). RPM is not scaled: a request is a request.
    Billing is untouched: it keeps the upstream's reported usage.

Sharing (Redis)
    Each process publishes, every ``publish_interval`` seconds (off the request path), per
    deployment it has used: its tokens reserved within the minute, its local factor and its sample
    count, in one hash per deployment (``calibration_key``; on a Redis Cluster the deployment id is
    its hash tag, and the hashes of several deployments go in one pipeline, which redis-py's
    cluster client splits per node: no script needs them in one slot). It reads every process's fields back: the factor used is the sample-weighted
    mean of the fresh local factors, and ``R`` adds the other processes' reservations. Without
    Redis, the process's own figures are the whole story.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.balancer.contract import Candidate, Capacity

log = logging.getLogger(__name__)

LOWEST = 0.5
HIGHEST = 4.0
SAMPLES = 31
MIN_SHARE = 0.1  # R must be at least this share of the upstream's token limit for a sample
QUANTUM = 0.01
NUDGE_429 = 1.1
QUANTILE = 0.8
LOW_QUANTILE = 0.2
SPREAD_MARGIN = 2.0  # the factor is raised by this many times the samples' relative spread,
MAX_MARGIN = 0.03  # up to this much
# Below 1 by less than this is taken as 1: requests sent but not yet counted upstream make R run
# ahead of the upstream's figure during a burst, so an exact upstream samples slightly below 1.
DEADBAND = 0.03
# A reservation sent less than this after the one before it (to the same deployment, from this
# process) may reach the upstream before it: R would count a request the upstream has not.
TRANSIT_SECONDS = 0.05
MIN_SAMPLES = 5  # one early sample must not set the factor alone
PENDING = 1024  # answers kept while waiting for the other processes' figures
STALE_AFTER = 5.0  # a process's published figures older than this many publish intervals are ignored

REMAINING_TOKENS = b"x-ratelimit-remaining-tokens"
LIMIT_TOKENS = b"x-ratelimit-limit-tokens"


def calibration_key(prefix: str, deployment_id: int) -> str:
    """The Redis hash holding every process's calibration figures for one deployment."""
    return f"{prefix}:{{d{deployment_id}}}:calibration"


def _clamp(value: float) -> float:
    return min(max(value, LOWEST), HIGHEST)


def _quantised(value: float) -> float:
    """Rounded up to ``QUANTUM``: erring low would admit more than the upstream does."""
    return round(math.ceil(_clamp(value) / QUANTUM - 1e-6) * QUANTUM, 6)


@dataclass(slots=True)
class Dispatched:
    """One reservation as the calibration saw it go out: ``[time, tokens]`` in the local log."""

    deployment_id: int
    entry: list  # [t, tokens]; tokens set to 0 when the upstream refused it (a 429)
    local_before: int  # this process's reservations on the deployment within the minute, this one included
    alone: bool = True  # no other reservation of this process went to the deployment just before it


@dataclass(slots=True)
class _Learned:
    log: deque = field(default_factory=deque)  # [t, tokens], oldest first
    reserved: int = 0  # sum of the log's tokens
    samples: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))
    local: float = 1.0  # median of this process's samples
    taken: int = 0  # samples taken by this process, ever
    factor: float = 1.0  # the factor in use (merged across processes)
    processes: int = 1
    # The other processes' last two publications: who -> (time before, reserved, time, reserved).
    others: dict = field(default_factory=dict)
    # Answers waiting for the other processes' figures to cover their time: (t, used, local R, limit).
    pending: deque = field(default_factory=lambda: deque(maxlen=PENDING))


class Calibration:
    """The learned factors of this process (and, with ``sync``, of all processes)."""

    def __init__(self, minute: float, *, clock=time.time) -> None:
        self.minute = minute
        self.clock = clock
        self._learned: dict[int, _Learned] = {}
        self._views: dict[tuple[int, int, float], Candidate] = {}

    def _get(self, deployment_id: int) -> _Learned:
        learned = self._learned.get(deployment_id)
        if learned is None:
            learned = self._learned[deployment_id] = _Learned()
        return learned

    def factor(self, deployment_id: int) -> float:
        learned = self._learned.get(deployment_id)
        return learned.factor if learned is not None else 1.0

    def capacity(self, deployment: Any) -> Capacity:
        """``deployment`` with its TPM in the gateway's units (divided by the factor)."""
        learned = self._learned.get(deployment.id)
        if learned is None or learned.factor == 1.0 or deployment.tpm <= 0:
            return deployment
        key = (deployment.id, deployment.tpm, learned.factor)
        view = self._views.get(key)
        if view is None or view.rpm != deployment.rpm or view.weight != deployment.weight:
            if len(self._views) > 4096:
                self._views.clear()  # bounded: factors move in 1 % steps, deployments are few
            view = self._views[key] = Candidate(
                deployment.id,
                deployment.rpm,
                max(1, int(deployment.tpm / learned.factor)),
                deployment.weight,
                deployment.sku,
                getattr(deployment, "model", ""),
            )
        return view

    # -- the request path -------------------------------------------------------------------------

    def _prune(self, learned: _Learned, now: float) -> None:
        horizon = now - self.minute
        entries = learned.log
        while entries and entries[0][0] <= horizon:
            learned.reserved -= entries.popleft()[1]

    def dispatched(self, deployment_id: int, tokens: int, now: float | None = None) -> Dispatched:
        """A reservation of ``tokens`` about to be sent to ``deployment_id``."""
        now = self.clock() if now is None else now
        learned = self._get(deployment_id)
        self._prune(learned, now)
        alone = not learned.log or now - learned.log[-1][0] >= TRANSIT_SECONDS
        entry = [now, tokens]
        learned.log.append(entry)
        learned.reserved += tokens
        return Dispatched(deployment_id, entry, learned.reserved, alone)

    def released(self, sent: Dispatched) -> None:
        """The reservation never reached the upstream: it leaves the local log."""
        tokens = sent.entry[1]
        if tokens:
            sent.entry[1] = 0
            self._get(sent.deployment_id).reserved -= tokens

    def answered(self, sent: Dispatched, tpm: int, headers: Iterable, *, rate_limited: bool = False) -> None:
        """The upstream's answer to ``sent`` (its headers as ``(name, value)`` byte pairs)."""
        learned = self._get(sent.deployment_id)
        reserved = sent.local_before
        if rate_limited:
            # Not counted upstream: not in its window, and not in ours for later samples.
            reserved -= sent.entry[1]
            self.released(sent)
        remaining = limit = None
        for name, value in headers:
            if name == REMAINING_TOKENS:
                remaining = _number(value)
            elif name == LIMIT_TOKENS:
                limit = _number(value)
        limit = limit or tpm
        if remaining is not None and limit and sent.alone:
            used = max(limit - remaining, 0)
            if learned.others:
                # R needs the other processes' reservations at the time this one went out: wait
                # for their next publications and interpolate (see ``merge``).
                learned.pending.append((sent.entry[0], used, reserved, limit))
            elif reserved >= MIN_SHARE * limit:
                self._sample(learned, used / reserved)
        elif rate_limited and remaining is None:
            self._sample(learned, learned.factor * NUDGE_429)

    def _sample(self, learned: _Learned, value: float) -> None:
        learned.samples.append(_clamp(value))
        learned.taken += 1
        if len(learned.samples) >= MIN_SAMPLES:
            learned.local = _quantised(_factor_of(learned.samples))
        if learned.processes <= 1:
            learned.factor = learned.local

    # -- sharing ----------------------------------------------------------------------------------

    def local_figures(self, now: float) -> dict[int, tuple[int, float, int]]:
        """Per deployment used by this process: (reserved within the minute, local factor, samples)."""
        figures = {}
        for deployment_id, learned in self._learned.items():
            self._prune(learned, now)
            if learned.reserved or learned.taken:
                figures[deployment_id] = (learned.reserved, learned.local, len(learned.samples))
        return figures

    def merge(self, deployment_id: int, others: dict[str, tuple[int, float, int, float]]) -> None:
        """Take the other processes' fresh figures for a deployment: who -> (reserved within the
        minute, factor, samples, time of publication). Absent processes are forgotten."""
        learned = self._get(deployment_id)
        history = learned.others
        for who in [w for w in history if w not in others]:
            del history[who]
        for who, (reserved, _, _, at) in others.items():
            before = history.get(who)
            if before is None:
                history[who] = (at, reserved, at, reserved)
            elif at > before[2]:
                history[who] = (before[2], before[3], at, reserved)
        self._settle_pending(learned)
        learned.processes = 1 + len(others)
        weights = [(f, n) for _, f, n, _ in others.values() if n > 0]
        if learned.samples:
            weights.append((learned.local, len(learned.samples)))
        total = sum(n for _, n in weights)
        if total:
            learned.factor = _quantised(sum(f * n for f, n in weights) / total)

    def _settle_pending(self, learned: _Learned) -> None:
        """Turn into samples the answers the other processes' publications now cover: their
        reservations at the answer's time, interpolated between the two publications around it.
        (Taking their last figure instead, up to an interval old, put a burst's start off by
        that interval's reservations: two processes learned 1.33 for a 1.1 upstream.)"""
        pending = learned.pending
        if not learned.others:
            pending.clear()
            return
        covered = min(h[2] for h in learned.others.values())
        oldest = max(h[0] for h in learned.others.values())
        while pending and pending[0][0] <= covered:
            t, used, local, limit = pending.popleft()
            if t < oldest:
                continue  # before the publications kept: cannot be placed
            reserved = local
            for before, r0, at, r1 in learned.others.values():
                reserved += r0 + (r1 - r0) * (t - before) / (at - before) if at > before else r1
            if reserved >= MIN_SHARE * limit:
                self._sample(learned, used / reserved)

    def status(self, deployment_id: int) -> dict:
        """For the status page and API: the factor in use and what it was learned from."""
        learned = self._learned.get(deployment_id)
        if learned is None:
            return {"factor": 1.0, "local_factor": 1.0, "samples": 0, "processes": 1}
        return {
            "factor": learned.factor,
            "local_factor": learned.local,
            "samples": len(learned.samples),
            "processes": learned.processes,
        }

    def reset(self) -> None:
        self._learned.clear()
        self._views.clear()


def _factor_of(samples) -> float:
    """The ``QUANTILE`` of the samples (nearest rank), raised by ``SPREAD_MARGIN`` times their
    relative spread between ``LOW_QUANTILE`` and ``QUANTILE`` (0 when they agree), at most
    ``MAX_MARGIN``; within ``DEADBAND`` below 1, 1."""
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[int(q * (len(ordered) - 1) + 0.5)]

    upper, middle = rank(QUANTILE), rank(0.5)
    spread = (upper - rank(LOW_QUANTILE)) / middle
    factor = upper * (1.0 + min(SPREAD_MARGIN * spread, MAX_MARGIN))
    return 1.0 if 1.0 - DEADBAND <= factor < 1.0 else factor


def _number(value: bytes | str) -> int | None:
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        return None
    return number if number >= 0 and math.isfinite(number) else None


class CalibrationSync:
    """Publishes this process's figures to Redis and merges everyone's, every ``interval`` seconds."""

    def __init__(self, calibration: Calibration, redis, prefix: str, interval: float) -> None:
        self.calibration = calibration
        self.redis = redis
        self.prefix = prefix
        self.interval = interval
        self.me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._task: asyncio.Task | None = None
        self._known: set[int] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="balancer-calibration")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.exchange()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: go on with this process's own figures
                log.debug("calibration exchange failed: %s", exc)
                self.forget_others()
            await asyncio.sleep(self.interval)

    def forget_others(self) -> None:
        """Drop the other processes' figures: without Redis they cannot be kept fresh. (Their
        reservations leave R, so the samples, and the factor, err on the high side meanwhile.)"""
        for deployment_id in self._known:
            self.calibration.merge(deployment_id, {})

    async def exchange(self, now: float | None = None) -> None:
        """One round: publish, then merge (one pipeline each way)."""
        now = time.time() if now is None else now
        figures = self.calibration.local_figures(now)
        self._known.update(figures)
        if not self._known:
            return
        ttl_ms = int(max(self.interval * STALE_AFTER * 4, self.calibration.minute * 2) * 1000)
        ids = sorted(self._known)
        pipe = self.redis.pipeline(transaction=False)
        for deployment_id, (reserved, factor, samples) in figures.items():
            key = calibration_key(self.prefix, deployment_id)
            pipe.hset(key, self.me, f"{reserved}|{factor:.4f}|{samples}|{now:.3f}")
            pipe.pexpire(key, ttl_ms)
        for deployment_id in ids:
            pipe.hgetall(calibration_key(self.prefix, deployment_id))
        replies = await pipe.execute()
        stale = now - self.interval * STALE_AFTER
        for deployment_id, fields in zip(ids, replies[-len(ids) :], strict=True):
            others = {}
            for who, raw in (fields or {}).items():
                name = who.decode() if isinstance(who, bytes) else who
                if name == self.me:
                    continue
                parsed = _parse(raw)
                if parsed is not None and parsed[3] >= stale:
                    others[name] = parsed
            self.calibration.merge(deployment_id, others)


def _parse(raw: bytes | str) -> tuple[int, float, int, float] | None:
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        reserved, factor, samples, at = text.split("|")
        return int(reserved), float(factor), int(samples), float(at)
    except (ValueError, UnicodeDecodeError):
        return None
