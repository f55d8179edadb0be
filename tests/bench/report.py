"""The printed table and ``var/bench/latest.json``, from the results of one run.

Every figure printed comes from the results dict; the only constants here are issue 3's
targets, which the last block compares the measured figures with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.bench.bigprompts import big_prompt_lines
from tests.bench.manystreams import many_streams_lines
from tests.bench.quotas import quota_rows
from tests.bench.redisstate import redis_state_lines

# Issue 3's performance targets for one gateway process.
TARGET_ADDED_P50_MS = 1.5
TARGET_ADDED_TTFT_MS = 2.0
TARGET_SHARE_OF_DIRECT = 10.0
TARGET_CPU_MS_PER_REQUEST = 1.0
TARGET_IDLE_RSS_MB = 150.0


def fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _get(data: dict | None, *path: str) -> Any:
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _statuses(run: dict | None) -> str:
    status = _get(run, "overall", "status") or {}
    bad = {k: v for k, v in status.items() if k != "200"}
    errors = _get(run, "errors") or {}
    parts = [f"{k}x{v}" for k, v in bad.items()] + [f"{k}: {v}" for k, v in errors.items()]
    return ("non-200: " + ", ".join(parts)) if parts else ""


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 1, len(r) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows)])


def latency_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows of the main table: direct, then each gateway, per scenario."""
    direct = results.get("direct", {})
    gateways = results.get("gateways", {})
    rows: list[list[str]] = []

    def row(scenario: str, name: str, run: dict | None, metric: str, base: dict | None, compare: str, note: str = ""):
        p50 = _get(run, "overall", metric, "p50")
        p99 = _get(run, "overall", metric, "p99")
        rps = _get(run, "rps")
        versus = ""
        if base is not None and run is not None and run is not base:
            if compare == "added":
                base_p50 = _get(base, "overall", metric, "p50")
                if p50 is not None and base_p50 is not None:
                    versus = f"+{p50 - base_p50:.3f} ms p50"
            elif compare == "share" and rps and base.get("rps"):
                versus = f"{100.0 * rps / base['rps']:.1f}% of direct"
        notes = "; ".join(filter(None, [note, _statuses(run)]))
        rows.append([scenario, name, fmt(p50, 3), fmt(p99, 3), fmt(rps, 0), versus, notes])

    for scenario, key, metric, compare in (
        ("chat c=1", "c1", "latency_ms", "added"),
        ("chat c=32", "c32", "latency_ms", "share"),
        ("stream c=1 TTFT*", "stream_c1", "ttfb_ms", "added"),
    ):
        base = direct.get(key)
        note = ""
        if key == "c32" and base:
            note = (
                f"upstream CPU {fmt(_get(base, 'server', 'cpu_percent_of_core'), 0)}%, "
                f"generator CPU {fmt(base.get('cpu_percent'), 0)}%"
            )
        if key == "stream_c1" and base:
            note = f"{_get(base, 'overall', 'ttfb_ms', 'count')} streams"
        if base is not None:
            row(scenario, "direct", base, metric, base, compare, note)
        for name, gateway in gateways.items():
            run = gateway.get(key)
            if run is None:
                continue
            note = ""
            if key == "c32":
                note = (
                    f"gateway CPU {fmt(_get(run, 'server', 'cpu_percent_of_core'), 0)}% of its core, "
                    f"generator CPU {fmt(run.get('cpu_percent'), 0)}%"
                )
            if key == "stream_c1":
                note = f"{_get(run, 'overall', 'ttfb_ms', 'count')} streams"
            row(scenario, f"gateway {name}", run, metric, base, compare, note)
    return rows + wrk_rows(results)


def wrk_rows(results: dict[str, Any]) -> list[list[str]]:
    """The wrk cross-check of the c=32 rows (absent when wrk is not installed)."""
    direct = results.get("direct", {})
    gateways = results.get("gateways", {})
    rows: list[list[str]] = []
    wrk_base = direct.get("c32_wrk")
    for name, run in [("direct", wrk_base)] + [(f"gateway {n}", g.get("c32_wrk")) for n, g in gateways.items()]:
        if not run:
            continue
        if "error" in run:
            rows.append(["chat c=32 (wrk check)", name, "-", "-", "-", "", run["error"]])
            continue
        share = ""
        if wrk_base and run is not wrk_base and wrk_base.get("rps"):
            share = f"{100.0 * run['rps'] / wrk_base['rps']:.1f}% of direct"
        bad = f"non-2xx: {run['non_2xx']}" if run.get("non_2xx") else ""
        rows.append(
            [
                "chat c=32 (wrk check)",
                name,
                fmt(run.get("p50_ms"), 3),
                fmt(run.get("p99_ms"), 3),
                fmt(run.get("rps"), 0),
                share,
                "; ".join(filter(None, [bad, run.get("socket_errors", "")])),
            ]
        )
    return rows


