"""The one path to MLflow (`orchestrator.tracking.metric_sync`), without Ray: hand-written metrics.jsonl files
tailed into a real MLflow store (SQLite, and a real `mlflow server` stopped and restarted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.tracking.metric_sync import MetricSync
from orchestrator.tracking.mlflow_runs import SweepTracker
from bench.harness.mlflow_server import MlflowServer

PLAIN, TRUNK, BRANCH = "t-plain", "t-trunk", "t-branch"


def _record() -> dict:
    return {"name": "sync", "trials": [
        {"trial_id": "p", "name": PLAIN, "total_iters": 250},
        {"trial_id": "b", "name": BRANCH, "total_iters": 30, "fork": {"trunk_id": "k", "at": 20}}],
        "trunks": [{"trial_id": "k", "name": TRUNK, "total_iters": 20, "role": "trunk"}]}


def _append(sweep: Path, name: str, rows: list[dict]) -> None:
    folder = sweep / "trials" / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _train(steps) -> list[dict]:
    return [{"step": s, "train/loss": 1.0 / s, "train/lr": 0.02, "seen/images": 2 * s} for s in steps]


def _open(uri: str, sweep: Path, period: int) -> tuple[SweepTracker, MetricSync]:
    tracker = SweepTracker(uri, "sync", "h", "v")
    tracker.open_parent()
    runs = {tid: tracker.child_run(tid, name, {}, {}) for tid, name in (("p", PLAIN), ("b", BRANCH))}
    return tracker, MetricSync(tracker, sweep, _record(), runs, period=period, interval=0.2)


def _points(tracker: SweepTracker, trial_id: str, sync: MetricSync, key: str) -> list[int]:
    return [m.step for m in tracker.client.get_metric_history(sync.run_ids[trial_id], key)]


def test_period_forks_posts_and_restarts(tmp_path):
    sweep = tmp_path / "sweep"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, sync = _open(uri, sweep, period=100)
    _append(sweep, PLAIN, _train(range(20, 120, 20)) + [{"step": 100, "bbox/AP": 0.1, "bbox/APs": -1.0}])
    _append(sweep, PLAIN, _train([*range(120, 260, 20), 250]))
    _append(sweep, TRUNK, _train(range(5, 30, 5)))  # the trunk trained past this branch's fork point
    _append(sweep, BRANCH, _train([25, 30]) + [{"step": 30, "segm/AP": 0.2}])
    _append(sweep, PLAIN, [{"step": 250, "bbox/AP": 0.3}])
    assert sync.sync_all()
    # Losses, LR, seen/*: the first row, the first past each multiple of 100, the final one (250).
    for key in ("train/loss", "train/lr", "seen/images"):
        assert _points(tracker, "p", sync, key) == [20, 100, 200, 250], key
    assert _points(tracker, "p", sync, "bbox/AP") == [100, 250]  # evaluations: every one
    assert _points(tracker, "p", sync, "bbox/APs") == []  # COCO's -1: not an AP
    # The branch's run: its trunk's rows up to the fork point (20), then its own (30 is its final row).
    assert _points(tracker, "b", sync, "train/loss") == [5, 30]
    assert _points(tracker, "b", sync, "segm/AP") == [30]
    sync.post("p", status="FINISHED", tags={"note": "x"}, artifacts=True)
    assert sync.sync_all() and sync.sync_all()
    run = tracker.client.get_run(sync.run_ids["p"])
    assert run.info.status == "FINISHED" and run.data.tags["note"] == "x"

    # A restarted driver (fresh syncer) over the same files, one rewritten the way a resume does
    # (rows past the checkpoint dropped, then replayed): nothing is written twice.
    folder = sweep / "trials" / PLAIN / "metrics.jsonl"
    tmp = folder.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in folder.read_text().splitlines()[:5]))
    tmp.replace(folder)
    _append(sweep, PLAIN, _train(range(120, 260, 20)))
    tracker2, sync2 = _open(uri, sweep, period=100)
    assert sync2.sync_all() and sync2.sent == 0
    assert _points(tracker2, "p", sync2, "train/loss") == [20, 100, 200, 250]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_outage_keeps_the_place_and_catches_up(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    sweep = tmp_path / "sweep"
    tracker, sync = _open(server.uri, sweep, period=1)
    try:
        _append(sweep, PLAIN, _train(range(1, 11)))
        assert sync.sync_all()
        server.stop()
        _append(sweep, PLAIN, _train(range(11, 21)))
        sync.post("p", status="FINISHED")
        assert not sync.sync_all()  # refused, place kept
        server.start()
        sync.start()  # the thread retries with backoff until the server answers
        left = sync.close(settle_s=120)
        assert left == []
        assert server.points(sync.run_ids["p"]) == {(k, s) for s in range(1, 21)
                                                    for k in ("train/loss", "train/lr", "seen/images")}
        assert server.duplicates() == []
        assert tracker.client.get_run(sync.run_ids["p"]).info.status == "FINISHED"
    finally:
        server.stop()


def test_one_call_site_writes_metric_points_and_no_test_hook_in_product_code():
    root = Path(__file__).resolve().parents[2]
    writes, hooks = [], []
    for pkg in ("orchestrator", "trainer", "dashboards"):
        for path in sorted((root / pkg).rglob("*.py")):
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if pkg == "orchestrator" and ("log_metric(" in line or ("log_batch(" in line and "metrics=" in line)):
                    writes.append(f"{path.name}:{no}")
                if "ORCHESTRATOR_FAIL_ONCE" in line or "ORCHESTRATOR_DELAY" in line:
                    hooks.append(f"{path.name}:{no}")
    assert len(writes) == 1 and writes[0].startswith("mlflow_runs.py:"), writes
    assert hooks == []
