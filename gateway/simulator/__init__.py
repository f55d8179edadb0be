"""A fake Azure OpenAI / OpenAI upstream for tests, demos, benchmarks and config rehearsals.

It behaves like the real services where a gateway can tell the difference: Azure and
OpenAI routes, api-key / bearer / fake Entra ID auth, RPM/TPM rolling windows counted on
arrival (the same windows as :mod:`gateway.balancer.windows`), the provisioned (PTU) utilisation
model, SSE streams with optional usage chunks and Azure annotations, base64 embeddings, and
injectable faults. A control API under ``/_sim/`` reports what it saw.

Modules, one job each:

* :mod:`.config`     dataclasses and strict parsing of the YAML/JSON config
* :mod:`.arrival`    Azure's arrival charge: the gateway's prompt count (:mod:`gateway.proxy.tokens`)
  plus the completion allowance; encodings loaded off the event loop
* :mod:`.generation` how many choices and tokens the simulated model writes
* :mod:`.limiter`    rolling windows and PTU utilisation
* :mod:`.faults`     injectable faults
* :mod:`.auth`       API key and fake Entra ID tokens
* :mod:`.stats`      per-deployment counters
* :mod:`.responses`  JSON bodies and SSE events
* :mod:`.ids`        cheap UUID-shaped request and response ids
* :mod:`.state`      deployments and their runtime state
* :mod:`.server`     HTTP dispatch and model calls (aiohttp low-level server)
* :mod:`.control`    the ``/_sim/`` control API
* :mod:`.httputil`   JSON response/request helpers
* :mod:`.runner`     bind / start / stop
* :mod:`.cli`        ``python -m gateway.simulator`` and ``manage.py simulate_upstream``

No Django imports anywhere in this package: it runs standalone. It shares with the gateway only
modules that need no Django settings: the rate-limit windows (:mod:`gateway.balancer.windows`),
the token counter (:mod:`gateway.proxy.tokens`) and its offline encodings
(:mod:`gateway.proxy.encodings`).
"""

from .config import AzureADConfig, ConfigError, DeploymentConfig, SimConfig, load_config

__all__ = ["AzureADConfig", "ConfigError", "DeploymentConfig", "SimConfig", "load_config"]
