"""The gateway configuration file as pydantic models: what ``gateway_apply`` reads and ``gateway_export`` writes.

Every model forbids unknown fields, so a typo is an error instead of a silently ignored line.
Defaults come from ``gateway.defaults``, as the Django models' do, so an omitted field means what it
means in the admin.
Bounds mirror the database columns and constraints, so a file that validates cannot fail half-way
through an apply on a value the database refuses.

This module knows nothing of Django: it only describes and checks the file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from gateway import defaults

# Column limits of the models (PositiveSmallIntegerField, PositiveIntegerField, PositiveBigIntegerField).
SMALL_MAX = 32_767
INT_MAX = 2_147_483_647
BIG_MAX = 9_223_372_036_854_775_807


Loc = tuple[str | int, ...]


class EnvString(str):
    """A value written in the file as exactly one ``${VAR}`` reference; ``var`` names the variable.

    The loader produces these so the schema can tell a secret that came from the environment
    from one pasted into the file, which is refused.
    """

    var: str

    def __new__(cls, value: str, var: str) -> EnvString:
        obj = super().__new__(cls, value)
        obj.var = var
        return obj


def secret_env_name(endpoint_name: str, field: str) -> str:
    """The environment variable export names for an endpoint's secret, e.g. ``EAST_API_KEY``.

    Upper-cased, every character that is not a letter or digit becomes ``_``; a leading digit
    gets a prefix because shells cannot set a variable whose name starts with one.
    """
    name = re.sub(r"[^A-Za-z0-9]", "_", f"{endpoint_name}_{field}").upper()
    return f"ENDPOINT_{name}" if name[:1].isdigit() else name


# --- field types -----------------------------------------------------------------------------


def _slug(value: str) -> str:
    if not re.fullmatch(r"[-a-zA-Z0-9_]+", value):
        raise ValueError("must be a slug: letters, digits, hyphens and underscores only")
    return value


def _url(value: str) -> str:
    parts = urlsplit(value)
    # Deliberately laxer than Django's URLValidator: in-cluster names such as
    # http://azure-sim:8080 have no dot, and the gateway must be able to reach them.
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


def _cidr(value: str) -> str:
    try:
        # strict: "10.0.0.1/8" has host bits set, which is almost always a typo for 10.0.0.0/8.
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"not a valid network address or CIDR ({exc})") from None
    return value  # kept as written, so an export of what the admin typed applies without a diff


def _decimal_from_float(value: Any) -> Any:
    # YAML reads 2.50 as a float; its shortest repr is the decimal the user wrote.
    return Decimal(repr(value)) if isinstance(value, float) else value


def _effective_from(value: Any) -> datetime:
    """A date (midnight UTC) or an ISO datetime (UTC when it names no zone)."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime.combine(value, time.min)
    elif isinstance(value, str):
        try:
            parsed = (
                datetime.combine(date.fromisoformat(value), time.min)
                if len(value) == 10
                else datetime.fromisoformat(value)
            )
        except ValueError:
            raise ValueError("must be a date (YYYY-MM-DD) or an ISO datetime") from None
    else:
        raise ValueError("must be a date (YYYY-MM-DD) or an ISO datetime")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _secret(value: Any) -> str:
    if value is None or (value == "" and not isinstance(value, EnvString)):
        return ""
    if not isinstance(value, EnvString):
        raise PydanticCustomError(
            "literal_secret",
            "a literal secret is not allowed in the file; write exactly one environment variable "
            "reference such as ${NAME} and set that variable",
        )
    if value == "":
        raise PydanticCustomError("empty_secret", "environment variable {var} is set but empty", {"var": value.var})
    return str(value)


def _email(value: str) -> str:
    # Deliberately simple: the mail server is the judge; this catches typos such as a missing @.
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value):
        raise ValueError("must be an e-mail address")
    return value


def _unique(values: list[Any]) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError("lists a value twice")
    return values


Text40 = Annotated[str, Field(min_length=1, max_length=40)]
Text100 = Annotated[str, Field(min_length=1, max_length=100)]
Text200 = Annotated[str, Field(min_length=1, max_length=200)]
Slug = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_slug)]
Url = Annotated[str, Field(max_length=500), AfterValidator(_url)]
Email = Annotated[str, Field(max_length=254), AfterValidator(_email)]
Cidr = Annotated[str, AfterValidator(_cidr)]
Secret = Annotated[str, BeforeValidator(_secret), Field(max_length=500)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=INT_MAX)]
BigCount = Annotated[int, Field(ge=0, le=BIG_MAX)]
Money = Annotated[Decimal, BeforeValidator(_decimal_from_float), Field(ge=0, max_digits=12, decimal_places=2)]
PerMillion = Annotated[Decimal, BeforeValidator(_decimal_from_float), Field(ge=0, max_digits=12, decimal_places=6)]
EffectiveFrom = Annotated[datetime, BeforeValidator(_effective_from)]


