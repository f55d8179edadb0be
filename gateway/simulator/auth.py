"""Who may call the simulated upstream: an API key and/or fake Entra ID (Azure AD) tokens.

Contract:

* Authentication is required when an API key or ``azure_ad`` is configured; otherwise every
  caller is accepted.
* The API key is accepted as ``api-key: K`` (Azure) or ``Authorization: Bearer K`` (OpenAI).
  A wrong key is refused with a 401 that quotes the key it received, as some OpenAI-compatible
  servers do: the worst case for a gateway, which must never relay it to its own client.
* ``POST /{tenant}/oauth2/v2.0/token`` (client-credentials form) issues a JWT-shaped bearer
  token for the configured client id/secret, valid for ``expires_in`` seconds; issued tokens
  are accepted as ``Authorization: Bearer`` until they expire. Error bodies mimic Entra ID
  (``error``, ``error_description`` with an AADSTS code).
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from .config import AzureADConfig


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _aad_error(status: int, error: str, code: int, description: str) -> tuple[int, dict]:
    return status, {
        "error": error,
        "error_description": f"AADSTS{code}: {description}",
        "error_codes": [code],
    }


class Authenticator:
    """Checks credentials and issues fake Entra ID tokens. Not thread-safe: one event loop."""

    def __init__(
        self,
        api_key: str | None,
        azure_ad: AzureADConfig | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_key = api_key
        self.azure_ad = azure_ad
        self._clock = clock
        self._tokens: dict[str, float] = {}  # token -> expiry (clock time)
        self.issued = 0

    @property
    def required(self) -> bool:
        return self.api_key is not None or self.azure_ad is not None

    def _is_key(self, value: str) -> bool:
        return self.api_key is not None and hmac.compare_digest(value.encode(), self.api_key.encode())

    def check(self, headers: Mapping[str, str]) -> str | None:
        """None if the caller is authenticated, else the reason (for the 401 message)."""
        if not self.required:
            return None
        key = headers.get("api-key")
        if key is not None:
            return None if self._is_key(key) else f"Incorrect API key provided: {key}."
        authorization = headers.get("Authorization", "")
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return "Missing credentials: send 'api-key' or 'Authorization: Bearer'."
        credential = credential.strip()
        if self._is_key(credential):
            return None
        expiry = self._tokens.get(credential)
        if expiry is None:
            return f"Incorrect API key provided: {credential}."
        if self._clock() >= expiry:
            return "The access token has expired."
        return None

    @staticmethod
    def presented(headers: Mapping[str, str]) -> str:
        """The credential a request carried (``api-key`` or the bearer value), or ""."""
        key = headers.get("api-key")
        if key is not None:
            return key
        scheme, _, credential = headers.get("Authorization", "").partition(" ")
        return credential.strip() if scheme.lower() == "bearer" else ""

    def issue(self, tenant: str, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """Handle a client-credentials token request; returns (status, JSON body)."""
        aad = self.azure_ad
        if aad is None:
            return _aad_error(400, "invalid_request", 90002, "Azure AD is not configured.")
        if aad.tenant is not None and tenant != aad.tenant:
            return _aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        for name in ("grant_type", "client_id", "client_secret", "scope"):
            if not form.get(name):
                return _aad_error(
                    400,
                    "invalid_request",
                    900144,
                    f"The request body must contain the following parameter: '{name}'.",
                )
        if form["grant_type"] != "client_credentials":
            return _aad_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if form["client_id"] != aad.client_id:
            return _aad_error(401, "invalid_client", 700016, f"Application '{form['client_id']}' was not found.")
        if not hmac.compare_digest(form["client_secret"].encode(), aad.client_secret.encode()):
            return _aad_error(401, "invalid_client", 7000215, "Invalid client secret provided.")

        now = self._clock()
        self._forget_expired(now)
        token = self._make_token(form["client_id"], form["scope"], aad.expires_in)
        self._tokens[token] = now + aad.expires_in
        self.issued += 1
        return 200, {
            "token_type": "Bearer",
            "expires_in": aad.expires_in,
            "ext_expires_in": aad.expires_in,
            "access_token": token,
        }

    @staticmethod
    def _make_token(client_id: str, scope: str, expires_in: int) -> str:
        # JWT-shaped (unsigned) so code that peeks at "exp" works; wall-clock time on purpose.
        issued_at = int(time.time())
        header = {"typ": "JWT", "alg": "none"}
        claims = {
            "aud": scope.removesuffix("/.default"),
            "appid": client_id,
            "iat": issued_at,
            "exp": issued_at + expires_in,
            "jti": secrets.token_hex(8),
        }
        parts = (json.dumps(header).encode(), json.dumps(claims).encode(), secrets.token_bytes(16))
        return ".".join(_b64url(p) for p in parts)

    def _forget_expired(self, now: float) -> None:
        expired = [t for t, exp in self._tokens.items() if exp <= now]
        for token in expired:
            del self._tokens[token]

    def reset(self) -> None:
        """Zero the issuance counter; issued tokens stay valid (clients still hold them)."""
        self.issued = 0
