"""What a sweep's MLflow runs say at a glance, on a real SQLite store without Ray: the parent's params,
description and summary metrics; each trial's run made when the trial starts (its own start and end
times), with MLflow's source/user/commit tags, a description in words and its dataset (`log_input`)."""

from __future__ import annotations

import json
import time

from orchestrator.tracking.metric_sync import MetricSync
from orchestrator.tracking.run_notes import claims_note, sweep_note, sweep_params
from orchestrator.tracking.mlflow_runs import SweepTracker

RECORD = {"name": "glance", "spec_hash": "f" * 64, "pretrain": [], "trunks": [], "trials": [
    {"trial_id": "a", "name": "random-all-1x-R18", "total_iters": 6,
     "axes": {"init": "random", "data": "all", "schedule": "1x", "backbone": "R18"}},
    {"trial_id": "b", "name": "random-8-2x-R18", "total_iters": 12,
     "axes": {"init": "random", "data": "8", "schedule": "2x", "backbone": "R18"}}]}


def _params(root, images) -> dict:
    return {"data.root": str(root), "data.train_split": "train", "data.val_split": "val", "data.train_images": images,
            "data.subset_seed": 0, "model.backbone": "R18", "model.norm": "GN", "schedule.length": "1x",
            "schedule.iters_per_x": 6, "schedule.iters": None, "optim.batch_size": 1, "optim.base_lr": 0.02}


def test_runs_read_at_a_glance(tmp_path):
    root = tmp_path / "synth"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text('{"images": []}')
    sweep = tmp_path / "sweep"
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "glance", RECORD["spec_hash"], "0123456789-dirty",
                           source="python -m orchestrator run")
    parent_id = tracker.open_parent("name: glance\n", sweep_params(RECORD), sweep_note(RECORD))
    for t, images in zip(RECORD["trials"], ("all", 8)):
        tracker.plan_child(t["trial_id"], t["name"], t["axes"], _params(root, images))
    assert tracker.find_children() == {}
    sync = MetricSync(tracker, sweep, RECORD, {}, period=1)
    assert sync.sync_all() and sync.run_ids == {}  # no trial started: no run yet

    time.sleep(1.1)  # the trial starts a while after the sweep
    t0 = time.time()
    sync.post("a", status="RUNNING")
    folder = sweep / "trials" / "random-all-1x-R18"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 6, "bbox/AP": 0.25, "segm/AP": 0.2}) + "\n")
    (folder / "final_metrics.json").write_text(json.dumps({"bbox/AP": 0.25, "segm/AP": 0.2, "bbox/APs": -1}))
    assert sync.sync_all() and list(sync.run_ids) == ["a"]
    time.sleep(1.1)
    t1 = time.time()
    sync.post("a", status="FINISHED", artifacts=True)
    assert sync.sync_all()

    client = tracker.client
    run = client.get_run(sync.run_ids["a"])
    parent = client.get_run(parent_id)
    assert run.info.status == "FINISHED"
    assert abs(run.info.start_time / 1000 - t0) < 0.5 and abs(run.info.end_time / 1000 - t1) < 0.5
    assert run.info.start_time - parent.info.start_time > 1000  # its own start, not the sweep's
    for r in (run, parent):
        tags = r.data.tags
        assert tags["mlflow.source.git.commit"] == "0123456789" and tags["mlflow.user"]
        assert tags["mlflow.source.name"] == "python -m orchestrator run"
    note = run.data.tags["mlflow.note.content"]
    assert "random init" in note and "all training images of `synth/train`" in note and "6 iterations" in note
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "synth/train" and len(dataset.dataset.digest) == 16
    assert [t.value for t in dataset.tags] == ["train"]

    # The parent: the sweep's shape as params, its description, each finished trial's final APs.
    assert parent.data.params == {"spec_hash": "f" * 64, "trials": "2", "trunks": "0", "pretrain_jobs": "0",
                                  "iterations": "18", "axis.init": "random", "axis.data": "all, 8",
                                  "axis.schedule": "1x, 2x", "axis.backbone": "R18"}
    assert parent.data.metrics == {"final/random-all-1x-R18/bbox_AP": 0.25, "final/random-all-1x-R18/segm_AP": 0.2}
    assert "2 trials of Mask R-CNN, varying data, schedule" in parent.data.tags["mlflow.note.content"]

    # A restarted driver finds the run it made and adds nothing twice; the other trial gets its own
    # run (a subset: the digest differs) when it starts.
    tracker2 = SweepTracker(tracker.uri, "glance", RECORD["spec_hash"], "0123456789")
    tracker2.open_parent(None, sweep_params(RECORD), "another note")
    assert tracker2.find_children() == {"a": sync.run_ids["a"]}
    assert client.get_run(parent_id).data.tags["mlflow.note.content"] == parent.data.tags["mlflow.note.content"]
    tracker2.plan_child("b", "random-8-2x-R18", RECORD["trials"][1]["axes"], _params(root, 8))
    b = client.get_run(tracker2.ensure_child("b", time.time()))
    assert b.inputs.dataset_inputs[0].dataset.name == "synth/train[8]"
    assert b.inputs.dataset_inputs[0].dataset.digest != dataset.dataset.digest
    assert "a seeded subset of 8 training images" in b.data.tags["mlflow.note.content"]


