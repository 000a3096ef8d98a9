"""Named recipes and weight sources the configs refer to (torch-free, so `plan` stays light).

`DETECTRON_GN`: the file name and URL of the paper's GN ImageNet weights per backbone, for the
one-line refusals of `model.init: imagenet` and for `run`'s check of the weight files.
`PRETRAIN_PRESETS`: `python -m trainer.pretrain --preset NAME` (or `preset: NAME` in a config).
"""

from __future__ import annotations

from typing import Any

# Where the paper's GN ImageNet weights come from (detectron2 MODEL_ZOO.md, Detectron's format).
DETECTRON_GN = {
    "R50": ("R-50-GN.pkl", "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/47261647/R-50-GN.pkl"),
    "R101": ("R-101-GN.pkl", "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/47592356/R-101-GN.pkl"),
}


def gn_download_hint(backbone: str) -> str:
    """Where GN ImageNet weights for `backbone` come from, as text for a one-line message."""
    if backbone in DETECTRON_GN:
        name, url = DETECTRON_GN[backbone]
        return f"{name}, download {url}"
    return "a GN-pretrained backbone.pt from `python -m trainer.pretrain --preset imagenet-gn`"


# Named pretraining recipes (`--preset NAME`, or `preset: NAME` in a config / a sweep's pretrain job); the
# keys a config sets itself win. imagenet-gn: ImageNet classification pretraining of a GN ResNet (32
# groups; ResNet-50, or backbone=R101), ~100 epochs as the paper counts ImageNet's cost: batch 256, LR 0.1
# with a 5-epoch linear warm-up, x0.1 at epochs 30, 60 and 90 of 100, weight decay 1e-4 and none on norms.
PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-gn": {"backbone": "R50", "norm": "GN", "image_size": 224, "crop_scale": (0.08, 1.0),
                    "batch_size": 256, "base_lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                    "epochs": 100, "warmup_epochs": 5, "lr_schedule": "step", "lr_steps": [30, 60, 90],
                    "gamma": 0.1},
}
