"""`report` on a hand-made MLflow store (the orchestrator's own tracker, analytic AP curves): figures,
tables, the paper comparison, incomplete sweeps, and the one-line refusals."""

from __future__ import annotations

import re

import pytest

from dashboards import figures as F
from dashboards import tables as T
from dashboards.query import SweepTarget, load_sweep
from dashboards.report import build_report
from orchestrator.cli import main
from tests.dashboards.conftest import FAKE_GRID, fake_ap, fake_sweep


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake")
    uri = fake_sweep(tmp, unfinished="random-all-6x-R101")
    return SweepTarget("fake", uri), tmp


def _legend(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _check_axes(fig) -> None:
    for ax in fig.axes:
        if ax.get_visible():
            assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


def test_tidy_tables(fake):
    sweep = load_sweep(fake[0])
    assert sorted(sweep.trials["name"]) == sorted(t.name for t in FAKE_GRID)
    assert set(sweep.metrics.columns) == {"name", "metric", "step", "value"}
    r50 = sweep.metrics[(sweep.metrics["name"] == "random-all-2x-R50") & (sweep.metrics["metric"] == "bbox/AP")]
    assert r50["step"].tolist() == [10, 20]
    assert sweep.trials.set_index("name").loc["random-all-6x-R50", "total_iters"] == 60
    fin = T.finals(sweep.trials, sweep.metrics).set_index("name")
    assert fin.loc["random-all-6x-R50", "bbox/AP"] == pytest.approx(fake_ap(FAKE_GRID[1], 60))
    assert fin.loc["random-all-6x-R101", "eval_step"] == 30  # unfinished: its last evaluation


def test_figures_have_both_inits_labelled_axes_and_one_curve_per_trial(fake):
    sweep = load_sweep(fake[0])
    tr, me = sweep.trials, sweep.metrics
    fin = T.finals(tr, me)
    for task in ("bbox", "segm"):
        fig = F.ap_curves(tr, me, task)
        # Full data: 2 backbones x 2 inits x 2 schedules, one panel per backbone.
        assert [ax.get_title() for ax in fig.axes] == ["R50", "R101"]
        assert [len(ax.get_lines()) for ax in fig.axes] == [4, 4]
        assert {"random init", "ImageNet pre-trained", "schedule 2x", "schedule 6x"} <= set(_legend(fig))
        _check_axes(fig)
        small = F.small_data_curves(tr, me, task)
        assert [ax.get_title() for ax in small.axes] == ["data: all", "data: 10k images"]
        assert [len(ax.get_lines()) for ax in small.axes] == [4, 2]
        assert {"random init", "ImageNet pre-trained"} <= set(_legend(small))
        _check_axes(small)
    bars = F.final_bars(tr, fin)
    assert len(bars.axes) == 4 and sum(len(ax.patches) for ax in bars.axes) == 16
    assert {"random init", "ImageNet pre-trained"} <= set(_legend(bars))
    _check_axes(bars)
    cost = T.cost_table(tr, fin, None)
    assert F.curve_count(F.cost_ap(tr, me, cost)) == 3 * len(FAKE_GRID)
    cost_ap = F.cost_ap(tr, me, cost)
    assert {"random init", "ImageNet pre-trained", *(t.name for t in FAKE_GRID)} <= set(_legend(cost_ap))
    # Distinct trials, distinct curves: no two trials share colour, marker and line style.
    looks = {(str(line.get_color()), line.get_marker(), line.get_linestyle(), line.get_label())
             for line in cost_ap.axes[0].get_lines()}
    assert len(looks) == len({look[:3] for look in looks}) == len(FAKE_GRID)
    assert [ax.get_xlabel() for ax in F.cost_bars(cost).axes] == ["images seen", "instances seen", "pixels seen"]


def test_replicates_are_drawn_as_a_mean_with_a_band_and_bars_with_points(tmp_path):
    """Three replicates per cell, moved by SHARED AP points: one curve per cell at their mean, a band
    from their lowest to their highest, bars at the mean with a dot per replicate; Figure 8's view."""
    import numpy as np

    from tests.dashboards.test_claims import PAPER_LIKE, SHARED, _rise, replicated, write_sweep

    sweep = load_sweep(write_sweep(tmp_path, "reps", replicated(PAPER_LIKE, SHARED)))
    tr, me = sweep.trials, sweep.metrics
    ax = F.ap_curves(tr, me, "bbox").axes[0]
    assert len(ax.get_lines()) == 4 and len(ax.collections) == 4  # 2 inits x 2 schedules, not 12 curves
    line = next(x for x in ax.get_lines() if x.get_label() == "random-all-1x-R18 (mean of 3)")
    base = [100 * _rise(0.40, 20.0)(s) for s in (10, 20)]
    assert line.get_ydata() == pytest.approx([b + np.mean(SHARED) for b in base], abs=1e-6)
    band = ax.collections[ax.get_lines().index(line)].get_paths()[0].vertices  # each curve's band follows it
    assert band[:, 1].min() == pytest.approx(min(base) + min(SHARED), abs=1e-6)
    assert band[:, 1].max() == pytest.approx(max(base) + max(SHARED), abs=1e-6)
    bars = F.final_bars(tr, T.finals(tr, me))
    box = bars.axes[0]
    assert len(box.patches) == 4  # one bar per (init, schedule) ...
    dots = [x.get_ydata() for x in box.get_lines()]
    assert len(dots) == 4 and all(len(d) == 3 for d in dots)  # ... and a dot per replicate
    assert sorted(p.get_height() for p in box.patches)[0] == pytest.approx(
        np.mean(sorted(dots, key=np.mean)[0]), abs=1e-6)
    overfit = F.overfitting(tr, me)
    assert [ax.get_title() for ax in overfit.axes if ax.get_visible()] == ["data: all", "data: 150 images"]
    assert [len(ax.get_lines()) for ax in overfit.axes if ax.get_visible()] == [4, 2]
    _check_axes(overfit)


def test_panels_of_one_figure_share_their_x_and_y_limits(fake):
    """The 10k panel's two short curves (2x: 20 iterations) are drawn on the full-data panel's scale,
    y from 0 and x to 60 iterations: they do not fill their panel alone."""
    sweep = load_sweep(fake[0])
    tr, me = sweep.trials, sweep.metrics
    for fig in (F.ap_curves(tr, me, "bbox"), F.small_data_curves(tr, me, "bbox"), F.final_bars(tr, T.finals(tr, me))):
        limits = {ax.get_ylim() for ax in fig.axes if ax.get_visible()}
        assert len(limits) == 1, limits
        assert limits.pop()[0] == 0
    small = F.small_data_curves(tr, me, "bbox")
    assert {ax.get_xlim() for ax in small.axes} == {small.axes[0].get_xlim()}
    assert small.axes[1].get_xlim()[1] > 55
    # Every point inside the shared limits, whichever panel holds the highest one.
    for fig in (small, F.ap_curves(tr, me, "bbox")):
        top = fig.axes[0].get_ylim()[1]
        assert all(max(line.get_ydata()) <= top for ax in fig.axes for line in ax.get_lines())


def test_report_folder_paper_table_and_missing(fake, tmp_path):
    from mlflow import MlflowClient

    from dashboards.paper import paper_numbers

    target, _ = fake
    report = build_report(target, tmp_path / "rep")
    assert report.index.is_file() and sorted(p.name for p in report.folder.glob("*.png")) == sorted(
        f"{n}.png" for n in ("ap_bbox", "ap_segm", "final_ap", "small_data_bbox", "small_data_segm", "overfitting",
                             "cost_seen", "cost_ap"))
    page = report.index.read_text()
    # Self-contained: every image inline, no stylesheet or script fetched.
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "<script" not in page
    # Every paper number with its source: the cells a trial reports first (with ours and the
    # difference), the rest in a collapsed section.
    paper = page.split("id='paper-table'")[1].split("id='cost'")[0]
    shown, collapsed = paper.split("<details>")
    compared = [e for e in T.comparison(load_sweep(target).trials, T.finals(load_sweep(target).trials,
                load_sweep(target).metrics), paper_numbers()) if e["trials"]]
    assert shown.count("<tr>") - 1 == sum(len(e["trials"]) for e in compared) > 0
    assert "no trial of this sweep" not in shown
    assert collapsed.count("<tr>") - 1 == len(paper_numbers()) - len(compared)
    assert "Table 1" in shown and "Section 5 (text, PASCAL VOC)" in collapsed
    # random-all-6x-R50 ends at 0.40 * (1 - e^-2.4) + 0.02 = 38.4 % box AP; Table 1 says 41.3 -> -2.9.
    assert "paper 41.3 (Table 1, Table 2)" in page and "-2.9" in page
    assert report.missing == ["random-all-6x-R101: running at iteration 30 of 60; its numbers are not final"]
    assert "random-all-6x-R101: running at iteration 30 of 60" in page
    client = MlflowClient(target.uri)
    parent = client.search_runs(["1"], "tags.role = 'sweep'")[0]
    assert "report/index.html" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert parent.data.tags["report"] == "report/index.html"


def test_a_sweep_folder_finds_the_store_a_set_named(tmp_path):
    """`run --set tracking_uri=...` stores the set in sweep.json; `report FOLDER` then reads that store."""
    import json

    from dashboards.query import find_sweep

    folder = tmp_path / "runs" / "demo-seed2"
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text("name: demo\n")
    (folder / "sweep.json").write_text(json.dumps({"name": "demo-seed2", "cwd": str(tmp_path), "sets": [
        "seed=2", "name=demo-seed2", "tracking_uri=sqlite:///mlflow-seed2.db"]}))
    target = find_sweep(folder)
    assert target.name == "demo-seed2" and target.uri == f"sqlite:///{tmp_path / 'mlflow-seed2.db'}"


def test_unknown_and_empty_sweeps_exit_2_with_one_line(fake, tmp_path, capsys):
    from orchestrator.tracking.mlflow_runs import SweepTracker

    uri = fake[0].uri
    assert main(["report", "nosuch", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"python -m orchestrator report: error: unknown sweep 'nosuch': no MLflow experiment of that " \
                  f"name in {uri}"
    empty = SweepTracker(uri, "empty", "h", "v")
    empty.open_parent()
    assert main(["report", "empty", "--tracking-uri", uri]) == 2
    assert "has no trial runs" in capsys.readouterr().err and len(capsys.readouterr().err.splitlines()) <= 1
    assert main(["report", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store at" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.db").exists()  # a read never creates a store
    assert main(["report", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err


def test_a_later_panel_with_the_highest_curve_is_not_cut_off():
    import pandas as pd

    trials = pd.DataFrame([{"name": n, "status": "FINISHED", "init": "random", "data": d, "schedule": "1x",
                            "backbone": "R18", "norm": "GN", "body_norm": "GN"} for n, d in (("a", "all"), ("b", "8"))])
    metrics = pd.DataFrame([(n, "bbox/AP", s, v) for n, top in (("a", 0.1), ("b", 0.5)) for s, v in ((5, top / 2),
                                                                                                      (10, top))],
                           columns=["name", "metric", "step", "value"])
    fig = F.small_data_curves(trials, metrics, "bbox")
    assert [ax.get_title() for ax in fig.axes] == ["data: all", "data: 8 images"]
    assert {ax.get_ylim() for ax in fig.axes} == {fig.axes[1].get_ylim()} and fig.axes[1].get_ylim()[1] >= 50
