"""The client address: X-Forwarded-For believed only from trusted proxies, and an IP policy that
fails closed when the address cannot be known."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from types import SimpleNamespace

import httpx
import pytest
from asgiref.sync import sync_to_async

from billing.models import UsageRecord
from gateway.proxy import errors
from gateway.proxy.checks import RequestChecks
from gateway.proxy.client_address import address_parse, client_address, forwarded_client
from gateway.proxy.context import RequestContext
from gateway.proxy.jsonbody import parse_json_body
from gateway.proxy.routes import route_for
from gateway.proxy.runtime import runtime
from tenants.models import AccessPolicy

PROXIES = (ip_network("192.168.0.0/16"), ip_network("fd00::/8"))


def scope(peer: str | None, *forwarded: str) -> dict:
    return {
        "client": (peer, 41234) if peer is not None else None,
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }


@pytest.fixture
def trusting(settings):
    settings.GATEWAY = {**settings.GATEWAY, "TRUSTED_PROXIES": PROXIES}


# --- resolving the address -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hops", "client"),
    [
        ([], "192.168.1.1"),  # a trusted proxy speaking for itself (a health check)
        (["10.1.2.3"], "10.1.2.3"),
        (["10.1.2.3", "192.168.7.7"], "10.1.2.3"),  # a second trusted proxy is skipped
        (["6.6.6.6", "10.1.2.3"], "10.1.2.3"),  # what the client wrote itself is ignored
        (["6.6.6.6", "10.1.2.3", "192.168.7.7"], "10.1.2.3"),
        (["192.168.9.9", "192.168.7.7"], "192.168.9.9"),  # every hop trusted: the furthest known
        (["10.1.2.3", "garbage"], None),  # a trusted proxy wrote something unreadable
        (["garbage", "10.1.2.3"], "10.1.2.3"),  # left of the client: never read
        (["10.1.2.3", ""], None),
        ([" 10.1.2.3:5555 "], "10.1.2.3"),
        (["[2001:db8::7]:443"], "2001:db8::7"),
        (["::ffff:10.1.2.3"], "10.1.2.3"),
        (["unknown"], None),
    ],
)
def test_forwarded_for_is_walked_from_the_right_past_trusted_proxies(hops, client):
    found = forwarded_client(ip_address("192.168.1.1"), hops, PROXIES)
    assert found == (ip_address(client) if client else None)


def test_an_untrusted_peer_is_the_client_whatever_it_forwards():
    assert forwarded_client(ip_address("203.0.113.9"), ["10.1.2.3"], PROXIES) == ip_address("203.0.113.9")
    assert forwarded_client(ip_address("192.168.1.1"), ["10.1.2.3"], ()) == ip_address("192.168.1.1")


def test_with_no_trusted_proxies_forwarded_for_is_never_read(settings):
    assert settings.GATEWAY["TRUSTED_PROXIES"] == ()  # the default
    assert client_address(scope("192.168.1.1", "10.1.2.3")) == "192.168.1.1"


def test_the_scope_gives_the_peer_or_the_forwarded_client(trusting):
    assert client_address(scope("203.0.113.9", "10.1.2.3")) == "203.0.113.9"
    assert client_address(scope("192.168.1.1", "10.1.2.3")) == "10.1.2.3"
    # Two X-Forwarded-For headers are one list, in order.
    assert client_address(scope("192.168.1.1", "6.6.6.6, 10.1.2.3", "192.168.7.7")) == "10.1.2.3"
    assert client_address(scope("fd00::1", "2001:db8::7")) == "2001:db8::7"
    assert client_address(scope("::ffff:192.168.1.1", "10.1.2.3")) == "10.1.2.3"


def test_no_peer_or_an_unreadable_one_is_unknown(trusting):
    assert client_address(scope(None, "10.1.2.3")) is None
    assert client_address(scope("/run/gateway.sock", "10.1.2.3")) is None
    assert client_address(scope("192.168.1.1", "not-an-address")) is None


def test_address_forms_proxies_and_servers_write():
    assert address_parse("1.2.3.4") == ip_address("1.2.3.4")
    assert address_parse("1.2.3.4:80") == ip_address("1.2.3.4")
    assert address_parse("2001:db8::1") == ip_address("2001:db8::1")
    assert address_parse("[2001:db8::1]") == ip_address("2001:db8::1")
    assert address_parse("[2001:db8::1") is None
    assert address_parse("1.2.3.4.5") is None


# --- the policy fails closed -------------------------------------------------------------------


def checks_for(client_ip: str | None, *, allow=(), deny=()) -> RequestChecks:
    tenant = SimpleNamespace(ip_allow=tuple(map(ip_network, allow)), ip_deny=tuple(map(ip_network, deny)))
    ctx = RequestContext.begin({"client": None})
    ctx.client_ip = client_ip
    return RequestChecks(route_for("/v1/chat/completions"), SimpleNamespace(tenant=tenant), parse_json_body(b"{}"), ctx)


@pytest.mark.parametrize("lists", [{"allow": ["10.0.0.0/8"]}, {"deny": ["6.6.6.0/24"]}], ids=["allow", "deny"])
@pytest.mark.parametrize("client_ip", [None, "not-an-address"])
def test_an_unknown_address_is_refused_when_the_tenant_lists_networks(lists, client_ip):
    with pytest.raises(errors.GatewayError) as refused:
        checks_for(client_ip, **lists).check_client_address()
    assert refused.value.status == 403
    assert "could not be determined" in refused.value.message


def test_an_unknown_address_passes_when_the_tenant_lists_no_networks():
    checks_for(None).check_client_address()


def test_listed_networks_still_decide_for_a_known_address():
    checks_for("10.1.2.3", allow=["10.0.0.0/8"]).check_client_address()
    with pytest.raises(errors.GatewayError, match=r"Requests from 10\.9\.9\.9"):
        checks_for("10.9.9.9", allow=["10.0.0.0/8"], deny=["10.9.0.0/16"]).check_client_address()


# --- through the ASGI application ----------------------------------------------------------------


@pytest.fixture
def gateway_app(transactional_db, key_a, ptu_deployment, trusting):
    """The real ASGI app in process; tenant A accepts 10.0.0.0/8 only."""
    AccessPolicy.objects.filter(tenant=key_a.key.tenant).update(ip_allow=["10.0.0.0/8"])
    from gateway.asgi import application

    return application


async def post(app, secret: str, peer: str, forwarded: str | None = None) -> tuple[int, str]:
    """A chat request without ``messages`` from ``peer``: a 400 once past the address check, a 403 there."""
    headers = {"authorization": f"Bearer {secret}"}
    if forwarded is not None:
        headers["x-forwarded-for"] = forwarded
    transport = httpx.ASGITransport(app=app, client=(peer, 41234))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.post("/v1/chat/completions", json={"model": "gpt-4o"}, headers=headers)
    return response.status_code, response.json()["error"]["message"]


async def test_forwarded_for_counts_only_from_a_trusted_peer(gateway_app, key_a):
    refused = "Requests from 203.0.113.9 are not allowed for this team."
    try:
        assert (await post(gateway_app, key_a.secret, "10.1.2.3"))[0] == 400  # direct, from an allowed network
        assert await post(gateway_app, key_a.secret, "203.0.113.9", "10.1.2.3") == (403, refused)
        assert (await post(gateway_app, key_a.secret, "192.168.1.1", "10.1.2.3"))[0] == 400  # via a trusted proxy
        # The trusted proxy appended the address it saw; the client wrote the allowed one itself.
        assert await post(gateway_app, key_a.secret, "192.168.1.1", "10.1.2.3, 203.0.113.9") == (403, refused)
        status, message = await post(gateway_app, key_a.secret, "192.168.1.1", "not-an-address")
        assert status == 403 and "could not be determined" in message
    finally:
        await runtime.shutdown()  # flushes the usage records

    recorded = await sync_to_async(
        lambda: list(UsageRecord.objects.order_by("started_at").values_list("client_ip", "status"))
    )()
    assert recorded == [
        ("10.1.2.3", 400),
        ("203.0.113.9", 403),
        ("10.1.2.3", 400),
        ("203.0.113.9", 403),
        (None, 403),
    ]
