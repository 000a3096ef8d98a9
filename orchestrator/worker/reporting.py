"""What a trial attempt reports: Tune results, attempts.jsonl rows, segments, and plugin reporters.

Ray-free (the Tune `report` call is handed in as `emit`), so it runs and is tested without a cluster;
`orchestrator.worker.trainable` wires it into the Tune function. `TuneReporter` holds back a checkpoint
step's metrics until that step's checkpoint is written, so an evaluation goes out together with the
Tune checkpoint that points at it. Each attempt's row in attempts.jsonl says where it ran (host,
pid, Ray node, the GPU ids Ray assigned) and from where it started; a damaged checkpoint the trainer
skipped on the way (`trainer.engine.checkpoint.load_latest`) is named there and in the attempt's first
report (`trial/warnings`), which the driver logs, so the skip is seen where the sweep is watched.
An attempt stopped on a preemption notice (`trainer.engine.preemption`) adds a second row for the same
attempt, {"preempted_at": N, "reason": "preempted at iteration N"}, and sends a last result with
event "preempted" before its error reaches Tune: the driver counts it as a preemption, not a failure
(`orchestrator.execution.ray_backend`).

The trainer's metrics go to the trial's metrics.jsonl (`JsonlReporter`), the record the driver's
`orchestrator.tracking.metric_sync` tails into MLflow; the Tune results only feed the driver's live view.

Plugin reporters: ORCHESTRATOR_REPORTERS="MODULE[,MODULE...]" names modules importable in the trial
process, each with `reporters(task) -> list[trainer.engine.reporters.Reporter]` added to every attempt's
reporters (e.g. a progress exporter; the tests' fault injection, tests/plugins). The driver forwards
its ORCHESTRATOR_* variables to the trials, so a plugin's own settings can travel that way too.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator.views.monitor import K_ATTEMPT, K_EVENT, K_ITER, K_RUN, K_TOTAL
from orchestrator.state.folder import record_divergence
from trainer.errors import NonFiniteLossError
from trainer.engine.preemption import PreemptedError
from trainer.engine.reporters import Reporter, RunInfo

logger = logging.getLogger(__name__)

PLUGINS_ENV = "ORCHESTRATOR_REPORTERS"
K_WARNINGS = "trial/warnings"  # in an attempt's "start" report: what the driver should warn about
PREEMPTED = "preempted"  # the K_EVENT of an attempt's last report when it stopped on a preemption notice
Emit = Callable[[dict[str, Any], "dict[str, Any] | None"], None]


class TuneReporter(Reporter):
    """Trainer reporter that emits Tune results; an evaluation goes out with its step's checkpoint."""

    def __init__(self, emit: Emit, task: dict[str, Any], attempt: int, forked_from: Path | None = None, *,
                 warnings: list[str] | None = None, placement: dict[str, Any] | None = None):
        self.emit, self.task, self.attempt, self.forked_from = emit, task, attempt, forked_from
        # Filled while the trainer restores (before start()): damaged checkpoints it skipped.
        self.warnings = warnings if warnings is not None else []
        self.placement = placement or {}
        self.start_iter = self.last_step = 0
        self.out: Path | None = None  # set by start(): no segment for an attempt that never started
        self.pending: dict[str, float] = {}
        self.pending_step = -1
        self.pending_event = "train"
        self.run_id = task.get("run_id", "")
        self.total = 0
        ck = task["config"]["checkpoint"]
        self._period, self._at = int(ck["period"]), set(ck["at"])

    def _is_ckpt_step(self, step: int) -> bool:
        return step == self.total or (self._period > 0 and step % self._period == 0) or step in self._at

    def start(self, info: RunInfo) -> None:
        # A trunk stops at its last fork point: that is its total as far as anyone watching goes.
        self.total = int(self.task.get("stop_after") or info.total_iters)
        self.start_iter = self.last_step = info.start_iter
        if info.tracking.get("trial_id") not in (None, self.task["trial_id"]):
            info.tracking.clear()  # restored from the trunk's checkpoint: its tracking dict is the trunk's
        # The run is made by the driver when the trial starts (`metric_sync`), so an attempt launched before
        # it existed knows no id (""); the id the driver knows now wins over one the checkpoint kept.
        self.run_id = self.run_id or info.tracking.get("mlflow_run_id", "")
        info.tracking["mlflow_run_id"] = self.run_id
        info.tracking.setdefault("trial_id", self.task["trial_id"])
        row = {"attempt": self.attempt, "start_iter": info.start_iter, "time": time.time(),
               "host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id, **self.placement}
        if self.forked_from is not None:
            row["forked_from"] = str(self.forked_from)
        meta = self._meta(info.start_iter, "start")
        if self.warnings:
            row["warnings"] = list(self.warnings)
            meta[K_WARNINGS] = "; ".join(self.warnings)
        append_row(Path(info.output_dir) / "attempts.jsonl", row)
        self.out = Path(info.output_dir)
        self.emit(meta, None)

    def _meta(self, step: int, event: str) -> dict[str, Any]:
        return {K_ITER: step, K_TOTAL: self.total, K_ATTEMPT: self.attempt, K_EVENT: event, K_RUN: self.run_id}

    def log(self, step: int, metrics) -> None:
        self.last_step = max(self.last_step, step)
        event = "eval" if any(k.startswith(("bbox/", "segm/")) for k in metrics) else "train"
        if self._is_ckpt_step(step):  # hold it: the checkpoint of this step follows (hooks' order)
            if self.pending_step not in (-1, step):
                self._flush()
            self.pending.update(metrics)
            self.pending_step = step
            if event == "eval":
                self.pending_event = "eval"
            return
        self.emit({**metrics, **self._meta(step, event)}, None)

    def checkpoint(self, step: int, path: Path) -> None:
        self.last_step = max(self.last_step, step)
        pointer = {"trainer_checkpoint": str(path), "iteration": step, "run_id": self.run_id,
                   "trial_id": self.task["trial_id"]}
        metrics = self.pending if self.pending_step == step else {}
        event = self.pending_event if metrics else "checkpoint"
        self.emit({**metrics, **self._meta(step, event)}, pointer)
        self.pending, self.pending_step, self.pending_event = {}, -1, "train"

    def _flush(self) -> None:
        if self.pending:
            self.emit({**self.pending, **self._meta(self.pending_step, self.pending_event)}, None)
        self.pending, self.pending_step, self.pending_event = {}, -1, "train"

    def finish(self, status: str, error: BaseException | None = None) -> None:
        self._flush()
        if self.out is not None and isinstance(error, NonFiniteLossError):
            record_divergence(self.out, error)  # a retry would diverge again: run_trial refuses it
        if self.out is not None and isinstance(error, PreemptedError):
            it = error.iteration
            append_row(self.out / "attempts.jsonl", {"attempt": self.attempt, "preempted_at": it, "notice": error.reason,
                                                     "reason": f"preempted at iteration {it}", "time": time.time()})
            self.emit(self._meta(it, PREEMPTED), None)  # before the error: the driver counts no failure
        if self.out is not None:  # the iterations this attempt trained (its last one is always reported)
            append_row(self.out / "segments.jsonl", {"attempt": self.attempt, "start": self.start_iter,
                                                     "end": self.last_step, "status": status,
                                                     "cuda": _cuda_initialized()})


def reporters_for(task: dict[str, Any], emit: Emit, attempt: int, forked_from: Path | None = None, *,
                  warnings: list[str] | None = None, placement: dict[str, Any] | None = None) -> list[Reporter]:
    from trainer.engine.reporters import ConsoleReporter, JsonlReporter

    found: list[Reporter] = [TuneReporter(emit, task, attempt, forked_from, warnings=warnings, placement=placement),
                             JsonlReporter(), ConsoleReporter()]
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        found.extend(importlib.import_module(module).reporters(task))
    return found


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _cuda_initialized() -> bool:
    """Whether this process touched CUDA (a Ray-assigned logical GPU must not pull a CPU trial onto it)."""
    import torch

    return bool(torch.cuda.is_initialized())


@contextmanager
def checkpoint_warnings() -> Iterator[list[str]]:
    """The warnings `trainer.engine.checkpoint` logs meanwhile (a damaged checkpoint skipped on resume)."""
    handler = _Collect()
    source = logging.getLogger("trainer.engine.checkpoint")
    source.addHandler(handler)
    try:
        yield handler.messages
    finally:
        source.removeHandler(handler)


def append_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
