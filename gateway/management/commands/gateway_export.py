"""``manage.py gateway_export [-o FILE]``: write the configuration in the format gateway_apply reads.

Secrets are written as ``${VAR}`` references (``EAST_API_KEY``), never as values; the variables
to set before applying are listed in the file's header and on standard error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.configfile.export import config_export


class Command(BaseCommand):
    help = "Export endpoints, deployments, tenants and prices as YAML, with secrets replaced by ${ENV} references."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("-o", "--output", default=None, help="Write to this file instead of standard output.")

    def handle(self, *args: Any, output: str | None, verbosity: int, **options: Any) -> None:
        export = config_export()
        if output is None:
            self.stdout.write(export.text, ending="")
        else:
            try:
                Path(output).write_text(export.text, encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"cannot write {output}: {exc}") from exc
            if verbosity >= 1:
                self.stderr.write(f"Wrote {output}.")
        if export.env_vars and verbosity >= 1:
            names = ", ".join(name for name, _ in export.env_vars)
            self.stderr.write(f"Secrets were not exported; set these environment variables before applying: {names}")
