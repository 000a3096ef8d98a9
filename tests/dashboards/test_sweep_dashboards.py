"""On a real small sweep (local Ray, SQLite MLflow): `report` from the command line, then a real headless
Chromium (Playwright) on the MLflow UI started by `ui` (the sweep's saved view: every trial a row with
its axes; the parent run's params and summary metrics; the charts) and on the report's index.html
(no element wider than its cell, no row grown past 400 px, no path of this machine in the page).

Screenshots and the report are kept in `artifacts_dir` (reports/test-artifacts/dashboards, or
$DASHBOARD_ARTIFACTS). Without Chromium or Playwright the browser test skips; `.ci/run` installs both.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.orchestrator.conftest import PYTHON, REPO, cli

pytestmark = pytest.mark.slow
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIGURES = ["ap_bbox", "ap_segm", "final_ap", "small_data_bbox", "small_data_segm", "cost_seen", "cost_ap"]
TRIALS = ["random-all-1x-R18", "random-all-2x-R18", "random-8-1x-R18", "tiny-r18-all-1x-R18",
          "tiny-r18-all-2x-R18", "tiny-r18-8-1x-R18"]


def test_report_of_a_real_sweep(small_sweep, artifacts_dir):
    from dashboards import figures as F
    from dashboards import tables as T
    from dashboards.query import find_sweep, load_sweep

    out = cli("report", str(small_sweep.sweep_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    index = Path(out.stdout.strip())
    assert index == small_sweep.sweep_dir / "report" / "index.html" and index.is_file()
    assert sorted(p.stem for p in index.parent.glob("*.png")) == sorted(FIGURES)
    shutil.copytree(index.parent, artifacts_dir / "report", dirs_exist_ok=True)
    sweep = load_sweep(find_sweep(small_sweep.sweep_dir))
    assert sorted(sweep.trials["name"]) == sorted(TRIALS) and set(sweep.trials["status"]) == {"FINISHED"}
    fin = T.finals(sweep.trials, sweep.metrics)
    for task in ("bbox", "segm"):
        fig = F.ap_curves(sweep.trials, sweep.metrics, task)  # R18, full data: 2 inits x 2 schedules
        assert [len(ax.get_lines()) for ax in fig.axes] == [4]
        small = F.small_data_curves(sweep.trials, sweep.metrics, task)  # all: 4 curves; 8 images: 2
        assert [len(ax.get_lines()) for ax in small.axes] == [4, 2]
        for f in (fig, small):
            legend = {t.get_text() for lg in f.legends for t in lg.get_texts()}
            assert {"random init", "pre-trained (tiny-r18)"} <= legend
            assert all(ax.get_xlabel() == "iterations" and "AP (%)" in ax.get_ylabel() for ax in f.axes)
    # Cost: the pretrain job saw 4 iterations x 8 crops of 32x32; a 1x trial 6 iterations x 1 image.
    cost = T.cost_table(sweep.trials, fin, small_sweep.sweep_dir).set_index("name")
    assert cost.loc["tiny-r18-all-1x-R18", "pretrain_images"] == 32
    assert cost.loc["tiny-r18-all-1x-R18", "pretrain_pixels"] == 32 * 32 * 32
    assert cost.loc["tiny-r18-all-1x-R18", "detection_images"] == 6
    assert cost.loc["tiny-r18-all-1x-R18", "total_images"] == 38
    assert cost.loc["random-all-2x-R18", "total_images"] == 12
    assert T.missing(sweep.trials, fin, cost.reset_index()) == []


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    pytest.importorskip("playwright.sync_api", reason="Playwright not installed (pip install playwright)")
    return path


def _start_ui(target: Path, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([PYTHON, "-m", "orchestrator", "ui", str(target)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), start_new_session=True)
    line = proc.stdout.readline()  # printed once the server answers /health
    assert line.startswith("MLflow UI: http://127.0.0.1:"), (line, log.read_text()[-2000:])
    return proc, line.split()[2]


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # the command stops its MLflow server on SIGTERM
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_browser_mlflow_ui_and_report(small_sweep, artifacts_dir, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    index = small_sweep.sweep_dir / "report" / "index.html"
    if not index.exists():
        assert cli("report", str(small_sweep.sweep_dir)).returncode == 0
    proc, url = _start_ui(small_sweep.sweep_dir, tmp_path / "ui.log")
    try:
        assert "/#/experiments/" in url and url.startswith("http://127.0.0.1:")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            _check_mlflow_ui(page, url, artifacts_dir)
            _check_report_page(page, index, artifacts_dir, [str(small_sweep.tmp), str(REPO)])
            browser.close()
    finally:
        _stop(proc)


def _axes(name: str) -> list[str]:
    """A trial's axis values from its name: init-data-schedule-backbone ('tiny-r18' is pretrained:tiny-r18)."""
    *init, data, schedule, backbone = name.split("-")
    init = "-".join(init)
    return ["random" if init == "random" else f"pretrained:{init}", data, schedule, backbone]


