"""One default per field: the Django models, the snapshot views and the config file's schema agree.

Each of them takes its defaults from ``gateway.defaults``. These tests read the defaults back by
introspection (the model fields' ``default``, the dataclass fields' defaults, pydantic's
``model_fields``, nested sections such as ``timeouts.connect`` included) and compare every field
that has a default in more than one place, so a value written anywhere else fails here.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import typing
from decimal import Decimal
from typing import Any

import pytest
from django.db import models
from pydantic import BaseModel

from gateway.configfile.schema import DeploymentSpec, EndpointSpec, PolicySpec, QuotaSpec, TenantSpec
from gateway.models import Deployment, Endpoint
from gateway.proxy.upstream import Timeouts
from gateway.snapshot import types as views
from tenants.models import AccessPolicy, ClientKey, Quota, Tenant


@dataclasses.dataclass(frozen=True)
class Source:
    """Where defaults are written: ``names`` maps its field names to the model's where they differ."""

    label: str
    defaults: dict[str, Any]
    names: dict[str, str] = dataclasses.field(default_factory=dict)

    def by_model_name(self) -> dict[str, Any]:
        return {self.names.get(name, name): value for name, value in self.defaults.items()}


def model_defaults(model: type[models.Model]) -> Source:
    fields = [f for f in model._meta.concrete_fields if f.has_default()]
    return Source(model.__name__, {f.name: f.get_default() for f in fields})


