"""Prices, one usage record per request, and the roll-ups reports read."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class Price(models.Model):
    """What a model costs per million tokens from a date on. The newest row not in the future applies."""

    model = models.CharField(max_length=200)
    input_per_million = models.DecimalField(max_digits=12, decimal_places=6)
    cached_input_per_million = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    output_per_million = models.DecimalField(max_digits=12, decimal_places=6)
    effective_from = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="price_unique_per_model_and_start"),
            models.CheckConstraint(
                condition=Q(input_per_million__gte=0)
                & Q(cached_input_per_million__gte=0)
                & Q(output_per_million__gte=0),
                name="price_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d}"


class UsageRecord(models.Model):
    """Exactly one row per request that got past its headers: successes, errors, rejections, disconnects."""

    class Outcome(models.TextChoices):
        OK = "ok", "OK"
        CLIENT_ERROR = "client_error", "Rejected: bad request"
        AUTH_ERROR = "auth_error", "Rejected: authentication"
        FORBIDDEN = "forbidden", "Rejected: policy"
        RATE_LIMITED = "rate_limited", "Rejected: no capacity / queue"
        UPSTREAM_ERROR = "upstream_error", "Upstream error"
        UPSTREAM_TIMEOUT = "upstream_timeout", "Upstream timeout"
        CLIENT_DISCONNECT = "client_disconnect", "Client disconnected"

    request_id = models.CharField(max_length=64, unique=True)
    # Usage is billing history: a tenant or key with records cannot be deleted through Django
    # (deactivate or revoke it instead), and nothing cascades into this table, which holds
    # millions of rows. PROTECT is Django's check, not the database's: without a constraint in
    # the database, the records of a key deleted while they waited in a gateway's buffer (it had
    # none stored yet, so nothing protected it) are still written, with the id it had.
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.PROTECT, db_constraint=False, related_name="+"
    )
    key = models.ForeignKey(
        "tenants.ClientKey", null=True, blank=True, on_delete=models.PROTECT, db_constraint=False, related_name="+"
    )
    # Deployments come and go with the config file; records keep the id and the name, unconstrained.
    deployment = models.ForeignKey(
        "gateway.Deployment",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    # Names are kept as text too, so history stays readable after a deployment is pruned.
    deployment_name = models.CharField(max_length=300, blank=True)
    model = models.CharField(max_length=200, blank=True)
    route = models.CharField(max_length=40)
    status = models.PositiveSmallIntegerField()
    outcome = models.CharField(max_length=20, choices=Outcome.choices)
    error_code = models.CharField(max_length=100, blank=True)
    # Billed tokens: what the upstream served. 0 for requests whose answer never started.
    prompt_tokens = models.PositiveIntegerField(default=0)
    estimated_prompt_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="The gateway's prompt count before forwarding (not billed)."
    )
    cached_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    tokens_estimated = models.BooleanField(default=False, help_text="Counted by the gateway, not reported upstream.")
    cost = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    latency_ms = models.FloatField(default=0)
    ttft_ms = models.FloatField(null=True, blank=True)
    streamed = models.BooleanField(default=False)
    priority = models.PositiveSmallIntegerField(default=5)
    queue_wait_ms = models.FloatField(default=0)
    retries = models.PositiveSmallIntegerField(default=0)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    started_at = models.DateTimeField()

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["tenant", "started_at"], name="usage_tenant_time"),
            models.Index(fields=["key", "started_at"], name="usage_key_time"),
            models.Index(fields=["model", "started_at"], name="usage_model_time"),
            models.Index(fields=["deployment", "started_at"], name="usage_deployment_time"),
            models.Index(fields=["started_at"], name="usage_time"),
        ]

    def __str__(self) -> str:
        return self.request_id

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ParkedUsageRecord(models.Model):
    """A usage record the database refused, kept aside with the error for an operator.

    The usage flusher splits a refused batch until it finds the records at fault (a constraint,
    a value the column cannot hold), parks them here and writes the others, so one bad record
    never holds back the rest. ``record`` is the record as the gateway made it; the request id
    is unique, so parking the same record twice (a replayed spill file) keeps one row.
    """

    request_id = models.CharField(max_length=64, unique=True, null=True, blank=True)
    record = models.JSONField()
    error = models.TextField()
    first_seen = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-first_seen"]

    def __str__(self) -> str:
        return self.request_id or f"parked record {self.pk}"


class Rollup(models.Model):
    """Usage summed per period (hour or day), tenant, key, model and deployment."""

    class Granularity(models.TextChoices):
        HOUR = "hour", "Hour"
        DAY = "day", "Day"

    granularity = models.CharField(max_length=4, choices=Granularity.choices)
    period_start = models.DateTimeField()
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    key = models.ForeignKey("tenants.ClientKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Dimensions are text, not nullable foreign keys, so the uniqueness below holds on every database.
    key_prefix = models.CharField(max_length=20, blank=True)
    model = models.CharField(max_length=200, blank=True)
    deployment_name = models.CharField(max_length=300, blank=True)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=16, decimal_places=8, default=0)
    latency_ms_sum = models.FloatField(default=0)
    ttft_ms_sum = models.FloatField(default=0)
    streamed_requests = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-period_start"]
        constraints = [
            models.UniqueConstraint(
                fields=["granularity", "period_start", "tenant", "key_prefix", "model", "deployment_name"],
                name="rollup_unique_bucket",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "granularity", "period_start"], name="rollup_tenant_period"),
            models.Index(fields=["granularity", "period_start"], name="rollup_period"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.granularity} {self.period_start:%Y-%m-%d %H:00}"
