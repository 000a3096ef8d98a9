"""A trial's `TrainConfig` and its levels besides model and data: optim, schedule, eval, checkpoint,
runtime (one strict model each)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from trainer.config.base import _Strict
from trainer.config.data import DataConfig
from trainer.config.model import ModelConfig


class OptimConfig(_Strict):
    """SGD as in the paper: LR 0.02 at batch 16, momentum 0.9, wd 1e-4 and none on norm parameters."""

    base_lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    weight_decay_norm: float = Field(0.0, ge=0)
    batch_size: int = Field(16, gt=0)  # images per iteration, over all workers of a trial
    grad_clip: float | None = Field(None, gt=0)  # max total grad norm; None = off
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype; fp16 adds a GradScaler on CUDA


_NX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x\s*$")


class ScheduleConfig(_Strict):
    """The paper's rule: `length: 2x` = 2 x iters_per_x iterations, LR x gamma at the last 60k and 20k.

    Written in YAML either as `schedule: 2x` or as an explicit `schedule: {iters: 90000, drops: [60000,
    80000]}` (Detectron's own 1x). Drop distances scale with iters_per_x / 90000.
    """

    length: str | None = None
    iters: int | None = Field(None, gt=0)
    drops: list[int] | None = None
    iters_per_x: int = Field(90_000, gt=0)
    drop_distances: tuple[int, ...] = (60_000, 20_000)  # at iters_per_x = 90k
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_iters: int = Field(500, ge=0)
    warmup_factor: float = Field(1.0 / 3.0, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"length": data}
        return data

    @model_validator(mode="after")
    def _one_form(self) -> "ScheduleConfig":
        if (self.length is None) == (self.iters is None):
            if self.length is None:
                self.__dict__["length"] = "1x"
            else:
                raise ValueError("give either a length like '2x' or explicit iters, not both")
        if self.length is not None:
            if not _NX.match(self.length):
                raise ValueError(f"unknown schedule {self.length!r}; expected 'Nx' (e.g. 1x, 2x, 6x)")
            if self.drops is not None:
                raise ValueError("drops go with explicit iters; a length like '2x' derives them")
        elif self.drops is not None:
            if list(self.drops) != sorted(self.drops) or any(d <= 0 or d >= self.iters for d in self.drops):
                raise ValueError(f"drops must be increasing and inside (0, {self.iters})")
        return self


class EvalConfig(_Strict):
    period: int = Field(0, ge=0)  # iterations between evaluations; 0 = only at the end
    batch_size: int = Field(2, gt=0)
    backend: Literal["auto", "pycocotools", "faster_coco_eval"] = "auto"
    num_workers: int = Field(2, ge=0)  # evaluation loader workers (image decoding), per rank


class CheckpointConfig(_Strict):
    period: int = Field(0, ge=0)  # iterations between checkpoints; 0 = only at the end
    keep_last: int = Field(3, ge=1)
    # Extra iterations to checkpoint at (kept regardless of keep_last): schedule fork points.
    at: list[int] = Field(default_factory=list)


class RuntimeConfig(_Strict):
    output_dir: Path = Path("runs/trial")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, gt=0)  # torch intra-op threads; None = torch's default
    log_period: int = Field(20, gt=0)
    # Speed switches (trainer/speed.py). CUDA-only ones are no-ops on CPU (logged at debug level).
    # cuDNN autotuning pays off only when input shapes repeat; detection batches vary in shape
    # (aspect ratio, scale jitter), so it is off by default, as in Detectron2.
    cudnn_benchmark: bool = False
    tf32: bool = True  # CUDA only: TF32 tensor cores for fp32 matmuls and convolutions
    channels_last: bool = False  # NHWC weights and backbone input (CPU and CUDA)
    compile_backbone: bool = False  # torch.compile the ResNet-FPN backbone in place
    # DDP process-group backend: auto = NCCL when the run's device is CUDA, gloo otherwise.
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Seconds between a preemption notice (SIGTERM) and the hard kill, as this run assumes them: the
    # run stops at the end of the step in flight and writes its checkpoint (trainer.engine.preemption); a
    # checkpoint that took longer is warned about (the platform's grace is what really counts).
    preemption_grace_s: float = Field(20.0, gt=0)


class TrainConfig(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _task_fits_data(self) -> "TrainConfig":
        if self.data.format == "voc" and self.model.task != "box":
            raise ValueError(f"data.format=voc has boxes only: set model.task=box (got {self.model.task})")
        return self
