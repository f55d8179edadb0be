"""How much the simulated model writes: choices, and tokens per choice.

A deployment writes its configured ``completion_tokens`` per choice, cut short by the request's
limit (``max_completion_tokens``, else ``max_tokens``; completions without either stop at 16,
the API's default), in which case the choice ends with ``finish_reason: "length"``.
"""

from __future__ import annotations

from typing import Any

from gateway.proxy.tokens import COMPLETIONS_DEFAULT_MAX_TOKENS, ROUTE_COMPLETIONS


def _positive_int(value: Any) -> int | None:
    # bool is an int subclass; a JSON true is not a token count.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def choices(body: dict[str, Any]) -> int:
    """How many choices the response carries (``n``, at least 1)."""
    return _positive_int(body.get("n")) or 1


def generated_tokens(kind: str, body: dict[str, Any], configured: int) -> tuple[int, bool]:
    """``(tokens per choice, cut short by the request's limit?)`` given ``completion_tokens``."""
    cap = _positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))
    if cap is None and kind == ROUTE_COMPLETIONS:
        cap = COMPLETIONS_DEFAULT_MAX_TOKENS
    if cap is not None and cap < configured:
        return cap, True
    return configured, False
