"""The settings module evaluated afresh, in this process, under a given environment: what a gateway
process started with that environment would configure (without starting Django a second time)."""

from __future__ import annotations

import os
import runpy
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from unittest import mock

SETTINGS_FILE = Path(__file__).resolve().parents[2] / "gateway" / "settings.py"


def settings_under(
    environ: dict[str, str], *, unset: Iterable[str] = (), unset_prefixes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The settings' module globals with ``environ`` set and ``unset`` (or ``unset_prefixes``) removed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in set(unset) and not (unset_prefixes and k.startswith(unset_prefixes))
    }
    env.update(environ)
    with mock.patch.dict(os.environ, env, clear=True):
        return runpy.run_path(str(SETTINGS_FILE))
