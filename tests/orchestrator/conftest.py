"""Shared fixtures: tiny specs on tmp paths, a tiny synthetic dataset, a real local Ray cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# A Mask R-CNN small enough to run a few iterations a second on one CPU thread.
TINY_MODEL = {"backbone": "R18", "norm": "GN", "min_size": 64, "max_size": 64, "rpn_batch_size_per_image": 32,
              "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100,
              "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32, "box_detections_per_img": 10,
              "representation_size": 128, "sampling_ratio": 1, "fpn_channels": 64}


def tiny_spec(tmp: Path, name: str = "tiny", **changes: Any) -> dict[str, Any]:
    spec = {
        "name": name,
        "dataset": {"root": str(tmp / "data"), "train_split": "train", "val_split": "val",
                    "generate": {"train": 16, "val": 4, "size": 64}},
        "grid": {"init": ["random"], "data": ["all", 8], "schedule": ["1x"], "backbone": ["R18"]},
        "base": {"model": dict(TINY_MODEL), "data": {"num_workers": 0},
                 "optim": {"batch_size": 1, "grad_clip": 1.0},
                 "schedule": {"iters_per_x": 6, "warmup_iters": 1},
                 "eval": {"period": 3, "batch_size": 4}, "checkpoint": {"period": 3},
                 "runtime": {"device": "cpu", "threads": 1, "log_period": 3}},
        "resources": {"cpus_per_trial": 1},
        "storage_path": str(tmp / "runs"),
        "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "retry": {"max_failures": 1},
    }
    for key, value in changes.items():
        node = spec
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return spec


def write_spec(tmp: Path, spec: dict[str, Any], filename: str = "spec.yaml") -> Path:
    path = tmp / filename
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None):
    """`python -m orchestrator ARGS` in a subprocess (its own Ray driver), from the repo root."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([PYTHON, "-m", "orchestrator", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real Ray head (`ray start --head --block`) on 127.0.0.1 with 2 CPUs; yields its address.

    Stopped by terminating the process we started (never `ray stop`, which would hit other clusters).
    """
    port = _free_port()
    tmp = tmp_path_factory.mktemp("ray")
    # Ray >= 2.59 turns token auth on for local clusters; a test head and its drivers on one host do
    # without (drivers inherit os.environ).
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AIR_NEW_OUTPUT": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen([str(Path(PYTHON).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
                             "--num-gpus=0", "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((tmp / "head.log").read_text())
            time.sleep(1)
    time.sleep(3)  # the raylet registers a moment after the GCS port opens
    yield address
    proc.terminate()  # `ray start --block` stops the processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()
    if saved_mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved_mode
