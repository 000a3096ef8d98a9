"""End to end against a real local Ray cluster and a real SQLite MLflow store (no mocks of either).

Each test drives `python -m orchestrator` in a subprocess connected to the module's Ray head, on a
tiny synthetic dataset and a Mask R-CNN small enough for a few CPU iterations.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.orchestrator.conftest import PYTHON, REPO, cli, tiny_spec, write_spec

pytestmark = pytest.mark.slow


def _mlflow(tmp: Path, sweep: str) -> dict:
    """Everything the sweep left in MLflow: runs by role, tags, params, metric histories, artifacts."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(sweep)
    runs = client.search_runs([exp.experiment_id])
    out = {"parents": [r for r in runs if r.data.tags.get("role") == "sweep"],
           "children": {r.data.tags.get("trial_name"): r for r in runs if r.data.tags.get("role") == "trial"},
           "total": len(runs)}
    out["history"] = {name: {k: [m.step for m in client.get_metric_history(r.info.run_id, k)]
                             for k in r.data.metrics}
                      for name, r in out["children"].items()}
    out["artifacts"] = {name: sorted(a.path for a in client.list_artifacts(r.info.run_id))
                        for name, r in out["children"].items()}
    return out


def _duplicate_points(tmp: Path) -> list:
    with sqlite3.connect(tmp / "mlflow.db") as db:
        return db.execute("SELECT run_uuid, key, step, COUNT(*) FROM metrics GROUP BY run_uuid, key, step "
                          "HAVING COUNT(*) > 1").fetchall()


def _attempts(sweep_dir: Path, name: str) -> list[dict]:
    path = sweep_dir / "trials" / name / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_children(ml: dict, expected: dict[str, list[int]]) -> None:
    assert len(ml["parents"]) == 1 and ml["total"] == 1 + len(expected)
    parent_id = ml["parents"][0].info.run_id
    assert sorted(ml["children"]) == sorted(expected)
    for name, eval_steps in expected.items():
        run = ml["children"][name]
        tags = run.data.tags
        assert run.info.run_name == name and run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent_id
        for key in ("axis.init", "axis.data", "axis.schedule", "axis.backbone", "trial_id", "sweep", "spec_hash",
                    "code_version"):
            assert tags.get(key), key
        assert run.data.params["model.backbone"] == "R18" and "optim.base_lr" in run.data.params
        hist = ml["history"][name]
        for task in ("bbox", "segm"):
            for m in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
                assert hist[f"{task}/{m}"] == eval_steps, (name, task, m)
        total = eval_steps[-1]
        for key in ("train/loss", "train/loss_mask", "train/lr"):
            assert hist[key] == list(range(1, total + 1)), (name, key)
        assert ml["artifacts"][name] == ["config.yaml", "final_metrics.json"]


def test_sweep_finishes_and_a_failed_trial_resumes_into_its_run(tmp_path, ray_cluster):
    spec = tiny_spec(tmp_path, base__runtime__log_period=1)
    path = write_spec(tmp_path, spec)
    t0 = time.time()
    out = cli("run", str(path), "--no-view", env={"RAY_ADDRESS": ray_cluster,
                                                  "ORCHESTRATOR_FAIL_ONCE": "random-8-1x-R18@5"})
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"sweep wall time {time.time() - t0:.0f}s")
    sweep = tmp_path / "runs" / "tiny"
    ml = _mlflow(tmp_path, "tiny")
    _check_children(ml, {"random-all-1x-R18": [3, 6], "random-8-1x-R18": [3, 6]})
    assert _duplicate_points(tmp_path) == []
    # The failed trial ran twice: from scratch, then from its iteration-3 checkpoint, into the same run.
    tries = _attempts(sweep, "random-8-1x-R18")
    assert [a["start_iter"] for a in tries] == [0, 3]
    assert {a["run_id"] for a in tries} == {ml["children"]["random-8-1x-R18"].info.run_id}
    assert [a["start_iter"] for a in _attempts(sweep, "random-all-1x-R18")] == [0]
    status = cli("status", str(sweep))
    assert status.returncode == 0 and "total: 2 trials (2 finished)" in status.stdout
    # A second `run` of the finished sweep reruns nothing and adds nothing to MLflow.
    again = cli("run", str(path), "--no-view", env={"RAY_ADDRESS": ray_cluster})
    assert again.returncode == 0, again.stderr[-3000:]
    assert [a["start_iter"] for a in _attempts(sweep, "random-all-1x-R18") if "start_iter" in a] == [0]
    assert _mlflow(tmp_path, "tiny")["total"] == 3 and _duplicate_points(tmp_path) == []


