"""ASGI entry point: ``gateway.asgi:application`` for daphne, uvicorn or any ASGI server."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
# Django must be set up before anything imports models (the consumer does, indirectly).
django_application = get_asgi_application()

from gateway.proxy.application import build_application  # noqa: E402

application = build_application(django_application)
