"""Backbone pretraining's config (`python -m trainer.pretrain`): one strict model, presets applied first."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field, model_validator

from trainer.config.base import Backbone, Norm, _Strict
from trainer.recipes import PRETRAIN_PRESETS


class PretrainConfig(_Strict):
    """Backbone pretraining (`python -m trainer.pretrain`): classification on an ImageFolder set.

    Its length is `iters`, or `epochs` over the train folder (then `warmup_epochs` and `lr_steps` are in
    epochs too, turned into iterations once the folder's size is known). `batch_size` is the global batch,
    split over the processes of a data-parallel run.
    """

    preset: Literal["imagenet-gn"] | None = None
    data_root: Path = Path("datasets/imagenet")  # holds train/<class>/... and optionally val/
    backbone: Backbone = "R50"
    norm: Norm = "GN"
    image_size: int = Field(224, gt=0)  # random-resized-crop size; val: resize + center crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (ImageNet default)
    iters: int | None = Field(None, gt=0)  # None: from epochs, else 1000
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(256, gt=0)
    base_lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(0, ge=0)
    warmup_epochs: float | None = Field(None, ge=0)
    lr_schedule: Literal["cosine", "step"] = "cosine"  # cosine to zero, or x gamma at each of lr_steps
    lr_steps: list[float] = Field(default_factory=list)  # in epochs with `epochs`, else in iterations
    gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)  # max total grad norm; None = off
    num_workers: int = Field(2, ge=0)
    seed: int = 0
    threads: int | None = Field(None, gt=0)
    device: str = "auto"
    output_dir: Path = Path("runs/pretrain")
    checkpoint_period: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    log_period: int = Field(20, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("preset") in PRETRAIN_PRESETS:
            return {**PRETRAIN_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _length(self) -> "PretrainConfig":
        if self.iters is not None and self.epochs is not None:
            raise ValueError("give iters or epochs, not both (a preset sets epochs: override it with epochs=N, "
                             "or set epochs=null with iters=N)")
        if self.warmup_epochs is not None and self.epochs is None:
            raise ValueError("warmup_epochs goes with epochs; with iters use warmup_iters")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s <= 0 for s in self.lr_steps):
            raise ValueError("lr_steps must be positive and increasing")
        if self.lr_steps and self.lr_schedule != "step":
            raise ValueError("lr_steps needs lr_schedule: step")
        if self.iters is None and self.epochs is None:
            self.__dict__["iters"] = 1000
        return self
