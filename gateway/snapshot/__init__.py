"""The in-memory, versioned view of everything the request path reads.

A request never queries the database: it reads ``current()``, a frozen ``Snapshot`` built from the
ORM in a worker thread. A background task (``SnapshotRefresher``) watches the configuration
version (``gateway.snapshot.version``: a database row, mirrored to Redis when configured) and swaps
in a new snapshot when it moves, so any change reaches every process within 2 s.

Modules: ``types`` (the frozen views), ``build`` (reading them from the ORM), ``refresher`` (keeping
``current()`` fresh in each process), ``version`` (the version number that says when to rebuild).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from gateway.snapshot.types import DeploymentView, KeyView


@dataclass(frozen=True, slots=True)
class PriceView:
    input_per_million: Decimal
    cached_input_per_million: Decimal
    output_per_million: Decimal
    effective_from: datetime


@dataclass(frozen=True)
class Snapshot:
    version: int
    keys_by_hash: dict[str, KeyView] = field(default_factory=dict)
    # Enabled deployments of enabled endpoints, per client-facing model name, in tier order.
    deployments_by_model: dict[str, tuple[DeploymentView, ...]] = field(default_factory=dict)
    # Every deployment, enabled or not, for status pages.
    all_deployments: tuple[DeploymentView, ...] = ()
    # Prices per model, newest first.
    prices_by_model: dict[str, tuple[PriceView, ...]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return sorted(self.deployments_by_model)


_EMPTY = Snapshot(version=-1)
_current: Snapshot = _EMPTY


def current() -> Snapshot:
    """The snapshot requests read now. Swapped atomically (one reference assignment)."""
    return _current


def install(snapshot: Snapshot) -> None:
    global _current
    _current = snapshot
