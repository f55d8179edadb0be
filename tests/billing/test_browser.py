"""The dashboards in a real browser: Playwright (Python) driving Debian's chromium.

A staff user signs in to the admin and opens the usage overview; a team member signs in on the
login page and lands on their team's page. On both, no JavaScript error may occur, no request may
fail, every chart must be drawn with data (Chart.js holds points and the canvas has ink), and a
screenshot of each page is saved under var/test-artifacts/browser/.

Playwright's own browser download is not used (``playwright install`` is never run): CI
installs chromium from Debian (``.ci/run``) and the tests launch it by path.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from billing.rollups import usage_rollup
from billing.statements import statements_refresh
from tenants.models import Membership
from tenants.services import key_issue
from tests.billing.usage import insert, usage
from tests.e2e.servers import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "var" / "test-artifacts" / "browser"

# Per chart: how many points hold data and how many pixels of the canvas are not blank.
CHARTS_DRAWN = """() => (window.gatewayCharts || []).map((chart) => {
  const canvas = chart.canvas;
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 3; i < pixels.length; i += 4) { if (pixels[i] > 0) ink += 1; }
  const points = chart.data.datasets.reduce(
    (n, d) => n + d.data.filter((v) => v !== null && v !== 0).length, 0);
  return {id: canvas.id, points, ink, width: canvas.width, height: canvas.height};
})"""


@pytest.fixture
def dashboard_data(tenant_a, key_a, tenant_b, key_b, standard_deployment, ptu_deployment):
    """Two days of usage for two teams, several models and keys, some failures; rolled up."""
    ptu_deployment.monthly_fixed_cost = Decimal("500.00")
    ptu_deployment.save()
    batch = key_issue(tenant_a, name="batch").key
    now = datetime.now(UTC)
    records = []
    for hour in range(48):
        for n, (key, deployment, model) in enumerate(
            [
                (key_a.key, ptu_deployment, "gpt-4o"),
                (batch, standard_deployment, "gpt-4o"),
                (batch, None, "gpt-4o-mini"),
                (key_b.key, standard_deployment, "gpt-4o"),
            ]
        ):
            failed = (hour + n) % 7 == 0
            records.append(
                usage(
                    now - timedelta(hours=hour, minutes=5),
                    key=key,
                    deployment=deployment,
                    model=model,
                    prompt_tokens=400 + 10 * hour,
                    completion_tokens=150 + 5 * n,
                    cost=Decimal("0.0125") * (n + 1),
                    latency_ms=250.0 + 40 * n + hour,
                    ttft_ms=90.0 + n,
                    streamed=True,
                    outcome="upstream_error" if failed else "ok",
                    status=502 if failed else 200,
                )
            )
    insert(*records)
    usage_rollup()
    statements_refresh()
    User.objects.create_superuser("staff", "staff@example.com", "pw-staff-123")
    member = User.objects.create_user("alice", password="pw-alice-123")
    Membership.objects.create(user=member, tenant=tenant_a)


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-dev.txt)")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class Watched:
    """A page and every JavaScript error, console error and failed request it produced."""

    def __init__(self, browser) -> None:
        self.page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("console", self._console)
        self.page.on("requestfailed", lambda request: self.problems.append(f"request failed: {request.url}"))
        self.page.on("response", self._response)

    def _console(self, message) -> None:
        if message.type == "error":
            self.problems.append(f"console error: {message.text}")

    def _response(self, response) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def sign_in(self, url: str, username: str, password: str) -> None:
        self.page.goto(url)
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        with self.page.expect_navigation():
            self.page.click("[type=submit]")

    def charts(self, expected: int) -> list[dict]:
        self.page.wait_for_function(f"(window.gatewayCharts || []).length === {expected}", timeout=15_000)
        return self.page.evaluate(CHARTS_DRAWN)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


def assert_drawn_with_data(charts: list[dict]) -> None:
    for chart in charts:
        assert chart["points"] > 0, f"{chart['id']} has no data"
        assert chart["width"] > 0 and chart["height"] > 0, f"{chart['id']} has no size"
        assert chart["ink"] > 500, f"{chart['id']} is blank ({chart['ink']} pixels drawn)"


def test_the_staff_overview_draws_its_charts_with_data(live_server, dashboard_data, browser):
    watched = Watched(browser)
    watched.sign_in(f"{live_server.url}/admin/login/?next=/admin/overview/", "staff", "pw-staff-123")
    assert watched.page.url.endswith("/admin/overview/")
    charts = watched.charts(expected=4)
    assert [c["id"] for c in charts] == ["overview-requests", "overview-tokens", "overview-spend", "overview-latency"]
    assert_drawn_with_data(charts)
    assert watched.page.locator("#top-tenants tbody tr").count() == 2
    assert "gpt4o-ptu" in watched.page.inner_text("#deployment-use")
    watched.page.click("text=Last 7 days")
    assert_drawn_with_data(watched.charts(expected=4))
    watched.screenshot("staff-overview")
    assert watched.problems == []


def test_a_team_page_draws_its_charts_with_data(live_server, dashboard_data, browser):
    watched = Watched(browser)
    watched.sign_in(f"{live_server.url}/accounts/login/?next=/team/", "alice", "pw-alice-123")
    assert watched.page.url.endswith("/team/team-a/")
    charts = watched.charts(expected=6)
    assert [c["id"] for c in charts][:2] == ["team-by-model", "team-by-key"]
    assert_drawn_with_data(charts)
    model_chart = watched.page.evaluate("window.gatewayCharts[0].data.datasets.map((d) => d.label)")
    assert sorted(model_chart) == ["gpt-4o", "gpt-4o-mini"]
    key_chart = watched.page.evaluate("window.gatewayCharts[1].data.datasets.map((d) => d.label)")
    assert sorted(key_chart) == ["app-a", "batch"]
    assert watched.page.locator("#recent-errors tbody tr").count() > 0
    assert "Spend this month" in watched.page.inner_text("#month-spend")
    watched.screenshot("team-page")
    # The filters: one model over 30 days.
    with watched.page.expect_navigation():
        watched.page.select_option("select[name=period]", "30d")
    with watched.page.expect_navigation():
        watched.page.select_option("select[name=model]", "gpt-4o-mini")
    assert "model=gpt-4o-mini" in watched.page.url and "period=30d" in watched.page.url
    charts = watched.charts(expected=6)
    assert watched.page.evaluate("window.gatewayCharts[0].data.datasets.map((d) => d.label)") == ["gpt-4o-mini"]
    assert_drawn_with_data([c for c in charts if c["id"] != "team-latency"])  # gpt-4o-mini was never forwarded
    watched.screenshot("team-page-filtered")
    assert watched.problems == []
    # The statement download (Chromium reports a navigation that became a download as aborted).
    watched.page.goto(f"{live_server.url}/team/team-a/")
    with watched.page.expect_download() as download:
        watched.page.click("#statements a:text('CSV')")
    assert download.value.suggested_filename.startswith("statement-team-a-")
    assert Path(download.value.path()).read_text().startswith("# statement team-a")
