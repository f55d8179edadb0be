"""Priority is a key's privilege: a request may ask for a worse priority than its key's best, never a
better one; a better ask is served at the key's best, so it cannot evict other tenants' waiting
requests from a full queue."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from gateway.models import Deployment, Endpoint
from tenants.models import Tenant
from tenants.services import key_issue
from tests.proxy.asgi_call import HELLO, SIM_KEY, post_json, reload_snapshot

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"


async def new_key(slug: str, *, default_priority: int = 5, best_priority: int | None = None) -> str:
    """A key of a new tenant ``slug``, taken into the snapshot at once."""

    def issue() -> str:
        tenant = Tenant.objects.create(slug=slug, name=slug)
        return key_issue(tenant, name="app", default_priority=default_priority, best_priority=best_priority).secret

    secret = await sync_to_async(issue)()
    await reload_snapshot()
    return secret


@pytest.mark.parametrize(
    ("best", "asked", "served"),
    [
        (None, 0, 5),  # no privilege: the key's default is its best
        (None, 9, 9),  # a worse priority is always allowed
        (None, None, 5),  # null: the default
        (2, 0, 2),  # clamped to the key's best
        (2, 2, 2),
        (2, 3, 3),
        (0, 0, 0),
    ],
)
async def test_a_better_priority_than_the_key_allows_is_clamped_to_its_best(
    gateway_runtime, records, best, asked, served
):
    secret = await new_key("clamp", best_priority=best)
    answer = await post_json(CHAT, {"model": "gpt-4o", "messages": HELLO, "priority": asked}, secret)

    assert answer.status == 200, answer.body
    assert [r["priority"] for r in records] == [served]


async def test_without_a_priority_field_the_key_default_applies(gateway_runtime, records):
    secret = await new_key("defaults", default_priority=7, best_priority=3)
    await post_json(CHAT, {"model": "gpt-4o", "messages": HELLO}, secret)

    assert [r["priority"] for r in records] == [7]


@pytest.fixture
def tight_queue(settings, upstream):
    """One waiting request per model; a 2 s "minute" and 4 s queue timeout, so a waiter is served
    within the test once the paced deployment's one request per minute frees."""
    settings.GATEWAY = {
        **settings.GATEWAY,
        "QUEUE_MAX_DEPTH": 1,
        "QUEUE_TIMEOUT_SECONDS": 4.0,
        "WINDOW_MINUTE_SECONDS": 2.0,
    }
    endpoint = Endpoint.objects.create(
        name="paced", kind=Endpoint.Kind.AZURE, base_url=upstream.base_url, api_key=SIM_KEY
    )
    Deployment.objects.create(endpoint=endpoint, name="chat-a", model="paced", rpm=1, upstream_model="gpt-4o")


async def _fill_then_queue(plain: str) -> asyncio.Future:
    """Use the paced deployment's capacity, then start a request that has to wait in the (full) queue."""
    body = {"model": "paced", "messages": HELLO}
    assert (await post_json(CHAT, body, plain)).status == 200
    waiting = asyncio.ensure_future(post_json(CHAT, body, plain))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    return waiting


async def test_asking_priority_zero_cannot_evict_a_waiting_request(tight_queue, gateway_runtime, records):
    plain = await new_key("plain")  # default and best priority 5
    greedy = await new_key("greedy")  # also best 5, but asks for 0
    waiting = await _fill_then_queue(plain)

    pushy = await post_json(CHAT, {"model": "paced", "messages": HELLO, "priority": 0}, greedy)
    assert pushy.status == 429 and pushy.error["code"] == "queue_full"

    served = await waiting
    assert served.status == 200, served.body  # still in its place, served when capacity freed
    assert sorted((r["status"], r["priority"]) for r in records) == [(200, 5), (200, 5), (429, 5)]


async def test_a_key_entitled_to_priority_zero_does_evict_a_waiting_request(tight_queue, gateway_runtime, records):
    plain = await new_key("plain")
    vip = await new_key("vip", best_priority=0)
    waiting = await _fill_then_queue(plain)

    urgent = asyncio.ensure_future(post_json(CHAT, {"model": "paced", "messages": HELLO, "priority": 0}, vip))
    evicted = await waiting
    assert evicted.status == 429 and evicted.error["code"] == "queue_full"
    assert (await urgent).status == 200
