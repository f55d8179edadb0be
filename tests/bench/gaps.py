"""Stream gaps under big prompts: ``python -m tests.bench.gaps SPEC.json`` prints one JSON result.

``streams`` connections each stream a chat completion after another; every ``data:`` read is
time-stamped, and the gap between two reads of one response is what a user of that stream
sees as stutter. The run has two windows of ``window_s`` each: streams alone (the baseline),
then streams while ``big_rate`` requests per second with a ``big_mb`` MB prompt arrive on
their own connections (open loop: sent on schedule whatever the gateway does). A gateway that
parses or counts the big prompts on its event loop stalls every stream for that long; the rise
of the gaps' p99 from the first window to the second is the figure.

The spec (JSON)::

    {"host": "127.0.0.1", "port": 8000, "streams": 8, "window_s": 8, "warmup_s": 1,
     "stream": {"path": "/v1/chat/completions", "headers": {...}, "body": "{...}"},
     "big": {"path": "/v1/chat/completions", "headers": {...}, "model": "bench-big"},
     "big_rate": 2.0, "big_mb": 5.0}
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import random
import sys
import time
from collections import Counter
from typing import Any

import httptools

from tests.bench.loadgen import build_request
from tests.bench.stats import summarize

perf_counter = time.perf_counter

_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]
_WORDS += ["quietly", "box", "and", "judge", "every", "vexing", "quiz", "about", "zebras", "near", "harbour"]


def big_prompt(megabytes: float, seed: int = 7) -> str:
    """About ``megabytes`` MB of plain words (roughly 1.1 tokens per word in o200k)."""
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    words: list[str] = []
    size = 0
    while size < target:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


class Exchange(asyncio.Protocol):
    """One request on its own connection (``connection: close``); records its response's reads."""

    def __init__(self, data: bytes, done: asyncio.Future) -> None:
        self.data = data
        self.done = done
        self.reads: list[float] = []
        self.status = 0
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)
        self.t0 = 0.0

    def connection_made(self, transport) -> None:
        self.t0 = perf_counter()
        transport.write(self.data)

    def data_received(self, data: bytes) -> None:
        if b"data:" in data:
            self.reads.append(perf_counter())
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish()

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.complete = True

    def connection_lost(self, exc) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(self)


async def exchange(host: str, port: int, data: bytes) -> Exchange:
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    transport, _ = await loop.create_connection(lambda: Exchange(data, done), host, port)
    try:
        return await done
    finally:
        transport.close()


class Windows:
    """Which window a moment falls in: ``warmup``, ``baseline``, ``loaded`` or None (after)."""

    def __init__(self, warmup: float, window: float) -> None:
        self.start = perf_counter()
        self.baseline_at = self.start + warmup
        self.loaded_at = self.baseline_at + window
        self.end = self.loaded_at + window

    def of(self, moment: float) -> str | None:
        if moment < self.baseline_at:
            return "warmup"
        if moment < self.loaded_at:
            return "baseline"
        if moment < self.end:
            return "loaded"
        return None


async def stream_worker(spec: dict[str, Any], windows: Windows, gaps: dict[str, list[float]], errors: Counter) -> None:
    host, port = spec["host"], int(spec["port"])
    s = spec["stream"]
    data = build_request(host, port, s["path"], {**s["headers"], "connection": "close"}, s["body"])
    while perf_counter() < windows.end:
        try:
            result = await exchange(host, port, data)
        except OSError as exc:
            errors[f"stream connect: {exc}"] += 1
            await asyncio.sleep(0.05)
            continue
        if result.status != 200 or not result.complete:
            errors[f"stream status {result.status}"] += 1
            continue
        for before, after in itertools.pairwise(result.reads):
            window = windows.of(before)
            if window in gaps:
                gaps[window].append((after - before) * 1000.0)


async def big_sender(spec: dict[str, Any], windows: Windows, outcomes: list[dict[str, Any]]) -> None:
    host, port = spec["host"], int(spec["port"])
    b = spec["big"]
    body = json.dumps(
        {"model": b["model"], "max_tokens": 1, "messages": [{"role": "user", "content": big_prompt(spec["big_mb"])}]},
        separators=(",", ":"),
    )
    data = build_request(host, port, b["path"], {**b["headers"], "connection": "close"}, body)
    interval = 1.0 / float(spec["big_rate"])
    pending: set[asyncio.Task] = set()

    async def one(due: float) -> None:
        try:
            result = await exchange(host, port, data)
            outcomes.append({"status": result.status, "latency_ms": (perf_counter() - due) * 1000.0})
        except OSError as exc:
            outcomes.append({"status": f"connect: {exc}", "latency_ms": None})

    due = windows.loaded_at
    while due < windows.end:
        now = perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        task = asyncio.create_task(one(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        due += interval
    if pending:
        await asyncio.wait(pending, timeout=30)
    outcomes.append({"body_bytes": len(body.encode())})


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    windows = Windows(float(spec.get("warmup_s", 1.0)), float(spec["window_s"]))
    gaps: dict[str, list[float]] = {"baseline": [], "loaded": []}
    errors: Counter = Counter()
    outcomes: list[dict[str, Any]] = []
    workers = [stream_worker(spec, windows, gaps, errors) for _ in range(int(spec["streams"]))]
    await asyncio.gather(*workers, big_sender(spec, windows, outcomes))
    sizes = [o["body_bytes"] for o in outcomes if "body_bytes" in o]
    big = [o for o in outcomes if "status" in o]
    baseline, loaded = summarize(gaps["baseline"]), summarize(gaps["loaded"])
    return {
        "streams": int(spec["streams"]),
        "window_s": float(spec["window_s"]),
        "gap_ms": {"baseline": baseline, "loaded": loaded},
        "p99_rise_ms": (loaded["p99"] - baseline["p99"]) if loaded["p99"] is not None and baseline["p99"] else None,
        "big": {
            "rate": float(spec["big_rate"]),
            "body_mb": sizes[0] / 1e6 if sizes else None,
            "status": dict(Counter(str(o["status"]) for o in big)),
            "latency_ms": summarize(o["latency_ms"] for o in big if o["latency_ms"] is not None),
        },
        "errors": dict(errors),
    }


def main(argv: list[str]) -> int:
    import uvloop

    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    gc.disable()  # flat lists of floats only: nothing for the collector to find
    result = uvloop.run(run(spec))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
