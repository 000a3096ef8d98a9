"""Shared fixtures: a small synthetic COCO set generated once per session, and a CPU-sized config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests share 2 cores with each other's subprocesses; one intra-op thread keeps timings sane.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_MODEL = {
    "backbone": "R18", "norm": "GN", "min_size": 64, "max_size": 64,
    "rpn_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 32,
    "box_detections_per_img": 20, "representation_size": 128, "sampling_ratio": 1, "fpn_channels": 64,
}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from trainer.synthetic.datasets import generate_detection

    root = tmp_path_factory.mktemp("synth")
    generate_detection(root, seed=0, num_train=120, num_val=24, width=64, height=64)
    return root


@pytest.fixture(scope="session")
def synth_cls_root(tmp_path_factory) -> Path:
    from trainer.synthetic.datasets import generate_classification

    root = tmp_path_factory.mktemp("synth_cls")
    generate_classification(root, seed=0, per_class_train=24, per_class_val=6, size=32, classes=4)  # 96 train images
    return root / "classification"


def tiny_config(root: Path, out: Path, **levels) -> dict:
    """A CPU-sized trial config dict (R18-FPN GN, 64 px, batch 2) on the synthetic set."""
    cfg = {
        "model": dict(TINY_MODEL),
        "data": {"root": str(root), "train_split": "train", "val_split": "val", "num_workers": 0},
        "optim": {"base_lr": 0.01, "batch_size": 2, "grad_clip": 1.0},
        "schedule": {"iters": 6, "drops": [4], "warmup_iters": 2},
        "eval": {"period": 3, "batch_size": 4, "num_workers": 0},
        "checkpoint": {"period": 3},
        "runtime": {"output_dir": str(out), "threads": 1, "log_period": 1},
    }
    for level, values in levels.items():
        cfg.setdefault(level, {}).update(values)
    return cfg
