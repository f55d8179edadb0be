"""Serializers of upstream endpoints and deployments. Secrets are write-only, as in the admin."""

from __future__ import annotations

import copy
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from rest_framework import serializers

from gateway.models import Deployment, Endpoint
from gateway.services import SECRET_FIELDS, endpoint_update


class ConstrainedModelSerializer(serializers.ModelSerializer):
    """Checks the model's database constraints before saving, so a violation is a 400, not a 500."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        self._check_constraints(self._candidate(attrs))
        return attrs

    def _candidate(self, attrs: dict[str, Any]) -> models.Model:
        if self.instance is not None:
            candidate = copy.copy(self.instance)
        else:
            model_class: type[models.Model] = self.Meta.model
            candidate = model_class()
        for name, value in attrs.items():
            setattr(candidate, name, value)
        return candidate

    @staticmethod
    def _check_constraints(candidate: models.Model) -> None:
        try:
            candidate.validate_constraints()
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages) from exc


class EndpointSerializer(ConstrainedModelSerializer):
    """An endpoint. ``api_key`` and ``ad_client_secret`` are accepted, never returned (``*_set`` say
    whether one is stored). Changing the destination removes stored secrets not given again
    (``gateway.services.endpoint_update``, the admin's rule)."""

    api_key = serializers.CharField(write_only=True, required=False, allow_blank=True, max_length=500)
    ad_client_secret = serializers.CharField(write_only=True, required=False, allow_blank=True, max_length=500)
    api_key_set = serializers.SerializerMethodField()
    ad_client_secret_set = serializers.SerializerMethodField()

    class Meta:
        model = Endpoint
        fields = [
            "id",
            "name",
            "kind",
            "base_url",
            "auth",
            "api_key",
            "api_key_set",
            "ad_tenant_id",
            "ad_client_id",
            "ad_client_secret",
            "ad_client_secret_set",
            "ad_authority",
            "api_version",
            "connect_timeout",
            "first_byte_timeout",
            "total_timeout",
            "enabled",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    def get_api_key_set(self, obj: Endpoint) -> bool:
        return bool(obj.api_key)

    def get_ad_client_secret_set(self, obj: Endpoint) -> bool:
        return bool(obj.ad_client_secret)

    def _candidate(self, attrs: dict[str, Any]) -> models.Model:
        if self.instance is None:
            return super()._candidate(attrs)
        candidate = copy.copy(self.instance)
        endpoint_update(candidate, attrs, save=False)
        return candidate

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        endpoint = self._candidate(attrs)
        assert isinstance(endpoint, Endpoint)
        errors: dict[str, str] = {}
        if endpoint.auth == Endpoint.Auth.API_KEY and not endpoint.api_key:
            errors["api_key"] = "An endpoint that authenticates with an API key needs one."
        if endpoint.auth == Endpoint.Auth.AZURE_AD:
            for name in ("ad_tenant_id", "ad_client_id", "ad_client_secret"):
                if not getattr(endpoint, name):
                    errors[name] = "Required for Azure AD authentication."
        if errors:
            raise serializers.ValidationError(errors)
        return attrs

    def update(self, instance: Endpoint, validated_data: dict[str, Any]) -> Endpoint:
        endpoint_update(instance, validated_data)
        return instance


assert set(SECRET_FIELDS) == {"api_key", "ad_client_secret"}  # the write-only fields above


class DeploymentSerializer(ConstrainedModelSerializer):
    endpoint = serializers.SlugRelatedField(slug_field="name", queryset=Endpoint.objects.all())

    class Meta:
        model = Deployment
        fields = [
            "id",
            "endpoint",
            "name",
            "model",
            "sku",
            "tier",
            "max_wait_seconds",
            "rpm",
            "tpm",
            "context_window",
            "max_output_tokens",
            "weight",
            "token_estimate",
            "upstream_model",
            "monthly_fixed_cost",
            "enabled",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
