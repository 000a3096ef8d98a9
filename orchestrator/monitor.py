"""The driver's view of a running sweep: trial states, state.json, MLflow logging, the live table.

Ray-free and MLflow-free itself: the Tune callback in `ray_backend` forwards events here, and the
tracker (an `orchestrator.tracking.SweepTracker`, or None) is handed in. What a trial reports
through Tune is a flat dict of the trainer's metrics (`train/loss`, `bbox/AP`, ...) plus the
`trial/*` keys below; with a SQLite store this object is MLflow's single writer.

When a task (re)starts at iteration N (its first report), everything it reported up to N is final
in its metrics.jsonl: the runs get from there what they lack (results a killed driver had not logged
yet) before the task's new results arrive, so each curve is complete and in step order; a finishing
trial's run is checked against its whole file once more.

MLflow may be away for a while (a tracking server restarting): a status, fill or artifact that fails
is owed, not lost; `tick` retries what is owed (with backoff) in order, fill before the final status,
and `close` tries once more for a bounded time. A trial whose loss became non-finite records
diverged.json in its folder (`state.record_divergence`); it is failed at once, with the iteration and loss
as the reason in the table, state.json and its run's `failure_reason` tag, and never trained again.

Schedule forking: a trunk has no MLflow run of its own. Its results go, step by step, into the run
of every schedule still at or before that step (so each schedule's chart grows from step 0 while
its trunk trains); a branch's run holds its trunk's points up to the fork point, then its own.
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
SETTLE_S = 120.0  # how long `close` keeps retrying what MLflow is owed (a server restart takes a while)


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
        self.forks: dict[str, tuple[str, int]] = {}  # branch -> (trunk, fork point)
        self.branches: dict[str, list[tuple[str, int]]] = {}  # trunk -> [(branch, fork point)]
        for t in st.task_rows(record):
            prev = old.get("trials", {}).get(t["trial_id"], {})
            row = {"name": t["name"], "status": prev.get("status", st.PENDING), "total": t["total_iters"],
                   "iteration": prev.get("iteration", 0), "attempts": prev.get("attempts", 0)}
            if t.get("role") == "trunk":
                row["role"] = "trunk"
            if t.get("fork"):
                self.forks[t["trial_id"]] = (t["fork"]["trunk_id"], int(t["fork"]["at"]))
                self.branches.setdefault(t["fork"]["trunk_id"], []).append((t["trial_id"], int(t["fork"]["at"])))
                row.update(role="branch", start=int(t["fork"]["at"]))
            row.update({k: prev[k] for k in ("bbox/AP", "segm/AP", "reason", "diverged") if k in prev})
            if row["status"] == st.RUNNING:
                row["status"] = st.PENDING  # its process died with the previous driver
            self.trials[t["trial_id"]] = row
        self._dirty_at = 0.0
        self._owed: dict[str, dict[str, Any]] = {}  # trial id -> what MLflow still lacks (see _settle)
        self._retry_at, self._wait = 0.0, 1.0
        self.save(force=True)

    # -- events (called from the Tune callback) ------------------------------------------------
    def on_start(self, trial_id: str) -> None:
        row = self.trials[trial_id]
        if row.get("diverged"):
            return  # its attempt only re-raises the recorded divergence (trainable.run_trial)
        row.update(status=st.RUNNING, attempts=row.get("attempts", 0) + 1, rate=None, _t0=None)
        for branch, _ in self.branches.get(trial_id, []):
            if self.trials[branch]["status"] != st.FINISHED:
                self._set_run_status(branch, "RUNNING")  # its curve grows from the trunk from now on
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
        if result.get(K_EVENT) == "start":
            self._fill_to(trial_id, step)
        elif result.get(K_EVENT) in ("train", "eval"):
            metrics = {k: v for k, v in result.items() if "/" in k and not k.startswith("trial/")}
            if self.log_metrics and trial_id in self.run_ids:
                self._log(trial_id, step, metrics)
            # No trial logs a trunk's results (it has no run): the driver does, even with a server.
            for branch, at in self.branches.get(trial_id, []):
                if step <= at and self.tracker is not None:
                    self._log(branch, step, metrics)
                if self.trials[branch]["status"] == st.PENDING:
                    self.trials[branch]["iteration"] = min(step, at)
        self.save()

    def _log(self, trial_id: str, step: int, metrics: dict[str, Any]) -> None:
        if trial_id in self._owed:  # MLflow is behind on this run: the fill (from disk) comes first
            self._owe(trial_id, fill=step if self.log_metrics else 0)
            return
        try:
            self.tracker.metric_logger(self.run_ids[trial_id]).log(step, metrics)
        except Exception as exc:  # tracking trouble must not kill the sweep: the trial's files keep it
            logger.warning("MLflow logging for %s failed (%s); retried from its metrics.jsonl",
                           self.trials[trial_id]["name"], _short(exc))
            self.tracker.metric_logger(self.run_ids[trial_id]).forget()
            self._owe(trial_id, fill=step if self.log_metrics else 0)

    def _fill_to(self, task_id: str, step: int) -> None:
        """A task (re)starts at `step`: fill its run, and a trunk its branches' runs, up to there from disk."""
        if task_id in self.run_ids:
            self._fill_task(task_id, step)
        for branch, _ in self.branches.get(task_id, []):
            self._fill_task(branch, 0)  # its trunk's part (up to its fork point; on disk up to `step`)

    def _fill_task(self, trial_id: str, upto: int | None) -> None:
        """Fill a run with its trunk's part and its own rows up to `upto` (None: all); owed if MLflow fails.

        With a tracking server a running trial logs its own steps past its start itself, so only
        the part before that is the driver's to fill until the trial ends (`upto`).
        """
        if self.tracker is None or trial_id not in self.run_ids:
            return
        if trial_id in self._owed:
            self._owe(trial_id, fill=upto)
            return
        if not self._fill(trial_id, self._trunk_rows(trial_id) + self._rows(trial_id, upto)):
            self._owe(trial_id, fill=upto)

    def _rows(self, task_id: str, upto: int | None = None) -> list[tuple[int, dict[str, float]]]:
        return st.metric_rows(self.sweep_dir, self.trials[task_id]["name"], upto=upto)

    def _trunk_rows(self, trial_id: str) -> list[tuple[int, dict[str, float]]]:
        """A branch's part of its trunk's rows (all on disk once it runs: its fork checkpoint exists)."""
        if trial_id not in self.forks:
            return []
        trunk, at = self.forks[trial_id]
        return self._rows(trunk, at)

    def _fill(self, trial_id: str, rows: list[tuple[int, dict[str, float]]], quiet: bool = False) -> bool:
        """Log the points of `rows` the trial's run lacks (see tracking.MetricLogger.fill); False if MLflow failed."""
        if self.tracker is None or trial_id not in self.run_ids or not rows:
            return True
        mlog = self.tracker.metric_logger(self.run_ids[trial_id])
        try:
            added = mlog.fill(rows)
        except Exception as exc:
            if not quiet:
                logger.warning("MLflow backfill for %s failed (%s); retried", self.trials[trial_id]["name"],
                               _short(exc))
            mlog.forget()
            return False
        if added:
            logger.info("%s: %d metric points filled in from disk", self.trials[trial_id]["name"], added)
        return True

    def on_complete(self, trial_id: str) -> None:
        row = self.trials[trial_id]
        if row.get("role") == "trunk":
            row.update(status=st.FINISHED, eta_s=0, rate=None, iteration=row["total"])
            logger.info("trunk %s finished: %d branches forked from it", row["name"],
                        len(self.branches.get(trial_id, [])))
            self.save(force=True)
            return
        progress = st.disk_progress(self.sweep_dir, row["name"])
        row.update({k: v for k, v in progress.items() if k != "finished" and v is not None})
        row.update(status=st.FINISHED, eta_s=0, rate=None)
        self._fill_task(trial_id, None)
        self._artifacts(trial_id)
        self._set_run_status(trial_id, "FINISHED")
        logger.info("trial %s finished: box AP %s", row["name"], _fmt(row.get("bbox/AP")))
        self.save(force=True)

    def _artifacts(self, trial_id: str) -> bool:
        if self.tracker is None or trial_id not in self.run_ids:
            return True
        if trial_id in self._owed:
            self._owe(trial_id, artifacts=True)
            return False
        try:
            self._send_artifacts(trial_id)
        except Exception as exc:
            logger.warning("MLflow artifacts for %s failed: %s", self.trials[trial_id]["name"], _short(exc))
            self._owe(trial_id, artifacts=True)
            return False
        return True

    def on_error(self, trial_id: str, final: bool, error: str = "") -> None:
        row = self.trials[trial_id]
        if row.get("diverged"):
            return  # failed for good when it diverged; Tune's retries only re-raise it
        diverged = st.recorded_divergence(st.trial_dir(self.sweep_dir, row["name"]))
        if diverged is not None:
            self._diverged(trial_id, diverged)
            return
        lines = [line for line in error.strip().splitlines() if line.strip()]
        row.update(status=st.ERROR if final else st.PENDING, rate=None, eta_s=None, error=error[-500:],
                   reason=lines[-1].strip()[:300] if lines else "")
        if final:
            self._fill_task(trial_id, None)  # what its attempts logged to disk but MLflow missed
            self._set_run_status(trial_id, "FAILED")
            logger.error("trial %s failed for good after %d attempts: %s", row["name"], row.get("attempts", 0),
                         row["reason"] or "?")
        else:
            logger.warning("trial %s failed; retrying from its last checkpoint", row["name"])
        self.save(force=True)

    def _diverged(self, trial_id: str, error: Any) -> None:
        row = self.trials[trial_id]
        reason = f"diverged: loss {error.loss} at iteration {error.iteration}"
        row.update(status=st.ERROR, rate=None, eta_s=None, diverged=True, reason=reason, error=str(error))
        logger.error("trial %s %s; failed, not retried (the same config diverges again)", row["name"], reason)
        self._fill_task(trial_id, None)
        self._set_run_status(trial_id, "FAILED", tags={"failure_reason": reason})
        self.save(force=True)

    def _set_run_status(self, trial_id: str, status: str, tags: dict[str, str] | None = None) -> None:
        if self.tracker is None or trial_id not in self.run_ids:  # a trunk has no run
            return
        if trial_id in self._owed:  # after what the run is still owed, never before it
            self._owe(trial_id, status=status, tags=tags)
            return
        try:
            self._send_status(trial_id, status, tags)
        except Exception as exc:
            logger.warning("MLflow status of %s failed (%s); retried", self.trials[trial_id]["name"], _short(exc))
            self._owe(trial_id, status=status, tags=tags)

    def _send_artifacts(self, trial_id: str) -> None:
        folder = st.trial_dir(self.sweep_dir, self.trials[trial_id]["name"])
        self.tracker.log_artifacts(self.run_ids[trial_id], [folder / "config.yaml", folder / "final_metrics.json"])

    def _send_status(self, trial_id: str, status: str | None, tags: dict[str, str] | None) -> None:
        for key, value in (tags or {}).items():
            self.tracker.client.set_tag(self.run_ids[trial_id], key, value)
        if status:
            self.tracker.set_status(self.run_ids[trial_id], status)

    # -- what MLflow is owed -------------------------------------------------------------------
    def _owe(self, trial_id: str, fill: int | None | bool = False, artifacts: bool = False,
             status: str | None = None, tags: dict[str, str] | None = None) -> None:
        """Remember what a run lacks; `fill`: False (nothing), an iteration, or None (all rows on disk)."""
        owed = self._owed.setdefault(trial_id, {"fill": False, "artifacts": False, "status": None, "tags": {}})
        if fill is not False:
            old = owed["fill"]
            owed["fill"] = None if fill is None or old is None else max(fill, old if old is not False else -1)
        owed["artifacts"] |= artifacts
        owed["status"] = status or owed["status"]
        owed["tags"].update(tags or {})

    def _settle(self, runs: int | None = None) -> bool:
        """Retry what MLflow is owed, per run in order (fill, artifacts, status), for at most `runs` runs
        (the Tune loop waits meanwhile); True when nothing is left."""
        for trial_id in list(self._owed)[:runs]:
            owed = self._owed[trial_id]
            try:
                if owed["fill"] is not False:
                    upto = owed["fill"]
                    if not self._fill(trial_id, self._trunk_rows(trial_id) + self._rows(trial_id, upto), quiet=True):
                        return False
                    owed["fill"] = False
                if owed["artifacts"]:
                    self._send_artifacts(trial_id)
                    owed["artifacts"] = False
                if owed["status"] or owed["tags"]:
                    self._send_status(trial_id, owed["status"], owed["tags"])
            except Exception as exc:
                logger.debug("MLflow still failing for %s: %s", self.trials[trial_id]["name"], _short(exc))
                return False
            del self._owed[trial_id]
            logger.info("MLflow caught up with %s", self.trials[trial_id]["name"])
        return not self._owed

    def _retry_owed(self) -> None:
        if not self._owed or time.monotonic() < self._retry_at:
            return
        before = len(self._owed)
        self._settle(runs=1)  # one run per Tune step: a slow server must not stall the sweep
        # Caught up with one: the next at the next step; else back off (1 s doubling to 15 s).
        self._wait = 0.0 if len(self._owed) < before else min(max(2 * self._wait, 1.0), 15.0)
        self._retry_at = time.monotonic() + self._wait

    # -- output --------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        return list(self.trials.values())

    def tick(self, force: bool = False) -> None:
        self._retry_owed()
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

    def close(self, finished: bool, settle_s: float = SETTLE_S) -> str:
        """Final save; returns the sweep's status (FINISHED / FAILED / KILLED) for the parent run.

        What MLflow is still owed is retried for up to `settle_s` seconds first; what is left is named.
        """
        deadline = time.monotonic() + settle_s
        while self._owed and not self._settle() and time.monotonic() < deadline:
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
        if self._owed:
            logger.error("MLflow is still unreachable; runs left incomplete: %s (their metrics.jsonl have "
                         "everything)", ", ".join(self.trials[t]["name"] for t in self._owed))
        statuses = {row["status"] for row in self.trials.values()}
        status = "FINISHED" if statuses == {st.FINISHED} else ("FAILED" if st.ERROR in statuses else "KILLED")
        trials = {tid: {k: v for k, v in row.items() if not k.startswith("_")} for tid, row in self.trials.items()}
        driver = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started, "updated": time.time(),
                  "finished": time.time() if finished else None, "status": status}
        st.write_json(self.sweep_dir / st.STATE, {"driver": driver, "trials": trials})
        self.tick(force=True)
        return status


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _fmt(value: Any) -> str:
    """An AP for people: percent, as the paper prints it (MLflow keeps COCO's fraction)."""
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"
