"""`data:` of a trial: where a split's annotations and images are and how the loader reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trainer.config.base import _Strict


def check_layout_pairs(section: Any) -> None:
    """A split's annotation file and image folder come together or not at all (data configs and the
    sweep spec's dataset section share this rule)."""
    for split in ("train", "val"):
        if (getattr(section, f"{split}_json") is None) != (getattr(section, f"{split}_image_dir") is None):
            raise ValueError(f"{split}_json and {split}_image_dir go together: give both or neither")


class DataConfig(_Strict):
    """A COCO instances dataset: ROOT/annotations/instances_{split}.json and ROOT/{split}/ images by
    default, or any annotation file + image folder per split (`train_json`/`train_image_dir`, ...)."""

    root: Path = Path("datasets/coco")
    train_split: str = "train2017"
    val_split: str = "val2017"
    train_images: int | Literal["all"] = "all"  # seeded, nested subset of the train split
    val_images: int | Literal["all"] = "all"  # first N val images (by id), for quick checks
    subset_seed: int = 0
    hflip: bool = True
    scale_jitter: tuple[int, int] | None = None  # e.g. (640, 800): the paper's "train aug"
    num_workers: int = Field(2, ge=0)
    prefetch_factor: int = Field(2, ge=1)  # batches each loader worker keeps ready
    # Keep loader workers alive between passes over the loader. The train stream is one pass per
    # `fit()`, so this only saves worker start-up when a loader is iterated again; off by default.
    persistent_workers: bool = False
    pin_memory: bool = True  # CUDA only: page-locked batches, copied to the GPU with non_blocking
    # Batches of landscape-only or portrait-only images (less padding per batch). Still a pure
    # function of (seed, iteration); off by default because it changes which images share a batch.
    aspect_grouping: bool = False
    format: Literal["coco", "voc"] = "coco"  # voc: ROOT is a VOC20xx folder, box detector only (trainer.data.voc)
    voc_classes: list[str] | None = None  # voc: class names in label order; None = the 20 VOC classes
    # Any layout, like detectron2's register_coco_instances(name, {}, json, image_root): a split's
    # annotation file and image folder, given together, replace ROOT/annotations/instances_{split}.json
    # and ROOT/{split}/ for that split. Unset: the COCO 2017 layout under `root`.
    train_json: Path | None = None
    train_image_dir: Path | None = None
    val_json: Path | None = None
    val_image_dir: Path | None = None
    # A JSON width/height that differs from the image file is an error; true makes it a warning
    # with the count (masks of those images may then be off their boxes).
    allow_size_mismatch: bool = False
    # The up-front check refuses these defects (exit 2, one line); each switch turns its kind into a
    # logged drop, from training and from the evaluation ground truth alike: images that are missing
    # or do not decode fully (with their annotations), annotations with a bad polygon or an RLE of
    # another size, annotations whose bbox is not 4 finite numbers.
    allow_unreadable_images: bool = False
    allow_bad_segmentation: bool = False
    allow_bad_boxes: bool = False
    check_workers: int = Field(0, ge=0)  # processes decoding images in the check; 0 = one per CPU
    # Dataset check results and the train index, keyed by the annotation file's hash. None: a
    # `.trainer_cache` folder beside the annotation file (skipped with a warning if unwritable).
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _layout_pairs(self) -> "DataConfig":
        check_layout_pairs(self)
        return self

    @field_validator("train_images", "val_images")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive image count or 'all'")
        return v

    @field_validator("scale_jitter")
    @classmethod
    def _jitter(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 < v[0] <= v[1]):
            raise ValueError("must be (min_short_side, max_short_side) with 0 < min <= max")
        return v
