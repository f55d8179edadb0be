"""Unit tests of the simulator's pure parts: windows, PTU meter, config, faults, arrival charge."""

from __future__ import annotations

import pytest

from gateway.balancer.windows import Window, request_windows, token_windows
from gateway.proxy import encodings, tokens
from gateway.simulator import arrival, generation
from gateway.simulator.config import ConfigError, DeploymentConfig, SimConfig
from gateway.simulator.faults import FaultQueue, parse_fault
from gateway.simulator.limiter import RETRY_SLACK_S, ArrivalLog, PtuMeter, StandardLimiter
from tests.fakes.prompts import EVERYTHING_CHAT, FUNCTIONS_CHAT, IMAGE_CHAT, TOOL_CALL_CHAT, TOOL_CHAT

# ---------------------------------------------------------------- sliding windows


def test_request_window_is_exactly_sliding():
    log = ArrivalLog([1.0])
    limiter = StandardLimiter(log, (Window(1.0, 2),), ())
    assert limiter.check(0.0, 0).admitted
    assert limiter.check(0.4, 0).admitted
    refused = limiter.check(0.9, 0)
    # The entry at t=0 leaves the window at t=1.0: wait 0.1 s (+ slack).
    assert not refused.admitted and refused.reason == "requests"
    assert refused.retry_after == pytest.approx(0.1 + RETRY_SLACK_S)
    assert not limiter.check(0.999, 0).admitted
    assert limiter.check(1.0, 0).admitted  # t=0 expired; t=0.4 and t=1.0 inside
    refused = limiter.check(1.2, 0)
    assert refused.retry_after == pytest.approx(0.2 + RETRY_SLACK_S)  # t=0.4 expires at 1.4


def test_rejections_consume_no_capacity():
    log = ArrivalLog([1.0])
    limiter = StandardLimiter(log, (Window(1.0, 1),), ())
    assert limiter.check(0.0, 0).admitted
    for t in (0.1, 0.5, 0.9):
        assert not limiter.check(t, 0).admitted
    assert limiter.check(1.0, 0).admitted
    assert log.peaks()[0][1.0] == 1


def test_token_window_retry_after_finds_the_blocking_entry():
    log = ArrivalLog([10.0])
    limiter = StandardLimiter(log, (), (Window(10.0, 100),))
    assert limiter.check(0.0, 30).admitted
    assert limiter.check(1.0, 30).admitted
    assert limiter.check(2.0, 30).admitted
    # 90 counted; 40 more fit once one entry is gone (90 - 30 + 40 = 100 <= 100): the t=0
    # entry leaves at t=10.
    refused = limiter.check(5.0, 40)
    assert refused.reason == "tokens"
    assert refused.retry_after == pytest.approx(5.0 + RETRY_SLACK_S)
    # 70 tokens need two entries gone (the t=1 entry leaves at 11), 71 need all three.
    assert limiter.check(5.0, 70).retry_after == pytest.approx(6.0 + RETRY_SLACK_S)
    assert limiter.check(5.0, 71).retry_after == pytest.approx(7.0 + RETRY_SLACK_S)
    assert limiter.remaining() == (None, 10)
    # More than the whole limit can never fit: refused with the window length.
    too_big = limiter.check(5.0, 101)
    assert not too_big.admitted and too_big.retry_after == pytest.approx(10.0 + RETRY_SLACK_S)


def test_blocking_window_is_the_longest_wait():
    windows = request_windows(60, minute=6.0)  # (0.1 s, 1), (1 s, 10), (6 s, 60)
    log = ArrivalLog([w.seconds for w in windows])
    limiter = StandardLimiter(log, windows, ())
    t = 0.0
    for _ in range(10):
        assert limiter.check(t, 0).admitted
        t += 0.1
    # 10 in the last second: the 1 s window blocks until the first entry (t=0) leaves.
    refused = limiter.check(t - 0.05, 0)  # t=0.95
    assert refused.retry_after == pytest.approx(0.05 + RETRY_SLACK_S)
    assert limiter.remaining() == (0, None)