def test_set_overrides_are_params_of_the_sweep():
    params = sweep_params({**RECORD, "sets": ["optim.base_lr=0.01", "data.hflip=false"]})
    assert params["set"] == "optim.base_lr=0.01; data.hflip=false"
    assert "set" not in sweep_params(RECORD)


def test_claims_note_replaces_its_section():
    note = sweep_note(RECORD)
    verdicts = {"C1": {"claim": "random init catches up", "verdict": "holds", "reason": "within 1 AP"}}
    once = claims_note(note, verdicts)
    assert once.startswith(note) and "- **C1** random init catches up: **holds** (within 1 AP)" in once
    verdicts["C1"]["verdict"] = "does not hold"
    twice = claims_note(once, verdicts)
    assert twice.count("## Claims") == 1 and "**does not hold**" in twice and "**holds**" not in twice


def test_a_branch_run_starts_with_the_branch_not_its_trunk(tmp_path):
    record = {"name": "fork", "spec_hash": "e" * 64, "pretrain": [],
              "trunks": [{"trial_id": "k", "name": "t-trunk", "total_iters": 4, "role": "trunk"}],
              "trials": [{"trial_id": "c", "name": "t-branch", "total_iters": 8, "fork": {"trunk_id": "k", "at": 4},
                          "axes": {"init": "random", "data": "all", "schedule": "2x", "backbone": "R18"}}]}
    sweep = tmp_path / "sweep"
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "fork", record["spec_hash"], "src-0")
    tracker.open_parent(None, sweep_params(record), sweep_note(record))
    tracker.plan_child("c", "t-branch", record["trials"][0]["axes"], {})
    sync = MetricSync(tracker, sweep, record, {}, period=1)
    sync.post("c", status="RUNNING")  # what the monitor posts when the trunk starts
    for name, steps in (("t-trunk", (2, 4)),):
        (sweep / "trials" / name).mkdir(parents=True)
        (sweep / "trials" / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in steps))
    assert sync.sync_all() and sync.run_ids == {}  # the trunk trains; the branch has not started
    time.sleep(1.1)
    t0 = time.time()
    sync.post("c", status="RUNNING")  # the branch itself starts
    (sweep / "trials" / "t-branch").mkdir(parents=True)
    (sweep / "trials" / "t-branch" / "metrics.jsonl").write_text(json.dumps({"step": 6, "train/loss": 0.1}) + "\n")
    assert sync.sync_all()
    run = tracker.client.get_run(sync.run_ids["c"])
    assert abs(run.info.start_time / 1000 - t0) < 0.5 and "mlflow.source.git.commit" not in run.data.tags
    steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [2, 4, 6]  # the trunk's curve up to the fork point first
