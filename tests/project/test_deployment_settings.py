"""What an operator relies on: `check --deploy` refuses published keys, HTTPS settings and trusted
proxies come from the environment, and the compose file and image keep their promises."""

from __future__ import annotations

import io
import re
from ipaddress import ip_network
from pathlib import Path

import pytest
import yaml
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from gateway import settings as gateway_settings
from gateway.system_checks import COMPOSE_DEFAULT_SECRET_KEY, check_secret_key, check_trusted_proxies
from tests.project.fresh_settings import settings_under

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- check --deploy ------------------------------------------------------------------------------


def test_the_check_knows_the_compose_files_default_key():
    value = compose()["x-gateway-env"]["SECRET_KEY"]
    assert re.fullmatch(r"\$\{SECRET_KEY:-(.+)\}", value).group(1) == COMPOSE_DEFAULT_SECRET_KEY


@pytest.mark.parametrize("key", [COMPOSE_DEFAULT_SECRET_KEY, gateway_settings.INSECURE_DEFAULT_SECRET_KEY])
def test_check_deploy_fails_on_a_published_secret_key(settings, key):
    settings.DEBUG, settings.SECRET_KEY = False, key
    with pytest.raises(SystemCheckError, match=r"gateway\.E010"):
        call_command("check", deploy=True, stdout=io.StringIO())


def test_check_deploy_passes_a_real_key(settings):
    settings.DEBUG, settings.SECRET_KEY = False, "k9Q2-" + "x7Lm" * 15
    call_command("check", deploy=True, stdout=io.StringIO())
    assert check_secret_key(None) == []


def test_a_published_key_is_fine_while_debugging(settings):
    settings.DEBUG, settings.SECRET_KEY = True, COMPOSE_DEFAULT_SECRET_KEY
    assert check_secret_key(None) == []


def test_trusting_every_address_as_a_proxy_is_warned_about(settings):
    settings.GATEWAY = {**settings.GATEWAY, "TRUSTED_PROXIES": (ip_network("10.0.0.0/8"),)}
    assert check_trusted_proxies(None) == []
    settings.GATEWAY = {**settings.GATEWAY, "TRUSTED_PROXIES": (ip_network("10.0.0.0/8"), ip_network("::/0"))}
    (warning,) = check_trusted_proxies(None)
    assert warning.id == "gateway.W010" and "::/0" in warning.msg


# --- settings from the environment ---------------------------------------------------------------


def test_trusted_proxies_are_parsed_strictly(monkeypatch):
    monkeypatch.setenv("GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7,fd00::/8")
    assert gateway_settings._networks("GATEWAY_TRUSTED_PROXIES") == (
        ip_network("10.0.0.0/8"),
        ip_network("192.168.1.7/32"),
        ip_network("fd00::/8"),
    )
    monkeypatch.setenv("GATEWAY_TRUSTED_PROXIES", "10.0.0.1/8")  # host bits set: a typo, not 10.0.0.0/8
    with pytest.raises(ImproperlyConfigured, match="GATEWAY_TRUSTED_PROXIES"):
        gateway_settings._networks("GATEWAY_TRUSTED_PROXIES")
    monkeypatch.delenv("GATEWAY_TRUSTED_PROXIES")
    assert gateway_settings._networks("GATEWAY_TRUSTED_PROXIES") == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", None),
        ("X-Forwarded-Proto", ("HTTP_X_FORWARDED_PROTO", "https")),
        ("X-Forwarded-Ssl=on", ("HTTP_X_FORWARDED_SSL", "on")),
        ("HTTP_X_FORWARDED_PROTO=https", ("HTTP_X_FORWARDED_PROTO", "https")),
    ],
)
def test_the_proxy_ssl_header_is_read_as_a_header_name(monkeypatch, value, expected):
    monkeypatch.setenv("SECURE_PROXY_SSL_HEADER", value)
    assert gateway_settings._proxy_ssl_header("SECURE_PROXY_SSL_HEADER") == expected


NAMES = (
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_PROXY_SSL_HEADER",
)


def settings_in_a_fresh_process(**environ: str) -> dict:
    s = settings_under(environ, unset=NAMES)
    return {n: s[n] for n in NAMES} | {"TRUSTED_PROXIES": [str(n) for n in s["GATEWAY"]["TRUSTED_PROXIES"]]}


def test_https_settings_default_off_and_come_from_the_environment():
    assert settings_in_a_fresh_process(GATEWAY_TRUSTED_PROXIES="") == {
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_SSL_REDIRECT": False,
        "SECURE_HSTS_SECONDS": 0,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": False,
        "SECURE_PROXY_SSL_HEADER": None,
        "TRUSTED_PROXIES": [],
    }
    assert settings_in_a_fresh_process(
        SESSION_COOKIE_SECURE="true",
        CSRF_COOKIE_SECURE="true",
        SECURE_SSL_REDIRECT="true",
        SECURE_HSTS_SECONDS="31536000",
        SECURE_HSTS_INCLUDE_SUBDOMAINS="true",
        SECURE_HSTS_PRELOAD="true",
        SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        GATEWAY_TRUSTED_PROXIES="10.0.0.0/8",
    ) == {
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": True,
        "SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https"),
        "TRUSTED_PROXIES": ["10.0.0.0/8"],
    }


