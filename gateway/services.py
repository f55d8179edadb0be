"""Writes to upstream endpoints that must follow the same rules from the admin and from ``gateway_apply``.

The rule kept here: a stored secret is only ever sent where it was sent when it was entered. An
endpoint whose destination changes (its ``base_url``, ``kind`` or ``auth``, or the Azure AD
authority or tenant its client secret is presented to) loses every stored secret that the same
update does not give again. Otherwise a user allowed to edit an endpoint, but never shown its
secrets, could point it at a host of their own and collect the key from the next request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.models import Endpoint

#: Where a secret goes: changing any of these clears the secrets that are not given again.
DESTINATION_FIELDS: tuple[str, ...] = ("kind", "base_url", "auth", "ad_authority", "ad_tenant_id")
SECRET_FIELDS: tuple[str, ...] = ("api_key", "ad_client_secret")


@dataclass(frozen=True)
class EndpointUpdate:
    """What ``endpoint_update`` did: column names only, never a secret's value."""

    changed: tuple[str, ...] = ()  # columns whose value changed, in model order
    moved: tuple[str, ...] = ()  # destination columns among them
    cleared: tuple[str, ...] = ()  # secrets removed because the destination moved and they were not given again


def endpoint_update(endpoint: Endpoint, values: Mapping[str, Any], *, save: bool = True) -> EndpointUpdate:
    """Set ``values`` (column -> new value) on ``endpoint``, clearing secrets the destination change leaves behind.

    A column absent from ``values`` keeps its stored value. For a secret, a non-empty value
    replaces the stored one, ``""`` removes it, and leaving it out keeps it, unless a
    destination column changes: then every stored secret not given a non-empty value here is
    removed (see the module docstring). With ``save`` the changed columns (and ``updated_at``)
    are written with ``save(update_fields=...)``, which bumps the config version through the
    model signals; without it the row is only changed in memory, for a plan to write later.
    """
    unknown = set(values) - {f.name for f in Endpoint._meta.concrete_fields}
    if unknown:
        raise ValueError(f"not columns of Endpoint: {', '.join(sorted(unknown))}")
    new = dict(values)
    moved = tuple(name for name in DESTINATION_FIELDS if name in new and new[name] != getattr(endpoint, name))
    cleared: list[str] = []
    if moved:
        for name in SECRET_FIELDS:
            if getattr(endpoint, name) and not new.get(name):
                new[name] = ""
                cleared.append(name)
    changed = tuple(
        f.name for f in Endpoint._meta.concrete_fields if f.name in new and getattr(endpoint, f.name) != new[f.name]
    )
    for name in changed:
        setattr(endpoint, name, new[name])
    if save and changed:
        endpoint.save(update_fields=[*changed, "updated_at"])
    return EndpointUpdate(changed=changed, moved=moved, cleared=tuple(cleared))
