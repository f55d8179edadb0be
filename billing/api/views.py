"""Views of prices (staff), usage and statements (staff, or a tenant token for its own tenant).

Usage is read from the roll-ups only, never the usage records, and paged by cursor: no page ever
counts the table.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.api.serializers import PriceSerializer, StatementSerializer, UsageSerializer
from billing.exports import FORMATS, statement_response
from billing.models import Price, Rollup, Statement
from billing.periods import parse_month
from billing.statements import statement_document, statement_for
from gateway.api.pagination import ID_PATTERN, CursorPagination
from gateway.api.permissions import IsStaffOrTenantToken, request_tenant
from tenants.models import Tenant


class PriceViewSet(viewsets.ModelViewSet):
    queryset = Price.objects.all()
    serializer_class = PriceSerializer
    lookup_value_regex = ID_PATTERN
    filterset_fields = ["model"]
    ordering_fields = ["model", "effective_from"]


class UsageFilter(django_filters.FilterSet):
    """``granularity`` (hour, day or month; default day), ``since``/``until`` (period starts, until
    exclusive), and the dimensions: tenant (slug), key and deployment (ids), model."""

    granularity = django_filters.ChoiceFilter(choices=Rollup.Granularity.choices, method="noop")
    since = django_filters.IsoDateTimeFilter(field_name="period_start", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="period_start", lookup_expr="lt")
    tenant = django_filters.CharFilter(method="by_tenant")
    key = django_filters.NumberFilter(field_name="key_ref", min_value=0)
    deployment = django_filters.NumberFilter(field_name="deployment_ref", min_value=0)
    model = django_filters.CharFilter(field_name="model")

    class Meta:
        model = Rollup
        fields = ["granularity", "since", "until", "tenant", "key", "deployment", "model"]

    def noop(self, queryset: QuerySet[Rollup], name: str, value: Any) -> QuerySet[Rollup]:
        return queryset  # applied in UsageViewSet.get_queryset, with its default

    def by_tenant(self, queryset: QuerySet[Rollup], name: str, value: str) -> QuerySet[Rollup]:
        tenant_id = Tenant.objects.filter(slug=value).values_list("pk", flat=True).first()
        return queryset.filter(tenant_ref=tenant_id or -1)


class UsageViewSet(viewsets.ReadOnlyModelViewSet):
    """Usage per period, tenant, key, model and deployment, from the roll-ups."""

    serializer_class = UsageSerializer
    lookup_value_regex = ID_PATTERN
    permission_classes = [IsStaffOrTenantToken]
    filterset_class = UsageFilter
    pagination_class = CursorPagination
    filter_backends = [DjangoFilterBackend]  # no ordering parameter: the cursor pages by (period_start, id)

    def get_queryset(self) -> QuerySet[Rollup]:
        granularity = self.request.query_params.get("granularity") or Rollup.Granularity.DAY
        rows = Rollup.objects.filter(granularity=granularity)
        tenant = request_tenant(self.request)
        return rows if tenant is None else rows.filter(tenant_ref=tenant.pk)

    def get_object(self) -> Rollup:
        row = get_object_or_404(self.get_queryset().model.objects.all(), pk=self.kwargs["pk"])
        tenant = request_tenant(self.request)
        if tenant is not None and row.tenant_ref != tenant.pk:
            raise Http404
        return row


class StatementFilter(django_filters.FilterSet):
    tenant = django_filters.CharFilter(field_name="tenant__slug")

    class Meta:
        model = Statement
        fields = ["tenant", "status"]


class StatementPagination(CursorPagination):
    ordering = ("-month", "-id")


class StatementViewSet(viewsets.ReadOnlyModelViewSet):
    """Stored monthly statements (drafts and final ones)."""

    serializer_class = StatementSerializer
    lookup_value_regex = ID_PATTERN
    permission_classes = [IsStaffOrTenantToken]
    filterset_class = StatementFilter
    pagination_class = StatementPagination
    filter_backends = [DjangoFilterBackend]  # the cursor pages by (month, id)

    def get_queryset(self) -> QuerySet[Statement]:
        statements = Statement.objects.select_related("tenant")
        tenant = request_tenant(self.request)
        return statements if tenant is None else statements.filter(tenant=tenant)


class StatementDocumentView(APIView):
    """A tenant's statement of a month as finance gets it (the current draft if not stored yet).

    ``?export=csv`` or ``?export=json`` gives the file the team pages offer."""

    permission_classes = [IsStaffOrTenantToken]

    @extend_schema(
        parameters=[OpenApiParameter("export", str, enum=sorted(FORMATS), required=False)],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: Request, slug: str, month: str) -> Response | HttpResponse:
        own = request_tenant(request)
        tenant = get_object_or_404(Tenant, slug=slug)
        if own is not None and own.pk != tenant.pk:
            raise Http404
        try:
            start = parse_month(month)
        except ValueError:
            raise Http404("Not a month (YYYY-MM).") from None
        statement = statement_for(tenant.pk, start)
        if statement.pk is None and not statement.requests:
            raise Http404("No usage that month.")
        statement.tenant = tenant
        document = statement_document(statement)
        fmt = request.query_params.get("export")
        if fmt:
            if fmt not in FORMATS:
                raise Http404("Unknown format.")
            return statement_response(document, fmt)
        return Response(document)