# --- the image and the compose file --------------------------------------------------------------


def test_the_image_leaves_dot_env_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored


def test_the_image_runs_uvicorn_without_its_own_proxy_headers():
    cmd = re.search(r"^CMD (.+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert "--no-proxy-headers" in cmd and "--forwarded-allow-ips" not in cmd


def test_every_long_running_compose_service_has_a_health_check():
    services = compose()["services"]
    for name in ("postgres", "redis", "worker", "beat"):
        assert "healthcheck" in services[name], name
    # The gateway's is the image's HEALTHCHECK; the worker and beat share the image, so theirs
    # must replace it (they serve no HTTP).
    assert "inspect ping --destination celery@" in " ".join(services["worker"]["healthcheck"]["test"])
    # Beat answers pings only with remote control on (and stops answering when its loop stalls).
    assert "inspect ping --destination celerybeat@" in " ".join(services["beat"]["healthcheck"]["test"])
    assert "--enable-remote-control" in services["beat"]["command"]


def test_compose_waits_longer_than_the_gateways_shutdown_grace():
    assert compose()["services"]["gateway"]["stop_grace_period"] == "45s"  # grace 30 s + the flush (10 s) + margin


# --- one Redis database shared ------------------------------------------------------------------


def test_every_redis_key_of_an_installation_is_under_its_prefix(settings):
    """Two installations (or a test suite's workers) on one Redis database must not meet: the cache
    and the config-version mirror live under the prefix beside the balancer's and quotas' keys."""
    from gateway.snapshot.version import VersionMirror

    configured = settings_under({"REDIS_URL": "redis://127.0.0.1:6379/3", "GATEWAY_BALANCER_REDIS_PREFIX": "staging"})
    assert configured["CACHES"]["default"]["KEY_PREFIX"] == "staging:cache"
    assert configured["GATEWAY"]["BALANCER_REDIS_PREFIX"] == "staging"

    settings.GATEWAY = {**settings.GATEWAY, "BALANCER_REDIS_PREFIX": "staging"}
    assert VersionMirror(client=None).key == "staging:config-version"


# --- Redis Cluster ---------------------------------------------------------------------------------


def test_a_cluster_url_keeps_the_cache_the_channel_layer_and_celery_off_the_cluster():
    """Django's Redis cache, the channel layer and Celery's broker cannot use a Redis Cluster: on a
    ``redis+cluster://`` URL they take GATEWAY_CACHE_REDIS_URL, else stay in process."""
    unset = ("CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER", "GATEWAY_CACHE_REDIS_URL")
    alone = settings_under({"REDIS_URL": "redis+cluster://10.0.0.5:7000"}, unset=unset)
    assert alone["REDIS_CLUSTER"] and alone["CACHE_REDIS_URL"] is None
    assert alone["CACHES"]["default"]["BACKEND"].endswith("LocMemCache")
    assert alone["CHANNEL_LAYERS"]["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"
    assert (alone["CELERY_BROKER_URL"], alone["CELERY_TASK_ALWAYS_EAGER"]) == ("memory://", True)

    beside = settings_under(
        {"REDIS_URL": "rediss+cluster://10.0.0.5:7000", "GATEWAY_CACHE_REDIS_URL": "redis://10.0.0.6:6379/0"},
        unset=unset,
    )
    assert beside["CACHES"]["default"]["LOCATION"] == "redis://10.0.0.6:6379/0"
    assert (beside["CELERY_BROKER_URL"], beside["CELERY_TASK_ALWAYS_EAGER"]) == ("redis://10.0.0.6:6379/0", False)

    plain = settings_under({"REDIS_URL": "redis://10.0.0.6:6379/2"}, unset=unset)
    assert not plain["REDIS_CLUSTER"] and plain["CACHES"]["default"]["LOCATION"] == "redis://10.0.0.6:6379/2"


def test_a_cluster_url_builds_cluster_clients_with_bounded_waits(redis_cluster):
    import redis.asyncio.cluster
    import redis.cluster

    from gateway.redis_clients import (
        is_cluster_client,
        is_cluster_url,
        plain_url,
        redis_async_client,
        redis_sync_client,
    )

    assert is_cluster_url("redis+cluster://h:7000") and is_cluster_url("REDISS+CLUSTER://h:7000")
    assert not is_cluster_url("redis://h:6379/0") and not is_cluster_url(None)
    assert plain_url("rediss+cluster://u:p@h:7000") == "rediss://u:p@h:7000"
    asynchronous = redis_async_client(redis_cluster.url, timeout=0.25)
    assert isinstance(asynchronous, redis.asyncio.cluster.RedisCluster) and is_cluster_client(asynchronous)
    assert asynchronous.connection_kwargs["socket_timeout"] == 0.25
    assert asynchronous.connection_kwargs["max_connections"] == 10_000  # redis-py's 100 fails bursts
    assert not is_cluster_client(redis_async_client("redis://127.0.0.1:1/0", timeout=0.25))
    blocking = redis_sync_client(redis_cluster.url, timeout=0.25)  # (connects at once)
    try:
        assert isinstance(blocking, redis.cluster.RedisCluster) and is_cluster_client(blocking)
        assert len(blocking.get_primaries()) == 3
    finally:
        blocking.close()
