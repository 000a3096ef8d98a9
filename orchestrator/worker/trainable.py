"""The worker entry: what runs inside a Ray Tune trial, and inside a pretrain task (a Ray adapter module).

Worker side: it and what it imports (`orchestrator.worker.task`, `reporting`, `gang`, `retention`,
`errors`, the trainer) never load a driver module. A trial gets its `Task` as a plain dict in
Tune's config and validates it once (`Task.from_wire`, older tasks included), then always calls
`trainer.engine.train_loop.train(cfg, resume=True)` on its own folder on the sweep's storage path, so a retried
or restored trial continues from its newest checkpoint there (nothing is shipped through Ray
checkpoints; Tune gets progress only, `orchestrator.worker.reporting`).

With one worker the trainer runs in the trial's own process; with several (DDP over a trial's GPUs)
the trial starts its gang of workers in its own placement group (`orchestrator.worker.gang`), and rank 0
sends its reports back through a Ray queue.

Schedule forking (task role): a trunk trains its cell's base-LR schedule up to its last fork point
(`stop_after`) and counts as done once that checkpoint exists. A branch with no checkpoint of its own
starts from its trunk's checkpoint at its fork point (`start_from`, recorded in fork.json and in that
attempt's attempts.jsonl row); once it has checkpoints of its own it resumes from those, so a
retried or resumed branch never forks twice. Each attempt appends (start, end) to segments.jsonl:
the iterations it actually trained.

What an attempt reports (and plugin reporters) live in `orchestrator.worker.reporting` (Ray-free); this
module adds where it runs (Ray node, assigned GPU ids) to its attempts.jsonl row.

On an object store (`Task.store`) the folder is in this node's scratch (`Task.on_node`): the attempt
first pulls the store's view of it (`orchestrator.worker.store_sync.pull_trial`), pushes what it writes
from a thread while it trains (`TrialSync`), and pushes the rest when it ends, whatever ended it; a
branch fetches its fork checkpoint, a trial the backbone a pretrain job of the sweep made.

Preemption with notice: the trial's process routes SIGTERM to `trainer.engine.preemption`'s flag (installed
by `PreemptionNotice.setup`, which Tune runs in the actor's main thread, where Python runs signal
handlers; Tune runs `run_trial` itself in another thread). A single-worker trial's trainer stops at
its step's end; a gang's trial passes the notice on to its ranks (`orchestrator.worker.gang`), each of which
also takes a SIGTERM of its own. The attempt then ends with `PreemptedError` after writing the
checkpoint of the iteration reached. A drain of the trial's node (`ray drain-node`) is the same notice
(`_drain_watch` here, `orchestrator.worker.gang` for a gang's nodes).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from orchestrator.errors import ForkError
from orchestrator.worker.retention import apply_retention, prune_trunk
from orchestrator.worker.store_sync import (TrialSync, fetch_fork, fetch_init, finish_sync, open_store,
                                            prune_trunk_in_store, pull_trial)
from orchestrator.worker.task import StoreRef, Task
from orchestrator.worker.reporting import checkpoint_warnings, recorded_divergence, reporters_for
from trainer.atomic import write_atomic
from trainer.engine.preemption import armed
from trainer.trial_dir import ATTEMPTS, FORK, TRUNK_DONE, TrialDir

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The Tune function


class PreemptionNotice:
    """Tune mixin of `run_trial` (`__mixins__`): the trial's actor takes SIGTERM as a preemption notice."""

    def setup(self, config: dict[str, Any]) -> None:
        from trainer.engine.preemption import install

        install()  # Trainable.__init__ runs setup in the actor's main thread
        super().setup(config)  # type: ignore[misc]


