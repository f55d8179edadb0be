"""Which API operation a request path names: OpenAI style, Azure deployment style, Azure v1.

OpenAI clients call ``/v1/<op>`` (model in the body). ``AzureOpenAI`` calls
``/openai/deployments/{name}/<op>?api-version=V`` (model in the path: clients use the gateway's
model name as the deployment name) and ``/openai/models?api-version=V``. The Azure "v1" API is
``/openai/v1/<op>`` with the model in the body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
MODELS = "models"
MODEL = "model"

# Operation name -> upstream path suffix, for the operations the gateway proxies.
UPSTREAM_PATH = {CHAT: "chat/completions", COMPLETIONS: "completions", EMBEDDINGS: "embeddings"}
_OPERATIONS = {"chat/completions": CHAT, "completions": COMPLETIONS, "embeddings": EMBEDDINGS}

_DEPLOYMENT_PATH = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)/?$")
_MODEL_PATH = re.compile(r"^/(?:v1|openai|openai/v1)/models/(.+?)/?$")


@dataclass(frozen=True, slots=True)
class Route:
    operation: str  # CHAT, COMPLETIONS, EMBEDDINGS, MODELS or MODEL
    methods: tuple[str, ...]
    model: str | None = None  # from the path (Azure deployment paths, /models/{id})
    azure: bool = False  # an Azure-style deployment path: api-version is required


def route_for(path: str) -> Route | None:
    """The route for ``path``, or None when the gateway has no such operation."""
    for prefix in ("/v1/", "/openai/v1/"):
        if path.startswith(prefix):
            rest = path[len(prefix) :].rstrip("/")
            if rest in _OPERATIONS:
                return Route(_OPERATIONS[rest], ("POST",))
            if rest == "models":
                return Route(MODELS, ("GET",))
            break
    if path.rstrip("/") == "/openai/models":
        return Route(MODELS, ("GET",))
    m = _DEPLOYMENT_PATH.match(path)
    if m:
        return Route(_OPERATIONS[m.group(2)], ("POST",), model=unquote(m.group(1)), azure=True)
    m = _MODEL_PATH.match(path)
    if m:
        return Route(MODEL, ("GET",), model=unquote(m.group(1)))
    return None


def query_param(query_string: bytes, name: str) -> str | None:
    """One query parameter's value, or None."""
    if not query_string:
        return None
    values = parse_qs(query_string.decode("latin-1")).get(name)
    return values[0] if values else None
