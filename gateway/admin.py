"""Admin for upstream endpoints and their deployments, and the console's own title.

Every save here bumps the configuration version (``gateway.snapshot.version``'s signals), so the
gateway processes pick changes up without a restart. Endpoint secrets are write-only, see
``gateway.admin_forms``; they are in no list, no page and no log message.
"""

from __future__ import annotations

from django.contrib import admin
from django.db import models
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from gateway.admin_forms import EndpointAdminForm
from gateway.models import Deployment, Endpoint

admin.site.site_header = "LLM Gateway"
admin.site.site_title = "LLM Gateway"
admin.site.index_title = "Console"

# ConfigVersion is deliberately not registered: it is a counter the code moves, not a setting.


class DeploymentInline(admin.TabularInline):
    model = Deployment
    extra = 0
    fields = (
        "name",
        "model",
        "sku",
        "tier",
        "rpm",
        "tpm",
        "max_wait_seconds",
        "weight",
        "context_window",
        "max_output_tokens",
        "enabled",
    )
    # Token counting settings and the rest are on the deployment's own page.
    show_change_link = True

    def get_queryset(self, request: HttpRequest) -> QuerySet[Deployment]:
        # Each row prints str(deployment), which names the endpoint: one join, not a query a row.
        return super().get_queryset(request).select_related("endpoint")


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    form = EndpointAdminForm
    list_display = ("name", "kind", "base_url", "auth", "api_version", "deployment_count", "enabled")
    list_filter = ("kind", "auth", "enabled")
    search_fields = ("name", "base_url")
    readonly_fields = ("api_key_status", "ad_client_secret_status", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "kind", "base_url", "api_version", "enabled")}),
        (
            "Authentication",
            {
                "fields": (
                    "auth",
                    ("api_key", "api_key_status"),
                    "clear_api_key",
                    "ad_tenant_id",
                    "ad_client_id",
                    ("ad_client_secret", "ad_client_secret_status"),
                    "clear_ad_client_secret",
                    "ad_authority",
                ),
            },
        ),
        ("Timeouts (seconds)", {"fields": ("connect_timeout", "first_byte_timeout", "total_timeout")}),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )
    inlines = (DeploymentInline,)
    # Explicit, because Meta.ordering does not apply to the GROUP BY query the count makes.
    ordering = ("name",)
    # As in EndpointAdminForm: a URL typed without a scheme is https.
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Endpoint]:
        return super().get_queryset(request).annotate(deployment_count=Count("deployments"))

    @admin.display(description="deployments", ordering="deployment_count")
    def deployment_count(self, endpoint: Endpoint) -> int:
        return endpoint.deployment_count  # type: ignore[attr-defined]  (the annotation)

    @admin.display(description="API key")
    def api_key_status(self, endpoint: Endpoint) -> str:
        return _set_or_not(endpoint.api_key)

    @admin.display(description="client secret")
    def ad_client_secret_status(self, endpoint: Endpoint) -> str:
        return _set_or_not(endpoint.ad_client_secret)


def _set_or_not(secret: str) -> str:
    return "set" if secret else "not set"


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = (
        "endpoint",
        "name",
        "model",
        "sku",
        "tier",
        "rpm",
        "tpm",
        "max_wait_seconds",
        "weight",
        "enabled",
    )
    list_display_links = ("name",)
    list_editable = ("enabled",)
    list_filter = ("sku", "tier", "enabled", "endpoint")
    list_select_related = ("endpoint",)
    search_fields = ("name", "model")
    readonly_fields = ("created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("endpoint", "name", "model", "enabled")}),
        ("Balancing", {"fields": ("sku", "tier", "max_wait_seconds", "weight", "rpm", "tpm")}),
        ("Tokens", {"fields": ("context_window", "max_output_tokens", "token_estimate", "upstream_model")}),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )
