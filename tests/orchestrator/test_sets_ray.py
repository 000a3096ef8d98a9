"""`--set` on `run` and `resume` with a real Ray cluster: the trial trains with the override, the sweep
stores it, and resuming (by folder, or by spec without `--set`) reapplies it instead of refusing a
changed spec. The same sweep has a pretrain job: it is a row of `status` with its own progress."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.orchestrator.conftest import cli, tiny_spec, write_spec

pytestmark = pytest.mark.slow


def test_set_on_run_is_stored_and_resume_reapplies_it(tmp_path, ray_cluster):
    env = {"RAY_ADDRESS": ray_cluster}
    spec = tiny_spec(tmp_path, grid={"init": ["pretrained:shapes"], "data": [8]})
    spec["dataset"]["generate"].update({"classification": True, "cls_train": 4, "cls_val": 2, "cls_size": 32})
    spec["pretrain"] = {"shapes": {"config": {"backbone": "R18", "norm": "GN", "image_size": 32, "iters": 4,
                                              "batch_size": 8, "num_workers": 0, "threads": 1,
                                              "warmup_iters": 1, "log_period": 2}}}
    path = write_spec(tmp_path, spec)
    out = cli("run", str(path), "--no-view", "--set", "optim.base_lr", "0.005", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "runs" / "tiny"
    record = json.loads((sweep / "sweep.json").read_text())
    assert record["sets"] == ["optim.base_lr=0.005"]
    trial = sweep / "trials" / "shapes-8-1x-R18"
    assert yaml.safe_load((trial / "config.yaml").read_text())["optim"]["base_lr"] == 0.005
    assert json.loads((trial / "final_metrics.json").read_text())["iteration"] == 6
    assert "progress: total: 1 trials" in out.stderr and "| pretrain " in out.stderr  # --no-view: a log line
    # The same spec without --set is the stored sweep with its sets, not a changed spec.
    again = cli("run", str(path), "--no-view", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reapplying the sweep's --set optim.base_lr=0.005" in again.stderr
    by_folder = cli("resume", str(sweep), "--no-view", env=env)
    assert by_folder.returncode == 0, by_folder.stderr[-3000:]
    # Another value is another sweep: refused before anything starts, naming the change.
    other = cli("resume", str(path), "--no-view", "--set", "optim.base_lr=0.01", env=env)
    assert other.returncode == 2
    assert "was started from a different spec" in other.stderr and "optim.base_lr 0.005 -> 0.01" in other.stderr
    status = json.loads(cli("status", str(sweep), "--json").stdout)
    assert status["sets"] == ["optim.base_lr=0.005"] and status["rows"][0]["status"] == "FINISHED"
    job = status["rows"][1]
    assert job["name"] == "pretrain:shapes" and job["status"] == "FINISHED" and job["iteration"] == job["total"] == 4
    table = cli("status", str(sweep)).stdout
    assert "pretrain:shapes" in table and "4/4" in table and "pretrain 1/1 done" in table
