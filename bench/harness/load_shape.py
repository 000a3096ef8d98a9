"""The load sweep's shape and its arrival count, shared by `test_load.py` and `bench/load_sweep.py` (no pytest)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.harness.mlflow_server import MlflowServer
from bench.harness.specs import tiny_spec

PREFIXES = ("train/", "bbox/", "segm/", "seen/")


def load_spec(tmp: Path, uri: str, n: int, name: str = "load") -> dict:
    """`n` two-iteration trials (one evaluation each) that differ only in their base LR."""
    lrs = [round(0.001 * (i + 1), 6) for i in range(n)]
    return tiny_spec(tmp, name=name, tracking_uri=uri, grid={"data": ["all"], "optim.base_lr": lrs},
                     base__schedule__iters_per_x=2, base__eval__period=2, base__checkpoint__period=2,
                     base__runtime__log_period=1, base__data__num_workers=0, fork_schedules=False,
                     keep_checkpoints="none")  # 200 finished trials x 180 MB would fill a disk


def logged_to_mlflow(key: str, value) -> bool:
    """Whether a metrics.jsonl value must reach MLflow: a finite number, and no COCO -1 sentinel
    (an AP of an object size the val set lacks, which the tracker leaves out)."""
    if not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        return False
    return not (key.startswith(("bbox/", "segm/")) and value < 0)


def trial_points(folder: Path) -> set[tuple[str, int]]:
    """The trainer metrics of a trial's metrics.jsonl that its run must hold, as (key, step)."""
    out = set()
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key.startswith(PREFIXES) and logged_to_mlflow(key, value):
                out.add((key, int(row["step"])))
    return out


def count_arrivals(server: MlflowServer, sweep: Path, experiment: str) -> dict:
    """Runs and points in the server's store against the trials' own files."""
    exp = server.query("SELECT experiment_id FROM experiments WHERE name = ?", experiment)[0][0]
    runs = server.query("SELECT r.run_uuid, r.name, r.status, t.value FROM runs r LEFT JOIN tags t ON "
                        "t.run_uuid = r.run_uuid AND t.key = 'role' WHERE r.experiment_id = ?", exp)
    children = {name: (rid, status) for rid, name, status, role in runs if role == "trial"}
    missing, extra, expected_total = {}, {}, 0
    for name, (rid, _) in children.items():
        want = trial_points(sweep / "trials" / name)
        have = server.points(rid)
        expected_total += len(want)
        if want - have:
            missing[name] = sorted(want - have)[:5]
        if have - want:
            extra[name] = sorted(have - want)[:5]
    # The sweep's own run holds one summary point per trial and task: its final AP (`final/<trial>/bbox_AP`).
    parent = [rid for rid, _, _, role in runs if role == "sweep"]
    want_keys = {f"final/{name}/{key}" for name in children for key in ("bbox_AP", "segm_AP")}
    have_keys = [k for k, _ in server.points(parent[0])] if parent else []
    expected_total += len(want_keys)
    if want_keys - set(have_keys):
        missing["(sweep)"] = sorted(want_keys - set(have_keys))[:5]
    if set(have_keys) - want_keys:
        extra["(sweep)"] = sorted(set(have_keys) - want_keys)[:5]
    return {"runs": len(runs), "children": children, "expected_points": expected_total, "missing": missing,
            "extra": extra, "rows": server.query("SELECT COUNT(*) FROM metrics")[0][0],
            "duplicates": server.duplicates()}
