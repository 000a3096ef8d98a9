"""What runs inside a Ray Tune trial, and inside a pretrain task (a Ray adapter module).

A trial always calls `trainer.engine.train(cfg, resume=True)` on its own output folder on the
sweep's storage path, so a retried or restored trial continues from its newest checkpoint there
(nothing is shipped through Ray checkpoints). Each evaluation is reported to Tune together with a
small Tune checkpoint that points at the trainer's checkpoint of that step and carries the
`tracking` dict (the MLflow child run id) persisted in it.

With one worker the trainer runs in the trial's own process; with several (DDP over a trial's GPUs)
the trial is the driver of a Ray Train `TorchTrainer`, whose rank-0 worker sends its reports back
through a Ray queue (Ray Train's own `report` is a barrier over all ranks, and only rank 0 reports).

Fault injection for tests: ORCHESTRATOR_FAIL_ONCE="TRIAL_NAME@ITER[,...]" makes that trial raise
once, at its first report at or after ITER (a marker file in its folder keeps it to once).
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

from orchestrator.monitor import K_ATTEMPT, K_EVENT, K_ITER, K_RUN, K_TOTAL
from trainer.report import Reporter, RunInfo

logger = logging.getLogger(__name__)

FAIL_ENV = "ORCHESTRATOR_FAIL_ONCE"
Emit = Callable[[dict[str, Any], "dict[str, Any] | None"], None]


class TuneReporter(Reporter):
    """Trainer reporter that emits Tune results; an evaluation goes out with its step's checkpoint."""

    def __init__(self, emit: Emit, task: dict[str, Any], attempt: int):
        self.emit, self.task, self.attempt = emit, task, attempt
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
        self.total = info.total_iters
        # The first attempt stores the run id; later attempts read it back from the checkpoint.
        self.run_id = info.tracking.setdefault("mlflow_run_id", self.run_id)
        info.tracking.setdefault("trial_id", self.task["trial_id"])
        _append(Path(info.output_dir) / "attempts.jsonl", {"attempt": self.attempt, "start_iter": info.start_iter,
                                                         "time": time.time(), "host": socket.gethostname(),
                                                         "pid": os.getpid(), "run_id": self.run_id})
        self.emit(self._meta(info.start_iter, "start"), None)

    def _meta(self, step: int, event: str) -> dict[str, Any]:
        return {K_ITER: step, K_TOTAL: self.total, K_ATTEMPT: self.attempt, K_EVENT: event, K_RUN: self.run_id}

    def log(self, step: int, metrics) -> None:
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


def reporters_for(task: dict[str, Any], emit: Emit, attempt: int) -> list[Reporter]:
    from trainer.report import ConsoleReporter, JsonlReporter

    out = Path(task["config"]["runtime"]["output_dir"])
    found: list[Reporter] = [TuneReporter(emit, task, attempt), JsonlReporter(), ConsoleReporter()]
    if task.get("direct_uri"):
        found.append(MlflowReporter(task["direct_uri"]))
    at = _injected_failure(task["name"])
    if at is not None:
        found.append(FailOnce(at, out))
    return found


def _injected_failure(name: str) -> int | None:
    for item in filter(None, os.environ.get(FAIL_ENV, "").split(",")):
        trial, _, at = item.rpartition("@")
        if trial == name:
            return int(at)
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
            if (out / "final_metrics.json").exists():
                _append(out / "attempts.jsonl", {"attempt": attempt, "skipped": "finished", "time": time.time()})
                return
            if int(task["workers"]) > 1:
                _run_ddp(task, attempt)
            else:
                _run_local(task, attempt)
    finally:
        logging.getLogger().removeHandler(log_handler)
        log_handler.close()


def _run_local(task: dict[str, Any], attempt: int) -> None:
    from trainer.config import build_config
    from trainer.engine import train

    cfg = build_config(task["config"], source=f"trial {task['name']}")
    train(cfg, reporters=reporters_for(task, _tune_report, attempt), resume=True)


def _tune_report(metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
    from ray import tune

    if pointer is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="trial-ckpt-") as tmp:
        Path(tmp, "pointer.json").write_text(json.dumps(pointer))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _run_ddp(task: dict[str, Any], attempt: int) -> None:
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
        train_loop_config={"task": task, "attempt": attempt, "queue": queue},
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
    cfg = build_config(task["config"], source=f"trial {task['name']}")
    rank = ray.train.get_context().get_world_rank()
    if rank != 0:
        train(cfg, resume=True)
        return
    handler = _file_log(Path(cfg.runtime.output_dir) / "train.log")
    try:
        train(cfg, reporters=reporters_for(task, lambda m, p: queue.put((m, p)), loop_config["attempt"]), resume=True)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


# ----------------------------------------------------------------------------------------------
# Pretrain jobs


def run_pretrain_job(cfg: dict[str, Any]) -> str:
    """Ray task: one pretrain job, resumable, done once (done.json marks it); returns the backbone path."""
    from trainer.pretrain import PretrainConfig, pretrain

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
