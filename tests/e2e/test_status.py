"""The live status page and API show what the balancer knows, to staff only."""

from __future__ import annotations

import httpx
import pytest
from django.contrib.auth.models import User
from django.test import Client

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff_cookie(transactional_db):
    user = User.objects.create_user("ops", password="x-very-long-password", is_staff=True)
    django_client = Client()
    django_client.force_login(user)
    return {"sessionid": django_client.cookies["sessionid"].value}


def test_status_api_reports_window_use_after_a_request(sdk_client, gateway, staff_cookie):
    sdk_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    data = httpx.get(gateway.url + "/api/status/deployments", cookies=staff_cookie).json()
    [row] = [d for d in data["deployments"] if d["name"] == "chat-a"]
    assert row["model"] == "gpt-4o" and row["in_flight"] == 0
    assert row["breaker"]["state"] == "closed"
    assert data["queues"]["gpt-4o"]["total"] == 0
    assert data["shared_state"]["reachable"] and data["usage_buffer"]["dropped"] == 0


def test_status_api_with_limits_shows_use(gateway, staff_cookie, upstream, sdk_client):
    from gateway.models import Deployment

    Deployment.objects.filter(name="chat-a").update(rpm=600, tpm=100_000)
    upstream.save()  # bump the config version (update() sends no signal)
    import time

    time.sleep(0.5)
    sdk_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    data = httpx.get(gateway.url + "/api/status/deployments", cookies=staff_cookie).json()
    [row] = [d for d in data["deployments"] if d["name"] == "chat-a"]
    minute_requests = [w for w in row["windows"] if w["unit"] == "requests" and w["limit"] == 600]
    assert minute_requests and minute_requests[0]["used"] == 1
    tokens = [w for w in row["windows"] if w["unit"] == "tokens"]
    assert tokens and tokens[0]["used"] > 10


def test_status_api_refuses_anonymous_and_non_staff(gateway, transactional_db):
    assert httpx.get(gateway.url + "/api/status/deployments").status_code == 401
    user = User.objects.create_user("dev", password="x-very-long-password")
    django_client = Client()
    django_client.force_login(user)
    cookie = {"sessionid": django_client.cookies["sessionid"].value}
    assert httpx.get(gateway.url + "/api/status/deployments", cookies=cookie).status_code == 403


def test_status_page_renders_for_staff(gateway, staff_cookie):
    page = httpx.get(gateway.url + "/admin/status/", cookies=staff_cookie)
    assert page.status_code == 200 and "Live deployment status" in page.text
    index = httpx.get(gateway.url + "/admin/", cookies=staff_cookie)
    assert "Live deployment status" in index.text
