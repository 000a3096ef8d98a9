"""Mask R-CNN with a ResNet-FPN backbone, built the paper's way from a `ModelConfig`.

Owns the detection model: norm placement (GN/SyncBN/BN in body, FPN, 4conv1fc box head and mask
head; FrozenBN in the body only), the RoI heads and sampling knobs, and the initialization
(`random` from scratch, `imagenet` from GN weights (Detectron's R-50-GN.pkl, timm, our pretraining)
for a GN body or torchvision's BN weights for a BN-family body, `checkpoint:PATH` from backbone
pretraining). The body runs `model.body_norm` (resolved at validation, = `norm` unless set), never a
norm chosen from the weights file; `build_model` returns that resolved config.

The ResNet/norm/weight-file helpers live in `trainer.modeling.backbone` and are re-exported here.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from trainer.modeling.backbone import (
    GN_GROUPS,
    build_resnet,
    find_imagenet_weights,
    freeze_stages,
    is_norm_param,
    load_backbone_weights,
    norm_factory,
    norm_parameters,
    read_state_file,
)
from trainer.config import ModelConfig
from trainer.errors import InitError
from trainer.modeling.imagenet_weights import load_imagenet_weights, pixel_normalisation

__all__ = [
    "build_model",
    "build_resnet",
    "find_imagenet_weights",
    "is_norm_param",
    "load_backbone_weights",
    "norm_factory",
    "norm_parameters",
]

log = logging.getLogger(__name__)

FEATURE_MAPS = ["0", "1", "2", "3"]  # FPN levels P2-P5 the RoI heads pool from ("pool" is RPN only)


def _head_norm(norm: str) -> Callable[[int], nn.Module] | None:
    """Norm of FPN and RoI heads: the model's norm, except FrozenBN which means 'no norm' there."""
    return None if norm == "FrozenBN" else norm_factory(norm)


def _load_init(cfg: ModelConfig, body: nn.Module) -> tuple[str, dict[str, Any]]:
    """Put `cfg.init`'s weights into the body; returns where they came from ("random" for none) and
    the config fields they resolve (`pixel_convention`, `imagenet_weights_sha256`).

    `imagenet` loads strictly (every body tensor, right shape, right norm family, Detectron's pixel
    convention folded in: `trainer.modeling.imagenet_weights`); `checkpoint:PATH` keeps the tolerant loader
    (prefixes, partial files logged) for backbones of our own runs. A BN-trained file never goes
    into a GN body: the norm the body runs is the config's `body_norm`, nothing else.
    """
    plain = {"pixel_convention": "torchvision" if cfg.pixel_convention == "auto" else cfg.pixel_convention}
    if cfg.init == "random":
        return "random", plain
    if cfg.init == "imagenet":
        path = find_imagenet_weights(cfg.backbone, cfg.imagenet_weights, cfg.body_norm)
        info = load_imagenet_weights(body, path, cfg.body_norm)
        if cfg.pixel_convention not in ("auto", info["convention"]):
            raise InitError(f"model.pixel_convention is {cfg.pixel_convention} but {path} ({info['format']}) "
                            f"needs {info['convention']}: leave it at auto")
        if cfg.imagenet_weights_sha256 not in (None, info["sha256"]):
            raise InitError(f"{path} has sha256 {info['sha256']}, model.imagenet_weights_sha256 expects "
                            f"{cfg.imagenet_weights_sha256}")
        return str(path), {"pixel_convention": info["convention"], "imagenet_weights_sha256": info["sha256"]}
    path = cfg.init.removeprefix("checkpoint:")
    load_backbone_weights(body, read_state_file(path), path)
    return path, plain


def _check_channels(cfg: ModelConfig) -> None:
    if cfg.norm == "GN" and cfg.fpn_channels % GN_GROUPS:
        raise InitError(
            f"model.fpn_channels={cfg.fpn_channels} must be divisible by {GN_GROUPS} for GroupNorm "
            f"in the FPN and heads"
        )


