"""The driver's view of a running sweep: trial states, state.json, MLflow logging, the live table.

Ray-free and MLflow-free itself: the Tune callback in `ray_backend` forwards events here, and the
tracker (an `orchestrator.tracking.SweepTracker`, or None) is handed in. What a trial reports
through Tune is a flat dict of the trainer's metrics (`train/loss`, `bbox/AP`, ...) plus the
`trial/*` keys below; with a SQLite store this object is MLflow's single writer.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from orchestrator import state as st
from orchestrator.view import render

logger = logging.getLogger(__name__)

# Keys a trial adds to every report (the rest are trainer metrics).
K_ITER, K_TOTAL, K_ATTEMPT, K_EVENT, K_RUN = "trial/iteration", "trial/total", "trial/attempt", "trial/event", "trial/run_id"


class LiveView:
    """Redraws the table in place on a terminal; elsewhere prints it at most every `period` s."""

    def __init__(self, out: TextIO | None = None, period: float = 30.0, enabled: bool = True):
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.period = 1.0 if self.tty else period
        self.enabled = enabled
        self._last = 0.0
        self._lines = 0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.period):
            return
        self._last = now
        if self.tty and self._lines:
            self.out.write(f"\x1b[{self._lines}F\x1b[J")  # back to the table's first line, clear below
        self.out.write(text + "\n")
        self.out.flush()
        self._lines = text.count("\n") + 1


class SweepMonitor:
    def __init__(self, sweep_dir: Path, record: dict[str, Any], run_ids: dict[str, str],
                 tracker: Any | None = None, log_metrics: bool = True, view: LiveView | None = None):
        self.sweep_dir = Path(sweep_dir)
        self.record = record
        self.run_ids = run_ids
        self.tracker = tracker
        self.log_metrics = log_metrics and tracker is not None
        self.view = view or LiveView(enabled=False)
        self.started = time.time()
        old = st.read_state(self.sweep_dir)
        self.trials: dict[str, dict[str, Any]] = {}
        for t in record["trials"]:
            prev = old.get("trials", {}).get(t["trial_id"], {})
            row = {"name": t["name"], "status": prev.get("status", st.PENDING), "total": t["total_iters"],
                   "iteration": prev.get("iteration", 0), "attempts": prev.get("attempts", 0)}
            row.update({k: prev[k] for k in ("bbox/AP", "segm/AP") if k in prev})
            if row["status"] == st.RUNNING:
                row["status"] = st.PENDING  # its process died with the previous driver
            self.trials[t["trial_id"]] = row
        self._dirty_at = 0.0
        self.save(force=True)

    # -- events (called from the Tune callback) ------------------------------------------------
    def on_start(self, trial_id: str) -> None:
        row = self.trials[trial_id]
        row.update(status=st.RUNNING, attempts=row.get("attempts", 0) + 1, rate=None, _t0=None)
        self._set_run_status(trial_id, "RUNNING")
        self.save(force=True)

    def on_result(self, trial_id: str, result: dict[str, Any]) -> None:
        row = self.trials[trial_id]
        step = int(result.get(K_ITER, row.get("iteration", 0)))
        now = time.monotonic()
        if row.get("_t0") is None:
            row["_t0"], row["_i0"] = now, step
        elif now > row["_t0"] and step > row["_i0"]:
            row["rate"] = (step - row["_i0"]) / (now - row["_t0"])
            row["eta_s"] = (row["total"] - step) / row["rate"]
        row["iteration"] = step
        row["status"] = st.RUNNING
        row.update({k: result[k] for k in ("bbox/AP", "segm/AP") if k in result})
        if self.log_metrics and result.get(K_EVENT) in ("train", "eval"):
            metrics = {k: v for k, v in result.items() if "/" in k and not k.startswith("trial/")}
            try:
                self.tracker.metric_logger(self.run_ids[trial_id]).log(step, metrics)
            except Exception as exc:  # tracking trouble must not kill the sweep: the trial's files keep it
                logger.warning("MLflow logging for %s failed: %s", row["name"], exc)
        self.save()

    def on_complete(self, trial_id: str) -> None:
        row = self.trials[trial_id]
        progress = st.disk_progress(self.sweep_dir, row["name"])
        row.update({k: v for k, v in progress.items() if k != "finished" and v is not None})
        row.update(status=st.FINISHED, eta_s=0, rate=None)
        folder = st.trial_dir(self.sweep_dir, row["name"])
        if self.tracker is not None:
            try:
                self.tracker.log_artifacts(self.run_ids[trial_id], [folder / "config.yaml",
                                                                    folder / "final_metrics.json"])
            except Exception as exc:
                logger.warning("MLflow artifacts for %s failed: %s", row["name"], exc)
        self._set_run_status(trial_id, "FINISHED")
        logger.info("trial %s finished: box AP %s", row["name"], _fmt(row.get("bbox/AP")))
        self.save(force=True)

    def on_error(self, trial_id: str, final: bool, error: str = "") -> None:
        row = self.trials[trial_id]
        row.update(status=st.ERROR if final else st.PENDING, rate=None, eta_s=None, error=error[-500:])
        if final:
            self._set_run_status(trial_id, "FAILED")
            logger.error("trial %s failed for good after %d attempts: %s", row["name"], row.get("attempts", 0),
                         error.strip().splitlines()[-1] if error.strip() else "?")
        else:
            logger.warning("trial %s failed; retrying from its last checkpoint", row["name"])
        self.save(force=True)

    def _set_run_status(self, trial_id: str, status: str) -> None:
        if self.tracker is None:
            return
        try:
            self.tracker.set_status(self.run_ids[trial_id], status)
        except Exception as exc:
            logger.warning("MLflow status of %s failed: %s", self.trials[trial_id]["name"], exc)

    # -- output --------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        return list(self.trials.values())

    def tick(self, force: bool = False) -> None:
        self.view.show(render(f"sweep {self.record['name']} ({self.sweep_dir})", self.rows(),
                              time.time() - self.started), force=force)
        if self._dirty_at and time.monotonic() - self._dirty_at > 2.0:
            self.save(force=True)

    def save(self, force: bool = False) -> None:
        """state.json for `status`; throttled, since results may arrive many times a second."""
        if not force and time.monotonic() - self._dirty_at < 2.0:
            self._dirty_at = self._dirty_at or time.monotonic()
            return
        trials = {tid: {k: v for k, v in row.items() if not k.startswith("_")} for tid, row in self.trials.items()}
        driver = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started, "updated": time.time()}
        st.write_json(self.sweep_dir / st.STATE, {"driver": driver, "trials": trials})
        self._dirty_at = 0.0

    def close(self, finished: bool) -> str:
        """Final save; returns the sweep's status (FINISHED / FAILED / KILLED) for the parent run."""
        statuses = {row["status"] for row in self.trials.values()}
        status = "FINISHED" if statuses == {st.FINISHED} else ("FAILED" if st.ERROR in statuses else "KILLED")
        trials = {tid: {k: v for k, v in row.items() if not k.startswith("_")} for tid, row in self.trials.items()}
        driver = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started, "updated": time.time(),
                  "finished": time.time() if finished else None, "status": status}
        st.write_json(self.sweep_dir / st.STATE, {"driver": driver, "trials": trials})
        self.tick(force=True)
        return status


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"
