"""Plain, immutable views of the configuration the request path reads.

The request path never touches the ORM: it reads these frozen dataclasses out of an in-memory
snapshot (``gateway.snapshot``) that is rebuilt when the configuration changes. Keeping them
free of Django lets the balancer, the upstream client and the token counter be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network

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
    auth: str = AUTH_API_KEY  # AUTH_API_KEY or AUTH_AZURE_AD
    api_key: str = field(default="", repr=False)
    ad_tenant_id: str = ""
    ad_client_id: str = ""
    ad_client_secret: str = field(default="", repr=False)
    # Token endpoint base; the token URL is f"{ad_authority}/{ad_tenant_id}/oauth2/v2.0/token".
    ad_authority: str = "https://login.microsoftonline.com"
    ad_scope: str = "https://cognitiveservices.azure.com/.default"
    api_version: str = "2024-10-21"
    connect_timeout: float = 5.0
    first_byte_timeout: float = 60.0
    total_timeout: float = 600.0
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class DeploymentView:
    """One upstream deployment of a model, with the limits the balancer keeps it within."""

    id: int
    endpoint: EndpointView
    name: str  # the upstream deployment name (Azure path) or upstream model name (OpenAI)
    model: str  # the model name clients ask for
    sku: str = SKU_STANDARD  # SKU_STANDARD or SKU_PROVISIONED
    tier: int = 1  # 1 is tried first, then 2, ...
    max_wait: float = 0.0  # seconds a request may wait for this tier before spilling over
    rpm: int = 0  # 0 = no limit
    tpm: int = 0  # 0 = no limit
    context_window: int = 128_000
    max_output_tokens: int = 4096
    weight: int = 1
    token_estimate: str = ESTIMATE_TIKTOKEN  # ESTIMATE_TIKTOKEN or ESTIMATE_FAST
    upstream_model: str = ""  # model family for token counting when the names say nothing
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class QuotaView:
    """A quota (per tenant or per key). 0 or None means unlimited. Enforced by the quotas issue."""

    rpm: int = 0
    tpm: int = 0
    daily_tokens: int = 0
    monthly_tokens: int = 0
    monthly_cost: float = 0.0
    alert_thresholds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class TenantView:
    id: int
    slug: str
    name: str
    active: bool = True
    allowed_models: frozenset[str] = frozenset()  # empty = all
    ip_allow: tuple[IPv4Network | IPv6Network, ...] = ()
    ip_deny: tuple[IPv4Network | IPv6Network, ...] = ()
    max_tokens_cap: int = 0  # 0 = no cap
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
    default_priority: int = 5  # when a request names no priority (lower is served first)
    best_priority: int = 5  # the best a request may ask for; better asks are served at this one
    quota: QuotaView = QuotaView()
