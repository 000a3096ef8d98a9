"""`Task`s for the tests that drive the queue, the worker's helpers and the reporter without a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.worker.task import Task
from trainer.config import build_config


def make_task(trial_id: str, total: int = 10, *, folder: Path | str | None = None, fork: tuple | None = None,
              config: dict[str, Any] | None = None, **fields: Any) -> Task:
    """A task named `trial_id` in `folder` (default: SWEEP/trials/ID under /nonexistent); `fork`:
    (trunk name, at) — the trunk's id is its name here."""
    tree = {**(config or {}), "runtime": {"output_dir": str(folder or Path("/nonexistent/trials") / trial_id)}}
    extra: dict[str, Any] = {"name": trial_id}
    if fork:
        extra.update(role="branch", fork={"trunk_id": fork[0], "trunk": fork[0], "at": fork[1]})
    return Task(trial_id=trial_id, total=total, config=build_config(tree), **{**extra, **fields})
