"""The detection task of a trial (`model.task`): what the RoI heads predict, read and score.

* `mask`: Mask R-CNN on COCO instances (trainer.modeling.model / trainer.data / trainer.evaluation.coco).
* `box`: Faster R-CNN, the same backbone, RPN and 4conv1fc box head without any mask head or mask
  targets; COCO instances (bbox AP) or Pascal VOC (`data.format: voc`, VOC07 mAP@0.5).
* `keypoints`: Keypoint R-CNN on COCO person keypoints: the box branch plus Detectron's keypoint
  head (8 x 3x3 convs of `keypoint_head_channels`, MSRA init, a stride-2 deconvolution and 2x
  bilinear upsampling to 56x56 heatmaps from 14x14 RoIAlign features). Detectron's keypoint configs
  (`e2e_keypoint_rcnn_R-50-FPN_*.yaml`, head `add_roi_pose_head_v1convX`) run that head without a
  norm; its GN configs (`04_2018_gn_baselines`) put GN in the body, FPN and box head, which is what
  `model.norm: GN` gives here. `keypoint_head_norm: model` adds the model's norm after each of the 8
  convs as well.

This module is the one dispatch point: the engine, model builder and evaluation hook ask it for
the loss names, detector class and heads, datasets and evaluation function of a config.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, KeypointRCNN
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from trainer.config import ModelConfig, TrainConfig

FEATURE_MAPS = ["0", "1", "2", "3"]
KEYPOINT_HEAD_CONVS = 8  # Detectron KRCNN.NUM_STACKED_CONVS
_COMMON = ("loss", "loss_classifier", "loss_box_reg")
_RPN = ("loss_objectness", "loss_rpn_box_reg")
LOSS_NAMES = {
    "mask": _COMMON + ("loss_mask",) + _RPN,
    "box": _COMMON + _RPN,
    "keypoints": _COMMON + ("loss_keypoint",) + _RPN,
}


def loss_names(detector: str) -> tuple[str, ...]:
    """The reported losses of a detector, total first (`train/<name>` metrics)."""
    return LOSS_NAMES[detector]


class KeypointHead(nn.Sequential):
    """Detectron's v1convX keypoint head: N x (3x3 conv [+ norm] + ReLU), MSRA (fan-out) init."""

    def __init__(self, in_channels: int, channels: int, layers: int,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        modules: list[nn.Module] = []
        for _ in range(layers):
            conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=norm_layer is None)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            modules += [conv] + ([norm_layer(channels)] if norm_layer else []) + [nn.ReLU(inplace=True)]
            in_channels = channels
        super().__init__(*modules)


def detector_and_heads(cfg: ModelConfig, heads: dict, head_norm: Callable[[int], nn.Module] | None
                  ) -> tuple[type, dict]:
    """(torchvision detector class, its head modules) for a non-mask detector; `heads` holds the RPN
    and box modules the mask model would get (same norms and init), no mask modules."""
    if cfg.task == "box":
        return FasterRCNN, dict(heads)
    if cfg.task == "keypoints":
        norm = head_norm if cfg.keypoint_head_norm == "model" else None
        extra = dict(
            keypoint_roi_pool=MultiScaleRoIAlign(FEATURE_MAPS, output_size=14, sampling_ratio=cfg.sampling_ratio),
            keypoint_head=KeypointHead(cfg.fpn_channels, cfg.keypoint_head_channels, KEYPOINT_HEAD_CONVS, norm),
            keypoint_predictor=KeypointRCNNPredictor(cfg.keypoint_head_channels, cfg.num_keypoints),
        )
        return KeypointRCNN, {**heads, **extra}
    raise ValueError(f"no detector for model.task {cfg.task!r}")


def uses_detector_data(cfg: TrainConfig) -> bool:
    """False for the original path (Mask R-CNN on COCO instances, trainer.data)."""
    return cfg.model.task != "mask" or cfg.data.format != "coco"


def build_detector_datasets(cfg: TrainConfig, stream_seed: int = 0) -> tuple[Any, Any, list]:
    """(train set, val set, chosen train ids) of a box or keypoint trial."""
    if cfg.data.format == "voc":
        from trainer.data.voc import build_voc_datasets

        return build_voc_datasets(cfg.data, stream_seed)
    from trainer.data.keypoints import build_box_keypoint_datasets

    return build_box_keypoint_datasets(cfg.data, cfg.model, stream_seed)


def evaluate_function(cfg: TrainConfig) -> Callable[..., dict[str, float]]:
    """evaluate(model, dataset, *, batch_size, device, backend, ...) for the config's detection task
    and data: each runs its evaluator (`trainer.evaluation.inference.DatasetEvaluator`) in the one
    inference loop."""
    if not uses_detector_data(cfg):
        from trainer.evaluation.coco import evaluate

        return evaluate
    if cfg.data.format == "voc":
        from trainer.evaluation.voc import evaluate_voc

        return evaluate_voc
    from trainer.evaluation.keypoints import evaluate_box_keypoints

    return evaluate_box_keypoints


def image_hw(target: dict) -> tuple[int, int]:
    """Height and width of a training target's image (masks carry it; other detectors store it)."""
    if "masks" in target:
        return tuple(target["masks"].shape[-2:])  # type: ignore[return-value]
    return tuple(int(v) for v in target["image_size"])  # type: ignore[return-value]


def as_tensor_keypoints(keypoints: list[list[float]], k: int) -> torch.Tensor:
    """COCO flat [x1, y1, v1, ...] per instance -> float [N, K, 3]."""
    return torch.tensor(keypoints, dtype=torch.float32).reshape(-1, k, 3)
