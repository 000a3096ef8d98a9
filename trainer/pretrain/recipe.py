"""Pretraining's schedule in iterations and its process group: the parts of a recipe that need the data.

A `PretrainConfig` may give its length, warm-up and LR steps in epochs (the paper's ImageNet recipe
is 100 epochs with steps at 30/60/90); `resolve_pretrain_schedule` turns them into iterations once the train
folder's size is known (an epoch is len(train) // batch_size iterations, as `StreamBatchSampler`
counts it). `process_group` joins the data-parallel group a launcher set up: Ray Train's (already
initialised) or torchrun's (RANK / WORLD_SIZE / MASTER_ADDR in the environment).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from trainer.config import PretrainConfig
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSchedule:
    iters: int
    warmup: int
    drops: tuple[int, ...]
    iters_per_epoch: int


def resolve_pretrain_schedule(cfg: PretrainConfig, num_images: int) -> PretrainSchedule:
    """A pretraining config's length, warm-up and LR steps in iterations (epochs need the set's size)."""
    per_epoch = num_images // cfg.batch_size
    if cfg.epochs is not None:
        if per_epoch < 1:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {num_images} training images: "
                              "an epoch would have no iteration")
        iters = max(1, round(cfg.epochs * per_epoch))
        warmup = round((cfg.warmup_epochs or 0) * per_epoch)
        drops = tuple(round(s * per_epoch) for s in cfg.lr_steps)
    else:
        iters, warmup, drops = int(cfg.iters), cfg.warmup_iters, tuple(int(s) for s in cfg.lr_steps)
    if warmup > iters or any(d >= iters for d in drops):
        raise ConfigError(f"warm-up ({warmup}) and LR steps {list(drops)} must lie inside the {iters} iterations")
    return PretrainSchedule(iters, warmup, drops, per_epoch)


def lr_factor(cfg: PretrainConfig, sched: PretrainSchedule) -> Callable[[int], float]:
    """Linear warm-up, then cosine to zero or x gamma at each step."""
    def factor(it: int) -> float:
        if it < sched.warmup:
            return (it + 1) / sched.warmup
        if cfg.lr_schedule == "step":
            return cfg.gamma ** sum(it >= d for d in sched.drops)
        progress = (it - sched.warmup) / max(sched.iters - sched.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (float64, so image and pixel counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Group]:
    """The data-parallel group: Ray Train's, torchrun's (initialised here, destroyed on exit), or none."""
    owned = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owned = True
    if dist.is_initialized():
        group = Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        logger.info("pretrain: rank %d of %d (%s)", group.rank, group.world, dist.get_backend())
    else:
        group = Group(0, 1, 0)
    try:
        yield group
    finally:
        if owned:
            dist.destroy_process_group()
