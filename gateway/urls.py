"""Ordinary Django views: the admin console, the status API and (later) dashboards and the REST API.

The OpenAI-compatible API (``/v1/...``, ``/openai/...``) and the health probes are not here:
``gateway.proxy.application`` sends them to the proxy consumer and the probes before Django is involved.
"""

from django.contrib import admin
from django.urls import path

from gateway import views

urlpatterns = [
    path("admin/status/", views.status_page, name="gateway-status"),
    path("admin/", admin.site.urls),
    path("api/status/deployments", views.status_api, name="gateway-status-api"),
]
