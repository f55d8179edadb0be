"""Injected faults: how a deployment misbehaves on purpose.

Fault shapes (JSON, from the control API or a deployment's ``faults`` list):

* ``{"kind": "status", "status": 500, "count": N}`` the next N requests get that status with
  an OpenAI-shaped error body (no ``count`` = until cleared). Optional ``message``, ``type``,
  ``code`` and ``param`` shape that body; ``{credential}`` in the message is replaced by the
  credential the request carried (the way some servers quote the key they were sent), so tests
  can check that it never reaches a gateway's client.
* ``{"kind": "rate_limit", "retry_after_ms": 5000, "count": N}`` forced 429 carrying that
  retry-after (PTU spill-over rehearsals).
* ``{"kind": "timeout", "seconds": S, "count": N}`` hold the request S seconds before the
  first byte, then answer normally (a client with a shorter timeout gives up first).
* ``{"kind": "drop", "after_chunks": K, "count": N}`` streaming: close the connection abruptly
  after K SSE events; non-streaming: close it without any response.
* ``{"kind": "probability", "status": 500, "p": 0.1}`` each request fails with that status
  with probability p (optional ``"seed"`` for reproducible runs), until cleared.

Ordering contract: "status", "rate_limit" and "probability" refuse the request *before*
admission, so it consumes no rate-limit capacity (the model never saw it). "timeout" and
"drop" act on an admitted request, which therefore counts, as a slow or broken upstream
would have counted it. Several faults may be active, but a request triggers at most one:
the refusing kinds are tried first, then (once admitted) "timeout"/"drop", each group in
injection order, and only the fault that fires has its ``count`` consumed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError

STATUS = "status"
RATE_LIMIT = "rate_limit"
TIMEOUT = "timeout"
DROP = "drop"
PROBABILITY = "probability"

# Faults decided before admission vs. faults shaping an admitted response.
REFUSING = frozenset({STATUS, RATE_LIMIT, PROBABILITY})

_FIELDS = {
    STATUS: ({"status"}, {"count", "message", "type", "code", "param"}),
    RATE_LIMIT: (set(), {"retry_after_ms", "count"}),
    TIMEOUT: ({"seconds"}, {"count"}),
    DROP: (set(), {"after_chunks", "count"}),
    PROBABILITY: ({"p"}, {"status", "seed"}),
}


@dataclass(slots=True)
class Fault:
    """One active fault. ``remaining`` None = unlimited."""

    kind: str
    status: int = 500
    retry_after_ms: float = 1000.0
    seconds: float = 0.0
    after_chunks: int = 0
    p: float = 0.0
    message: str | None = None  # status faults: the error body's fields (None: the defaults)
    type: str | None = None
    code: str | None = None
    param: str | None = None
    remaining: int | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind}
        if self.kind in (STATUS, PROBABILITY):
            data["status"] = self.status
        for name in ("message", "type", "code", "param"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.kind == RATE_LIMIT:
            data["retry_after_ms"] = self.retry_after_ms
        if self.kind == TIMEOUT:
            data["seconds"] = self.seconds
        if self.kind == DROP:
            data["after_chunks"] = self.after_chunks
        if self.kind == PROBABILITY:
            data["p"] = self.p
        if self.remaining is not None:
            data["count"] = self.remaining
        return data


def _number(where: str, value: Any, minimum: float, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else f">= {minimum:g}"
        raise ConfigError(f"{where}: must be {bound}, got {value!r}")
    return float(value)


def _integer(where: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    _number(where, value, minimum, maximum)
    return value


def parse_fault(data: Any, where: str = "fault") -> Fault:
    """Validate a fault mapping; errors name the offending key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in _FIELDS:
        raise ConfigError(f"{where}.kind: must be one of {', '.join(_FIELDS)}; got {kind!r}")
    required, optional = _FIELDS[kind]
    allowed = required | optional | {"kind"}
    for key in data:
        if key not in allowed:
            raise ConfigError(f"unknown key {where}.{key} for a {kind!r} fault; allowed: {', '.join(sorted(allowed))}")
    for key in required:
        if key not in data:
            raise ConfigError(f"{where}: a {kind!r} fault needs {key!r}")
    fault = Fault(kind=kind)
    if "status" in data:
        fault.status = _integer(f"{where}.status", data["status"], 100, 599)
    if "retry_after_ms" in data:
        fault.retry_after_ms = _number(f"{where}.retry_after_ms", data["retry_after_ms"], 0)
    if "seconds" in data:
        fault.seconds = _number(f"{where}.seconds", data["seconds"], 0)
    if "after_chunks" in data:
        fault.after_chunks = _integer(f"{where}.after_chunks", data["after_chunks"], 0)
    if "p" in data:
        fault.p = _number(f"{where}.p", data["p"], 0, 1)
    for name in ("message", "type", "code", "param"):
        if name in data:
            if not isinstance(data[name], str):
                raise ConfigError(f"{where}.{name}: expected a string, got {data[name]!r}")
            setattr(fault, name, data[name])
    if "count" in data and data["count"] is not None:
        fault.remaining = _integer(f"{where}.count", data["count"], 1)
    if "seed" in data:
        fault.rng = random.Random(data["seed"])
    return fault


class FaultQueue:
    """The active faults of one deployment, in injection order."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def __bool__(self) -> bool:
        return bool(self._faults)

    def add(self, fault: Fault) -> None:
        self._faults.append(fault)

    def clear(self) -> None:
        self._faults.clear()

    def describe(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self._faults]

    def take(self, kinds: frozenset[str] | None = None) -> Fault | None:
        """The first fault (of ``kinds``) that fires now, consuming one of its count."""
        for fault in self._faults:
            if kinds is not None and fault.kind not in kinds:
                continue
            if fault.kind == PROBABILITY and fault.rng.random() >= fault.p:
                continue
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
            return fault
        return None
