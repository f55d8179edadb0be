"""Admin for prices (editable), usage records and roll-ups (read-only history).

The usage table grows by one row per request, into the hundreds of millions. Nothing on its
pages may scan it: no COUNT(*) (``show_full_result_count``, the estimating paginator), no
``SELECT DISTINCT`` for filter choices (fixed choices instead of ``AllValuesFieldListFilter``)
or date links (``LargeTableChangeList``), no facet counts, no sorting except on the indexed
``started_at``, and searches on equality only, which the indexes serve.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from billing.admin_dates import LargeTableChangeList
from billing.exports import FORMATS, statement_response
from billing.histograms import percentile
from billing.models import HISTOGRAM_COLUMNS, ParkedUsageRecord, Price, Rollup, Statement, UsageRecord
from billing.paginator import EstimatedCountPaginator
from billing.statements import statement_document
from tenants.models import Tenant


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


class TenantRefFilter(admin.SimpleListFilter):
    """Roll-ups of one tenant (or of none: requests refused before authentication)."""

    title = "tenant"
    parameter_name = "tenant"

    def lookups(self, request, model_admin):
        return [("0", "(no tenant)"), *((str(pk), slug) for pk, slug in Tenant.objects.values_list("pk", "slug"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        return queryset.filter(tenant_ref=int(value)) if value and value.isdigit() else queryset


@admin.register(Rollup)
class RollupAdmin(LargeTableAdmin):
    list_display = (
        "period_start",
        "granularity",
        "tenant_slug",
        "key_name",
        "model",
        "deployment",
        "requests",
        "ok",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost",
        "latency_p50",
    )
    list_filter = ("granularity", TenantRefFilter, "sku")
    date_hierarchy = "period_start"
    search_fields = ("model__exact", "key_prefix__exact", "deployment_name__exact")
    search_help_text = "An exact model, key prefix or deployment name."
    sortable_by = ("period_start",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Rollup]:
        # Tenants by id in the same query (a roll-up keeps the id, not a foreign key).
        slug = Tenant.objects.filter(pk=OuterRef("tenant_ref")).values("slug")[:1]
        return super().get_queryset(request).annotate(tenant_slug=Subquery(slug))

    @admin.display(description="tenant")
    def tenant_slug(self, rollup: Rollup) -> str:
        if not rollup.tenant_ref:
            return "(none)"
        return getattr(rollup, "tenant_slug", None) or f"#{rollup.tenant_ref} (deleted)"

    @admin.display(description="deployment")
    def deployment(self, rollup: Rollup) -> str:
        if not rollup.deployment_ref:
            return "—"
        return f"{rollup.endpoint_name}/{rollup.deployment_name} ({rollup.sku or '?'})"

    @admin.display(description="latency p50 (ms)")
    def latency_p50(self, rollup: Rollup) -> str:
        value = percentile([getattr(rollup, c) for c in HISTOGRAM_COLUMNS["latency"]], 0.5)
        return "—" if value is None else f"{value:.0f}"


@admin.register(Statement)
class StatementAdmin(ReadOnlyAdmin):
    """Monthly statements: computed by the roll-up task, frozen when the month closes; CSV and JSON."""

    list_display = (
        "month_label",
        "tenant",
        "status",
        "requests",
        "tokens",
        "payg_cost",
        "ptu_cost",
        "total",
        "downloads",
    )
    list_filter = ("status", "month", "tenant")
    list_select_related = ("tenant",)
    exclude = ("lines", "provisioned")
    readonly_fields = ("lines_table", "provisioned_table")

    def get_urls(self):
        urls = [
            path(
                "<int:pk>/download.<str:fmt>",
                self.admin_site.admin_view(self.download),
                name="billing_statement_download",
            )
        ]
        return urls + super().get_urls()

    def download(self, request: HttpRequest, pk: int, fmt: str) -> HttpResponse:
        statement = self.get_object(request, str(pk))
        if statement is None or not self.has_view_permission(request, statement) or fmt not in FORMATS:
            raise Http404("No such statement or format.")
        return statement_response(statement_document(statement), fmt)

    @admin.display(description="month", ordering="month")
    def month_label(self, statement: Statement) -> str:
        return f"{statement.month:%Y-%m}"

    @admin.display(description="tokens")
    def tokens(self, statement: Statement) -> str:
        return f"{statement.prompt_tokens + statement.completion_tokens:,}"

    @admin.display(description="total")
    def total(self, statement: Statement) -> str:
        return f"{statement.total_cost:.2f}"

    @admin.display(description="download")
    def downloads(self, statement: Statement) -> str:
        return format_html_join(
            " · ",
            '<a href="{}">{}</a>',
            ((reverse("admin:billing_statement_download", args=[statement.pk, fmt]), fmt.upper()) for fmt in FORMATS),
        )

    @admin.display(description="by model and key")
    def lines_table(self, statement: Statement) -> str:
        return _table(statement.lines, ("model", "key", "requests", "prompt_tokens", "completion_tokens", "cost"))

    @admin.display(description="provisioned (PTU) shares")
    def provisioned_table(self, statement: Statement) -> str:
        return _table(
            statement.provisioned, ("deployment", "tokens", "deployment_tokens", "share", "fixed_cost", "charge")
        )


def _table(rows: list[dict], columns: tuple[str, ...]) -> str:
    if not rows:
        return "—"
    head = format_html_join("", "<th>{}</th>", ((c.replace("_", " "),) for c in columns))
    body = format_html_join(
        "",
        "<tr>{}</tr>",
        ((format_html_join("", "<td>{}</td>", ((row.get(c, ""),) for c in columns)),) for row in rows),
    )
    return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", head, body)


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
