"""Planning and applying a configuration file.

``plan_build`` compares a parsed file with the database and returns an ``ApplyPlan``: one ``Change`` per
row to create, update or remove, in the order they must be written. It only reads. ``plan_apply``
writes a plan in one transaction; ``config_apply`` does both inside that transaction, so the plan
cannot go stale between being computed and being written.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from django.core.exceptions import FieldDoesNotExist
from django.db import models, transaction

from billing.models import Price
from gateway.configfile.schema import (
    ConfigFile,
    EndpointSpec,
    PolicySpec,
    PriceSpec,
    QuotaSpec,
    TenantSpec,
    effective_from_text,
)
from gateway.models import Deployment, Endpoint
from gateway.services import SECRET_FIELDS, endpoint_update
from tenants.models import AccessPolicy, Quota, Tenant


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    REMOVE = "remove"
    # Tenants are never deleted by an apply: their usage records and bills must survive.
    DEACTIVATE = "deactivate"


# Write order: parents before children on the way in, children before parents on the way out.
_KINDS = ("endpoint", "deployment", "tenant", "quota", "policy", "price")


@dataclass
class Change:
    """One row to write. ``fields`` names what changed as the file spells it, never the values."""

    action: Action
    kind: str
    label: str
    row: models.Model = field(repr=False)
    fields: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()  # model fields an update saves
    note: str = ""

    def describe(self) -> str:
        """One line for the plan, e.g. ``~ endpoint east: base_url, api_key``."""
        if self.action is Action.CREATE:
            return f"+ {self.kind} {self.label}" + (f" ({self.note})" if self.note else "")
        if self.action is Action.UPDATE:
            return f"~ {self.kind} {self.label}: {', '.join(self.fields)}" + (f" ({self.note})" if self.note else "")
        if self.action is Action.DEACTIVATE:
            return (
                f"- {self.kind} {self.label}: deactivated, not deleted "
                "(not in the file; its keys are refused, its usage history and bills are kept)"
            )
        return f"- {self.kind} {self.label}" + (f" ({self.note})" if self.note else "")

    def order(self) -> tuple[int, int]:
        index = _KINDS.index(self.kind)
        return (1, -index) if self.action in (Action.REMOVE, Action.DEACTIVATE) else (0, index)


@dataclass
class ApplyPlan:
    """What an apply does. ``unchanged`` and ``untouched`` hold labels such as ``"endpoint east"``."""

    changes: list[Change] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # Rows the file does not name, left alone because pruning was not asked for.
    untouched: list[str] = field(default_factory=list)

    def count(self, *actions: Action) -> int:
        return sum(1 for change in self.changes if change.action in actions)

    def summary(self) -> str:
        """``N to create, M to update, K to remove, U unchanged``, plus what was left alone."""
        removed = f"{self.count(Action.REMOVE, Action.DEACTIVATE)} to remove"
        if deactivated := self.count(Action.DEACTIVATE):
            removed += f" ({deactivated} tenant{'s' * (deactivated > 1)} deactivated, not deleted)"
        text = (
            f"{self.count(Action.CREATE)} to create, {self.count(Action.UPDATE)} to update, "
            f"{removed}, {len(self.unchanged)} unchanged"
        )
        if self.untouched:
            text += f"; {len(self.untouched)} not in the file, left alone (--prune removes them)"
        return text


def config_apply(config: ConfigFile, *, prune: bool = False, dry_run: bool = False) -> ApplyPlan:
    """Plan ``config`` against the database and, unless ``dry_run``, write the plan. Returns the plan.

    Planning and writing share one transaction. Two applies racing on PostgreSQL may both plan
    the same creation; the second then fails on a unique constraint and rolls back whole, which
    is the outcome we want from a conflicting concurrent apply.
    """
    if dry_run:
        return plan_build(config, prune=prune)
    with transaction.atomic():
        plan = plan_build(config, prune=prune)
        plan_apply(plan)
    return plan


def plan_build(config: ConfigFile, *, prune: bool = False) -> ApplyPlan:
    """Compare ``config`` with the database: what to create, update and (with ``prune``) remove.

    Only reads, with a fixed number of queries whatever the size of the configuration. The rows
    in the changes carry their new values in memory until ``plan_apply`` saves them.
    """
    plan = ApplyPlan()
    _plan_endpoints(plan, config.endpoints, prune)
    _plan_tenants(plan, config.tenants, prune)
    _plan_prices(plan, config.prices, prune)
    plan.changes.sort(key=Change.order)  # stable: within a kind, file order then name order
    return plan


def plan_apply(plan: ApplyPlan) -> None:
    """Write ``plan`` in one transaction: every change lands, or on any error none does.

    Only changed rows are saved, and only their changed columns, so a plan without changes
    writes nothing and the config version stays put. Each save or delete bumps the version
    through the model signals once the transaction commits.
    """
    with transaction.atomic():
        for change in plan.changes:
            if change.action is Action.CREATE:
                change.row.save()
            elif change.action is Action.REMOVE:
                change.row.delete()
            else:
                change.row.save(update_fields=_with_timestamp(change.row, change.columns))


# --- planning, per kind of row -----------------------------------------------------------------


def _plan_endpoints(plan: ApplyPlan, specs: list[EndpointSpec], prune: bool) -> None:
    endpoints = {row.name: row for row in Endpoint.objects.all()}
    deployments: dict[int, dict[str, Deployment]] = defaultdict(dict)
    for row in Deployment.objects.all():
        deployments[row.endpoint_id][row.name] = row
    for spec in specs:
        current = endpoints.pop(spec.name, None)
        if current is None:
            endpoint = _plan_row(
                plan,
                "endpoint",
                spec.name,
                None,
                spec.model_values(),
                create=Endpoint,
                identity={"name": spec.name},
                note=f"{spec.kind}, {spec.base_url}",
            )
        else:
            endpoint = _plan_endpoint_update(plan, spec, current)
        existing = deployments.pop(current.pk, {}) if current else {}
        for deployment in spec.deployments:
            _plan_row(
                plan,
                "deployment",
                f"{spec.name}/{deployment.name}",
                existing.pop(deployment.name, None),
                deployment.model_values(),
                create=Deployment,
                identity={"endpoint": endpoint, "name": deployment.name},
                note=f"model {deployment.model}, tier {deployment.tier}",
            )
        for name, row in sorted(existing.items()):
            _plan_leftover(plan, "deployment", f"{spec.name}/{name}", row, prune, note=f"model {row.model}")
    for name, endpoint_row in sorted(endpoints.items()):
        for deployment_name, deployment_row in sorted(deployments.get(endpoint_row.pk, {}).items()):
            _plan_leftover(
                plan,
                "deployment",
                f"{name}/{deployment_name}",
                deployment_row,
                prune,
                note=f"model {deployment_row.model}",
            )
        _plan_leftover(plan, "endpoint", name, endpoint_row, prune)


def _plan_endpoint_update(plan: ApplyPlan, spec: EndpointSpec, row: Endpoint) -> Endpoint:
    """An endpoint the database has, under the admin's secrets rule (``endpoint_update``).

    The file states every secret, so one it leaves out is removed either way; what the rule adds
    is saying so when the endpoint's destination changed, since that is when the secret most
    likely went missing by mistake.
    """
    result = endpoint_update(row, spec.model_values(), save=False)
    if not result.changed:
        plan.unchanged.append(f"endpoint {spec.name}")
        return row
    names = EndpointSpec.FIELD_NAMES
    # A secret the file leaves out is removed; say so, as "api_key" alone could also be a rotation.
    removed = " and ".join(
        names.get(name, name) for name in SECRET_FIELDS if name in result.changed and not getattr(row, name)
    )
    note = ""
    if result.cleared:
        moved = ", ".join(names.get(name, name) for name in result.moved)
        note = f"{removed} removed: {moved} changed and the file does not give {_it(result.cleared)} again"
    elif removed:
        note = f"{removed} removed: the file gives none"
    fields = tuple(names.get(name, name) for name in result.changed)
    plan.changes.append(Change(Action.UPDATE, "endpoint", spec.name, row, fields, result.changed, note=note))
    return row


def _it(items: tuple[str, ...]) -> str:
    return "it" if len(items) == 1 else "them"


def _plan_tenants(plan: ApplyPlan, specs: list[TenantSpec], prune: bool) -> None:
    tenants = {row.slug: row for row in Tenant.objects.all()}
    # Only the tenant's own quota: per-key quotas are managed in the admin, never by the file.
    quotas = {row.tenant_id: row for row in Quota.objects.filter(key__isnull=True)}
    policies = {row.tenant_id: row for row in AccessPolicy.objects.all()}
    for spec in specs:
        current = tenants.pop(spec.slug, None)
        tenant = _plan_row(
            plan,
            "tenant",
            spec.slug,
            current,
            spec.model_values(),
            create=Tenant,
            identity={"slug": spec.slug},
            note=spec.name,
            names=TenantSpec.FIELD_NAMES,
        )
        quota = quotas.get(current.pk) if current else None
        policy = policies.get(current.pk) if current else None
        _plan_tenant_part(plan, "quota", spec.slug, quota, spec.quota, Quota, tenant, prune)
        _plan_tenant_part(plan, "policy", spec.slug, policy, spec.policy, AccessPolicy, tenant, prune)
    for slug, row in sorted(tenants.items()):
        if not prune:
            plan.untouched.append(f"tenant {slug}")
        elif row.active:
            row.active = False
            plan.changes.append(Change(Action.DEACTIVATE, "tenant", slug, row, ("active",), ("active",)))
        else:
            plan.unchanged.append(f"tenant {slug}")


_LIFTED = {
    "quota": "not in the file: the tenant's limits and budgets are lifted",
    "policy": "not in the file: the tenant may use every model from any address",
}


def _plan_tenant_part(
    plan: ApplyPlan,
    kind: str,
    slug: str,
    row: models.Model | None,
    spec: QuotaSpec | PolicySpec | None,
    model: type[models.Model],
    tenant: Tenant,
    prune: bool,
) -> None:
    """A tenant's quota or policy. An omitted block leaves the row alone unless pruning."""
    if spec is not None:
        _plan_row(plan, kind, slug, row, spec.model_values(), create=model, identity={"tenant": tenant})
    elif row is not None:
        _plan_leftover(plan, kind, slug, row, prune, note=_LIFTED[kind])


