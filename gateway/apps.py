from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The Celery app is created with Django, so that shared tasks bind to it in every process
        # (the worker, beat, the embedded scheduler, a .delay() from the admin). Not in
        # gateway/__init__.py: the simulator and gateway.defaults import the package without Django.
        from gateway import celery, system_checks  # noqa: F401  (system_checks registers the checks)
        from gateway.snapshot.version import connect_config_signals

        connect_config_signals()
