"""A FrozenBN-body trial (torchvision's BN weights under a GN model) in the report: its own legend entry,
`(FrozenBN body)` in the trial table, the `body_norm` tag, and never a cell of the paper's GN table."""

from __future__ import annotations

import pytest

from dashboards import figures as F
from dashboards import tables as T
from dashboards.paper import paper_numbers
from dashboards.query import SweepTarget, load_sweep
from dashboards.report import build_report

ARMS = {"imagenet-all-2x-R50": "GN", "imagenet-frozenbn-all-2x-R50": "FrozenBN", "random-all-2x-R50": "GN"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from orchestrator.tracking.mlflow_runs import SweepTracker

    tmp = tmp_path_factory.mktemp("bodynorm")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = SweepTracker(uri, "arms", "abc", "test")
    tracker.open_parent("name: arms\n")
    for k, (name, body) in enumerate(ARMS.items()):
        init = name.split("-")[0]
        params = {"model.init": init, "model.norm": "GN", "model.body_norm": body, "model.backbone": "R50",
                  "schedule.length": "2x", "schedule.iters_per_x": 10, "schedule.iters": None,
                  "optim.batch_size": 16}
        run_id = tracker.child_run(f"t{k}", name, {"init": init, "data": "all", "schedule": "2x", "backbone": "R50"},
                                   params)
        ap = 0.40 if body == "GN" else 0.38
        tracker.metric_logger(run_id).log(20, {"bbox/AP": ap, "segm/AP": ap * 0.9, "seen/images": 320,
                                               "seen/instances": 2000, "seen/pixels": 320 * 800 * 1333})
        tracker.set_status(run_id, "FINISHED")
    tracker.finish("FINISHED")
    return SweepTarget("arms", uri), tmp


def test_body_norm_tag_and_column(sweep):
    from mlflow import MlflowClient

    target, _ = sweep
    runs = MlflowClient(target.uri).search_runs(["1"], "tags.role = 'trial'")
    assert {r.info.run_name: r.data.tags["body_norm"] for r in runs} == ARMS
    trials = load_sweep(target).trials.set_index("name")
    assert trials.loc["imagenet-frozenbn-all-2x-R50", "body_norm"] == "FrozenBN"
    assert trials.loc["imagenet-frozenbn-all-2x-R50", "init"] == "imagenet"


def test_frozen_bn_trial_is_never_in_a_gn_cell(sweep):
    data = load_sweep(sweep[0])
    fin = T.finals(data.trials, data.metrics)
    numbers = paper_numbers()
    placed = {h["trial"] for entry in T.comparison(data.trials, fin, numbers) for h in entry["trials"]}
    assert "imagenet-all-2x-R50" in placed and "random-all-2x-R50" in placed
    assert "imagenet-frozenbn-all-2x-R50" not in placed
    cells = {row["trial"]["name"]: row["cells"] for row in T.trial_cells(data.trials, fin, numbers)}
    assert cells["imagenet-all-2x-R50"]["bbox/AP"]["paper"]  # Table 1: R50 pre-trained 2x
    assert all(not c["paper"] for c in cells["imagenet-frozenbn-all-2x-R50"].values())


def test_legends_and_trial_table_name_the_body(sweep, tmp_path):
    data = load_sweep(sweep[0])
    fig = F.ap_curves(data.trials, data.metrics, "bbox")
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert {"random init", "ImageNet pre-trained", "ImageNet pre-trained, FrozenBN body"} <= set(labels)
    styles = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert styles["imagenet-frozenbn-all-2x-R50"] != styles["imagenet-all-2x-R50"]
    bars = F.final_bars(data.trials, T.finals(data.trials, data.metrics))
    assert "ImageNet pre-trained, FrozenBN body" in [t.get_text() for lg in bars.legends for t in lg.get_texts()]
    page = build_report(sweep[0], tmp_path / "rep").index.read_text()
    assert "imagenet (FrozenBN body)" in page
    paper = page.split("id='paper-table'")[1].split("id='cost'")[0]
    assert "imagenet-frozenbn-all-2x-R50" not in paper and "imagenet-all-2x-R50" in paper
