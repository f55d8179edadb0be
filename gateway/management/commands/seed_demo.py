"""Seed the embedded demo: a tenant, a key, and an endpoint pointing at the simulated upstream."""

from __future__ import annotations

from decimal import Decimal

from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from billing.models import Price
from gateway.models import Deployment, Endpoint
from tenants.models import AccessPolicy, ClientKey, Quota, Tenant
from tenants.services import key_issue

DEMO_KEY_NAME = "demo-app"


class Command(BaseCommand):
    help = "Create (or update) the demo tenant, endpoint and deployments; issue a demo key if it has none."

    def add_arguments(self, parser):
        parser.add_argument("--upstream", default="http://127.0.0.1:9100", help="Base URL of the simulated upstream.")
        parser.add_argument("--upstream-key", default="sim-key", help="API key the simulated upstream expects.")
        parser.add_argument("--key-file", help="Write a newly issued demo key here (mode 600) as well.")

    @transaction.atomic
    def handle(self, *args, **options):
        endpoint, _ = Endpoint.objects.update_or_create(
            name="simulated",
            defaults={
                "kind": Endpoint.Kind.AZURE,
                "base_url": options["upstream"],
                "api_key": options["upstream_key"],
                "api_version": "2024-10-21",
            },
        )
        for name, model, sku, tier, rpm, tpm in (
            ("gpt-4o-ptu", "gpt-4o", Deployment.Sku.PROVISIONED, 1, 0, 0),
            ("gpt-4o-paygo", "gpt-4o", Deployment.Sku.STANDARD, 2, 600, 100_000),
            ("gpt-4o-mini", "gpt-4o-mini", Deployment.Sku.STANDARD, 1, 600, 200_000),
            ("text-embedding-3-small", "text-embedding-3-small", Deployment.Sku.STANDARD, 1, 1200, 500_000),
        ):
            Deployment.objects.update_or_create(
                endpoint=endpoint,
                name=name,
                defaults={
                    "model": model,
                    "sku": sku,
                    "tier": tier,
                    "rpm": rpm,
                    "tpm": tpm,
                    "max_wait_seconds": 1.0 if sku == Deployment.Sku.PROVISIONED else 0.0,
                },
            )
        tenant, _ = Tenant.objects.get_or_create(slug="demo", defaults={"name": "Demo team"})
        Quota.objects.get_or_create(tenant=tenant, key=None)
        AccessPolicy.objects.get_or_create(tenant=tenant)
        start = timezone.now().replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        for model, inp, cached, out in (
            ("gpt-4o", "2.50", "1.25", "10.00"),
            ("gpt-4o-mini", "0.15", "0.075", "0.60"),
            ("text-embedding-3-small", "0.02", "0", "0"),
        ):
            Price.objects.get_or_create(
                model=model,
                effective_from=start,
                defaults={
                    "input_per_million": Decimal(inp),
                    "cached_input_per_million": Decimal(cached),
                    "output_per_million": Decimal(out),
                },
            )
        if ClientKey.objects.filter(tenant=tenant, name=DEMO_KEY_NAME, revoked_at=None).exists():
            self.stdout.write("Demo tenant ready; its key was issued on an earlier run (keys are shown once).")
            self.stdout.write("Issue another with: python manage.py issue_key demo --name another-app")
            return
        issued = key_issue(tenant, name=DEMO_KEY_NAME)
        if options.get("key_file"):
            import os

            fd = os.open(options["key_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(issued.secret + "\n")
        self.stdout.write(f"Demo key (shown once): {issued.secret}")
