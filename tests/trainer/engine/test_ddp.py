"""DDP over 2 gloo processes: a forked or resumed multi-rank run equals the uninterrupted one bit for bit.

Each rank draws RPN/ROI samples from its own RNG on its own images, so the ranks' RNG states part
after the first step; a checkpoint must carry every rank's state (a run restoring rank 0's on every
rank trains on, but not as the uninterrupted run did).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import tiny_config
from trainer.engine import checkpoint as ckpt
from trainer.config import build_config
from trainer.engine.train_loop import init_distributed, train
from trainer.engine.reporters import JsonlReporter, read_metrics

SCHED = {"iters": 8, "drops": [5, 7], "warmup_iters": 2}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, jobs: list[tuple[dict, dict]]) -> None:
    torch.set_num_threads(1)
    for cfg_dict, kwargs in jobs:
        cfg = build_config(cfg_dict)
        init_distributed(cfg.runtime, rank, world, f"127.0.0.1:{port}")
        try:
            train(cfg, reporters=[JsonlReporter()] if rank == 0 else [], **kwargs)
        finally:
            dist.destroy_process_group()
        port += 1  # a fresh rendezvous per job


def _ddp(jobs: list[tuple[dict, dict]]) -> None:
    port = _port()
    mp.spawn(_rank, args=(2, port, jobs), nprocs=2, join=True)


def test_two_rank_fork_equals_unforked(synth_root, tmp_path):
    eval_every = {"period": 4}
    alone = tiny_config(synth_root, tmp_path / "alone", schedule=SCHED, eval=eval_every,
                        runtime={"dist_backend": "gloo"})
    trunk = tiny_config(synth_root, tmp_path / "trunk", schedule={**SCHED, "drops": []}, eval=eval_every,
                        checkpoint={"period": 0, "at": [5]})
    branch = tiny_config(synth_root, tmp_path / "branch", schedule=SCHED, eval=eval_every)
    fork = tmp_path / "trunk" / "checkpoints" / "ckpt_0000005.pt"
    _ddp([(alone, {}), (trunk, {"stop_after": 5}), (branch, {"start_from": fork})])
    state = ckpt.load(fork)
    assert len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])  # they did part
    rows = lambda name: read_metrics(tmp_path / name / "metrics.jsonl")  # noqa: E731
    assert rows("trunk") + rows("branch") == rows("alone")  # every loss and AP row, bit for bit
    a = ckpt.load(tmp_path / "alone" / "checkpoints" / "ckpt_0000008.pt")["model"]
    b = ckpt.load(tmp_path / "branch" / "checkpoints" / "ckpt_0000008.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nccl_without_cuda_is_refused():
    from trainer.engine.train_loop import dist_backend
    from trainer.errors import TrainerError

    cfg = build_config({"runtime": {"dist_backend": "nccl", "device": "cpu"}})
    with pytest.raises(TrainerError, match="no CUDA device"):
        dist_backend(cfg.runtime)
    assert dist_backend(build_config({"runtime": {"device": "cpu"}}).runtime) == "gloo"
