"""Admin for prices (editable), usage records and roll-ups (read-only history).

The usage table grows by one row per request, into the hundreds of millions. Nothing on its
pages may scan it: no COUNT(*) (``show_full_result_count``, the estimating paginator), no
``SELECT DISTINCT`` for filter choices (fixed choices instead of ``AllValuesFieldListFilter``)
or date links (``LargeTableChangeList``), no facet counts, no sorting except on the indexed
``started_at``, and searches on equality only, which the indexes serve.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from billing.admin_dates import LargeTableChangeList
from billing.models import ParkedUsageRecord, Price, Rollup, UsageRecord
from billing.paginator import EstimatedCountPaginator


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    list_display = (
        "model",
        "input_per_million",
        "cached_input_per_million",
        "output_per_million",
        "effective_from",
    )
    list_filter = ("model",)  # a DISTINCT over a table of a few hundred rows at most
    search_fields = ("model",)
    date_hierarchy = "effective_from"
    readonly_fields = ("created_at",)


class ReadOnlyAdmin(admin.ModelAdmin):
    """History, written by the request path and Celery only: viewable, never added, changed or deleted.

    Without change permission Django shows the change page with every field read-only.
    """

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class LargeTableAdmin(ReadOnlyAdmin):
    """List settings for tables that must never be counted or scanned (see the module doc)."""

    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # facets are one COUNT per filter choice
    change_list_template = "admin/billing/large_table_change_list.html"

    def get_changelist(self, request: HttpRequest, **kwargs) -> type[LargeTableChangeList]:
        return LargeTableChangeList


class StatusFilter(admin.SimpleListFilter):
    """Status classes with fixed choices (a DISTINCT over the table would scan it).

    An exact code also works from the URL: ``?status=429``.
    """

    title = "status"
    parameter_name = "status"
    CLASSES = {"2xx": (200, 300), "4xx": (400, 500), "5xx": (500, 600)}

    def lookups(self, request, model_admin):
        return [
            ("2xx", "2xx success"),
            ("4xx", "4xx client errors"),
            ("429", "429 too many requests"),
            ("5xx", "5xx server errors"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value in self.CLASSES:
            low, high = self.CLASSES[value]
            return queryset.filter(status__gte=low, status__lt=high)
        if value and value.isdigit():
            return queryset.filter(status=int(value))
        return queryset


class RouteFilter(admin.SimpleListFilter):
    """The operations the gateway proxies, as fixed choices (no DISTINCT over the table).

    They mirror ``gateway.proxy.routes``, kept as text here because billing does not import the request
    path. Any other value still filters from the URL: ``?route=...``.
    """

    title = "route"
    parameter_name = "route"

    def lookups(self, request, model_admin):
        return [(r, r) for r in ("chat", "completions", "embeddings", "models", "model")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(route=self.value()) if self.value() else queryset


@admin.register(UsageRecord)
class UsageRecordAdmin(LargeTableAdmin):
    list_display = (
        "started_at",
        "request_id",
        "tenant",
        "key_prefix",
        "model",
        "deployment_name",
        "route",
        "status",
        "outcome",
        "tokens",
        "cost",
        "latency_ms",
        "streamed",
        "retries",
    )
    list_display_links = ("started_at", "request_id")
    list_filter = ("outcome", StatusFilter, RouteFilter, "streamed", "tenant")
    list_select_related = ("tenant", "key")
    date_hierarchy = "started_at"
    # Equality only: ``request_id`` is unique and ``model`` leads an index; icontains would scan.
    search_fields = ("request_id__exact", "model__exact")
    search_help_text = "An exact request id or model name."
    # Sorting on anything but the indexed time would sort the whole (filtered) table.
    sortable_by = ("started_at",)

    @admin.display(description="key")
    def key_prefix(self, record: UsageRecord) -> str:
        return record.key.prefix if record.key is not None else "—"

    @admin.display(description="tokens (prompt / completion)")
    def tokens(self, record: UsageRecord) -> str:
        return f"{record.prompt_tokens} / {record.completion_tokens}"


@admin.register(Rollup)
class RollupAdmin(LargeTableAdmin):
    list_display = (
        "period_start",
        "granularity",
        "tenant",
        "key_prefix",
        "model",
        "deployment_name",
        "requests",
        "errors",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost",
        "mean_latency_ms",
    )
    list_filter = ("granularity", "tenant")
    list_select_related = ("tenant",)
    date_hierarchy = "period_start"
    search_fields = ("model__exact", "key_prefix__exact", "deployment_name__exact")
    search_help_text = "An exact model, key prefix or deployment name."
    sortable_by = ("period_start",)

    @admin.display(description="mean latency (ms)")
    def mean_latency_ms(self, rollup: Rollup) -> str:
        return f"{rollup.latency_ms_sum / rollup.requests:.0f}" if rollup.requests else "—"


@admin.register(ParkedUsageRecord)
class ParkedUsageRecordAdmin(ReadOnlyAdmin):
    """Records the database refused (see ``billing.usage_store``), with the error, for an operator.

    A small table (each row is a refused record, which should be rare), so the list counts its
    rows; the count is the first thing to look at.
    """

    list_display = ("first_seen", "request_id", "error_summary", "record_model", "status", "started_at")
    list_display_links = ("first_seen", "request_id")
    date_hierarchy = "first_seen"
    search_fields = ("request_id__exact",)
    search_help_text = "An exact request id."
    fields = ("request_id", "first_seen", "error", "record")

    @admin.display(description="error")
    def error_summary(self, parked: ParkedUsageRecord) -> str:
        return parked.error if len(parked.error) <= 120 else parked.error[:119] + "…"

    # Not "model": that name is ModelAdmin's own attribute (the admin's model class).
    @admin.display(description="model")
    def record_model(self, parked: ParkedUsageRecord) -> str:
        return str(parked.record.get("model", "")) if isinstance(parked.record, dict) else ""

    @admin.display(description="status")
    def status(self, parked: ParkedUsageRecord) -> str:
        return str(parked.record.get("status", "")) if isinstance(parked.record, dict) else ""

    @admin.display(description="request started")
    def started_at(self, parked: ParkedUsageRecord) -> str:
        return str(parked.record.get("started_at", "")) if isinstance(parked.record, dict) else ""
