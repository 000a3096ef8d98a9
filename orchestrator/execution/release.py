"""The release order (driver side): which task Tune starts next on the resources free now.

`ReleaseQueue` decides: trunks and plain trials are ready at once (on a pretrained init: once their
pretrain job's backbone is on disk, `needs`), a branch once its fork checkpoint is on disk (or its
trunk ended without it: the branch then fails saying so); ready tasks go longest critical path first,
and only while fewer trials than the cluster holds now (`limit`) are running or waiting, so a freed
gang goes to the queue's choice at that moment. Unforked tasks go through the queue too (ready at
once): the limit follows nodes that join or leave. It keeps no state of its own that a restart could
lose: what Tune already holds comes from Tune's trial list on every step (`sync`). Pure: no Ray,
MLflow, torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

from orchestrator.worker.task import Task, TaskPlan
from trainer.trial_dir import checkpoint_exists

FINISHED = "FINISHED"
logger = logging.getLogger(__name__)


def priorities(tasks: Sequence[TaskPlan]) -> dict[str, int]:
    """Critical path of each task in iterations: a trunk's own plus its longest branch's."""
    own = {t.trial_id: t.trained for t in tasks}
    tail: dict[str, int] = {}
    for t in tasks:
        if t.fork:
            tail[t.fork.trunk_id] = max(tail.get(t.fork.trunk_id, 0), own[t.trial_id])
    return {tid: n + tail.get(tid, 0) for tid, n in own.items()}


class ReleaseQueue:
    """The driver's answer to "which task next?" (Tune asks through a searcher in `ray_backend`).

    `job_done(job)`: whether a pretrain job's backbone is on disk; `exists(path)`: whether a checkpoint
    is (on disk, or committed in an object store: its manifest in the driver's mirror).
    """

    TERMINAL = ("TERMINATED", "ERROR")  # Tune trial states after which a trial no longer runs

    def __init__(self, tasks: Sequence[Task], job_done: Callable[[str], bool] = lambda job: True,
                 exists: Callable[[Path], bool] = checkpoint_exists):
        self.prio = priorities(tasks)
        self.order = sorted(tasks, key=lambda t: (-self.prio[t.trial_id], t.name))
        self.job_done, self.exists = job_done, exists
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
        return sum(1 for t in self.order if t.trial_id not in self.known and self.ready(t))

    def next(self) -> Task | str | None:
        """The ready task to start next, FINISHED when every task is with Tune, or None for "not yet"."""
        waiting = [t for t in self.order if t.trial_id not in self.known]
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
        self.known.add(task.trial_id)
        self.active += 1
        if task.fork:
            logger.info("branch %s released: trunk %s is past iteration %d", task.name, task.fork.trunk, task.fork.at)
        logger.info("queue: %s starts (critical path %d); ready behind it: %s", task.name, self.prio[task.trial_id],
                    ", ".join(f"{t.name} ({self.prio[t.trial_id]})" for t in ready[1:]) or "none")
        return task

    def ready(self, task: Task) -> bool:
        # A pretrain job's backbone first; a failed job's trials are released to fail on the missing
        # file (saying which) rather than hold the sweep open.
        if not all(self.job_done(job) or job in self.failed_jobs for job in task.needs):
            return False
        if not task.fork:
            return True
        # A trunk that ended without this checkpoint never will write it: release the branch, which
        # then fails with that cause instead of the sweep waiting forever.
        return self.exists(task.fork_checkpoint()) or task.fork.trunk_id in self.ended
