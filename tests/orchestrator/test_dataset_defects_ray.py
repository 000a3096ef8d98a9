"""A dataset defect stops `orchestrator run` on the driver, in one line, before any trial starts
(trainer.data.dataset_check, run once on the driver; each trial's own check then hits its cache)."""

from __future__ import annotations

import json

from tests.orchestrator.conftest import cli, tiny_spec, write_spec


def test_a_defect_is_refused_on_the_driver_before_any_trial(tmp_path):
    from trainer.synthetic.datasets import generate_detection

    root = tmp_path / "data"
    generate_detection(root, seed=0, num_train=8, num_val=4, width=64, height=64)
    ann_path = root / "annotations" / "instances_train.json"
    ann = json.loads(ann_path.read_text())
    bad = dict(ann["annotations"][0], id=10**6, category_id=999)  # a category the file does not list
    ann["annotations"].append(bad)
    ann_path.write_text(json.dumps(ann))
    spec = tiny_spec(tmp_path, name="defect")
    del spec["dataset"]["generate"]
    spec["grid"]["data"] = ["all"]
    proc = cli("run", str(write_spec(tmp_path, spec)), "--no-view", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "999" in last and "categor" in last, last
    assert not list((tmp_path / "runs").rglob("metrics.jsonl"))  # no trial trained
    assert not list((tmp_path / "runs").rglob("train.log"))  # no trial even started
