"""Building a ``Snapshot`` from the ORM (sync, in a worker thread; a handful of queries)."""

from __future__ import annotations

import ipaddress
import logging

from gateway.snapshot import PriceView, Snapshot
from gateway.snapshot.types import DeploymentView, EndpointView, KeyView, QuotaView, TenantView

log = logging.getLogger(__name__)


def snapshot_build() -> Snapshot:
    """Read the configuration from the database into a ``Snapshot`` (sync; a handful of queries)."""
    from billing.models import Price
    from gateway.models import Deployment
    from gateway.snapshot.version import config_version_read
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
                id=e.id,
                name=e.name,
                kind=e.kind,
                base_url=e.base_url,
                auth=e.auth,
                api_key=e.api_key,
                ad_tenant_id=e.ad_tenant_id,
                ad_client_id=e.ad_client_id,
                ad_client_secret=e.ad_client_secret,
                ad_authority=e.ad_authority,
                api_version=e.api_version,
                connect_timeout=e.connect_timeout,
                first_byte_timeout=e.first_byte_timeout,
                total_timeout=e.total_timeout,
                enabled=e.enabled,
            )
        deployments.append(
            DeploymentView(
                id=d.id,
                endpoint=endpoints[e.id],
                name=d.name,
                model=d.model,
                sku=d.sku,
                tier=d.tier,
                max_wait=d.max_wait_seconds,
                rpm=d.rpm,
                tpm=d.tpm,
                context_window=d.context_window,
                max_output_tokens=d.max_output_tokens,
                weight=d.weight,
                token_estimate=d.token_estimate,
                upstream_model=d.upstream_model,
                enabled=d.enabled and e.enabled,
            )
        )
    by_model: dict[str, list[DeploymentView]] = {}
    for view in deployments:
        if view.enabled:
            by_model.setdefault(view.model, []).append(view)

    tenant_quotas = {q.tenant_id: q for q in Quota.objects.filter(key__isnull=True)}
    key_quotas = {q.key_id: q for q in Quota.objects.filter(key__isnull=False)}
    policies = {p.tenant_id: p for p in AccessPolicy.objects.all()}
    tenants = {t.id: _tenant_view(t, tenant_quotas.get(t.id), policies.get(t.id)) for t in Tenant.objects.all()}
    keys = {
        k.key_hash: KeyView(
            id=k.id,
            tenant=tenants[k.tenant_id],
            name=k.name,
            prefix=k.prefix,
            expires_at=k.expires_at,
            revoked=k.revoked_at is not None,
            allowed_models=frozenset(k.allowed_models or ()),
            default_priority=k.default_priority,
            best_priority=k.effective_best_priority,
            quota=quota_view(key_quotas.get(k.id)),
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
    from gateway.proxy import tokens
    from gateway.snapshot.types import ESTIMATE_TIKTOKEN

    for d in deployments:
        if d.enabled and d.token_estimate == ESTIMATE_TIKTOKEN:
            tokens.encoding_for(d.model, d.upstream_model)


def quota_view(quota) -> QuotaView:
    """A Quota row (or None: no quota) as the request path and the admin read it."""
    if quota is None:
        return QuotaView()
    return QuotaView(
        rpm=quota.rpm,
        tpm=quota.tpm,
        daily_tokens=quota.daily_tokens,
        monthly_tokens=quota.monthly_tokens,
        monthly_cost=float(quota.monthly_cost),
        alert_thresholds=tuple(quota.alert_thresholds or ()),
        day_counters_reset_at=_epoch(quota.day_counters_reset_at),
        month_counters_reset_at=_epoch(quota.month_counters_reset_at),
    )


def _epoch(moment) -> float:
    return moment.timestamp() if moment is not None else 0.0


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
        id=tenant.id,
        slug=tenant.slug,
        name=tenant.name,
        active=tenant.active,
        allowed_models=frozenset(policy.allowed_models or ()) if policy else frozenset(),
        ip_allow=_networks(policy.ip_allow) if policy else (),
        ip_deny=_networks(policy.ip_deny) if policy else (),
        max_tokens_cap=policy.max_tokens_cap if policy else 0,
        quota=quota_view(quota),
    )
