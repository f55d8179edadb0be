"""Observability settings from the environment, the deploy check for an open /metrics, and what the
image promises about the multiprocess metrics directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.system_checks import check_metrics_guard
from tests.project.fresh_settings import settings_under

ROOT = Path(__file__).resolve().parents[2]


def in_a_fresh_process(code: str, **environ: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_LOG", "GATEWAY_METRICS", "GATEWAY_REQ"))}
    env.update(DJANGO_SETTINGS_MODULE="gateway.settings", **environ)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_json_logs_are_a_setting_and_text_the_default():
    code = (
        "import django, logging; django.setup(); "
        "logging.getLogger('gateway.request').info('hello %s', 'there'); "
        "logging.getLogger().handlers[0].flush()"
    )
    text = in_a_fresh_process(code)
    assert text.returncode == 0, text.stderr
    assert text.stderr.strip().endswith("INFO gateway.request hello there")
    as_json = in_a_fresh_process(code, GATEWAY_LOG_FORMAT="json")
    line = json.loads(as_json.stderr.strip().splitlines()[-1])
    assert (line["level"], line["logger"], line["message"]) == ("INFO", "gateway.request", "hello there")


def test_an_unknown_log_format_is_refused_at_start():
    result = in_a_fresh_process("import django; django.setup()", GATEWAY_LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "GATEWAY_LOG_FORMAT must be text or json" in result.stderr


def test_observability_settings_come_from_the_environment():
    def observability(**environ: str) -> dict:
        return settings_under(environ, unset_prefixes=("GATEWAY_LOG", "GATEWAY_METRICS", "GATEWAY_REQ"))[
            "OBSERVABILITY"
        ]

    defaults = observability()
    assert defaults == {
        "METRICS": True,
        "METRICS_TOKEN": "",
        "METRICS_PORT": 0,
        "METRICS_HOST": "0.0.0.0",
        "METRICS_TENANT_LABEL": False,
        "REQUEST_LOG_LEVEL": "INFO",
    }
    given = observability(
        GATEWAY_METRICS="false",
        GATEWAY_METRICS_TOKEN="t0ken",
        GATEWAY_METRICS_PORT="9464",
        GATEWAY_METRICS_TENANT_LABEL="true",
        GATEWAY_REQUEST_LOG_LEVEL="off",
    )
    assert given | {"METRICS_HOST": "0.0.0.0"} == {
        "METRICS": False,
        "METRICS_TOKEN": "t0ken",
        "METRICS_PORT": 9464,
        "METRICS_HOST": "0.0.0.0",
        "METRICS_TENANT_LABEL": True,
        "REQUEST_LOG_LEVEL": "off",
    }


@pytest.mark.parametrize(
    ("token", "port", "warned"), [("", 0, True), ("t0ken", 0, False), ("", 9464, False), ("t0ken", 9464, False)]
)
def test_check_deploy_warns_about_metrics_anyone_can_read(settings, token, port, warned):
    settings.OBSERVABILITY = {**settings.OBSERVABILITY, "METRICS_TOKEN": token, "METRICS_PORT": port}
    warnings = check_metrics_guard(None)
    assert [w.id for w in warnings] == (["gateway.W011"] if warned else [])


def test_metrics_off_need_no_guard(settings):
    settings.OBSERVABILITY = {**settings.OBSERVABILITY, "METRICS": False, "METRICS_TOKEN": "", "METRICS_PORT": 0}
    assert check_metrics_guard(None) == []


def image_start(tmp_path: Path, multiproc_dir: str) -> str:
    """The image's CMD run by sh up to uvicorn (migrate and uvicorn replaced by echo)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    script = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.MULTILINE).group(1))[2]
    script = script.replace("python manage.py migrate --noinput", "echo migrated").replace(
        "exec uvicorn", "echo uvicorn"
    )
    env = {
        "PATH": os.environ["PATH"],
        "PROMETHEUS_MULTIPROC_DIR": multiproc_dir,
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": "30",
    }
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=True).stdout


def test_the_image_empties_the_multiprocess_metrics_directory_before_its_workers_start(tmp_path):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ENV PROMETHEUS_MULTIPROC_DIR=/\S+$", dockerfile, re.MULTILINE)
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"an earlier run")
    (directory / "keep.txt").write_text("not ours")
    out = image_start(tmp_path, str(directory))
    assert out.split() == ["migrated", "uvicorn", *out.split()[2:]]
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]
    # Missing: made. Empty (one process, no multiprocess mode): nothing to do, and uvicorn starts.
    assert "uvicorn" in image_start(tmp_path, str(tmp_path / "new"))
    assert (tmp_path / "new").is_dir()
    assert "uvicorn" in image_start(tmp_path, "")
