"""The team pages (``/team/``) and the staff overview (``/admin/overview/``), from roll-ups.

A team page shows one tenant to the people ``tenants.Membership`` ties to it (superusers see
every tenant). Any other user gets 404 for the tenant's page, its statements and their exports,
so a page does not even tell them that the tenant exists.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from billing import charts, selectors
from billing.exports import FORMATS, statement_response
from billing.periods import parse_month
from billing.statements import statement_document, statement_for
from tenants.models import Tenant


def visible_tenants(user) -> Any:
    """The tenants a signed-in user may look at."""
    tenants = Tenant.objects.order_by("name")
    return tenants if user.is_superuser else tenants.filter(memberships__user=user)


def tenant_for(user, slug: str) -> Tenant:
    """The tenant named by ``slug`` if the user may see it; 404 otherwise (also when it exists)."""
    tenant = visible_tenants(user).filter(slug=slug).first()
    if tenant is None:
        raise Http404("No such team.")
    return tenant


@login_required
def team_index(request: HttpRequest) -> HttpResponse:
    tenants = list(visible_tenants(request.user))
    if len(tenants) == 1:
        return redirect("team-page", slug=tenants[0].slug)
    return render(request, "team/index.html", {"tenants": tenants})


@login_required
def team_page(request: HttpRequest, slug: str) -> HttpResponse:
    tenant = tenant_for(request.user, slug)
    period = selectors.period_for(request.GET.get("period"))
    model = request.GET.get("model") or None
    data = selectors.team_dashboard(tenant, period, model)
    context = {
        "tenant": tenant,
        "periods": selectors.PERIODS,
        **data,
        "charts": charts.team_charts(data),
    }
    return render(request, "team/page.html", context)


@login_required
def team_statement(request: HttpRequest, slug: str, month: str) -> HttpResponse:
    tenant = tenant_for(request.user, slug)
    statement = _statement(tenant, month)
    return render(
        request,
        "team/statement.html",
        {"tenant": tenant, "statement": statement, "document": statement_document(statement), "formats": FORMATS},
    )


@login_required
def team_statement_export(request: HttpRequest, slug: str, month: str, fmt: str) -> HttpResponse:
    tenant = tenant_for(request.user, slug)
    if fmt not in FORMATS:
        raise Http404("Unknown format.")
    return statement_response(statement_document(_statement(tenant, month)), fmt)


def _statement(tenant: Tenant, month: str):
    try:
        start = parse_month(month)
    except ValueError:
        raise Http404("Not a month.") from None
    statement = statement_for(tenant.pk, start)
    if statement.pk is None and not statement.requests:
        raise Http404("No usage that month.")
    statement.tenant = tenant
    return statement


@staff_member_required
def overview(request: HttpRequest) -> HttpResponse:
    """The staff overview in the admin: everyone's usage over time, top tenants, deployments."""
    if not request.user.has_perm("billing.view_rollup"):
        raise PermissionDenied
    period = selectors.period_for(request.GET.get("period"))
    data = selectors.overview(period)
    context = {
        **admin.site.each_context(request),
        "title": "Usage overview",
        "periods": selectors.PERIODS,
        **data,
        "charts": charts.overview_charts(data),
    }
    return render(request, "admin/billing/overview.html", context)
