"""`make run`: the simulated upstream and the gateway (daphne) side by side, with instructions.

Run after `manage.py seed_demo`. The demo key lives in var/demo-key (mode 600) so that it can be
printed on every run of the demo; real keys are shown once and never stored.

Without a Celery broker (the embedded defaults) this process also runs the beat schedule on a
timer (``gateway.scheduler``): roll-ups, statements and the purge, so the dashboards fill.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIM_CONFIG = ROOT / "gateway" / "simulator" / "demo.yaml"

SNIPPET = """
LLM gateway demo: http://{host}:{port}   (admin: http://{host}:{port}/admin/, create a login with
  .venv/bin/python manage.py createsuperuser)
Simulated upstream: http://127.0.0.1:{sim_port}   (stats: /_sim/stats)
Demo key: {key}

  from openai import OpenAI
  client = OpenAI(base_url="http://{host}:{port}/v1", api_key="{key}")
  reply = client.chat.completions.create(model="gpt-4o", messages=[{{"role": "user", "content": "Hello"}}])
  print(reply.choices[0].message.content)

  from openai import AzureOpenAI
  azure = AzureOpenAI(azure_endpoint="http://{host}:{port}", api_key="{key}", api_version="2024-10-21")
  for chunk in azure.chat.completions.create(model="gpt-4o", stream=True,
                                             messages=[{{"role": "user", "content": "Hello"}}]):
      print(chunk.choices[0].delta.content if chunk.choices else "", end="")

Dashboards: http://{host}:{port}/admin/overview/ (staff) and http://{host}:{port}/team/ (members).
{schedule}
Ctrl-C stops everything.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--sim-port", type=int, default=9100)
    args = parser.parse_args()

    python = sys.executable
    sim = subprocess.Popen(
        [
            python,
            "-m",
            "gateway.simulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.sim_port),
            "--config",
            str(SIM_CONFIG),
        ],
        cwd=ROOT,
    )
    time.sleep(0.5)
    scheduler = start_schedule()
    schedule = (
        "Roll-ups, statements and the purge run on their schedule in this process (no Celery broker)."
        if scheduler is not None
        else "A Celery broker is configured: run a worker and beat for roll-ups and statements."
    )
    key_file = ROOT / "var" / "demo-key"
    key = key_file.read_text().strip() if key_file.exists() else "(see `manage.py issue_key demo --name NAME`)"
    print(
        SNIPPET.format(host=args.host, port=args.port, sim_port=args.sim_port, key=key, schedule=schedule), flush=True
    )
    gateway = subprocess.Popen(
        [python, "-m", "daphne", "-b", args.host, "-p", str(args.port), "gateway.asgi:application"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "gateway.settings"},
    )
    try:
        return gateway.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if scheduler is not None:
            scheduler.stop(timeout=10)
        for process in (gateway, sim):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (gateway, sim):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def start_schedule():
    """The beat schedule on a timer in this process, unless a Celery broker is configured."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    import django

    django.setup()
    from gateway.scheduler import EmbeddedScheduler, broker_configured

    return None if broker_configured() else EmbeddedScheduler().start()


if __name__ == "__main__":
    sys.exit(main())
