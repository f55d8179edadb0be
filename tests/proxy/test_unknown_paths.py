"""Every path outside the admin answers in the API's JSON shape: a client that calls a wrong URL
gets an error it can parse, never Django's HTML page. The admin, the status API and static
files keep working as before."""

from __future__ import annotations

import pytest
from django.http import HttpResponse, HttpResponseNotAllowed
from django.test import RequestFactory

from gateway.middleware import as_api_error
from tests.proxy.asgi_call import call

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/no-such-page"), ("POST", "/no-such-page"), ("GET", "/"), ("GET", "/v1"), ("POST", "/chat/completions")],
)
async def test_an_unknown_path_is_an_openai_shaped_404(upstream, method, path):
    answer = await call(method, path)

    assert answer.status == 404
    assert answer.headers[b"content-type"] == b"application/json"
    assert answer.error == {
        "message": f"Unknown request URL: {method} {path}.",
        "type": "invalid_request_error",
        "param": None,
        "code": "unknown_url",
    }


async def test_a_missing_static_file_is_json_and_a_present_one_is_served(upstream):
    missing = await call("GET", "/static/admin/css/no-such.css")
    present = await call("GET", "/static/admin/css/base.css")

    assert missing.status == 404 and missing.error["code"] == "unknown_url"
    assert present.status == 200 and present.headers[b"content-type"].startswith(b"text/css")


async def test_the_admin_keeps_its_html_pages(upstream):
    login = await call("GET", "/admin/login/")
    missing = await call("GET", "/admin/tenants/no-such-model/")

    assert login.status == 200 and login.headers[b"content-type"].startswith(b"text/html")
    assert missing.status in (302, 404) and not missing.headers[b"content-type"].startswith(b"application/json")


async def test_the_status_api_keeps_its_own_json_errors(upstream):
    answer = await call("GET", "/api/status/deployments")

    assert answer.status == 401 and answer.error["type"] == "permission_error"


def test_a_405_outside_the_admin_is_json_and_keeps_its_allow_header():
    request = RequestFactory().put("/api/status/deployments")
    answer = as_api_error(request, HttpResponseNotAllowed(["GET"]))

    assert answer.status_code == 405 and answer["Allow"] == "GET"
    assert answer["Content-Type"] == "application/json"
    assert b'"code": "method_not_allowed"' in answer.content and b"use GET" in answer.content


def test_a_405_in_the_admin_is_left_alone():
    response = HttpResponseNotAllowed(["GET", "POST"])
    assert as_api_error(RequestFactory().put("/admin/login/"), response) is response


def test_other_statuses_pass_untouched():
    response = HttpResponse("<p>fine</p>", status=200)
    assert as_api_error(RequestFactory().get("/anything"), response) is response
