"""The capacity-aware balancer end to end: client -> gateway -> a simulated upstream that
enforces its own RPM/TPM windows (the same windows as the gateway's, from ``gateway.balancer.windows``).

Every test runs against both balancer backends: the in-process one always, Redis when REDIS_URL
is set (a unique key prefix per test). Both sides use a 3-second "minute", so the request
windows are 0.05 s, 0.5 s and 3 s and the token window 3 s. Most requests are the same small
chat prompt (8 tokens) plus ``max_tokens``; one burst sends prompts with images, tools and tool
calls. Both sides count prompts with the same counter (``gateway.proxy.tokens``), so what the
gateway reserves is exactly what the upstream charges on arrival, whatever the prompt holds.
"""

from __future__ import annotations

import time

import pytest

from gateway.proxy.tokens import count_prompt_tokens
from tests.e2e.balancing import (
    MINUTE,
    MODEL,
    PROMPT_TOKENS,
    Shot,
    assert_within_limits,
    chat_body,
    failures,
    median,
    run_load,
)
from tests.e2e.usage import wait_for_records
from tests.fakes.prompts import EVERYTHING_CHAT, TOOLS_AND_LOW_DETAIL_IMAGE_CHAT

pytestmark = pytest.mark.django_db(transaction=True)

RPM, TPM = 120, 12_000
PAIR = ["std-a", "std-b"]


def two_standard(start_sim, deploy, rpm=RPM, tpm=TPM):
    """Two standard deployments of one model, the gateway's limits equal to the upstream's."""
    sim = start_sim([{"name": n, "rpm": rpm, "tpm": tpm} for n in PAIR])
    deploy(sim, [{"name": n, "rpm": rpm, "tpm": tpm} for n in PAIR])
    return sim


def dispatched_at(record) -> float:
    """When the gateway sent the request upstream (wall clock): its arrival plus its queue wait."""
    return record.started_at.timestamp() + record.queue_wait_ms / 1000.0


def test_burst_within_capacity_draws_no_upstream_429(backend, knobs, start_sim, deploy, tenant_key, start_gateway):
    """60 requests of 300 tokens at once: 18,000 tokens against 2 x 12,000 per minute, and 60
    requests against 2 x 120. Azure's short windows (2 requests per 0.05 s, 20 per 0.5 s per
    deployment) forbid sending them at once; the gateway must spread them so the upstream answers
    no 429, and still serve the whole burst within the minute that has room for it."""
    sim = two_standard(start_sim, deploy)
    secret = tenant_key("burst")
    gateway = start_gateway()
    n = 60
    results = run_load([Shot(0.0, secret, chat_body(300 - PROMPT_TOKENS), tag=str(i)) for i in range(n)], gateway.url)

    assert failures(results) == []
    stats = sim.stats()["deployments"]
    for name in PAIR:
        assert stats[name]["rate_limited"] == 0, (name, stats[name])
        assert_within_limits(stats[name], RPM, TPM)
        assert stats[name]["served"] >= n // 4, f"the burst was not split between the deployments: {stats}"
    assert sum(stats[name]["served"] for name in PAIR) == n
    # Spread by the short windows (with the gateway's guard: ~20 requests/s per deployment),
    # i.e. ~1.5 s. Holding the upstream's "remaining" of its 1/60-minute window for a sixth of a
    # minute (the bug fixed in policy._observe) made this burst last 7 s.
    last = max(r.done for r in results)
    assert last < MINUTE, f"the burst took {last:.2f} s"
    records = wait_for_records(n)
    assert sum(r.retries for r in records) == 0
    assert {r.deployment_name for r in records} == set(PAIR)


# Prompts beyond plain text. Before the gateway and the simulator shared one counter, the simulator
# priced every image at 85 tokens (so it charged less than the gateway reserved for the first
# prompt) and tools and tool calls as their JSON (so it charged more for the second, and a burst
# of them drew 429s).
RICH_PROMPTS = {"images-and-tools": EVERYTHING_CHAT, "low-detail-image-and-tools": TOOLS_AND_LOW_DETAIL_IMAGE_CHAT}


