"""`model:` of a trial: the detector (`ModelConfig`), and the digest of its ImageNet weights file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from trainer.config.base import Backbone, Norm, _Strict
from trainer.recipes import DETECTRON_GN, gn_download_hint


class ModelConfig(_Strict):
    """Mask R-CNN with a ResNet-FPN backbone; sampling knobs default to torchvision's."""

    backbone: Backbone = "R50"
    norm: Norm = "GN"  # body (unless body_norm says otherwise), FPN and heads
    # The ResNet body's norm. Unset means `norm`; validation fills it in, so a resolved config always
    # says what the body runs. `FrozenBN` under a GN model = torchvision's BN ImageNet weights with a
    # frozen-BN body (detectron2's usual fine-tuning), which is never chosen silently.
    body_norm: Norm | None = None
    init: str = "random"  # random | imagenet | checkpoint:PATH
    # ImageNet weights file: Detectron pickle (R-50-GN.pkl) or torchvision/timm/trainer.pretrain state
    # dict, told apart by content; unset: torchvision's BN file in the torch hub cache (BN bodies only).
    imagenet_weights: Path | None = None
    # The input normalisation the body expects. auto: Detectron's (its PIXEL_MEANS, BGR 0-255, std 1)
    # for a Detectron pickle, torchvision's otherwise; the built model fills it in, so a run's
    # config.yaml always says which one it used. An explicit value must agree with the weights.
    pixel_convention: Literal["auto", "torchvision", "detectron"] = "auto"
    # sha256 of model.imagenet_weights: filled in at validation where the file exists (so the sweep's
    # MLflow params hold it) and when the model is built (config.yaml); a file with another digest
    # than the one set is refused. Not part of a trial's identity.
    imagenet_weights_sha256: str | None = None
    freeze_at: int = Field(0, ge=0, le=5)  # stages frozen from the stem: 0 = nothing (scratch)
    min_size: int = Field(800, gt=0)
    max_size: int = Field(1333, gt=0)
    rpn_batch_size_per_image: int = Field(256, gt=0)
    rpn_pre_nms_top_n_train: int = Field(2000, gt=0)
    rpn_post_nms_top_n_train: int = Field(2000, gt=0)
    rpn_pre_nms_top_n_test: int = Field(1000, gt=0)
    rpn_post_nms_top_n_test: int = Field(1000, gt=0)
    box_batch_size_per_image: int = Field(512, gt=0)
    box_detections_per_img: int = Field(100, gt=0)
    representation_size: int = Field(1024, gt=0)
    sampling_ratio: int = Field(2, ge=0)  # RoIAlign samples per bin; 0 = adaptive
    fpn_channels: int = Field(256, gt=0)
    # One anchor size per FPN level P2..P6 (3 aspect ratios each). The default suits COCO at 800 px;
    # small images need smaller anchors, or objects below the smallest size are barely matched.
    anchor_sizes: tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)
    task: Literal["mask", "box", "keypoints"] = "mask"  # Mask / Faster / Keypoint R-CNN (trainer.modeling.detectors)
    num_keypoints: int = Field(17, gt=0)  # keypoints detector: must equal the dataset's (COCO: 17)
    keypoint_head_channels: int = Field(512, gt=0)  # Detectron's 8 x 3x3 conv keypoint head width
    keypoint_head_norm: Literal["none", "model"] = "none"  # none: as Detectron's keypoint configs

    @field_validator("anchor_sizes")
    @classmethod
    def _check_anchors(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(a <= 0 for a in v) or list(v) != sorted(set(v)):
            raise ValueError("must be 5 positive, strictly increasing sizes (P2..P6)")
        return v

    @field_validator("init")
    @classmethod
    def _check_init(cls, v: str) -> str:
        if v in ("random", "imagenet") or (v.startswith("checkpoint:") and len(v) > len("checkpoint:")):
            return v
        raise ValueError("must be 'random', 'imagenet' or 'checkpoint:PATH'")

    @model_validator(mode="after")
    def _resolve_body_norm(self) -> "ModelConfig":
        body = self.body_norm or self.norm
        if self.init == "imagenet" and body == "GN" and self.imagenet_weights is None:
            where = f"weights/{DETECTRON_GN[self.backbone][0]}" if self.backbone in DETECTRON_GN else "PATH/backbone.pt"
            raise ValueError(
                f"init imagenet with a GN body needs GroupNorm ImageNet weights (torchvision only has BN "
                f"ones): set model.imagenet_weights: {where} ({gn_download_hint(self.backbone)}), or "
                "set model.body_norm: FrozenBN to fine-tune torchvision's BN weights in a frozen-BN body "
                "(detectron2's usual setup, not the paper's GN arm)")
        self.__dict__["body_norm"] = body
        if self.init == "imagenet" and self.imagenet_weights is not None and self.imagenet_weights_sha256 is None:
            self.__dict__["imagenet_weights_sha256"] = _weights_digest(Path(self.imagenet_weights))
        return self


_DIGESTS: dict[tuple, str] = {}


def _weights_digest(path: Path) -> str | None:
    """sha256 of a weights file that exists here (None otherwise), once per file version and process:
    filled in at validation, so the driver's MLflow params and every trial's config carry it."""
    try:
        st = path.expanduser().stat()
    except OSError:
        return None
    key = (str(path.expanduser().resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path.expanduser())
    return _DIGESTS[key]


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks (no torch import: `plan` stays light)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