def run_trial(config: dict[str, Any]) -> None:
    """Tune trainable: one trial (config["trial"] is the task as a plain dict, `Task.to_wire`)."""
    task = Task.from_wire(config["trial"]).on_node()
    store = open_store(task)
    if store is not None:  # node-local scratch becomes the store's view of the folder before anything reads it
        pull_trial(store, task.name, task.folder.path)
    folder = task.folder.make()
    log_handler = _file_log(folder.log_file())
    sync = None
    try:
        with folder.lock():
            attempt = next_attempt(folder)
            sync = TrialSync(store, folder, attempt).start() if store is not None else None
            if _done(task):
                folder.add_row(ATTEMPTS, {"attempt": attempt, "skipped": "finished", "time": time.time()})
                _retain(task, sync)  # again: the attempt that finished it may have died while pruning
                return
            diverged = recorded_divergence(folder)
            if diverged is not None:  # deterministic: resuming would diverge at the same iteration again
                folder.add_row(ATTEMPTS, {"attempt": attempt, "skipped": "diverged", "time": time.time()})
                raise diverged
            start_from = fork_source(task, store)
            if store is not None and start_from is None:
                fetch_init(store, task)
            with armed():  # SIGTERM: stop at a step's end (no run in this process otherwise: it exits)
                if task.workers > 1:
                    _run_ddp(task, attempt, start_from)
                else:
                    _run_local(task, attempt, start_from)
            _retain(task, sync)
    finally:
        if sync is not None:  # whatever happened, what the attempt wrote goes to the store
            finish_sync(sync, attempt)
        logging.getLogger().removeHandler(log_handler)
        log_handler.close()


run_trial.__mixins__ = (PreemptionNotice,)  # type: ignore[attr-defined]  # Tune's wrap_function reads it


def _done(task: Task) -> bool:
    if task.role == "trunk":
        return task.folder.has_marker(TRUNK_DONE) or task.folder.has_checkpoint(task.total)
    return task.folder.finished()


def _retain(task: Task, sync: Any = None) -> None:
    """A finished trial's checkpoint policy; a trunk's fork points go once all their branches have started.

    On object storage (`sync`) the folder's own policy applies here and reaches the store with the next
    push; the trunk's fork points are pruned in the store, from views of the trunk and its branches."""
    policy, folder = task.keep_checkpoints, task.folder
    if task.role == "trunk" and not folder.has_marker(TRUNK_DONE):
        folder.mark(TRUNK_DONE, {"stop_after": task.total, "time": time.time()})
    if sync is not None:
        if task.role != "trunk":
            apply_retention(folder, policy)
        sync.push()
        if task.role == "trunk" or task.fork:
            prune_trunk_in_store(sync.store, task)
        if task.fork_copy() is not None:  # this node's copy of the fork checkpoint: its own ones took over
            task.fork_copy().unlink(missing_ok=True)
        return
    if task.role == "trunk":
        prune_trunk(folder, task.branches, policy)
        return
    apply_retention(folder, policy)
    if task.fork:  # this branch may have been the last one its trunk's fork point waited for
        prune_trunk(task.trunk_folder(), task.branches, policy)


def fork_source(task: Task, store: Any = None) -> Path | None:
    """The trunk checkpoint a branch starts from, or None: not a branch, or it has checkpoints of its own.

    On object storage (`store`) it is fetched (verified) into this node's scratch first."""
    if not task.fork:
        return None
    if task.folder.checkpoints():
        return None  # forked before: continue from its own checkpoints, never from the fork again
    fork, source = task.fork, task.fork_checkpoint()
    if store is not None:
        source = fetch_fork(store, task) or source
    if not source.exists():
        raise ForkError(f"trunk {fork.trunk} has no checkpoint at iteration {fork.at} ({source}): it ended "
                        "before this schedule's fork point; see its train.log")
    if not task.folder.has_marker(FORK):  # the first fork; a retry before its first checkpoint re-forks
        task.folder.mark(FORK, {"trunk": fork.trunk, "trunk_id": fork.trunk_id, "at": fork.at,
                                "checkpoint": str(source), "time": time.time()})
    return source


def _train_args(task: Task, start_from: Path | None) -> dict[str, Any]:
    """train()'s keywords: a fork starts from the trunk checkpoint, anything else resumes its own."""
    return {"resume": start_from is None, "start_from": start_from, "stop_after": task.stop_after}


def _run_local(task: Task, attempt: int, start_from: Path | None) -> None:
    from trainer.engine.train_loop import train

    with checkpoint_warnings() as warnings, _drain_watch():
        reporters = reporters_for(task, _tune_report, attempt, start_from, warnings=warnings, placement=_placement())
        train(task.config, reporters=reporters, **_train_args(task, start_from))


