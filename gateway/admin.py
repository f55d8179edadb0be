"""Admin for upstream endpoints and their deployments, and the console's own title.

Every save here bumps the configuration version (``gateway.snapshot.version``'s signals), so the
gateway processes pick changes up without a restart. Endpoint secrets are write-only, see
``gateway.admin_forms``; they are in no list, no page (view-only ones included) and no log
message. An endpoint's changes are saved through ``gateway.services.endpoint_update``, which
removes the stored secrets when the endpoint's destination changes and they were not typed again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.contrib import admin, messages
from django.db import models
from django.db.models import Count, QuerySet
from django.forms import BaseFormSet, Form
from django.http import HttpRequest
from django.utils.text import capfirst

from gateway.admin_forms import SECRET_FIELDS, EndpointAdminForm
from gateway.models import Deployment, Endpoint
from gateway.services import EndpointUpdate, endpoint_update

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
                "description": (
                    "Secrets are write-only. Changing the base URL, kind, authentication, or the Azure AD "
                    "authority or tenant removes the stored secrets unless they are typed again in the same form."
                ),
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
        return endpoint.deployment_count  # type: ignore[attr-defined]  # the annotation

    def get_fieldsets(self, request: HttpRequest, obj: Endpoint | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or self.has_change_permission(request, obj):
            return fieldsets
        # A view-only page renders every listed field read-only from the row itself, which would
        # print the stored secrets: it gets the "set / not set" statuses instead.
        return [(name, {**options, "fields": _without_secrets(options["fields"])}) for name, options in fieldsets]

    def save_model(self, request: HttpRequest, obj: Endpoint, form: EndpointAdminForm, change: bool) -> None:
        if not change:
            super().save_model(request, obj, form, change)
            return
        # The form has already copied its values onto obj; the rule needs the stored row to compare with.
        stored = Endpoint.objects.select_for_update().get(pk=obj.pk)
        result = endpoint_update(stored, form.update_values())
        for name in result.changed:
            setattr(obj, name, getattr(stored, name))
        form.saved_update = result
        if result.cleared:
            self.message_user(request, _cleared_message(stored, result, form), messages.WARNING)

    def construct_change_message(
        self, request: HttpRequest, form: Form, formsets: Iterable[BaseFormSet], add: bool = False
    ) -> list[dict[str, Any]]:
        message = super().construct_change_message(request, form, formsets, add)
        result = form.saved_update if isinstance(form, EndpointAdminForm) else None
        if result and result.cleared:
            # The history names a removed secret like any other changed field: by label, never by value.
            labels = [str(form.fields[name].label) for name in result.cleared]
            if message and "changed" in message[0]:
                fields = message[0]["changed"]["fields"]
                fields.extend(label for label in labels if label not in fields)
            else:
                message.insert(0, {"changed": {"fields": labels}})
        return message

    @admin.display(description="API key")
    def api_key_status(self, endpoint: Endpoint) -> str:
        return _set_or_not(endpoint.api_key)

    @admin.display(description="client secret")
    def ad_client_secret_status(self, endpoint: Endpoint) -> str:
        return _set_or_not(endpoint.ad_client_secret)


def _set_or_not(secret: str) -> str:
    return "set" if secret else "not set"


def _without_secrets(fields: Sequence[Any]) -> tuple[Any, ...]:
    """A fieldset's fields with each secret and its "remove" checkbox left out (their statuses stay)."""
    hidden = {*SECRET_FIELDS, *SECRET_FIELDS.values()}
    kept: list[Any] = []
    for field in fields:
        if isinstance(field, tuple | list):
            row = tuple(name for name in field if name not in hidden)
            if row:
                kept.append(row if len(row) > 1 else row[0])
        elif field not in hidden:
            kept.append(field)
    return tuple(kept)


def _cleared_message(endpoint: Endpoint, result: EndpointUpdate, form: EndpointAdminForm) -> str:
    moved = ", ".join(str(capfirst(form.fields[name].label)) for name in result.moved if name in form.fields)
    secrets = " and ".join(str(form.fields[name].label) for name in result.cleared)
    one = len(result.cleared) == 1
    return (
        f"{moved} changed, so the stored {secrets} of “{endpoint.name}” {'was' if one else 'were'} removed: "
        f"a secret is never sent to a new destination. Type {'it' if one else 'them'} again to restore "
        f"{'it' if one else 'them'}; until then the endpoint sends none."
    )


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
        ("Billing", {"fields": ("monthly_fixed_cost",)}),
        ("Tokens", {"fields": ("context_window", "max_output_tokens", "token_estimate", "upstream_model")}),
        ("History", {"fields": ("created_at", "updated_at"), "classes": ("collapse",)}),
    )
