"""The control API under ``/_sim/`` (no auth): what tests and rehearsals use to steer the
simulator and read what it saw.

* ``GET /_sim/stats``        counters per deployment (see :mod:`.stats`) and ``token_issued``
* ``GET /_sim/config``       the live configuration, faults included
* ``POST /_sim/reset``       zero counters, windows and utilisation (config and faults stay)
* ``PUT /_sim/deployments/{name}``            JSON fields: create (201) or update (200)
* ``POST /_sim/deployments/{name}/faults``    JSON fault (see :mod:`.faults`), 201
* ``DELETE /_sim/deployments/{name}/faults``  clear that deployment's faults

Invalid input answers 400 ``{"error": "<message naming the key>"}``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import responses
from .config import ConfigError
from .faults import parse_fault
from .httputil import json_response, not_found, read_json
from .state import SimulatorState


def _control_json(data: Any, status: int = 200) -> web.Response:
    return json_response(status, responses.dumps(data))


async def handle_control(state: SimulatorState, request: web.BaseRequest, route: str) -> web.Response:
    """Serve ``/_sim/<route>``."""
    method = request.method
    try:
        if route == "stats" and method == "GET":
            return _control_json(state.snapshot())
        if route == "config" and method == "GET":
            return _control_json(state.describe())
        if route == "reset" and method == "POST":
            state.reset()
            return _control_json({"status": "reset"})
        if route.startswith("deployments/"):
            name, _, sub = route[len("deployments/") :].partition("/")
            if name and sub == "" and method == "PUT":
                upserted, created = state.upsert(name, await read_json(request))
                return _control_json(upserted.config.to_dict(), 201 if created else 200)
            if name and sub == "faults":
                dep = state.deployments.get(name)
                if dep is None:
                    return _control_json({"error": f"unknown deployment {name!r}"}, 404)
                if method == "POST":
                    dep.faults.add(parse_fault(await read_json(request)))
                    return _control_json({"faults": dep.faults.describe()}, 201)
                if method == "DELETE":
                    dep.faults.clear()
                    return _control_json({"faults": []})
        return not_found(request.path)
    except ConfigError as exc:
        return _control_json({"error": str(exc)}, 400)