def resource_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, gateway in results.get("gateways", {}).items():
        server = _get(gateway, "c32", "server") or {}
        rows.append(
            [
                f"gateway {name}",
                fmt(server.get("cpu_ms_per_request"), 3),
                fmt(server.get("requests")),
                fmt(gateway.get("rss_idle_mb"), 1),
                fmt(gateway.get("rss_after_load_mb"), 1),
                fmt(gateway.get("log_lines")),
            ]
        )
    return rows


def _calibrations(run: dict[str, Any]) -> str:
    learned = run.get("learned") or {}
    parts = []
    for name, v in sorted(learned.items()):
        c = v.get("calibration") or {}
        parts.append(f"{name} x{fmt(c.get('factor'), 2)} ({fmt(c.get('samples'))})")
    return ", ".join(parts) or "-"


def _guards(run: dict[str, Any]) -> str:
    learned = run.get("learned") or {}
    parts = []
    for name, v in sorted(learned.items()):
        g = v.get("window_guard") or {}
        parts.append(f"{name} {fmt(g.get('ms'), 1, ' ms') if g.get('ms') is not None else 'ceiling'}")
    return ", ".join(parts) or "-"


def saturation_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    runs = results.get("saturation", {})
    names = list(runs)
    rows = []

    def add(label: str, fn) -> None:
        rows.append([label, *[fn(runs[n]) for n in names]])

    def wait(priority: str):
        return lambda r: "{} / {} ms (n={})".format(
            fmt(_get(r, "gateway", "queue_wait_ms_by_priority", priority, "p50"), 0),
            fmt(_get(r, "gateway", "queue_wait_ms_by_priority", priority, "p99"), 0),
            fmt(_get(r, "gateway", "queue_wait_ms_by_priority", priority, "count")),
        )

    def latency(priority: str):
        return lambda r: "{} / {} ms".format(
            fmt(_get(r, "client", "by_priority", priority, "latency_ok_ms", "p50"), 0),
            fmt(_get(r, "client", "by_priority", priority, "latency_ok_ms", "p99"), 0),
        )

    def statuses(priority: str | None = None):
        def render(r):
            status = _get(r, "client", "by_priority", priority, "status") if priority else _get(r, "client", "status")
            return ", ".join(f"{k}: {v}" for k, v in (status or {}).items()) or "-"

        return render

    add(
        "limits, each of 2 deployments",
        lambda r: "rpm {} / tpm {} per {} s 'minute' (both sides)".format(
            fmt(_get(r, "config", "rpm")), fmt(_get(r, "config", "tpm")), fmt(_get(r, "config", "minute_seconds"), 0)
        ),
    )
    add(
        "offered load",
        lambda r: "{} req/s for {} s (capacity {} req/s), open loop".format(
            fmt(_get(r, "config", "offered_rps"), 0),
            fmt(_get(r, "config", "duration"), 0),
            fmt(_get(r, "config", "capacity_rps"), 0),
        ),
    )
    add(
        "gateway queue",
        lambda r: "timeout {} s, max depth {}".format(
            fmt(_get(r, "config", "queue_timeout"), 0), fmt(_get(r, "config", "queue_max_depth"))
        ),
    )
    add("upstream 429s", lambda r: fmt(_get(r, "upstream", "total_429")))
    add("upstream served", lambda r: fmt(_get(r, "upstream", "total_served")))
    add("client statuses", statuses())
    add("client statuses, priority 0", statuses("0"))
    add("client statuses, priority 9", statuses("9"))
    add("unfinished at drain end", lambda r: fmt(_get(r, "client", "unfinished")))
    add("capacity used: requests", lambda r: fmt(_get(r, "capacity_used", "request_share_percent"), 1, " %"))
    add("capacity used: tokens", lambda r: fmt(_get(r, "capacity_used", "token_share_percent"), 1, " %"))
    add("learned calibration factor (samples)", _calibrations)
    add("measured window guard", _guards)
    add("upstream peak per window, sat-a", lambda r: _peaks(_get(r, "upstream", "sat-a")))
    add("queue wait of 200s p50 / p99, prio 0", wait("0"))
    add("queue wait of 200s p50 / p99, prio 9", wait("9"))
    add("client latency of 200s p50 / p99, prio 0", latency("0"))
    add("client latency of 200s p50 / p99, prio 9", latency("9"))
    add("served by tenant, prio 0", lambda r: _pairs(_get(r, "gateway", "served_by_priority_and_tenant", "0")))
    add("served by tenant, prio 9", lambda r: _pairs(_get(r, "gateway", "served_by_priority_and_tenant", "9")))
    add(
        "usage records / requests sent",
        lambda r: f"{fmt(_get(r, 'gateway', 'records'))} / {fmt(_get(r, 'client', 'sent'))}",
    )
    add("gateway outcomes", lambda r: _pairs(_get(r, "gateway", "outcomes")))
    return ["saturation", *names], rows


