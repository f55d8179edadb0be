"""Views of upstream endpoints, deployments and the live deployment status (staff only)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.api.pagination import ID_PATTERN
from gateway.api.serializers import DeploymentSerializer, EndpointSerializer
from gateway.models import Deployment, Endpoint
from gateway.status import deployment_status
from gateway.views import finite_json


class EndpointViewSet(viewsets.ModelViewSet):
    queryset = Endpoint.objects.all()
    serializer_class = EndpointSerializer
    lookup_value_regex = ID_PATTERN
    filterset_fields = ["kind", "auth", "enabled"]
    ordering_fields = ["name", "created_at"]


class DeploymentViewSet(viewsets.ModelViewSet):
    queryset = Deployment.objects.select_related("endpoint")
    serializer_class = DeploymentSerializer
    lookup_value_regex = ID_PATTERN
    filterset_fields = {
        "model": ["exact"],
        "sku": ["exact"],
        "tier": ["exact"],
        "enabled": ["exact"],
        "endpoint__name": ["exact"],
    }
    ordering_fields = ["model", "tier", "name", "created_at"]


class DeploymentStatusView(APIView):
    """The live balancer state of every deployment: what ``/api/status/deployments`` serves."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(finite_json(async_to_sync(deployment_status)()))