class _Spec(BaseModel):
    """Base of every section: unknown fields are errors, and a parsed file is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Model field -> name in the file, where they differ; used to report changed fields.
    FIELD_NAMES: ClassVar[dict[str, str]] = {}


# --- endpoints and deployments -----------------------------------------------------------------


class TimeoutsSpec(_Spec):
    connect: Seconds = defaults.CONNECT_TIMEOUT
    first_byte: Seconds = defaults.FIRST_BYTE_TIMEOUT
    total: Seconds = defaults.TOTAL_TIMEOUT


class AzureADSpec(_Spec):
    """Client-credentials sign-in to Azure AD (Entra ID) instead of an API key."""

    tenant_id: Text100
    client_id: Text100
    client_secret: Secret
    authority: Annotated[str, Field(max_length=300), AfterValidator(_url)] = defaults.AD_AUTHORITY


class DeploymentSpec(_Spec):
    """One deployment of a model on an endpoint. ``name`` is the upstream deployment name."""

    name: Text200
    model: Text200
    sku: Literal["standard", "provisioned"] = defaults.SKU
    tier: Annotated[int, Field(ge=1, le=SMALL_MAX)] = defaults.TIER
    max_wait_seconds: NonNegSeconds = defaults.MAX_WAIT_SECONDS
    rpm: Count = defaults.NO_LIMIT
    tpm: Count = defaults.NO_LIMIT
    context_window: Annotated[int, Field(ge=1, le=INT_MAX)] = defaults.CONTEXT_WINDOW
    max_output_tokens: Count = defaults.MAX_OUTPUT_TOKENS
    weight: Annotated[int, Field(ge=1, le=SMALL_MAX)] = defaults.WEIGHT
    token_estimate: Literal["tiktoken", "fast"] = defaults.TOKEN_ESTIMATE
    upstream_model: Annotated[str, Field(max_length=200)] = ""
    monthly_fixed_cost: Money = Decimal(defaults.MONTHLY_FIXED_COST)
    enabled: bool = True

    @model_validator(mode="after")
    def _fixed_cost_only_provisioned(self) -> DeploymentSpec:
        if self.monthly_fixed_cost and self.sku != "provisioned":
            raise ValueError("monthly_fixed_cost is for provisioned (PTU) deployments only")
        return self

    def model_values(self) -> dict[str, Any]:
        """The ``Deployment`` columns this entry sets, apart from its identity (endpoint and name)."""
        return self.model_dump(exclude={"name"})


class EndpointSpec(_Spec):
    """An Azure OpenAI resource or OpenAI-compatible server, with its deployments."""

    name: Slug
    kind: Literal["azure", "openai"] = defaults.ENDPOINT_KIND
    base_url: Url
    auth: Literal["api_key", "azure_ad"] = defaults.ENDPOINT_AUTH
    api_key: Secret = ""
    azure_ad: AzureADSpec | None = None
    api_version: Text40 = defaults.API_VERSION
    timeouts: TimeoutsSpec = TimeoutsSpec()
    enabled: bool = True
    deployments: list[DeploymentSpec] = Field(default_factory=list)

    FIELD_NAMES: ClassVar[dict[str, str]] = {
        "ad_tenant_id": "azure_ad.tenant_id",
        "ad_client_id": "azure_ad.client_id",
        "ad_client_secret": "azure_ad.client_secret",
        "ad_authority": "azure_ad.authority",
        "connect_timeout": "timeouts.connect",
        "first_byte_timeout": "timeouts.first_byte",
        "total_timeout": "timeouts.total",
    }

    @model_validator(mode="after")
    def _azure_ad_given(self) -> EndpointSpec:
        if self.auth == "azure_ad" and self.azure_ad is None:
            raise ValueError("auth is azure_ad, so an azure_ad block (tenant_id, client_id, client_secret) is required")
        return self

    def model_values(self) -> dict[str, Any]:
        """The ``Endpoint`` columns this entry sets; an omitted azure_ad block means the defaults."""
        ad = self.azure_ad
        return {
            "kind": self.kind,
            "base_url": self.base_url,
            "auth": self.auth,
            "api_key": self.api_key,
            "ad_tenant_id": ad.tenant_id if ad else "",
            "ad_client_id": ad.client_id if ad else "",
            "ad_client_secret": ad.client_secret if ad else "",
            "ad_authority": ad.authority if ad else defaults.AD_AUTHORITY,
            "api_version": self.api_version,
            "connect_timeout": self.timeouts.connect,
            "first_byte_timeout": self.timeouts.first_byte,
            "total_timeout": self.timeouts.total,
            "enabled": self.enabled,
        }


# --- tenants -------------------------------------------------------------------------------------


class QuotaSpec(_Spec):
    """The tenant's own limits and budgets (per-key quotas live in the admin). 0 = unlimited."""

    rpm: Count = defaults.NO_LIMIT
    tpm: Count = defaults.NO_LIMIT
    daily_tokens: BigCount = defaults.NO_LIMIT
    monthly_tokens: BigCount = defaults.NO_LIMIT
    monthly_cost: Money = Decimal(defaults.NO_LIMIT)
    alert_thresholds: Annotated[list[Annotated[int, Field(gt=0, le=1000)]], AfterValidator(_unique)] = Field(
        default_factory=list
    )

    def model_values(self) -> dict[str, Any]:
        return self.model_dump()


