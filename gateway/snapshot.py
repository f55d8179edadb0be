"""The in-memory, versioned view of everything the request path reads.

A request never queries the database: it reads ``current()``, a frozen ``Snapshot`` built from the
ORM in a worker thread. A background task (``SnapshotRefresher``) watches the configuration
version (``gateway.config_version``: a Redis GET when Redis is configured, else a cheap query) and
swaps in a new snapshot when it moves, so admin edits and ``gateway_apply`` reach every process
within about one poll interval.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from asgiref.sync import sync_to_async

from gateway.snapshot_types import DeploymentView, EndpointView, KeyView, LimitsView, TenantView

log = logging.getLogger(__name__)


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


def snapshot_build() -> Snapshot:
    """Read the configuration from the database into a ``Snapshot`` (sync; a handful of queries)."""
    from billing.models import Price
    from gateway.config_version import config_version_read
    from gateway.models import Deployment
    from tenants.models import AccessPolicy, ClientKey, Quota, Tenant

    # Read the version first: a change committed during the build moves it again and triggers
    # another rebuild, so the snapshot can be stale for one poll but never stuck.
    version = config_version_read()

    endpoints: dict[int, EndpointView] = {}
    deployments: list[DeploymentView] = []
    for d in Deployment.objects.select_related("endpoint").order_by("tier", "id"):
        e = d.endpoint
        if e.id not in endpoints:
            endpoints[e.id] = EndpointView(
                id=e.id, name=e.name, kind=e.kind, base_url=e.base_url, auth=e.auth, api_key=e.api_key,
                ad_tenant_id=e.ad_tenant_id, ad_client_id=e.ad_client_id, ad_client_secret=e.ad_client_secret,
                ad_authority=e.ad_authority, api_version=e.api_version, connect_timeout=e.connect_timeout,
                first_byte_timeout=e.first_byte_timeout, total_timeout=e.total_timeout, enabled=e.enabled,
            )
        deployments.append(
            DeploymentView(
                id=d.id, endpoint=endpoints[e.id], name=d.name, model=d.model, sku=d.sku, tier=d.tier,
                max_wait=d.max_wait_seconds, rpm=d.rpm, tpm=d.tpm, context_window=d.context_window,
                max_output_tokens=d.max_output_tokens, weight=d.weight, token_estimate=d.token_estimate,
                upstream_model=d.upstream_model, enabled=d.enabled and e.enabled,
            )
        )
    by_model: dict[str, list[DeploymentView]] = {}
    for d in deployments:
        if d.enabled:
            by_model.setdefault(d.model, []).append(d)

    tenant_quotas = {q.tenant_id: q for q in Quota.objects.filter(key__isnull=True)}
    key_quotas = {q.key_id: q for q in Quota.objects.filter(key__isnull=False)}
    policies = {p.tenant_id: p for p in AccessPolicy.objects.all()}
    tenants = {t.id: _tenant_view(t, tenant_quotas.get(t.id), policies.get(t.id)) for t in Tenant.objects.all()}
    keys = {
        k.key_hash: KeyView(
            id=k.id, tenant=tenants[k.tenant_id], name=k.name, prefix=k.prefix, expires_at=k.expires_at,
            revoked=k.revoked_at is not None, allowed_models=frozenset(k.allowed_models or ()),
            default_priority=k.default_priority, limits=_limits_view(key_quotas.get(k.id)),
        )
        for k in ClientKey.objects.all()
    }

    prices: dict[str, list[PriceView]] = {}
    for p in Price.objects.order_by("model", "-effective_from"):
        prices.setdefault(p.model, []).append(
            PriceView(p.input_per_million, p.cached_input_per_million, p.output_per_million, p.effective_from)
        )

    _warm_encodings(deployments)
    return Snapshot(
        version=version,
        keys_by_hash=keys,
        deployments_by_model={m: tuple(ds) for m, ds in by_model.items()},
        all_deployments=tuple(deployments),
        prices_by_model={m: tuple(ps) for m, ps in prices.items()},
    )


def _warm_encodings(deployments: list[DeploymentView]) -> None:
    """Load the tiktoken encodings the deployments need, here in the builder's thread, so that no
    request loads one on the event loop (a few hundred ms). Encodings nothing uses stay unloaded:
    each costs tens of MB per process."""
    from gateway import tokens
    from gateway.snapshot_types import ESTIMATE_TIKTOKEN

    for d in deployments:
        if d.enabled and d.token_estimate == ESTIMATE_TIKTOKEN:
            tokens.encoding_for(d.model, d.upstream_model)


def _limits_view(quota) -> LimitsView:
    if quota is None:
        return LimitsView()
    return LimitsView(
        rpm=quota.rpm, tpm=quota.tpm, daily_tokens=quota.daily_tokens, monthly_tokens=quota.monthly_tokens,
        monthly_cost=float(quota.monthly_cost), alert_thresholds=tuple(quota.alert_thresholds or ()),
    )


def _networks(cidrs) -> tuple:
    out = []
    for cidr in cidrs or ():
        try:
            out.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            # The admin and the config file validate CIDRs; a bad one that slipped in is skipped
            # rather than taking every request of the tenant down.
            log.error("ignoring invalid CIDR %r in an access policy", cidr)
    return tuple(out)


def _tenant_view(tenant, quota, policy) -> TenantView:
    return TenantView(
        id=tenant.id, slug=tenant.slug, name=tenant.name, active=tenant.active,
        allowed_models=frozenset(policy.allowed_models or ()) if policy else frozenset(),
        ip_allow=_networks(policy.ip_allow) if policy else (),
        ip_deny=_networks(policy.ip_deny) if policy else (),
        max_tokens_cap=policy.max_tokens_cap if policy else 0,
        limits=_limits_view(quota),
    )


class SnapshotRefresher:
    """Keeps ``current()`` up to date by polling the configuration version.

    One per process, started by ``gateway.lifecycle``. ``version_source`` is an async callable
    returning the current version number (Redis GET, or the database row read in a thread).
    """

    def __init__(self, poll_seconds: float, version_source) -> None:
        self.poll_seconds = poll_seconds
        self.version_source = version_source
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def load_now(self) -> Snapshot:
        """Build and install a snapshot (in a worker thread; the ORM is sync)."""
        snapshot = await sync_to_async(snapshot_build, thread_sensitive=False)()
        install(snapshot)
        return snapshot

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="snapshot-refresher")

    async def stop(self) -> None:
        """Stop polling. Cancels until the task has really ended: redis-py's asyncio client can
        swallow a cancellation that lands while it sends a command, and a bare cancel-and-await
        would then wait forever (seen as a hung shutdown)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.poll_seconds)
            try:
                version = await self.version_source()
                if version != current().version:
                    snapshot = await self.load_now()
                    log.info("configuration snapshot v%s loaded (%d keys, %d models)",
                             snapshot.version, len(snapshot.keys_by_hash), len(snapshot.deployments_by_model))
            except asyncio.CancelledError:
                raise
            except Exception:
                # Keep serving from the last good snapshot; the next poll tries again.
                log.exception("could not refresh the configuration snapshot")
