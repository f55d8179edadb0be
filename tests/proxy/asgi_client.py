"""Driving the gateway's ASGI application in-process, as ``tests/proxy/conftest.py`` sets it up."""

from __future__ import annotations

from typing import Any

import httpx
from asgiref.sync import sync_to_async

from billing.models import UsageRecord
from billing.usage_sink import get_sink

COMPLETION_TOKENS = 5  # what the simulator generates per choice, unless max_tokens is lower


class GatewayHTTP:
    """Requests to the gateway's ASGI application, and the usage records they leave.

    Each request carries ``secret`` as a bearer key (none when it is None) and comes from
    ``client_ip``: the ASGI scope's ``client``, where the gateway reads the caller's address.
    """

    def __init__(self, app: Any, secret: str | None) -> None:
        self.app = app
        self.secret = secret

    def with_key(self, secret: str | None) -> GatewayHTTP:
        """The same application, with requests carrying ``secret`` (None: no key at all)."""
        return GatewayHTTP(self.app, secret)

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, client_ip: str = "127.0.0.1"
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}
        transport = httpx.ASGITransport(app=self.app, client=(client_ip, 50123))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            return await http.request(method, path, json=body, headers=headers)

    async def post(self, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, body, **kwargs)

    async def usage_records(self) -> list[UsageRecord]:
        """Every usage record stored so far, after writing out what the sink still buffers."""
        await get_sink().flush()
        return await sync_to_async(lambda: list(UsageRecord.objects.order_by("started_at")))()

    async def the_usage_record(self) -> UsageRecord:
        """The one usage record the test's request left (fails if there are more or fewer)."""
        records = await self.usage_records()
        assert len(records) == 1, [(r.route, r.status, r.error_code) for r in records]
        return records[0]
