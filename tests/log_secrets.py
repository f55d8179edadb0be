"""What counts as a secret in a log line, for the suite-wide check in ``tests/conftest.py``."""

from __future__ import annotations

import re

# Full client keys (more than their visible 12-character prefix), bearer credentials that were not
# redacted, JWTs (Azure AD tokens).
SECRET_SHAPES = re.compile(
    r"sk-gw-[A-Za-z0-9_-]{10,}|(?i:bearer)\s+(?!\[redacted\])[A-Za-z0-9._~+/=-]{12,}|eyJ[\w-]{8,}\.[\w-]{8,}\."
)

# Every upstream secret an Endpoint was saved with during the current test (see conftest.py).
endpoint_secrets: set[str] = set()


def endpoint_secrets_note(sender, instance, **kwargs) -> None:
    """``post_save`` receiver for ``Endpoint``: remember its key and AD client secret."""
    for value in (instance.api_key, instance.ad_client_secret):
        if value and len(value) >= 8:  # shorter test values ("nope") would match ordinary words
            endpoint_secrets.add(value)


def leaked_secret(text: str) -> str | None:
    """The first secret found in ``text``, or None."""
    match = SECRET_SHAPES.search(text)
    if match:
        return match.group(0)
    return next((secret for secret in endpoint_secrets if secret in text), None)
