"""Fixtures of the dashboard tests: a hand-made MLflow store (fast) and a real small finished sweep (slow).

`fake_sweep` writes a sweep's runs with the orchestrator's own `SweepTracker` (the same tags, names
and params a real sweep has) and analytic AP curves, so figures and tables can be checked against
known values in seconds. `small_sweep` runs a real sweep (a pretrain job + 6 tiny trials on a local
Ray and a SQLite store) once per session, for the report and the browser tests.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.orchestrator.conftest import cli, tiny_spec, write_spec

BATCH = 16
PX = 800 * 1333


@dataclass
class FakeTrial:
    init: str
    data: str
    schedule: str
    backbone: str

    @property
    def name(self) -> str:
        return f"{self.init}-{self.data}-{self.schedule}-{self.backbone}"


FAKE_GRID = [FakeTrial(i, "all", s, b) for b in ("R50", "R101") for i in ("random", "imagenet") for s in ("2x", "6x")]
FAKE_GRID += [FakeTrial(i, "10k", "2x", "R50") for i in ("random", "imagenet")]
ITERS_PER_X = 10
EVAL_PERIOD = 10
LOG_PERIOD = 5


def fake_ap(trial: FakeTrial, step: int) -> float:
    """A made-up AP curve in [0, 1]: pre-trained starts fast, random init catches up with time, and
    the last evaluation of a schedule (after its LR drops) gains a little."""
    ceiling = 0.40 if trial.data == "all" else 0.24
    tau = 8.0 if trial.init == "imagenet" else 25.0
    total = int(trial.schedule.rstrip("x")) * ITERS_PER_X
    return ceiling * (1 - math.exp(-step / tau)) + (0.02 if step == total else 0.0)


def fake_sweep(tmp: Path, name: str = "fake", unfinished: str | None = None) -> str:
    """Write the runs of FAKE_GRID to sqlite:///tmp/mlflow.db; returns the URI. `unfinished`: a
    trial name left RUNNING at half its schedule."""
    from orchestrator.tracking.mlflow_runs import SweepTracker

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = SweepTracker(uri, name, "abc123", "test")
    tracker.open_parent("name: fake\n")
    for k, t in enumerate(FAKE_GRID):
        params = {"model.init": t.init, "model.backbone": t.backbone, "schedule.length": t.schedule,
                  "schedule.iters_per_x": ITERS_PER_X, "schedule.iters": None, "optim.batch_size": BATCH}
        run_id = tracker.child_run(f"t{k}", t.name, {"init": t.init, "data": t.data, "schedule": t.schedule,
                                                     "backbone": t.backbone}, params)
        total = int(t.schedule.rstrip("x")) * ITERS_PER_X
        last = total // 2 if t.name == unfinished else total
        log = tracker.metric_logger(run_id)
        for step in range(LOG_PERIOD, last + 1, LOG_PERIOD):
            metrics = {"seen/images": step * BATCH, "seen/instances": step * BATCH * 7,
                       "seen/pixels": step * BATCH * PX, "train/loss": 1.0 / step}
            if step % EVAL_PERIOD == 0 or step == total:
                ap = fake_ap(t, step)
                for task, scale in (("bbox", 1.0), ("segm", 0.9)):
                    metrics.update({f"{task}/AP": ap * scale, f"{task}/AP50": ap * scale * 1.5,
                                    f"{task}/AP75": ap * scale * 1.1, f"{task}/APs": -1.0,
                                    f"{task}/APm": ap * scale * 0.8, f"{task}/APl": ap * scale * 1.2})
            log.log(step, metrics)
        tracker.set_status(run_id, "RUNNING" if t.name == unfinished else "FINISHED")
    tracker.finish("KILLED" if unfinished else "FINISHED")
    return uri


# ------------------------------------------------------------------------------------------------
# A real small sweep: both inits (a 4-iteration pretrain job as the pre-trained one), two schedules,
# two data sizes.

SMALL_NAME = "dash"


def small_sweep_spec(tmp: Path) -> dict:
    spec = tiny_spec(tmp, name=SMALL_NAME,
                     grid={"init": ["random", "pretrained:tiny-r18"], "data": ["all", 8], "schedule": ["1x", "2x"],
                           "backbone": ["R18"]},
                     exclude=[{"data": 8, "schedule": "2x"}])
    spec["dataset"]["generate"].update({"classification": True, "cls_train": 4, "cls_val": 2, "cls_size": 32})
    spec["pretrain"] = {"tiny-r18": {"config": {"backbone": "R18", "norm": "GN", "image_size": 32, "iters": 4,
                                                "batch_size": 8, "num_workers": 0, "threads": 1,
                                                "warmup_iters": 1, "log_period": 2}}}
    return spec


@dataclass
class SmallSweep:
    tmp: Path
    spec: Path
    sweep_dir: Path
    uri: str


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory) -> SmallSweep:
    """A real finished sweep (local Ray started by the driver, SQLite MLflow), run once per session."""
    tmp = tmp_path_factory.mktemp("dash_sweep")
    path = write_spec(tmp, small_sweep_spec(tmp))
    t0 = time.time()
    # RAY_ADDRESS="" makes the driver start its own local cluster (127.0.0.1), whatever the shell has.
    out = cli("run", str(path), "--no-view", env={"RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"small sweep took {time.time() - t0:.0f}s")
    return SmallSweep(tmp, path, tmp / "runs" / SMALL_NAME, f"sqlite:///{tmp / 'mlflow.db'}")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Screenshots and reports kept after the run: $DASHBOARD_ARTIFACTS, else the git-ignored
    reports/test-artifacts/dashboards."""
    root = Path(os.environ.get("DASHBOARD_ARTIFACTS", Path(__file__).resolve().parents[2] / "reports" / "test-artifacts"
                               / "dashboards"))
    root.mkdir(parents=True, exist_ok=True)
    return root
