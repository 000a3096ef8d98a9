"""What a finished trial keeps on disk: the sweep's `keep_checkpoints` policy.

A trial's checkpoints exist to resume it. Once it has finished (its `final_metrics.json` is written,
so neither a retry nor a resumed sweep will train it again: `run_trial` skips it), they only cost
disk: at R50 size a full checkpoint is ~0.5 GB, and a paper grid has ~100 trials. The policy:

  all       keep what the trainer left (its `checkpoint.keep_last` newest, plus `checkpoint.at`)
  final     keep only the newest, full-state checkpoint (the default: detectron2's model_final)
  weights   replace them by `model_final.pt`: the model weights, iteration and config only
  none      remove them; the results live in metrics.jsonl, final_metrics.json and MLflow

Only a trial's own folder is touched: a trunk's checkpoints are the fork points its branches start
from, so trunks keep theirs. Applying a policy twice changes nothing, so a trial that was killed
while pruning is pruned again when the resumed sweep skips it. Pure file work: no Ray, no MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

KeepCheckpoints = Literal["all", "final", "weights", "none"]
WEIGHTS_FILE = "model_final.pt"


def apply_retention(out: Path, policy: KeepCheckpoints) -> int:
    """Apply `policy` to the finished trial in `out`; returns the bytes freed."""
    from trainer.checkpoint import list_checkpoints

    out = Path(out)
    if policy == "all" or not (out / "final_metrics.json").exists():
        return 0  # not finished: every checkpoint may still be needed to resume
    ckpts = [p for _, p in list_checkpoints(out / "checkpoints")]
    if not ckpts:
        return 0
    if policy == "weights" and not (out / WEIGHTS_FILE).exists():
        _write_weights(ckpts[-1], out / WEIGHTS_FILE)
    doomed = ckpts[:-1] if policy == "final" else ckpts
    freed = 0
    for path in doomed:
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        freed += size
    if doomed:
        kept = ckpts[-1].name if policy == "final" else (WEIGHTS_FILE if policy == "weights" else "nothing")
        logger.info("finished: removed %d checkpoint(s), %.1f MB (keep_checkpoints=%s; kept %s)",
                    len(doomed), freed / 1e6, policy, kept)
    return freed


def _write_weights(source: Path, dest: Path) -> None:
    """The final checkpoint's model weights with its iteration and config, written atomically."""
    from trainer.checkpoint import load, save_atomic

    state = load(source)
    slim = {"model": state["model"], "iteration": state["iteration"]}
    if "config" in state:
        slim["config"] = state["config"]
    save_atomic(slim, dest)
