"""Workers by default: one per core the container may use, several only with Redis, refused loudly
otherwise (``gateway/workers.py``, the image's start command, the E020 check, the runtime)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import workers
from gateway.proxy.runtime import refuse_several_workers_without_redis
from gateway.system_checks import check_workers_share_state

ROOT = Path(__file__).resolve().parents[2]


def test_one_worker_per_core_with_redis_and_one_without():
    assert workers.worker_count({"REDIS_URL": "redis://r:6379/0"}, cpus=8)[0] == 8
    count, why = workers.worker_count({}, cpus=8)
    assert count == 1
    assert "REDIS_URL is not set" in why and "8 here" in why


def test_web_concurrency_chooses_and_more_than_one_without_redis_is_refused():
    assert workers.worker_count({"WEB_CONCURRENCY": "3", "REDIS_URL": "redis://r"}, cpus=8)[0] == 3
    assert workers.worker_count({"WEB_CONCURRENCY": "1"}, cpus=8)[0] == 1
    with pytest.raises(workers.WorkersRefused, match=r"REDIS_URL is not set.*up to 3 times each deployment's limits"):
        workers.worker_count({"WEB_CONCURRENCY": "3"}, cpus=8)
    with pytest.raises(workers.WorkersRefused, match="whole number"):
        workers.worker_count({"WEB_CONCURRENCY": "many", "REDIS_URL": "redis://r"})


@pytest.mark.parametrize(
    ("command", "asked"),
    [
        ("python -m uvicorn gateway.asgi:application --workers 4 --port 8000", 4),
        ("uvicorn gateway.asgi:application --workers=2", 2),
        ("gunicorn -w 3 -k uvicorn.workers.UvicornWorker gateway.asgi:application", 3),
        ("uvicorn gateway.asgi:application --port 8000", None),
        ("bash", None),
    ],
)
def test_a_workers_option_on_the_servers_command_line_counts(command: str, asked: int | None):
    assert workers.asked_workers({}, command) == asked


def test_the_cores_are_the_affinity_capped_by_the_containers_quota(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker run --cpus=1.5
    assert workers.available_cpus(tmp_path) == min(2, workers.available_cpus(tmp_path / "none"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert workers.available_cpus(tmp_path) == workers.available_cpus(tmp_path / "none") >= 1


def test_the_start_command_prints_the_count_or_refuses_with_the_reason():
    def run(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gateway.workers"], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    ok = run({"REDIS_URL": "redis://r:6379/0", "WEB_CONCURRENCY": "2"})
    assert (ok.returncode, ok.stdout) == (0, "2\n")
    refused = run({"WEB_CONCURRENCY": "2"})
    assert refused.returncode == 2 and refused.stdout == ""
    assert "refusing to start" in refused.stderr and "REDIS_URL" in refused.stderr


def test_the_check_that_migrate_runs_refuses_several_workers_without_redis(settings, monkeypatch):
    settings.REDIS_URL = ""
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    [error] = check_workers_share_state(None)
    assert error.id == "gateway.E020" and "REDIS_URL is not set" in error.msg
    settings.REDIS_URL = "redis://r:6379/0"
    assert check_workers_share_state(None) == []


def test_each_process_refuses_to_start_as_one_of_several_without_redis(settings, monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    settings.REDIS_URL = ""
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    with pytest.raises(ImproperlyConfigured, match="2 worker processes"):
        refuse_several_workers_without_redis()
    monkeypatch.delenv("WEB_CONCURRENCY")
    monkeypatch.setattr(workers, "server_command_line", lambda: "uvicorn gateway.asgi:application --workers 3")
    with pytest.raises(ImproperlyConfigured, match="3 worker processes"):
        refuse_several_workers_without_redis()
    settings.REDIS_URL = "redis://r:6379/0"
    refuse_several_workers_without_redis()


def test_the_image_runs_the_workers_the_start_command_decides():
    cmd = re.search(r"^CMD (.+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert "WEB_CONCURRENCY=$(python -m gateway.workers) && export WEB_CONCURRENCY" in cmd
    assert "--workers ${WEB_CONCURRENCY}" in cmd
    assert cmd.index("migrate") < cmd.index("gateway.workers") < cmd.index("exec uvicorn")
