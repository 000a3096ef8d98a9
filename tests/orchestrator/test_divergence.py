"""A trial that diverges for real (base LR 100, no clipping) fails with its reason; the sweep goes on.

Injected: an override that gives one of two trials `optim.base_lr: 100` and no gradient clipping;
its loss is non-finite within a few iterations (the trainer raises NonFiniteLossError). Counted: the
other trial FINISHED with its full curve; the diverged one trained in exactly one attempt (Tune's
retries, max_failures=2, re-raise the recorded divergence without training); its reason (iteration,
loss) is in the final table of `run`, in `status`, and on its MLflow run (FAILED, `failure_reason`).
"""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from tests.orchestrator.conftest import cli, tiny_spec, write_spec

pytestmark = pytest.mark.slow
BAD, GOOD = "random-8-1x-R18", "random-all-1x-R18"


@pytest.mark.timeout(900)
def test_diverging_trial_fails_with_its_reason(tmp_path, ray_cluster):
    spec = tiny_spec(tmp_path, retry={"max_failures": 2},
                     overrides=[{"when": {"data": 8}, "set": {"optim.base_lr": 100.0, "optim.grad_clip": None}}])
    path = write_spec(tmp_path, spec)
    out = cli("run", str(path), env={"RAY_ADDRESS": ray_cluster})  # with the table (printed at the end)
    assert out.returncode == 1, out.stderr[-3000:]
    sweep = tmp_path / "runs" / "tiny"
    record = json.loads((sweep / "trials" / BAD / "diverged.json").read_text())
    reason = f"diverged: loss {record['loss']} at iteration {record['iteration']}"
    assert record["loss"] in ("nan", "inf", "-inf") and 0 < record["iteration"] <= 6
    assert f"! {BAD}: {reason}" in out.stdout, out.stdout[-2000:]

    tries = [json.loads(x) for x in (sweep / "trials" / BAD / "attempts.jsonl").read_text().splitlines()]
    trained = [t for t in tries if "start_iter" in t]
    assert len(trained) == 1, tries  # trained once; a retry only re-raises the recorded divergence
    assert all(t.get("skipped") == "diverged" for t in tries if "start_iter" not in t)
    assert len(tries) <= 1 + 2  # bounded by max_failures, never forever

    status = cli("status", str(sweep))
    assert status.returncode == 0
    assert re.search(rf"{BAD}\s+ERROR", status.stdout) and f"! {BAD}: {reason}" in status.stdout, status.stdout
    assert "1 error" in status.stdout and "1 finished" in status.stdout

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = {r.data.tags.get("trial_name"): r for r in runs if r.data.tags.get("role") == "trial"}
    assert children[BAD].info.status == "FAILED" and children[BAD].data.tags["failure_reason"] == reason
    assert children[GOOD].info.status == "FINISHED"
    hist = [m.step for m in client.get_metric_history(children[GOOD].info.run_id, "bbox/AP")]
    assert hist == [3, 6]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("SELECT COUNT(*) FROM (SELECT 1 FROM metrics GROUP BY run_uuid, key, step "
                          "HAVING COUNT(*) > 1)").fetchone()[0] == 0
