from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gateway import system_checks  # noqa: F401  (registers system checks)
        from gateway.snapshot.version import connect_config_signals

        connect_config_signals()
