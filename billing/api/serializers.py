"""Serializers of prices, usage roll-up rows and statements."""

from __future__ import annotations

from typing import Any, cast

from rest_framework import serializers

from billing.models import Price, Rollup, Statement
from gateway.api.serializers import ConstrainedModelSerializer


class PriceSerializer(ConstrainedModelSerializer):
    class Meta:
        model = Price
        fields = [
            "id",
            "model",
            "input_per_million",
            "cached_input_per_million",
            "output_per_million",
            "effective_from",
            "created_at",
        ]
        read_only_fields = ["id", "created_at"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        model = attrs.get("model", getattr(self.instance, "model", None))
        start = attrs.get("effective_from", getattr(self.instance, "effective_from", None))
        clash = Price.objects.filter(model=model, effective_from=cast(Any, start))
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError("This model already has a price from that moment.")
        for name in ("input_per_million", "cached_input_per_million", "output_per_million"):
            if name in attrs and attrs[name] < 0:
                raise serializers.ValidationError({name: "Prices are not negative."})
        return super().validate(attrs)


class UsageSerializer(serializers.ModelSerializer):
    """One roll-up row: a period's usage of one tenant, key, model and deployment."""

    tenant = serializers.IntegerField(source="tenant_ref", help_text="Tenant id (0: unauthenticated).")
    key = serializers.IntegerField(source="key_ref", help_text="Client key id (0: none).")
    deployment = serializers.IntegerField(source="deployment_ref", help_text="Deployment id (0: never forwarded).")
    total_tokens = serializers.SerializerMethodField()

    class Meta:
        model = Rollup
        fields = [
            "id",
            "granularity",
            "period_start",
            "tenant",
            "key",
            "key_name",
            "key_prefix",
            "model",
            "deployment",
            "deployment_name",
            "endpoint_name",
            "sku",
            "requests",
            "ok",
            "client_error",
            "auth_error",
            "forbidden",
            "rate_limited",
            "upstream_error",
            "upstream_timeout",
            "client_disconnect",
            "streamed",
            "retries",
            "prompt_tokens",
            "cached_tokens",
            "completion_tokens",
            "total_tokens",
            "cost",
            "computed_at",
        ]
        read_only_fields = fields

    def get_total_tokens(self, row: Rollup) -> int:
        return row.prompt_tokens + row.completion_tokens


class StatementSerializer(serializers.ModelSerializer):
    tenant: serializers.SlugRelatedField = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    month = serializers.DateField(format="%Y-%m")
    total_cost = serializers.DecimalField(max_digits=20, decimal_places=8, read_only=True)

    class Meta:
        model = Statement
        fields = [
            "id",
            "tenant",
            "month",
            "status",
            "requests",
            "prompt_tokens",
            "cached_tokens",
            "completion_tokens",
            "payg_cost",
            "ptu_cost",
            "total_cost",
            "computed_at",
            "frozen_at",
        ]
        read_only_fields = fields
