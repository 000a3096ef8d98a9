"""What runs inside a Ray Tune trial, and inside a pretrain task (a Ray adapter module).

A trial always calls `trainer.engine.train_loop.train(cfg, resume=True)` on its own output folder on the
sweep's storage path, so a retried or restored trial continues from its newest checkpoint there
(nothing is shipped through Ray checkpoints). Each evaluation is reported to Tune together with a
small Tune checkpoint that points at the trainer's checkpoint of that step and carries the
`tracking` dict (the MLflow child run id) persisted in it.

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

Preemption with notice: the trial's process routes SIGTERM to `trainer.engine.preemption`'s flag (installed
by `PreemptionNotice.setup`, which Tune runs in the actor's main thread, where Python runs signal
handlers; Tune runs `run_trial` itself in another thread). A single-worker trial's trainer stops at
its step's end; a gang's trial passes the notice on to its ranks (`orchestrator.worker.gang`), each of which
also takes a SIGTERM of its own. The attempt then ends with `PreemptedError` after writing the
checkpoint of the iteration reached. A drain of the trial's node (`ray drain-node`) is the same notice
(`_drain_watch` here, `orchestrator.worker.gang` for a gang's nodes).
"""

from __future__ import annotations

import fcntl
import json
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from orchestrator.errors import ForkError
from orchestrator.state.folder import recorded_divergence
from orchestrator.worker.reporting import append_row, checkpoint_warnings, reporters_for
from trainer.atomic import write_atomic
from trainer.engine.preemption import armed

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
    """Tune trainable: one trial (config["trial"] is the task dict built by the driver)."""
    task = config["trial"]
    out = Path(task["config"]["runtime"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    log_handler = _file_log(out / "train.log")
    try:
        with trial_lock(out):
            attempt = _next_attempt(out / "attempts.jsonl")
            if _done(task, out):
                append_row(out / "attempts.jsonl", {"attempt": attempt, "skipped": "finished", "time": time.time()})
                _retain(task, out)  # again: the attempt that finished it may have died while pruning
                return
            diverged = recorded_divergence(out)
            if diverged is not None:  # deterministic: resuming would diverge at the same iteration again
                append_row(out / "attempts.jsonl", {"attempt": attempt, "skipped": "diverged", "time": time.time()})
                raise diverged
            start_from = fork_source(task, out)
            with armed():  # SIGTERM: stop at a step's end (no run in this process otherwise: it exits)
                if int(task["workers"]) > 1:
                    _run_ddp(task, attempt, start_from)
                else:
                    _run_local(task, attempt, start_from)
            _retain(task, out)
    finally:
        logging.getLogger().removeHandler(log_handler)
        log_handler.close()


run_trial.__mixins__ = (PreemptionNotice,)  # type: ignore[attr-defined]  # Tune's wrap_function reads it


def _done(task: dict[str, Any], out: Path) -> bool:
    if task.get("role") == "trunk":
        from orchestrator.sweep.fork import checkpoint_file
        from orchestrator.state.retention import TRUNK_DONE

        return (out / TRUNK_DONE).exists() or checkpoint_file(out, int(task["stop_after"])).exists()
    return (out / "final_metrics.json").exists()


def _retain(task: dict[str, Any], out: Path) -> None:
    """A finished trial's checkpoint policy; a trunk's fork points go once all their branches have started."""
    from orchestrator.state.retention import TRUNK_DONE, apply_retention, prune_trunk

    policy = task.get("keep_checkpoints", "final")
    if task.get("role") == "trunk":
        if not (out / TRUNK_DONE).exists():
            (out / TRUNK_DONE).write_text(json.dumps({"stop_after": task["stop_after"], "time": time.time()}))
        prune_trunk(out, task.get("branches", []), policy)
        return
    apply_retention(out, policy)
    if task.get("fork"):  # this branch may have been the last one its trunk's fork point waited for
        prune_trunk(Path(task["fork"]["checkpoint"]).parents[1], task["fork"].get("branches", []), policy)


def fork_source(task: dict[str, Any], out: Path) -> Path | None:
    """The trunk checkpoint a branch starts from, or None: not a branch, or it has checkpoints of its own."""
    fork = task.get("fork")
    if not fork:
        return None
    from trainer.engine.checkpoint import list_checkpoints

    if list_checkpoints(out / "checkpoints"):
        return None  # forked before: continue from its own checkpoints, never from the fork again
    source = Path(fork["checkpoint"])
    if not source.exists():
        raise ForkError(f"trunk {fork['trunk']} has no checkpoint at iteration {fork['at']} ({source}): it ended "
                        "before this schedule's fork point; see its train.log")
    record = {"trunk": fork["trunk"], "trunk_id": fork["trunk_id"], "at": fork["at"], "checkpoint": str(source),
              "time": time.time()}
    if not (out / "fork.json").exists():  # the first fork; a retry before its first checkpoint re-forks
        (out / "fork.json").write_text(json.dumps(record, indent=1))
    return source


def _train_args(task: dict[str, Any], start_from: Path | None) -> dict[str, Any]:
    """train()'s keywords: a fork starts from the trunk checkpoint, anything else resumes its own."""
    stop = task.get("stop_after")
    return {"resume": start_from is None, "start_from": start_from, "stop_after": int(stop) if stop else None}


def _run_local(task: dict[str, Any], attempt: int, start_from: Path | None) -> None:
    from trainer.config import build_config
    from trainer.engine.train_loop import train

    cfg = build_config(task["config"], source=f"trial {task['name']}")
    with checkpoint_warnings() as warnings, _drain_watch():
        reporters = reporters_for(task, _tune_report, attempt, start_from, warnings=warnings, placement=_placement())
        train(cfg, reporters=reporters, **_train_args(task, start_from))


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


def _tune_report(metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
    from ray import tune

    if pointer is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="trial-ckpt-") as tmp:
        Path(tmp, "pointer.json").write_text(json.dumps(pointer))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _run_ddp(task: dict[str, Any], attempt: int, start_from: Path | None) -> None:
    """The trial runs its gang of workers (`orchestrator.worker.gang`); rank 0's reports come back via a queue."""
    from orchestrator.worker.gang import run_gang

    loop_config = {"task": task, "attempt": attempt, "start_from": str(start_from) if start_from else None}
    run_gang(task, _ddp_worker, loop_config, _tune_report)


def _ddp_worker(loop_config: dict[str, Any], rank: int) -> None:
    """One rank, in an initialised process group: rank 0 logs and reports, the others only train."""
    from trainer.config import build_config
    from trainer.engine.train_loop import train

    task, queue = loop_config["task"], loop_config["queue"]
    # Decided once by the trial process, so every rank starts from the same state.
    start_from = Path(loop_config["start_from"]) if loop_config.get("start_from") else None
    cfg = build_config(task["config"], source=f"trial {task['name']}")
    if rank != 0:
        train(cfg, **_train_args(task, start_from))
        return
    handler = _file_log(Path(cfg.runtime.output_dir) / "train.log")
    try:
        with checkpoint_warnings() as warnings:
            reporters = reporters_for(task, lambda m, p: queue.put((m, p)), loop_config["attempt"], start_from,
                                      warnings=warnings, placement=_placement())
            train(cfg, reporters=reporters, **_train_args(task, start_from))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------------------------
# Pretrain jobs


def run_pretrain_job(cfg: dict[str, Any]) -> str:
    """Ray task: one pretrain job, resumable, done once (done.json marks it); returns the backbone path."""
    from trainer.config import PretrainConfig
    from trainer.pretrain.train import pretrain

    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    done = out / "done.json"
    handler = _file_log(out / "pretrain.log")
    try:
        with trial_lock(out):
            if done.exists():
                return json.loads(done.read_text())["backbone"]
            path = pretrain(PretrainConfig.model_validate(cfg), resume=True)
            write_atomic(done, json.dumps({"backbone": str(path), "time": time.time()}))
            return str(path)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------------------------
# Small helpers


@contextmanager
def trial_lock(folder: Path, timeout: float = 300.0) -> Iterator[None]:
    """One process per trial folder: an attempt orphaned by a killed driver must be gone first."""
    fh = open(Path(folder) / "trial.lock", "a+")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{folder} is locked by another process for {timeout:.0f}s") from None
                time.sleep(1.0)
        yield
    finally:
        fh.close()


def _file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _next_attempt(path: Path) -> int:
    """One more than the attempts recorded (a preempted attempt has two rows)."""
    from orchestrator.state.folder import attempt_rows

    return max((int(r["attempt"]) for r in attempt_rows(path) if "attempt" in r), default=0) + 1
