"""Client key material: generation and hashing. Pure functions, shared by the admin and the request path."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk-gw-"
# Characters of the key shown in lists so people can tell keys apart; long enough to be useful,
# far too short to guess the rest (the secret part carries 256 bits).
VISIBLE_CHARS = 12


def key_generate() -> str:
    """A new secret key: a recognisable prefix and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(secret: str) -> str:
    """The SHA-256 hex digest stored and looked up; the secret itself is never stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def key_visible_prefix(secret: str) -> str:
    return secret[:VISIBLE_CHARS]


# Management API tokens (tenants.models.ManagementToken): a prefix distinct from client keys, so
# neither is ever mistaken for the other.
MANAGEMENT_TOKEN_PREFIX = "gwm-"


def management_token_generate() -> str:
    """A new management token secret: ``gwm-`` and 256 random bits, URL-safe."""
    return MANAGEMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
