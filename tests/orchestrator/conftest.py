"""Shared fixtures: tiny specs on tmp paths, a tiny synthetic dataset, a real local Ray cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(log_path: Path, head: str | None = None, num_cpus: float = 2, num_gpus: float = 0,
               timeout: float = 300, tries: int = 3) -> tuple[subprocess.Popen, str]:
    """`ray start [--head | --address HEAD] --block` on 127.0.0.1, in its own session; (process, head address).

    RAY_AUTH_MODE must be set already (`auth_disabled`). Ray gives a starting node 30 s to register,
    which a loaded machine can miss: such a start is killed (its whole process group) and tried again.
    """
    for _ in range(tries):
        port = _free_port()
        where = [f"--address={head}"] if head else ["--head", f"--port={port}", "--include-dashboard=false"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AIR_NEW_OUTPUT": "0"}
        env.pop("RAY_ADDRESS", None)
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            # A free agent port each: the default (52365) would clash between nodes on one host.
            proc = subprocess.Popen([str(Path(PYTHON).parent / "ray"), "start", *where, "--block",
                                     f"--num-cpus={num_cpus:g}", f"--num-gpus={num_gpus:g}",
                                     f"--dashboard-agent-listen-port={_free_port()}", "--node-ip-address=127.0.0.1",
                                     "--disable-usage-stats"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and "Ray runtime started" not in log_path.read_text():
            time.sleep(1)
        if proc.poll() is None and "Ray runtime started" in log_path.read_text():
            return proc, head or f"127.0.0.1:{port}"
        kill_node(proc)
    raise RuntimeError(f"ray node did not start in {tries} tries: {log_path.read_text()[-2000:]}")


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL every process of a node from `start_node` (its process group): a node lost at once."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stop_node(proc: subprocess.Popen) -> None:
    """Stop a node from `start_node` (never `ray stop`, which would hit other clusters on this host)."""
    proc.terminate()  # `ray start --block` stops the processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_node(proc)


@contextmanager
def auth_disabled() -> Iterator[None]:
    """Ray >= 2.59 turns token auth on for local clusters; a test head and its drivers on one host do
    without (drivers and `ray start` inherit os.environ)."""
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield
    finally:
        if saved_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_mode


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real Ray head (`ray start --head --block`) on 127.0.0.1 with 2 CPUs; yields its address."""
    with auth_disabled():
        proc, address = start_node(tmp_path_factory.mktemp("ray") / "head.log")
        try:
            yield address
        finally:
            stop_node(proc)
