"""Reliability against a real local Ray head and a real SQLite MLflow store: a driver SIGKILLed again
and again, and a truncated newest checkpoint.

What each test injects and what it counts is printed as one `reliability:` line (pytest -s shows it).
The lost worker node and the whole cluster stopped are in test_reliability_cluster_ray.py (they need
clusters of their own).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from orchestrator.state.folder import metric_rows
from tests.plugins.faults import FAULTS
from tests.orchestrator.conftest import cli, tiny_spec, write_spec
from bench.harness.load_shape import logged_to_mlflow
from tests.orchestrator.sweep_utils import (attempts, check_children, duplicate_points, kill_driver_when,
                                            mlflow_contents, progress, store_rows, wait_unlocked)
from trainer.engine.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

TRIALS = ("random-all-2x-R18", "random-8-2x-R18")
EVALS = [3, 6, 9, 12]  # 2x of iters_per_x 6: 12 iterations, an evaluation and a checkpoint every 3


def _spec(tmp: Path, sub: str, names: tuple[str, ...] = TRIALS) -> Path:
    """The same sweep (name `tiny`) with its own storage and MLflow store under tmp/sub."""
    (tmp / sub).mkdir()
    data = [n.split("-")[1] for n in names]
    grid = {"init": ["random"], "data": [d if d == "all" else int(d) for d in data], "schedule": ["2x"],
            "backbone": ["R18"]}
    spec = tiny_spec(tmp, grid=grid, base__runtime__log_period=1, storage_path=str(tmp / sub / "runs"),
                     tracking_uri=f"sqlite:///{tmp / sub / 'mlflow.db'}")
    return write_spec(tmp / sub, spec)


def _iterations(sweep: Path) -> int:
    """Iterations the trials' metrics.jsonl files hold (a resumed trial first cuts back to its checkpoint)."""
    return sum(max((s for s, _ in metric_rows(sweep, n)), default=0) for n in TRIALS)


@pytest.mark.timeout(1200)
def test_driver_killed_at_random_points_equals_an_uninterrupted_sweep(tmp_path, ray_cluster):
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    # Kill points: the sweep's trained iterations (of 24) reach each threshold, then a random 0-1 s more.
    thresholds = sorted(rng.sample(range(2, 20), 3))
    jitters = [rng.uniform(0.0, 1.0) for _ in thresholds]
    env = {"RAY_ADDRESS": ray_cluster}
    out = cli("run", str(_spec(tmp_path, "ref")), "--no-view", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    path, sweep = _spec(tmp_path, "killed"), tmp_path / "killed" / "runs" / "tiny"
    kills = []
    for k, (at, jitter) in enumerate(zip(thresholds, jitters)):
        reached: list[float] = []

        def ready() -> bool:
            if not reached and _iterations(sweep) >= at:
                reached.append(time.time())
            return bool(reached) and time.time() >= reached[0] + jitter

        args = ["run", str(path), "--no-view"] if k == 0 else ["resume", str(sweep), "--no-view"]
        kill_driver_when(args, ready, tmp_path / f"driver{k}.log", env)
        kills.append(_iterations(sweep))
    out = cli("resume", str(sweep), "--no-view", env=env)
    assert out.returncode == 0, f"seed {seed}: {out.stderr[-3000:]}"
    ref, killed = store_rows(tmp_path / "ref", "tiny"), store_rows(tmp_path / "killed", "tiny")
    # Same runs (names, statuses) and the same (run, metric, step, value) rows, nothing more, nothing less.
    assert killed["runs"] == ref["runs"], f"seed {seed}"
    assert killed["metrics"] == ref["metrics"], f"seed {seed}"
    assert duplicate_points(tmp_path / "ref") == [] and duplicate_points(tmp_path / "killed") == []
    ml = mlflow_contents(tmp_path / "killed", "tiny")
    check_children(ml, {n: EVALS for n in TRIALS})
    for name in TRIALS:  # every attempt of a trial logged into its one run; an attempt launched before the
        # driver made the run names none (a kill before Tune saved its state re-launches it with the id)
        ids = {a.get("run_id", "") for a in attempts(sweep, name)} - {""}
        assert ids <= {ml["children"][name].info.run_id}, (seed, name, ids)
    restarts = sum(1 for n in TRIALS for a in attempts(sweep, n) if a.get("start_iter", 0) > 0)
    print(f"reliability: driver SIGKILLed {len(kills)}x (seed {seed}, at {kills} of 24 iterations), resumed "
          f"{len(kills)}x, {restarts} trial restarts from checkpoints; finished trials "
          f"{sum(progress(sweep, n)[0] for n in TRIALS)}/{len(TRIALS)}; runs {len(killed['runs'])} (reference "
          f"{len(ref['runs'])}); metric rows {len(killed['metrics'])} (reference {len(ref['metrics'])}); "
          f"duplicates 0")


@pytest.mark.timeout(900)
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, ray_cluster):
    name = TRIALS[0]
    path, sweep = _spec(tmp_path, "s", (name,)), tmp_path / "s" / "runs" / "tiny"
    folder = sweep / "trials" / name
    env = {"RAY_ADDRESS": ray_cluster}

    def ready() -> bool:
        done, ckpt = progress(sweep, name)
        return not done and ckpt >= 6

    # A delay (test hook) holds the window between its second checkpoint and its end open.
    kill_driver_when(["run", str(path), "--no-view"], ready, tmp_path / "driver1.log",
                     {**env, **FAULTS, "ORCHESTRATOR_DELAY": f"{name}@0.5"})
    wait_unlocked(folder)  # the attempt the killed driver left behind has exited
    (previous, _), (newest_iter, newest) = list_checkpoints(folder / "checkpoints")[-2:]
    size = newest.stat().st_size
    newest.write_bytes(newest.read_bytes()[: size // 2])
    truncated_at = time.time()
    out = cli("resume", str(sweep), "--no-view", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    # The driver's own output names the file the trial skipped.
    assert f"skipping damaged checkpoint {newest}" in out.stderr, out.stderr[-3000:]
    resumed = [a for a in attempts(sweep, name) if a["time"] > truncated_at and "start_iter" in a]
    assert [a["start_iter"] for a in resumed] == [previous], resumed
    assert str(newest) in resumed[0]["warnings"][0]
    # A complete curve, each (step, key) once, on disk and in MLflow, and the same values in both.
    disk = [(k, s, v) for s, row in metric_rows(sweep, name) for k, v in row.items()]
    assert len({(k, s) for k, s, _ in disk}) == len(disk)
    assert sorted(s for k, s, _ in disk if k == "train/loss") == list(range(1, 13))
    check_children(mlflow_contents(tmp_path / "s", "tiny"), {name: EVALS})
    assert duplicate_points(tmp_path / "s") == []
    stored = store_rows(tmp_path / "s", "tiny")["metrics"]
    # The trial's run (the sweep's own run holds its final AP as a summary point besides).
    assert sorted((k, s, v) for run, k, s, v in stored if run == name) == sorted((k, s, v) for k, s, v in disk
                                                                                 if logged_to_mlflow(k, v))
    print(f"reliability: truncated {newest.name} ({size} -> {size // 2} bytes); resumed from iteration "
          f"{previous} (not {newest_iter}); finished trials {int(progress(sweep, name)[0])}/1; metric rows "
          f"{len(stored)} (disk {len(disk)}); duplicates 0")