@pytest.mark.e2e
@pytest.mark.parametrize("token_estimate", ["tiktoken", "fast"])
@pytest.mark.parametrize("prompt_kind", list(RICH_PROMPTS))
def test_burst_of_image_and_tool_prompts_filling_the_token_windows_draws_no_upstream_429(
    prompt_kind, token_estimate, backend, knobs, start_sim, deploy, tenant_key, start_gateway
):
    """24 chat requests at once whose prompts hold images, a tool, tool calls, a tool result and
    names, against two deployments whose TPM holds exactly 12 of them each (both sides counting
    with ``token_estimate``). The burst fills both token windows to the last token without one
    429, and the upstream charges, request for request, what the gateway reserved."""
    max_tokens = 50
    rich = RICH_PROMPTS[prompt_kind]
    body = chat_body(max_tokens, messages=rich["messages"], tools=rich["tools"])
    prompt = count_prompt_tokens("chat", body, MODEL, mode=token_estimate, family_hint=MODEL)
    demand, per_deployment = prompt + max_tokens, 12
    limits = {"rpm": RPM, "tpm": per_deployment * demand, "token_estimate": token_estimate}
    sim = start_sim([{"name": n, **limits} for n in PAIR])
    deploy(sim, [{"name": n, **limits} for n in PAIR])
    secret = tenant_key("multimodal")
    gateway = start_gateway()
    n = per_deployment * len(PAIR)
    results = run_load([Shot(0.0, secret, body, tag=str(i)) for i in range(n)], gateway.url)

    assert failures(results) == []
    stats = sim.stats()["deployments"]
    for name in PAIR:
        assert stats[name]["rate_limited"] == 0, (name, stats[name])
        assert_within_limits(stats[name], RPM, limits["tpm"])
    assert sum(stats[name]["served"] for name in PAIR) == n
    assert sum(stats[name]["tokens_counted"] for name in PAIR) == n * demand
    records = wait_for_records(n)
    assert sum(r.retries for r in records) == 0
    assert {r.prompt_tokens for r in records} == {prompt}  # the upstream's usage: the same count
    # Every request fitted the first minute, so none waited for a window to free.
    assert max(r.done for r in results) < MINUTE, max(r.done for r in results)


def test_saturation_keeps_upstream_within_limits_and_uses_capacity(
    backend, knobs, start_sim, deploy, tenant_key, start_gateway
):
    """Offered load 25 % above the combined capacity for two minutes, then the queue drains.

    Share of capacity used = U / C, where
      U = tokens of the requests the gateway sent upstream within [T0, T0 + 2 minutes), T0 being
          the moment the first request was sent and a request's send time its arrival at the
          gateway plus its queue wait (from its usage record, on the same clock); a request
          counts prompt + max_tokens = 300 tokens, exactly what the upstream's TPM window counts;
      C = 2 x 2 x 12,000 tokens: two minutes of the two deployments' TPM. The upstream's own
          windows allow at most TPM per deployment in any minute-long span, so C bounds U.
    Tokens are the binding resource (80 requests per minute fit the TPM, 240 the RPM), and the
    offered load keeps requests waiting from ~2.4 s to the end, so any unused capacity is the
    balancer's doing.
    """
    sim = two_standard(start_sim, deploy)
    secret = tenant_key("saturate")
    gateway = start_gateway()
    demand = 300
    per_minute = len(PAIR) * TPM // demand  # 80 requests fill both token windows
    rate = 1.25 * per_minute / MINUTE  # 33 requests/s
    offered = int(rate * 2 * MINUTE)  # 200 requests over two minutes (2.5 minutes of capacity)
    shots = [Shot(i / rate, secret, chat_body(demand - PROMPT_TOKENS), tag=str(i)) for i in range(offered)]
    results = run_load(shots, gateway.url)

    assert failures(results) == []
    stats = sim.stats()["deployments"]
    for name in PAIR:
        assert_within_limits(stats[name], RPM, TPM)
        assert stats[name]["rate_limited"] == 0, (name, stats[name])
    assert sum(stats[name]["served"] for name in PAIR) == offered

    records = wait_for_records(offered)
    t0, horizon = results.wall0, results.wall0 + 2 * MINUTE
    used = sum(demand for r in records if t0 <= dispatched_at(r) < horizon)
    share = used / (2 * len(PAIR) * TPM)
    assert share >= 0.9, f"used {share:.1%} of the capacity of the first two minutes"
    # Queued requests were served as capacity freed: the 40 that did not fit two minutes waited
    # for the third, and the whole run (2.5 minutes of capacity) ends soon after it starts
    # (ideal ~7.2 s; before the fix to policy._observe it took 18 s).
    waited_long = sum(1 for r in records if r.queue_wait_ms >= 1000 * MINUTE / 3)
    assert waited_long >= offered - 2 * per_minute, waited_long
    last = max(r.done for r in results)
    assert last < 3 * MINUTE + 1.5, f"the queue drained only after {last:.2f} s"
    print(
        f"\nshare of capacity used: {share:.1%}; queue drained at {last:.2f} s; "
        f"median wait {median(r.queue_wait_ms for r in records):.0f} ms"
    )