def _pairs(mapping: dict | None, separator: str = ", ") -> str:
    """``a: 1, b: 2`` (or ``-`` when empty)."""
    return separator.join(f"{k}: {v}" for k, v in (mapping or {}).items()) or "-"


def _peaks(deployment: dict | None) -> str:
    """``10/10 per 0.17 s, 80/100 per 1.67 s, ...``: peak requests in each upstream window vs its limit."""
    if not deployment:
        return "-"
    rpm, minute = deployment["limits"]["rpm"], deployment["limits"]["minute_seconds"]
    limits = {minute / 60.0: max(1, rpm // 60), minute / 6.0: max(1, rpm // 6), minute: rpm}
    parts = []
    for seconds_text, peak in deployment["peak_requests_in_window"].items():
        seconds = float(seconds_text)
        limit = next((v for k, v in limits.items() if abs(k - seconds) < 1e-3), None)
        parts.append(f"{peak}/{limit if limit is not None else '?'} per {seconds:.3g} s")
    return ", ".join(parts)


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    """Issue 3's targets against the in-process uvicorn gateway's figures."""
    direct = results.get("direct", {})
    gateway = results.get("gateways", {}).get("uvicorn")
    if not gateway:
        return []
    rows = []

    def check(label: str, value: float | None, target: float, better: str, unit: str) -> None:
        if value is None:
            rows.append([label, "-", f"{'<=' if better == 'low' else '>='} {target:g}{unit}", "not measured"])
            return
        ok = value <= target if better == "low" else value >= target
        rows.append(
            [
                label,
                f"{value:,.3f}{unit}",
                f"{'<=' if better == 'low' else '>='} {target:g}{unit}",
                "met" if ok else "NOT met",
            ]
        )

    def added(key: str, metric: str) -> float | None:
        a, b = _get(gateway, key, "overall", metric, "p50"), _get(direct, key, "overall", metric, "p50")
        return a - b if a is not None and b is not None else None

    share = None
    if _get(gateway, "c32", "rps") and _get(direct, "c32", "rps"):
        share = 100.0 * gateway["c32"]["rps"] / direct["c32"]["rps"]
    check("added p50, chat c=1", added("c1", "latency_ms"), TARGET_ADDED_P50_MS, "low", " ms")
    check("added p50 TTFT, stream c=1", added("stream_c1", "ttfb_ms"), TARGET_ADDED_TTFT_MS, "low", " ms")
    check("req/s at c=32, share of direct", share, TARGET_SHARE_OF_DIRECT, "high", " %")
    check(
        "CPU per request", _get(gateway, "c32", "server", "cpu_ms_per_request"), TARGET_CPU_MS_PER_REQUEST, "low", " ms"
    )
    check("idle RSS", gateway.get("rss_idle_mb"), TARGET_IDLE_RSS_MB, "low", " MB")
    return rows


def profile_lines(results: dict[str, Any]) -> list[str]:
    profile = results.get("profile")
    if not profile or "top_self" not in profile:
        return []
    lines = [
        f"Profile ({profile['tool']}, c=32, {fmt(profile.get('rps_while_profiled'), 0)} req/s while profiled): "
        "self time by package"
    ]
    lines += [f"  {pct:5.1f}%  {pkg}" for pkg, pct in list(profile["by_package_self_percent"].items())[:12]]
    if profile.get("by_thread_percent"):
        lines.append("Samples by thread")
        lines += [f"  {pct:5.1f}%  {thread}" for thread, pct in profile["by_thread_percent"].items()]
    lines.append("Top functions by self time")
    lines += [f"  {r['self_percent']:5.1f}%  {r['function']}" for r in profile["top_self"][:15]]
    return lines


def _ceiling(results: dict[str, Any]) -> str:
    """The generator's own ceiling, extrapolated from its CPU share in the direct c=32 run."""
    direct = _get(results, "direct", "c32")
    if not direct or not direct.get("cpu_percent"):
        return ""
    return (
        f", {direct['cpu_percent']:.0f}% of its core at {direct['rps']:,.0f} req/s direct "
        f"(ceiling ~{direct['rps'] * 100.0 / direct['cpu_percent']:,.0f} req/s)"
    )


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    out = [
        f"LLM gateway benchmark ({meta.get('started_at', '')}, {meta.get('elapsed_s', 0):.0f} s)",
        f"Generator: {meta.get('generator')}{_ceiling(results)}; wrk check: {meta.get('wrk') or 'not installed'}",
        f"Pinning ({meta.get('pinning_tool', '')}): " + _pairs(meta.get("pinning"), "; "),
        f"Load average before / after: {fmt(meta.get('loadavg_at_start'))} / {fmt(meta.get('loadavg_at_end'))}"
        + (" (other work was running: figures are noisier)" if (meta.get("loadavg_at_start") or 0) > 0.5 else ""),
        "",
    ]
    rows = latency_rows(results)
    if rows:
        out.append(_table(rows, ["scenario", "run", "p50 ms", "p99 ms", "req/s", "vs direct", "notes"]))
        out.append(
            "* TTFT: from writing the request to the first byte of the first SSE data event. Latency: to the "
            "end of the response. Closed loop, keep-alive; chat = 1 short message, max_tokens 16 (8 streamed)."
        )
    resources = resource_rows(results)
    if resources:
        out += [
            "",
            _table(
                resources,
                [
                    "process",
                    "CPU ms/request (c=32)",
                    "requests",
                    "RSS idle MB",
                    "RSS after load MB",
                    "log lines >= warning",
                ],
            ),
        ]
    header, sat_rows = saturation_rows(results)
    if sat_rows and len(header) > 1:
        out += ["", _table(sat_rows, header)]
    quotas = quota_rows(results)
    if quotas:
        header = ["quotas (issue 14)", "c=1 p50 ms off / on", "added (<= +0.15)", "c=32 req/s off / on"]
        header += ["c=32 CPU ms/req off / on", "throughput share (>= 90 %)", "non-200"]
        out += ["", _table(quotas, header)]
        out.append(
            "* medians of alternating rounds in one process; throughput share = CPU per request off / on "
            "(req/s, beside, moves with other work on the machine)."
        )
    shared = redis_state_lines(results)
    if shared:
        out += ["", *shared]
    targets = target_rows(results)
    if targets:
        out += ["", _table(targets, ["issue 3 target (uvicorn, in-process)", "measured", "target", ""])]
    big = big_prompt_lines(results)
    if big:
        out += ["", *big]
    streams = many_streams_lines(results)
    if streams:
        out += ["", *streams]
    profile = profile_lines(results)
    if profile:
        out += ["", *profile]
    if results.get("dashboards"):
        from tests.bench.dashboards import render as render_dashboards

        out += ["", render_dashboards(results["dashboards"])]
    for name, run in [
        *results.get("gateways", {}).items(),
        *((f"saturation {n}", r) for n, r in results.get("saturation", {}).items()),
        *([("big prompts", results["bigprompts"])] if results.get("bigprompts") else []),
        *((f"quotas {n}", r) for n, r in results.get("quotas", {}).items()),
        *([("shared state on Redis", results["redis_state"])] if results.get("redis_state") else []),
        *([("many streams", results["manystreams"])] if results.get("manystreams") else []),
    ]:
        if run.get("log_errors"):
            out += ["", f"Gateway log ({name}), {run.get('log_lines')} lines at warning or above, first ones verbatim:"]
            out += [f"  {line}" for line in run["log_errors"][:20]]
    for failure in results.get("failures", []):
        out += ["", f"FAILED: {failure['phase']}:", failure["error"]]
    return "\n".join(out)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
