"""Tenants (teams), their client keys, quotas, access policy and the people who run them."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from gateway import defaults


class Tenant(models.Model):
    """A team that sends traffic through the gateway and gets its own usage and bill."""

    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    active = models.BooleanField(default=True, help_text="Inactive tenants' keys are refused.")
    # Who hears about budget alerts (tenants.alerts). The secret signs webhook bodies; it is
    # write-only in the admin and exported as an ${ENV} reference.
    alert_emails = models.JSONField(default=list, blank=True, help_text="E-mail addresses that receive budget alerts.")
    alert_webhook_url = models.URLField(
        max_length=500, blank=True, help_text="Budget alerts are POSTed here as JSON, signed with the secret."
    )
    alert_webhook_secret = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.name or self.slug


class ClientKey(models.Model):
    """A key an application presents. Only its SHA-256 hash and a visible prefix are stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="keys")
    name = models.CharField(max_length=200)
    prefix = models.CharField(max_length=20, help_text="The first characters, to recognise a key.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    allowed_models = models.JSONField(
        default=list, blank=True, help_text="Model names this key may use; empty = what the tenant allows."
    )
    default_priority = models.PositiveSmallIntegerField(
        default=defaults.DEFAULT_PRIORITY, help_text="Queue priority when a request names none (lower is served first)."
    )
    best_priority = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        help_text=(
            "The best (lowest) priority a request with this key may ask for in its 'priority' field; a better "
            "ask is served at this one. Empty = the default priority: the key cannot jump its own queue."
        ),
    )

    class Meta:
        ordering = ["tenant__slug", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="client_key_name_unique_per_tenant"),
            models.CheckConstraint(
                condition=Q(best_priority__isnull=True) | Q(best_priority__lte=F("default_priority")),
                name="client_key_best_priority_not_worse_than_default",
                violation_error_message="The best priority cannot be worse (higher) than the default priority.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def effective_best_priority(self) -> int:
        """The best priority requests may ask for (the default priority when none is set)."""
        return self.default_priority if self.best_priority is None else self.best_priority

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()


class Quota(models.Model):
    """Limits and budgets for a tenant (key empty) or for one of its keys. 0 means unlimited."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quotas")
    key = models.OneToOneField(ClientKey, on_delete=models.CASCADE, null=True, blank=True, related_name="quota")
    rpm = models.PositiveIntegerField("RPM", default=defaults.NO_LIMIT)
    tpm = models.PositiveIntegerField("TPM", default=defaults.NO_LIMIT)
    daily_tokens = models.PositiveBigIntegerField(default=defaults.NO_LIMIT)
    monthly_tokens = models.PositiveBigIntegerField(default=defaults.NO_LIMIT)
    monthly_cost = models.DecimalField(max_digits=12, decimal_places=2, default=defaults.NO_LIMIT)
    alert_thresholds = models.JSONField(
        default=list, blank=True, help_text="Percentages of a budget that raise an alert, e.g. [50, 80, 100]."
    )
    # Set by the admin's reset actions (tenants.services.quota_counters_reset): the period's
    # budget counters count usage records from this moment on.
    day_counters_reset_at = models.DateTimeField(null=True, blank=True, editable=False)
    month_counters_reset_at = models.DateTimeField(null=True, blank=True, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant"], condition=Q(key__isnull=True), name="quota_one_per_tenant"),
            models.CheckConstraint(
                condition=Q(rpm__gte=0)
                & Q(tpm__gte=0)
                & Q(daily_tokens__gte=0)
                & Q(monthly_tokens__gte=0)
                & Q(monthly_cost__gte=0),
                name="quota_limits_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"quota for {self.key or self.tenant}"


class AlertEvent(models.Model):
    """A budget of a tenant or key reached one of its alert thresholds in one period.

    At most one row per (scope, budget, threshold, period): whichever process inserts it sends
    the alert, so it goes out once however many processes noticed, and never again after a
    restart. The delivery columns let a retried send skip what already went out.
    """

    class Budget(models.TextChoices):
        DAILY_TOKENS = "daily_tokens", "Daily tokens"
        MONTHLY_TOKENS = "monthly_tokens", "Monthly tokens"
        MONTHLY_COST = "monthly_cost", "Monthly cost"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="alert_events")
    key = models.ForeignKey(ClientKey, on_delete=models.CASCADE, null=True, blank=True, related_name="alert_events")
    budget = models.CharField(max_length=20, choices=Budget.choices)
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the budget.")
    period_start = models.DateField(help_text="The day, or the month's first day, in the budget time zone.")
    used = models.DecimalField(max_digits=24, decimal_places=8, help_text="Tokens or money used when noticed.")
    limit = models.DecimalField(max_digits=24, decimal_places=8)
    created_at = models.DateTimeField(auto_now_add=True)
    emailed_at = models.DateTimeField(null=True, blank=True)
    webhook_sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "budget", "threshold", "period_start"],
                condition=Q(key__isnull=True),
                name="alert_event_once_per_tenant_period",
            ),
            models.UniqueConstraint(
                fields=["key", "budget", "threshold", "period_start"],
                condition=Q(key__isnull=False),
                name="alert_event_once_per_key_period",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.key or self.tenant}: {self.get_budget_display()} at {self.threshold}% ({self.period_start})"


class AccessPolicy(models.Model):
    """What a tenant's keys may do: models, client networks, and a cap on max_tokens."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="policy")
    allowed_models = models.JSONField(default=list, blank=True, help_text="Empty = every model.")
    ip_allow = models.JSONField(default=list, blank=True, help_text="CIDRs; empty = any address.")
    ip_deny = models.JSONField(default=list, blank=True, help_text="CIDRs refused even if allowed.")
    max_tokens_cap = models.PositiveIntegerField(
        default=defaults.MAX_TOKENS_CAP, help_text="Largest max_tokens a request may ask; 0 = none."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "access policies"

    def __str__(self) -> str:
        return f"policy for {self.tenant}"


class Membership(models.Model):
    """Ties a Django user to a tenant, so they can see its usage (viewer) or manage it (admin)."""

    class Role(models.TextChoices):
        VIEWER = "viewer", "Viewer"
        ADMIN = "admin", "Admin"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.VIEWER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


class ManagementToken(models.Model):
    """A credential for the management REST API (``/api/v1/``). Only its SHA-256 hash is stored.

    With a ``tenant`` it is a team lead's token: it reads that tenant's usage and statements and
    manages that tenant's client keys, nothing else. Without one it is a staff token: it acts as
    ``created_by``, who must still be an active staff user when it is presented. Client keys
    (``sk-gw-``) are never management credentials; these start with ``gwm-``.
    """

    tenant = models.ForeignKey(
        Tenant, on_delete=models.CASCADE, null=True, blank=True, related_name="management_tokens"
    )
    name = models.CharField(max_length=200)
    prefix = models.CharField(max_length=20, help_text="The first characters, to recognise a token.")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="management_tokens")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(help_text="Every management token expires.")
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def usable(self) -> bool:
        return self.revoked_at is None and self.expires_at > timezone.now()
