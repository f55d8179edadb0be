"""Writing the database's configuration as a file ``gateway_apply`` reads back.

Secrets never leave the database: each is written as a ``${VAR}`` reference whose name is derived
from the endpoint or tenant (``EAST_API_KEY``, ``TEAM_A_ALERT_WEBHOOK_SECRET``), and the header lists
the variables to set before applying.
The output is deterministic (sorted, no timestamps), so exporting twice gives the same text and
files can be kept in version control and diffed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import yaml
from django.db.models import Prefetch

from billing.models import Price
from gateway import defaults
from gateway.configfile.schema import effective_from_text, secret_env_name
from gateway.models import Deployment, Endpoint
from tenants.models import AccessPolicy, Quota, Tenant


@dataclass(frozen=True)
class Export:
    """The file's text, and the environment variables its secret references name (never their values)."""

    text: str
    env_vars: list[tuple[str, str]] = field(default_factory=list)  # (variable, what it holds)


def config_export() -> Export:
    """The whole configuration (endpoints, deployments, tenants with quota and policy, prices) as YAML."""
    secrets = _SecretNames()
    endpoints = [_endpoint(row, secrets) for row in _endpoint_rows()]
    tenants = [_tenant(*row, secrets) for row in _tenant_rows()]
    sections = [
        {"version": 1},
        {"endpoints": endpoints},
        {"tenants": tenants},
        {"prices": [_price(row) for row in Price.objects.order_by("model", "effective_from")]},
    ]
    body = "\n".join(
        yaml.dump(section, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100) for section in sections
    )
    return Export(text=_header(secrets.used) + body, env_vars=secrets.used)


# --- rows to plain data ------------------------------------------------------------------------


def _endpoint_rows() -> list[Endpoint]:
    deployments = Prefetch("deployments", queryset=Deployment.objects.order_by("name"))
    return list(Endpoint.objects.order_by("name").prefetch_related(deployments))


def _tenant_rows() -> list[tuple[Tenant, Quota | None, AccessPolicy | None]]:
    # Only the tenant's own quota: per-key quotas are not part of the file.
    quotas = {row.tenant_id: row for row in Quota.objects.filter(key__isnull=True)}
    policies = {row.tenant_id: row for row in AccessPolicy.objects.all()}
    return [(row, quotas.get(row.pk), policies.get(row.pk)) for row in Tenant.objects.order_by("slug")]


def _endpoint(row: Endpoint, secrets: _SecretNames) -> dict[str, Any]:
    data: dict[str, Any] = {"name": row.name, "kind": row.kind, "base_url": _text(row.base_url), "auth": row.auth}
    if row.api_key:
        data["api_key"] = secrets.reference(row.name, "API_KEY", f"api_key of endpoint {row.name}")
    if row.ad_tenant_id or row.ad_client_id or row.ad_client_secret or row.ad_authority != defaults.AD_AUTHORITY:
        data["azure_ad"] = {
            "tenant_id": _text(row.ad_tenant_id),
            "client_id": _text(row.ad_client_id),
            "client_secret": secrets.reference(
                row.name, "AD_CLIENT_SECRET", f"azure_ad.client_secret of endpoint {row.name}"
            ),
            "authority": _text(row.ad_authority),
        }
    data["api_version"] = _text(row.api_version)
    data["timeouts"] = _Flow(connect=row.connect_timeout, first_byte=row.first_byte_timeout, total=row.total_timeout)
    data["enabled"] = row.enabled
    data["deployments"] = [_deployment(deployment) for deployment in row.deployments.all()]
    return data


def _deployment(row: Deployment) -> dict[str, Any]:
    data = {
        "name": _text(row.name),
        "model": _text(row.model),
        "sku": row.sku,
        "tier": row.tier,
        "max_wait_seconds": row.max_wait_seconds,
        "rpm": row.rpm,
        "tpm": row.tpm,
        "context_window": row.context_window,
        "max_output_tokens": row.max_output_tokens,
        "weight": row.weight,
        "token_estimate": row.token_estimate,
    }
    if row.upstream_model:
        data["upstream_model"] = _text(row.upstream_model)
    if row.monthly_fixed_cost:
        data["monthly_fixed_cost"] = row.monthly_fixed_cost
    data["enabled"] = row.enabled
    return data