PTU_SIM = {"name": "ptu", "sku": "provisioned", "ptu_tokens_per_minute": 1_000_000}
STD_SIM = {"name": "std", "rpm": 6000, "tpm": 1_000_000}
PTU_GW = {"name": "ptu", "sku": "provisioned", "tier": 1, "max_wait_seconds": 1.0}
STD_GW = {"name": "std", "tier": 2, "rpm": 6000, "tpm": 1_000_000}


def ptu_and_standard(start_sim, deploy, tenant_key, start_gateway, fault):
    """A PTU deployment (tier 1, max wait 1 s) and a standard one (tier 2); the PTU answers
    ``fault``. One request at 0, ten more at 0.05 s (while the first one's 429 cools the PTU)."""
    sim = start_sim([PTU_SIM, STD_SIM])
    deploy(sim, [PTU_GW, STD_GW])
    secret = tenant_key("ptu")
    gateway = start_gateway()
    sim.inject("ptu", fault)
    shots = [Shot(0.0, secret, chat_body(50), tag="first")]
    shots += [Shot(0.05, secret, chat_body(50), tag=f"next-{i}") for i in range(10)]
    results = run_load(shots, gateway.url)
    assert failures(results) == []
    stats = sim.stats()["deployments"]
    records = {r.request_id: r for r in wait_for_records(len(shots))}
    return stats, results, [records[r.request_id] for r in results]


def test_ptu_429_with_long_retry_after_spills_to_standard(backend, knobs, start_sim, deploy, tenant_key, start_gateway):
    """retry-after-ms 5000 > max wait 1 s: the first request is retried on standard at once, and
    the PTU, cooling for 5 s, is not tried again; nothing waits for it."""
    stats, results, records = ptu_and_standard(
        start_sim, deploy, tenant_key, start_gateway, {"kind": "rate_limit", "retry_after_ms": 5000, "count": 1}
    )
    assert (stats["ptu"]["requests"], stats["ptu"]["rate_limited"]) == (1, 1), stats["ptu"]
    assert stats["std"]["served"] == 11 and stats["std"]["rate_limited"] == 0
    assert [r.deployment_name for r in records] == ["std"] * 11
    assert [r.retries for r in records] == [1] + [0] * 10
    # Spilled at once rather than after waiting out the PTU's 1 s allowance.
    assert max(r.latency for r in results) < 0.8, [round(r.latency, 3) for r in results]


def test_ptu_429_with_short_retry_after_waits_for_the_ptu(backend, knobs, start_sim, deploy, tenant_key, start_gateway):
    """retry-after-ms 200 < max wait 1 s: requests wait for the PTU; none goes to standard."""
    stats, results, records = ptu_and_standard(
        start_sim, deploy, tenant_key, start_gateway, {"kind": "rate_limit", "retry_after_ms": 200, "count": 1}
    )
    assert stats["std"]["requests"] == 0, stats["std"]
    assert (stats["ptu"]["served"], stats["ptu"]["rate_limited"]) == (11, 1), stats["ptu"]
    assert {r.deployment_name for r in records} == {"ptu"}
    first = records[0]
    assert first.retries == 1 and first.queue_wait_ms >= 150, (first.retries, first.queue_wait_ms)
    assert results[0].latency >= 0.18


