"""Quota use in the admin: each limit and budget of a tenant or key as a progress bar of its use.

The numbers come from ``tenants.selectors.quota_use_read`` (the counters admission uses), read
once for all the rows of a page.
"""

from __future__ import annotations

import time
from zoneinfo import ZoneInfo

from django.conf import settings
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from gateway.snapshot.build import quota_view
from tenants.models import Quota
from tenants.quota_state.contract import (
    DAILY_TOKENS,
    MONTHLY_COST,
    MONTHLY_TOKENS,
    RPM,
    TPM,
    ScopeLimits,
    ScopeUse,
)
from tenants.quotas import Periods, money, periods_at, scope_limits

# (limit, label, short label, the ScopeUse field that counts against it)
LINES = (
    (RPM, "Requests per minute", "RPM", "requests"),
    (TPM, "Tokens per minute", "TPM", "tokens"),
    (DAILY_TOKENS, "Tokens today", "day", "day_tokens"),
    (MONTHLY_TOKENS, "Tokens this month", "month", "month_tokens"),
    (MONTHLY_COST, "Cost this month", "cost", "month_cost"),
)

BAR = (
    '<div class="quota-line" style="display:flex;align-items:center;gap:.5em;margin:2px 0;white-space:nowrap">'
    '<span style="min-width:{label_width}">{label}</span>'
    '<span role="progressbar" aria-label="{label}" aria-valuenow="{percent}" aria-valuemin="0" aria-valuemax="100" '
    'style="display:inline-block;width:{bar_width};height:.7em;background:#e4e4e4;border-radius:3px;overflow:hidden">'
    '<span style="display:block;height:100%;width:{width}%;background:{color}"></span></span>'
    "<span>{text}</span></div>"
)


def admin_periods() -> Periods:
    return periods_at(time.time(), ZoneInfo(settings.GATEWAY["BUDGET_TIMEZONE"]))


def quota_scope(kind: str, scope_id: int, tenant_id: int, quota: Quota | None, periods: Periods) -> ScopeLimits | None:
    """The quota as admission applies it, or None when it limits nothing."""
    if quota is None:
        return None
    view = quota_view(quota)
    return scope_limits(kind, scope_id, tenant_id, view, periods) if view.limited else None


def _color(percent: float) -> str:
    if percent >= 100:
        return "#ba2121"
    return "#d88a00" if percent >= 80 else "#3c8d40"


def _amount(limit: str, value: int) -> str:
    return f"{money(value):,.2f}" if limit == MONTHLY_COST else f"{value:,}"


def quota_bars(scope: ScopeLimits | None, use: ScopeUse | None, *, compact: bool = False) -> SafeString:
    """One bar per limit the scope sets: its use, the limit, the share; compact for list columns."""
    if scope is None:
        return format_html("{}", "no limits")
    if use is None:
        return format_html("{}", "use unknown")
    bars = []
    for limit, label, short, field in LINES:
        limit_value = scope.limit(limit)
        if not limit_value:
            continue
        used = getattr(use, field)
        percent = used * 100 / limit_value
        text = f"{_amount(limit, used)} / {_amount(limit, limit_value)} ({percent:.0f}%)"
        held = use.held_cost if limit == MONTHLY_COST else use.held_tokens
        if not compact and limit in (MONTHLY_TOKENS, MONTHLY_COST) and held:
            text += f", {_amount(limit, held)} reserved in flight"
        bars.append(
            format_html(
                BAR,
                label=short if compact else label,
                label_width="4em" if compact else "11em",
                bar_width="6em" if compact else "14em",
                percent=f"{percent:.0f}",
                width=f"{min(percent, 100):.1f}",
                color=_color(percent),
                text=text,
            )
        )
    note = mark_safe("")
    if not use.seeded and scope.budgeted:
        note = format_html('<div style="color:#666">{}</div>', "budget counters start with the next request")
    return format_html("{}{}", format_html_join("", "{}", ((bar,) for bar in bars)), note)
