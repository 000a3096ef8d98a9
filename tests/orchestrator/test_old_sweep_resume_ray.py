"""A sweep folder written by the previous commit's code (990dd5f) resumes and finishes with this code.

The fixture (tests/fixtures/sweep_990dd5f, made by its make_fixture.py) is a forked tiny sweep whose
driver was SIGKILLed mid-sweep: a finished plain trial, a finished branch, an unfinished branch and
its trunk, Tune's experiment state (the task dicts of that code, pickled), the MLflow store. It lives
under a placeholder root of fixed length; the copy goes to a path of that length, with every file
rewritten byte for byte (a pickled string keeps its length).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.state.folder import metric_rows
from tests.orchestrator.conftest import cli
from bench.harness.load_shape import logged_to_mlflow
from tests.orchestrator.sweep_utils import duplicate_points

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sweep_990dd5f"
OLD_ROOT = "/tmp/" + "sweep990dd5f".ljust(96 - len("/tmp/"), "_")  # make_fixture.ROOT
TRUNK = "random-all-trunk-R18"
FORKS = {"random-all-1x-R18": 2, "random-all-2x-R18": 8}  # branch -> its fork point
TRIALS = ["random-8-1x-R18", *FORKS]


def relocate(dest_parent: Path) -> Path:
    """The fixture copied to a folder whose path is as long as the placeholder root; returns that folder."""
    pad = len(OLD_ROOT) - len(str(dest_parent)) - 1
    assert pad > 0, f"{dest_parent} is too long for the fixture's placeholder root"
    root = dest_parent / ("r" * pad)
    shutil.copytree(FIXTURE / "root", root)
    old, new = OLD_ROOT.encode(), str(root).encode()
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if old in data:
                path.write_bytes(data.replace(old, new))
    return root


def _mlflow_curves(root: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("old")
    return {r.info.run_name: {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
                              for k in r.data.metrics}
            for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("role") == "trial"}


def _disk_curves(sweep: Path, name: str) -> dict[str, list[tuple[int, float]]]:
    rows = (metric_rows(sweep, TRUNK, upto=FORKS[name]) if name in FORKS else []) + metric_rows(sweep, name)
    out: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in rows:
        for key, value in metrics.items():
            if logged_to_mlflow(key, value):
                out.setdefault(key, []).append((step, value))
    return {k: sorted(v) for k, v in out.items()}


def test_a_sweep_of_the_previous_commit_resumes_and_finishes(tmp_path, ray_cluster):
    root = relocate(tmp_path)
    sweep = root / "runs" / "old"
    assert not (sweep / "trials" / "random-all-2x-R18" / "final_metrics.json").exists()
    # From the sweep's working folder, as its driver ran: the spec's paths are relative to it.
    out = cli("resume", str(sweep), "--no-view", env={"RAY_ADDRESS": ray_cluster}, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in TRIALS:
        assert (sweep / "trials" / name / "final_metrics.json").exists(), name
    status = cli("status", str(sweep), cwd=root)
    assert status.returncode == 0 and "total: 3 trials + 1 trunks (4 finished)" in status.stdout, status.stdout
    # MLflow holds every point of every trial's metrics.jsonl (a branch's: its trunk's up to the fork), once.
    assert duplicate_points(root) == []
    curves = _mlflow_curves(root)
    assert sorted(curves) == sorted(TRIALS)
    for name in TRIALS:
        assert curves[name] == _disk_curves(sweep, name), name