def test_peaks_and_compaction_over_many_entries():
    log = ArrivalLog([1.0, 10.0])
    limiter = StandardLimiter(log, (), ())
    step = 1 / 1024  # exact in binary floating point, so window edges are exact too
    for i in range(20480):  # 1024 per second for 20 s
        limiter.check(i * step, 2)
    requests, tokens = log.peaks()
    assert requests == {1.0: 1024, 10.0: 10240}
    assert tokens == {1.0: 2048, 10.0: 20480}
    assert len(log._ts) < 20480  # compacted: only about the last 10 s are kept
    assert log.requests(1.0) == 1024 and log.tokens(10.0) == 20480


# ---------------------------------------------------------------- PTU


def test_ptu_admits_below_100_percent_then_refuses_until_drained():
    meter = PtuMeter(tokens_per_minute=1000, minute=10.0, now=0.0)  # drains 100 tokens/s
    assert meter.check(0.0, 600).admitted
    assert meter.check(0.0, 600).admitted  # 60% < 100%: admitted, now 120%
    assert meter.utilization(0.0) == pytest.approx(120.0)
    refused = meter.check(1.0, 10)  # 1100 left, 1 s to get under 1000
    assert refused.reason == "utilization"
    assert refused.retry_after == pytest.approx(1.0 + RETRY_SLACK_S)
    assert meter.check(2.0 + RETRY_SLACK_S, 10).admitted


def test_ptu_settle_corrects_to_actual_usage():
    meter = PtuMeter(tokens_per_minute=1000, minute=60.0, now=0.0)
    meter.check(0.0, 900)
    meter.settle(0.0, counted=900, actual=50)
    assert meter.utilization(0.0) == pytest.approx(5.0)
    meter.settle(0.0, counted=500, actual=0)  # never below zero
    assert meter.utilization(0.0) == 0.0


# ---------------------------------------------------------------- config and faults


