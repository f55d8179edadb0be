"""Capacity accounting that matches the upstream's count (issue 18), end to end.

Two TPM-bound deployments whose simulated upstream charges, on arrival, by a rule that is not the
gateway's count: ``a`` charges characters / 4 x 1.5 (above tiktoken for English and code, below it
for CJK), ``b`` tiktoken x 0.8 (below the gateway's count: reserving by the count alone would leave
a fifth of it unused). The gateway is configured as a user would (default ``token_estimate``, the
limits the upstream enforces) and must learn each deployment's charge from the upstream's
remaining-tokens figures and 429s (``gateway.balancer.calibration``).

Load: a mix of English, code, CJK and long-word prompts, ``max_tokens`` 16..1000, every other
request streamed, at twice the combined capacity for three simulated minutes (3 s minutes: 9 s);
a request that cannot be served within a minute is refused by the gateway (429 queue timeout).
Held: 0 upstream 429s after the first minute; the upstream's own charge for what the gateway sent
in minutes 2 and 3 at least 90 % of the deployments' combined TPM over those minutes.
"""

from __future__ import annotations

import time

import httpx
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from billing.models import UsageRecord
from tests.e2e.balancing import MINUTE, SIM_KEY, Shot
from tests.e2e.calibration_load import gateway_estimate, mixed_bodies, run_load_probing, upstream_charge

pytestmark = pytest.mark.django_db(transaction=True)

RPM = 6000  # not binding: tokens are
TPM = 16_000
RULES = {"a": ("characters", 1.5), "b": ("tiktoken", 0.8)}
MINUTES = 3


def _sim_deployments() -> list[dict]:
    return [
        {"name": name, "rpm": RPM, "tpm": TPM, "arrival_count": count, "arrival_factor": factor}
        for name, (count, factor) in RULES.items()
    ]


def _shots(secret: str, urls: list[str] | None = None) -> list[Shot]:
    """Twice the combined capacity (in the upstream's charge) for ``MINUTES`` minutes."""
    bodies = mixed_bodies(400)
    mean_charge = sum(upstream_charge(b, *RULES["a"]) + upstream_charge(b, *RULES["b"]) for b in bodies) / (
        2 * len(bodies)
    )
    rate = 2 * len(RULES) * TPM / mean_charge / MINUTE
    n = int(rate * MINUTES * MINUTE)
    assert n <= len(bodies)
    return [Shot(i / rate, secret, bodies[i], tag=str(i), url=urls[i % len(urls)] if urls else None) for i in range(n)]


def _records(count: int, timeout: float = 10.0) -> list[UsageRecord]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and UsageRecord.objects.count() < count:
        time.sleep(0.05)
    return list(UsageRecord.objects.all())


def _check(
    results,
    stats_after_first_minute,
    stats_end,
    label: str,
    other_429s: int = 0,
    min_share: float = 0.9,
    max_429_share: float = 0.0,
) -> dict:
    """The issue's "Done when" figures; returns them for the report. ``min_share``: of the
    combined TPM over minutes 2-3 (less when another client takes part of it);
    ``max_429_share``: upstream 429s after the first minute, per request served."""
    refused = [(r.status, r.error) for r in results if r.status != 200]
    # The gateway refuses what it cannot serve within the queue timeout; nothing else may fail.
    assert all(status == 429 and "rate_limit" in error for status, error in refused), refused[:5]
    first = {n: stats_after_first_minute["deployments"][n]["rate_limited"] for n in RULES}
    total = {n: stats_end["deployments"][n]["rate_limited"] for n in RULES}
    later = sum(total.values()) - sum(first.values()) - other_429s
    records = {r.request_id: r for r in _records(len(results))}
    t0 = results.wall0
    start, end = t0 + MINUTE, t0 + MINUTES * MINUTE
    charged = 0
    for r in results:
        record = records.get(r.request_id)
        if r.status != 200 or record is None:
            continue
        sent = record.started_at.timestamp() + record.queue_wait_ms / 1000.0
        if start <= sent < end:
            charged += upstream_charge(r.shot.body, *RULES[record.deployment_name])
    share = charged / ((MINUTES - 1) * len(RULES) * TPM)
    figures = {
        "upstream_429_first_minute": sum(first.values()),
        "upstream_429_after": later,
        "served_share": round(share, 3),
        "served": sum(1 for r in results if r.status == 200),
        "offered": len(results),
    }
    print(f"\n{label}: {figures}")
    assert later <= max_429_share * figures["served"], (
        f"{later} upstream 429s after the first minute: {first} then {total}"
    )
    assert share >= min_share, f"served {share:.1%} of the combined TPM in minutes 2-{MINUTES}"
    return figures


def staff_cookie() -> dict[str, str]:
    user = User.objects.filter(username="ops").first() or User.objects.create_user(
        "ops", password="x-very-long-password", is_staff=True
    )
    client = Client()
    client.force_login(user)
    return {"sessionid": client.cookies["sessionid"].value}


def _factors(url: str) -> dict[str, float]:
    data = httpx.get(url + "/api/status/deployments", cookies=staff_cookie(), trust_env=False).json()
    return {d["name"]: d["calibration"]["factor"] for d in data["deployments"]}


def _expected_factor(bodies, name: str) -> float:
    return sum(upstream_charge(b, *RULES[name]) for b in bodies) / sum(gateway_estimate(b) for b in bodies)


