"""Views of the tenants' management API. Writes go through ``tenants.services``, like the admin's."""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import ProtectedError, QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from gateway.api.pagination import ID_PATTERN
from gateway.api.permissions import IsStaff, IsStaffOrTenantToken, request_tenant
from tenants import services
from tenants.api import serializers as s
from tenants.models import AccessPolicy, ClientKey, ManagementToken, Quota, Tenant


class TenantViewSet(viewsets.ModelViewSet):
    """Tenants (staff only). Addressed by slug."""

    queryset = Tenant.objects.all()
    serializer_class = s.TenantSerializer
    permission_classes = [IsStaff]
    lookup_field = "slug"
    filterset_fields = ["active"]
    ordering_fields = ["slug", "name", "created_at"]

    def perform_destroy(self, instance: Tenant) -> None:
        try:
            instance.delete()
        except ProtectedError as exc:
            raise ValidationError("This tenant has statements: deactivate it instead.") from exc


class ClientKeyFilter(django_filters.FilterSet):
    tenant = django_filters.CharFilter(field_name="tenant__slug")
    revoked = django_filters.BooleanFilter(field_name="revoked_at", lookup_expr="isnull", exclude=True)

    class Meta:
        model = ClientKey
        fields = ["tenant", "name", "prefix", "revoked"]


class ClientKeyViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """Client keys: issued (the secret is in the answer, once), listed by prefix, revoked, expired.

    Staff see every tenant's keys; a tenant token sees and manages its own tenant's only (another
    tenant's key answers 404) and cannot set priorities. Keys are never deleted (usage refers to them).
    """

    serializer_class = s.ClientKeySerializer
    lookup_value_regex = ID_PATTERN
    permission_classes = [IsStaffOrTenantToken]
    filterset_class = ClientKeyFilter
    ordering_fields = ["name", "created_at", "expires_at", "last_used_at"]
    ordering = ["tenant__slug", "name"]

    def get_queryset(self) -> QuerySet[ClientKey]:
        keys = ClientKey.objects.select_related("tenant")
        tenant = request_tenant(self.request)
        return keys if tenant is None else keys.filter(tenant=tenant)

    def get_serializer(self, *args: Any, **kwargs: Any) -> BaseSerializer:
        kwargs.setdefault("context", self.get_serializer_context())
        return s.ClientKeySerializer(*args, tenant=request_tenant(self.request), **kwargs)

    @extend_schema(responses={201: s.IssuedKeySerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        tenant = request_tenant(request) or data["tenant"]
        options = {
            k: data[k] for k in ("expires_at", "allowed_models", "default_priority", "best_priority") if k in data
        }
        issued = services.key_issue(tenant, name=data["name"], **options)
        answer = s.IssuedKeySerializer(issued.key, context=self.get_serializer_context()).data
        answer["secret"] = issued.secret
        return Response(answer, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=s.ClientKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        """Refuse the key from now on, in every gateway process (idempotent)."""
        key = self.get_object()
        services.key_revoke(key)
        return Response(self.get_serializer(key).data)

    @extend_schema(request=None, responses=s.ClientKeySerializer)
    @action(detail=True, methods=["post"])
    def expire(self, request: Request, pk: str | None = None) -> Response:
        """Make the key expire now."""
        key = self.get_object()
        services.key_expire(key)
        return Response(self.get_serializer(key).data)


class QuotaFilter(django_filters.FilterSet):
    tenant = django_filters.CharFilter(field_name="tenant__slug")

    class Meta:
        model = Quota
        fields = ["tenant", "key"]


class QuotaViewSet(viewsets.ModelViewSet):
    """Quotas of tenants (no key) and of keys. Staff only: a tenant token never changes a quota."""

    queryset = Quota.objects.select_related("tenant", "key").order_by("tenant__slug", "id")
    serializer_class = s.QuotaSerializer
    lookup_value_regex = ID_PATTERN
    permission_classes = [IsStaff]
    filterset_class = QuotaFilter
    ordering_fields = ["id", "updated_at"]

    @extend_schema(request=s.QuotaResetSerializer, responses=s.QuotaSerializer)
    @action(detail=True, methods=["post"])
    def reset(self, request: Request, pk: str | None = None) -> Response:
        """Count the day's or the month's budget afresh from now on (like the admin's reset action)."""
        quota = self.get_object()
        serializer = s.QuotaResetSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        services.quota_counters_reset(quota, serializer.validated_data["period"])
        return Response(self.get_serializer(quota).data)


class AccessPolicyViewSet(viewsets.ModelViewSet):
    """Each tenant's access policy (models, addresses, max_tokens cap). Staff only."""

    queryset = AccessPolicy.objects.select_related("tenant").order_by("tenant__slug")
    serializer_class = s.AccessPolicySerializer
    lookup_value_regex = ID_PATTERN
    permission_classes = [IsStaff]
    filterset_fields = {"tenant__slug": ["exact"]}


class ManagementTokenViewSet(
    mixins.CreateModelMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Management API tokens (staff only): a tenant's, or with no tenant a staff token acting as its creator."""

    queryset = ManagementToken.objects.select_related("tenant", "created_by")
    serializer_class = s.ManagementTokenSerializer
    lookup_value_regex = ID_PATTERN
    permission_classes = [IsStaff]
    filterset_fields = {"tenant__slug": ["exact"]}
    ordering_fields = ["created_at", "expires_at"]

    @extend_schema(responses={201: s.IssuedManagementTokenSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        issued = services.management_token_issue(
            name=data["name"], created_by=request.user, expires_at=data["expires_at"], tenant=data.get("tenant")
        )
        answer = s.IssuedManagementTokenSerializer(issued.token).data
        answer["secret"] = issued.secret
        return Response(answer, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=s.ManagementTokenSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        token = self.get_object()
        services.management_token_revoke(token)
        return Response(self.get_serializer(token).data)
