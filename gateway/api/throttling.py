"""Throttling of the management API, counted in the default cache (Redis when configured)."""

from __future__ import annotations

from rest_framework.throttling import AnonRateThrottle, UserRateThrottle


class ManagementUserThrottle(UserRateThrottle):
    """Per staff user or management token: ``GATEWAY_API_RATE`` (default 1200/min)."""

    scope = "management"


class ManagementAnonThrottle(AnonRateThrottle):
    """Per address, before authentication succeeds: ``GATEWAY_API_ANON_RATE`` (default 60/min)."""

    scope = "management-anon"
