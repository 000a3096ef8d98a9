"""What a trial attempt reports (worker side): Tune results, its attempts and segments rows, plugins.

Ray-free (the Tune `report` call is handed in as `emit`), so it runs and is tested without a cluster;
`orchestrator.worker.trainable` wires it into the Tune function. Tune carries progress only: each trainer
report goes out at once as a result (the iteration, the event, the metrics), which feeds the
driver's live view and state.json; the metrics' record is the trial's metrics.jsonl (`JsonlReporter`),
which the driver's `orchestrator.tracking.metric_sync` tails into MLflow. No Tune checkpoints: an attempt
resumes from the trainer's own checkpoints in its folder.

Each attempt's row in attempts.jsonl says where it ran (host, pid, Ray node, the GPU ids Ray
assigned), from where it started and into which MLflow run it reports (the task's, else the one its
checkpoint's `tracking` dict kept); a damaged checkpoint the trainer skipped on the way
(`trainer.engine.checkpoint.load_latest`) is named there and in the attempt's first report
(`trial/warnings`), which the driver logs. An attempt stopped on a preemption notice
(`trainer.engine.preemption`) adds a second row for the same attempt, {"preempted_at": N, "reason":
"preempted at iteration N"}, and sends a last result with event "preempted" before its error reaches
Tune: the driver counts it as a preemption, not a failure (`orchestrator.execution.ray_backend`). A diverged
attempt records diverged.json (`record_divergence`): the worker refuses to retry it.

Plugin reporters: every installed entry point of group `orchestrator.reporters` is a function
`reporters(task) -> list[trainer.engine.reporters.Reporter]` added to each attempt's reporters (e.g. a progress
exporter). Entry points, not an environment variable: a plugin is installed (or its dist-info put
on the trial's PYTHONPATH, as the tests' fault injection does, tests/plugins), never named by code.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator.worker.task import K_EVENT, K_ITER, K_WARNINGS, PREEMPTED, Task  # noqa: F401  (K_*: shared keys)
from trainer.errors import NonFiniteLossError
from trainer.engine.preemption import PreemptedError
from trainer.engine.reporters import Reporter, RunInfo
from trainer.trial_dir import ATTEMPTS, DIVERGED, SEGMENTS, TrialDir

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "orchestrator.reporters"
Emit = Callable[[dict[str, Any]], None]


class TuneReporter(Reporter):
    """Trainer reporter that emits each report to Tune as it comes, and keeps the attempt's rows."""

    def __init__(self, emit: Emit, task: Task, attempt: int, forked_from: Path | None = None, *,
                 warnings: list[str] | None = None, placement: dict[str, Any] | None = None):
        self.emit, self.task, self.attempt, self.forked_from = emit, task, attempt, forked_from
        # Filled while the trainer restores (before start()): damaged checkpoints it skipped.
        self.warnings = warnings if warnings is not None else []
        self.placement = placement or {}
        self.start_iter = self.last_step = 0
        self.folder: TrialDir | None = None  # set by start(): no segment for an attempt that never started
        self.run_id = task.run_id

    def start(self, info: RunInfo) -> None:
        self.start_iter = self.last_step = info.start_iter
        if info.tracking.get("trial_id") not in (None, self.task.trial_id):
            info.tracking.clear()  # restored from the trunk's checkpoint: its tracking dict is the trunk's
        # The run is made by the driver when the trial starts (`metric_sync`), so an attempt launched before
        # it existed knows no id (""); the id the driver knows now wins over one the checkpoint kept.
        self.run_id = self.run_id or info.tracking.get("mlflow_run_id", "")
        info.tracking["mlflow_run_id"] = self.run_id
        info.tracking.setdefault("trial_id", self.task.trial_id)
        row = {"attempt": self.attempt, "start_iter": info.start_iter, "time": time.time(),
               "host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id, **self.placement}
        if self.forked_from is not None:
            row["forked_from"] = str(self.forked_from)
        meta = {K_ITER: info.start_iter, K_EVENT: "start"}
        if self.warnings:
            row["warnings"] = list(self.warnings)
            meta[K_WARNINGS] = "; ".join(self.warnings)
        self.folder = TrialDir(info.output_dir)
        self.folder.add_row(ATTEMPTS, row)
        self.emit(meta)

    def log(self, step: int, metrics) -> None:
        self.last_step = max(self.last_step, step)
        event = "eval" if any(k.startswith(("bbox/", "segm/")) for k in metrics) else "train"
        self.emit({**metrics, K_ITER: step, K_EVENT: event})

    def checkpoint(self, step: int, path: Path) -> None:
        self.last_step = max(self.last_step, step)

    def finish(self, status: str, error: BaseException | None = None) -> None:
        if self.folder is None:
            return
        if isinstance(error, NonFiniteLossError):
            record_divergence(self.folder, error)  # a retry would diverge again: run_trial refuses it
        if isinstance(error, PreemptedError):
            it = error.iteration
            self.folder.add_row(ATTEMPTS, {"attempt": self.attempt, "preempted_at": it, "notice": error.reason,
                                           "reason": f"preempted at iteration {it}", "time": time.time()})
            self.emit({K_ITER: it, K_EVENT: PREEMPTED})  # before the error: the driver counts no failure
        # The iterations this attempt trained (its last one is always reported).
        self.folder.add_row(SEGMENTS, {"attempt": self.attempt, "start": self.start_iter, "end": self.last_step,
                                       "status": status, "cuda": _cuda_initialized()})


def reporters_for(task: Task, emit: Emit, attempt: int, forked_from: Path | None = None, *,
                  warnings: list[str] | None = None, placement: dict[str, Any] | None = None) -> list[Reporter]:
    from trainer.engine.reporters import ConsoleReporter, JsonlReporter

    found: list[Reporter] = [TuneReporter(emit, task, attempt, forked_from, warnings=warnings, placement=placement),
                             JsonlReporter(), ConsoleReporter()]
    for plugin in entry_points(group=PLUGIN_GROUP):
        found.extend(plugin.load()(task))
    return found


def record_divergence(folder: TrialDir, error: NonFiniteLossError) -> None:
    """The reason the driver shows, and a bar to retries."""
    folder.mark(DIVERGED, {"iteration": int(error.iteration), "loss": str(error.loss), "message": str(error),
                           "time": time.time()})


def recorded_divergence(folder: TrialDir) -> NonFiniteLossError | None:
    """The NonFiniteLossError recorded in a trial folder, or None."""
    data = folder.marker(DIVERGED)
    return NonFiniteLossError(int(data["iteration"]), float(data["loss"])) if data else None


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
