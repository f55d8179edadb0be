"""Staff views of the gateway's live state: the JSON status API and the admin status page."""

from __future__ import annotations

import math

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from gateway.status import deployment_status


def finite_json(value):
    """JSON has no infinity: an unreachable wait is reported as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


async def status_api(request: HttpRequest) -> JsonResponse:
    """``GET /api/status/deployments``: staff only (session login), everything live."""
    user = await request.auser()
    if not (user.is_active and user.is_staff):
        status = 401 if not user.is_authenticated else 403
        return JsonResponse({"error": {"message": "Staff login required.", "type": "permission_error"}}, status=status)
    return JsonResponse(finite_json(await deployment_status()))


@staff_member_required
def status_page(request: HttpRequest):
    """The admin console's live status page; it polls the JSON API every two seconds."""
    from django.contrib import admin

    context = {**admin.site.each_context(request), "title": "Live deployment status"}
    return render(request, "admin/gateway/status.html", context)


# Browsers ask every site for /favicon.ico; answering keeps a 404 off every console page load.
FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#111827"/>'
    '<path d="M11.5 5.5A4 4 0 1 0 12 9H8.5" stroke="#fff" stroke-width="1.8" fill="none"/></svg>'
)


def favicon(request: HttpRequest) -> HttpResponse:
    response = HttpResponse(FAVICON_SVG, content_type="image/svg+xml")
    response["Cache-Control"] = "public, max-age=86400"
    return response
