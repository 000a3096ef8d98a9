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

`ForkQueue` decides which task Tune starts next: trunks and plain trials are ready at once (on a
pretrained init: once their pretrain job's backbone is on disk, `needs`), a branch once its fork
checkpoint is on disk (or its trunk ended without it: the branch then fails saying so); ready tasks
go longest critical path first, and only while fewer trials than the cluster holds now (`limit`) are
running or waiting, so a freed gang goes to the queue's choice at that moment. Unforked tasks go
through the queue too (ready at once): the limit follows nodes that join or leave. It keeps no state of
its own that a restart could lose: what Tune already holds comes from Tune's trial list on every
step. Pure: no Ray, MLflow, torch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from orchestrator.sweep.spec import task_name
from trainer.config import TrainConfig, build_config, config_identity, config_to_dict
from trainer.config import digest as _digest
from trainer.engine.schedule import resolve_schedule

TRUNK_LABEL = "trunk"  # stands for the schedule in a trunk's name: random-all-trunk-R50
_SCHEDULE_KEYS = ("length", "iters", "drops")  # what may differ between the schedules of one cell
FINISHED = "FINISHED"
logger = logging.getLogger(__name__)


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


def checkpoint_file(trunk_dir: Path, iteration: int) -> Path:
    """trainer.engine.checkpoint.checkpoint_path's naming (importing it would load torch in the driver)."""
    return Path(trunk_dir) / "checkpoints" / f"ckpt_{iteration:07d}.pt"


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
    identity = config_identity(build_config(tree, source=f"trunk {name}"))
    trunk_id = _digest({"trunk": identity, "pretrain": {n: job_ids[n] for n in first.needs}})[:10]
    if name in taken:
        name = f"{name}-{trunk_id[:6]}"
    tree["runtime"]["output_dir"] = f"trials/{name}"
    cfg = build_config(tree, source=f"trunk {name}")
    axes = {a: v for a, v in first.axes.items() if a != "schedule"}
    return Trunk(index, trunk_id, name, axes, labels, cfg, stop, forks, first.init, tuple(first.needs))


def trunk_identity(trunk: Trunk) -> dict[str, Any]:
    return config_identity(trunk.config)


def trained_iters(total: int, fork: int | None) -> int:
    """Iterations a trial trains itself: all of them, or those after its fork point."""
    return total - (fork or 0)


# ----------------------------------------------------------------------------------------------
# Release order


def priorities(tasks: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Critical path of each task in iterations: a trunk's own plus its longest branch's."""
    own = {t["trial_id"]: int(t["total"]) - int((t.get("fork") or {}).get("at", 0)) for t in tasks}
    tail: dict[str, int] = {}
    for t in tasks:
        if t.get("fork"):
            trunk = t["fork"]["trunk_id"]
            tail[trunk] = max(tail.get(trunk, 0), own[t["trial_id"]])
    return {tid: n + tail.get(tid, 0) for tid, n in own.items()}


class ForkQueue:
    """The driver's answer to "which task next?" (Tune asks through a searcher in `ray_backend`)."""

    TERMINAL = ("TERMINATED", "ERROR")  # Tune trial states after which a trial no longer runs

    def __init__(self, tasks: Sequence[dict[str, Any]], exists: Callable[[str], bool] = os.path.exists):
        self.prio = priorities(tasks)
        self.order = sorted(tasks, key=lambda t: (-self.prio[t["trial_id"]], t["name"]))
        self.exists = exists
        self.known: set[str] = set()  # tasks Tune holds as trials (restored or released by this driver)
        self.ended: set[str] = set()  # tasks whose Tune trial has stopped running for good
        self.active = 0  # Tune trials running or waiting (PENDING) for their resources
        self.running = 0  # of those, the RUNNING ones (their gangs are placed)
        self.limit: int | None = None  # how many trials the cluster holds at once (None: no bound)
        self.failed_jobs: set[str] = set()  # pretrain jobs that failed: their trials are released to fail

    def sync(self, trials: Iterable[tuple[str, str]]) -> None:
        """Tune's current trials as (task id, Tune status); called at the start of every Tune step."""
        ended = set()
        active = running = 0
        for task_id, status in trials:
            self.known.add(task_id)
            if status in self.TERMINAL:
                ended.add(task_id)
            else:
                active += 1
                running += status == "RUNNING"
        self.ended = ended  # an errored trunk that a resume restarts is running again
        self.active, self.running = active, running

    def waiting(self) -> int:
        """Tasks ready to start that the queue holds back (no room on the cluster yet)."""
        return sum(1 for t in self.order if t["trial_id"] not in self.known and self.ready(t))

    def next(self) -> dict[str, Any] | str | None:
        """The ready task to start next, FINISHED when every task is with Tune, or None for "not yet"."""
        waiting = [t for t in self.order if t["trial_id"] not in self.known]
        if not waiting:
            return FINISHED
        if self.limit is not None and self.active >= self.limit:
            # Every gang slot is taken: the next task is chosen when one frees, by this queue's
            # order then, not by whichever waiting trial's resources happen to be placed first.
            return None
        ready = [t for t in waiting if self.ready(t)]
        if not ready:
            return None
        task = ready[0]
        self.known.add(task["trial_id"])
        self.active += 1
        if task.get("fork"):
            logger.info("branch %s released: trunk %s is past iteration %d", task["name"],
                        task["fork"]["trunk"], task["fork"]["at"])
        logger.info("queue: %s starts (critical path %d); ready behind it: %s", task["name"],
                    self.prio[task["trial_id"]], ", ".join(f"{t['name']} ({self.prio[t['trial_id']]})"
                                                           for t in ready[1:]) or "none")
        return task

    def ready(self, task: dict[str, Any]) -> bool:
        # A pretrain job's backbone (its done.json) first; a failed job's trials are released to fail
        # on the missing file (saying which) rather than hold the sweep open.
        if not all(self.exists(done) or job in self.failed_jobs for job, done in (task.get("needs") or {}).items()):
            return False
        fork = task.get("fork")
        if not fork:
            return True
        # A trunk that ended without this checkpoint never will write it: release the branch, which
        # then fails with that cause instead of the sweep waiting forever.
        return self.exists(fork["checkpoint"]) or fork["trunk_id"] in self.ended
