"""The gateway project: settings, ASGI routing, the Celery app and the request path."""
