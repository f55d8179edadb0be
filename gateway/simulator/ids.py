"""Cheap unique ids for responses and request-id headers.

``uuid.uuid4()`` costs a syscall and an object per call, which showed up in the benchmark
profile. A random per-process prefix plus a counter is just as unique for a simulator and
still looks like a UUID (8-4-4-4-12 hex) to code that parses ``x-request-id``.
"""

from __future__ import annotations

import itertools
import os

_PREFIX = os.urandom(10).hex()  # 20 hex digits: the 8-4-4-4 part
_HEAD = f"{_PREFIX[:8]}-{_PREFIX[8:12]}-4{_PREFIX[13:16]}-{_PREFIX[16:20]}-"
_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def request_id() -> str:
    """A UUID-shaped id, unique within the process (and, by its prefix, across processes)."""
    return f"{_HEAD}{next(_counter) & 0xFFFFFFFFFFFF:012x}"


def response_id(prefix: str) -> str:
    """``chatcmpl-...`` / ``cmpl-...`` style ids."""
    return f"{prefix}{_PREFIX[:12]}{next(_counter) & 0xFFFFFFFFFFFF:012x}"