def _plan_prices(plan: ApplyPlan, specs: list[PriceSpec], prune: bool) -> None:
    prices = {(row.model, row.effective_from): row for row in Price.objects.all()}
    for spec in specs:
        _plan_row(
            plan,
            "price",
            f"{spec.model} from {effective_from_text(spec.effective_from)}",
            prices.pop((spec.model, spec.effective_from), None),
            spec.model_values(),
            create=Price,
            identity={"model": spec.model, "effective_from": spec.effective_from},
            note=f"input {spec.input_per_million}, output {spec.output_per_million} per million tokens",
        )
    for (model, since), row in sorted(prices.items()):
        _plan_leftover(plan, "price", f"{model} from {effective_from_text(since)}", row, prune)


def _plan_row(
    plan: ApplyPlan,
    kind: str,
    label: str,
    row: Any,
    values: dict[str, Any],
    *,
    create: type[models.Model],
    identity: dict[str, Any],
    note: str = "",
    names: dict[str, str] | None = None,
) -> Any:
    """Plan one row the file names: create it, update the columns that differ, or count it unchanged.

    ``names`` spells columns as the file does (``alert_webhook_url`` -> ``alerts.webhook_url``)."""
    if row is None:
        row = create(**identity, **values)
        plan.changes.append(Change(Action.CREATE, kind, label, row, note=note))
        return row
    changed = [column for column, value in values.items() if getattr(row, column) != value]
    if not changed:
        plan.unchanged.append(f"{kind} {label}")
        return row
    for column in changed:
        setattr(row, column, values[column])
    fields = tuple((names or {}).get(column, column) for column in changed)
    plan.changes.append(Change(Action.UPDATE, kind, label, row, fields, tuple(changed)))
    return row


def _plan_leftover(plan: ApplyPlan, kind: str, label: str, row: models.Model, prune: bool, note: str = "") -> None:
    """A row the file does not name: removed when pruning, otherwise left as it is."""
    if prune:
        plan.changes.append(Change(Action.REMOVE, kind, label, row, note=note))
    else:
        plan.untouched.append(f"{kind} {label}")


def _with_timestamp(row: models.Model, columns: tuple[str, ...]) -> list[str]:
    # update_fields skips auto_now columns that are not listed, so name updated_at explicitly.
    try:
        row._meta.get_field("updated_at")
    except FieldDoesNotExist:
        return list(columns)
    return [*columns, "updated_at"]