def _check_mlflow_ui(page, url: str, shots: Path) -> None:
    # The sweep's saved view (`dashboards.query.save_view`): runs grouped by role, so every trial is a
    # row of its own, with its axes as columns. "load", not "networkidle": the UI may keep polling.
    assert url.endswith("&viewStateShareKey=trials"), url
    page.goto(url, wait_until="load", timeout=120_000)
    for name in TRIALS:
        page.get_by_role("link", name=name).wait_for(timeout=90_000)  # visible: no expander to open
    assistant = page.get_by_role("button", name="Close")  # MLflow 3.17's assistant panel takes a third
    if assistant.count():
        assistant.first.click()
    for column in ("axis.init", "axis.data", "axis.schedule", "axis.backbone", "bbox/AP", "Duration"):
        header = page.get_by_role("columnheader", name=column, exact=True).first  # ag-grid has two per column
        box = header.bounding_box()
        assert box is not None and box["x"] + box["width"] / 2 < page.viewport_size["width"], column  # no scrolling
    for name in TRIALS:
        # ag-grid draws a row in parts (pinned name column, the rest): one aria-rowindex for all.
        index = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True)).first \
            .get_attribute("aria-rowindex")
        cells = page.locator(f'[role="row"][aria-rowindex="{index}"] [role="gridcell"]').all_inner_texts()
        assert all(value in cells for value in _axes(name)), (name, cells)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "mlflow_experiment.png"))
    _check_parent_run(page)
    _check_charts(page, url, shots)


def _check_parent_run(page) -> None:
    """The sweep's own run: the sweep's params, each trial's final AP as a metric, a description."""
    page.get_by_role("gridcell").get_by_role("link", name="dash", exact=True).click()
    page.get_by_text("final/random-all-1x-R18/bbox_AP").first.wait_for(timeout=60_000)
    text = page.inner_text("body")
    for name in TRIALS:
        assert f"final/{name}/bbox_AP" in text and f"final/{name}/segm_AP" in text, name
    for param in ("spec_hash", "axis.init", "axis.data", "axis.schedule", "trials", "iterations"):
        assert param in text, param
    assert "random, pretrained:tiny-r18" in text and "6 trials of Mask R-CNN" in text


def _check_charts(page, url: str, shots: Path) -> None:
    # The chart view groups metrics by prefix ("bbox", "segm", "seen", "train"): the AP chart draws
    # one line per trial (plotly; lines may come in several trace groups each).
    page.goto(url + "&compareRunsMode=CHART", wait_until="load", timeout=120_000)
    title = page.get_by_role("heading", name="bbox/AP", exact=True)
    title.wait_for(timeout=90_000)
    chart = page.locator("div").filter(has=title).filter(has=page.locator(".js-plotly-plot")).last
    chart.locator(".js-plotly-plot").wait_for(timeout=90_000)
    assert chart.locator(".scatterlayer .trace").count() >= len(TRIALS)
    page.wait_for_timeout(1500)  # the other charts finish drawing before the screenshot
    page.screenshot(path=str(shots / "mlflow_ui_charts.png"))


# An element wider than its table cell (text or a list pushed past the cell's edge), or a row grown
# past 400 px (a claim row with its numbers squeezed into a narrow column), or a page wider than the window.
OVERFLOW_JS = """() => {
  const bad = [];
  for (const cell of document.querySelectorAll('td, th')) {
    const right = cell.getBoundingClientRect().right + 1;
    for (const el of [cell, ...cell.querySelectorAll('*')]) {
      const clipped = getComputedStyle(el).overflowX !== 'visible';
      if ((!clipped && el.scrollWidth > el.clientWidth + 1) || el.getBoundingClientRect().right > right) {
        bad.push(el.tagName + ': ' + el.textContent.slice(0, 60));
        break;
      }
    }
  }
  const tall = Array.from(document.querySelectorAll('tr')).filter(r => r.getBoundingClientRect().height > 400)
    .map(r => r.textContent.slice(0, 60));
  return {bad, tall, wide: document.documentElement.scrollWidth > window.innerWidth};
}"""


def _check_report_page(page, index: Path, shots: Path, machine_paths: list[str]) -> None:
    page.goto(index.as_uri(), wait_until="load")
    images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
    assert sorted(alt for alt, _ in images) == sorted(f"{f}.png" for f in FIGURES)
    assert all(ok for _, ok in images), images
    assert page.locator("#paper-table").count() == 1 and page.locator("#missing").count() == 0
    for width in (1600, 1280):
        page.set_viewport_size({"width": width, "height": 1100})
        layout = page.evaluate(OVERFLOW_JS)
        assert layout == {"bad": [], "tall": [], "wide": False}, (width, layout)
    html, text = page.content(), page.inner_text("body")
    for path in machine_paths:  # the page is shared as is: no path of this machine in it
        assert path not in html, path
    assert re.search(r"\wnone\b", text) is None  # "none" never glued to a word ("sizesnone")
    page.screenshot(path=str(shots / "report_index.png"), full_page=True)
