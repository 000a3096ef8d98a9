"""Tiny sweep specs and the CLI runner, shared by the tests and `bench/load_sweep.py` (no pytest here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# A Mask R-CNN small enough to run a few iterations a second on one CPU thread. Half the RPN proposals
# and detections of the trainer tests' TINY_MODEL (tests/conftest.py): a sweep test trains many trials,
# and these values are part of the trial ids of the sweep fixtures made with them.
TINY_SWEEP_MODEL = {"backbone": "R18", "norm": "GN", "min_size": 64, "max_size": 64, "rpn_batch_size_per_image": 32,
                    "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100,
                    "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32, "box_detections_per_img": 10,
                    "representation_size": 128, "sampling_ratio": 1, "fpn_channels": 64}


def tiny_spec(tmp: Path, name: str = "tiny", **changes: Any) -> dict[str, Any]:
    spec = {
        "name": name,
        "dataset": {"root": str(tmp / "data"), "train_split": "train", "val_split": "val",
                    "generate": {"train": 16, "val": 4, "size": 64}},
        "grid": {"init": ["random"], "data": ["all", 8], "schedule": ["1x"], "backbone": ["R18"]},
        "base": {"model": dict(TINY_SWEEP_MODEL), "data": {"num_workers": 0},
                 "optim": {"batch_size": 1, "grad_clip": 1.0},
                 "schedule": {"iters_per_x": 6, "warmup_iters": 1},
                 "eval": {"period": 3, "batch_size": 4, "num_workers": 0}, "checkpoint": {"period": 3},
                 "runtime": {"device": "cpu", "threads": 1, "log_period": 3}},
        "resources": {"cpus_per_trial": 1},
        "storage_path": str(tmp / "runs"),
        "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "tracking": {"metric_period": 1},  # every row to MLflow: the tests compare it with metrics.jsonl
        "retry": {"max_failures": 1},
    }
    for key, value in changes.items():
        set_path(spec, key.split("__"), value)
    return spec


def set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    """tree[parts[0]][parts[1]]... = value, creating the levels that are missing."""
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def write_spec(tmp: Path, spec: dict[str, Any], filename: str = "spec.yaml") -> Path:
    path = tmp / filename
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None):
    """`python -m orchestrator ARGS` in a subprocess (its own Ray driver), from the repo root."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([PYTHON, "-m", "orchestrator", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
