"""`--set` on `plan`, `run` and `resume`: dotted overrides of a sweep spec from the command line.

The trainer's syntax (`--set optim.base_lr=0.01`, the value read as YAML), and detectron2's pairs
(`--set optim.base_lr 0.01`). A key is either
  - a spec field (its first part is a top-level spec key: `resources.gpus_per_trial=1`,
    `name=demo-lr01`, `base.optim.base_lr=0.01`, `grid.optim.base_lr=[0.01,0.02]`: a grid axis is one
    key, dots and all), set in the spec's data before validation; or
  - a trainer key (`optim.base_lr=0.01`): set in every trial, after the grid and the spec's own
    `overrides` (it becomes the last override, matching every trial). A key a grid axis sets is
    refused: that would make every trial the same (`grid.KEY=[...]` changes the axis).
Either way the result goes through the spec's models and the trial expansion, so a bad key or value is
refused as in the file. The trials' configs change as with the same edit to the YAML, and so does the
spec hash; `run` stores the sets in sweep.json and `resume` reapplies them (`orchestrator.execution.run`).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from trainer.config import apply_overrides, parse_override

from orchestrator.errors import SpecError


def pair_tokens(groups: Sequence[Sequence[str]] | None) -> list[str]:
    """argparse's `--set` groups -> ['key=value', ...]; a token without '=' takes the next as its value."""
    tokens = [tok for group in groups or [] for tok in group]
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if "=" in tok:
            out.append(tok)
            i += 1
        elif i + 1 < len(tokens):
            out.append(f"{tok}={tokens[i + 1]}")
            i += 2
        else:
            raise SpecError(f"--set {tok}: no value (write --set {tok}=VALUE or --set {tok} VALUE)")
    return out


def apply_sets(data: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """The spec's data with the sets applied (a copy); raises SpecError naming the `--set` at fault."""
    from orchestrator.sweep.spec import NAMED_KEYS, AXES, SweepSpec, trainer_key_exists

    out = copy.deepcopy(data)
    for item in sets:
        try:
            path, value = parse_override(item)
        except Exception as exc:  # the trainer's ConfigError: keep the --set in the message
            raise SpecError(f"--set {item}: {exc}") from None
        key = ".".join(path)
        if path[0] == "grid" and len(path) > 1:
            out.setdefault("grid", {})
            out["grid"][".".join(path[1:])] = value
        elif path[0] in SweepSpec.model_fields:
            out = apply_overrides(out, [item])
        elif trainer_key_exists(key):
            grid = out.get("grid") or {}
            axis = next((a for a in grid if AXES.get(a, a) == key or NAMED_KEYS.get(key) == a), None)
            if axis is not None:
                raise SpecError(f"--set {key}: set by the grid axis {axis}; change the axis instead, e.g. "
                                f"--set grid.{axis}=[...]")
            out.setdefault("overrides", [])
            out["overrides"] = list(out["overrides"]) + [{"when": {}, "set": {key: value}}]
        else:
            fields = ", ".join(SweepSpec.model_fields)
            raise SpecError(f"--set {key}: neither a spec field ({fields}) nor a trainer config key "
                            "(e.g. optim.base_lr)")
    return out
