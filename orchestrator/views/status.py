"""`status`: the trial table of a sweep from what is stored on disk, without Ray running.

The driver's state.json says what it last knew; each trial's own folder (final_metrics.json,
metrics.jsonl) says how far it really got, which matters after a driver was killed. A trial the
state calls RUNNING whose driver is gone is shown as INTERRUPTED (`run` or `resume` continues it).
Preemptions come from each trial's attempts.jsonl (its preempted attempts' rows), apart from failures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orchestrator.state.folder as st
from orchestrator.views.view import APS, Row, render


def status_rows(sweep_dir: Path) -> tuple[dict[str, Any], list[Row]]:
    record = st.read_record(sweep_dir)
    if record is None:
        raise FileNotFoundError(sweep_dir / st.RECORD)
    saved = st.read_state(sweep_dir)
    alive = st.driver_alive(saved.get("driver", {}))
    rows = []
    for t in st.task_rows(record):
        prev = saved.get("trials", {}).get(t.trial_id, {})
        trunk = t.role == "trunk"
        disk = st.disk_progress(sweep_dir, t.name, trunk_stop=t.total if trunk else None)
        row = Row(name=t.name, total=t.total, attempts=prev.get("attempts", 0),
                  iteration=max(int(prev.get("iteration") or 0), int(disk.get("iteration") or 0)),
                  role=t.role if t.role != "trial" else None, needs=list(t.needs) or None,
                  start=t.fork.at if t.fork else None, axes=t.axes)
        row.ap.update({k: disk.get(k, prev.get(k)) for k in APS if disk.get(k, prev.get(k)) is not None})
        row.status = _status(prev.get("status"), disk, alive, row.iteration)
        if row.status == st.ERROR and prev.get("reason"):
            row.reason = prev.get("reason")
        preempted = st.preemptions(sweep_dir, t.name)
        if preempted:
            row.preemptions, row.preempted_at = len(preempted), int(preempted[-1]["preempted_at"])
        if row.status == "RUNNING" and prev.get("eta_s") is not None:
            row.eta_s, row.rate = prev.get("eta_s"), prev.get("rate")
        rows.append(row)
    for job in st.pretrain_jobs(record):  # after the tasks, so their numbers are the plan's
        row = st.pretrain_row(sweep_dir, job)
        if row.status == st.RUNNING and not alive:
            row.status, row.eta_s = "INTERRUPTED", None
        rows.append(row)
    return saved, rows


def status_json(sweep_dir: Path) -> dict[str, Any]:
    """`status --json`: the sweep's identity, the driver's state and one dict per row (AP as fractions)."""
    record = st.read_record(sweep_dir) or {}
    saved, rows = status_rows(sweep_dir)
    return {"name": record.get("name"), "spec_hash": record.get("spec_hash"),
            "code_version": record.get("code_version"),
            "sets": record.get("sets", []), "sweep_dir": str(sweep_dir), "driver": saved.get("driver", {}),
            "rows": [r.to_json() for r in rows]}


def _status(saved: str | None, disk: dict[str, Any], alive: bool, iteration: int) -> str:
    if disk.get("finished"):
        return st.FINISHED
    if saved == st.ERROR:
        return st.ERROR
    if alive:
        return saved or st.PENDING
    return "INTERRUPTED" if iteration > 0 or saved == st.RUNNING else st.PENDING


def render_status(sweep_dir: Path) -> str:
    record = st.read_record(sweep_dir)
    saved, rows = status_rows(sweep_dir)
    driver = saved.get("driver", {})
    alive = st.driver_alive(driver)
    if driver.get("finished"):
        state = f"driver finished ({driver.get('status', '?')})"
    elif alive:
        state = f"driver running (pid {driver.get('pid')} on {driver.get('host')})"
    elif driver:
        state = "driver not running (resume with: python -m orchestrator resume " + str(sweep_dir) + ")"
    else:
        state = "not started"
    started = driver.get("started")
    end = driver.get("finished") or (time.time() if alive else driver.get("updated"))
    elapsed = (end - started) if started and end else None
    title = (f"sweep {record['name']} (spec hash {record['spec_hash']}, code {record['code_version']}) "
             f"in {sweep_dir}: {state}")
    trained = st.trained_iterations(sweep_dir, [r.name for r in rows])
    return render(title, rows, elapsed) + f"\niterations trained by all attempts (segments.jsonl): {trained}"

