"""Admin for tenants, client keys, quotas, access policies and memberships.

Keys are issued, revoked and expired only through ``tenants.services``: the add page calls
``key_issue`` and answers with a page that shows the secret once (a message would park it in the
session or a cookie; a redirect would need it stored somewhere in between), and the actions call
``key_revoke`` and ``key_expire``. The hash is in no form and no page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count, Prefetch, Q, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from tenants.admin_forms import AccessPolicyForm, ClientKeyForm, ClientKeyIssueForm, QuotaForm, TenantForm
from tenants.admin_issued import issued_secret_response
from tenants.admin_quota import admin_periods, quota_bars, quota_scope
from tenants.models import AccessPolicy, AlertEvent, ClientKey, Membership, Quota, Tenant
from tenants.quota_state.contract import KEY, TENANT
from tenants.selectors import quota_use_read
from tenants.services import IssuedKey, key_expire, key_issue, key_revoke, quota_counters_reset

# --- inlines ---------------------------------------------------------------------------------

QUOTA_FIELDS = ("rpm", "tpm", "daily_tokens", "monthly_tokens", "monthly_cost", "alert_thresholds")


class TenantQuotaInline(admin.StackedInline):
    """The tenant-wide quota (the row whose key is empty); per-key quotas are on each key's page."""

    model = Quota
    form = QuotaForm
    fk_name = "tenant"
    fields = QUOTA_FIELDS
    max_num = 1
    verbose_name = verbose_name_plural = "tenant quota (0 = unlimited)"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Quota]:
        return super().get_queryset(request).filter(key__isnull=True).select_related("tenant")


class AccessPolicyInline(admin.StackedInline):
    model = AccessPolicy
    form = AccessPolicyForm
    fields = ("allowed_models", "ip_allow", "ip_deny", "max_tokens_cap")
    verbose_name_plural = "access policy"

    def get_queryset(self, request: HttpRequest) -> QuerySet[AccessPolicy]:
        return super().get_queryset(request).select_related("tenant")


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        return super().get_queryset(request).select_related("user", "tenant")


class KeyQuotaFormSet(BaseInlineFormSet):
    """A key's quota belongs to the key's tenant too: set it on new rows before they validate."""

    def get_form_kwargs(self, index: int | None) -> dict[str, Any]:
        kwargs = super().get_form_kwargs(index)
        if index is None or index >= self.initial_form_count():
            kwargs["instance"] = Quota(tenant_id=self.instance.tenant_id)
        return kwargs


class KeyQuotaInline(admin.StackedInline):
    model = Quota
    form = QuotaForm
    formset = KeyQuotaFormSet
    fk_name = "key"
    fields = QUOTA_FIELDS
    verbose_name = verbose_name_plural = "key quota (0 = unlimited)"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Quota]:
        return super().get_queryset(request).select_related("tenant", "key")


# --- tenants ---------------------------------------------------------------------------------


