"""Per-deployment counters served by ``GET /_sim/stats``.

Field contract (all counts since start or the last reset):

* ``requests``: model calls that reached the deployment (after auth and routing).
* ``served``: completed 2xx responses (a stream counts once its ``[DONE]`` was written).
* ``rate_limited``: 429 answers (window, PTU or injected).
* ``errors``: 5xx answers plus connections dropped by a ``drop`` fault (also in ``dropped``).
* ``by_status``: ``{"200": n, "429": n, ...}`` for every completed response (dropped
  connections and client disconnects are counted apart).
* ``client_disconnects``: callers that went away before the response was complete.
* ``tokens_counted``: the arrival charges (prompt + completion allowance, see :mod:`.arrival`) of
  admitted requests.
* ``prompt_tokens`` / ``completion_tokens``: usage of admitted requests (completion tokens
  actually produced, so a dropped stream counts what it sent).
* ``max_requests_in_window`` / ``max_tokens_in_window``: ``{"<seconds>": peak}`` from the
  arrival log, for the request windows and the token window.
* ``in_flight`` / ``max_in_flight``: admitted requests still being answered.
"""

from __future__ import annotations

from typing import Any


def window_key(seconds: float) -> str:
    """``60.0`` -> ``"60"``, ``0.1`` -> ``"0.1"``: stable JSON keys for window lengths."""
    return format(round(seconds, 6), "g")


class DeploymentStats:
    __slots__ = (
        "by_status",
        "client_disconnects",
        "completion_tokens",
        "dropped",
        "errors",
        "in_flight",
        "max_in_flight",
        "prompt_tokens",
        "rate_limited",
        "requests",
        "served",
        "tokens_counted",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.served = 0
        self.rate_limited = 0
        self.errors = 0
        self.dropped = 0
        self.client_disconnects = 0
        self.by_status: dict[int, int] = {}
        self.tokens_counted = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def status(self, status: int) -> None:
        """Record a response status that was sent to the caller."""
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if 200 <= status < 300:
            self.served += 1
        elif status == 429:
            self.rate_limited += 1
        elif status >= 500:
            self.errors += 1

    def drop(self) -> None:
        self.dropped += 1
        self.errors += 1

    def enter(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def leave(self) -> None:
        self.in_flight -= 1

    def snapshot(self, peak_requests: dict[float, int], peak_tokens: dict[float, int]) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "served": self.served,
            "rate_limited": self.rate_limited,
            "errors": self.errors,
            "dropped": self.dropped,
            "client_disconnects": self.client_disconnects,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "tokens_counted": self.tokens_counted,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "max_requests_in_window": {window_key(s): v for s, v in sorted(peak_requests.items())},
            "max_tokens_in_window": {window_key(s): v for s, v in sorted(peak_tokens.items())},
        }
