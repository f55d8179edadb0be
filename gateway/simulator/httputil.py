"""Small HTTP helpers shared by the simulator's request handlers."""

from __future__ import annotations

import json

from aiohttp import web

from . import ids, responses

JSON = "application/json"


class BadRequest(Exception):
    """The request body is unusable; answered with an OpenAI-shaped 400."""


def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response; every response carries ``x-request-id`` and ``apim-request-id``."""
    if headers is None:
        headers = {}
    if "x-request-id" not in headers:
        headers["x-request-id"] = headers["apim-request-id"] = ids.request_id()
    return web.Response(status=status, body=body, headers=headers, content_type=JSON)


def not_found(path: str) -> web.Response:
    return json_response(404, responses.openai_error(f"Invalid URL ({path})", code="not_found"))


async def read_json(request: web.BaseRequest) -> dict:
    # content.read() rather than request.read(): no 1 MiB client_max_size cap, since real
    # upstreams take large base64 images.
    raw = await request.content.read()
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body
