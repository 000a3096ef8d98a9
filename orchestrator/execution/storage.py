"""Shared storage: what every node of the cluster must see, and the check `run`/`resume` makes of it.

The driver and the trials share state through files: the sweep folder (trial folders with their
checkpoints, metrics.jsonl, locks, diverged.json; fork checkpoints; pretrained backbones; Tune's
experiment), the dataset root, and weights files a config names. A trial may run on any node, so
every node must see all of them at the same paths (NFS or another shared mount, or the same files
at the same path on every node). Before any trial starts, the driver writes a fresh token file into
the sweep folder and asks each alive node (one Ray task pinned to it, `ray_backend.check_nodes`)
to read it back and to find the dataset root and the weights; a node that cannot is named in a
one-line `StorageError` (exit 2). Pure file work here: no Ray.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from trainer.atomic import write_atomic

TOKEN_FILE = ".storage-check"


class StorageError(OrchestratorError):
    """A node of the cluster does not see the sweep's shared files."""


def write_token(sweep_dir: Path) -> tuple[Path, str]:
    """A fresh token in the sweep folder (a node that reads it back sees this very folder)."""
    token = secrets.token_hex(16)
    path = Path(sweep_dir) / TOKEN_FILE
    write_atomic(path, token)
    return path, token


def shared_paths(dataset_root: Path, configs: list[Any]) -> list[tuple[str, str]]:
    """(what, absolute path) that every node must find: the dataset root and the weights files configs name."""
    from orchestrator.sweep.expand import _PLACEHOLDER_INIT

    needed = [("dataset root", str(Path(dataset_root).resolve()))]
    for cfg in configs:
        init = str(cfg.model.init)
        if init.startswith("checkpoint:") and not init.startswith(_PLACEHOLDER_INIT):
            needed.append(("weights", str(Path(init.removeprefix("checkpoint:")).resolve())))
        if cfg.model.imagenet_weights is not None:
            needed.append(("weights", str(Path(cfg.model.imagenet_weights).resolve())))
    return sorted(set(needed), key=needed.index)


def check_here(token_path: str, token: str, paths: list[tuple[str, str]]) -> list[str]:
    """Run on a node: what it cannot see (empty when it sees everything)."""
    missing = []
    try:
        if Path(token_path).read_text() != token:
            missing.append(f"the sweep folder {Path(token_path).parent} (another folder at that path)")
    except OSError:
        missing.append(f"the sweep folder {Path(token_path).parent}")
    missing += [f"the {what} {path}" for what, path in paths if not os.path.exists(path)]
    return missing


def refusal(failures: dict[str, tuple[str, list[str]]]) -> StorageError:
    """One line naming the first node that cannot see the shared files (and how many others)."""
    node, (host, missing) = next(iter(failures.items()))
    more = f" (and {len(failures) - 1} more node(s))" if len(failures) > 1 else ""
    return StorageError(f"node {node[:12]} ({host}) does not see {', '.join(missing)}{more}; every node must see "
                        "the sweep folder, dataset and weights at the same paths (shared storage, see README)")
