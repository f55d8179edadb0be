"""Configuration of the simulated upstream: plain dataclasses, parsed strictly.

Contract:

* ``SimConfig.from_dict(data)`` accepts the documented keys only. Any unknown key, wrong type
  or out-of-range value raises :class:`ConfigError` whose message names the offending key
  (``deployments[1].rpm``), because a silently ignored typo in a rehearsal config is worse
  than a refusal to start.
* ``load_config(path)`` reads YAML or JSON (JSON is valid YAML, but ``.json`` files go through
  :mod:`json` for exact error positions).
* :class:`DeploymentConfig` is frozen; runtime updates build a new instance with
  :meth:`DeploymentConfig.updated`, which validates the changed fields the same way.

The file format::

    api_key: sk-sim                 # optional; when set every model call needs it
    minute_seconds: 60              # length of a rate-limit "minute" (short in tests)
    auto_deployments: false         # true: unknown deployment names are created on the fly
    token_estimate: tiktoken        # or "fast"; shorthand for defaults.token_estimate
    # defaults/deployments may also set arrival_count (tiktoken | characters) and arrival_factor
    # (e.g. 1.15): the arrival charge then differs from the gateway's count, as Azure's does.
    defaults: {rpm: 600, tpm: 100000}
    deployments:
      - {name: gpt-4o, tpm: 30000}
      - {name: ptu-4o, model: gpt-4o, sku: provisioned, ptu_tokens_per_minute: 60000}
    azure_ad: {tenant: my-tenant, client_id: app, client_secret: s3cret, expires_in: 3600}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gateway.proxy.tokens import MODE_FAST, MODE_TIKTOKEN

SKU_STANDARD = "standard"
SKU_PROVISIONED = "provisioned"
# The values of token_estimate: those of the gateway's Deployment.token_estimate.
TOKEN_ESTIMATES = (MODE_TIKTOKEN, MODE_FAST)
# The values of arrival_count (see .arrival): "" follows token_estimate (the gateway's own count);
# "tiktoken" and "characters" (characters / 4, the fast count) choose a rule of their own.
ARRIVAL_SAME = ""
ARRIVAL_TIKTOKEN = "tiktoken"
ARRIVAL_CHARACTERS = "characters"
ARRIVAL_COUNTS = (ARRIVAL_TIKTOKEN, ARRIVAL_CHARACTERS)


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the key."""


def _check_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    return value


def _check_int(where: str, value: Any, minimum: int = 0) -> int:
    # bool is an int subclass; "rpm: true" is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _check_number(where: str, value: Any, minimum: float = 0.0, exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if value < minimum or (exclusive and value == minimum):
        op = ">" if exclusive else ">="
        raise ConfigError(f"{where}: must be {op} {minimum:g}, got {value:g}")
    return value


def _check_str(where: str, value: Any, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}; got {value!r}")
    return value


def _reject_unknown(where: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"unknown key {prefix}{key!s}; allowed keys: {', '.join(sorted(allowed))}")


