"""Periodic work around the step loop: training metrics, evaluation, checkpoints.

Each hook gets `before_train(trainer)` when `fit()` starts, `after_step(trainer)` once an iteration
is done (`trainer.state.iteration` counts finished iterations) and `after_train(trainer)` at the end.
Order at a shared iteration is metrics, evaluation, checkpoint: the checkpoint then carries the
evaluation it follows, and a reporter that forwards checkpoints (Ray Tune) gets the AP of that step
before the checkpoint itself. An evaluation first writes the iteration's checkpoint quietly (no
reporter hears of it), so an evaluation that fails never loses the training before it; a run
resumed from such a checkpoint runs the missing evaluation before its first step.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from trainer.engine import checkpoint as ckpt
from trainer.errors import NonFiniteLossError
from trainer.trial_dir import TrialDir

if TYPE_CHECKING:
    from trainer.engine.train_loop import Trainer

logger = logging.getLogger(__name__)


def _due(iteration: int, period: int, total: int) -> bool:
    return iteration == total or (period > 0 and iteration % period == 0)


class Hook:
    def before_train(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass


class MetricsHook(Hook):
    """Averages the step losses over the log window and reports them with LR and samples seen.

    Reading the device-side sums only here keeps host syncs out of the step. This is also where a
    non-finite loss is noticed (the step records the first bad iteration on device).
    """

    def after_step(self, trainer: "Trainer") -> None:
        st = trainer.state
        if _due(st.iteration, trainer.cfg.runtime.log_period, trainer.total_iters):
            self.flush(trainer)

    def flush(self, trainer: "Trainer") -> None:
        st = trainer.state
        trainer.check_finite()
        if st.window_count == 0:
            return
        sums = trainer.reduce_mean(st.window_sums).tolist()
        metrics = {f"train/{k}": v / st.window_count for k, v in zip(trainer.loss_names, sums)}
        # The LR of the step just taken (the optimizer already holds the next step's).
        metrics["train/lr"] = trainer.cfg.optim.base_lr * trainer.schedule.lr_factor(st.iteration - 1)
        trainer.sync_counters()
        metrics.update({f"seen/{k}": float(v) for k, v in st.counters.items()})
        st.window_sums.zero_()
        st.window_count = 0
        trainer.report(st.iteration, metrics)


class EvalHook(Hook):
    """COCO bbox/segm AP on the val split every `eval.period` iterations and at the end.

    With `eval.backend` "auto" the run's first evaluation scores with both pycocotools and
    faster-coco-eval and picks the scorer for the rest of the run (`trainer.evaluation.coco.RunScorer`).
    """

    scorer = None  # this run's RunScorer, made at the first evaluation

    def before_train(self, trainer: "Trainer") -> None:
        st = trainer.state
        if st.iteration and _due(st.iteration, trainer.cfg.eval.period, trainer.total_iters) \
                and st.last_eval.get("step") != st.iteration:
            logger.info("evaluation of iteration %d did not finish before the restart: running it now",
                        st.iteration)
            self.run(trainer)
            CheckpointHook().save(trainer, notify=CheckpointHook.due(trainer))

    def after_step(self, trainer: "Trainer") -> None:
        if _due(trainer.state.iteration, trainer.cfg.eval.period, trainer.total_iters):
            self.run(trainer)

    def run(self, trainer: "Trainer") -> None:
        from trainer.modeling.detectors import evaluate_function

        evaluate = evaluate_function(trainer.cfg)  # COCO bbox/segm, bbox/keypoints or VOC mAP by model.task
        st = trainer.state
        if st.last_eval.get("step") == st.iteration:
            return  # already evaluated at this iteration (resumed right after it)
        trainer.check_finite()
        if st.iteration:
            CheckpointHook().save(trainer, notify=False)  # training so far survives a failing evaluation
        ec = trainer.cfg.eval
        if self.scorer is None and ec.backend == "auto":
            from trainer.evaluation.coco import RunScorer

            self.scorer = RunScorer(ec.backend)
        # Every rank infers on its slice of val; rank 0 gathers and scores (others get {}).
        metrics = evaluate(trainer.bare_model, trainer.val_set, batch_size=ec.batch_size, device=trainer.device,
                           backend=self.scorer or ec.backend, num_workers=ec.num_workers, rank=trainer.rank,
                           world_size=trainer.world)
        trainer.barrier()
        st.last_eval = {"step": st.iteration, **metrics}
        if trainer.rank == 0:
            trainer.report(st.iteration, metrics)


class CheckpointHook(Hook):
    """Full-state checkpoint every `checkpoint.period` iterations, at `checkpoint.at` and at the end."""

    @staticmethod
    def due(trainer: "Trainer") -> bool:
        cc = trainer.cfg.checkpoint
        it = trainer.state.iteration
        return _due(it, cc.period, trainer.total_iters) or it in cc.at or it == trainer.stop_after

    def after_step(self, trainer: "Trainer") -> None:
        if self.due(trainer):
            self.save(trainer)

    def save(self, trainer: "Trainer", notify: bool = True) -> None:
        trainer.check_finite()
        trainer.sync_counters()
        trainer.gather_rank_states()
        it = trainer.state.iteration
        if trainer.rank == 0:
            path = ckpt.save_atomic(trainer.state_dict(), ckpt.checkpoint_path(trainer.ckpt_dir, it))
            ckpt.prune(trainer.ckpt_dir, trainer.cfg.checkpoint.keep_last, protect=trainer.cfg.checkpoint.at)
            logger.debug("checkpoint %s", path)
            for r in trainer.reporters if notify else ():
                r.checkpoint(it, path)
        trainer.barrier()


class FinalMetricsHook(Hook):
    """Writes final_metrics.json (the last evaluation plus samples seen) at the end of training."""

    def after_train(self, trainer: "Trainer") -> None:
        trainer.sync_counters()
        if trainer.rank != 0:
            return
        st = trainer.state
        final = {k: v for k, v in st.last_eval.items() if k != "step"}
        final.update({f"seen/{k}": float(v) for k, v in st.counters.items()})
        final["iteration"] = float(st.iteration)
        safe = {k: (v if math.isfinite(v) else None) for k, v in final.items()}
        TrialDir(trainer.output_dir).write_final(safe)
        trainer.final_metrics = final


def first_nonfinite(flag: torch.Tensor, value: torch.Tensor) -> NonFiniteLossError | None:
    """Turn the device-side (first bad iteration, its loss) pair into an error, if any."""
    bad_iter = int(flag.item())
    if bad_iter < 0:
        return None
    return NonFiniteLossError(bad_iter, float(value.item()))
