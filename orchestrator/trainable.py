"""What runs inside a Ray Tune trial, and inside a pretrain task (a Ray adapter module).

A trial always calls `trainer.engine.train(cfg, resume=True)` on its own output folder on the
sweep's storage path, so a retried or restored trial continues from its newest checkpoint there
(nothing is shipped through Ray checkpoints). Each evaluation is reported to Tune together with a
small Tune checkpoint that points at the trainer's checkpoint of that step and carries the
`tracking` dict (the MLflow child run id) persisted in it.

With one worker the trainer runs in the trial's own process; with several (DDP over a trial's GPUs)
the trial is the driver of a Ray Train `TorchTrainer`, whose rank-0 worker sends its reports back
through a Ray queue (Ray Train's own `report` is a barrier over all ranks, and only rank 0 reports).

Schedule forking (task role): a trunk trains its cell's base-LR schedule up to its last fork point
(`stop_after`) and counts as done once that checkpoint exists. A branch with no checkpoint of its own
starts from its trunk's checkpoint at its fork point (`start_from`, recorded in fork.json and in that
attempt's attempts.jsonl row); once it has checkpoints of its own it resumes from those, so a
retried or resumed branch never forks twice. Each attempt appends (start, end) to segments.jsonl:
the iterations it actually trained.

Test hooks: ORCHESTRATOR_FAIL_ONCE="TRIAL_NAME@ITER[,...]" makes that trial raise once, at its first
report at or after ITER (a marker file in its folder keeps it to once); ORCHESTRATOR_DELAY=
"TRIAL_NAME@SECONDS[,...]" makes it sleep that long at every report (to hold a kill window open).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from orchestrator.errors import ForkError
from orchestrator.monitor import K_ATTEMPT, K_EVENT, K_ITER, K_RUN, K_TOTAL
from trainer.report import Reporter, RunInfo

logger = logging.getLogger(__name__)

FAIL_ENV = "ORCHESTRATOR_FAIL_ONCE"
DELAY_ENV = "ORCHESTRATOR_DELAY"
Emit = Callable[[dict[str, Any], "dict[str, Any] | None"], None]


class TuneReporter(Reporter):
    """Trainer reporter that emits Tune results; an evaluation goes out with its step's checkpoint."""

    def __init__(self, emit: Emit, task: dict[str, Any], attempt: int, forked_from: Path | None = None):
        self.emit, self.task, self.attempt, self.forked_from = emit, task, attempt, forked_from
        self.start_iter = self.last_step = 0
        self.out: Path | None = None  # set by start(): no segment for an attempt that never started
        self.pending: dict[str, float] = {}
        self.pending_step = -1
        self.pending_event = "train"
        self.run_id = task.get("run_id", "")
        self.total = 0
        ck = task["config"]["checkpoint"]
        self._period, self._at = int(ck["period"]), set(ck["at"])

    def _is_ckpt_step(self, step: int) -> bool:
        return step == self.total or (self._period > 0 and step % self._period == 0) or step in self._at

    def start(self, info: RunInfo) -> None:
        # A trunk stops at its last fork point: that is its total as far as anyone watching goes.
        self.total = int(self.task.get("stop_after") or info.total_iters)
        self.start_iter = self.last_step = info.start_iter
        if info.tracking.get("trial_id") not in (None, self.task["trial_id"]):
            info.tracking.clear()  # restored from the trunk's checkpoint: its tracking dict is the trunk's
        # The first attempt stores the run id; later attempts read it back from the checkpoint.
        self.run_id = info.tracking.setdefault("mlflow_run_id", self.run_id)
        info.tracking.setdefault("trial_id", self.task["trial_id"])
        row = {"attempt": self.attempt, "start_iter": info.start_iter, "time": time.time(),
               "host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id}
        if self.forked_from is not None:
            row["forked_from"] = str(self.forked_from)
        _append(Path(info.output_dir) / "attempts.jsonl", row)
        self.out = Path(info.output_dir)
        self.emit(self._meta(info.start_iter, "start"), None)

    def _meta(self, step: int, event: str) -> dict[str, Any]:
        return {K_ITER: step, K_TOTAL: self.total, K_ATTEMPT: self.attempt, K_EVENT: event, K_RUN: self.run_id}

    def log(self, step: int, metrics) -> None:
        self.last_step = max(self.last_step, step)
        event = "eval" if any(k.startswith(("bbox/", "segm/")) for k in metrics) else "train"
        if self._is_ckpt_step(step):  # hold it: the checkpoint of this step follows (hooks' order)
            if self.pending_step not in (-1, step):
                self._flush()
            self.pending.update(metrics)
            self.pending_step = step
            if event == "eval":
                self.pending_event = "eval"
            return
        self.emit({**metrics, **self._meta(step, event)}, None)

    def checkpoint(self, step: int, path: Path) -> None:
        self.last_step = max(self.last_step, step)
        pointer = {"trainer_checkpoint": str(path), "iteration": step, "run_id": self.run_id,
                   "trial_id": self.task["trial_id"]}
        metrics = self.pending if self.pending_step == step else {}
        event = self.pending_event if metrics else "checkpoint"
        self.emit({**metrics, **self._meta(step, event)}, pointer)
        self.pending, self.pending_step, self.pending_event = {}, -1, "train"

    def _flush(self) -> None:
        if self.pending:
            self.emit({**self.pending, **self._meta(self.pending_step, self.pending_event)}, None)
        self.pending, self.pending_step, self.pending_event = {}, -1, "train"

    def finish(self, status: str, error: BaseException | None = None) -> None:
        self._flush()
        if self.out is not None:  # the iterations this attempt trained (its last one is always reported)
            _append(self.out / "segments.jsonl", {"attempt": self.attempt, "start": self.start_iter,
                                                  "end": self.last_step, "status": status})


class Delay(Reporter):
    """Test hook: sleep at every report, so a test can kill the driver while this trial runs."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def log(self, step: int, metrics) -> None:
        if "train/loss" in metrics:
            time.sleep(self.seconds)


class FailOnce(Reporter):
    """Test hook: raise at the first report at or after `at`, once per trial folder."""

    def __init__(self, at: int, folder: Path):
        self.at, self.marker = at, Path(folder) / "injected_failure"

    def log(self, step: int, metrics) -> None:
        if step >= self.at and not self.marker.exists():
            self.marker.write_text(f"{step}\n")
            raise RuntimeError(f"injected failure at iteration {step} ({FAIL_ENV})")


class MlflowReporter(Reporter):
    """Direct logging from the trial, only with a tracking server (several writers are fine there)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.logger = None

    def start(self, info: RunInfo) -> None:
        from orchestrator.tracking import MetricLogger

        self.logger = MetricLogger.for_uri(self.uri, info.tracking["mlflow_run_id"])

    def log(self, step: int, metrics) -> None:
        if self.logger is not None:
            try:
                self.logger.log(step, metrics)
            except Exception as exc:  # an outage of the server must not kill training
                logger.warning("MLflow logging failed at step %d: %s", step, exc)


def reporters_for(task: dict[str, Any], emit: Emit, attempt: int, forked_from: Path | None = None) -> list[Reporter]:
    from trainer.report import ConsoleReporter, JsonlReporter

    out = Path(task["config"]["runtime"]["output_dir"])
    found: list[Reporter] = [TuneReporter(emit, task, attempt, forked_from), JsonlReporter(), ConsoleReporter()]
    if task.get("direct_uri") and task.get("run_id"):  # a trunk has no run: the driver logs its results
        found.append(MlflowReporter(task["direct_uri"]))
    at = _test_hook(FAIL_ENV, task["name"])
    if at is not None:
        found.append(FailOnce(int(at), out))
    delay = _test_hook(DELAY_ENV, task["name"])
    if delay is not None:
        found.append(Delay(float(delay)))
    return found


def _test_hook(env: str, name: str) -> str | None:
    for item in filter(None, os.environ.get(env, "").split(",")):
        trial, _, value = item.rpartition("@")
        if trial == name:
            return value
    return None


# ----------------------------------------------------------------------------------------------
# The Tune function


def run_trial(config: dict[str, Any]) -> None:
    """Tune trainable: one trial (config["trial"] is the task dict built by the driver)."""
    task = config["trial"]
    out = Path(task["config"]["runtime"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    log_handler = _file_log(out / "train.log")
    try:
        with trial_lock(out):
            attempt = _count_lines(out / "attempts.jsonl") + 1
            if _done(task, out):
                _append(out / "attempts.jsonl", {"attempt": attempt, "skipped": "finished", "time": time.time()})
                return
            start_from = fork_source(task, out)
            if int(task["workers"]) > 1:
                _run_ddp(task, attempt, start_from)
            else:
                _run_local(task, attempt, start_from)
    finally:
        logging.getLogger().removeHandler(log_handler)
        log_handler.close()


def _done(task: dict[str, Any], out: Path) -> bool:
    if task.get("role") == "trunk":
        from orchestrator.fork import checkpoint_file

        return checkpoint_file(out, int(task["stop_after"])).exists()
    return (out / "final_metrics.json").exists()


def fork_source(task: dict[str, Any], out: Path) -> Path | None:
    """The trunk checkpoint a branch starts from, or None: not a branch, or it has checkpoints of its own."""
    fork = task.get("fork")
    if not fork:
        return None
    from trainer.checkpoint import list_checkpoints

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
    from trainer.engine import train

    cfg = build_config(task["config"], source=f"trial {task['name']}")
    train(cfg, reporters=reporters_for(task, _tune_report, attempt, start_from), **_train_args(task, start_from))


def _tune_report(metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
    from ray import tune

    if pointer is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="trial-ckpt-") as tmp:
        Path(tmp, "pointer.json").write_text(json.dumps(pointer))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _run_ddp(task: dict[str, Any], attempt: int, start_from: Path | None) -> None:
    """The trial drives a TorchTrainer over its workers; rank 0's reports come back via a queue."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    per_worker = {"CPU": float(task["cpus_per_worker"])}
    if task["gpus_per_worker"]:
        per_worker["GPU"] = float(task["gpus_per_worker"])
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"task": task, "attempt": attempt, "queue": queue,
                           "start_from": str(start_from) if start_from else None},
        scaling_config=ScalingConfig(num_workers=int(task["workers"]), use_gpu=bool(task["gpus_per_worker"]),
                                     resources_per_worker=per_worker),
        # Tune owns retries (from the trainer's own checkpoints); a fresh Train run per attempt.
        run_config=RunConfig(name=f"{task['name']}-attempt{attempt}", storage_path=task["train_storage"],
                             failure_config=FailureConfig(max_failures=0)),
    )
    box: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the trial's thread below
            box["error"] = exc

    thread = threading.Thread(target=fit, name="torch-trainer", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            metrics, pointer = queue.get(timeout=1.0)
        except Empty:
            continue
        _tune_report(metrics, pointer)
    if "error" in box:
        raise box["error"]


def _ddp_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from trainer.config import build_config
    from trainer.engine import train

    task, queue = loop_config["task"], loop_config["queue"]
    # Decided once by the trial process, so every rank starts from the same state.
    start_from = Path(loop_config["start_from"]) if loop_config.get("start_from") else None
    cfg = build_config(task["config"], source=f"trial {task['name']}")
    rank = ray.train.get_context().get_world_rank()
    if rank != 0:
        train(cfg, **_train_args(task, start_from))
        return
    handler = _file_log(Path(cfg.runtime.output_dir) / "train.log")
    try:
        train(cfg, reporters=reporters_for(task, lambda m, p: queue.put((m, p)), loop_config["attempt"], start_from),
              **_train_args(task, start_from))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------------------------
# Pretrain jobs


def run_pretrain_job(cfg: dict[str, Any]) -> str:
    """Ray task: one pretrain job, resumable, done once (done.json marks it); returns the backbone path."""
    from trainer.config import PretrainConfig
    from trainer.pretrain import pretrain

    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    done = out / "done.json"
    handler = _file_log(out / "pretrain.log")
    try:
        with trial_lock(out):
            if done.exists():
                return json.loads(done.read_text())["backbone"]
            path = pretrain(PretrainConfig.model_validate(cfg), resume=True)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps({"backbone": str(path), "time": time.time()}))
            tmp.replace(done)
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


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0
