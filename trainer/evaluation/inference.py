"""The one inference loop of every detector, and the evaluator protocol it drives (as detectron2's).

`inference_on_dataset(model, loader, evaluator, device)` runs `model` over `loader` one image per
forward pass and hands each batch's (targets, outputs) to `evaluator.process`; `evaluator.evaluate()`
then returns the metrics. COCO bbox/segm (`trainer.evaluation.coco`), COCO box/keypoints
(`trainer.evaluation.keypoints`) and VOC (`trainer.evaluation.voc`) are evaluators of that protocol.

* One image per forward pass, as in Detectron (one image per GPU at test time): a batch pads its
  images to a common size and GroupNorm's statistics would include that padding, making AP depend
  on `eval.batch_size`. The batch size only sets how many images a loader step decodes.
* No side effects (`inference_context`, the one RNG guard): every module's train/eval flag and the
  global RNG states (torch, the device's, numpy, random) are as before on return, also when
  inference raises, so a resumed run draws the same numbers whether or not it evaluated.
* Sharded over the ranks of a process group: `inference_loader` gives rank r the r-th contiguous
  slice of the dataset (`shard_bounds`); an evaluator gathers its ranks' results in rank order on
  rank 0 (`gather_results`: the same list one process would make), scores once there, and returns
  {} on the other ranks.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from trainer.data.coco import collate, to_device_float
from trainer.evaluation.convert import EvaluationError


class DatasetEvaluator:
    """What an evaluation does with a model's outputs: `reset`, then `process` per batch, then `evaluate`.

    `process(inputs, outputs)`: the batch's targets (each with its "image_id") and the model's outputs
    for them, in order. `evaluate()`: the metrics ({"bbox/AP": ...}) on rank 0, {} on other ranks.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.started = time.perf_counter()

    def reset(self) -> None:
        self.started = time.perf_counter()

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def gather(self, results: list, image_ids: list) -> tuple[list, list]:
        """This rank's (results, image ids), or on rank 0 every rank's in rank order."""
        if self.world_size > 1:
            return gather_results(results, image_ids, self.rank, self.world_size)
        return results, image_ids


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a (Distributed)DataParallel wrapper: inference runs on one image, unsynced."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous slice of n items; slices differ in size by at most one."""
    if not 0 <= rank < world_size:
        raise EvaluationError(f"rank {rank} outside a world of {world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


def gather_results(results: list, image_ids: list, rank: int, world_size: int) -> tuple[list, list]:
    """Every rank's (results, image ids), concatenated in rank order on rank 0 (elsewhere: empty)."""
    import torch.distributed as dist

    parts: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object((results, image_ids), parts, dst=0)
    if rank != 0:
        return [], []
    assert parts is not None
    return [r for part in parts for r in part[0]], [i for part in parts for i in part[1]]


def inference_loader(dataset: Any, *, batch_size: int, device: torch.device, num_workers: int = 0,
                     rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:
    """The loader over this rank's slice of `dataset`, in order."""
    lo, hi = shard_bounds(len(dataset), rank, world_size)
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
    )


@contextlib.contextmanager
def inference_context(net: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode and forked RNGs inside; every module's train flag and every RNG restored after.

    The DataLoader draws its base seed from the global torch generator; transforms may use numpy or
    random. Resumed training must not see whether an evaluation happened."""
    modes = [(m, m.training) for m in net.modules()]
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            net.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        random.setstate(py_state)
        np.random.set_state(np_state)


def inference_on_dataset(model: torch.nn.Module, loader: Any, evaluator: DatasetEvaluator,
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """Run `model` over `loader` (one image per forward pass) and return `evaluator.evaluate()`."""
    net, device = bare_model(model), torch.device(device)
    evaluator.reset()
    with inference_context(net, device), torch.inference_mode():
        for images, targets in loader:
            outputs = [net([to_device_float(image, device)])[0] for image in images]
            evaluator.process(targets, outputs)
    return evaluator.evaluate()


def evaluate_on(model: torch.nn.Module, dataset: Any, evaluator: DatasetEvaluator, *, batch_size: int,
                device: torch.device | str = "cpu", num_workers: int = 0) -> dict[str, float]:
    """`inference_on_dataset` over the evaluator's rank's slice of `dataset`."""
    device = torch.device(device)
    loader = inference_loader(dataset, batch_size=batch_size, device=device, num_workers=num_workers,
                              rank=evaluator.rank, world_size=evaluator.world_size)
    return inference_on_dataset(model, loader, evaluator, device)


class OutputsEvaluator(DatasetEvaluator):
    """Keeps every output on the CPU with its image id as the dataset gives it (VOC: strings), and
    on rank 0 scores all ranks' outputs at once with `score(outputs, image_ids)`."""

    def reset(self) -> None:
        super().reset()
        self.outputs: list[dict] = []
        self.image_ids: list[Any] = []

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        self.outputs.extend({k: v.cpu() for k, v in out.items() if torch.is_tensor(v)} for out in outputs)
        self.image_ids.extend(target["image_id"] for target in inputs)

    def evaluate(self) -> dict[str, float]:
        outputs, image_ids = self.gather(self.outputs, self.image_ids)
        return self.score(outputs, image_ids) if self.rank == 0 else {}

    def score(self, outputs: list[dict], image_ids: list[Any]) -> dict[str, float]:
        raise NotImplementedError