def _progress(sweep: Path, name: str) -> tuple[bool, int]:
    folder = sweep / "trials" / name
    done = (folder / "final_metrics.json").exists()
    ckpts = sorted((folder / "checkpoints").glob("ckpt_*.pt")) if (folder / "checkpoints").exists() else []
    return done, int(ckpts[-1].stem.split("_")[1]) if ckpts else 0


def test_driver_killed_mid_sweep_then_resumed(tmp_path, ray_cluster):
    spec = tiny_spec(tmp_path, grid={"init": ["random"], "data": ["all", 8], "schedule": ["1x", "2x"],
                                     "backbone": ["R18"]},
                     exclude=[{"data": 8, "schedule": "1x"}], base__runtime__log_period=1,
                     fork_schedules=False)  # independent trials (test_fork_ray.py kills a forked sweep)
    path = write_spec(tmp_path, spec)
    sweep = tmp_path / "runs" / "tiny"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_cluster}
    log = open(tmp_path / "driver1.log", "w")
    driver = subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(path), "--no-view"], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    # Longest first: both 2x trials run, then the 1x one. Kill once a trial has finished and the
    # 1x trial is past its first checkpoint but not done.
    deadline = time.time() + 900
    while time.time() < deadline:
        finished = [n for n in ("random-all-2x-R18", "random-8-2x-R18") if _progress(sweep, n)[0]]
        done, ckpt = _progress(sweep, "random-all-1x-R18")
        if finished and not done and ckpt >= 3:
            break
        assert driver.poll() is None, (tmp_path / "driver1.log").read_text()[-3000:]
        time.sleep(0.5)
    else:
        pytest.fail("sweep never reached the kill point")
    killed_at = time.time()
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    log.close()
    out = cli("resume", str(sweep), "--no-view", env={"RAY_ADDRESS": ray_cluster})
    assert out.returncode == 0, out.stderr[-3000:]
    for name in finished:  # finished before the kill: never trained again
        assert all(a["time"] < killed_at or "skipped" in a for a in _attempts(sweep, name)), name
    tries = _attempts(sweep, "random-all-1x-R18")
    resumed = [a for a in tries if a["time"] > killed_at and "start_iter" in a]
    assert resumed and resumed[0]["start_iter"] >= 3
    assert len({a["run_id"] for a in tries if "run_id" in a}) == 1
    ml = _mlflow(tmp_path, "tiny")
    _check_children(ml, {"random-all-2x-R18": [3, 6, 9, 12], "random-8-2x-R18": [3, 6, 9, 12],
                         "random-all-1x-R18": [3, 6]})
    assert _duplicate_points(tmp_path) == []


def test_ddp_trial_with_two_gloo_workers(tmp_path, ray_cluster):
    spec = tiny_spec(tmp_path, grid={"data": ["all"]}, resources={"cpus_per_trial": 1.98, "workers_per_trial": 2},
                     base__optim__batch_size=2)
    out = cli("run", str(write_spec(tmp_path, spec)), "--no-view", env={"RAY_ADDRESS": ray_cluster})
    assert out.returncode == 0, out.stderr[-3000:]
    ml = _mlflow(tmp_path, "tiny")
    assert ml["history"]["random-all-1x-R18"]["bbox/AP"] == [3, 6]
    assert _duplicate_points(tmp_path) == []
