"""The declarative configuration file: endpoints, deployments, tenants and prices as YAML.

``schema`` describes the file, ``loader`` reads and checks it, ``apply`` plans and writes it,
``export`` writes the database back out. The management commands ``gateway_apply`` and
``gateway_export`` are thin shells over these.
"""

from gateway.configfile.loader import ConfigError, config_load, config_parse

__all__ = ["ConfigError", "config_load", "config_parse"]
