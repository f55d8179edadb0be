"""What an upstream's error answer means, and what of it a client may see.

An upstream answer is one of:

* ``SERVED`` (2xx): relayed.
* ``RATE_LIMITED`` (429): the deployment is cooled and the request tries again (forward.py).
* ``REFUSED``: the upstream refused *the gateway*: 401 and 407 (its key, or the Azure AD token,
  was not accepted), 403 (not allowed: role, network rules), 404 (no such deployment or model
  there: the configuration is wrong), or a redirect (the base URL is wrong). Not the client's
  doing, so never relayed: it counts against the deployment, and if nothing else serves the
  client gets a 502 that says what happened without the upstream's words.
* ``TRANSIENT`` (5xx, 408): another try may succeed.
* ``CLIENT_ERROR`` (any other 4xx: invalid parameter, content filter, 413, 422 ...): relayed with
  its status, ``type``, ``code`` and ``param``, in a body rebuilt from those fields with the
  message scrubbed of the endpoint's secrets and of anything shaped like a key or token. The
  upstream's raw body never reaches the client: OpenAI-compatible servers quote the key they
  were sent ("Incorrect API key provided: sk-...").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from gateway.proxy import errors
from gateway.proxy.errors import GatewayError

SERVED = "served"
RATE_LIMITED = "rate_limited"
REFUSED = "refused"
TRANSIENT = "transient"
CLIENT_ERROR = "client_error"

# Enough for any real error body; a larger one is cut (it is parsed, never relayed).
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 2000
MAX_FIELD_CHARS = 100
REDACTED = "[redacted]"

_REFUSED_STATUSES = frozenset({401, 403, 404, 407})

# Key-shaped text: OpenAI-style keys (also masked ones, "sk-proj-****abcd"), bearer credentials,
# JWTs (Azure AD tokens), and long runs of hex or base64-ish characters (Azure keys are 32 hex
# digits; most vendors' keys are 32+ characters of base64 or base62). A run must mix letters
# and digits (checked below), so long ordinary words and paths are left alone.
_KEY_SHAPED = re.compile(
    r"""
      \b(?:sk|rk|pk)-[^\s"'<>,;]{4,}          # sk-..., sk-proj-..., masked or not
    | \bBearer\s+[^\s"'<>,;]+                 # Authorization values
    | \beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*       # JWT
    | (?P<run>(?<![\w+/=-])[A-Za-z0-9+/_-]{32,}={0,2}(?![\w+/=-]))   # long hex / base64 / base62
    """,
    re.VERBOSE | re.IGNORECASE,
)
_LETTER = re.compile(r"[A-Za-z]")
_DIGIT = re.compile(r"[0-9]")


def classify(status: int) -> str:
    """The meaning of an upstream status, one of the constants above."""
    if 200 <= status < 300:
        return SERVED
    if status == 429:
        return RATE_LIMITED
    if status in _REFUSED_STATUSES or 300 <= status < 400:
        return REFUSED
    if status >= 500 or status == 408 or status < 200:
        return TRANSIENT
    return CLIENT_ERROR


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without the given secrets (also cut short: a prefix of 8+ characters) and without
    anything key-shaped."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
            if len(secret) >= 12:
                # A server may quote the key cut short or masked after its first characters.
                text = re.sub(re.escape(secret[:8]) + r"[^\s\"'<>,;]*", REDACTED, text)
    return _KEY_SHAPED.sub(_redact_match, text)


def _redact_match(match: re.Match[str]) -> str:
    run = match.group("run")
    if run is not None and not (_LETTER.search(run) and _DIGIT.search(run)):
        return run  # a long word or number, not a key
    return REDACTED


def client_error(status: int, body: bytes, secrets: Iterable[str]) -> GatewayError:
    """A client-caused upstream 4xx as the error the client gets: same status, ``type``, ``code``
    and ``param``, scrubbed message; Azure's content-filter verdict kept (only its flags)."""
    secrets = tuple(secrets)
    fields = _error_fields(body)
    message = fields.get("message")
    if isinstance(message, str) and message.strip():
        message = scrub(message, secrets)[:MAX_MESSAGE_CHARS]
    else:
        message = f"The upstream rejected the request (HTTP {status})."
    error = GatewayError(
        status,
        message,
        type=_short(fields.get("type"), secrets) or "invalid_request_error",
        code=_short(fields.get("code"), secrets),
        param=_short(fields.get("param"), secrets),
        outcome="client_error",
    )
    inner = _content_filter(fields.get("innererror"), secrets)
    if inner:
        error.extra = {"innererror": inner}
    return error


def refusal(status: int, model: str) -> GatewayError:
    """The 502 for an upstream that refused the gateway (``status`` 401/403/404/407 or 3xx)."""
    if status == 404:
        return errors.bad_gateway(
            f"The upstream has no deployment for model '{model}' (HTTP 404): the gateway's configuration "
            "needs attention. Please contact the gateway's operators.",
            code="upstream_deployment_not_found",
            should_retry=False,
        )
    if 300 <= status < 400:
        return errors.bad_gateway(
            f"The upstream redirected the gateway's request for model '{model}' (HTTP {status}): the endpoint "
            "is misconfigured. Please contact the gateway's operators.",
            code="upstream_misconfigured",
            should_retry=False,
        )
    what = "refused the gateway's credentials" if status in (401, 407) else "refused the gateway access"
    return errors.bad_gateway(
        f"The upstream {what} (HTTP {status}) for model '{model}'. This is not a problem with your API key; "
        "please contact the gateway's operators.",
        code="upstream_auth_failed",
        should_retry=False,
    )


def failure_reason(status: int, body: bytes, secrets: Iterable[str]) -> str:
    """A line for operators (logs, status page) on a failed or refused answer, scrubbed."""
    kind = classify(status)
    if kind == REFUSED:
        what = {
            401: "upstream refused credentials",
            407: "upstream proxy refused credentials",
            403: "upstream refused access",
            404: "upstream has no such deployment",
        }.get(status, "upstream redirected")
    else:
        what = "upstream error"
    message = _error_fields(body).get("message")
    detail = scrub(message, secrets)[:200] if isinstance(message, str) and message.strip() else ""
    return f"{what} ({status})" + (f": {detail}" if detail else "")


def _error_fields(body: bytes) -> dict[str, Any]:
    """The ``error`` object of an OpenAI- or Azure-shaped error body ({} if there is none)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(payload, dict):
        return {}
    error = payload.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str):  # {"error": "...", "message": ...} from some servers
        return {"message": payload.get("message") if isinstance(payload.get("message"), str) else error}
    return {}


def _short(value: Any, secrets: tuple[str, ...]) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return scrub(str(value), secrets)[:MAX_FIELD_CHARS] or None


def _content_filter(inner: Any, secrets: tuple[str, ...]) -> dict[str, Any] | None:
    """Azure's ``innererror`` for a content-filter refusal: its code and per-category flags only."""
    if not isinstance(inner, dict):
        return None
    kept: dict[str, Any] = {}
    code = _short(inner.get("code"), secrets)
    if code:
        kept["code"] = code
    result = inner.get("content_filter_result")
    if isinstance(result, dict):
        categories = {}
        for name, verdict in list(result.items())[:20]:
            if isinstance(name, str) and isinstance(verdict, dict):
                categories[name[:MAX_FIELD_CHARS]] = {
                    k[:MAX_FIELD_CHARS]: v
                    for k, v in list(verdict.items())[:10]
                    if isinstance(k, str) and (isinstance(v, bool) or (isinstance(v, str) and len(v) <= 20))
                }
        kept["content_filter_result"] = categories
    return kept or None