def test_config_defaults_and_overrides():
    cfg = SimConfig.from_dict(
        {
            "minute_seconds": 6,
            "token_estimate": "fast",
            "defaults": {"rpm": 600},
            "deployments": [{"name": "a"}, {"name": "b", "rpm": 60, "model": "gpt-4o"}],
        }
    )
    a, b = cfg.deployments
    assert (a.rpm, a.model, a.token_estimate, a.default_max_tokens) == (600, "a", "fast", 1024)
    assert (b.rpm, b.model) == (60, "gpt-4o")
    assert cfg.minute_seconds == 6.0
    assert SimConfig.from_dict(cfg.to_dict()).deployments == cfg.deployments
    assert a.updated({"tpm": 5}).model == "a"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"apikey": "x"}, "unknown key apikey"),
        ({"deployments": [{"name": "a", "rmp": 1}]}, "unknown key deployments[0].rmp"),
        ({"defaults": {"tmp": 1}}, "unknown key defaults.tmp"),
        ({"azure_ad": {"client_id": "c", "client_secret": "s", "tennant": "t"}}, "azure_ad.tennant"),
        ({"deployments": [{"name": "a", "rpm": "many"}]}, "deployments[0].rpm"),
        ({"deployments": [{"name": "a", "sku": "premium"}]}, "deployments[0].sku"),
        ({"deployments": [{"name": "a", "sku": "provisioned"}]}, "ptu_tokens_per_minute"),
        ({"deployments": [{"name": "a"}, {"name": "a"}]}, "duplicate"),
        ({"deployments": [{"name": "a", "faults": [{"kind": "boom"}]}]}, "faults[0].kind"),
        ({"minute_seconds": 0}, "minute_seconds"),
        ({"token_estimate": "exact"}, "token_estimate: must be one of tiktoken, fast"),
        ({"deployments": [{"name": "a", "token_estimate": "rough"}]}, "deployments[0].token_estimate"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SimConfig.from_dict(data)


def test_deployment_cannot_be_renamed():
    with pytest.raises(ConfigError, match="rename"):
        DeploymentConfig(name="a").updated({"name": "b"})


def test_fault_queue_counts_and_order():
    queue = FaultQueue()
    queue.add(parse_fault({"kind": "status", "status": 503, "count": 2}))
    queue.add(parse_fault({"kind": "timeout", "seconds": 1}))
    assert queue.take(frozenset({"status"})).status == 503
    assert queue.take(frozenset({"status"})).status == 503
    assert queue.take(frozenset({"status"})) is None  # consumed
    assert queue.take(frozenset({"timeout"})).seconds == 1.0  # no count: stays
    assert queue.take(frozenset({"timeout"})) is not None
    never = FaultQueue()
    never.add(parse_fault({"kind": "probability", "status": 500, "p": 0.0}))
    assert all(never.take() is None for _ in range(100))
    with pytest.raises(ConfigError, match=r"unknown key fault\.seconds"):
        parse_fault({"kind": "status", "status": 500, "seconds": 3})


# ---------------------------------------------------------------- arrival charge and generation

# (kind, body, the simulator's model, the gateway's client-facing model and upstream_model, mode)
PARITY_CASES = {
    "chat with images": ("chat", IMAGE_CHAT, "gpt-4o-2024-08-06", "vision", "gpt-4o", "tiktoken"),
    "chat with tools": ("chat", TOOL_CHAT, "gpt-4o", "gpt-4o", "gpt-4o", "tiktoken"),
    "chat with legacy functions": ("chat", FUNCTIONS_CHAT, "gpt-35-turbo", "chat", "gpt-35-turbo", "tiktoken"),
    "chat with tool calls and names": ("chat", TOOL_CALL_CHAT, "gpt-4o", "gpt-4o", "gpt-4o", "tiktoken"),
    "everything, fast mode": ("chat", EVERYTHING_CHAT, "gpt-4o", "gpt-4o", "gpt-4o", "fast"),
    "everything, unknown model": ("chat", EVERYTHING_CHAT, "my-own-llama", "my-own-llama", "", "tiktoken"),
    "completions, token lists": (
        "completions",
        {"prompt": [[1, 2], [3, 4, 5]], "best_of": 3},
        "gpt-35-turbo-instruct",
        "instruct",
        "gpt-35-turbo-instruct",
        "tiktoken",
    ),
    "completions, strings and a suffix": (
        "completions",
        {"prompt": ["Say", "this"], "suffix": " end", "max_tokens": 5},
        "davinci-002",
        "davinci-002",
        "",
        "tiktoken",
    ),
    "embeddings, a list of strings": (
        "embeddings",
        {"input": ["alpha", "beta gamma"]},
        "text-embedding-3-small",
        "embed",
        "text-embedding-3-small",
        "tiktoken",
    ),
    "embeddings, token lists, fast mode": (
        "embeddings",
        {"input": [[1, 2], [3]]},
        "text-embedding-3-small",
        "embed",
        "",
        "fast",
    ),
}


@pytest.fixture(scope="module")
def loaded_encodings():
    encodings.warm()


@pytest.mark.parametrize(
    ("kind", "body", "sim_model", "model", "upstream_model", "mode"),
    list(PARITY_CASES.values()),
    ids=list(PARITY_CASES),
)
def test_simulator_charges_the_prompt_the_gateway_reserves(
    loaded_encodings, kind, body, sim_model, model, upstream_model, mode
):
    sim = DeploymentConfig(name="d", model=sim_model, token_estimate=mode, default_max_tokens=300)
    prompt, charged = arrival.charge(kind, body, sim)
    assert prompt == tokens.count_prompt_tokens(kind, body, model, mode=mode, family_hint=upstream_model)
    assert charged == prompt + tokens.completion_allowance(kind, body, 300)


def test_simulator_counts_images_and_tools_as_the_api_does(loaded_encodings):
    gpt_4o = DeploymentConfig(name="d", model="gpt-4o")
    assert arrival.charge("chat", TOOL_CHAT, gpt_4o)[0] == 101  # what the API reported
    assert arrival.charge("chat", TOOL_CHAT, DeploymentConfig(name="d", model="gpt-35-turbo"))[0] == 105
    assert arrival.charge("chat", FUNCTIONS_CHAT, gpt_4o)[0] == 101
    text_only = {
        "messages": [
            IMAGE_CHAT["messages"][0],
            {**IMAGE_CHAT["messages"][1], "content": "What is on these two pictures?"},
        ]
    }
    assert arrival.charge("chat", IMAGE_CHAT, gpt_4o)[0] == arrival.charge("chat", text_only, gpt_4o)[0] + 85 + 765
    # An unknown model counts with o200k, the gateway's default, not with an older encoding.
    assert (
        arrival.charge("chat", EVERYTHING_CHAT, DeploymentConfig(name="d", model="my-own-llama"))[0]
        == (arrival.charge("chat", EVERYTHING_CHAT, gpt_4o)[0])
    )
    # fast: characters / 4 rounded up per string, the same structure.
    fast = DeploymentConfig(name="d", model="gpt-4o", token_estimate="fast")
    assert arrival.charge("chat", {"messages": [{"role": "user", "content": "x" * 40}]}, fast)[0] == 3 + 3 + 1 + 10


ENGLISH = {"messages": [{"role": "user", "content": "Summarise the quarterly report for the board, briefly. " * 8}]}
CJK = {"messages": [{"role": "user", "content": "请用三句话总结这份季度报告的要点。" * 8}]}


def test_arrival_rule_characters_charges_the_fast_count_and_reports_tiktoken_usage(loaded_encodings):
    """``arrival_count: characters`` charges characters / 4 (the fast count) on arrival while the
    prompt the usage reports stays tiktoken's: the charge differs from the gateway's count in
    either direction (above it for English, far below it for CJK)."""
    sim = DeploymentConfig(name="d", model="gpt-4o", arrival_count="characters")
    for body in (ENGLISH, CJK, EVERYTHING_CHAT):
        prompt, charged = arrival.charge("chat", {**body, "max_tokens": 100}, sim)
        assert prompt == tokens.count_prompt_tokens("chat", body, "gpt-4o")
        assert charged == tokens.count_prompt_tokens("chat", body, "gpt-4o", mode="fast") + 100
    english_prompt, english_charged = arrival.charge("chat", ENGLISH, sim)
    assert english_charged - 1024 > english_prompt * 1.1  # English: 4+ characters per token
    cjk_prompt, cjk_charged = arrival.charge("chat", CJK, sim)
    assert cjk_charged - 1024 < cjk_prompt * 0.5  # CJK: about one token per character


@pytest.mark.parametrize(("count", "mode"), [("tiktoken", "tiktoken"), ("characters", "fast"), ("", "tiktoken")])
def test_arrival_factor_scales_the_prompt_count_not_the_allowance(loaded_encodings, count, mode):
    sim = DeploymentConfig(name="d", model="gpt-4o", arrival_count=count, arrival_factor=1.3)
    body = {**ENGLISH, "max_tokens": 50, "n": 2}
    prompt, charged = arrival.charge("chat", body, sim)
    expected = -(-tokens.count_prompt_tokens("chat", body, "gpt-4o", mode=mode) * 13 // 10)
    assert charged == expected + 100
    assert prompt == tokens.count_prompt_tokens("chat", body, "gpt-4o")


def test_arrival_rule_on_a_fast_deployment_needs_the_encoding_only_for_tiktoken():
    fast = {"name": "d", "model": "gpt-4o", "token_estimate": "fast"}
    assert arrival.encoding_name(DeploymentConfig(**fast)) is None
    assert arrival.encoding_name(DeploymentConfig(**fast, arrival_count="characters")) is None
    assert arrival.encoding_name(DeploymentConfig(**fast, arrival_count="tiktoken")) == "o200k_base"


def test_arrival_rule_config_is_validated_and_round_trips():
    config = SimConfig.from_dict(
        {"defaults": {"arrival_count": "characters", "arrival_factor": 1.15}, "deployments": [{"name": "a"}]}
    )
    a = config.deployments[0]
    assert (a.arrival_count, a.arrival_factor) == ("characters", 1.15)
    assert SimConfig.from_dict(config.to_dict()).deployments[0] == a
    assert a.updated({"arrival_count": ""}).arrival_count == ""
    with pytest.raises(ConfigError, match=r"deployments\[0\]\.arrival_count: must be one of tiktoken, characters"):
        SimConfig.from_dict({"deployments": [{"name": "a", "arrival_count": "words"}]})
    with pytest.raises(ConfigError, match=r"defaults\.arrival_factor: must be > 0"):
        SimConfig.from_dict({"defaults": {"arrival_factor": 0}})


def test_encoding_follows_the_model_and_fast_mode_needs_none():
    assert arrival.encoding_name(DeploymentConfig(name="d", model="gpt-4o-mini")) == "o200k_base"
    assert arrival.encoding_name(DeploymentConfig(name="d", model="gpt-35-turbo")) == "cl100k_base"
    assert arrival.encoding_name(DeploymentConfig(name="d", model="text-embedding-3-small")) == "cl100k_base"
    assert arrival.encoding_name(DeploymentConfig(name="my-own-llama")) == "o200k_base"
    assert arrival.encoding_name(DeploymentConfig(name="d", model="gpt-35-turbo", token_estimate="fast")) is None


@pytest.mark.parametrize(
    ("kind", "body", "allowance"),
    [
        ("chat", {"max_tokens": 50, "n": 2}, 100),
        ("chat", {"max_completion_tokens": 7, "max_tokens": 50}, 7),
        ("chat", {}, 1024),  # the deployment's default_max_tokens
        ("completions", {"max_tokens": 10, "best_of": 3}, 30),
        ("completions", {"max_tokens": 10, "n": 2, "best_of": 1}, 20),
        ("completions", {}, 16),  # the API's default
        ("embeddings", {"max_tokens": 10}, 0),
    ],
)
def test_arrival_charge_adds_the_completion_allowance(loaded_encodings, kind, body, allowance):
    field = "input" if kind == "embeddings" else "prompt" if kind == "completions" else "messages"
    body = {field: [{"role": "user", "content": "hi"}] if kind == "chat" else "hi", **body}
    prompt, charged = arrival.charge(kind, body, DeploymentConfig(name="d", model="gpt-4o"))
    assert charged - prompt == allowance


def test_generation_is_capped_by_the_requests_limit():
    assert generation.generated_tokens("chat", {"max_tokens": 4}, 16) == (4, True)
    assert generation.generated_tokens("chat", {"max_completion_tokens": 4, "max_tokens": 40}, 16) == (4, True)
    assert generation.generated_tokens("chat", {"max_tokens": 40}, 16) == (16, False)
    assert generation.generated_tokens("chat", {}, 100) == (100, False)
    assert generation.generated_tokens("completions", {}, 100) == (16, True)  # the API's default limit
    assert generation.choices({"n": 3}) == 3 and generation.choices({"n": True}) == 1


def test_windows_come_from_gateway_limits():
    # The simulator must use the shared formula; pin the shapes it relies on.
    assert [w.seconds for w in request_windows(600, 60)] == [1.0, 10.0, 60.0]
    assert [w.seconds for w in token_windows(1000, 6)] == [6.0]