def test_ptu_that_keeps_answering_429_spills_after_its_max_wait(
    backend, knobs, start_sim, deploy, tenant_key, start_gateway
):
    """Every PTU answer is a 429 with retry-after-ms 200: each wait alone fits the 1 s allowance,
    but the allowance is the request's, not each attempt's: after ~1 s the requests go to
    standard. (Before the fix in policy.py each retry restarted the allowance; the requests
    bounced on the PTU until the forwarder's 429 budget ran out and the clients got 429s.)"""
    stats, results, records = ptu_and_standard(
        start_sim, deploy, tenant_key, start_gateway, {"kind": "rate_limit", "retry_after_ms": 200}
    )
    assert stats["ptu"]["served"] == 0 and stats["ptu"]["rate_limited"] >= 11
    assert stats["std"]["served"] == 11
    assert {r.deployment_name for r in records} == {"std"}
    assert records[0].retries >= 1  # (a later one may spill straight from the queue, with no retry)
    latencies = [r.latency for r in results]
    # They waited for the PTU most of its allowance (a wait of 0.2 s fits it until ~0.8 s have
    # passed), and not much longer.
    assert min(latencies) >= 0.5 and max(latencies) < 1.0 + 1.5, [round(x, 3) for x in latencies]


def test_priority_zero_waits_less_than_priority_ten(backend, knobs, start_sim, deploy, tenant_key, start_gateway):
    """One deployment paced by its short request windows (~20 requests/s). 20 requests at priority
    10 arrive first, 20 at priority 0 0.3 s later: the later, urgent ones overtake those still
    waiting. (First come, first served would give priority 0 the longer waits.)"""
    sim = start_sim([{"name": "std", "rpm": RPM, "tpm": 1_000_000}])
    deploy(sim, [{"name": "std", "rpm": RPM, "tpm": 1_000_000}])
    secret = tenant_key("prio")
    gateway = start_gateway()
    shots = [Shot(0.0, secret, chat_body(20, priority=10), tag="p10") for _ in range(20)]
    shots += [Shot(0.3, secret, chat_body(20, priority=0), tag="p0") for _ in range(20)]
    results = run_load(shots, gateway.url)

    assert failures(results) == []
    assert sim.deployment_stats("std")["rate_limited"] == 0
    p0 = [r for r in results if r.shot.tag == "p0"]
    p10 = [r for r in results if r.shot.tag == "p10"]
    m0, m10 = median(r.latency for r in p0), median(r.latency for r in p10)
    assert m0 < m10 / 2, (m0, m10)
    # Those priority-10 requests still waiting when the priority-0 ones came were served after all of them.
    last_p0 = max(r.done for r in p0)
    assert sum(1 for r in p10 if r.done > last_p0) >= 8, sorted(round(r.done, 2) for r in p10)
    records = wait_for_records(len(shots))
    assert sorted({r.priority for r in records}) == [0, 10]
    waits = {p: median(r.queue_wait_ms for r in records if r.priority == p) for p in (0, 10)}
    assert waits[0] < waits[10], waits


def test_tenants_bursting_at_one_priority_share_fairly(backend, knobs, start_sim, deploy, tenant_key, start_gateway):
    """Tenant A bursts 30 requests, tenant B 10 requests 0.2 s later, same priority, on a
    deployment serving ~20 requests/s. Fair share: once B waits, the two alternate, so B is
    through long before A; first come, first served would have B wait for all of A's burst."""
    sim = start_sim([{"name": "std", "rpm": RPM, "tpm": 1_000_000}])
    deploy(sim, [{"name": "std", "rpm": RPM, "tpm": 1_000_000}])
    a, b = tenant_key("team-a"), tenant_key("team-b")
    gateway = start_gateway()
    shots = [Shot(0.0, a, chat_body(20), tag="A") for _ in range(30)]
    shots += [Shot(0.2, b, chat_body(20), tag="B") for _ in range(10)]
    results = run_load(shots, gateway.url)

    assert failures(results) == []
    assert sim.deployment_stats("std")["rate_limited"] == 0
    la = median(r.latency for r in results if r.shot.tag == "A")
    lb = median(r.latency for r in results if r.shot.tag == "B")
    assert lb < la, (lb, la)
    # Of the first 20 requests completed after B arrived, B had about half (FIFO: none).
    after = sorted((r for r in results if r.done > 0.2), key=lambda r: r.done)[:20]
    share_b = sum(1 for r in after if r.shot.tag == "B") / len(after)
    assert share_b >= 0.35, [r.shot.tag for r in after]
    # And B's last request finished well before A's.
    assert max(r.done for r in results if r.shot.tag == "B") < max(r.done for r in results if r.shot.tag == "A")
    wait_for_records(len(shots))


