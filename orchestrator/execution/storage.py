"""Shared storage: what every node of the cluster must see, and the check `run`/`resume` makes of it.

The driver and the trials share state through files: the sweep folder (trial folders with their
checkpoints, metrics.jsonl, locks, diverged.json; fork checkpoints; pretrained backbones; Tune's
experiment), the dataset root, and weights files a config names. A trial may run on any node, so
every node must see all of them at the same paths (NFS or another shared mount, or the same files
at the same path on every node). Before any trial starts, the driver writes a fresh token file into
the sweep folder and asks each alive node (one Ray task pinned to it, `ray_backend.check_nodes`)
to read it back and to find the dataset root and the weights; a node that cannot is named in a
one-line `StorageError` (exit 2). On an object store the token is an object each node reads through
the store with its own credentials, and each node must be able to write its scratch folder. No Ray here.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.worker.object_store import is_store_uri
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


def write_store_token(store: Any) -> tuple[str, str]:
    """A fresh token object in an object-store sweep's root (`ObjectStore`); (its URI, the token)."""
    token = secrets.token_hex(16)
    store.put_bytes(TOKEN_FILE, token)
    return f"{store.uri}/{TOKEN_FILE}", token


def check_here(token_path: str, token: str, paths: list[tuple[str, str]], scratch: str | None = None) -> list[str]:
    """Run on a node: what it cannot see (empty when it sees everything).

    On an object store (`token_path` is its URI) the node must read the token through the store with
    its own credentials and be able to write its scratch folder instead."""
    if is_store_uri(token_path):
        missing = _check_store(token_path, token, scratch)
    else:
        missing = []
        try:
            if Path(token_path).read_text() != token:
                missing.append(f"the sweep folder {Path(token_path).parent} (another folder at that path)")
        except OSError:
            missing.append(f"the sweep folder {Path(token_path).parent}")
    missing += [f"the {what} {path}" for what, path in paths if not os.path.exists(path)]
    return missing


def _check_store(token_uri: str, token: str, scratch: str | None) -> list[str]:
    from orchestrator.worker.object_store import ObjectStore, credentials_hint

    root, _, name = token_uri.rpartition("/")
    missing = []
    try:
        if (ObjectStore.from_uri(root).get_bytes(name) or b"").decode() != token:
            missing.append(f"the object store {root} (another sweep there, or no read access)")
    except Exception as exc:  # pyarrow raises OSError/ValueError/... per store and client version
        missing.append(f"the object store {root} ({type(exc).__name__}: {str(exc)[:120]}; credentials set: "
                       f"{credentials_hint()})")
    try:
        Path(scratch or ".").mkdir(parents=True, exist_ok=True)
        probe = Path(scratch or ".") / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        missing.append(f"a writable scratch folder {scratch} ({exc.strerror})")
    return missing


def refusal(failures: dict[str, tuple[str, list[str]]]) -> StorageError:
    """One line naming the first node that cannot see the shared files (and how many others)."""
    node, (host, missing) = next(iter(failures.items()))
    more = f" (and {len(failures) - 1} more node(s))" if len(failures) > 1 else ""
    return StorageError(f"node {node[:12]} ({host}) does not see {', '.join(missing)}{more}; every node must see "
                        "the sweep folder (or its object store), dataset and weights at the same paths (see README: "
                        "storage)")
