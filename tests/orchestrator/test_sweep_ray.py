"""End to end against a real local Ray cluster and a real SQLite MLflow store (no mocks of either).

Each test drives `python -m orchestrator` in a subprocess connected to the module's Ray head, on a
tiny synthetic dataset and a Mask R-CNN small enough for a few CPU iterations.
"""

from __future__ import annotations

import time

import pytest

from tests.plugins.faults import FAULTS
from tests.orchestrator.conftest import cli, tiny_spec, write_spec
from tests.orchestrator.sweep_utils import (attempts, check_children, duplicate_points, kill_driver_when,
                                            mlflow_contents, progress)

pytestmark = pytest.mark.slow


def test_sweep_finishes_and_a_failed_trial_resumes_into_its_run(tmp_path, ray_cluster):
    spec = tiny_spec(tmp_path, base__runtime__log_period=1)
    path = write_spec(tmp_path, spec)
    t0 = time.time()
    out = cli("run", str(path), "--no-view", env={"RAY_ADDRESS": ray_cluster,
                                                  **FAULTS, "ORCHESTRATOR_FAIL_ONCE": "random-8-1x-R18@5"})
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"sweep wall time {time.time() - t0:.0f}s")
    sweep = tmp_path / "runs" / "tiny"
    ml = mlflow_contents(tmp_path, "tiny")
    check_children(ml, {"random-all-1x-R18": [3, 6], "random-8-1x-R18": [3, 6]})
    assert duplicate_points(tmp_path) == []
    # The failed trial ran twice: from scratch, then from its iteration-3 checkpoint, into the same run.
    tries = attempts(sweep, "random-8-1x-R18")
    assert [a["start_iter"] for a in tries] == [0, 3]
    # One run per trial (check_children); an attempt names it, or none when launched before the driver made it.
    assert {a["run_id"] for a in tries} - {""} <= {ml["children"]["random-8-1x-R18"].info.run_id}
    assert [a["start_iter"] for a in attempts(sweep, "random-all-1x-R18")] == [0]
    for name in ("random-all-1x-R18", "random-8-1x-R18"):  # keep_checkpoints: final (the default)
        assert [p.name for p in (sweep / "trials" / name / "checkpoints").iterdir()] == ["ckpt_0000006.pt"]
        assert "removed 1 checkpoint(s)" in (sweep / "trials" / name / "train.log").read_text()
    status = cli("status", str(sweep))
    assert status.returncode == 0 and "total: 2 trials (2 finished)" in status.stdout
    # A second `run` of the finished sweep reruns nothing and adds nothing to MLflow.
    again = cli("run", str(path), "--no-view", env={"RAY_ADDRESS": ray_cluster})
    assert again.returncode == 0, again.stderr[-3000:]
    assert [a["start_iter"] for a in attempts(sweep, "random-all-1x-R18") if "start_iter" in a] == [0]
    assert mlflow_contents(tmp_path, "tiny")["total"] == 3 and duplicate_points(tmp_path) == []


def test_driver_killed_mid_sweep_then_resumed(tmp_path, ray_cluster):
    spec = tiny_spec(tmp_path, grid={"init": ["random"], "data": ["all", 8], "schedule": ["1x", "2x"],
                                     "backbone": ["R18"]},
                     exclude=[{"data": 8, "schedule": "1x"}], base__runtime__log_period=1,
                     fork_schedules=False)  # independent trials (test_fork_ray.py kills a forked sweep)
    path = write_spec(tmp_path, spec)
    sweep = tmp_path / "runs" / "tiny"
    state: dict = {}

    # Longest first: both 2x trials run, then the 1x one. Kill once a trial has finished and the
    # 1x trial is past its first checkpoint but not done.
    def ready() -> bool:
        state["finished"] = [n for n in ("random-all-2x-R18", "random-8-2x-R18") if progress(sweep, n)[0]]
        done, ckpt = progress(sweep, "random-all-1x-R18")
        return bool(state["finished"]) and not done and ckpt >= 3

    killed_at = kill_driver_when(["run", str(path), "--no-view"], ready, tmp_path / "driver1.log",
                                 {"RAY_ADDRESS": ray_cluster})
    finished = state["finished"]
    out = cli("resume", str(sweep), "--no-view", env={"RAY_ADDRESS": ray_cluster})
    assert out.returncode == 0, out.stderr[-3000:]
    for name in finished:  # finished before the kill: never trained again
        assert all(a["time"] < killed_at or "skipped" in a for a in attempts(sweep, name)), name
    tries = attempts(sweep, "random-all-1x-R18")
    resumed = [a for a in tries if a["time"] > killed_at and "start_iter" in a]
    assert resumed and resumed[0]["start_iter"] >= 3
    ml = mlflow_contents(tmp_path, "tiny")
    # One run per trial (check_children); an attempt names it, or none when it was launched before the
    # driver made the run (a kill before Tune saved its state re-releases the trial with the run's id).
    assert {a.get("run_id", "") for a in tries} - {""} <= {ml["children"]["random-all-1x-R18"].info.run_id}
    check_children(ml, {"random-all-2x-R18": [3, 6, 9, 12], "random-8-2x-R18": [3, 6, 9, 12],
                        "random-all-1x-R18": [3, 6]})
    assert duplicate_points(tmp_path) == []


def test_ddp_trial_with_two_gloo_workers(tmp_path, ray_cluster):
    spec = tiny_spec(tmp_path, grid={"data": ["all"]}, resources={"cpus_per_trial": 1.98, "workers_per_trial": 2},
                     base__optim__batch_size=2)
    out = cli("run", str(write_spec(tmp_path, spec)), "--no-view", env={"RAY_ADDRESS": ray_cluster})
    assert out.returncode == 0, out.stderr[-3000:]
    ml = mlflow_contents(tmp_path, "tiny")
    assert ml["history"]["random-all-1x-R18"]["bbox/AP"] == [3, 6]
    assert duplicate_points(tmp_path) == []
