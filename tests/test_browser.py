"""A real `streamlit run` driven by headless Chromium through Playwright: every page, a run, a search."""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobs.core.processes import free_port
from jobs.core.settings import Settings
from jobs.store import db
from jobs.store.demo import seed_demo
from jobs.store.registry import Registry
from tests.conftest import ARTIFACTS, responds, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.spark]
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextmanager
def serving_dashboard(home: Path, **env: str) -> Iterator[str]:
    """The dashboard's server as the product starts it, on its own port, its runs held by home/browser-hold while it
    exists."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed; run `make setup`")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dashboard.server", "--server.address", "127.0.0.1",
                             "--server.port", str(port)],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), EMBEDDECK_HOME=str(home),
                                               EMBEDDECK_FAULT_HOLD_FILE=str(home / "browser-hold"),
                                               EMBEDDECK_DASHBOARD_AUTH="proxy", **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: responds(f"{url}/_stcore/health"), timeout=60, what="the dashboard server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def dashboard_url(home):
    seed_demo(Settings().db_url, n=200)
    with serving_dashboard(home) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")[:2000]


SIGNED_IN = {"X-MS-CLIENT-PRINCIPAL-NAME": "operator@example.com"}  # what ACA's authentication adds
# Streamlit renders Markdown in alerts and st.table cells: this had shown as math, bold, an emoji and a link.
MARKDOWNISH = "*was* $120, now $89 __sale__ :smile: [see](http://e.com) <b>x</b> \\o/"


def test_without_the_proxy_user_header_nothing_is_shown(dashboard_url, browser):
    page = browser.new_page()
    page.goto(dashboard_url)
    page.get_by_text("Sign-in required").wait_for(timeout=60_000)
    assert page.get_by_text("Launch an embedding run").count() == 0


def test_a_page_opened_directly_on_a_fresh_server_asks_for_sign_in_too(browser, tmp_path):
    """A fresh server's first request straight to /cluster ran pages/cluster.py without app.py, and so without its
    sign-in: Streamlit serves the pages/ folder in its older multipage mode until some session reaches app.py's
    st.navigation. Every page now signs in itself."""
    with serving_dashboard(tmp_path) as url:
        for path in ("/cluster", "/search", "/runs", "/", "/cluster"):
            page = browser.new_page()
            page.goto(url + path)
            page.get_by_text("Sign-in required").wait_for(timeout=60_000)
            body = page.inner_text("body")
            assert not any(word in body for word in ("Master", "Target table", "No runs yet", "Launch an")), body
            page.close()


def test_a_page_opened_directly_on_a_fresh_server_shows_the_products_navigation(browser, tmp_path):
    """A fresh server's first request straight to /cluster showed Streamlit's own navigation over the files beside
    app.py ("app", "cluster", "launch", ...), app.py itself among them as a page: its older multipage mode, which a
    server uses until some session reaches app.py's st.navigation. The server now starts in the product's."""
    with serving_dashboard(tmp_path) as url:
        context = browser.new_context(extra_http_headers=SIGNED_IN)
        page = context.new_page()
        page.goto(url + "/cluster")
        page.get_by_role("heading", name="Cluster", exact=True).wait_for(timeout=60_000)
        links = page.locator('[data-testid="stSidebarNav"] a')
        links.first.wait_for(timeout=30_000)
        # Each link's text is its icon's name, then its title.
        assert [t.split()[-1] for t in links.all_inner_texts()] == ["Launch", "Runs", "Cluster", "Search"]
        no_exception(page)
        context.close()


@pytest.fixture
def boots(dashboard_url) -> Iterator[str]:
    """A product whose description reads as Markdown, removed after the test: a pytest worker's home, and its demo
    table, serve the other test files it runs, which count the demo's rows."""
    text = f"Waterproof hiking boots for mountain trails, {MARKDOWNISH}"
    engine = db.engine_for(Settings().db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO products VALUES (1000000, 'Boots', 'shoes', 89.0, :text)"), {"text": text})
    yield text
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM products WHERE id = 1000000"))


def test_pages_run_and_search_in_chromium(dashboard_url, browser, home, boots):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, extra_http_headers=SIGNED_IN)
    page = context.new_page()
    page.goto(dashboard_url)
    page.get_by_text("Launch an embedding run").wait_for(timeout=60_000)
    # "N rows still need a vector", or "1 row still needs": the worker's home may hold the other test files' vectors
    page.get_by_text("still need").wait_for(timeout=60_000)
    no_exception(page)
    # The product's .streamlit/config.toml: no Streamlit developer menu or "Deploy" button, even on localhost.
    assert page.locator('[data-testid="stAppDeployButton"]').count() == 0
    shot(page, "launch")

    target = page.get_by_label("Target table (created when missing)")
    target.fill("browser_embeddings")
    target.press("Enter")
    page.get_by_text("still need").wait_for(timeout=60_000)
    hold = home / "browser-hold"
    hold.touch()  # the run's tasks pause after their first commits: the live view is caught mid-run
    try:
        page.get_by_role("button", name="Launch run").click()
        page.get_by_role("heading", name="Runs", exact=True).wait_for(timeout=60_000)
        page.locator("h3", has_text="· running").wait_for(timeout=300_000)
        rows_done = page.locator('[data-testid="stMetricValue"]').first
        wait_until(lambda: rows_done.inner_text().strip() not in ("", "0"), timeout=300, every=1)
        page.get_by_role("button", name="Cancel run").wait_for(timeout=30_000)
        no_exception(page)
        shot(page, "runs-in-flight")
    finally:
        hold.unlink()
    page.locator("h3", has_text="· succeeded").wait_for(timeout=300_000)
    no_exception(page)
    # The master's URL whole, in a caption: as a metric's large value it was cut to "spark://127.…".
    page.get_by_text("Master: local[").or_(page.get_by_text("Master: spark://")).first.wait_for(timeout=30_000)
    shot(page, "runs")

    page.goto(f"{dashboard_url}/cluster")
    page.get_by_text("Workers over time").wait_for(timeout=60_000)
    no_exception(page)
    # Fitted to the few samples of a fresh cluster, the time axis spanned seconds, or a fraction of a millisecond
    # (ticks at 17:44:31.9782, .9783, ...): as Plotly laid it out in the page, it spans ten minutes at least.
    chart = page.locator(".js-plotly-plot").first
    chart.locator(".xtick").first.wait_for(timeout=30_000)
    low, high = chart.evaluate("g => g._fullLayout.xaxis.range.map(g._fullLayout.xaxis.r2l)")  # ms on a date axis
    assert (high - low) / 1000 >= 600, chart.evaluate("g => g._fullLayout.xaxis.range")
    shot(page, "cluster")

    page.goto(f"{dashboard_url}/search")
    page.get_by_label("Query").wait_for(timeout=60_000)
    page.get_by_label("Query").fill("waterproof hiking boots for mountain trails")
    page.get_by_role("button", name="Search").click()
    table = page.locator('[data-testid="stTable"]')
    table.wait_for(timeout=120_000)
    rows = table.locator("tbody tr")
    assert rows.count() == 5
    assert "boot" in rows.first.inner_text().lower()
    assert any(boots in row for row in rows.all_inner_texts()), rows.all_inner_texts()
    no_exception(page)
    shot(page, "search")

    page.goto(dashboard_url)
    master = page.get_by_label("Spark master")
    master.wait_for(timeout=60_000)
    master.fill(MARKDOWNISH)
    master.press("Enter")
    refused = page.locator('[data-testid="stAlert"]', has_text="master must be")
    refused.wait_for(timeout=60_000)
    assert f"not {MARKDOWNISH!r}" in refused.inner_text()