def _tenant(row: Tenant, quota: Quota | None, policy: AccessPolicy | None, secrets: _SecretNames) -> dict[str, Any]:
    data: dict[str, Any] = {"slug": row.slug, "name": _text(row.name), "active": row.active}
    if quota is not None:
        data["quota"] = {
            "rpm": quota.rpm,
            "tpm": quota.tpm,
            "daily_tokens": quota.daily_tokens,
            "monthly_tokens": quota.monthly_tokens,
            "monthly_cost": quota.monthly_cost,
            "alert_thresholds": _FlowList(quota.alert_thresholds),
        }
    if policy is not None:
        data["policy"] = {
            "allowed_models": _FlowList(_text(model) for model in policy.allowed_models),
            "ip_allow": _FlowList(policy.ip_allow),
            "ip_deny": _FlowList(policy.ip_deny),
            "max_tokens_cap": policy.max_tokens_cap,
        }
    if row.alert_emails or row.alert_webhook_url or row.alert_webhook_secret:
        alerts: dict[str, Any] = {"emails": _FlowList(_text(email) for email in row.alert_emails)}
        if row.alert_webhook_url:
            alerts["webhook_url"] = _text(row.alert_webhook_url)
        if row.alert_webhook_secret:
            alerts["webhook_secret"] = secrets.reference(
                row.slug, "ALERT_WEBHOOK_SECRET", f"alerts.webhook_secret of tenant {row.slug}"
            )
        data["alerts"] = alerts
    return data


def _price(row: Price) -> dict[str, Any]:
    return {
        "model": _text(row.model),
        "input_per_million": row.input_per_million,
        "cached_input_per_million": row.cached_input_per_million,
        "output_per_million": row.output_per_million,
        "effective_from": effective_from_text(row.effective_from),
    }


def _text(value: str) -> str:
    # gateway_apply expands "${...}" in every string, so a literal one is written escaped.
    return value.replace("${", "$${")


class _SecretNames:
    """Hands out one environment variable name per secret, unique even when endpoint names collide
    after upper-casing (``east-1`` and ``east_1`` would both give ``EAST_1_API_KEY``)."""

    def __init__(self) -> None:
        self.used: list[tuple[str, str]] = []

    def reference(self, owner: str, field: str, what: str) -> str:
        name = base = secret_env_name(owner, field)
        taken = {variable for variable, _ in self.used}
        suffix = 2
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self.used.append((name, what))
        return f"${{{name}}}"


def _header(env_vars: list[tuple[str, str]]) -> str:
    lines = [
        "# Gateway configuration, written by `manage.py gateway_export`.",
        "# Apply with `manage.py gateway_apply FILE`.",
    ]
    if env_vars:
        lines.append("# Secrets are not exported. Set these environment variables before applying:")
        width = max(len(name) for name, _ in env_vars)
        lines += [f"#   {name.ljust(width)}  {what}" for name, what in env_vars]
    return "\n".join(lines) + "\n"


# --- YAML output -------------------------------------------------------------------------------


class _Flow(dict):
    """A small mapping written on one line: ``timeouts: {connect: 5.0, first_byte: 60.0, total: 600.0}``."""

    def __init__(self, **items: Any) -> None:
        super().__init__(items)


class _FlowList(list):
    """A short list written on one line: ``ip_allow: [10.0.0.0/8, 192.168.0.0/16]``."""


class _Dumper(yaml.SafeDumper):
    """Block YAML with indented lists, that leaves date-like text (api_version) unquoted."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


# The loader reads dates as text too, so "2024-10-21" need not be quoted to stay a string.
_Dumper.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()
}


def _represent_decimal(dumper: _Dumper, value: Decimal) -> yaml.ScalarNode:
    # A plain number, as a person would write it: 2.5 rather than 2.500000 or '2.5'.
    text = format(value.normalize(), "f")
    return dumper.represent_scalar("tag:yaml.org,2002:float", text if "." in text else f"{text}.0")


def _represent_flow(dumper: _Dumper, value: _Flow) -> yaml.MappingNode:
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=True)


_Dumper.add_representer(Decimal, _represent_decimal)


def _represent_flow_list(dumper: _Dumper, value: _FlowList) -> yaml.SequenceNode:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)


_Dumper.add_representer(_Flow, _represent_flow)
_Dumper.add_representer(_FlowList, _represent_flow_list)
