"""The Celery app, created when Django starts (``GatewayConfig.ready``).

With Redis (``REDIS_URL`` or ``CELERY_BROKER_URL``) a worker and beat run beside the gateway:
``celery -A gateway.celery worker`` and ``celery -A gateway.celery beat``. Without a broker,
tasks called with ``.delay()`` run eagerly in process (``CELERY_TASK_ALWAYS_EAGER``) and the beat
schedule runs on a timer in process (``gateway.scheduler``). The schedule is in the settings.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")

app = Celery("gateway")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
