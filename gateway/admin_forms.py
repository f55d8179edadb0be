"""The endpoint form: upstream secrets are write-only.

A stored API key or Azure AD client secret never goes back to the browser: the field renders
empty (not even as an initial value a widget could print), a blank submission keeps what is
stored, typing a value replaces it, and a checkbox removes it. The page shows only whether a
secret is set (``EndpointAdmin.api_key_status``), and the admin's history records that the field
changed, never its value.

Changing where the endpoint sends its secrets (base URL, kind, authentication, Azure AD authority
or tenant) removes the stored secrets that are not typed again in the same form: the rule is
``gateway.services.endpoint_update``'s, which the admin saves through.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.db import models

from gateway.models import Endpoint
from gateway.services import DESTINATION_FIELDS, EndpointUpdate

KEEP_HELP = (
    "Write-only: never shown. Leave blank to keep the stored value; type a new one to replace it. "
    "Changing the base URL, kind, authentication, or the Azure AD authority or tenant removes the stored "
    "value unless you type it again here."
)

MOVE_HELP = "Changing this removes the stored API key and client secret unless you type them again in this form."

#: Secret field -> the "remove it" checkbox that goes with it.
SECRET_FIELDS: dict[str, str] = {"api_key": "clear_api_key", "ad_client_secret": "clear_ad_client_secret"}
AZURE_AD_REQUIRED = ("ad_tenant_id", "ad_client_id", "ad_client_secret")


class WriteOnlySecretField(forms.CharField):
    """A secret accepted from the form but never rendered into it."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("help_text", KEEP_HELP)
        widget = forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"})
        super().__init__(widget=widget, **kwargs)

    def has_changed(self, initial: Any, data: Any) -> bool:
        # Blank means "keep", so only a typed value is a change (and gets logged as one).
        return bool(self.to_python(data))


def _formfield(db_field: models.Field, **kwargs: Any) -> forms.Field | None:
    # Upstream endpoints are https; say so now rather than rely on Django 5's http default.
    if isinstance(db_field, models.URLField):
        kwargs.setdefault("assume_scheme", "https")
    return db_field.formfield(**kwargs)


class EndpointAdminForm(forms.ModelForm):
    #: What ``endpoint_update`` did when the admin saved this form (for the history entry).
    saved_update: EndpointUpdate | None = None

    api_key = WriteOnlySecretField(label="API key", max_length=500)
    clear_api_key = forms.BooleanField(label="Remove the stored API key", required=False)
    ad_client_secret = WriteOnlySecretField(label="Azure AD client secret", max_length=500)
    clear_ad_client_secret = forms.BooleanField(label="Remove the stored client secret", required=False)

    class Meta:
        model = Endpoint
        fields = (
            "name",
            "kind",
            "base_url",
            "api_version",
            "enabled",
            "auth",
            "api_key",
            "ad_tenant_id",
            "ad_client_id",
            "ad_client_secret",
            "ad_authority",
            "connect_timeout",
            "first_byte_timeout",
            "total_timeout",
        )
        formfield_callback = _formfield

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # model_to_dict put the stored secrets into the initial data; nothing needs them there.
        for name in SECRET_FIELDS:
            self.initial.pop(name, None)
        for name in DESTINATION_FIELDS:
            if name in self.fields:
                field = self.fields[name]
                field.help_text = " ".join(filter(None, (str(field.help_text), MOVE_HELP)))

    def update_values(self) -> dict[str, Any]:
        """What this submission changes, for ``endpoint_update``: only the columns the user changed
        (so a stale form does not undo someone else's edit), a typed secret, or ``""`` for a secret
        whose removal was ticked. An untouched secret is left out: the service keeps it, unless the
        destination changed."""
        columns = {f.name for f in Endpoint._meta.concrete_fields}
        values = {
            name: self.cleaned_data[name] for name in self.changed_data if name in columns and name not in SECRET_FIELDS
        }
        for name, clear in SECRET_FIELDS.items():
            if name in self.changed_data:  # WriteOnlySecretField: changed only when a value was typed
                values[name] = self.cleaned_data[name]
            elif self.cleaned_data.get(clear):
                values[name] = ""
        return values

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        for name, clear in SECRET_FIELDS.items():
            if name not in self.fields or name in self.errors:
                continue
            if not cleaned.get(name):
                # self.instance still holds the stored values: the form copies onto it after clean().
                cleaned[name] = "" if cleaned.get(clear) else getattr(self.instance, name)
        self._check_auth(cleaned)
        return cleaned

    def _check_auth(self, cleaned: dict[str, Any]) -> None:
        """Each kind of authentication needs its credentials, stored or typed now."""
        auth = cleaned.get("auth")
        if auth == Endpoint.Auth.API_KEY and "api_key" in self.fields and not cleaned.get("api_key"):
            self.add_error("api_key", "An endpoint that authenticates with an API key needs one.")
        if auth == Endpoint.Auth.AZURE_AD:
            for name in AZURE_AD_REQUIRED:
                if name in self.fields and not cleaned.get(name):
                    self.add_error(name, "Required for Azure AD authentication.")