def _reset_counters(
    model_admin: admin.ModelAdmin, request: HttpRequest, quotas: QuerySet[Quota], period: str, owner: Callable
) -> None:
    """The reset actions: each quota's day or month counted afresh from now, logged on its owner."""
    what = "today's" if period == "day" else "this month's"
    with transaction.atomic():
        done = list(quotas)
        for quota in done:
            quota_counters_reset(quota, period)
            model_admin.log_change(request, owner(quota), f"Reset {what} budget counters.")
    if done:
        model_admin.message_user(
            request,
            f"Reset {what} budget counters of {len(done)} quota(s); they count from now on in every gateway process.",
            messages.SUCCESS,
        )
    else:
        model_admin.message_user(request, "Nothing to reset: the selection has no quota.", messages.INFO)


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    form = TenantForm
    list_display = ("slug", "name", "active", "key_count", "quota_column", "created_at")
    list_filter = ("active",)
    search_fields = ("slug", "name")
    readonly_fields = ("created_at", "updated_at", "quota_use", "webhook_secret_status")
    inlines = (TenantQuotaInline, AccessPolicyInline, MembershipInline)
    actions = ("reset_day_counters", "reset_month_counters")
    # Explicit, because Meta.ordering does not apply to the GROUP BY query the count makes.
    ordering = ("slug",)
    fieldsets = (
        (None, {"fields": ("slug", "name", "active")}),
        ("Quota use", {"fields": ("quota_use",)}),
        (
            "Budget alerts",
            {"fields": ("alert_emails", "alert_webhook_url", "alert_webhook_secret", "clear_alert_webhook_secret")},
        ),
        ("History", {"fields": ("created_at", "updated_at")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        own_quota = Prefetch("quotas", queryset=Quota.objects.filter(key__isnull=True), to_attr="own_quotas")
        return super().get_queryset(request).annotate(key_count=Count("keys")).prefetch_related(own_quota)

    def get_fieldsets(self, request: HttpRequest, obj: Tenant | None = None) -> Any:
        if obj is None:  # nothing used yet, and nothing to hide
            return [(name, opts) for name, opts in self.fieldsets if name != "Quota use"]
        if self.has_change_permission(request, obj):
            return self.fieldsets
        # A view-only page renders listed fields from the row itself: show the secret's status instead.
        return [(name, {**opts, "fields": _without_webhook_secret(opts["fields"])}) for name, opts in self.fieldsets]

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        # One read of every listed tenant's counters, instead of one per row.
        periods = admin_periods()
        rows = list(changelist.result_list)
        scopes = [quota_scope(TENANT, t.pk, t.pk, _own_quota(t), periods) for t in rows]
        limited = [scope for scope in scopes if scope is not None]
        uses = dict(zip([s.ref for s in limited], quota_use_read(limited, periods), strict=True))
        for tenant, scope in zip(rows, scopes, strict=True):
            tenant._quota_row = (scope, uses.get(scope.ref) if scope else None)
        return changelist

    @admin.display(description="keys", ordering="key_count")
    def key_count(self, tenant: Tenant) -> str:
        url = reverse("admin:tenants_clientkey_changelist") + f"?tenant__id__exact={tenant.pk}"
        return format_html('<a href="{}">{}</a>', url, tenant.key_count)  # type: ignore[attr-defined]

    @admin.display(description="quota use")
    def quota_column(self, tenant: Tenant) -> str:
        scope, use = getattr(tenant, "_quota_row", (None, None))
        return quota_bars(scope, use, compact=True)

    @admin.display(description="current use")
    def quota_use(self, tenant: Tenant) -> str:
        periods = admin_periods()
        scope = quota_scope(TENANT, tenant.pk, tenant.pk, _own_quota(tenant), periods)
        use = quota_use_read([scope], periods)[0] if scope else None
        return quota_bars(scope, use)

    @admin.display(description="webhook secret")
    def webhook_secret_status(self, tenant: Tenant) -> str:
        return "set" if tenant.alert_webhook_secret else "not set"

    @admin.action(description="Reset today's budget counters of the selected tenants", permissions=["change"])
    def reset_day_counters(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        quotas = Quota.objects.filter(tenant__in=queryset, key__isnull=True).select_related("tenant")
        _reset_counters(self, request, quotas, "day", lambda quota: quota.tenant)

    @admin.action(description="Reset this month's budget counters of the selected tenants", permissions=["change"])
    def reset_month_counters(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        quotas = Quota.objects.filter(tenant__in=queryset, key__isnull=True).select_related("tenant")
        _reset_counters(self, request, quotas, "month", lambda quota: quota.tenant)


def _own_quota(tenant: Tenant) -> Quota | None:
    """The tenant-wide quota: prefetched on lists and edit pages, queried otherwise."""
    prefetched = getattr(tenant, "own_quotas", None)
    if prefetched is not None:
        return prefetched[0] if prefetched else None
    return Quota.objects.filter(tenant=tenant, key__isnull=True).first()


def _without_webhook_secret(fields: Any) -> tuple[str, ...]:
    hidden = {"alert_webhook_secret", "clear_alert_webhook_secret"}
    out = tuple(name for name in fields if name not in hidden)
    return (*out, "webhook_secret_status") if len(out) != len(fields) else out


@admin.register(AlertEvent)
class AlertEventAdmin(admin.ModelAdmin):
    """Budget alerts as they were raised and delivered: a record, not something to edit."""

    list_display = ("created_at", "tenant", "key", "budget", "threshold", "period_start", "used", "limit", "delivery")
    list_filter = ("budget", "threshold", "tenant")
    list_select_related = ("tenant", "key")
    search_fields = ("tenant__slug", "key__name", "key__prefix")
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AlertEvent | None = None) -> bool:
        return False

    @admin.display(description="delivered")
    def delivery(self, event: AlertEvent) -> str:
        sent = [name for name, at in (("e-mail", event.emailed_at), ("webhook", event.webhook_sent_at)) if at]
        pending = f" (failing: {event.last_error[:80]})" if event.last_error else ""
        return (", ".join(sent) or "not yet") + pending


# --- client keys -----------------------------------------------------------------------------


class RevokedFilter(admin.SimpleListFilter):
    title = "revoked"
    parameter_name = "revoked"

    def lookups(self, request, model_admin):
        return [("yes", "Revoked"), ("no", "Not revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in ("yes", "no"):
            return queryset.filter(revoked_at__isnull=self.value() == "no")
        return queryset


class ExpiredFilter(admin.SimpleListFilter):
    title = "expired"
    parameter_name = "expired"

    def lookups(self, request, model_admin):
        return [("yes", "Expired"), ("no", "Not expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        expired = Q(expires_at__lte=timezone.now())
        if self.value() == "yes":
            return queryset.filter(expired)
        if self.value() == "no":
            return queryset.exclude(expired)
        return queryset


#: The request attribute that carries a just-issued key from save_model to response_add.
_ISSUED = "_tenants_issued_key"
ISSUED_TEMPLATE = "admin/tenants/clientkey/issued.html"


@admin.register(ClientKey)
class ClientKeyAdmin(admin.ModelAdmin):
    form = ClientKeyForm
    list_display = (
        "tenant",
        "name",
        "prefix",
        "created_at",
        "expires_at",
        "status",
        "last_used_at",
        "default_priority",
        "best_priority",
    )
    list_display_links = ("name",)
    list_filter = ("tenant", RevokedFilter, ExpiredFilter)
    list_select_related = ("tenant",)
    search_fields = ("name", "prefix", "tenant__slug")
    autocomplete_fields = ("tenant",)
    exclude = ("key_hash",)  # not editable anyway; said here so that nobody adds it to a page
    actions = ("revoke_keys", "expire_keys", "reset_day_counters", "reset_month_counters")
    fieldsets = (
        (None, {"fields": ("tenant", "name", "prefix", "status")}),
        ("Use", {"fields": ("allowed_models", "default_priority", "best_priority", "last_used_at", "quota_use")}),
        ("Lifetime", {"fields": ("created_at", "expires_at", "revoked_at")}),
    )
    add_fieldsets = (
        (
            None,
            {"fields": ("tenant", "name", "expires_at", "allowed_models", "default_priority", "best_priority")},
        ),
    )
    change_readonly_fields = ("tenant", "prefix", "status", "last_used_at", "created_at", "revoked_at", "quota_use")

    # The add page issues a key; the change page edits what may change after.

    def get_fieldsets(self, request: HttpRequest, obj: ClientKey | None = None):
        return self.add_fieldsets if obj is None else self.fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: ClientKey | None = None):
        return () if obj is None else self.change_readonly_fields

    def get_form(self, request: HttpRequest, obj: ClientKey | None = None, change: bool = False, **kwargs: Any):
        if obj is None:
            kwargs["form"] = ClientKeyIssueForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_inlines(self, request: HttpRequest, obj: ClientKey | None):
        return (KeyQuotaInline,) if obj is not None else ()

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: dict | None = None):
        context = {
            "title": "Issue a client key",
            # Every way out of the add page is the page that shows the secret.
            "show_save_and_add_another": False,
            "show_save_and_continue": False,
            **(extra_context or {}),
        }
        return super().add_view(request, form_url, context)

    def save_model(self, request: HttpRequest, obj: ClientKey, form: Any, change: bool) -> None:
        if change:
            # Save only what the form changed: a full save would write back revoked_at and
            # last_used_at as this request read them, undoing a revocation that landed meanwhile.
            editable = {f.name for f in ClientKey._meta.concrete_fields}
            fields = [name for name in form.changed_data if name in editable]
            if fields:
                obj.save(update_fields=fields)
            return
        issued = key_issue(
            obj.tenant,
            name=obj.name,
            expires_at=obj.expires_at,
            allowed_models=obj.allowed_models,
            default_priority=obj.default_priority,
            best_priority=obj.best_priority,
        )
        # The admin goes on with ``obj`` (history entry, response): make it the row just created.
        for field in ClientKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(issued.key, field.attname))
        obj._state.adding, obj._state.db = False, issued.key._state.db
        setattr(request, _ISSUED, issued)

    def response_add(self, request: HttpRequest, obj: ClientKey, post_url_continue: str | None = None) -> HttpResponse:
        issued: IssuedKey | None = getattr(request, _ISSUED, None)
        if issued is None:  # pragma: no cover - save_model always sets it on add
            return super().response_add(request, obj, post_url_continue)
        return issued_secret_response(
            self,
            request,
            obj,
            secret=issued.secret,
            template=ISSUED_TEMPLATE,
            title="Key issued",
            links=("change", "changelist", "add"),
        )

    @admin.display(description="status")
    def status(self, key: ClientKey) -> str:
        # From the row's own columns: no query per row.
        if key.revoked:
            return "revoked"
        return "expired" if key.expired else "active"

    @admin.display(description="quota use")
    def quota_use(self, key: ClientKey) -> str:
        periods = admin_periods()
        quota = Quota.objects.filter(key=key).first()
        scope = quota_scope(KEY, key.pk, key.tenant_id, quota, periods)
        use = quota_use_read([scope], periods)[0] if scope else None
        return quota_bars(scope, use)

    @admin.action(description="Reset today's budget counters of the selected keys", permissions=["change"])
    def reset_day_counters(self, request: HttpRequest, queryset: QuerySet[ClientKey]) -> None:
        quotas = Quota.objects.filter(key__in=queryset).select_related("key")
        _reset_counters(self, request, quotas, "day", lambda quota: quota.key)

    @admin.action(description="Reset this month's budget counters of the selected keys", permissions=["change"])
    def reset_month_counters(self, request: HttpRequest, queryset: QuerySet[ClientKey]) -> None:
        quotas = Quota.objects.filter(key__in=queryset).select_related("key")
        _reset_counters(self, request, quotas, "month", lambda quota: quota.key)

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ClientKey]) -> None:
        self._apply(request, queryset.filter(revoked_at__isnull=True), key_revoke, "Revoked")

    @admin.action(description="Expire selected keys now", permissions=["change"])
    def expire_keys(self, request: HttpRequest, queryset: QuerySet[ClientKey]) -> None:
        now = timezone.now()
        pending = queryset.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        self._apply(request, pending, key_expire, "Expired")

    def _apply(
        self, request: HttpRequest, keys: QuerySet[ClientKey], service: Callable[[ClientKey], None], verb: str
    ) -> None:
        """Run ``service`` on each key (those it would not change are filtered out), logging each."""
        with transaction.atomic():
            changed = list(keys)
            for key in changed:
                service(key)
                self.log_change(request, key, f"{verb} from the key list.")
        if changed:
            self.message_user(request, f"{verb} {len(changed)} key(s).", messages.SUCCESS)
        else:
            self.message_user(request, f"Nothing to do: the selected keys were {verb.lower()} already.", messages.INFO)


# --- quotas, policies, memberships -------------------------------------------------------------


class ScopeFilter(admin.SimpleListFilter):
    title = "scope"
    parameter_name = "scope"

    def lookups(self, request, model_admin):
        return [("tenant", "Tenant-wide"), ("key", "One key")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in ("tenant", "key"):
            return queryset.filter(key__isnull=self.value() == "tenant")
        return queryset


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    form = QuotaForm
    list_display = ("tenant", "key", "rpm", "tpm", "daily_tokens", "monthly_tokens", "monthly_cost", "updated_at")
    list_filter = (ScopeFilter, "tenant")
    list_select_related = ("tenant", "key")
    search_fields = ("tenant__slug", "key__name", "key__prefix")
    autocomplete_fields = ("tenant", "key")
    readonly_fields = ("updated_at",)


@admin.register(AccessPolicy)
class AccessPolicyAdmin(admin.ModelAdmin):
    form = AccessPolicyForm
    list_display = ("tenant", "allowed_models", "ip_allow", "ip_deny", "max_tokens_cap", "updated_at")
    list_select_related = ("tenant",)
    search_fields = ("tenant__slug", "tenant__name")
    autocomplete_fields = ("tenant",)
    readonly_fields = ("updated_at",)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "tenant", "role")
    list_filter = ("role", "tenant")
    list_select_related = ("user", "tenant")
    search_fields = ("user__username", "user__email", "tenant__slug")
    autocomplete_fields = ("user", "tenant")


from tenants import admin_tokens  # noqa: E402,F401  (registers the management tokens admin)