def test_breaker_opens_on_500s_moves_traffic_and_recovers(backend, knobs, start_sim, deploy, tenant_key, start_gateway):
    """Deployment A answers 500 until cleared. Each failure is retried on B before any byte
    reaches the client (streamed requests); after BREAKER_FAILURES (3) failures A's breaker opens
    and A gets nothing more. Once the fault is cleared and the open time is over, one probe
    succeeds and A takes its share again."""
    open_seconds = 2.0
    knobs(BREAKER_FAILURES=3, BREAKER_OPEN_SECONDS=open_seconds, MAX_RETRIES=2)
    limits = {"rpm": 6000, "tpm": 1_000_000}
    sim = start_sim([{"name": "a", **limits}, {"name": "b", **limits}])
    deploy(sim, [{"name": "a", **limits}, {"name": "b", **limits}])
    secret = tenant_key("breaker")
    gateway = start_gateway()
    sim.inject("a", {"kind": "status", "status": 500})

    def one(stream: bool):
        [result] = run_load([Shot(0.0, secret, chat_body(20, stream=stream))], gateway.url)
        assert result.status == 200, result.error
        if stream:
            assert result.payload.rstrip().endswith("data: [DONE]") and "error" not in result.payload
        return result

    # Until A has failed 3 times (the balancer alternates between the two, so a few requests).
    sent = 0
    while sim.deployment_stats("a")["errors"] < 3:
        one(stream=True)
        sent += 1
        assert sent < 40, sim.stats()
    opened = time.monotonic()
    for _ in range(10):  # while the breaker is open: all on B
        one(stream=True)
        sent += 1
    assert time.monotonic() - opened < open_seconds, "too slow to observe the open breaker"
    a, b = sim.deployment_stats("a"), sim.deployment_stats("b")
    assert (a["requests"], a["errors"], a["served"]) == (3, 3, 0), a
    assert b["served"] == sent
    records = wait_for_records(sent)
    assert sum(r.retries for r in records) == 3
    assert {r.deployment_name for r in records} == {"b"}

    sim.clear_faults("a")
    time.sleep(max(0.0, opened + open_seconds + 0.3 - time.monotonic()))
    for _ in range(10):
        one(stream=False)
    a = sim.deployment_stats("a")
    assert a["errors"] == 3 and a["served"] >= 3, a  # the probe, then its share
    wait_for_records(sent + 10)


def test_client_that_leaves_the_queue_does_not_block_the_next(
    backend, knobs, start_sim, deploy, tenant_key, start_gateway
):
    """RPM 6: one request per 0.5 s window. R0 takes it; R1 queues and its client hangs up at
    0.25 s; R2 (0.3 s) must be served when the window frees (~0.55 s), not stuck behind R1's
    ticket until its lease lapses (10 s)."""
    sim = start_sim([{"name": "std", "rpm": 6, "tpm": 1_000_000}])
    deploy(sim, [{"name": "std", "rpm": 6, "tpm": 1_000_000}])
    secret = tenant_key("leaver")
    gateway = start_gateway()
    shots = [
        Shot(0.0, secret, chat_body(20), tag="R0"),
        Shot(0.05, secret, chat_body(20), tag="R1", client_timeout=0.2),
        Shot(0.3, secret, chat_body(20), tag="R2"),
    ]
    r0, r1, r2 = run_load(shots, gateway.url)
    assert r0.status == 200 and r1.status == 0 and r2.status == 200, (r0, r1, r2)
    assert r2.latency < 2.0, r2.latency
    assert sim.deployment_stats("std")["requests"] == 2
    records = wait_for_records(3)
    assert sorted(r.outcome for r in records) == ["client_disconnect", "ok", "ok"]
