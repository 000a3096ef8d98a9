"""The one path from a trial to MLflow: a driver thread that tails every task's metrics.jsonl.

A trial writes each metric row to its own metrics.jsonl (the record, every row) and nothing to
MLflow. One `MetricSync` per sweep, on the driver, reads what each file gained since its last pass
and logs it, batched, into the trial's run (`tracking.MetricLogger`, the only writer of metric
points): idempotent, because the logger drops any (key, step) at or before the last step its run
holds (asked from MLflow once per run, then kept in memory), so a restarted driver, a replayed
attempt or a retried request never writes a point twice. Schedule forking: a trunk has no run; its
rows up to a branch's fork point go into that branch's run, before the branch's own rows.

Losses, LR and `seen/*` go at most once per `period` iterations (the first row past each multiple,
and the run's final row); evaluation metrics always go. Run status, tags and artifacts the monitor
asks for (`post`) are sent by the same thread, after the run's rows that are on disk by then, so a
run is FINISHED only once its curve is complete. A trial's run is made (`tracker.ensure_child`) at
its first RUNNING post or rows (a branch: its own rows, not its trunk's), started at that post's time
and ended at its last post's time, so the run's duration is the trial's own. MLflow may be away (a
server restarting): a failed pass keeps its place in each file, forgets what it believed the run
holds (a request may have been written but never answered), and is retried with backoff; training
never waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.worker.task import read_plans
from trainer.trial_dir import TrialDir

logger = logging.getLogger(__name__)

PERIODIC = ("train/", "seen/")  # logged every `period` iterations; everything else at every row
SETTLE_S = 120.0  # how long `close` keeps trying to catch up (a server restart takes a while)


class MetricSync:
    """Per sweep: tails the tasks' files into their runs from a thread; `post` queues run status/tags/artifacts."""

    def __init__(self, tracker: Any, sweep_dir: Path, record: dict[str, Any], run_ids: dict[str, str],
                 period: int = 100, interval: float = 1.0, max_wait: float = 15.0, final_wait_s: float = 0.0):
        self.tracker, self.sweep_dir, self.run_ids = tracker, Path(sweep_dir), run_ids
        # An object store's mirror pulls a trial's end a moment after Tune reports it: how long a finished
        # trial's artifacts wait for its final metrics to appear in the folder.
        self.final_wait_s = final_wait_s
        self.period, self.interval, self.max_wait = max(int(period), 1), interval, max_wait
        tasks = {t.trial_id: t for t in read_plans(record)}
        self.names = {tid: t.name for tid, t in tasks.items()}
        self.totals = {tid: t.total for tid, t in tasks.items()}
        self.tails: dict[str, list[Any]] = {}  # trial id -> its `trainer.trial_dir.MetricTail`s
        for tid in [*run_ids, *(t for t in tracker.planned if t not in run_ids)]:
            sources = []
            fork = tasks[tid].fork
            if fork:  # the trunk's part first: its rows up to the fork point
                sources.append(self._folder(fork.trunk).tail(fork.at))
            sources.append(self._folder(self.names[tid]).tail())
            self.tails[tid] = sources
        self.sent = 0
        self._posts: dict[str, dict[str, Any]] = {}  # trial id -> status/tags/artifacts still to send
        self._cond = threading.Condition()
        self._stop = False
        self._failing = False
        self._thread: threading.Thread | None = None

    def _folder(self, name: str) -> TrialDir:
        return TrialDir.in_sweep(self.sweep_dir, name)

    # -- what the monitor asks for ---------------------------------------------------------------
    def post(self, trial_id: str, status: str | None = None, tags: dict[str, str] | None = None,
             artifacts: bool = False) -> None:
        """Send after the run's rows on disk now: a status (RUNNING, FINISHED, ...), tags, its artifacts."""
        if trial_id not in self.tails:  # a trunk has no run
            return
        with self._cond:
            post = self._posts.setdefault(trial_id, {"status": None, "tags": {}, "artifacts": False,
                                                     "started": None, "at": None})
            if status:  # when it happened: the run's start (its latest RUNNING before the run is made) and end
                post["at"] = time.time()
                post["started"] = post["at"] if status == "RUNNING" else post["started"]
            post["status"] = status or post["status"]
            post["tags"].update(tags or {})
            post["artifacts"] |= artifacts
            self._cond.notify_all()

    # -- the thread ------------------------------------------------------------------------------
    def start(self) -> "MetricSync":
        self._thread = threading.Thread(target=self._loop, name="mlflow-sync", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        wait = self.interval
        while True:
            with self._cond:
                if self._stop:
                    return
            ok = self.sync_all()
            wait = self.interval if ok else min(max(2 * wait, 1.0), self.max_wait)
            with self._cond:
                if not self._stop:
                    self._cond.wait(wait)

    def sync_all(self) -> bool:
        """One pass over every run: new rows, then what was posted for it; False if MLflow failed."""
        ok = True
        for trial_id in self.tails:
            ok = self._sync_run(trial_id) and ok
        if ok and self._failing:
            logger.info("MLflow reachable again; every run caught up with its metrics.jsonl")
        self._failing = not ok
        return ok

    def _sync_run(self, trial_id: str) -> bool:
        with self._cond:
            post = self._posts.pop(trial_id, None)
        mlog = None
        try:
            reads = [tail.read() for tail in self.tails[trial_id]]
            rows = [row for read in reads for row in read]
            if trial_id not in self.run_ids:
                if not self._started(trial_id, reads[-1], post):
                    if post:
                        self._requeue(trial_id, post)
                    return True  # no run before the trial starts
                start = (post or {}).get("started") or time.time()
                self.run_ids[trial_id] = self.tracker.ensure_child(trial_id, start_time=start)
            mlog = self.tracker.metric_logger(self.run_ids[trial_id])
            if rows:
                self.sent += mlog.log_rows(rows, period=self.period, periodic=PERIODIC,
                                           final=self.totals[trial_id])
            for tail in self.tails[trial_id]:
                tail.commit()
            if post:
                self._send(trial_id, post)
        except Exception as exc:  # an outage: keep the place in each file, ask MLflow again next time
            if mlog is not None:
                mlog.forget()
            if post:
                self._requeue(trial_id, post)
            if not self._failing:
                logger.warning("MLflow unreachable for %s (%s); retrying, the trials train on",
                               self.names[trial_id], _short(exc))
            self._failing = True
            return False
        return True

    def _started(self, trial_id: str, own_rows: list, post: dict[str, Any] | None) -> bool:
        """Whether the trial's run is due: a plain trial once it is posted RUNNING (or has rows); a
        branch once it trains itself (rows of its own), not while its trunk trains for it."""
        if post and post["status"] in ("FINISHED", "FAILED", "KILLED"):
            return True
        if len(self.tails[trial_id]) > 1:
            return bool(own_rows)
        return bool(own_rows or post)

    def _requeue(self, trial_id: str, post: dict[str, Any]) -> None:
        """A post that failed goes back under anything posted meanwhile (a newer status wins)."""
        with self._cond:
            newer = self._posts.get(trial_id)
            if newer is not None:
                post["status"] = newer["status"] or post["status"]
                post["tags"].update(newer["tags"])
                post["artifacts"] |= newer["artifacts"]
                post["started"] = newer["started"] or post["started"]
                post["at"] = newer["at"] or post["at"]
            self._posts[trial_id] = post

    def _send(self, trial_id: str, post: dict[str, Any]) -> None:
        run_id = self.run_ids[trial_id]
        if post["artifacts"]:
            folder = self._folder(self.names[trial_id])
            if post["status"] == "FINISHED" and not folder.finished() and \
                    time.time() - (post["at"] or time.time()) < self.final_wait_s:
                self._requeue(trial_id, post)  # an object store's mirror has not pulled the trial's end yet
                return
            self.tracker.log_artifacts(run_id, [folder.config_file(), folder.final_file()])
            self.tracker.log_final(self.names[trial_id], folder.final() or {})
            post["artifacts"] = False
        for key, value in list(post["tags"].items()):
            self.tracker.client.set_tag(run_id, key, value)
            del post["tags"][key]
        if post["status"]:
            self.tracker.set_status(run_id, post["status"], at=post["at"])

    def close(self, settle_s: float = SETTLE_S) -> list[str]:
        """Stop the thread, then catch up for up to `settle_s` s; returns the trials whose runs are behind."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + settle_s
        while not self.sync_all() and time.monotonic() < deadline:
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
        if not self._failing:
            return []
        left = [self.names[t] for t in self.run_ids]
        logger.error("MLflow is still unreachable; runs may be incomplete: %s (their metrics.jsonl have "
                     "everything; a `resume` catches up)", ", ".join(left))
        return left


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
