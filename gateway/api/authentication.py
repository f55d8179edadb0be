"""``Authorization: Bearer gwm-...``: management tokens (``tenants.models.ManagementToken``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from tenants.keys import KEY_PREFIX, MANAGEMENT_TOKEN_PREFIX, key_hash
from tenants.models import ManagementToken, Tenant


@dataclass(frozen=True)
class TenantPrincipal:
    """Who a tenant token authenticates: not a Django user, never staff, bound to one tenant."""

    token: ManagementToken
    tenant: Tenant

    is_authenticated = True
    is_active = True
    is_staff = False
    is_superuser = False
    is_anonymous = False

    @property
    def pk(self) -> str:
        # What the throttle keys its counts by: one bucket per token.
        return f"token-{self.token.pk}"

    def __str__(self) -> str:
        return f"tenant token {self.token.prefix} ({self.tenant.slug})"


class ManagementTokenAuthentication(authentication.BaseAuthentication):
    """Bearer management tokens; a gateway client key presented here is refused (401), never tried."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, ManagementToken] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        secret = value.strip()
        if secret.startswith(KEY_PREFIX):
            raise exceptions.AuthenticationFailed("Client keys of the gateway are not management credentials.")
        if not secret.startswith(MANAGEMENT_TOKEN_PREFIX):
            raise exceptions.AuthenticationFailed("Not a management token.")
        token = (
            ManagementToken.objects.select_related("tenant", "created_by").filter(token_hash=key_hash(secret)).first()
        )
        if token is None:
            raise exceptions.AuthenticationFailed("Unknown management token.")
        if token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This management token has been revoked.")
        now = timezone.now()
        if token.expires_at <= now:
            raise exceptions.AuthenticationFailed("This management token has expired.")
        if token.tenant is not None:
            if not token.tenant.active:
                raise exceptions.AuthenticationFailed("This management token belongs to an inactive tenant.")
            principal: Any = TenantPrincipal(token=token, tenant=token.tenant)
        else:
            user = token.created_by
            if not (user.is_active and user.is_staff):
                raise exceptions.AuthenticationFailed("This staff token's user is no longer active staff.")
            principal = user
        ManagementToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return principal, token

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (with WWW-Authenticate) rather than 403 to unauthenticated calls.
        return 'Bearer realm="management"'


class ManagementTokenScheme(OpenApiAuthenticationExtension):
    target_class = "gateway.api.authentication.ManagementTokenAuthentication"
    name = "managementToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "bearerFormat": "gwm-..."}
