"""Server-sent events passing through the gateway: split into events, watch for usage, forward.

The relay never holds more than one incomplete event: every complete event is forwarded as soon
as it arrives. It removes the final ``"choices": []`` usage chunk when the gateway asked the
upstream for usage but the client did not (client code often indexes ``choices[0]``), and
counts completion tokens as the stream passes, in case the upstream never sends usage.

Counting is batched: the ``data:`` payloads wait, unparsed, until ``COUNT_BATCH_BYTES`` of them
have passed, then are parsed and fed to a ``StreamTokenCounter`` and dropped. Memory per stream
stays bounded however long it runs, and a stream that ends with its usage chunk (nearly all do:
the gateway asks for it) is never parsed at all; parsing every event as it came would cost
~3 us per event on every stream for a count that is almost never needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol

_DONE = b"[DONE]"
COUNT_BATCH_BYTES = 64 * 1024


class TokenCounter(Protocol):
    def feed(self, chunk: object) -> None: ...
    def completion_tokens(self) -> int: ...


class SseRelay:
    """Feed it upstream bytes; it returns the bytes to send on, and learns the usage on the way.

    ``counter``: makes the token counter for streams without usage (called at most once, when
    the first batch is counted); None: no counting.
    """

    __slots__ = (
        "_batch",
        "_batch_bytes",
        "_counter",
        "_make_counter",
        "_pending",
        "client_wants_usage",
        "done",
        "events",
        "usage",
    )

    def __init__(self, client_wants_usage: bool, counter: Callable[[], TokenCounter] | None = None) -> None:
        self.client_wants_usage = client_wants_usage
        self.usage: dict | None = None
        self.done = False
        self.events = 0
        self._pending = b""
        self._make_counter = counter
        self._counter: TokenCounter | None = None
        self._batch: list[bytes] = []  # data payloads not yet counted
        self._batch_bytes = 0

    def feed(self, chunk: bytes) -> bytes:
        """Take upstream bytes; return the complete events among them that the client should get."""
        buf = self._pending + chunk if self._pending else chunk
        if b"\r" in buf:
            # Some servers (sse-starlette) end lines with CRLF; both are valid SSE, pass on LF.
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._pending = buf
            return b""
        complete, self._pending = buf[: end + 2], buf[end + 2 :]
        out = []
        keep_all = True
        for event in complete.split(b"\n\n")[:-1]:
            if self._inspect(event):
                out.append(event)
            else:
                keep_all = False
        if keep_all:
            return complete
        return b"".join(e + b"\n\n" for e in out)

    def finish(self) -> bytes:
        """The upstream closed: whatever incomplete event remains (normally nothing)."""
        rest, self._pending = self._pending, b""
        if rest.strip() and self._inspect(rest.rstrip(b"\r\n")):
            return rest
        return b""

    def _inspect(self, event: bytes) -> bool:
        """Look at one event; return whether to forward it."""
        self.events += 1
        data = _data_of(event)
        if data is None:
            return True  # comments (keep-alives) and other fields pass through
        if data.startswith(_DONE):
            self.done = True
            return True
        if self.usage is None and self._make_counter is not None:
            self._batch.append(data)
            self._batch_bytes += len(data)
            if self._batch_bytes >= COUNT_BATCH_BYTES:
                self._count_batch()
        if b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data:
            try:
                parsed = json.loads(data)
            except ValueError:
                return True
            usage = parsed.get("usage") if isinstance(parsed, dict) else None
            if isinstance(usage, dict):
                self.usage = usage
                self._batch, self._batch_bytes = [], 0  # the upstream's figure replaces any count
                if not self.client_wants_usage and not parsed.get("choices"):
                    return False
        return True

    def counted_completion_tokens(self) -> int:
        """Completion tokens counted from the events so far (for a stream that sent no usage)."""
        self._count_batch()
        return self._counter.completion_tokens() if self._counter is not None else 0

    def _count_batch(self) -> None:
        if not self._batch or self._make_counter is None:
            return
        if self._counter is None:
            self._counter = self._make_counter()
        for data in self._batch:
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            self._counter.feed(chunk)
        self._batch, self._batch_bytes = [], 0


def _data_of(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event, or None if it has none."""
    event = event.replace(b"\r\n", b"\n")
    if event.startswith(b"data:") and b"\ndata:" not in event:
        return event[5:].strip()
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def usage_from_json_body(body: bytes) -> dict | None:
    """The ``usage`` object of a non-streamed JSON response, found without parsing the whole body.

    Embedding responses can be megabytes of base64; ``usage`` sits near the end, so look for the
    last ``"usage"`` and decode just the object after it.
    """
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    start = body.find(b"{", at)
    if start < 0:
        return None
    try:
        usage, _ = json.JSONDecoder().raw_decode(body[start:].decode("utf-8", "replace"))
    except ValueError:
        return None
    return usage if isinstance(usage, dict) else None
