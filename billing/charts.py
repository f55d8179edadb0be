"""Chart.js configurations for the dashboards, built from the selectors' data.

A page embeds each configuration with ``json_script`` next to a ``<canvas data-chart=...>``;
``billing/static/billing/dashboard.js`` draws them. Only plain JSON here (numbers, strings,
null for "no data"), so the templates never compute anything.
"""

from __future__ import annotations

from typing import Any

PALETTE = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2", "#ca8a04", "#dc2626", "#4b5563", "#db2777", "#65a30d"]


def chart(chart_id: str, title: str, kind: str, labels: list[str], datasets: list[dict], **options: Any) -> dict:
    scales: dict[str, Any] = {"x": {"stacked": options.get("stacked", False)}, "y": {"beginAtZero": True}}
    if options.get("stacked"):
        scales["y"]["stacked"] = True
    if options.get("y_title"):
        scales["y"]["title"] = {"display": True, "text": options["y_title"]}
    if options.get("y2_title"):
        scales["y2"] = {
            "beginAtZero": True,
            "position": "right",
            "grid": {"drawOnChartArea": False},
            "title": {"display": True, "text": options["y2_title"]},
        }
    return {
        "id": chart_id,
        "data_id": f"{chart_id}-data",
        "title": title,
        "config": {
            "type": kind,
            "data": {"labels": labels, "datasets": datasets},
            "options": {
                "responsive": True,
                "maintainAspectRatio": False,
                "animation": False,
                "interaction": {"mode": "index", "intersect": False},
                "scales": scales,
                "plugins": {"legend": {"position": "bottom"}},
            },
        },
    }


def dataset(label: str, data: list, index: int, **extra: Any) -> dict:
    color = PALETTE[index % len(PALETTE)]
    return {"label": label, "data": data, "backgroundColor": color, "borderColor": color, **extra}


def usage_charts(prefix: str, usage: dict[str, Any]) -> list[dict]:
    """Requests with the error rate, tokens, spend, and latency percentiles over time."""
    labels, series = usage["labels"], usage["series"]
    return [
        chart(
            f"{prefix}-requests",
            "Requests and error rate",
            "bar",
            labels,
            [
                dataset("requests", series["requests"], 0, yAxisID="y"),
                dataset("error rate %", series["error_rate"], 6, type="line", yAxisID="y2", spanGaps=True),
            ],
            y_title="requests",
            y2_title="% failed",
        ),
        chart(
            f"{prefix}-tokens",
            "Tokens",
            "bar",
            labels,
            [
                dataset("prompt", series["prompt_tokens"], 0, stack="tokens"),
                dataset("completion", series["completion_tokens"], 1, stack="tokens"),
            ],
            stacked=True,
            y_title="tokens",
        ),
        chart(
            f"{prefix}-spend", "Spend", "line", labels, [dataset("cost", series["cost"], 2, fill=False)], y_title="cost"
        ),
        chart(
            f"{prefix}-latency",
            "Latency of forwarded requests",
            "line",
            labels,
            [
                dataset("p50", series["p50_ms"], 0, spanGaps=True),
                dataset("p95", series["p95_ms"], 3, spanGaps=True),
            ],
            y_title="ms",
        ),
    ]


def split_chart(chart_id: str, title: str, split: dict[str, Any], limit: int = 8) -> dict:
    """Tokens stacked by model or key; past ``limit`` series the rest are summed as "other"."""
    splits = split["splits"]
    shown, rest = splits[:limit], splits[limit:]
    datasets = [dataset(s["name"] or str(s["value"]) or "(none)", s["data"], i, stack="s") for i, s in enumerate(shown)]
    if rest:
        other = [sum(values) for values in zip(*(s["data"] for s in rest), strict=True)]
        datasets.append(dataset(f"other ({len(rest)})", other, limit, stack="s"))
    return chart(chart_id, title, "bar", split["labels"], datasets, stacked=True, y_title="tokens")


def overview_charts(data: dict[str, Any]) -> list[dict]:
    return usage_charts("overview", data["usage"])


def team_charts(data: dict[str, Any]) -> list[dict]:
    by_model = {**data["by_model"], "splits": [{**s, "name": s["value"]} for s in data["by_model"]["splits"]]}
    return [
        split_chart("team-by-model", "Tokens by model", by_model),
        split_chart("team-by-key", "Tokens by key", data["by_key"]),
        *usage_charts("team", data["usage"]),
    ]