def _build_backbone(cfg: ModelConfig) -> tuple[BackboneWithFPN, str, dict[str, Any]]:
    """ResNet body (+ weights, + frozen stages) under an FPN with the head norm; the init source and
    the fields it resolves."""
    body = build_resnet(cfg.backbone, cfg.body_norm)
    source, resolved = _load_init(cfg, body)
    frozen = freeze_stages(body, cfg.freeze_at)
    log.info("freeze_at=%d: %d backbone parameters frozen", cfg.freeze_at, frozen)
    # Written out instead of torchvision's _resnet_fpn_extractor, which fixes 256 FPN channels;
    # the layer selection and channel arithmetic are the same.
    stage2 = body.inplanes // 8  # 64 for BasicBlock, 256 for Bottleneck
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
        in_channels_list=[stage2 * 2 ** (k - 1) for k in (1, 2, 3, 4)],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=_head_norm(cfg.norm),
    ), source, resolved


def _heads(cfg: ModelConfig, num_classes: int) -> dict:
    """RPN and RoI head modules: 1-conv RPN head (no norm), 4conv1fc box head, 4conv mask head."""
    channels, norm = cfg.fpn_channels, _head_norm(cfg.norm)
    anchors = AnchorGenerator(tuple((a,) for a in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    return dict(
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=1),
        box_roi_pool=MultiScaleRoIAlign(FEATURE_MAPS, output_size=7, sampling_ratio=cfg.sampling_ratio),
        box_head=FastRCNNConvFCHead(
            (channels, 7, 7), [channels] * 4, [cfg.representation_size], norm_layer=norm
        ),
        box_predictor=FastRCNNPredictor(cfg.representation_size, num_classes),
    ) | (dict(  # box and keypoint detectors have no mask head at all (trainer.modeling.detectors adds theirs)
        mask_roi_pool=MultiScaleRoIAlign(FEATURE_MAPS, output_size=14, sampling_ratio=cfg.sampling_ratio),
        mask_head=MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
    ) if cfg.task == "mask" else {})


def build_model(cfg: ModelConfig, num_classes: int) -> tuple[MaskRCNN, ModelConfig]:
    """Mask R-CNN for `num_classes` (background included) and the resolved config."""
    if num_classes < 2:
        raise InitError(f"num_classes must count background plus at least one class, got {num_classes}")
    _check_channels(cfg)
    if cfg.body_norm is None:  # a config built without validation (model_construct)
        cfg = cfg.model_copy(update={"body_norm": cfg.norm})
    body_norm = cfg.body_norm
    backbone, source, init_fields = _build_backbone(cfg)
    image_mean, image_std = pixel_normalisation(init_fields["pixel_convention"])
    detector, heads = MaskRCNN, _heads(cfg, num_classes)
    if cfg.task != "mask":  # Faster R-CNN / Keypoint R-CNN on the same backbone, RPN and box head
        from trainer.modeling.detectors import detector_and_heads

        detector, heads = detector_and_heads(cfg, heads, _head_norm(cfg.norm))
    model = detector(
        backbone,
        num_classes=None,  # the predictors below carry it
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        image_mean=list(image_mean),
        image_std=list(image_std),
        **heads,
    )
    resolved = cfg.model_copy(update=init_fields)
    head_norm = "none" if cfg.norm == "FrozenBN" else cfg.norm
    init = "random (torchvision default init)" if source == "random" else f"{cfg.init.split(':')[0]} ({source})"
    log.info(
        "%s %s-FPN: init=%s, body norm %s, FPN/head norm %s, %s pixel convention, %d classes, %.1fM "
        "parameters (%.1fM trainable)",
        detector.__name__, cfg.backbone, init, body_norm, head_norm, init_fields["pixel_convention"], num_classes,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    )
    return model, resolved