class PolicySpec(_Spec):
    """Which models the tenant's keys may use, from which networks, and the largest max_tokens."""

    allowed_models: list[Text200] = Field(default_factory=list)
    ip_allow: list[Cidr] = Field(default_factory=list)
    ip_deny: list[Cidr] = Field(default_factory=list)
    max_tokens_cap: Count = defaults.MAX_TOKENS_CAP

    def model_values(self) -> dict[str, Any]:
        return self.model_dump()


class AlertsSpec(_Spec):
    """Who hears about the tenant's budget alerts: e-mail addresses and a webhook signed with a secret."""

    emails: Annotated[list[Email], AfterValidator(_unique)] = Field(default_factory=list)
    webhook_url: Annotated[str, Field(max_length=500), AfterValidator(lambda v: v and _url(v))] = ""
    webhook_secret: Secret = ""


class TenantSpec(_Spec):
    """A team. An omitted quota, policy or alerts block leaves what is stored alone (``--prune``
    removes a quota or policy; alert contacts are columns of the tenant and stay)."""

    slug: Slug
    name: Text200
    active: bool = True
    quota: QuotaSpec | None = None
    policy: PolicySpec | None = None
    alerts: AlertsSpec | None = None

    FIELD_NAMES: ClassVar[dict[str, str]] = {
        "alert_emails": "alerts.emails",
        "alert_webhook_url": "alerts.webhook_url",
        "alert_webhook_secret": "alerts.webhook_secret",
    }

    def model_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {"name": self.name, "active": self.active}
        if self.alerts is not None:
            values.update(
                alert_emails=list(self.alerts.emails),
                alert_webhook_url=self.alerts.webhook_url,
                alert_webhook_secret=self.alerts.webhook_secret,
            )
        return values


# --- prices --------------------------------------------------------------------------------------


class PriceSpec(_Spec):
    """What a model costs per million tokens from ``effective_from`` on."""

    model: Text200
    input_per_million: PerMillion
    cached_input_per_million: PerMillion = Decimal(0)
    output_per_million: PerMillion
    effective_from: EffectiveFrom

    def model_values(self) -> dict[str, Any]:
        return {
            "input_per_million": self.input_per_million,
            "cached_input_per_million": self.cached_input_per_million,
            "output_per_million": self.output_per_million,
        }


class ConfigFile(_Spec):
    """The whole file."""

    version: Literal[1]
    endpoints: list[EndpointSpec] = Field(default_factory=list)
    tenants: list[TenantSpec] = Field(default_factory=list)
    prices: list[PriceSpec] = Field(default_factory=list)


# --- checks across entries ---------------------------------------------------------------------


def duplicate_problems(raw: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    """Names used twice where they must be unique, as ``(location, message)`` pairs.

    Works on the raw (expanded) document rather than on validated models, so duplicates are
    reported together with every other error even when some entries do not validate.
    """
    problems: list[tuple[Loc, str]] = []
    problems += _duplicates(raw.get("endpoints"), ("endpoints",), "name", "endpoint name")
    for i, endpoint in _entries(raw.get("endpoints")):
        problems += _duplicates(
            endpoint.get("deployments"), ("endpoints", i, "deployments"), "name", "deployment name on this endpoint"
        )
    problems += _duplicates(raw.get("tenants"), ("tenants",), "slug", "tenant slug")
    problems += _duplicates(raw.get("prices"), ("prices",), "effective_from", "price for this model and date")
    return problems


def price_key(entry: Mapping[str, Any]) -> tuple[str, datetime] | None:
    """``(model, effective_from)`` of a raw price entry, or None when either is unreadable."""
    try:
        return str(entry["model"]), _effective_from(entry["effective_from"])
    except (KeyError, ValueError):
        return None


def _entries(items: Any) -> list[tuple[int, Mapping[str, Any]]]:
    if not isinstance(items, list):
        return []
    return [(i, item) for i, item in enumerate(items) if isinstance(item, Mapping)]


def _duplicates(items: Any, where: Loc, field: str, what: str) -> list[tuple[Loc, str]]:
    first: dict[Any, int] = {}
    problems: list[tuple[Loc, str]] = []
    for i, entry in _entries(items):
        key = price_key(entry) if where == ("prices",) else entry.get(field)
        if key is None or not isinstance(key, str | tuple):
            continue
        if key in first:
            problems.append(((*where, i, field), f"duplicate {what}: {where[-1]}[{first[key]}] already uses it"))
        else:
            first[key] = i
    return problems


def effective_from_text(moment: datetime) -> str:
    """How a price's start is written: the date alone at midnight UTC, else the full ISO datetime."""
    moment = moment.astimezone(UTC)
    return moment.date().isoformat() if moment.time() == time.min else moment.isoformat()
