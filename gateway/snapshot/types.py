"""Plain, immutable views of the configuration the request path reads.

The request path never touches the ORM: it reads these frozen dataclasses out of an in-memory
snapshot (``gateway.snapshot``) that is rebuilt when the configuration changes. Keeping them
free of Django lets the balancer, the upstream client and the token counter be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network

from gateway import defaults

AZURE = "azure"
OPENAI = "openai"

AUTH_API_KEY = "api_key"
AUTH_AZURE_AD = "azure_ad"

SKU_STANDARD = "standard"
SKU_PROVISIONED = "provisioned"

ESTIMATE_TIKTOKEN = "tiktoken"
ESTIMATE_FAST = "fast"


@dataclass(frozen=True, slots=True)
class EndpointView:
    """An upstream endpoint: where to send requests and how to authenticate."""

    id: int
    name: str
    kind: str  # AZURE or OPENAI
    base_url: str  # e.g. https://res.openai.azure.com or https://api.example.com/v1
    auth: str = defaults.ENDPOINT_AUTH  # AUTH_API_KEY or AUTH_AZURE_AD
    api_key: str = field(default="", repr=False)
    ad_tenant_id: str = ""
    ad_client_id: str = ""
    ad_client_secret: str = field(default="", repr=False)
    # Token endpoint base; the token URL is f"{ad_authority}/{ad_tenant_id}/oauth2/v2.0/token".
    ad_authority: str = defaults.AD_AUTHORITY
    ad_scope: str = defaults.AD_SCOPE
    api_version: str = defaults.API_VERSION
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    first_byte_timeout: float = defaults.FIRST_BYTE_TIMEOUT
    total_timeout: float = defaults.TOTAL_TIMEOUT
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class DeploymentView:
    """One upstream deployment of a model, with the limits the balancer keeps it within."""

    id: int
    endpoint: EndpointView
    name: str  # the upstream deployment name (Azure path) or upstream model name (OpenAI)
    model: str  # the model name clients ask for
    sku: str = defaults.SKU  # SKU_STANDARD or SKU_PROVISIONED
    tier: int = defaults.TIER  # 1 is tried first, then 2, ...
    max_wait: float = defaults.MAX_WAIT_SECONDS  # seconds a request may wait for this tier before spilling over
    rpm: int = defaults.NO_LIMIT  # 0 = no limit
    tpm: int = defaults.NO_LIMIT  # 0 = no limit
    context_window: int = defaults.CONTEXT_WINDOW
    max_output_tokens: int = defaults.MAX_OUTPUT_TOKENS
    weight: int = defaults.WEIGHT
    token_estimate: str = defaults.TOKEN_ESTIMATE  # ESTIMATE_TIKTOKEN or ESTIMATE_FAST
    upstream_model: str = ""  # model family for token counting when the names say nothing
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class QuotaView:
    """A quota (per tenant or per key). 0 means unlimited. Admission: ``gateway.proxy.admission``."""

    rpm: int = defaults.NO_LIMIT
    tpm: int = defaults.NO_LIMIT
    daily_tokens: int = defaults.NO_LIMIT
    monthly_tokens: int = defaults.NO_LIMIT
    monthly_cost: float = defaults.NO_LIMIT
    alert_thresholds: tuple[int, ...] = ()
    # When an admin last reset the day's / the month's budget counters (epoch seconds; 0: never).
    day_counters_reset_at: float = 0.0
    month_counters_reset_at: float = 0.0

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.daily_tokens or self.monthly_tokens or self.monthly_cost)


@dataclass(frozen=True, slots=True)
class TenantView:
    id: int
    slug: str
    name: str
    active: bool = True
    allowed_models: frozenset[str] = frozenset()  # empty = all
    ip_allow: tuple[IPv4Network | IPv6Network, ...] = ()
    ip_deny: tuple[IPv4Network | IPv6Network, ...] = ()
    max_tokens_cap: int = defaults.MAX_TOKENS_CAP  # 0 = no cap
    quota: QuotaView = QuotaView()


@dataclass(frozen=True, slots=True)
class KeyView:
    id: int
    tenant: TenantView
    name: str
    prefix: str
    expires_at: datetime | None = None
    revoked: bool = False
    allowed_models: frozenset[str] = frozenset()  # empty = whatever the tenant allows
    default_priority: int = defaults.DEFAULT_PRIORITY
    best_priority: int = defaults.DEFAULT_PRIORITY  # the best a request may ask for; better asks are clamped to it
    quota: QuotaView = QuotaView()