def _check_mapping(where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """How one simulated deployment behaves.

    ``rpm``/``tpm`` of 0 mean unlimited. ``sku`` "provisioned" replaces the RPM/TPM windows by
    the PTU utilisation model fed by ``ptu_tokens_per_minute``. ``faults`` are injected when
    the deployment is created (runtime faults go through the control API). ``token_estimate``
    counts prompts as the gateway's deployment field of that name does (``tiktoken``, or
    ``fast``: characters / 4), which is what the usage reports; ``default_max_tokens`` is the
    completion allowance charged on arrival when a chat request sets no limit (see :mod:`.arrival`).
    ``arrival_count`` and ``arrival_factor`` make the arrival charge differ from that count, as a
    real upstream's does: the prompt is charged ``ceil(arrival_factor x count)`` where the count
    is ``tiktoken``, ``characters`` (/ 4) or, when empty, the ``token_estimate`` count.
    """

    name: str
    model: str = ""  # "" = same as name (resolved in __post_init__)
    rpm: int = 0
    tpm: int = 0
    sku: str = SKU_STANDARD
    ptu_tokens_per_minute: int = 0
    default_max_tokens: int = 1024
    completion_tokens: int = 16
    token_delay_ms: float = 0.0
    latency_ms: float = 0.0
    embedding_dims: int = 8
    send_usage_in_stream: bool = True
    azure_annotations: bool = False
    token_estimate: str = MODE_TIKTOKEN
    arrival_count: str = ARRIVAL_SAME
    arrival_factor: float = 1.0
    faults: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.model:
            object.__setattr__(self, "model", self.name)

    # Field validators: one per field, so a dict from YAML or the control API is checked the
    # same way whichever path it took.
    @staticmethod
    def _validate_field(where: str, key: str, value: Any) -> Any:
        if key in ("name", "model"):
            return _check_str(where, value)
        if key in ("rpm", "tpm", "ptu_tokens_per_minute", "completion_tokens"):
            return _check_int(where, value)
        if key in ("default_max_tokens", "embedding_dims"):
            return _check_int(where, value, minimum=1)
        if key in ("token_delay_ms", "latency_ms"):
            return _check_number(where, value)
        if key in ("send_usage_in_stream", "azure_annotations"):
            return _check_bool(where, value)
        if key == "sku":
            return _check_str(where, value, (SKU_STANDARD, SKU_PROVISIONED))
        if key == "token_estimate":
            return _check_str(where, value, TOKEN_ESTIMATES)
        if key == "arrival_count":
            return value if value == ARRIVAL_SAME else _check_str(where, value, ARRIVAL_COUNTS)
        if key == "arrival_factor":
            return _check_number(where, value, 0.0, exclusive=True)
        if key == "faults":
            # Imported here: faults.py depends on this module's ConfigError.
            from .faults import parse_fault

            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list of faults")
            for i, item in enumerate(value):
                parse_fault(item, where=f"{where}[{i}]")
            return tuple(dict(item) for item in value)
        raise ConfigError(f"unknown key {where}")  # pragma: no cover - guarded by callers

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def check_fields(cls, data: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Validate a partial mapping of fields; returns the normalised values."""
        _check_mapping(where, data)
        _reject_unknown(where, data, cls.field_names())
        prefix = f"{where}." if where else ""
        return {k: cls._validate_field(f"{prefix}{k}", k, v) for k, v in data.items()}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, where: str = ""
    ) -> DeploymentConfig:
        merged = dict(defaults or {})
        merged.update(cls.check_fields(data, where))
        if "name" not in merged:
            raise ConfigError(f"{where or 'deployment'}: missing required key 'name'")
        deployment = cls(**merged)
        deployment.check_consistency(where)
        return deployment

    def updated(self, changes: Mapping[str, Any], where: str = "") -> DeploymentConfig:
        """A copy with ``changes`` applied (validated). The name cannot change."""
        values = self.check_fields(changes, where)
        if "name" in values and values["name"] != self.name:
            raise ConfigError(f"{where}.name: cannot rename deployment {self.name!r}")
        if "model" not in values and self.model == self.name:
            values["model"] = ""  # keep following the name's default
        new = dataclasses.replace(self, **values)
        new.check_consistency(where)
        return new

    def check_consistency(self, where: str = "") -> None:
        if self.sku == SKU_PROVISIONED and self.ptu_tokens_per_minute <= 0:
            raise ConfigError(f"{where or self.name}: sku 'provisioned' needs ptu_tokens_per_minute > 0")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["faults"] = [dict(f) for f in self.faults]
        return data


@dataclass(frozen=True, slots=True)
class AzureADConfig:
    """The fake Entra ID token endpoint: which client may obtain tokens, and for how long.

    ``tenant`` None accepts any tenant in the URL path.
    """

    client_id: str
    client_secret: str
    tenant: str | None = None
    expires_in: int = 3600

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "azure_ad") -> AzureADConfig:
        _check_mapping(where, data)
        _reject_unknown(where, data, {"tenant", "client_id", "client_secret", "expires_in"})
        for key in ("client_id", "client_secret"):
            if key not in data:
                raise ConfigError(f"{where}: missing required key {key!r}")
        tenant = data.get("tenant")
        return cls(
            client_id=_check_str(f"{where}.client_id", data["client_id"]),
            client_secret=_check_str(f"{where}.client_secret", data["client_secret"]),
            tenant=None if tenant is None else _check_str(f"{where}.tenant", tenant),
            expires_in=_check_int(f"{where}.expires_in", data.get("expires_in", 3600), 1),
        )


_TOP_LEVEL_KEYS = {
    "api_key",
    "minute_seconds",
    "auto_deployments",
    "token_estimate",
    "defaults",
    "deployments",
    "azure_ad",
}


@dataclass(slots=True)
class SimConfig:
    """The whole simulator configuration.

    ``defaults`` holds validated deployment fields (without ``name``) applied to configured,
    runtime-created and auto-created deployments alike.
    """

    api_key: str | None = None
    minute_seconds: float = 60.0
    auto_deployments: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    deployments: list[DeploymentConfig] = field(default_factory=list)
    azure_ad: AzureADConfig | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SimConfig:
        data = _check_mapping("", data if data is not None else {})
        _reject_unknown("", data, _TOP_LEVEL_KEYS)
        defaults: dict[str, Any] = {}
        if "token_estimate" in data:
            defaults["token_estimate"] = _check_str("token_estimate", data["token_estimate"], TOKEN_ESTIMATES)
        raw_defaults = data.get("defaults") or {}
        if "name" in _check_mapping("defaults", raw_defaults):
            raise ConfigError("defaults.name: a default cannot name a deployment")
        defaults.update(DeploymentConfig.check_fields(raw_defaults, "defaults"))

        raw_deployments = data.get("deployments") or []
        if not isinstance(raw_deployments, list):
            raise ConfigError("deployments: expected a list")
        deployments: list[DeploymentConfig] = []
        seen: set[str] = set()
        for i, item in enumerate(raw_deployments):
            dep = DeploymentConfig.from_dict(item, defaults, where=f"deployments[{i}]")
            if dep.name in seen:
                raise ConfigError(f"deployments[{i}].name: duplicate deployment {dep.name!r}")
            seen.add(dep.name)
            deployments.append(dep)

        api_key = data.get("api_key")
        azure_ad = data.get("azure_ad")
        return cls(
            api_key=None if api_key is None else _check_str("api_key", api_key),
            minute_seconds=_check_number("minute_seconds", data.get("minute_seconds", 60.0), 0.0, exclusive=True),
            auto_deployments=_check_bool("auto_deployments", data.get("auto_deployments", False)),
            defaults=defaults,
            deployments=deployments,
            azure_ad=None if azure_ad is None else AzureADConfig.from_dict(azure_ad),
        )

    @classmethod
    def coerce(cls, config: SimConfig | Mapping[str, Any] | None) -> SimConfig:
        """Accept either a ready SimConfig or a dict in the file format."""
        if isinstance(config, SimConfig):
            return config
        return cls.from_dict(config)

    def new_deployment(self, name: str, fields_: Mapping[str, Any] | None = None) -> DeploymentConfig:
        """A deployment built from ``defaults`` plus ``fields_`` (validated)."""
        data = dict(fields_ or {})
        data["name"] = name
        return DeploymentConfig.from_dict(data, self.defaults, where=f"deployments.{name}")

    def to_dict(self) -> dict[str, Any]:
        """The file format; ``SimConfig.from_dict(c.to_dict())`` round-trips."""
        data: dict[str, Any] = {
            "minute_seconds": self.minute_seconds,
            "auto_deployments": self.auto_deployments,
            "defaults": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.defaults.items()},
            "deployments": [d.to_dict() for d in self.deployments],
        }
        if self.api_key is not None:
            data["api_key"] = self.api_key
        if self.azure_ad is not None:
            data["azure_ad"] = dataclasses.asdict(self.azure_ad)
        return data


def load_config(path: str | Path) -> SimConfig:
    """Read a YAML or JSON config file. Errors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text) if text.strip() else {}
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # json.JSONDecodeError / yaml.YAMLError share no useful base
        raise ConfigError(f"{path}: cannot parse config: {exc}") from exc
    try:
        return SimConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
