"""End-to-end: RunTable and MetricComparison in a notebook of a real lab, in Debian Chromium.

The notebook logs two runs into the lab's embedded MLflow, then displays the widgets; the
test checks that the table rows and the chart's lines are visible, clicks a row to open
the details pane and a header to sort, and changes the comparison's x axis. Screenshots go
to ``test-artifacts/``.
"""

# The fixtures imported from browser_helpers are the tests' parameters.
# ruff: noqa: F811

from __future__ import annotations

import json
import time

from .browser_helpers import (  # noqa: F401 - fixtures
    ARTIFACTS,
    BROWSER_MARKS,
    UI_TIMEOUT_MS,
    browser,
    jp_asyncio_loop,
    jp_server_cleanup,
    lab,
    open_and_run_all,
    page,
    tracking_ready,
)
from .comparison_comms import SEED, notebook

pytestmark = BROWSER_MARKS

SETUP = SEED.format(experiment="widgets-demo", steps=400)


def test_run_table_and_comparison_render_in_a_notebook(page, lab, tracking_ready):
    from playwright.sync_api import expect

    path = lab.root / "dashboards.ipynb"
    path.write_text(
        json.dumps(
            notebook(
                [
                    SETUP,
                    'table = RunTable(experiment="widgets-demo")\ntable',
                    'MetricComparison(ids, metrics=["loss"])',
                ]
            )
        )
    )
    open_and_run_all(page, lab, "dashboards.ipynb")

    expect(page.get_by_text("runs ready 2")).to_be_visible(timeout=180_000)
    rows = page.locator(".mantik-runtable tr.mantik-w-row")
    expect(rows).to_have_count(2, timeout=UI_TIMEOUT_MS)
    expect(rows.first).to_be_visible()
    expect(page.locator(".mantik-runtable")).to_contain_text("baseline")
    expect(page.locator(".mantik-runtable")).to_contain_text("FINISHED")

    chart = page.locator(".mantik-comparison .js-plotly-plot").first
    expect(chart).to_be_visible(timeout=UI_TIMEOUT_MS)
    lines = chart.locator(".scatterlayer .trace path.js-line")
    expect(lines).to_have_count(2, timeout=UI_TIMEOUT_MS)
    box = lines.first.bounding_box()
    assert box is not None and box["width"] > 100, box
    expect(page.locator(".mantik-comparison .mantik-summary .mantik-best")).to_have_count(1)

    # Sort by name (ascending) from the header, then open a run's details by a click.
    header = page.locator(".mantik-runtable th", has_text="Name")
    header.click()
    expect(header).to_have_attribute("aria-sort", "ascending")
    expect(rows.first).to_contain_text("baseline", timeout=UI_TIMEOUT_MS)
    header.click()
    expect(header).to_have_attribute("aria-sort", "descending")
    expect(rows.first).to_contain_text("wider", timeout=UI_TIMEOUT_MS)
    rows.filter(has_text="wider").click()
    expect(rows.filter(has_text="wider")).to_have_attribute("aria-selected", "true")
    link = page.locator("a.mantik-open-in-mlflow")
    expect(link).to_be_visible(timeout=UI_TIMEOUT_MS)
    assert "/lab-under-test/mantik/mlflow/#/experiments/" in (link.get_attribute("href") or "")

    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(".mantik-runtable-widget").screenshot(
        path=str(ARTIFACTS / "widgets-run-table.png")
    )
    chart.scroll_into_view_if_needed()
    page.locator(".mantik-comparison").first.screenshot(
        path=str(ARTIFACTS / "widgets-metric-comparison.png")
    )

    # The charts are plotly's mimetype in Output widgets (not FigureWidgets, which carried
    # plotly's 4.6 MB bundle each): both drawn, and redrawn live when the x axis changes.
    charts = page.locator(".mantik-comparison .js-plotly-plot")
    expect(charts).to_have_count(2)
    expect(chart.locator(".xtitle")).to_have_text("step")
    page.locator(".mantik-comparison button", has_text="Relative time (s)").click()
    expect(chart.locator(".xtitle")).to_have_text("seconds since start", timeout=UI_TIMEOUT_MS)
    expect(chart.locator(".scatterlayer .trace path.js-line")).to_have_count(2)
    # Wall-clock time: a date axis (its first tick names the year), not milliseconds.
    page.locator(".mantik-comparison button", has_text="Time").first.click()
    expect(chart.locator(".xtitle")).to_have_text("time", timeout=UI_TIMEOUT_MS)
    expect(chart.locator(".xtick").first).to_contain_text(str(time.gmtime().tm_year))
