"""Management API tokens in the admin: issued (the secret shown once, like client keys), revoked."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from tenants.admin_issued import issued_secret_response
from tenants.models import ManagementToken
from tenants.services import IssuedManagementToken, management_token_issue, management_token_revoke

_ISSUED = "_tenants_issued_management_token"
ISSUED_TEMPLATE = "admin/tenants/managementtoken/issued.html"


class ManagementTokenIssueForm(forms.ModelForm):
    class Meta:
        model = ManagementToken
        fields = ("tenant", "name", "expires_at")
        help_texts = {"tenant": "Empty: a staff token, acting as you (it stops working if you lose staff status)."}

    def clean_expires_at(self) -> Any:
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise ValidationError("A new token must expire in the future.")
        return expires_at


@admin.register(ManagementToken)
class ManagementTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "tenant", "prefix", "created_by", "created_at", "expires_at", "status", "last_used_at")
    list_filter = ("tenant",)
    list_select_related = ("tenant", "created_by")
    search_fields = ("name", "prefix", "tenant__slug")
    exclude = ("token_hash",)
    actions = ("revoke_tokens",)
    readonly_fields = (
        "tenant",
        "name",
        "prefix",
        "created_by",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
    )

    def get_form(self, request: HttpRequest, obj: ManagementToken | None = None, change: bool = False, **kwargs: Any):
        if obj is None:
            kwargs["form"] = ManagementTokenIssueForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: ManagementToken | None = None):
        return () if obj is None else self.readonly_fields

    def get_fields(self, request: HttpRequest, obj: ManagementToken | None = None):
        return ("tenant", "name", "expires_at") if obj is None else self.readonly_fields

    def has_change_permission(self, request: HttpRequest, obj: ManagementToken | None = None) -> bool:
        return False if obj is not None else super().has_change_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: ManagementToken, form: Any, change: bool) -> None:
        issued = management_token_issue(
            name=obj.name, created_by=request.user, expires_at=obj.expires_at, tenant=obj.tenant
        )
        for field in ManagementToken._meta.concrete_fields:
            setattr(obj, field.attname, getattr(issued.token, field.attname))
        obj._state.adding, obj._state.db = False, issued.token._state.db
        setattr(request, _ISSUED, issued)

    def response_add(
        self, request: HttpRequest, obj: ManagementToken, post_url_continue: str | None = None
    ) -> HttpResponse:
        issued: IssuedManagementToken | None = getattr(request, _ISSUED, None)
        if issued is None:  # pragma: no cover - save_model always sets it on add
            return super().response_add(request, obj, post_url_continue)
        return issued_secret_response(
            self, request, obj, secret=issued.secret, template=ISSUED_TEMPLATE, title="Management token issued"
        )

    @admin.display(description="status")
    def status(self, token: ManagementToken) -> str:
        if token.revoked_at is not None:
            return "revoked"
        return "expired" if token.expires_at <= timezone.now() else "active"

    @admin.action(description="Revoke the selected tokens")
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ManagementToken]) -> None:
        for token in queryset:
            management_token_revoke(token)
        self.message_user(request, f"{queryset.count()} token(s) revoked.", messages.SUCCESS)