def view_defaults(view: type, names: dict[str, str] | None = None) -> Source:
    found: dict[str, Any] = {}
    for f in dataclasses.fields(view):
        if dataclasses.is_dataclass(f.default):
            continue  # a nested view (a tenant's QuotaView) has its own comparison
        if f.default is not dataclasses.MISSING:
            found[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[f.name] = f.default_factory()
    return Source(view.__name__, found, names or {})


def schema_defaults(spec: type[BaseModel]) -> Source:
    """Defaults of the spec's fields and of its nested sections' (``timeouts.connect``), named as
    in the model through the spec's ``FIELD_NAMES``."""
    renamed = {file_name: model_name for model_name, file_name in getattr(spec, "FIELD_NAMES", {}).items()}
    return Source(spec.__name__, _pydantic_defaults(spec, ""), renamed)


def _pydantic_defaults(spec: type[BaseModel], prefix: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, info in spec.model_fields.items():
        sections = _nested_models(info.annotation)
        # A section (timeouts, azure_ad, quota) is compared field by field, not as a whole.
        for section in sections:
            found.update(_pydantic_defaults(section, f"{prefix}{name}."))
        if not sections and not info.is_required():
            found[prefix + name] = info.get_default(call_default_factory=True)
    return found


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return []


def _comparable(value: Any) -> Any:
    # A model's list, a view's tuple or frozenset and a schema's list of nothing are one default.
    if isinstance(value, list | tuple | set | frozenset):
        return sorted(value)
    return value


def disagreements(*sources: Source) -> tuple[set[str], list[str]]:
    """The field names compared (a default in two places or more), and every mismatch."""
    tables = [(source.label, source.by_model_name()) for source in sources]
    compared: set[str] = set()
    problems: list[str] = []
    for name in sorted({name for _, table in tables for name in table}):
        seen = [(label, table[name]) for label, table in tables if name in table]
        if len(seen) < 2:
            continue
        compared.add(name)
        values = [_comparable(value) for _, value in seen]
        # Decimal(0) == 0 == 0.0, but "0" != 0: types that mean different things still differ.
        if any(type(v) is str for v in values) and not all(type(v) is str for v in values):
            values = [repr(v) for v in values]
        if any(v != values[0] for v in values[1:]):
            problems.append(f"{name}: " + ", ".join(f"{label}={value!r}" for label, value in seen))
    return compared, problems


ENTITIES = {
    "endpoint": (
        [
            model_defaults(Endpoint),
            view_defaults(views.EndpointView),
            schema_defaults(EndpointSpec),
            view_defaults(
                Timeouts,
                {"connect": "connect_timeout", "first_byte": "first_byte_timeout", "total": "total_timeout"},
            ),
        ],
        {"kind", "auth", "ad_authority", "api_version", "connect_timeout", "first_byte_timeout", "total_timeout"},
    ),
    "deployment": (
        [
            model_defaults(Deployment),
            view_defaults(views.DeploymentView, {"max_wait": "max_wait_seconds"}),
            schema_defaults(DeploymentSpec),
        ],
        {
            "sku",
            "tier",
            "max_wait_seconds",
            "rpm",
            "tpm",
            "context_window",
            "max_output_tokens",
            "weight",
            "token_estimate",
            "upstream_model",
            "monthly_fixed_cost",
            "enabled",
        },
    ),
    "tenant": ([model_defaults(Tenant), view_defaults(views.TenantView), schema_defaults(TenantSpec)], {"active"}),
    "access policy": (
        [model_defaults(AccessPolicy), view_defaults(views.TenantView), schema_defaults(PolicySpec)],
        {"allowed_models", "ip_allow", "ip_deny", "max_tokens_cap"},
    ),
    "quota": (
        [model_defaults(Quota), view_defaults(views.QuotaView), schema_defaults(QuotaSpec)],
        {"rpm", "tpm", "daily_tokens", "monthly_tokens", "monthly_cost", "alert_thresholds"},
    ),
    "client key": (
        [model_defaults(ClientKey), view_defaults(views.KeyView)],
        {"allowed_models", "default_priority"},
    ),
}


@pytest.mark.parametrize("entity", ENTITIES)
def test_a_field_has_the_same_default_in_the_model_the_view_and_the_config_file(entity):
    sources, expected = ENTITIES[entity]
    compared, problems = disagreements(*sources)
    assert not problems, f"{entity} defaults disagree (take them from gateway.defaults): " + "; ".join(problems)
    # The introspection found what it should: a renamed field missed would pass unnoticed.
    assert expected <= compared, f"not compared: {sorted(expected - compared)}"


def test_a_drifted_default_is_reported():
    drifted = dataclasses.make_dataclass(
        "DriftedDeploymentView",
        [("max_wait", float, dataclasses.field(default=2.0)), ("context_window", int, 64_000)],
    )
    compared, problems = disagreements(
        model_defaults(Deployment), view_defaults(drifted, {"max_wait": "max_wait_seconds"})
    )
    assert compared == {"max_wait_seconds", "context_window"}
    assert len(problems) == 2
    assert any("context_window" in p and "64000" in p and "128000" in p for p in problems)
    _, quoted = disagreements(Source("a", {"tier": 1}), Source("b", {"tier": "1"}))
    assert quoted, "a number and the same digits as text are different defaults"
    _, equal = disagreements(Source("a", {"cost": 0}), Source("b", {"cost": Decimal(0)}), Source("c", {"cost": 0.0}))
    assert not equal


@pytest.mark.parametrize(
    ("model", "field"),
    [(Endpoint, "kind"), (Endpoint, "auth"), (Deployment, "sku"), (Deployment, "token_estimate")],
)
def test_a_choice_default_is_one_of_the_choices(model, field):
    model_field = model._meta.get_field(field)
    assert model_field.get_default() in {value for value, _ in model_field.choices}


def test_the_defaults_module_needs_no_django():
    loaded = _imported_by("import gateway.defaults")
    assert "gateway.defaults" in loaded
    assert not [module for module in loaded if module.startswith(("django", "pydantic"))]


def _imported_by(statement: str) -> list[str]:
    """The modules a fresh interpreter loads for ``statement``."""
    code = f"import json, sys; before = set(sys.modules); {statement}; print(json.dumps(sorted(set(sys.modules) - before)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)
