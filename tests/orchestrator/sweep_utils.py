"""Helpers the end-to-end sweep tests share: what a sweep left in MLflow and on disk, killing a driver.

MLflow is read two ways: through `MlflowClient` (runs by role, tags, params, histories, artifacts)
and straight from the SQLite store (every (run, key, step, value) row, to count rows and duplicates
and to compare two sweeps' stores exactly).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.orchestrator.conftest import PYTHON, REPO


def mlflow_contents(tmp: Path, sweep: str) -> dict:
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


def duplicate_points(tmp: Path) -> list:
    """(run, key, step, count) of every metric point logged more than once."""
    with sqlite3.connect(tmp / "mlflow.db") as db:
        return db.execute("SELECT run_uuid, key, step, COUNT(*) FROM metrics GROUP BY run_uuid, key, step "
                          "HAVING COUNT(*) > 1").fetchall()


def store_rows(tmp: Path, sweep: str) -> dict[str, list[tuple]]:
    """The sweep's runs (name, status) and metric rows (run name, key, step, value), sorted, from SQLite.

    Run ids and timestamps differ between two sweeps by nature; names, statuses, keys, steps and
    values must not.
    """
    with sqlite3.connect(tmp / "mlflow.db") as db:
        exp = "SELECT experiment_id FROM experiments WHERE name = ?"
        runs = db.execute(f"SELECT name, status FROM runs WHERE experiment_id = ({exp}) AND "
                          "lifecycle_stage = 'active' ORDER BY name", (sweep,)).fetchall()
        metrics = db.execute(f"SELECT r.name, m.key, m.step, m.value FROM metrics m JOIN runs r "
                             f"ON m.run_uuid = r.run_uuid WHERE r.experiment_id = ({exp}) "
                             "ORDER BY r.name, m.key, m.step, m.value", (sweep,)).fetchall()
    return {"runs": runs, "metrics": metrics}


def attempts(sweep_dir: Path, name: str) -> list[dict]:
    path = sweep_dir / "trials" / name / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_children(ml: dict, expected: dict[str, list[int]]) -> None:
    """One parent, one FINISHED child per trial, tagged and parametrised, with complete curves."""
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
            for m in ("AP", "AP50", "AP75"):
                assert hist[f"{task}/{m}"] == eval_steps, (name, task, m)
            for m in ("APs", "APm", "APl"):  # an evaluation whose size AP is COCO's -1 logs no point
                assert set(hist.get(f"{task}/{m}", [])) <= set(eval_steps), (name, task, m)
        total = eval_steps[-1]
        for key in ("train/loss", "train/loss_mask", "train/lr"):
            assert hist[key] == list(range(1, total + 1)), (name, key)
        assert ml["artifacts"][name] == ["config.yaml", "final_metrics.json"]


def progress(sweep: Path, name: str) -> tuple[bool, int]:
    """(finished, newest checkpoint iteration or 0) of a trial, from its folder."""
    folder = sweep / "trials" / name
    done = (folder / "final_metrics.json").exists()
    ckpts = sorted((folder / "checkpoints").glob("ckpt_*.pt")) if (folder / "checkpoints").exists() else []
    return done, int(ckpts[-1].stem.split("_")[1]) if ckpts else 0


def start_driver(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m orchestrator ARGS` in the background, its output to `log`."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([PYTHON, "-m", "orchestrator", *args], cwd=REPO, env=full_env, stdout=fh,
                                stderr=subprocess.STDOUT)


def wait_for(driver: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 900,
             poll: float = 0.2) -> None:
    """Until `ready()` holds; fails the test if the driver exits first or the point never comes.

    `ready` may assert too.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        assert driver.poll() is None, f"driver exited ({driver.returncode}) first:\n{log.read_text()[-3000:]}"
        time.sleep(poll)
    pytest.fail(f"sweep never reached the point:\n{log.read_text()[-3000:]}")


def kill_driver_when(args: list[str], ready: Callable[[], bool], log: Path, env: dict[str, str] | None = None,
                     timeout: float = 900) -> float:
    """Start a driver, SIGKILL it once `ready()` holds (see `wait_for`); returns the kill time."""
    driver = start_driver(args, log, env)
    try:
        wait_for(driver, ready, log, timeout)
        return time.time()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()


def wait_unlocked(folder: Path, timeout: float = 120) -> None:
    """Until no process holds the trial's lock (an attempt orphaned by a kill has exited)."""
    deadline = time.time() + timeout
    with open(folder / "trial.lock", "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, f"{folder} still locked after {timeout:.0f}s"
                time.sleep(0.5)


def uninterrupted_run(trial: Path, out: Path, world: int = 2) -> dict:
    """A trial's config (its config.yaml) trained uninterrupted from scratch by `world` gloo ranks of the
    trainer alone into `out`: {"final": final metrics, "rows": metrics.jsonl lines}. A forked branch's
    config is its whole schedule (the fork is task metadata), so this is also the unforked run."""
    import torch.multiprocessing as mp
    import yaml

    from tests.trainer.engine.test_ddp import _port
    from tests.trainer.engine.test_preemption import _rank

    cfg = yaml.safe_load((trial / "config.yaml").read_text())
    cfg["runtime"]["output_dir"] = str(out)
    mp.spawn(_rank, args=(world, _port(), cfg, False, False), nprocs=world, join=True)
    return {"final": json.loads((out / "final_metrics.json").read_text()),
            "rows": (out / "metrics.jsonl").read_text().splitlines()}

