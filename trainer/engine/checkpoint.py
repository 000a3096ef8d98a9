"""Checkpoint files: atomic writes, retention, and finding the newest one that actually loads.

A checkpoint is one `torch.save`d dict of plain types and tensors (so it loads with
`weights_only=True`): model, optimizer, scheduler, grad scaler, RNG states, iteration, data
position, metric window, counters, the resolved config and an opaque `tracking` dict. Files are
named `ckpt_{iteration:07d}.pt`; a write goes to a temporary file in the same folder, is fsynced,
then renamed, so a crash never leaves a half-written file under the final name.

torch is imported where a checkpoint is written or read, not here: the names (`checkpoint_path`,
`list_checkpoints`) serve `trainer.trial_dir`, which the driver and the dashboards use without torch.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Iterable

from trainer.atomic import write_atomic
from trainer.errors import CheckpointError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt_(\d{7,})\.pt$")


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"ckpt_{iteration:07d}.pt"


def iteration_of(name: str) -> int | None:
    """The iteration in a checkpoint file's name, or None for another name."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every checkpoint file in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    import torch

    return write_atomic(path, lambda fh: torch.save(state, fh))


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`); any damage becomes a CheckpointError."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, ...: all mean "not usable"
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise CheckpointError(f"{path} is not a trainer checkpoint (no model/iteration)")
    return state


def load_latest(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `folder` that loads; damaged newer ones are skipped with a warning."""
    for iteration, path in reversed(list_checkpoints(folder)):
        try:
            return path, load(path)
        except CheckpointError as exc:
            logger.warning("skipping damaged checkpoint %s (%s); falling back to an older one", path, exc)
    return None


def prune(folder: Path, keep_last: int, protect: Iterable[int] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never touching `protect` iterations."""
    protected = set(protect)
    ckpts = list_checkpoints(folder)
    removable = [(i, p) for i, p in ckpts[:-keep_last] if i not in protected] if keep_last > 0 else []
    for _, p in removable:
        p.unlink(missing_ok=True)
    return [p for _, p in removable]


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(_py_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state() -> tuple:
    version, internal, gauss = random.getstate()
    return version, list(internal), gauss


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
