"""The configuration's default values, in one place.

A field left out means the same thing wherever it is read: the Django models
(``gateway.models``, ``tenants.models``), the request path's frozen views
(``gateway.snapshot.types``), the configuration file's schema (``gateway.configfile.schema``)
and the upstream client's ``Timeouts`` all take their defaults from here.
``tests/configfile/test_defaults.py`` checks that every field present in more than one of
them has the same default, so a value written anywhere else fails the suite.

Plain constants, importable without Django. Choice values are written out (``"azure"``, not
``gateway.snapshot.types.AZURE``) because the views import this module; the test checks
that each is one of its model field's choices. The models' values reach the migrations:
changing one here is a schema change (``manage.py makemigrations``).
"""

from __future__ import annotations

from typing import Final

# --- endpoints -------------------------------------------------------------------------------

ENDPOINT_KIND: Final = "azure"  # Azure OpenAI (gateway.snapshot.types.AZURE)
ENDPOINT_AUTH: Final = "api_key"  # gateway.snapshot.types.AUTH_API_KEY
AD_AUTHORITY: Final = "https://login.microsoftonline.com"
AD_SCOPE: Final = "https://cognitiveservices.azure.com/.default"
API_VERSION: Final = "2024-10-21"  # sent to Azure endpoints; clients' own is never forwarded
CONNECT_TIMEOUT: Final = 5.0  # seconds to connect (TCP and TLS)
FIRST_BYTE_TIMEOUT: Final = 60.0  # seconds from sending until the response headers
TOTAL_TIMEOUT: Final = 600.0  # seconds for the whole exchange, body included

# --- deployments -----------------------------------------------------------------------------

SKU: Final = "standard"  # pay as you go (gateway.snapshot.types.SKU_STANDARD)
TIER: Final = 1  # tried first
MAX_WAIT_SECONDS: Final = 0.0  # no waiting for the tier: spill over to the next at once
NO_LIMIT: Final = 0  # rpm / tpm of a deployment, and every quota limit: 0 means unlimited
CONTEXT_WINDOW: Final = 128_000
MAX_OUTPUT_TOKENS: Final = 4096
WEIGHT: Final = 1
TOKEN_ESTIMATE: Final = "tiktoken"  # exact counting (gateway.snapshot.types.ESTIMATE_TIKTOKEN)
MONTHLY_FIXED_COST: Final = 0  # a provisioned (PTU) deployment's monthly fee, shared by use in statements

# --- tenants and keys ------------------------------------------------------------------------

DEFAULT_PRIORITY: Final = 5  # a key's queue priority when a request names none (lower first)
MAX_TOKENS_CAP: Final = 0  # no cap on a request's max_tokens
