"""``python manage.py simulate_upstream --port N [--host H] [--config FILE] [--minute-seconds S] [--api-key K]``

A thin wrapper over :mod:`gateway.simulator.cli` (same options, same start-up line) so the
simulated upstream can be started next to the gateway with the project's usual tooling.
The simulator itself never imports Django.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from gateway.simulator.cli import add_arguments, run
from gateway.simulator.config import ConfigError


class Command(BaseCommand):
    help = "Run the simulated Azure OpenAI / OpenAI upstream (for tests, demos and rehearsals)."
    requires_system_checks: list[str] = []  # it uses no models; start even mid-migration
    requires_migrations_checks = False

    def add_arguments(self, parser) -> None:
        add_arguments(parser)

    def handle(self, *args, **options) -> None:
        try:
            run(
                host=options["host"],
                port=options["port"],
                config=options["config"],
                minute_seconds=options["minute_seconds"],
                api_key=options["api_key"],
                auto_deployments=options["auto_deployments"],
            )
        except ConfigError as exc:
            raise CommandError(f"configuration error: {exc}") from exc
        except OSError as exc:
            raise CommandError(f"cannot listen on {options['host']}:{options['port']}: {exc}") from exc
