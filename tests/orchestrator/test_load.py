"""Load: many short real trials through a real Ray cluster and a real `mlflow server`; every run and point arrives.

Injected: a sweep of `N_TRIALS` trials of a tiny real config (2 iterations, one evaluation), a grid
over `optim.base_lr`, logging straight from the trials to the server (their buffered senders) with
the driver filling what they did not send. Counted: one FINISHED child run per trial plus the
parent, and in each run exactly the (key, step) points of that trial's metrics.jsonl; duplicates 0.
`bench/load_sweep.py` runs the same shape at 200 trials and measures the overhead and throughput.
"""

from __future__ import annotations

import pytest

from bench.harness.load_shape import count_arrivals, load_spec
from bench.harness.mlflow_server import MlflowServer
from bench.harness.specs import cli, write_spec

pytestmark = pytest.mark.slow
N_TRIALS = 10  # the suite's time budget; bench/load_sweep.py runs 200


@pytest.mark.timeout(1800)
def test_every_run_and_point_arrives(tmp_path, ray_cluster):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        path = write_spec(tmp_path, load_spec(tmp_path, server.uri, N_TRIALS))
        out = cli("run", str(path), "--no-view", env={"RAY_ADDRESS": ray_cluster}, timeout=1500)
        assert out.returncode == 0, out.stderr[-3000:]
        got = count_arrivals(server, tmp_path / "runs" / "load", "load")
    finally:
        server.stop()
    print(f"trials {N_TRIALS}: runs {got['runs']}, metric rows {got['rows']} (expected {got['expected_points']}), "
          f"duplicates {len(got['duplicates'])}")
    assert got["runs"] == N_TRIALS + 1 and len(got["children"]) == N_TRIALS
    assert {status for _, status in got["children"].values()} == {"FINISHED"}
    assert got["missing"] == {} and got["extra"] == {}
    assert got["rows"] == got["expected_points"] and got["duplicates"] == []
    assert got["expected_points"] >= N_TRIALS * 24  # 2 logged iterations and an evaluation each (size APs of
    # sizes the tiny val set lacks are COCO -1 sentinels, never logged)
    assert not list((tmp_path / "runs" / "load" / "trials").glob("*/checkpoints/*.pt"))  # keep_checkpoints: none
