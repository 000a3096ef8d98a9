"""Schedule forking: the trunk each grid cell's schedules share, and the order the driver releases tasks in.

Under the paper's rule every schedule runs at the base LR until its first drop (total - 60k), so a 2x
run is a prefix of the 6x run up to 120k. With `fork_schedules`, the trials of one cell (configs that
differ only in schedule length/iters/drops, same pretrain jobs) share a **trunk**: the cell's config
with a drop-free schedule (same warmup, same eval period), checkpointed at every fork point and
stopped at the last one. Each schedule's **branch** is the trial itself, started from the trunk's
checkpoint at its own first drop; the trainer restores the full state (data position, RNG, metric
window) and recomputes the LR from the branch's schedule, so the branch equals an unforked run.

Not forked: a cell with a single schedule, and a schedule without LR drops (its "fork point" would be
its end, where an unforked run evaluates and logs in ways a mid-schedule trunk checkpoint does not).

Which task starts next (a branch once its trunk's checkpoint at its fork point is on disk) is the
release order's (`orchestrator.execution.release`). Driver side; pure: no Ray, MLflow, torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from orchestrator.sweep.spec import task_name
from trainer.config import TrainConfig, build_config, config_identity, config_to_dict
from trainer.config import digest as _digest
from trainer.engine.schedule import resolve_schedule

TRUNK_LABEL = "trunk"  # stands for the schedule in a trunk's name: random-all-trunk-R50
_SCHEDULE_KEYS = ("length", "iters", "drops")  # what may differ between the schedules of one cell


@dataclass(frozen=True)
class Trunk:
    index: int
    trunk_id: str
    name: str
    axes: dict[str, Any]  # the cell's axis values (no schedule)
    labels: dict[str, str]
    config: TrainConfig  # validated; placeholders for machine paths, like a Trial's
    stop: int  # the last fork point: the trunk trains iterations 0..stop
    forks: dict[str, int]  # branch trial_id -> its fork point (its first LR drop)
    init: str = "random"
    needs: tuple[str, ...] = ()

    @property
    def trial_id(self) -> str:  # a trunk runs as a task like any trial, keyed by its id
        return self.trunk_id


@dataclass(frozen=True)
class ForkPlan:
    trunks: tuple[Trunk, ...] = ()
    branches: dict[str, tuple[str, int]] = field(default_factory=dict)  # trial_id -> (trunk_id, fork point)

    def trunk(self, trunk_id: str) -> Trunk:
        return next(t for t in self.trunks if t.trunk_id == trunk_id)


def fork_point(cfg: TrainConfig) -> int | None:
    """Where this schedule leaves the base LR, if forking it from a trunk is exact."""
    sched = resolve_schedule(cfg.schedule)
    if not sched.drops or sched.first_drop >= sched.total_iters:
        return None
    return sched.first_drop


def plan_forks(trials: Sequence[Any], identities: dict[str, dict[str, Any]],
               job_ids: dict[str, str], taken: set[str]) -> ForkPlan:
    """Group the trials into cells and make one trunk per cell with two or more forkable schedules.

    identities: trial_id -> identity (config without defaults/paths); taken: names already in use.
    """
    cells: dict[str, list[tuple[Any, int]]] = {}
    for t in trials:
        at = fork_point(t.config)
        if at is not None:
            cells.setdefault(_cell_key(identities[t.trial_id], t.needs, job_ids), []).append((t, at))
    trunks, branches = [], {}
    names = set(taken)
    for members in cells.values():
        if len(members) < 2:
            continue
        trunk = _make_trunk(members, len(trunks), job_ids, names)
        names.add(trunk.name)
        trunks.append(trunk)
        branches.update({tid: (trunk.trunk_id, at) for tid, at in trunk.forks.items()})
    return ForkPlan(tuple(trunks), branches)


def _cell_key(identity: dict[str, Any], needs: Sequence[str], job_ids: dict[str, str]) -> str:
    ident = json.loads(json.dumps(identity))
    # Without defaults: a 1x cell may have no schedule section at all where a 2x one has {length: 2x}.
    sched = {k: v for k, v in (ident.pop("schedule", None) or {}).items() if k not in _SCHEDULE_KEYS}
    if sched:
        ident["schedule"] = sched
    return _digest({"cell": ident, "pretrain": {n: job_ids[n] for n in needs}})


def _make_trunk(members: list[tuple[Any, int]], index: int, job_ids: dict[str, str], taken: set[str]) -> Trunk:
    first = members[0][0]
    forks = {t.trial_id: at for t, at in members}
    stop = max(forks.values())
    longest = max(resolve_schedule(t.config.schedule).total_iters for t, _ in members)
    labels = {**first.labels, "schedule": TRUNK_LABEL}
    name = task_name(labels, first.axes)
    tree = config_to_dict(first.config)
    sched = {k: v for k, v in tree["schedule"].items() if k not in _SCHEDULE_KEYS}
    # The base LR throughout; the total only has to lie past the last fork (the trunk stops there, so
    # it never runs the end-of-schedule logging and evaluation an unforked run does at its total) and
    # hold the warmup, which the longest member's total does.
    tree["schedule"] = {**sched, "iters": longest, "drops": []}
    tree["checkpoint"]["at"] = sorted(set(tree["checkpoint"].get("at") or []) | set(forks.values()))
    tree["runtime"]["output_dir"] = f"trials/{name}"  # not part of its identity (`config_identity`)
    cfg = build_config(tree, source=f"trunk {name}")  # the trunk's one validation in `expand`
    identity = config_identity(cfg)
    trunk_id = _digest({"trunk": identity, "pretrain": {n: job_ids[n] for n in first.needs}})[:10]
    if name in taken:
        name = f"{name}-{trunk_id[:6]}"
        cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"output_dir": Path(f"trials/{name}")})})
    axes = {a: v for a, v in first.axes.items() if a != "schedule"}
    return Trunk(index, trunk_id, name, axes, labels, cfg, stop, forks, first.init, tuple(first.needs))


def trunk_identity(trunk: Trunk) -> dict[str, Any]:
    return config_identity(trunk.config)


def trained_iters(total: int, fork: int | None) -> int:
    """Iterations a trial trains itself: all of them, or those after its fork point."""
    return total - (fork or 0)
