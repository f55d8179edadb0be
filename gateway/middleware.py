"""Answers outside the API in the API's shape: a 404 or 405 from Django is OpenAI-shaped JSON.

Clients and SDKs that call a wrong path (``/v1`` without an operation, ``/chat/completions``
without ``/v1``) get a JSON error they can parse, never Django's HTML page. The admin and its
status page keep Django's own pages, for people in a browser.
"""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.decorators import sync_and_async_middleware

from gateway.proxy.errors import error_body

HTML_PREFIXES = ("/admin/",)


@sync_and_async_middleware
def api_errors_middleware(get_response: Callable) -> Callable:
    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> HttpResponseBase:
            return as_api_error(request, await get_response(request))

        return middleware

    def sync_middleware(request: HttpRequest) -> HttpResponseBase:
        return as_api_error(request, get_response(request))

    return sync_middleware


def as_api_error(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    """``response`` itself, unless it is a 404 or 405 that is not JSON on a path outside the admin."""
    status = response.status_code
    if status not in (404, 405) or request.path.startswith(HTML_PREFIXES):
        return response
    if response.get("Content-Type", "").startswith("application/json"):
        return response  # a view's own JSON error
    if status == 404:
        body = error_body(
            f"Unknown request URL: {request.method} {request.path}.", type="invalid_request_error", code="unknown_url"
        )
    else:
        allowed = response.get("Allow", "")
        body = error_body(
            f"Method {request.method} is not allowed here; use {allowed}.",
            type="invalid_request_error",
            code="method_not_allowed",
        )
    answer = HttpResponse(body, status=status, content_type="application/json")
    if "Allow" in response:
        answer["Allow"] = response["Allow"]
    return answer
