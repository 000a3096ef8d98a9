"""Seconds per iteration of our training loop vs a bare torchvision loop, measured alternately.

Both loops train the same CPU-sized Mask R-CNN (trainer/configs/cpu_r18.yaml unless --config) from
the same initial weights on the same synthetic batches. Ours is `Trainer.train_step` with its hooks
(metrics every log_period; no evaluation or checkpoint inside the timed blocks, since the bare loop
has none); the bare loop is the torchvision reference shape: forward, sum of losses, zero_grad,
backward, clip, step, LR step. Blocks alternate (ours, bare, ours, ...) so drift in machine speed
hits both. Also reports the data loader's images/s against what training consumes.

    python bench/trainer_step.py [--rounds 6 --block 10 --threads 1 --data DIR]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_config  # noqa: E402
from trainer.engine import Trainer  # noqa: E402
from trainer.synthetic import generate_detection  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "cpu_r18.yaml"


def bare_step(model, opt, sched, images, targets, clip):
    loss_dict = model(list(images), list(targets))
    losses = sum(loss_dict.values())
    opt.zero_grad(set_to_none=True)
    losses.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()


def timed(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--data", help="synthetic COCO root (generated into a temp dir if omitted)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_step_")
    data = args.data or (generate_detection(Path(tmp) / "synth", num_train=300, num_val=10) and Path(tmp) / "synth")
    total = (args.rounds * 2 + 2) * args.block + 10
    cfg = load_config(args.config, [f"data.root={data}", f"runtime.output_dir={tmp}/run", f"runtime.threads={args.threads}",
                                    f"schedule.iters={total * 2}", "schedule.drops=[]", "schedule.warmup_iters=0",
                                    "eval.period=0", "checkpoint.period=0"])
    ours = Trainer(cfg)
    ours.model.train()
    bare = copy.deepcopy(ours.bare_model)
    bare.train()
    opt = torch.optim.SGD(bare.parameters(), lr=cfg.optim.base_lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    batches = iter(ours.loader())
    cached = [next(batches) for _ in range(args.block)]  # same batches for both, loader excluded
    step_ours = iter(cached * (total // args.block + 1))
    step_bare = iter(cached * (total // args.block + 1))

    def run_ours():
        ours.train_step(*next(step_ours))

    def run_bare():
        bare_step(bare, opt, sched, *next(step_bare), cfg.optim.grad_clip)

    timed(run_ours, args.block), timed(run_bare, args.block)  # warm up both
    rows = []
    for r in range(args.rounds):
        rows.append((timed(run_ours, args.block), timed(run_bare, args.block)))
        print(f"round {r}: ours {rows[-1][0]:.4f} s/it   bare {rows[-1][1]:.4f} s/it", flush=True)
    o, b = statistics.median(x for x, _ in rows), statistics.median(y for _, y in rows)
    n_img = cfg.optim.batch_size
    fresh = iter(ours.loader())  # a new loader: nothing prefetched while the steps ran
    t = time.perf_counter()
    loaded = sum(len(imgs) for imgs, _ in (next(fresh) for _ in range(args.block * 3)))
    loader_ips = loaded / (time.perf_counter() - t)
    print()
    print(f"{'loop':<28}{'s/iter (median)':>18}{'images/s':>12}")
    print(f"{'ours (Trainer.train_step)':<28}{o:>18.4f}{n_img / o:>12.2f}")
    print(f"{'bare torchvision loop':<28}{b:>18.4f}{n_img / b:>12.2f}")
    print(f"{'data loader alone':<28}{'':>18}{loader_ips:>12.2f}")
    print(f"\nloader / training consumption: {loader_ips / (n_img / o):.1f}x")
    print(f"overhead ratio ours/bare: {o / b:.4f} ({(o / b - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
