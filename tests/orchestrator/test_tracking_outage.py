"""A real `mlflow server` stopped mid-sweep and restarted: training goes on, nothing is lost or doubled.

Injected: SIGTERM to the server's process group once a trial is a few iterations in; the restart on
the same port and store follows (its start-up time is part of the outage). Counted, from the
server's SQLite store: every (run, key, step) each trial wrote to its metrics.jsonl is there exactly
once, each run FINISHED, and each trial trained in one attempt (the outage never failed it). Also:
a sweep whose server is unreachable at start refuses to start, with one line naming tracking_uri.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.plugins.faults import FAULTS
from bench.harness.load_shape import logged_to_mlflow

from tests.orchestrator.conftest import PYTHON, REPO, cli, tiny_spec, write_spec
from bench.harness.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow
PREFIXES = ("train/", "bbox/", "segm/", "seen/")
NAMES = ("random-all-1x-R18", "random-8-1x-R18")


def _rows(sweep: Path, name: str) -> list[dict]:
    path = sweep / "trials" / name / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _expected_points(rows: list[dict]) -> set[tuple[str, int]]:
    """What MLflow must hold: every trainer metric at its step (NaN/inf and COCO's -1 are never logged)."""
    out = set()
    for row in rows:
        for key, value in row.items():
            if key.startswith(PREFIXES) and logged_to_mlflow(key, value):
                out.add((key, int(row["step"])))
    return out


def _spec(tmp: Path, uri: str) -> dict:
    # 30 iterations at >= 1 s each (the delay hook): the outage starts mid-training. Whether the
    # server is back before the trials end (the syncer catches up while they train) or after (it
    # catches up before the driver ends) depends on how fast it restarts; both must end with every
    # point there once.
    return tiny_spec(tmp, tracking_uri=uri, base__runtime__log_period=1, base__schedule__iters_per_x=30,
                     base__eval__period=15, base__checkpoint__period=15, fork_schedules=False)


@pytest.mark.timeout(1500)
def test_server_outage_mid_sweep(tmp_path, ray_cluster):
    server = MlflowServer(tmp_path / "mlflow")
    # Unreachable at start: refused before anything is created or launched.
    path = write_spec(tmp_path, _spec(tmp_path, server.uri))
    refused = cli("run", str(path), "--no-view", env={"RAY_ADDRESS": ray_cluster}, timeout=300)
    assert refused.returncode == 2
    err = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and f"tracking_uri {server.uri}: MLflow server unreachable" in err[0], refused.stderr
    assert not (tmp_path / "runs").exists()

    server.start()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_cluster,
           **FAULTS, "ORCHESTRATOR_DELAY": ",".join(f"{n}@1.0" for n in NAMES)}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(path), "--no-view"], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    sweep = tmp_path / "runs" / "tiny"
    try:
        deadline = time.time() + 600
        while max(len(_rows(sweep, n)) for n in NAMES) < 3:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial reached iteration 3"
            time.sleep(0.3)
        server.stop()
        at_stop = sum(len(_rows(sweep, n)) for n in NAMES)
        time.sleep(5)  # a few iterations with the server gone for sure, however fast it restarts
        restart_s = server.start()
        during = sum(len(_rows(sweep, n)) for n in NAMES) - at_stop
        code = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    driver_log = (tmp_path / "driver.log").read_text()
    assert code == 0, driver_log[-3000:]
    print(f"outage: >= {5 + restart_s:.0f}s; metric rows the trials wrote meanwhile: {during}")
    assert during > 0, "the trials wrote nothing while the server was down: no outage was exercised"

    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = {r.data.tags["trial_name"]: r for r in runs if r.data.tags.get("role") == "trial"}
    assert sorted(children) == sorted(NAMES) and len(runs) == 3
    for name in NAMES:
        run = children[name]
        expected = _expected_points(_rows(sweep, name))
        assert run.info.status == "FINISHED", name
        assert len(expected) > 30 * 3, name  # loss terms at every iteration plus two evaluations
        assert server.points(run.info.run_id) == expected, name
        tries = [json.loads(x) for x in (sweep / "trials" / name / "attempts.jsonl").read_text().splitlines()]
        assert [a.get("start_iter") for a in tries] == [0], f"{name}: the outage must not fail training"
    assert "MLflow unreachable" in driver_log, "the driver's syncer never saw the outage"
    assert "MLflow reachable again" in driver_log, driver_log[-3000:]
    assert server.duplicates() == []
    rows = server.query("SELECT COUNT(*) FROM metrics")[0][0]
    print(f"metric rows in the store: {rows}, duplicates: 0, runs: {len(runs)}")
    server.stop()
