"""Label values for metrics, logs and spans, taken from the configuration snapshot.

Every label value comes from the configuration, never from what a client wrote: a model name a
client made up is ``other`` (a client could otherwise create series without end), a request
refused before its model was known is ``none``. A deployment is ``endpoint/name`` (deployment
names are unique only within their endpoint).
"""

from __future__ import annotations

from gateway import snapshot
from gateway.snapshot import Snapshot
from gateway.snapshot.types import DeploymentView

NONE = "none"
OTHER = "other"


def deployment_label(deployment: DeploymentView) -> str:
    return f"{deployment.endpoint.name}/{deployment.name}"


class LabelIndex:
    """Lookups from a usage record's ids and names to label values, for one snapshot."""

    __slots__ = ("deployments", "keys", "models", "snapshot", "tenants")

    def __init__(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.models = frozenset(snap.deployments_by_model) | {d.model for d in snap.all_deployments}
        self.deployments = {d.id: deployment_label(d) for d in snap.all_deployments}
        self.keys: dict[int, str] = {}
        self.tenants: dict[int, str] = {}
        for key in snap.keys_by_hash.values():
            self.keys[key.id] = key.prefix
            self.tenants[key.tenant.id] = key.tenant.slug

    def model(self, name: str) -> str:
        if not name:
            return NONE
        return name if name in self.models else OTHER

    def deployment(self, deployment_id: int | None) -> str:
        if deployment_id is None:
            return NONE
        return self.deployments.get(deployment_id, OTHER)

    def tenant(self, tenant_id: int | None) -> str:
        if tenant_id is None:
            return NONE
        return self.tenants.get(tenant_id, OTHER)

    def key_prefix(self, key_id: int | None) -> str:
        """The key's visible prefix (``sk-gw-`` and six characters): enough to tell keys apart."""
        if key_id is None:
            return ""
        return self.keys.get(key_id, "")


_index: LabelIndex | None = None


def label_index() -> LabelIndex:
    """The index of the current snapshot, rebuilt once after each snapshot swap."""
    global _index
    snap = snapshot.current()
    index = _index
    if index is None or index.snapshot is not snap:
        index = _index = LabelIndex(snap)
    return index
