"""Server-sent events passing through the gateway: the upstream's bytes, looked into only where needed.

``SseRelay.feed`` takes whatever the upstream connection delivered and returns the bytes to send
on: every complete event among them, exactly as the upstream wrote them, in one piece (so one
read upstream is one write to the client). An incomplete trailing event waits for its end (the
"tail"; upstreams write whole events, so it is nearly always empty). Nothing is split into events
or parsed on the way, except where the gateway must look, found with ``bytes.find`` on the block:

* the usage chunk (``"usage": {...}``, not ``"usage": null``): parsed for the usage record, and
  cut out when the gateway asked the upstream for usage but the client did not (``"choices": []``;
  client code often indexes ``choices[0]``);
* ``data: [DONE]``, the end (a stream that closes without it broke off);
* an error event (``data: {"error": ...}`` or ``event: error``): parsed for the usage record's
  error code, and passed on as sent.

Completion tokens are counted only for streams that never send usage (an upstream that ignores
``stream_options``, or a stream broken off before its usage chunk): the complete blocks wait,
unparsed, until ``COUNT_BATCH_BYTES`` of them have passed, then are split, parsed, fed to a
``StreamTokenCounter`` and dropped. Memory per stream stays bounded however long it runs, and a
stream that ends with its usage chunk (nearly all do: the gateway asks for it) is never parsed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

COUNT_BATCH_BYTES = 64 * 1024

_USAGE_KEY = b'"usage"'
_NULL_USAGE = b'"usage":null'
_DONE = b"[DONE]"
_ERROR_MARKERS = (b'data: {"error"', b'data:{"error"', b"event: error", b"event:error")
_WHITESPACE = b" \t\r\n"


class TokenCounter(Protocol):
    def feed(self, chunk: object) -> None: ...
    def completion_tokens(self) -> int: ...


class SseRelay:
    """Feed it upstream bytes; it returns the bytes to send on, and learns usage, end and errors.

    ``counter``: makes the token counter for streams without usage (called at most once, when
    the first batch is counted); None: no counting. After the stream: ``usage`` (the upstream's
    usage object, or None), ``done`` (``[DONE]`` seen), ``error`` (the ``error`` object of the
    first error event, or None).
    """

    __slots__ = (
        "_batch",
        "_batch_bytes",
        "_counter",
        "_make_counter",
        "_tail",
        "client_wants_usage",
        "done",
        "error",
        "usage",
    )

    def __init__(self, client_wants_usage: bool, counter: Callable[[], TokenCounter] | None = None) -> None:
        self.client_wants_usage = client_wants_usage
        self.usage: dict | None = None
        self.error: dict | None = None
        self.done = False
        self._tail: list[bytes] = []  # an incomplete event, as it arrived
        self._make_counter = counter
        self._counter: TokenCounter | None = None
        self._batch: list[bytes] = []  # complete blocks not yet counted
        self._batch_bytes = 0

    def feed(self, chunk: bytes) -> bytes:
        """Take upstream bytes; return the complete events among them that the client should get."""
        if not self._tail and chunk[-2:] == b"\n\n":
            return self._complete(chunk)  # whole events, the usual read: no copy, no split
        tail = self._tail
        if tail:
            # A terminator may straddle the previous piece and this one: look at both ends.
            if _last_end(tail[-1][-3:] + chunk[:3]) < 0 and _last_end(chunk) < 0:
                tail.append(chunk)
                return b""
            chunk = b"".join(tail) + chunk
            tail.clear()
        end = _last_end(chunk)
        if end < 0:
            tail.append(chunk)
            return b""
        if end < len(chunk):
            tail.append(chunk[end:])
            chunk = chunk[:end]
        return self._complete(chunk)

    def finish(self) -> bytes:
        """The upstream closed: what is left of an unterminated last event, as it came."""
        if not self._tail:
            return b""
        rest = b"".join(self._tail)
        self._tail.clear()
        return self._complete(rest) if rest.strip() else rest

    def _complete(self, block: bytes) -> bytes:
        """Look at a block of whole events where the gateway must; return what to send on."""
        if self.usage is None:
            sent = block
            # Upstreams asked for usage put "usage": null in every other chunk: count to tell them apart.
            if _USAGE_KEY in block and block.count(_USAGE_KEY) != block.count(_NULL_USAGE):
                sent = self._take_usage(block)
            if self.usage is None and self._make_counter is not None:
                self._batch.append(block)
                self._batch_bytes += len(block)
                if self._batch_bytes >= COUNT_BATCH_BYTES:
                    self._count_batch()
            block = sent
        if not self.done and _DONE in block:
            self.done = _is_done(block)
        # An error object in a JSON string would be escaped ({\"error\"): this finds only real ones.
        if self.error is None and (b'{"error"' in block or b"event:" in block):
            self._take_error(block)
        return block

    def _take_usage(self, block: bytes) -> bytes:
        """Find a non-null ``"usage"`` value; keep the usage, and drop its event if the client did not ask."""
        at = block.find(_USAGE_KEY)
        while at >= 0:
            value = _value_start(block, at + len(_USAGE_KEY))
            if value < len(block) and block[value] == 0x7B:  # "{"
                start, end = _event_bounds(block, at)
                parsed = _parse_event(block[start:end])
                usage = parsed.get("usage") if isinstance(parsed, dict) else None
                if isinstance(usage, dict):
                    self.usage = usage
                    self._batch, self._batch_bytes = [], 0  # the upstream's figure replaces any count
                    if not self.client_wants_usage and not parsed.get("choices"):
                        return block[:start] + block[end:]
                    return block
                at = block.find(_USAGE_KEY, end)
                continue
            at = block.find(_USAGE_KEY, value)
        return block

    def _take_error(self, block: bytes) -> None:
        for marker in _ERROR_MARKERS:
            at = block.find(marker)
            while at >= 0:
                if at == 0 or block[at - 1] in b"\r\n":
                    start, end = _event_bounds(block, at)
                    parsed = _parse_event(block[start:end])
                    error = parsed.get("error", parsed) if isinstance(parsed, dict) else None
                    self.error = error if isinstance(error, dict) else {}
                    return
                at = block.find(marker, at + 1)

    def counted_completion_tokens(self) -> int:
        """Completion tokens counted from the events so far (for a stream that sent no usage)."""
        self._count_batch()  # a cut-off last event (a broken stream) stays uncounted: it cannot be parsed
        return self._counter.completion_tokens() if self._counter is not None else 0

    def _count_batch(self) -> None:
        if not self._batch or self._make_counter is None:
            return
        if self._counter is None:
            self._counter = self._make_counter()
        for block in self._batch:
            for event in _events(block):
                data = _data_of(event)
                if data is None or data.startswith(_DONE):
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError:
                    continue
                self._counter.feed(chunk)
        self._batch, self._batch_bytes = [], 0


# --- finding things in a block of events ---------------------------------------------------------


def _last_end(buf: bytes) -> int:
    """The index just past the last event terminator (a blank line after LF or CRLF line ends), or -1."""
    at = buf.rfind(b"\n\n")
    end = at + 2 if at >= 0 else -1
    if b"\r" in buf:
        at = buf.rfind(b"\n\r\n")  # CRLF CRLF, or LF CRLF
        if at >= 0 and at + 3 > end:
            end = at + 3
    return end


def _event_bounds(block: bytes, at: int) -> tuple[int, int]:
    """Start and end (past its terminator) of the event around position ``at`` of a block of whole events."""
    start = 0
    before = block.rfind(b"\n\n", 0, at)
    if before >= 0:
        start = before + 2
    before = block.rfind(b"\n\r\n", 0, at)
    if before >= 0 and before + 3 > start:
        start = before + 3
    end = len(block)
    after = block.find(b"\n\n", at)
    if after >= 0:
        end = after + 2
    after = block.find(b"\n\r\n", at)
    if after >= 0 and after + 3 < end:
        end = after + 3
    return start, end


def _value_start(block: bytes, at: int) -> int:
    """The index of the JSON value after the key ending at ``at`` (past the colon and whitespace)."""
    n = len(block)
    while at < n and block[at] in _WHITESPACE:
        at += 1
    if at < n and block[at] == 0x3A:  # ":"
        at += 1
    while at < n and block[at] in _WHITESPACE:
        at += 1
    return at


def _is_done(block: bytes) -> bool:
    """Whether the block holds a ``data: [DONE]`` line (not the text inside some JSON string)."""
    at = block.find(_DONE)
    while at >= 0:
        line = max(block.rfind(b"\n", 0, at), block.rfind(b"\r", 0, at)) + 1
        if block[line:at].rstrip() in (b"data:",):
            return True
        at = block.find(_DONE, at + 1)
    return False


def _events(block: bytes) -> list[bytes]:
    """The events of a block of whole events (terminators removed)."""
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return [e for e in block.split(b"\n\n") if e]


def _data_of(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event, or None if it has none."""
    if b"\r" in event:
        event = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if event.startswith(b"data:") and b"\ndata:" not in event:
        return event[5:].strip()
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _parse_event(event: bytes) -> Any:
    """The JSON of one event's data, or None when it has none or it is not JSON."""
    data = _data_of(event.rstrip(b"\r\n"))
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


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
