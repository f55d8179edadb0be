"""Prices, one usage record per request, the roll-ups reports read, and monthly statements."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone

from billing.histograms import HISTOGRAMS, column_names


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
    # When the row reached the database (its default, by the database's clock; the usage sink
    # leaves the column out). Roll-ups find what arrived since their last run by this, so a
    # record written long after its request started is still counted.
    recorded_at = models.DateTimeField(db_default=Now(), editable=False)

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["tenant", "started_at"], name="usage_tenant_time"),
            models.Index(fields=["key", "started_at"], name="usage_key_time"),
            models.Index(fields=["model", "started_at"], name="usage_model_time"),
            models.Index(fields=["deployment", "started_at"], name="usage_deployment_time"),
            models.Index(fields=["started_at"], name="usage_time"),
            # Covers the roll-up's "which hours got records since" (index-only on PostgreSQL).
            models.Index(fields=["recorded_at", "started_at"], name="usage_recorded"),
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
    """Usage summed per period (hour, day, month), tenant, key, model and deployment.

    Hours are recomputed from the usage records, days from hours, months from days; a period is
    always recomputed whole and upserted, so running a roll-up twice gives the same rows.
    Dimensions are plain ids with 0 for "none" (a 401 has no tenant, a rejected request no
    deployment) rather than nullable foreign keys: the unique bucket then holds on PostgreSQL and
    SQLite alike, and roll-ups outlive a deleted key, deployment or tenant. The labels beside them
    (key name, endpoint, SKU) are what those were when the period was rolled up.
    """

    class Granularity(models.TextChoices):
        HOUR = "hour", "Hour"
        DAY = "day", "Day"
        MONTH = "month", "Month"

    granularity = models.CharField(max_length=5, choices=Granularity.choices)
    period_start = models.DateTimeField()
    tenant_ref = models.PositiveBigIntegerField("tenant id", default=0, help_text="0: no tenant (unauthenticated).")
    key_ref = models.PositiveBigIntegerField("key id", default=0, help_text="0: no key.")
    model = models.CharField(max_length=200, blank=True)
    deployment_ref = models.PositiveBigIntegerField("deployment id", default=0, help_text="0: never forwarded.")
    key_name = models.CharField(max_length=200, blank=True)
    key_prefix = models.CharField(max_length=20, blank=True)
    deployment_name = models.CharField(max_length=300, blank=True)
    endpoint_name = models.CharField(max_length=100, blank=True)
    sku = models.CharField("SKU", max_length=12, blank=True)

    requests = models.PositiveBigIntegerField(default=0)
    # Requests by outcome (UsageRecord.Outcome values); they add up to ``requests``.
    ok = models.PositiveBigIntegerField(default=0)
    client_error = models.PositiveBigIntegerField(default=0)
    auth_error = models.PositiveBigIntegerField(default=0)
    forbidden = models.PositiveBigIntegerField(default=0)
    rate_limited = models.PositiveBigIntegerField(default=0)
    upstream_error = models.PositiveBigIntegerField(default=0)
    upstream_timeout = models.PositiveBigIntegerField(default=0)
    client_disconnect = models.PositiveBigIntegerField(default=0)
    streamed = models.PositiveBigIntegerField(default=0)
    retries = models.PositiveBigIntegerField(default=0)
    estimated = models.PositiveBigIntegerField(default=0, help_text="Requests whose tokens the gateway counted.")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=18, decimal_places=8, default=0)
    # Sums of durations in whole microseconds: integers add up the same in any order, so a
    # recomputed period is equal to the last bit (float sums vary with PostgreSQL's order).
    latency_us_sum = models.PositiveBigIntegerField(default=0, help_text="Requests that reached a deployment.")
    ttft_us_sum = models.PositiveBigIntegerField(default=0)
    queue_wait_us_sum = models.PositiveBigIntegerField(default=0)
    # Histogram buckets (lat_00 …, ttft_00 …, wait_00 …) are added below the class.
    computed_at = models.DateTimeField(help_text="When this row was last recomputed.")

    class Meta:
        ordering = ["-period_start"]
        constraints = [
            models.UniqueConstraint(
                fields=["granularity", "period_start", "tenant_ref", "key_ref", "model", "deployment_ref"],
                name="rollup_unique_bucket",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant_ref", "granularity", "period_start"], name="rollup_tenant_period"),
            models.Index(fields=["granularity", "period_start"], name="rollup_period"),
            # Covers the overview's per-deployment, per-hour sums (its widest scan: a month of hour
            # rows) without reading the ninety-column rows: 2x faster on SQLite at 540,000 rows.
            models.Index(
                fields=[
                    "granularity",
                    "period_start",
                    "deployment_ref",
                    "requests",
                    "prompt_tokens",
                    "completion_tokens",
                ],
                name="rollup_deployment_use",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.granularity} {self.period_start:%Y-%m-%d %H:00} tenant {self.tenant_ref} {self.model}"


OUTCOME_COLUMNS = [outcome.value for outcome in UsageRecord.Outcome]
HISTOGRAM_COLUMNS = {name: column_names(prefix) for name, prefix in HISTOGRAMS.items()}
# Sixty bucket columns are written out by a loop rather than by hand; they are ordinary fields
# (migrations, bulk upserts and SUM() see them like any other).
for _columns in HISTOGRAM_COLUMNS.values():
    for _column in _columns:
        Rollup.add_to_class(_column, models.PositiveBigIntegerField(default=0))
# Every column a roll-up sums: what a recomputation writes and what a coarser period adds up.
SUM_COLUMNS = [
    "requests",
    *OUTCOME_COLUMNS,
    "streamed",
    "retries",
    "estimated",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "cost",
    "latency_us_sum",
    "ttft_us_sum",
    "queue_wait_us_sum",
    *(column for columns in HISTOGRAM_COLUMNS.values() for column in columns),
]
LABEL_COLUMNS = ["key_name", "key_prefix", "deployment_name", "endpoint_name", "sku"]
BUCKET_COLUMNS = ["granularity", "period_start", "tenant_ref", "key_ref", "model", "deployment_ref"]


class RollupCursor(models.Model):
    """How far roll-ups have read: the newest ``recorded_at`` of the usage records they saw."""

    name = models.CharField(max_length=40, primary_key=True)
    recorded_through = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name}: {self.recorded_through}"


class Statement(models.Model):
    """A tenant's usage and charges for one calendar month (UTC).

    Drafts are recomputed from the month's roll-ups on every roll-up run; once the month has
    closed (plus ``GATEWAY_STATEMENT_GRACE_HOURS``) the statement is computed one last time and
    frozen. ``lines`` (by model and key) and ``provisioned`` (each PTU deployment's fixed cost,
    shared by tokens) are the statement's body, kept as written so exports never change.
    """

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft (month not closed)"
        FINAL = "final", "Final"

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="statements")
    month = models.DateField(help_text="The first day of the month.")
    status = models.CharField(max_length=5, choices=Status.choices, default=Status.DRAFT)
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    payg_cost = models.DecimalField(
        "pay-as-you-go cost",
        max_digits=18,
        decimal_places=8,
        default=0,
        help_text="Tokens served by standard deployments.",
    )
    ptu_cost = models.DecimalField(
        "provisioned (PTU) share", max_digits=14, decimal_places=2, default=0, help_text="Shares of PTU fixed costs."
    )
    lines = models.JSONField(default=list, blank=True)
    provisioned = models.JSONField(default=list, blank=True)
    computed_at = models.DateTimeField()
    frozen_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-month", "tenant__slug"]
        constraints = [models.UniqueConstraint(fields=["tenant", "month"], name="statement_one_per_tenant_and_month")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.month:%Y-%m} ({self.status})"

    @property
    def total_cost(self):
        return self.payg_cost + self.ptu_cost
