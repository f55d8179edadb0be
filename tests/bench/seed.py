"""Put the benchmark's configuration into its database: ``python -m tests.bench.seed < spec.json``.

Runs as a child process with the bench's ``DATABASE_URL`` and ``GATEWAY_VAR_DIR``, so the
benchmark process itself never imports Django or touches a database. The spec (JSON on stdin)::

    {"endpoints": [{"name": "sim", "base_url": "http://127.0.0.1:9100", "api_key": "k",
                    "deployments": [{"name": "d", "model": "m", "rpm": 0, "tpm": 0, ...}]}],
     "tenants": [{"slug": "bench-a", "keys": ["app"]},
                 {"slug": "bench-q", "keys": ["app"], "quota": {"rpm": 1000}, "key_quota": {"rpm": 100}}]}

Deployment entries take any ``gateway.models.Deployment`` field; ``quota`` and ``key_quota`` any
``tenants.models.Quota`` field (a tenant without ``quota`` gets an unlimited one). Prints
``{"keys": {"bench-a/app": "<secret>", ...}}`` on stdout (and ``"staff_session"``, a logged-in
staff session for the status API, when the spec has ``"staff_session": true``). Idempotent for endpoints, deployments
and tenants; a key is issued on every run (secrets are shown once, so an old one cannot be read).
"""

from __future__ import annotations

import json
import os
import sys


def seed(spec: dict) -> dict[str, str]:
    """Create or update what ``spec`` names; returns ``{"tenant/key": secret}``."""
    from django.db import transaction

    from gateway.models import Deployment, Endpoint
    from tenants.models import AccessPolicy, Quota, Tenant
    from tenants.services import key_issue

    secrets: dict[str, str] = {}
    with transaction.atomic():
        for endpoint_spec in spec.get("endpoints", []):
            endpoint, _ = Endpoint.objects.update_or_create(
                name=endpoint_spec["name"],
                defaults={
                    "kind": Endpoint.Kind.AZURE,
                    "base_url": endpoint_spec["base_url"],
                    "api_key": endpoint_spec["api_key"],
                    "api_version": "2024-10-21",
                },
            )
            for deployment in endpoint_spec.get("deployments", []):
                fields = dict(deployment)
                name = fields.pop("name")
                Deployment.objects.update_or_create(endpoint=endpoint, name=name, defaults=fields)
        for tenant_spec in spec.get("tenants", []):
            tenant, _ = Tenant.objects.get_or_create(slug=tenant_spec["slug"], defaults={"name": tenant_spec["slug"]})
            # Unlimited quota (unless the spec sets one) and an open policy: the bench measures the
            # gateway, not a tenant's limits.
            Quota.objects.update_or_create(tenant=tenant, key=None, defaults=tenant_spec.get("quota", {}))
            AccessPolicy.objects.get_or_create(tenant=tenant)
            for key_name in tenant_spec.get("keys", []):
                tenant.keys.filter(name=key_name).delete()
                # Entitled to priority 0: the saturation scenario sends priorities 0 and 9.
                issued = key_issue(tenant, name=key_name, best_priority=0)
                secrets[f"{tenant.slug}/{key_name}"] = issued.secret
                if tenant_spec.get("key_quota"):
                    Quota.objects.create(tenant=tenant, key=issued.key, **tenant_spec["key_quota"])
    return secrets


def staff_session() -> str:
    """A logged-in staff session (its cookie value), for the staff-only status API."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore

    user = User.objects.filter(username="bench-ops").first() or User.objects.create_user(
        "bench-ops", password="bench-ops-very-long-password", is_staff=True
    )
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    assert session.session_key is not None
    return session.session_key


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    import django

    django.setup()
    spec = json.load(sys.stdin)
    out: dict = {"keys": seed(spec)}
    if spec.get("staff_session"):
        out["staff_session"] = staff_session()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
