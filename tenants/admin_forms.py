"""Forms for the tenants admin: lists typed as text, and the checks the models cannot express."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.utils import timezone

from gateway.admin_forms import WriteOnlySecretField
from tenants.models import AccessPolicy, ClientKey, Quota, Tenant

_SEPARATORS = re.compile(r"[,\s]+")


class ListField(forms.Field):
    """A JSON list edited as text: items separated by commas, spaces or new lines.

    ``coerce`` turns each item into its stored form and raises ``ValueError`` for a bad one.
    Duplicates are dropped, order kept.
    """

    widget = forms.TextInput(attrs={"size": 80})

    def __init__(self, *, coerce: Callable[[str], Any] = str, item_name: str = "item", **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)
        self.coerce = coerce
        self.item_name = item_name

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return ", ".join(str(item) for item in value)
        return value

    def to_python(self, value: Any) -> list[Any]:
        if value in self.empty_values:
            return []
        items = value if isinstance(value, (list, tuple)) else _SEPARATORS.split(str(value).strip())
        result: list[Any] = []
        for item in items:
            if item in ("", None):
                continue
            try:
                item = self.coerce(item) if isinstance(item, str) else item
            except ValueError:
                raise ValidationError(f"{item!r} is not a valid {self.item_name}.", code="invalid") from None
            if item not in result:
                result.append(item)
        return result

    def has_changed(self, initial: Any, data: Any) -> bool:
        try:
            return self.to_python(initial) != self.to_python(data)
        except ValidationError:
            return True


def _cidr(text: str) -> str:
    """A network in canonical form; a bare address is a /32 (or /128)."""
    return str(ipaddress.ip_network(text, strict=False))


def _threshold(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _email(text: str) -> str:
    try:
        validate_email(text)
    except ValidationError:
        raise ValueError(text) from None
    return text


def models_field(help_text: str) -> ListField:
    return ListField(item_name="model name", help_text=help_text)


WEBHOOK_SECRET_HELP = (
    "Write-only: never shown. Signs each webhook body (X-Gateway-Signature: sha256=HMAC of "
    "'<timestamp>.<body>'). Leave blank to keep the stored value; type a new one to replace it."
)


class TenantForm(forms.ModelForm):
    """A tenant and who hears about its budget alerts; the webhook secret is write-only."""

    alert_emails = ListField(
        coerce=_email, item_name="e-mail address", help_text="Who receives budget alerts, comma separated."
    )
    alert_webhook_url = forms.URLField(
        required=False,
        max_length=500,
        assume_scheme="https",
        help_text="Budget alerts are POSTed here as JSON.",
    )
    alert_webhook_secret = WriteOnlySecretField(label="Webhook secret", max_length=500, help_text=WEBHOOK_SECRET_HELP)
    clear_alert_webhook_secret = forms.BooleanField(label="Remove the stored webhook secret", required=False)

    class Meta:
        model = Tenant
        fields = ("slug", "name", "active", "alert_emails", "alert_webhook_url", "alert_webhook_secret")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial.pop("alert_webhook_secret", None)  # never rendered, not even as an initial value

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if "alert_webhook_secret" in self.fields and not cleaned.get("alert_webhook_secret"):
            keep = "" if cleaned.get("clear_alert_webhook_secret") else self.instance.alert_webhook_secret
            cleaned["alert_webhook_secret"] = keep
        return cleaned


class ClientKeyForm(forms.ModelForm):
    """The fields of a key that may change after it is issued."""

    allowed_models = models_field("Model names, comma separated; empty = what the tenant allows.")

    class Meta:
        model = ClientKey
        fields: tuple[str, ...] = ("name", "expires_at", "allowed_models", "default_priority", "best_priority")


class ClientKeyIssueForm(ClientKeyForm):
    """What issuing a key asks for. The admin hands the cleaned data to ``key_issue``."""

    class Meta(ClientKeyForm.Meta):
        fields = ("tenant", "name", "expires_at", "allowed_models", "default_priority", "best_priority")

    def clean_expires_at(self):
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise ValidationError("A new key must expire in the future (or leave it empty for never).")
        return expires_at


class QuotaForm(forms.ModelForm):
    alert_thresholds = ListField(
        coerce=_threshold,
        item_name="percentage",
        help_text="Percentages of a budget that raise an alert, e.g. 50, 80, 100.",
    )

    class Meta:
        model = Quota
        fields = "__all__"

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        key, tenant = cleaned.get("key"), cleaned.get("tenant")
        if key is not None and tenant is not None and key.tenant_id != tenant.pk:
            self.add_error("key", "This key belongs to another tenant.")
        return cleaned


class AccessPolicyForm(forms.ModelForm):
    allowed_models = models_field("Model names, comma separated; empty = every model.")
    ip_allow = ListField(coerce=_cidr, item_name="network", help_text="Networks (CIDR); empty = any address.")
    ip_deny = ListField(coerce=_cidr, item_name="network", help_text="Networks (CIDR) refused even if allowed.")

    class Meta:
        model = AccessPolicy
        fields = "__all__"
