"""Schedule forking end to end: a real local Ray cluster, a real SQLite MLflow store, SIGKILL of the driver.

A forked sweep's schedules must equal an unforked sweep's bit for bit (losses, APs, final metrics),
train exactly the iterations `plan` promises, and survive a killed driver while a trunk and a branch
run: the trunk resumes from its own checkpoint, the branch from its own (never forked twice), and
every schedule ends with a complete, duplicate-free MLflow trajectory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestrator.sweep.expand import expand
from orchestrator.sweep.plan import forked_totals, plan_rows, trunk_rows
from orchestrator.sweep.spec import load_spec
from orchestrator.state.folder import metric_rows, trained_iterations
from tests.plugins.faults import FAULTS
from tests.orchestrator.conftest import cli, tiny_spec, write_spec
from bench.harness.load_shape import logged_to_mlflow
from tests.orchestrator.sweep_utils import (attempts, check_children, duplicate_points, kill_driver_when,
                                            mlflow_contents)

pytestmark = pytest.mark.slow

# iters_per_x 6: 1x = 6 iterations (drops 2, 5), 2x = 12 (8, 11), 3x = 18 (14, 17); forks at 2, 8, 14.
GRID = {"init": ["random"], "data": ["all"], "schedule": ["1x", "2x", "3x"], "backbone": ["R18"]}
EVALS = {"random-all-1x-R18": [3, 6], "random-all-2x-R18": [3, 6, 9, 12],
         "random-all-3x-R18": [3, 6, 9, 12, 15, 18]}
FORKS = {"random-all-1x-R18": 2, "random-all-2x-R18": 8, "random-all-3x-R18": 14}
TRUNK = "random-all-trunk-R18"


def _curves(tmp: Path, sweep: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(sweep)
    return {r.info.run_name: {k: [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, k),
                                                                     key=lambda m: m.step)]
                              for k in r.data.metrics}
            for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("role") == "trial"}


def _disk_curve(sweep: Path, name: str) -> list[tuple[int, dict]]:
    """A schedule's whole trajectory on disk: its trunk's rows up to the fork point, then its own."""
    return metric_rows(sweep, TRUNK, upto=FORKS[name]) + metric_rows(sweep, name)


def _as_curves(rows: list[tuple[int, dict]]) -> dict[str, list[tuple[int, float]]]:
    """Rows on disk as the curves MLflow holds of them (COCO's -1 size APs are not logged)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in rows:
        for key, value in metrics.items():
            if logged_to_mlflow(key, value):
                out.setdefault(key, []).append((step, value))
    return out


def test_forked_sweep_equals_unforked_bit_for_bit(tmp_path, ray_cluster):
    walls, specs = {}, {}
    for name, fork in (("forked", True), ("unforked", False)):
        specs[name] = write_spec(tmp_path, tiny_spec(tmp_path, name=name, grid=GRID, fork_schedules=fork,
                                                     base__runtime__log_period=1), f"{name}.yaml")
        t0 = time.time()
        out = cli("run", str(specs[name]), "--no-view", env={"RAY_ADDRESS": ray_cluster})
        walls[name] = time.time() - t0
        assert out.returncode == 0, out.stderr[-3000:]
    print(f"tiny sweep {GRID['schedule']} wall time: forked {walls['forked']:.0f}s, "
          f"unforked {walls['unforked']:.0f}s")
    forked, unforked = mlflow_contents(tmp_path, "forked"), mlflow_contents(tmp_path, "unforked")
    check_children(forked, EVALS)
    check_children(unforked, EVALS)
    assert duplicate_points(tmp_path) == []
    # Every point of every schedule's MLflow curve, bit for bit; the final metrics too.
    a, b = _curves(tmp_path, "forked"), _curves(tmp_path, "unforked")
    assert a == b
    runs = tmp_path / "runs"
    for name, at in FORKS.items():
        tags = forked["children"][name].data.tags
        assert (tags["fork.trunk"], tags["fork.iteration"]) == (TRUNK, str(at))
        assert (json.loads((runs / "forked" / "trials" / name / "final_metrics.json").read_text())
                == json.loads((runs / "unforked" / "trials" / name / "final_metrics.json").read_text()))
        assert _disk_curve(runs / "forked", name) == metric_rows(runs / "unforked", name)
        assert _as_curves(_disk_curve(runs / "forked", name)) == a[name]
    # The iterations trained (each attempt's start..end) are what `plan` says, with and without forking.
    for name, trained in (("forked", 26), ("unforked", 36)):
        exp = expand(load_spec(specs[name]))
        naive, planned = forked_totals(plan_rows(exp), trunk_rows(exp))
        assert (naive, planned) == (36, trained)
        names = [t.name for t in exp.trials] + [k.name for k in exp.forks.trunks]
        assert trained_iterations(runs / name, names) == planned
    # keep_checkpoints (default final): a finished branch keeps its last checkpoint; the trunk's fork
    # points went once their branches had checkpoints of their own (trunk_done.json says it is done).
    trials = runs / "forked" / "trials"
    for name, evals in EVALS.items():
        assert sorted(p.name for p in (trials / name / "checkpoints").glob("ckpt_*.pt")) == [f"ckpt_{evals[-1]:07d}.pt"]
    assert not list((trials / TRUNK / "checkpoints").glob("ckpt_*.pt"))
    assert (trials / TRUNK / "trunk_done.json").exists()


def _has(folder: Path, pattern: str) -> bool:
    return any(folder.glob(pattern))


def test_driver_killed_while_trunk_and_branch_run(tmp_path, ray_cluster):
    path = write_spec(tmp_path, tiny_spec(tmp_path, grid=GRID, base__runtime__log_period=1))
    sweep = tmp_path / "runs" / "tiny"
    trunk, one = sweep / "trials" / TRUNK, sweep / "trials" / "random-all-1x-R18"
    # Slow the trunk and the 1x branch down (test hook) so both are mid-way at the kill.
    env = {"RAY_ADDRESS": ray_cluster, **FAULTS, "ORCHESTRATOR_DELAY": f"{TRUNK}@2.5,random-all-1x-R18@1"}

    def ready() -> bool:
        assert not (trunk / "trunk_done.json").exists(), "the trunk finished before the kill"
        return _has(one, "checkpoints/ckpt_*.pt") and not (one / "final_metrics.json").exists()

    killed_at = kill_driver_when(["run", str(path), "--no-view"], ready, tmp_path / "driver1.log", env)
    out = cli("resume", str(sweep), "--no-view", env={"RAY_ADDRESS": ray_cluster})
    assert out.returncode == 0, out.stderr[-3000:]
    ml = mlflow_contents(tmp_path, "tiny")
    check_children(ml, EVALS)
    assert duplicate_points(tmp_path) == []
    curves = _curves(tmp_path, "tiny")
    for name in FORKS:
        assert curves[name] == _as_curves(_disk_curve(sweep, name)), name
        tries = attempts(sweep, name)
        assert not any("skipped" in a for a in tries), name  # Tune never held a task twice
        assert sum("forked_from" in a for a in tries) == 1, (name, tries)  # forked exactly once
        # Its own MLflow run throughout, though it started from the trunk's checkpoint (and tracking dict):
        # check_children found one run per trial; an attempt names that run, or none when it was launched
        # before the driver made the run (runs are made when their trial starts).
        assert {a["run_id"] for a in tries} - {""} <= {ml["children"][name].info.run_id}, name
    # The killed branch continued from its own checkpoint, the killed trunk from its own.
    resumed = [a for a in attempts(sweep, "random-all-1x-R18") if a["time"] > killed_at]
    assert resumed and resumed[0]["start_iter"] >= 3 and "forked_from" not in resumed[0]
    resumed = [a for a in attempts(sweep, TRUNK) if a["time"] > killed_at]
    assert resumed and resumed[0]["start_iter"] >= 3
    status = cli("status", str(sweep))
    assert status.returncode == 0 and "total: 3 trials + 1 trunks (4 finished)" in status.stdout