def test_tpm_bound_deployments_charged_by_another_estimate_draw_no_429s_after_the_first_minute(
    backend, knobs, start_sim, deploy, tenant_key, start_gateway
):
    sim = start_sim(_sim_deployments())
    deploy(sim, [{"name": n, "rpm": RPM, "tpm": TPM} for n in RULES])
    secret = tenant_key("calibrate")
    knobs(QUEUE_TIMEOUT_SECONDS=MINUTE)
    gateway = start_gateway()
    shots = _shots(secret)
    results, seen = run_load_probing(shots, gateway.url, {MINUTE: sim.stats, MINUTES * MINUTE: sim.stats})
    factors = _factors(gateway.url)
    print(f"\nlearned factors: {factors}")
    _check(results, seen[MINUTE], sim.stats(), f"one process ({backend})")
    # The learned factors are on the status API, close to the ratio of the mix's charges.
    bodies = [s.body for s in shots]
    for name in RULES:
        assert factors[name] == pytest.approx(_expected_factor(bodies, name), rel=0.1), factors


@pytest.mark.skipif(not settings.REDIS_URL, reason="two gateway processes share their state through Redis only")
def test_two_processes_over_redis_learn_one_factor_and_draw_no_429s_after_the_first_minute(
    start_sim, deploy, tenant_key, start_process_gateway, balancer_prefix
):
    sim = start_sim(_sim_deployments())
    deploy(sim, [{"name": n, "rpm": RPM, "tpm": TPM} for n in RULES])
    secret = tenant_key("calibrate2")
    env = {
        "GATEWAY_WINDOW_MINUTE_SECONDS": str(MINUTE),
        "GATEWAY_BALANCER_REDIS_PREFIX": balancer_prefix,
        "GATEWAY_QUEUE_TIMEOUT_SECONDS": str(MINUTE),
        "GATEWAY_SNAPSHOT_POLL_SECONDS": "0.05",
        "GATEWAY_USAGE_FLUSH_SECONDS": "0.05",
        "LOG_LEVEL": "WARNING",
    }
    first, second = start_process_gateway(env), start_process_gateway(env)
    shots = _shots(secret, [first.url, second.url])
    results, seen = run_load_probing(shots, first.url, {MINUTE: sim.stats})
    one, two = _factors(first.url), _factors(second.url)
    print(f"\nlearned factors: {one} / {two}")
    _check(results, seen[MINUTE], sim.stats(), "two processes (redis)")
    bodies = [s.body for s in shots]
    for name in RULES:
        # Two processes learn a little high (by up to ~10 %: the other's reservations are
        # interpolated between publications 50 ms apart, and the spread margin grows with that noise).
        assert one[name] == pytest.approx(_expected_factor(bodies, name) * 1.05, rel=0.12), (one, two)
        assert one[name] == pytest.approx(two[name], abs=0.05), (one, two)


def test_another_client_eating_part_of_the_tpm_causes_no_429_storm(
    backend, knobs, start_sim, deploy, tenant_key, start_gateway
):
    """A client outside the gateway sends ~30 % of deployment ``a``'s TPM straight to the upstream,
    in lumps of ~1,400 tokens. The gateway, offered twice the capacity, must leave that room: no
    429 storm after the first minute, at most 3 % of its requests answered 429 (measured: 0-2 of
    ~140; without the calibration, 54). The other client's own 429s, when the window is full, are
    its business and counted apart; a lump landing just before the gateway's request that fills
    the window is what the gateway cannot foresee."""
    sim = start_sim(_sim_deployments())
    deploy(sim, [{"name": n, "rpm": RPM, "tpm": TPM} for n in RULES])
    secret = tenant_key("shared")
    knobs(QUEUE_TIMEOUT_SECONDS=MINUTE)
    gateway = start_gateway()
    outside = {"sent": 0, "refused": 0}
    body = {"messages": [{"role": "user", "content": "status report " * 60}], "max_tokens": 300}
    per_request = upstream_charge(body, *RULES["a"])
    interval = MINUTE * per_request / (0.3 * TPM)

    import threading

    stop = threading.Event()

    def other_client() -> None:
        url = f"{sim.url}/openai/deployments/a/chat/completions?api-version=2024-10-21"
        with httpx.Client(trust_env=False, headers={"api-key": SIM_KEY}) as http:
            next_at = time.monotonic()
            while not stop.is_set():
                response = http.post(url, json=body)
                outside["sent"] += 1
                outside["refused"] += response.status_code == 429
                next_at += interval
                stop.wait(max(next_at - time.monotonic(), 0.0))

    thread = threading.Thread(target=other_client, daemon=True)
    thread.start()
    try:
        first_minute: dict = {}

        def probe() -> dict:
            first_minute["outside_refused"] = outside["refused"]
            return sim.stats()

        results, seen = run_load_probing(_shots(secret), gateway.url, {MINUTE: probe})
    finally:
        stop.set()
        thread.join(timeout=5)
    other_429s_after = outside["refused"] - first_minute["outside_refused"]
    # The other client holds up to 15 % of the combined TPM: the gateway's share is measured
    # against the whole, so at most ~85 % is reachable.
    figures = _check(
        results,
        seen[MINUTE],
        sim.stats(),
        f"other client ({backend})",
        other_429s=other_429s_after,
        min_share=0.75,
        max_429_share=0.03,
    )
    print(f"other client: {outside}, its 429s after the first minute: {other_429s_after}; {figures}")
    factors = _factors(gateway.url)
    # The factor of ``a`` carries the other client's share on top of the upstream's rule.
    assert factors["a"] > _expected_factor([s.body for s in _shots(secret)], "a") * 1.1, factors
