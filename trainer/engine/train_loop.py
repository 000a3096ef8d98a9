"""The training run: builds everything from a TrainConfig, resumes, and steps.

`train(cfg, reporters=..., resume=...)` is the one entry point (the CLI and the orchestrator call
it). The loop itself only steps — data, forward, backward, optimizer, LR — and leaves metrics,
evaluation and checkpoints to the hooks in `trainer.engine.hooks`, and a stop on a preemption notice to
`trainer.engine.preemption` (train() then raises PreemptedError after that iteration's checkpoint). A run in an initialised
torch.distributed process group trains with DDP; every rank infers on its slice of val, rank 0
scores, writes and reports. Speed
switches (autocast, TF32, channels_last, backbone compile, pinned memory) come from `trainer.engine.speed`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from trainer.engine import checkpoint as ckpt
from trainer.engine import speed
from trainer.modeling.backbone import norm_parameters
from trainer.config import TrainConfig, config_to_dict, dump_config
from trainer.data.coco import StreamBatchSampler, build_datasets, collate, resized_area, start_workers, to_device_float
from trainer.errors import CheckpointError, TrainerError
from trainer.engine.hooks import CheckpointHook, EvalHook, FinalMetricsHook, Hook, MetricsHook, first_nonfinite
from trainer.engine.preemption import PreemptedError, PreemptionHook, armed, ignore_in_worker
from trainer.engine.reporters import Reporter, RunInfo
from trainer.engine.schedule import resolve_schedule
from trainer.modeling.detectors import build_detector_datasets, image_hw, loss_names, uses_detector_data
from trainer.trial_dir import TrialDir

logger = logging.getLogger(__name__)

LOSS_NAMES = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@dataclass
class TrainResult:
    status: str
    iterations: int
    final_metrics: dict[str, float]
    output_dir: Path


@dataclass
class TrainState:
    iteration: int = 0  # finished iterations
    counters: dict[str, int] = field(default_factory=lambda: {"images": 0, "instances": 0, "pixels": 0})
    pending: list[int] = field(default_factory=lambda: [0, 0, 0])  # this rank's counts not yet reduced
    window_sums: torch.Tensor = field(default_factory=lambda: torch.zeros(len(LOSS_NAMES), dtype=torch.float64))
    window_count: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)


def _device(kind: str) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainerError("runtime.device is 'cuda' but no CUDA device is available")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def dist_backend(runtime) -> str:
    """The process-group backend for this run's devices: NCCL needs CUDA, gloo works everywhere."""
    cuda = torch.cuda.is_available() and runtime.device != "cpu"
    if runtime.dist_backend == "auto":
        return "nccl" if cuda else "gloo"
    if runtime.dist_backend == "nccl" and not cuda:
        raise TrainerError("runtime.dist_backend is 'nccl' but this process has no CUDA device "
                           f"(runtime.device {runtime.device!r}, torch.cuda.is_available() False); use gloo or auto")
    return runtime.dist_backend


def init_distributed(runtime, rank: int, world: int, master: str, timeout_s: float = 300.0) -> str:
    """Join a `world`-rank process group at tcp://`master` (host:port); returns the backend used."""
    from datetime import timedelta

    backend = dist_backend(runtime)
    os.environ["LOCAL_RANK"] = os.environ.get("LOCAL_RANK", "0")
    dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return backend


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.SGD:
    """SGD with weight decay `optim.weight_decay_norm` (0, as in the paper) on norm parameters."""
    norm_ids = norm_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in norm_ids], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) in norm_ids], "weight_decay": cfg.weight_decay_norm},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.base_lr, momentum=cfg.momentum)


def place_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, lr_factor: Callable[[int], float],
                    iteration: int) -> None:
    """Put `scheduler` and its optimizer's LRs at `iteration` of the schedule `lr_factor`, without a step.

    torch has no public way to place a scheduler: `step()` would also count a step in the state
    that checkpoints save (and warn that it ran before `optimizer.step()`). So this is the one place
    that writes its private `_last_lr`, what `get_last_lr()` and the saved scheduler state report."""
    scheduler.last_epoch = iteration
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_factor(iteration)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


