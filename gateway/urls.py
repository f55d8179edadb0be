"""Ordinary Django views: the admin console, the status API, the management REST API (``/api/v1/``), the usage dashboards and team pages.

The OpenAI-compatible API (``/v1/...``, ``/openai/...``) and the health probes are not here:
``gateway.proxy.application`` sends them to the proxy consumer and the probes before Django is involved.
"""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from billing import views as billing_views
from gateway import views

urlpatterns = [
    path("admin/status/", views.status_page, name="gateway-status"),
    path("admin/overview/", billing_views.overview, name="billing-overview"),
    path("admin/", admin.site.urls),
    path("api/status/deployments", views.status_api, name="gateway-status-api"),
    path("api/", include("gateway.api.urls")),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("team/", include("billing.urls")),
    path("favicon.ico", views.favicon),
]
