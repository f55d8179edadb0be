"""What a request cost, from the prices in effect when it started. Pure: no database access."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

MILLION = Decimal(1_000_000)


def price_for(prices, started_at: datetime):
    """The newest price row (newest first in ``prices``) effective at ``started_at``, or None."""
    for price in prices:
        if price.effective_from <= started_at:
            return price
    return None


def cost_of(price, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> Decimal:
    """Cost in the price's currency. Cached prompt tokens are billed at the cached-input rate."""
    if price is None:
        return Decimal(0)
    cached = min(cached_tokens, prompt_tokens)
    return (
        (prompt_tokens - cached) * price.input_per_million
        + cached * price.cached_input_per_million
        + completion_tokens * price.output_per_million
    ) / MILLION
