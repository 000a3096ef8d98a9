"""What a finished trial keeps on disk: the sweep's `keep_checkpoints` policy.

A trial's checkpoints exist to resume it. Once it has finished (its final metrics are written,
so neither a retry nor a resumed sweep will train it again: `run_trial` skips it), they only cost
disk: at R50 size a full checkpoint is ~0.5 GB, and a paper grid has ~100 trials. The policy:

  all       keep what the trainer left (its `checkpoint.keep_last` newest, plus `checkpoint.at`)
  final     keep only the newest, full-state checkpoint (the default: detectron2's model_final)
  weights   replace them by a weights file (`TrialDir.weights_file`): the model weights, iteration and config only
  none      remove them; the results live in metrics.jsonl, final_metrics.json and MLflow

A trunk's checkpoints are the fork points its branches start from. Under any policy but `all`, a
trunk's fork-point checkpoint goes once every branch forking there has checkpoints of its own (it
then never forks again: a retry or resume continues from its own), and its other checkpoints go once
the trunk is done (its trunk-done marker, which also marks it done when its last fork point is pruned).
Applying a policy twice changes nothing, so a trial that was killed while pruning is pruned again
when the resumed sweep skips it. Pure file work: no Ray, no MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from orchestrator.worker.task import KeepCheckpoints
from trainer.trial_dir import TRUNK_DONE, TrialDir

logger = logging.getLogger(__name__)


def apply_retention(out: TrialDir, policy: KeepCheckpoints) -> int:
    """Apply `policy` to the finished trial in `out`; returns the bytes freed."""
    if policy == "all" or not out.finished():
        return 0  # not finished: every checkpoint may still be needed to resume
    ckpts = [p for _, p in out.checkpoints()]
    if not ckpts:
        return 0
    if policy == "weights" and not out.weights_file().exists():
        _write_weights(ckpts[-1], out.weights_file())
    doomed = ckpts[:-1] if policy == "final" else ckpts
    freed = 0
    for path in doomed:
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        freed += size
    if doomed:
        kept = ckpts[-1].name if policy == "final" else (out.weights_file().name if policy == "weights" else "nothing")
        logger.info("finished: removed %d checkpoint(s), %.1f MB (keep_checkpoints=%s; kept %s)",
                    len(doomed), freed / 1e6, policy, kept)
    return freed


def _write_weights(source, dest) -> None:
    """The final checkpoint's model weights with its iteration and config, written atomically."""
    from trainer.engine.checkpoint import load, save_atomic

    state = load(source)
    save_atomic({k: state[k] for k in ("model", "iteration", "config") if k in state}, dest)


def prune_trunk(trunk: TrialDir, branches: Sequence, policy: KeepCheckpoints,
                delete: Callable[[int], int] | None = None) -> int:
    """Remove the trunk checkpoints no branch can need again; `branches`: its `orchestrator.worker.task.Branch`es.

    `trunk` and its siblings may be views of an object store (manifests for checkpoints): then `delete`
    removes iteration `it` there and returns the bytes freed (`orchestrator.worker.store_sync`)."""
    if policy == "all" or not branches:  # no branch list (a task from older code): keep everything
        return 0
    forks: dict[int, list[TrialDir]] = {}
    for b in branches:
        forks.setdefault(int(b.at), []).append(trunk.sibling(b.name))
    done = trunk.has_marker(TRUNK_DONE)
    freed, removed = 0, []
    for it in trunk.committed_checkpoints():
        needed = it in forks and not all(_started(b) for b in forks[it])
        if needed or (it not in forks and not done):
            continue
        freed += delete(it) if delete is not None else _unlink(trunk.checkpoint(it))
        removed.append(it)
    if removed:
        logger.info("trunk %s: removed checkpoint(s) at %s, %.1f MB (every branch forking there has its own)",
                    trunk.name, removed, freed / 1e6)
    return freed


def _unlink(path: Path) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    path.unlink(missing_ok=True)
    return size


def _started(branch: TrialDir) -> bool:
    """A branch that will never fork again: it has checkpoints of its own, or has finished."""
    return bool(branch.committed_checkpoints()) or branch.finished()
