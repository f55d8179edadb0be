"""Upstream endpoints and their deployments: where the gateway sends traffic."""

from __future__ import annotations

from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q

from gateway import defaults
from gateway.snapshot import types as t


class Endpoint(models.Model):
    """An Azure OpenAI resource or an OpenAI-compatible server, with its credentials."""

    class Kind(models.TextChoices):
        AZURE = t.AZURE, "Azure OpenAI"
        OPENAI = t.OPENAI, "OpenAI-compatible"

    class Auth(models.TextChoices):
        API_KEY = t.AUTH_API_KEY, "API key"
        AZURE_AD = t.AUTH_AZURE_AD, "Azure AD client credentials"

    name = models.SlugField(max_length=100, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=defaults.ENDPOINT_KIND)
    base_url = models.URLField(
        max_length=500,
        help_text="Azure: https://RESOURCE.openai.azure.com. OpenAI-compatible: the base including /v1.",
    )
    auth = models.CharField(max_length=10, choices=Auth.choices, default=defaults.ENDPOINT_AUTH)
    # Secrets are write-only in the admin, redacted in exports and never logged.
    api_key = models.CharField(max_length=500, blank=True)
    ad_tenant_id = models.CharField("Azure AD tenant id", max_length=100, blank=True)
    ad_client_id = models.CharField("Azure AD client id", max_length=100, blank=True)
    ad_client_secret = models.CharField("Azure AD client secret", max_length=500, blank=True)
    ad_authority = models.URLField("Azure AD authority", max_length=300, default=defaults.AD_AUTHORITY)
    api_version = models.CharField(
        max_length=40, default=defaults.API_VERSION, help_text="api-version sent to Azure endpoints."
    )
    connect_timeout = models.FloatField(default=defaults.CONNECT_TIMEOUT, validators=[MinValueValidator(0.001)])
    first_byte_timeout = models.FloatField(
        default=defaults.FIRST_BYTE_TIMEOUT,
        validators=[MinValueValidator(0.001)],
        help_text="Seconds until response headers.",
    )
    total_timeout = models.FloatField(default=defaults.TOTAL_TIMEOUT, validators=[MinValueValidator(0.001)])
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(connect_timeout__gt=0) & Q(first_byte_timeout__gt=0) & Q(total_timeout__gt=0),
                name="endpoint_timeouts_positive",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Deployment(models.Model):
    """A model deployed on an endpoint, with the limits the balancer keeps it within."""

    class Sku(models.TextChoices):
        STANDARD = t.SKU_STANDARD, "Standard (pay as you go)"
        PROVISIONED = t.SKU_PROVISIONED, "Provisioned (PTU)"

    class TokenEstimate(models.TextChoices):
        TIKTOKEN = t.ESTIMATE_TIKTOKEN, "tiktoken (exact)"
        FAST = t.ESTIMATE_FAST, "fast estimate"

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="deployments")
    name = models.CharField(max_length=200, help_text="Deployment name upstream (Azure) or upstream model name.")
    model = models.CharField(max_length=200, db_index=True, help_text="The model name clients ask for.")
    sku = models.CharField(max_length=12, choices=Sku.choices, default=defaults.SKU)
    tier = models.PositiveSmallIntegerField(default=defaults.TIER, help_text="1 is tried first, then 2, ...")
    max_wait_seconds = models.FloatField(
        default=defaults.MAX_WAIT_SECONDS,
        help_text="How long a request may wait for this tier before spilling to the next.",
    )
    rpm = models.PositiveIntegerField("RPM", default=defaults.NO_LIMIT, help_text="Requests per minute; 0 = no limit.")
    tpm = models.PositiveIntegerField("TPM", default=defaults.NO_LIMIT, help_text="Tokens per minute; 0 = no limit.")
    context_window = models.PositiveIntegerField(default=defaults.CONTEXT_WINDOW)
    max_output_tokens = models.PositiveIntegerField(default=defaults.MAX_OUTPUT_TOKENS)
    weight = models.PositiveSmallIntegerField(default=defaults.WEIGHT)
    token_estimate = models.CharField(max_length=10, choices=TokenEstimate.choices, default=defaults.TOKEN_ESTIMATE)
    upstream_model = models.CharField(
        max_length=200, blank=True, help_text="Model family for token counting, e.g. gpt-4o, when names say nothing."
    )
    monthly_fixed_cost = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        default=defaults.MONTHLY_FIXED_COST,
        help_text="Provisioned (PTU) only: what the reservation costs a month. Monthly statements share it "
        "among tenants in proportion to their tokens on this deployment.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "tier", "endpoint__name", "name"]
        constraints = [
            models.UniqueConstraint(fields=["endpoint", "name"], name="deployment_unique_per_endpoint"),
            models.CheckConstraint(condition=Q(tier__gte=1), name="deployment_tier_at_least_1"),
            models.CheckConstraint(condition=Q(weight__gte=1), name="deployment_weight_at_least_1"),
            models.CheckConstraint(condition=Q(max_wait_seconds__gte=0), name="deployment_max_wait_not_negative"),
            models.CheckConstraint(condition=Q(rpm__gte=0) & Q(tpm__gte=0), name="deployment_limits_not_negative"),
            models.CheckConstraint(condition=Q(context_window__gte=1), name="deployment_context_window_positive"),
            models.CheckConstraint(
                condition=Q(monthly_fixed_cost=0) | (Q(sku=t.SKU_PROVISIONED) & Q(monthly_fixed_cost__gt=0)),
                name="deployment_fixed_cost_only_provisioned",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint.name}/{self.name}"


class ConfigVersion(models.Model):
    """A single row whose number goes up whenever anything the request path reads changes.

    Every gateway process polls it (and its Redis mirror, when configured) and rebuilds its in-memory
    snapshot when it moves, so admin edits and ``gateway_apply`` reach all processes without an
    ORM query per request.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    version = models.BigIntegerField(default=0)
    changed_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"config v{self.version}"
