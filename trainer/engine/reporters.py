"""Where a run's numbers go: the `Reporter` seam and the two reporters the trainer ships.

The loop never knows who listens. A reporter gets `start` once (it may read and write
`info.tracking`, a dict saved in every checkpoint),
`log` for every batch of metrics (step = iteration), `checkpoint` after each checkpoint is safely on
disk, and `finish` with the final status. Metric names are flat strings: `train/loss`, `train/lr`,
`bbox/AP`, `segm/AP50`, `seen/images`, ...
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from trainer.trial_dir import TrialDir, parse_metric_rows

logger = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """What a reporter may know about the run it listens to."""

    config: Any  # the resolved TrainConfig
    output_dir: Path
    start_iter: int  # first iteration this process will run (0, or checkpoint iteration on resume)
    total_iters: int
    tracking: dict[str, Any] = field(default_factory=dict)  # persisted in checkpoints
    rank: int = 0
    # Whether the checkpoint resumed from holds the evaluation at start_iter. A checkpoint written just
    # before an evaluation does not: that evaluation runs again, so its earlier rows are dropped.
    evaluated_at_start: bool = True


class Reporter:
    """Base class with no-op hooks; subclass what you need."""

    def start(self, info: RunInfo) -> None:
        pass

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def checkpoint(self, step: int, path: Path) -> None:
        pass

    def finish(self, status: str, error: BaseException | None = None) -> None:
        """status: 'finished' | 'failed' | 'stopped' | 'preempted' (trainer.engine.preemption)."""


class ConsoleReporter(Reporter):
    """A progress line per training log: iteration, loss, lr, it/s, ETA; AP lines after evaluation.

    AP is printed in percent, as the paper prints it; the metrics themselves (metrics.jsonl, MLflow)
    keep COCO's fractions in [0, 1]."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._it0 = 0
        self._total = 0

    def start(self, info: RunInfo) -> None:
        self._t0, self._it0, self._total = time.perf_counter(), info.start_iter, info.total_iters
        logger.info("training iterations %d -> %d, outputs in %s", info.start_iter, info.total_iters,
                    info.output_dir)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if "train/loss" in metrics:
            done = step - self._it0
            rate = done / max(time.perf_counter() - self._t0, 1e-9)
            eta = (self._total - step) / rate if rate > 0 else math.inf
            logger.info("iter %d/%d  loss %.4f  lr %.5f  %.2f it/s  eta %s", step, self._total,
                        metrics["train/loss"], metrics.get("train/lr", float("nan")), rate, hms(eta))
        aps = {k: v for k, v in metrics.items() if k in ("bbox/AP", "segm/AP", "bbox/AP50", "segm/AP50",
                                                          "keypoints/AP", "keypoints/AP50", "voc/mAP")}
        if aps:
            logger.info("eval @ %d: %s", step, "  ".join(f"{k} {ap_percent(v)}" for k, v in sorted(aps.items())))

    def finish(self, status: str, error: BaseException | None = None) -> None:
        logger.info("run %s after %s", status, hms(time.perf_counter() - self._t0))


class JsonlReporter(Reporter):
    """Appends one row per `log` call to the run folder's metrics.jsonl (`trainer.trial_dir`).

    On resume, rows beyond the resumed iteration (written after the checkpoint, before the crash)
    are dropped first, so the file never holds a step twice.
    """

    def __init__(self) -> None:
        self.folder: TrialDir | None = None

    def start(self, info: RunInfo) -> None:
        if info.rank != 0:
            return
        self.folder = TrialDir(info.output_dir)
        at = info.start_iter
        self.folder.keep_metrics(lambda step, row: step < at or (
            step == at and (info.evaluated_at_start or not _is_eval_row(row))))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.folder is not None:
            self.folder.append_metrics(step, {k: float(v) for k, v in metrics.items()})


def _is_eval_row(row: Mapping[str, Any]) -> bool:
    """An evaluation's row: metrics other than the loop's own (train/*, seen/*)."""
    return any(not k.startswith(("train/", "seen/")) for k in row)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a metrics.jsonl file, in order, with their "step" (`trainer.trial_dir` parses them)."""
    path = Path(path)
    if not path.exists():
        return []
    return [{"step": step, **row} for step, row in parse_metric_rows(path.read_bytes())]


def ap_percent(value: float) -> str:
    """COCO AP (a fraction; -1 = no objects of that size) as people read it: '16.6%' or 'n/a'."""
    return "n/a" if value < 0 or not math.isfinite(value) else f"{100 * value:.1f}%"


def hms(seconds: float) -> str:
    """H:MM:SS of a duration ("?" when unknown): progress lines, sweep summaries, the live table."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
