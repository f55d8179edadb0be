"""Who may do what in the management API. Querysets are scoped by ``request_tenant`` as well."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from gateway.api.authentication import TenantPrincipal
from tenants.models import Tenant


def request_tenant(request: Request) -> Tenant | None:
    """The tenant a tenant token is bound to; None for staff."""
    user = request.user
    return user.tenant if isinstance(user, TenantPrincipal) else None


def is_staff(request: Request) -> bool:
    user = request.user
    return bool(user and user.is_authenticated and user.is_active and user.is_staff)


class IsStaff(BasePermission):
    """Active staff: by session or a staff management token. The default for every view."""

    message = "Staff only."

    def has_permission(self, request: Request, view: Any) -> bool:
        return is_staff(request)


class IsStaffOrTenantToken(BasePermission):
    """Staff, or a tenant token (whose view then only ever sees that tenant's rows)."""

    message = "Staff or a tenant management token only."

    def has_permission(self, request: Request, view: Any) -> bool:
        return is_staff(request) or request_tenant(request) is not None

    def has_object_permission(self, request: Request, view: Any, obj: Any) -> bool:
        tenant = request_tenant(request)
        return tenant is None or getattr(obj, "tenant_id", None) == tenant.pk
