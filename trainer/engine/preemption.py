"""Preemption with notice: a SIGTERM (or a notice passed on by the orchestrator) stops the run cleanly.

Spot instances, preemptible VMs, Kubernetes and SLURM all send SIGTERM some seconds before the hard
kill (`runtime.preemption_grace_s` is that grace as this run assumes it). The signal handler only
sets a flag (`request`); `PreemptionHook`, the last hook after each step, turns it into a stop at the
end of that step: every rank of a DDP run agrees on the iteration (a one-element MAX all-reduce per
step over a CPU gloo group, so a NCCL run syncs no CUDA stream for it), the full checkpoint of that
iteration is written (unless the checkpoint hook just did) and `PreemptedError` is raised. No
finished step is lost; a resumed run continues bit for bit (the loss window and every rank's RNG are
in the checkpoint).

Python runs signal handlers only in a process's main thread, so `install()` must be called there:
the CLI's main, a Ray actor's `__init__`, a Tune trainable's `setup`. The flag is per process; a
run elsewhere in the process (a Ray worker thread) reads it after each step. A process that is not
inside `armed()` (nothing here to stop) hands a SIGTERM to the handler that was there before (e.g.
Ray's, which ends the worker), so an idle process still ends on SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist

from trainer.errors import TrainerError
from trainer.engine.hooks import CheckpointHook, Hook

if TYPE_CHECKING:
    from trainer.engine.train_loop import Trainer

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # `python -m trainer` after a preemption (EX_TEMPFAIL: try again, with --resume)

_lock = threading.Lock()
_notice: dict[str, Any] = {}  # {"reason", "time"} once a stop was asked for
_state = {"armed": 0, "always": False, "previous": None, "installed": False}


class PreemptedError(TrainerError):
    """The run stopped on a preemption notice after writing the checkpoint of `iteration`."""

    def __init__(self, iteration: int, reason: str = "SIGTERM"):
        self.iteration, self.reason = int(iteration), reason
        super().__init__(f"preempted at iteration {iteration} ({reason}); its checkpoint is written: "
                         "resume continues from there")

    def __reduce__(self):  # crosses process boundaries (a Ray gang rank's error reaches its trial)
        return type(self), (self.iteration, self.reason)


def request(reason: str = "SIGTERM") -> None:
    """Ask the run in this process to stop at the end of its current step (idempotent)."""
    with _lock:
        if not _notice:
            _notice.update(reason=reason, time=time.monotonic())


def requested() -> dict[str, Any] | None:
    """The notice ({"reason", "time"}) if a stop was asked for, else None."""
    return dict(_notice) if _notice else None


def _on_sigterm(signum: int, frame: Any) -> None:
    if _state["armed"] or _state["always"]:
        request(signal.Signals(signum).name)  # only a flag: the step in flight finishes first
        return
    previous = _state["previous"]
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        raise SystemExit(128 + signum)


def install(always: bool = False) -> bool:
    """Route SIGTERM to the flag; must run in the main thread (returns False, and logs, elsewhere).

    `always`: stop-on-notice for the process's whole life (a gang worker, which exists only to train);
    otherwise only while inside `armed()`.
    """
    if threading.current_thread() is not threading.main_thread():
        logger.warning("preemption notice not installed: not in the main thread (a SIGTERM ends the process)")
        return False
    _state["always"] = _state["always"] or always
    if not _state["installed"]:
        _state["previous"] = signal.signal(signal.SIGTERM, _on_sigterm)
        _state["installed"] = True
    return True


@contextmanager
def armed() -> Iterator[None]:
    """While inside, a SIGTERM asks this process's run to stop instead of ending the process.

    Leaving the outermost one forgets the notice: the run it was for has ended (a Ray worker that
    Tune reuses for another trial must not stop that one at its first step)."""
    with _lock:
        _state["armed"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["armed"] -= 1
            if not _state["armed"] and not _state["always"]:
                _notice.clear()


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a platform that signals every process must not kill the loader's
    workers before the step in flight ends (they exit with their parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class PreemptionHook(Hook):
    """After each step: stop, with the checkpoint of this iteration, once any rank got a notice."""

    def __init__(self) -> None:
        self.group: Any = None

    def before_train(self, trainer: "Trainer") -> None:
        # A NCCL run gets a CPU side group: reading a GPU flag back every step would sync the stream.
        if trainer.world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")

    def after_step(self, trainer: "Trainer") -> None:
        notice = requested()
        stop = notice is not None
        if trainer.world > 1:
            flag = torch.tensor([int(stop)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            stop = bool(flag.item())
        it = trainer.state.iteration
        end = min(trainer.total_iters, trainer.stop_after or trainer.total_iters)
        if not stop or it >= end:
            return  # at the end anyway: finishing is the clean way out
        t0 = time.monotonic()
        if not CheckpointHook.due(trainer):  # else the checkpoint hook has just written this iteration's
            CheckpointHook().save(trainer)
        reason = notice["reason"] if notice else "a peer rank's notice"
        took = time.monotonic() - (notice["time"] if notice else t0)
        grace = trainer.cfg.runtime.preemption_grace_s
        log = logger.warning if took > grace else logger.info
        log("preempted (%s) at iteration %d: checkpoint written %.1f s after the notice (grace %.0f s)",
            reason, it, took, grace)
        raise PreemptedError(it, reason)
