"""The simulator as a process: the test helper, the CLI and the management command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes.simulator import start_simulator_process

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e  # every test here starts the simulator as a subprocess


def test_process_helper_serves_and_stops():
    config = {"api_key": "k", "deployments": [{"name": "gpt-4o", "completion_tokens": 2}]}
    sim = start_simulator_process(config, cpus=[0])
    try:
        assert sim.url.startswith("http://127.0.0.1:")
        assert os.sched_getaffinity(sim.pid) == {0}
        with httpx.Client(trust_env=False) as client:
            response = client.post(
                sim.url + "/v1/chat/completions",
                headers={"Authorization": "Bearer k"},
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 "
        assert sim.deployment_stats("gpt-4o")["served"] == 1
        sim.configure("gpt-4o", completion_tokens=1)
        assert sim.config()["deployments"][0]["completion_tokens"] == 1
    finally:
        sim.stop()
    assert sim.process.returncode == 0  # SIGTERM is a clean shutdown


def _run_until_banner(command: list[str], timeout: float = 20.0) -> tuple[str, int]:
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()  # the one start-up line (or the error)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=timeout)
        return line + rest, process.returncode
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_banner_and_config_errors(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("deployments:\n  - {name: a}\n  - {name: b}\n")
    output, code = _run_until_banner(
        [sys.executable, "-m", "gateway.simulator", "--port", "0", "--config", str(config), "--minute-seconds", "6"]
    )
    assert code == 0, output
    assert output.startswith("simulated upstream listening on http://127.0.0.1:")
    assert output.splitlines()[0].endswith("(2 deployments)")

    config.write_text("deployments:\n  - {name: a, rmp: 5}\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.simulator", "--port", "0", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown key deployments[0].rmp" in result.stderr


def test_management_command(tmp_path):
    started = time.monotonic()
    output, code = _run_until_banner(
        [sys.executable, "manage.py", "simulate_upstream", "--port", "0", "--api-key", "k", "--auto-deployments"]
    )
    ours = ("gateway/simulator" in output) or ("simulate_upstream.py" in output)
    if "simulated upstream listening" not in output and not ours:
        # manage.py loads the whole project; a half-built app elsewhere must not fail us.
        pytest.skip(f"Django project not loadable (outside the simulator): {output[-500:]}")
    assert code == 0, output
    assert output.startswith("simulated upstream listening on http://127.0.0.1:"), output
    assert time.monotonic() - started < 15


def test_simulator_imports_without_django_settings():
    """The simulator counts prompts with the gateway's token counter; importing it must not need
    (nor load) Django."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = (
        "import sys, gateway.simulator.server, gateway.simulator.cli; "
        "loaded = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.')); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
