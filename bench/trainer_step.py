"""Seconds per iteration of our training loop vs a bare torchvision loop, both fed by the real loader.

Both loops train the same CPU-sized Mask R-CNN (trainer/configs/cpu_r18.yaml unless --config) from
the same initial weights, each drawing its batches from its own DataLoader built exactly as a trial
builds it (`Trainer.loader()`: the trial's sampler, workers, prefetch and pinning), so both pay the
same data path and see the same batch sequence. Ours is `Trainer.train_step` with its hooks (metrics
every log_period; no evaluation or checkpoint inside the timed blocks, since the bare loop has none);
the bare loop is the torchvision reference shape: forward, sum of losses, zero_grad, backward, clip,
step, LR step. Blocks alternate (ours, bare, bare, ours, ours, ...) so drift in machine speed hits both; each round
gives one ratio, and the table shows the median ratio with its min-max and a bootstrap 95% interval.

    python bench/trainer_step.py [--rounds 8 --block 10 --threads 1 --data DIR]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_config  # noqa: E402
from trainer.data.coco import to_device_float  # noqa: E402
from trainer.engine.train_loop import Trainer  # noqa: E402
from trainer.synthetic.datasets import generate_detection  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "cpu_r18.yaml"


def bare_step(model, opt, sched, images, targets, clip):
    # Loaders hand over uint8 images; the trainer makes them [0, 1] floats on the device, as this does.
    images = [to_device_float(image, torch.device("cpu")) for image in images]
    loss_dict = model(images, list(targets))
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
    ap.add_argument("--rounds", type=int, default=8, help="alternating block pairs (>= 8 for a spread)")
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
    # Two loaders as a trial builds them, both from iteration 0: the same batches, each side paying
    # for its own loading (workers prefetch while the other side's block runs, on both sides alike).
    step_ours, step_bare = iter(ours.loader()), iter(ours.loader())

    def run_ours():
        ours.train_step(*next(step_ours))

    def run_bare():
        bare_step(bare, opt, sched, *next(step_bare), cfg.optim.grad_clip)

    timed(run_ours, args.block), timed(run_bare, args.block)  # warm up both
    rows = []
    for r in range(args.rounds):
        if r % 2 == 0:  # which side goes first alternates too, so a block's position favours neither
            rows.append((timed(run_ours, args.block), timed(run_bare, args.block)))
        else:
            bare_s = timed(run_bare, args.block)
            rows.append((timed(run_ours, args.block), bare_s))
        print(f"round {r}: ours {rows[-1][0]:.4f} s/it   bare {rows[-1][1]:.4f} s/it", flush=True)
    ratios = [x / y for x, y in rows]
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
    lo, hi = bootstrap_median_ci(ratios)
    print(f"ratio ours/bare per round: median {statistics.median(ratios):.4f} "
          f"({(statistics.median(ratios) - 1) * 100:+.2f}%), min-max {min(ratios):.4f}-{max(ratios):.4f}, "
          f"bootstrap 95% interval of the median {lo:.4f}-{hi:.4f} over {len(ratios)} rounds")
    print(f"ratio of the median step times: {o / b:.4f}")


def bootstrap_median_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap 95% interval of the median (seeded, so a rerun prints the same interval)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


if __name__ == "__main__":
    main()