@contextmanager
def _drain_watch() -> Iterator[None]:
    """While inside, a drain of this process's node asks the trainer here to stop (trainer.engine.preemption)."""
    import threading

    import ray

    from orchestrator.worker.gang import DRAIN_POLL_S, drain_notice
    from trainer.engine.preemption import request

    node, stop = ray.get_runtime_context().get_node_id(), threading.Event()

    def watch() -> None:
        while not stop.wait(DRAIN_POLL_S):
            why = drain_notice([node])
            if why:
                request(why)
                return

    thread = threading.Thread(target=watch, name="drain-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _placement() -> dict[str, Any]:
    """Where this process runs in the cluster: its Ray node and the (logical) GPU ids Ray gave it."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def _tune_report(metrics: dict[str, Any]) -> None:
    from ray import tune

    tune.report(metrics)


def _run_ddp(task: Task, attempt: int, start_from: Path | None) -> None:
    """The trial runs its gang of workers (`orchestrator.worker.gang`); rank 0's reports come back via a queue."""
    from orchestrator.worker.gang import run_gang

    loop_config = {"task": task.to_wire(), "attempt": attempt, "start_from": str(start_from) if start_from else None}
    run_gang(task, _ddp_worker, loop_config, _tune_report)


def _ddp_worker(loop_config: dict[str, Any], rank: int) -> None:
    """One rank, in an initialised process group: rank 0 logs and reports, the others only train."""
    from trainer.engine.train_loop import train

    task, queue = loop_config["task"], loop_config["queue"]  # a Task: validated once in this rank (gang.run)
    # Decided once by the trial process, so every rank starts from the same state.
    start_from = Path(loop_config["start_from"]) if loop_config.get("start_from") else None
    if rank != 0:
        train(task.config, **_train_args(task, start_from))
        return
    handler = _file_log(task.folder.log_file())
    try:
        with checkpoint_warnings() as warnings:
            reporters = reporters_for(task, queue.put, loop_config["attempt"], start_from,
                                      warnings=warnings, placement=_placement())
            train(task.config, reporters=reporters, **_train_args(task, start_from))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------------------------
# Pretrain jobs


def run_pretrain_job(cfg: dict[str, Any], store: dict[str, Any] | None = None) -> str:
    """Ray task: one pretrain job, resumable, done once (done.json marks it); returns the backbone path.

    `store`: an object-store sweep's `StoreRef` (as a dict): the job trains in this node's scratch,
    pulled from and pushed to the store as a trial's folder is (its backbone a committed object)."""
    from trainer.config import PretrainConfig
    from trainer.pretrain.train import pretrain

    ref = StoreRef.model_validate(store) if store else None
    out = ref.on_node(cfg["output_dir"]) if ref else Path(cfg["output_dir"])
    cfg = {**cfg, "output_dir": str(out)}
    obj = open_store(ref) if ref else None
    if obj is not None:
        pull_trial(obj, out.name, out, prefix=ref.key(out))
    out.mkdir(parents=True, exist_ok=True)
    done = out / "done.json"
    handler = _file_log(out / "pretrain.log")
    sync = TrialSync(obj, TrialDir(out), 1, prefix=ref.key(out)).start() if obj is not None else None
    try:
        with TrialDir(out).lock():
            if done.exists():
                return json.loads(done.read_text())["backbone"]
            path = pretrain(PretrainConfig.model_validate(cfg), resume=True)
            if sync is not None:
                sync.push(final=True)  # the backbone is committed in the store before the job says done
            write_atomic(done, json.dumps({"backbone": str(path), "time": time.time()}))
            return str(path)
    finally:
        if sync is not None:
            sync.close()
        logging.getLogger().removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------------------------
# Small helpers


def _file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def next_attempt(folder: TrialDir) -> int:
    """One more than the attempts recorded (a preempted attempt has two rows)."""
    return max((int(r["attempt"]) for r in folder.rows(ATTEMPTS) if "attempt" in r), default=0) + 1
