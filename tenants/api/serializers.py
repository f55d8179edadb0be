"""Serializers validate; the views call the same services as the admin (``tenants.services``)."""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from rest_framework import serializers

from gateway.api.serializers import ConstrainedModelSerializer
from tenants.models import AccessPolicy, ClientKey, ManagementToken, Quota, Tenant


class TenantSerializer(ConstrainedModelSerializer):
    # Write-only like the admin: the webhook secret is never read back.
    alert_webhook_secret = serializers.CharField(write_only=True, required=False, allow_blank=True, max_length=500)
    alert_emails = serializers.ListField(child=serializers.EmailField(), required=False)

    class Meta:
        model = Tenant
        fields = [
            "id",
            "slug",
            "name",
            "active",
            "alert_emails",
            "alert_webhook_url",
            "alert_webhook_secret",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]


class ClientKeySerializer(serializers.ModelSerializer):
    """A key as lists show it: the prefix, never the hash or the secret."""

    tenant = serializers.SlugRelatedField(slug_field="slug", queryset=Tenant.objects.all())
    revoked = serializers.BooleanField(read_only=True)
    allowed_models = serializers.ListField(child=serializers.CharField(max_length=200), required=False)
    expired = serializers.BooleanField(read_only=True)

    class Meta:
        model = ClientKey
        fields = [
            "id",
            "tenant",
            "name",
            "prefix",
            "created_at",
            "expires_at",
            "revoked_at",
            "revoked",
            "expired",
            "last_used_at",
            "allowed_models",
            "default_priority",
            "best_priority",
        ]
        read_only_fields = ["id", "prefix", "created_at", "revoked_at", "last_used_at"]

    def __init__(self, *args: Any, tenant: Tenant | None = None, **kwargs: Any) -> None:
        """``tenant``: the caller's tenant token's tenant. Such a caller cannot choose the tenant nor
        set priorities (a tenant token can never raise its own priority)."""
        super().__init__(*args, **kwargs)
        self.token_tenant = tenant
        if tenant is not None:
            for name in ("tenant", "default_priority", "best_priority"):
                self.fields[name].read_only = True
        if self.instance is not None and not isinstance(self.instance, list | tuple):
            self.fields["tenant"].read_only = True  # a key never moves to another tenant

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        default = attrs.get("default_priority", getattr(self.instance, "default_priority", None))
        best = attrs.get("best_priority", getattr(self.instance, "best_priority", None))
        if best is not None and default is not None and best > default:
            raise serializers.ValidationError(
                {"best_priority": "The best priority cannot be worse (higher) than the default priority."}
            )
        tenant = self.token_tenant or attrs.get("tenant") or getattr(self.instance, "tenant", None)
        name = attrs.get("name")
        if tenant is not None and name is not None:
            clash = ClientKey.objects.filter(tenant=tenant, name=name)
            if self.instance is not None:
                clash = clash.exclude(pk=self.instance.pk)
            if clash.exists():
                raise serializers.ValidationError({"name": "This tenant already has a key with this name."})
        return attrs


class IssuedKeySerializer(ClientKeySerializer):
    """The answer to issuing a key: the only time its secret is ever shown."""

    secret = serializers.CharField(read_only=True, help_text="Shown once; only its hash is stored.")

    class Meta(ClientKeySerializer.Meta):
        fields = [*ClientKeySerializer.Meta.fields, "secret"]


class QuotaSerializer(ConstrainedModelSerializer):
    tenant = serializers.SlugRelatedField(slug_field="slug", queryset=Tenant.objects.all())
    alert_thresholds = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=1000),
        required=False,
        help_text="Percentages of a budget that raise an alert, e.g. [50, 80, 100].",
    )

    class Meta:
        model = Quota
        fields = [
            "id",
            "tenant",
            "key",
            "rpm",
            "tpm",
            "daily_tokens",
            "monthly_tokens",
            "monthly_cost",
            "alert_thresholds",
            "day_counters_reset_at",
            "month_counters_reset_at",
            "updated_at",
        ]
        read_only_fields = ["id", "day_counters_reset_at", "month_counters_reset_at", "updated_at"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        tenant = attrs.get("tenant", getattr(self.instance, "tenant", None))
        key = attrs.get("key", getattr(self.instance, "key", None))
        if key is not None and tenant is not None and key.tenant_id != tenant.pk:
            raise serializers.ValidationError({"key": "The key belongs to another tenant."})
        clash = Quota.objects.filter(tenant=tenant, key=key) if key is None else Quota.objects.filter(key=key)
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError("This tenant or key already has a quota.")
        return super().validate(attrs)


class QuotaResetSerializer(serializers.Serializer):
    period = serializers.ChoiceField(choices=["day", "month"])


class AccessPolicySerializer(ConstrainedModelSerializer):
    tenant = serializers.SlugRelatedField(slug_field="slug", queryset=Tenant.objects.all())
    allowed_models = serializers.ListField(child=serializers.CharField(max_length=200), required=False)
    ip_allow = serializers.ListField(child=serializers.CharField(max_length=50), required=False)
    ip_deny = serializers.ListField(child=serializers.CharField(max_length=50), required=False)

    class Meta:
        model = AccessPolicy
        fields = ["id", "tenant", "allowed_models", "ip_allow", "ip_deny", "max_tokens_cap", "updated_at"]
        read_only_fields = ["id", "updated_at"]

    def _cidrs(self, value: Any) -> list[str]:
        import ipaddress

        if not isinstance(value, list):
            raise serializers.ValidationError("A list of CIDRs.")
        for cidr in value:
            try:
                ipaddress.ip_network(str(cidr), strict=False)
            except ValueError as exc:
                raise serializers.ValidationError(f"Not a CIDR: {cidr!r}.") from exc
        return value

    def validate_ip_allow(self, value: Any) -> list[str]:
        return self._cidrs(value)

    def validate_ip_deny(self, value: Any) -> list[str]:
        return self._cidrs(value)


class ManagementTokenSerializer(serializers.ModelSerializer):
    tenant = serializers.SlugRelatedField(
        slug_field="slug", queryset=Tenant.objects.all(), required=False, allow_null=True
    )
    created_by: serializers.StringRelatedField = serializers.StringRelatedField()

    class Meta:
        model = ManagementToken
        fields = ["id", "tenant", "name", "prefix", "created_by", "created_at", "expires_at", "revoked_at"]
        read_only_fields = ["id", "prefix", "created_by", "created_at", "revoked_at"]

    def validate_expires_at(self, value: Any) -> Any:
        if value <= timezone.now():
            raise serializers.ValidationError("Must be in the future.")
        return value


class IssuedManagementTokenSerializer(ManagementTokenSerializer):
    secret = serializers.CharField(read_only=True, help_text="Shown once; only its hash is stored.")

    class Meta(ManagementTokenSerializer.Meta):
        fields = [*ManagementTokenSerializer.Meta.fields, "secret"]