class Trainer:
    """Holds a run's objects and state; `fit()` runs the loop with its hooks."""

    def __init__(self, cfg: TrainConfig, reporters: Sequence[Reporter] = (), stop_after: int | None = None,
                 datasets: tuple[Any, Any, list[int]] | None = None):
        """`datasets` (train set, val set, train ids) replaces `build_datasets(cfg.data)`: benches
        feed in-memory data through the same loop."""
        from trainer.modeling.model import build_model

        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        rt = cfg.runtime
        if rt.threads:
            torch.set_num_threads(rt.threads)
        torch.manual_seed(rt.seed)
        self.device = _device(rt.device)
        speed.apply_backend_flags(rt, self.device)
        self.output_dir = Path(rt.output_dir)
        self.ckpt_dir = TrialDir(self.output_dir).checkpoint_dir
        if datasets is None and uses_detector_data(cfg):  # box / keypoint / VOC trials (trainer.modeling.detectors)
            datasets = build_detector_datasets(cfg, stream_seed=rt.seed)
        self.train_set, self.val_set, self.train_ids = datasets or build_datasets(cfg.data, stream_seed=rt.seed)
        model, model_cfg = build_model(cfg.model, num_classes=self.train_set.num_classes + 1)
        self.cfg = cfg.model_copy(update={"model": model_cfg})
        if cfg.data.scale_jitter:
            lo, hi = cfg.data.scale_jitter
            model.transform.min_size = tuple(range(lo, hi + 1))  # torchvision draws one per batch
        self.bare_model = speed.prepare_model(model.to(self.device), rt)
        self.model = self.bare_model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.bare_model, device_ids=ids)
        self.schedule = resolve_schedule(cfg.schedule)
        self.total_iters = self.schedule.total_iters
        self.stop_after = stop_after
        self.optimizer = build_optimizer(self.bare_model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule.lr_factor)
        self.scaler = speed.make_scaler(cfg.optim.amp, self.device)
        self._non_blocking = speed.pin_memory(cfg.data, self.device)  # async copies need pinned memory
        self._groups = self.train_set.aspect_groups() if cfg.data.aspect_grouping else None
        self.state = TrainState()
        self._rank_states: list[Any] | None = None
        self.reporters = list(reporters)
        self.loss_names = loss_names(cfg.model.task)
        self.state.window_sums = torch.zeros(len(self.loss_names), dtype=torch.float64)
        self.final_metrics: dict[str, float] = {}
        # Preemption last: a stop on notice comes after this iteration's metrics, evaluation and checkpoint.
        self.hooks: list[Hook] = [MetricsHook(), EvalHook(), CheckpointHook(), FinalMetricsHook(), PreemptionHook()]
        # Device-side record of the first non-finite loss: (iteration or -1, value). Read at hooks.
        self._bad_iter = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._bad_value = torch.zeros((), dtype=torch.float32, device=self.device)
        self.state.window_sums = self.state.window_sums.to(self.device)
        self._pixel_size = (cfg.data.scale_jitter[1] if cfg.data.scale_jitter else cfg.model.min_size,
                            cfg.model.max_size)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        st = self.state
        return {
            "model": self.bare_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "ranks": self._rank_states,  # DDP: every rank's own RNG and loss window (None alone)
            "iteration": st.iteration,
            "data_position": {"seed": self.cfg.runtime.seed, "iteration": st.iteration,
                              "images_consumed": st.iteration * self.cfg.optim.batch_size},
            "counters": dict(st.counters),
            "window": {"sums": st.window_sums.cpu(), "count": st.window_count},
            "last_eval": dict(st.last_eval),
            "tracking": dict(st.tracking),
            "config": config_to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        try:
            self.bare_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {source} does not fit this model/config: {first}") from None
        mine = self._own_rank_state(state, source)
        ckpt.set_rng_state(mine["rng"])
        st = self.state
        st.iteration = int(state["iteration"])
        st.counters = {k: int(v) for k, v in state["counters"].items()}
        st.window_sums = mine["window"]["sums"].to(self.device, torch.float64)
        st.window_count = int(mine["window"]["count"])
        st.last_eval = dict(state.get("last_eval", {}))
        st.tracking = dict(state.get("tracking", {}))

    def restore(self, resume: bool, start_from: Path | None) -> None:
        found = None
        if start_from is not None:
            found = (Path(start_from), ckpt.load(Path(start_from)))
        elif resume:
            found = ckpt.load_latest(self.ckpt_dir)
        if found is None:
            return
        path, state = found
        self.load_state_dict(state, path)
        # The LR comes from this run's schedule, not the saved one: a branch forked from a trunk
        # checkpoint (same iterations so far, no drops yet) must take its own drops from here on.
        place_scheduler(self.scheduler, self.schedule.lr_factor, self.state.iteration)
        if self.state.iteration > self.total_iters:
            raise CheckpointError(f"{path} is at iteration {self.state.iteration}, past this schedule's "
                                  f"{self.total_iters} iterations")
        logger.info("resumed from %s at iteration %d", path, self.state.iteration)

    # -- distributed helpers ----------------------------------------------------------------
    def gather_rank_states(self) -> None:
        """Collective, before rank 0 writes a checkpoint: every rank's RNG and loss window.

        The ranks draw from their RNGs differently (each samples RPN/ROI proposals of its own
        images), so a DDP run resumed or forked with rank 0's state on every rank would diverge.
        """
        self._rank_states = None
        if self.world > 1:
            own = {"rng": ckpt.rng_state(), "window": {"sums": self.state.window_sums.cpu(),
                                                       "count": self.state.window_count}}
            states: list[Any] = [None] * self.world
            dist.all_gather_object(states, own)
            self._rank_states = states

    def _own_rank_state(self, state: dict[str, Any], source: Path) -> dict[str, Any]:
        ranks = state.get("ranks")
        if ranks and len(ranks) == self.world:
            return ranks[self.rank]
        if self.world > 1 or ranks:  # not an exact continuation: said, never silent
            logger.warning("%s was written by %d rank(s), this run has %d: every rank restores rank 0's RNG, "
                           "so the run is not bit-identical to an uninterrupted one", source,
                           len(ranks) if ranks else 1, self.world)
        return {"rng": state["rng"], "window": state["window"]}

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.to(self.device)
            dist.all_reduce(value)
            value = value / self.world
        return value.cpu()

    def sync_counters(self) -> None:
        pending = torch.tensor(self.state.pending, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(pending)
        for key, value in zip(("images", "instances", "pixels"), pending.tolist()):
            self.state.counters[key] += int(value)
        self.state.pending = [0, 0, 0]

    def check_finite(self) -> None:
        err = first_nonfinite(self._bad_iter, self._bad_value)
        if err is not None:
            raise err

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank == 0 and metrics:
            for r in self.reporters:
                r.log(step, metrics)

    # -- loop -------------------------------------------------------------------------------
    def loader(self) -> DataLoader:
        dc = self.cfg.data
        end = min(self.total_iters, self.stop_after or self.total_iters)
        sampler = StreamBatchSampler(len(self.train_set), self.cfg.optim.batch_size, self.cfg.runtime.seed,
                                     self.state.iteration, end, self.rank, self.world, groups=self._groups)
        workers = dc.num_workers
        # An explicit generator keeps the loader from drawing its worker seed from the global RNG,
        # which would shift the model's sampling RNG by one draw on every resume.
        gen = torch.Generator().manual_seed(self.cfg.runtime.seed)
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                          pin_memory=self._non_blocking, persistent_workers=speed.persistent_workers(dc),
                          prefetch_factor=dc.prefetch_factor if workers else None, generator=gen,
                          worker_init_fn=ignore_in_worker if workers else None)

    def run_step(self, images, targets) -> None:
        it = self.state.iteration
        dev = self.device
        nb = self._non_blocking
        images = [to_device_float(im, dev, nb) for im in images]  # uint8 until on the device
        targets = [{k: (v.to(dev, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        # Nothing here reads a device value back: losses stay on the device until a log point
        # (MetricsHook), so CUDA runs ahead. (An fp16 GradScaler's step is the one inherent sync.)
        with speed.autocast(self.cfg.optim.amp, dev):
            loss_dict = self.model(images, targets)
        total = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        losses = torch.stack([total.detach()] + [loss_dict[k].detach() for k in self.loss_names[1:]]).double()
        bad = ~torch.isfinite(total.detach()) & (self._bad_iter < 0)
        self._bad_iter = torch.where(bad, torch.full_like(self._bad_iter, it), self._bad_iter)
        self._bad_value = torch.where(bad, total.detach().float(), self._bad_value)
        st = self.state
        st.window_sums += losses
        st.window_count += 1
        self._count(targets)

    def train_step(self, images, targets) -> None:
        """One iteration plus its periodic hooks."""
        self.run_step(images, targets)
        self.state.iteration += 1
        for hook in self.hooks:
            hook.after_step(self)

    def _count(self, targets) -> None:
        ms, mx = self._pixel_size
        p = self.state.pending
        p[0] += len(targets)
        p[1] += sum(int(t["labels"].numel()) for t in targets)
        p[2] += sum(resized_area(*image_hw(t), ms, mx) for t in targets)

    def fit(self) -> None:
        st = self.state
        end = min(self.total_iters, self.stop_after or self.total_iters)
        info = RunInfo(self.cfg, self.output_dir, st.iteration, self.total_iters, st.tracking, self.rank,
                       evaluated_at_start=st.iteration == 0 or st.last_eval.get("step") == st.iteration)
        for r in self.reporters:
            r.start(info)
        self.model.train()
        for hook in self.hooks:
            hook.before_train(self)
        for images, targets in start_workers(self.loader()):
            self.train_step(images, targets)
        if st.iteration < end:
            raise TrainerError(f"data stream ended at iteration {st.iteration} before {end}")
        if st.iteration >= self.total_iters:
            for hook in self.hooks:
                hook.after_train(self)


def train(cfg: TrainConfig, *, reporters: Sequence[Reporter] = (), resume: bool = False,
          start_from: Path | None = None, stop_after: int | None = None) -> TrainResult:
    """Train (or continue) one trial. See the module docstring; raises TrainerError subclasses."""
    trainer = Trainer(cfg, reporters, stop_after)
    trainer.restore(resume, start_from)
    if trainer.rank == 0:
        folder = TrialDir(trainer.output_dir)
        dump_config(trainer.cfg, folder.config_file())
        folder.write_image_ids(trainer.train_ids)
    status = "failed"
    error: BaseException | None = None
    try:
        if trainer.state.iteration >= trainer.total_iters and trainer.state.last_eval.get("step") == trainer.total_iters:
            logger.info("already finished (%d iterations)", trainer.total_iters)
            for hook in trainer.hooks:
                hook.after_train(trainer)
        else:
            with armed():  # a SIGTERM from here on stops at a step's end (trainer.engine.preemption)
                trainer.fit()
        status = "finished" if trainer.state.iteration >= trainer.total_iters else "stopped"
    except BaseException as exc:
        error = exc
        status = "preempted" if isinstance(exc, PreemptedError) else status
        raise
    finally:
        for r in trainer.reporters:
            try:
                r.finish(status, error)
            except Exception:  # a reporter failing must not hide the training error
                logger.exception("reporter %s failed in finish()", type(r).__name__)
    final = trainer.final_metrics or {k: v for k, v in trainer.state.last_eval.items() if k != "step"}
    return TrainResult(status, trainer.state.iteration, final, trainer.output_dir)
