"""The driver's view of a running sweep: trial states, state.json, the live table, run statuses.

Ray-free and MLflow-free itself: the Tune callback in `ray_backend` forwards events here. Tune
results drive the table and state.json (status, iteration, rate, AP) only; metric points reach
MLflow by one path, `orchestrator.tracking.metric_sync` tailing each trial's metrics.jsonl. What a run's
MLflow record needs besides (RUNNING / FINISHED / FAILED, the failure reason, the final artifacts)
is posted to that syncer (`sync`, or None without tracking), which sends it after the run's rows.

A trial whose loss became non-finite records diverged.json in its folder (`orchestrator.worker.reporting.record_divergence`);
it is failed at once, with the iteration and loss as the reason in the table, state.json and its
run's `failure_reason` tag, and never trained again.

The table's rows are the tasks, then the pretrain jobs (read from their folders' progress.json). Where
the table is not redrawn in place (no terminal, or `--no-view`), the driver logs its total line once a
minute.

A preempted attempt (its last result has event "preempted", `orchestrator.worker.reporting`) is counted
apart from failures: the row's "preemptions" and its reason "preempted at iteration N"; the error
that follows is its rescheduling, not a failure (`ray_backend` gave Tune one more allowed failure).

Schedule forking: a trunk has no MLflow run of its own; a branch's run is made when the branch itself
starts, with the trunk's rows up to its fork point put first (`metric_sync`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import orchestrator.state.folder as st
from orchestrator.worker.task import K_EVENT, K_ITER, PREEMPTED
from orchestrator.worker.reporting import recorded_divergence
from orchestrator.views.view import APS, Row, render, total_line

logger = logging.getLogger(__name__)
LOG_PERIOD = 60.0  # s between progress log lines when the table is not redrawn on a terminal


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
    def __init__(self, sweep_dir: Path, record: dict[str, Any], sync: Any | None = None,
                 view: LiveView | None = None):
        self.sweep_dir = Path(sweep_dir)
        self.record = record
        self.sync = sync  # an orchestrator.tracking.metric_sync.MetricSync, or None
        self.view = view or LiveView(enabled=False)
        self.started = time.time()
        old = st.read_state(self.sweep_dir)
        self.trials: dict[str, Row] = {}
        self.branches: dict[str, list[tuple[str, int]]] = {}  # trunk -> [(branch, fork point)]
        self._since: dict[str, tuple[float, int]] = {}  # trial -> (time, iteration) its rate counts from
        self._preempting: set[str] = set()  # trials whose next error is their preemption's
        for t in st.task_rows(record):
            prev = old.get("trials", {}).get(t.trial_id, {})
            keep = {k: v for k, v in prev.items() if k in ("status", "iteration", "attempts", "reason", "diverged",
                                                              "preemptions", "preempted_at", *APS)}
            row = Row.from_json(keep, name=t.name, total=t.total, needs=list(t.needs) or None,
                                role=t.role if t.role != "trial" else None, start=t.fork.at if t.fork else None)
            if t.fork:
                self.branches.setdefault(t.fork.trunk_id, []).append((t.trial_id, t.fork.at))
            if row.status == st.RUNNING:
                row.status = st.PENDING  # its process died with the previous driver
            self.trials[t.trial_id] = row
        self._dirty_at = 0.0
        self._logged = 0.0
        self.save(force=True)

    # -- events (called from the Tune callback) ------------------------------------------------
    def on_start(self, trial_id: str) -> None:
        row = self.trials[trial_id]
        if row.diverged:
            return  # its attempt only re-raises the recorded divergence (trainable.run_trial)
        row.status, row.attempts, row.rate = st.RUNNING, row.attempts + 1, None
        self._since.pop(trial_id, None)
        for branch, _ in self.branches.get(trial_id, []):
            if self.trials[branch].status != st.FINISHED:
                self._set_run_status(branch, "RUNNING")  # its curve grows from the trunk from now on
        self._set_run_status(trial_id, "RUNNING")
        self.save(force=True)

    def on_result(self, trial_id: str, result: dict[str, Any]) -> None:
        row = self.trials[trial_id]
        step = int(result.get(K_ITER, row.iteration))
        if result.get(K_EVENT) == PREEMPTED:
            self._preempted(trial_id, step)
            return
        now = time.monotonic()
        t0, i0 = self._since.setdefault(trial_id, (now, step))
        if now > t0 and step > i0:
            row.rate = (step - i0) / (now - t0)
            row.eta_s = (row.total - step) / row.rate
        row.iteration, row.status = step, st.RUNNING
        row.ap.update({k: result[k] for k in APS if k in result})
        for branch, at in self.branches.get(trial_id, []):  # a waiting branch's curve is its trunk's so far
            if self.trials[branch].status == st.PENDING:
                self.trials[branch].iteration = min(step, at)
        self.save()

    def on_complete(self, trial_id: str) -> None:
        row = self.trials[trial_id]
        row.status, row.eta_s, row.rate = st.FINISHED, 0, None
        if row.role == "trunk":
            row.iteration = row.total
            logger.info("trunk %s finished: %d branches forked from it", row.name, len(self.branches.get(trial_id, [])))
            self.save(force=True)
            return
        progress = st.disk_progress(self.sweep_dir, row.name)
        row.iteration = progress.get("iteration", row.iteration)
        row.ap.update({k: progress[k] for k in APS if progress.get(k) is not None})
        self._set_run_status(trial_id, "FINISHED", artifacts=True)
        logger.info("trial %s finished: box AP %s", row.name, _fmt(row.ap.get("bbox/AP")))
        self.save(force=True)

    def _preempted(self, trial_id: str, step: int) -> None:
        row = self.trials[trial_id]
        row.iteration, row.preemptions, row.preempted_at = step, (row.preemptions or 0) + 1, step
        row.reason = f"preempted at iteration {step}"
        self._preempting.add(trial_id)
        logger.warning("trial %s preempted at iteration %d (checkpoint written); rescheduled, not counted as a "
                       "failure", row.name, step)
        self.save(force=True)

    def on_error(self, trial_id: str, final: bool, error: str = "") -> None:
        row = self.trials[trial_id]
        if row.diverged:
            return  # failed for good when it diverged; Tune's retries only re-raise it
        row.rate = row.eta_s = None
        if trial_id in self._preempting and not final:  # the preemption's own error: rescheduled
            self._preempting.discard(trial_id)
            row.status = st.PENDING
            self.save(force=True)
            return
        self._preempting.discard(trial_id)
        diverged = recorded_divergence(st.trial_dir(self.sweep_dir, row.name))
        if diverged is not None:
            self._diverged(trial_id, diverged)
            return
        lines = [line for line in error.strip().splitlines() if line.strip()]
        row.status, row.error = st.ERROR if final else st.PENDING, error[-500:]
        row.reason = lines[-1].strip()[:300] if lines else ""
        if final:
            self._set_run_status(trial_id, "FAILED")
            logger.error("trial %s failed for good after %d attempts: %s", row.name, row.attempts, row.reason or "?")
        else:
            logger.warning("trial %s failed; retrying from its last checkpoint", row.name)
        self.save(force=True)

    def _diverged(self, trial_id: str, error: Any) -> None:
        row = self.trials[trial_id]
        reason = f"diverged: loss {error.loss} at iteration {error.iteration}"
        row.status, row.rate, row.eta_s, row.diverged, row.reason, row.error = (st.ERROR, None, None, True, reason,
                                                                               str(error))
        logger.error("trial %s %s; failed, not retried (the same config diverges again)", row.name, reason)
        self._set_run_status(trial_id, "FAILED", tags={"failure_reason": reason})
        self.save(force=True)

    def _set_run_status(self, trial_id: str, status: str, tags: dict[str, str] | None = None,
                        artifacts: bool = False) -> None:
        """Posted to the syncer: sent after the run's rows on disk now (a trunk has no run: ignored there)."""
        if self.sync is not None:
            self.sync.post(trial_id, status=status, tags=tags, artifacts=artifacts)

    # -- output --------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """The tasks, then the pretrain jobs (read from their folders: they report to no one)."""
        return list(self.trials.values()) + [st.pretrain_row(self.sweep_dir, j) for j in st.pretrain_jobs(self.record)]

    def tick(self, force: bool = False) -> None:
        rows, elapsed = self.rows(), time.time() - self.started
        self.view.show(render(f"sweep {self.record['name']} ({self.sweep_dir})", rows, elapsed), force=force)
        if not (self.view.enabled and self.view.tty) and (force or time.monotonic() - self._logged >= LOG_PERIOD):
            self._logged = time.monotonic()  # no table redrawn in place: a log line a minute says how far it got
            logger.info("progress: %s", total_line(rows, elapsed))
        if self._dirty_at and time.monotonic() - self._dirty_at > 2.0:
            self.save(force=True)

    def save(self, force: bool = False) -> None:
        """state.json for `status`; throttled, since results may arrive many times a second."""
        if not force and time.monotonic() - self._dirty_at < 2.0:
            self._dirty_at = self._dirty_at or time.monotonic()
            return
        trials = {tid: row.to_json() for tid, row in self.trials.items()}
        driver = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started, "updated": time.time()}
        st.write_json(self.sweep_dir / st.STATE, {"driver": driver, "trials": trials})
        self._dirty_at = 0.0

    def close(self, finished: bool) -> str:
        """Final save; returns the sweep's status (FINISHED / FAILED / KILLED) for the parent run.

        The syncer catches up first (bounded: `MetricSync.close` names the runs it could not finish).
        """
        if self.sync is not None:
            self.sync.close()
        statuses = {row.status for row in self.trials.values()}
        status = "FINISHED" if statuses == {st.FINISHED} else ("FAILED" if st.ERROR in statuses else "KILLED")
        trials = {tid: row.to_json() for tid, row in self.trials.items()}
        driver = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started, "updated": time.time(),
                  "finished": time.time() if finished else None, "status": status}
        st.write_json(self.sweep_dir / st.STATE, {"driver": driver, "trials": trials})
        self.tick(force=True)
        return status


def _fmt(value: Any) -> str:
    """An AP for people: percent, as the paper prints it (MLflow keeps COCO's fraction)."""
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"
