"""The admin page that shows a newly issued secret (a client key, a management token) once."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Model
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.cache import add_never_cache_headers


def issued_secret_response(
    model_admin: admin.ModelAdmin,
    request: HttpRequest,
    obj: Model,
    *,
    secret: str,
    template: str,
    title: str,
    links: tuple[str, ...] = ("changelist",),
) -> HttpResponse:
    """The page with ``secret`` for ``obj``: rendered, not redirected, and for popups too (the
    secret must reach a person), and never cached: it is the only copy there will ever be.
    ``links``: the admin views of the model to link (``change``, ``changelist``, ``add``)."""
    opts = model_admin.opts
    context: dict[str, Any] = {
        **model_admin.admin_site.each_context(request),
        "title": title,
        "opts": opts,
        "issued": obj,
        "secret": secret,
    }
    for view in links:
        args = [obj.pk] if view == "change" else []
        context[f"{view}_url"] = reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=args)
    response = TemplateResponse(request, template, context)
    add_never_cache_headers(response)
    return response
