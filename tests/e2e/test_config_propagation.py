"""Configuration changes reach every gateway process within 2 s, whatever made them.

The database row is the truth: a change made where ``REDIS_URL`` is unset (a shell, a cron job)
moves only the row, and processes that poll Redis must still notice. The gateways here run on
Redis when the test run has it (``REDIS_URL``), else on the embedded defaults.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e.servers import ROOT, ProcessGateway, database_url_for_children

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]

PROPAGATION_SECONDS = 2.0


def run_in_a_shell_without_redis(code: str) -> str:
    """``manage.py shell -c code`` in its own process, on the test database, with REDIS_URL unset."""
    env = {**os.environ, "DATABASE_URL": database_url_for_children(), "REDIS_URL": ""}  # "" beats a .env file
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def models_status(gateway: ProcessGateway, secret: str) -> int:
    return httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=5).status_code


def test_a_key_revoked_from_a_shell_without_redis_is_refused_by_every_process_within_2s(upstream, key_a):
    env = {"LOG_LEVEL": "WARNING"}  # the default poll intervals: 0.5 s (Redis or database), 1 s (database)
    gateways = [ProcessGateway(env).start(), ProcessGateway(env).start()]
    try:
        assert [models_status(g, key_a.secret) for g in gateways] == [200, 200]
        out = run_in_a_shell_without_redis(
            "import time\n"
            "from tenants.models import ClientKey\n"
            "from tenants.services import key_revoke\n"
            f"key_revoke(ClientKey.objects.get(pk={key_a.key.pk}))\n"
            "print(time.time())\n"
        )
        revoked_at = float(out.split()[-1])  # committed by then (autocommit)
        refused_after: dict[int, float] = {}
        while len(refused_after) < len(gateways) and time.time() < revoked_at + 5:
            for i, gateway in enumerate(gateways):
                if i not in refused_after and models_status(gateway, key_a.secret) == 401:
                    refused_after[i] = time.time() - revoked_at
            time.sleep(0.02)
    finally:
        for gateway in gateways:
            gateway.stop()
    print(f"\nrefused after: {', '.join(f'{t:.2f}s' for t in refused_after.values())}")
    assert len(refused_after) == len(gateways), f"only processes {sorted(refused_after)} refused the revoked key"
    assert max(refused_after.values()) < PROPAGATION_SECONDS, refused_after
