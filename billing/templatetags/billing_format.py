"""Number formats for the dashboards (no django.contrib.humanize: it is not an installed app)."""

from __future__ import annotations

from typing import Any

from django import template

from billing.models import UsageRecord

register = template.Library()
_OUTCOMES = dict(UsageRecord.Outcome.choices)


@register.filter
def thousands(value: Any) -> str:
    """12345 -> "12,345"; None -> "—"."""
    if value is None or value == "":
        return "—"
    return f"{int(value):,}"


@register.filter
def ms(value: Any) -> str:
    """Milliseconds, shortened past a second: 850 -> "850 ms", 2400 -> "2.4 s"."""
    if value is None:
        return "—"
    value = float(value)
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


@register.filter
def bar_width(value: Any) -> str:
    """A percentage clamped to 0..100 for a CSS width."""
    try:
        return f"{min(max(float(value), 0.0), 100.0):.1f}"
    except (TypeError, ValueError):
        return "0"


@register.filter
def outcome_label(value: str) -> str:
    return str(_OUTCOMES.get(value, value))
