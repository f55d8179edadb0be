"""Authenticating a client key against the in-memory snapshot. Pure: no database access."""

from __future__ import annotations

from datetime import datetime

from tenants.keys import key_hash


class AuthFailure(Exception):
    """Why a key was refused; the message is safe to show to the client."""


def key_from_headers(authorization: bytes | None, api_key: bytes | None) -> str | None:
    """The presented secret: ``api-key`` (Azure style) or ``Authorization: Bearer`` (OpenAI style)."""
    if api_key:
        return api_key.decode("latin-1").strip()
    if authorization:
        scheme, _, value = authorization.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def authenticate(secret: str | None, keys_by_hash: dict, now: datetime):
    """The KeyView for ``secret``, or AuthFailure saying why not (missing, unknown, revoked, expired)."""
    if not secret:
        raise AuthFailure(
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or in an 'api-key' header."
        )
    key = keys_by_hash.get(key_hash(secret))
    if key is None:
        raise AuthFailure("Incorrect API key provided.")
    if key.revoked:
        raise AuthFailure("This API key has been revoked.")
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthFailure("This API key has expired.")
    if not key.tenant.active:
        raise AuthFailure("This API key belongs to an inactive tenant.")
    return key
