"""``/api/v1/``: each app's views composed into one router, plus the schema and its docs page."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from billing.api import views as billing_api
from gateway.api import views as gateway_api
from tenants.api import views as tenants_api

router = DefaultRouter(trailing_slash=True)
router.register("tenants", tenants_api.TenantViewSet, basename="tenant")
router.register("keys", tenants_api.ClientKeyViewSet, basename="key")
router.register("quotas", tenants_api.QuotaViewSet, basename="quota")
router.register("access-policies", tenants_api.AccessPolicyViewSet, basename="access-policy")
router.register("management-tokens", tenants_api.ManagementTokenViewSet, basename="management-token")
router.register("endpoints", gateway_api.EndpointViewSet, basename="endpoint")
router.register("deployments", gateway_api.DeploymentViewSet, basename="deployment")
router.register("prices", billing_api.PriceViewSet, basename="price")
router.register("usage", billing_api.UsageViewSet, basename="usage")
router.register("statements", billing_api.StatementViewSet, basename="statement")

v1: list[URLPattern | URLResolver] = [
    path("deployment-status/", gateway_api.DeploymentStatusView.as_view(), name="deployment-status"),
    path(
        "tenants/<slug:slug>/statements/<str:month>/",
        billing_api.StatementDocumentView.as_view(),
        name="statement-document",
    ),
    path("", include(router.urls)),
]

urlpatterns = [
    path("v1/", include((v1, "api"), namespace="api")),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
