"""Ordinary Django views: the admin console, health probes and (later) dashboards and the REST API.

The OpenAI-compatible API (``/v1/...``, ``/openai/...``) is not here: ``gateway.asgi`` sends it to
the proxy consumer before Django's URL resolver is involved.
"""

from django.contrib import admin
from django.urls import path

urlpatterns = [
    path("admin/", admin.site.urls),
]