def launch_in_browser(page, url: str, target: str) -> None:
    page.goto(url)
    box = page.get_by_label("Target table (created when missing)")
    box.wait_for(timeout=60_000)
    box.fill(target)
    box.press("Enter")
    page.get_by_text("still need").wait_for(timeout=60_000)
    page.get_by_role("button", name="Launch run").click()
    page.get_by_role("heading", name="Runs", exact=True).wait_for(timeout=60_000)


def test_a_run_waiting_for_a_slot_starts_when_one_frees_with_no_page_open(browser, tmp_path, monkeypatch):
    """The server settles its own runs: with one run at a time, the second launch waits; its slot frees after
    every page has closed, and it starts and succeeds. With no local autoscaler beside the server (the
    dashboard's app on ACA), it used to wait until someone opened the Runs page."""
    monkeypatch.setenv("EMBEDDECK_HOME", str(tmp_path))  # this test's own registry and database
    seed_demo(Settings().db_url, n=60)
    hold = tmp_path / "browser-hold"
    hold.touch()
    with serving_dashboard(tmp_path, EMBEDDECK_MAX_ACTIVE_RUNS="1") as url:
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, extra_http_headers=SIGNED_IN)
        page = context.new_page()
        launch_in_browser(page, url, "first_embeddings")
        page.locator("h3", has_text="· running").wait_for(timeout=300_000)
        launch_in_browser(page, url, "second_embeddings")
        context.close()  # no page open from here on
        registry = Registry()  # read only: a lifecycle call here would start the waiting run itself
        wait_until(lambda: len(registry.list()) == 2, timeout=30, what="the second run recorded")
        first, second = sorted(registry.list(), key=lambda r: r.created_at)
        assert (first.target, second.target, second.phase) == ("first_embeddings", "second_embeddings", "waiting")
        hold.unlink()
        wait_until(lambda: not registry.get(second.run_id).active, timeout=300, every=1,
                   what="the waiting run to start and end with no page open")
        assert registry.get(first.run_id).state == "succeeded", registry.get(first.run_id).error
        assert registry.get(second.run_id).state == "succeeded", registry.get(second.run_id).error


def test_cluster_page_on_the_aca_backend_in_chromium(browser, tmp_path):
    """The real dashboard server on the ACA backend, Azure's transport stubbed in its process
    (tests/azure_stub.py): replicas, decisions, per-replica usage and a run's GPU cost render in a browser."""
    from tests import azure_stub

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), EMBEDDECK_HOME=str(tmp_path),
               EMBEDDECK_TELEMETRY_DIR=str(tmp_path / "telemetry"), **azure_stub.ENV)
    proc = subprocess.Popen([sys.executable, "-m", "tests.azure_stub", str(port), str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: responds(f"{url}/_stcore/health"), timeout=60, what="the dashboard server")
        page = browser.new_page(viewport={"width": 1280, "height": 1700})
        page.goto(f"{url}/cluster")
        page.get_by_text("Latest scaling decisions").wait_for(timeout=60_000)
        page.get_by_text("NVIDIA T4").first.wait_for(state="attached", timeout=30_000)  # a canvas grid cell
        no_exception(page)
        shot(page, "cluster-aca")
        page.goto(f"{url}/runs")
        page.get_by_text("GPU-seconds").wait_for(timeout=60_000)
        assert "570.0 GPU-seconds" in page.inner_text("body")
        no_exception(page)
    finally:
        proc.terminate()
        proc.wait(10)

