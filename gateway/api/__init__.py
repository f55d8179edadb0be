"""The management REST API's shared parts: authentication, permissions, pagination, throttling.

Each app owns its serializers and views (``tenants.api``, ``billing.api``, ``gateway.api.views``);
``gateway.api.urls`` composes them under ``/api/v1/``.
"""
