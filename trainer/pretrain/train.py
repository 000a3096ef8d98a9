"""Backbone pretraining: classification on an ImageFolder set, written as an init for detection.

`python -m trainer.pretrain [--preset imagenet-gn] [--config pretrain.yaml] [--set key=value] [--resume]`
trains the same ResNet (same norm) that detection uses, on ImageNet's layout (ROOT/train/<class>/*.jpg,
optional ROOT/val/) or on the synthetic classification set, and writes OUTPUT/backbone.pt, usable as
`model.init: checkpoint:OUTPUT/backbone.pt` or as `model.imagenet_weights` (torchvision layout, RGB).
Data-parallel under torchrun (`torchrun --nproc_per_node 8 -m trainer.pretrain ...`) or inside Ray Train's
process group: each process takes its share of every global batch, rank 0 writes. It counts the images
and pixels it saw (the file's `meta`, for the paper's cost accounting) and resumes exactly: the batch
stream and augmentation depend only on (seed, iteration).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from trainer.engine import checkpoint as ckpt
from trainer.config import PRETRAIN_PRESETS, PretrainConfig, config_to_dict, dump_config, load_pretrain_config
from trainer.data.coco import StreamBatchSampler
from trainer.errors import DatasetError, NonFiniteLossError, TrainerError
from trainer.pretrain.recipe import Group, lr_factor, process_group, resolve_pretrain_schedule

__all__ = ["PretrainConfig", "load_pretrain_config", "pretrain", "build_classifier"]

logger = logging.getLogger(__name__)


class _Folder(Dataset):
    """ImageFolder whose augmentation is seeded by the sample's stream position."""

    def __init__(self, root: Path, size: int, train: bool, seed: int, crop_scale=(0.08, 1.0)):
        from torchvision import datasets
        from torchvision.transforms import v2

        if not root.is_dir():
            raise DatasetError(f"image folder not found: {root} (expected ImageNet layout: {root}/<class>/<image>; "
                               "for offline data run `python -m trainer.synthetic --classification ...`)")
        try:
            self.folder = datasets.ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DatasetError(f"{root}: {exc}") from None
        self.train, self.seed = train, seed
        norm = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # torchvision's ImageNet stats
        head = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        aug = ([v2.RandomResizedCrop(size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip()] if train
               else [v2.Resize(math.ceil(size * 8 / 7), antialias=True), v2.CenterCrop(size)])
        self.transform = v2.Compose(head + aug + [norm])

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: int | tuple[int, int]):
        position, index = key if isinstance(key, tuple) else (key, key)
        image, label = self.folder[index]
        with torch.random.fork_rng(devices=[]):  # never disturb the caller's RNG
            torch.manual_seed(self.seed * 1_000_003 + position)
            x = self.transform(image)
        return x, label, image.width * image.height


def build_classifier(cfg: PretrainConfig, num_classes: int) -> torch.nn.Module:
    from trainer.modeling.backbone import build_resnet

    net = build_resnet(cfg.backbone, cfg.norm)
    net.fc = torch.nn.Linear(net.fc.in_features, num_classes)
    # Zero the last norm scale of every residual branch (Goyal et al.): each block starts as the
    # identity, which keeps a short, high-LR classification run from blowing up in its first steps.
    for block in (b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer):
        last = getattr(block, "bn3", None) or block.bn2
        if getattr(last, "weight", None) is not None:
            torch.nn.init.zeros_(last.weight)
    return net


def _optimizer(net: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.SGD:
    from trainer.modeling.backbone import norm_parameters

    norm_ids = norm_parameters(net)
    groups = [{"params": [p for p in net.parameters() if id(p) not in norm_ids], "weight_decay": cfg.weight_decay},
              {"params": [p for p in net.parameters() if id(p) in norm_ids], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)


@torch.inference_mode()
def _top1(net: torch.nn.Module, folder: _Folder, device: torch.device) -> float:
    was = net.training
    net.eval()
    correct = total = 0
    for x, y, _ in DataLoader(folder, batch_size=256):
        correct += int((net(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    net.train(was)
    return correct / max(total, 1)


def _device(cfg: PretrainConfig, group: Group) -> torch.device:
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(group.local_rank)
        return torch.device("cuda", group.local_rank)
    return torch.device("cpu")


def pretrain(cfg: PretrainConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Train the classifier (data-parallel inside a process group); return OUTPUT/backbone.pt's path."""
    with process_group(cfg.device) as group:
        return _pretrain(cfg, group, resume, stop_after)


def _pretrain(cfg: PretrainConfig, group: Group, resume: bool, stop_after: int | None) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    device = _device(cfg, group)
    out = Path(cfg.output_dir)
    train_set = _Folder(Path(cfg.data_root) / "train", cfg.image_size, True, cfg.seed, cfg.crop_scale)
    sched_plan = resolve_pretrain_schedule(cfg, len(train_set))
    net = build_classifier(cfg, len(train_set.classes)).to(device)
    model = net if group.world == 1 else torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = _optimizer(net, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, sched_plan))
    state = _restore(out, net, opt, sched) if resume else {"iteration": 0, "images": 0, "pixels": 0}
    total = sched_plan.iters
    end = min(total, stop_after) if stop_after else total
    if group.main:
        dump_config(cfg, out / "pretrain_config.yaml")
        _progress(out, state["iteration"], total, None)
        logger.info("pretrain %s-%s: %d iterations (%d per epoch over %d images) x batch %d on %d process(es); "
                    "warm-up %d, LR steps %s", cfg.backbone, cfg.norm, total, sched_plan.iters_per_epoch,
                    len(train_set), cfg.batch_size, group.world, sched_plan.warmup, list(sched_plan.drops))
    sampler = StreamBatchSampler(len(train_set), cfg.batch_size, cfg.seed, state["iteration"], end,
                                 rank=group.rank, world_size=group.world)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    t0, it0, window, pixels = time.perf_counter(), state["iteration"], [], 0
    for x, y, area in loader:
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        state["iteration"] += 1
        state["images"] += cfg.batch_size  # every iteration is one full global batch
        pixels += int(area.sum())
        window.append(loss.detach())
        it = state["iteration"]
        if it % cfg.log_period == 0 or it == end:
            mean = group.sum([float(torch.stack(window).mean())])[0] / group.world
            if not math.isfinite(mean):
                raise NonFiniteLossError(it, mean)
            if group.main:
                rate = (it - it0) / (time.perf_counter() - t0)
                logger.info("pretrain iter %d/%d  loss %.4f  lr %.4f  %.1f it/s", it, total, mean,
                            opt.param_groups[0]["lr"], rate)
                _progress(out, it, total, rate)
            window.clear()
        if (cfg.checkpoint_period and it % cfg.checkpoint_period == 0) or it == end:
            state["pixels"] += int(group.sum([pixels])[0])
            pixels = 0
            if group.main:
                _save(cfg, net, opt, sched, state)
            group.barrier()  # no rank runs ahead of (or resumes before) the checkpoint it belongs to
    if state["iteration"] < total:
        logger.info("pretrain stopped at iteration %d of %d (--stop-after); --resume continues", end, total)
        return out / "backbone.pt"
    path = _write_backbone(cfg, net, state, device) if group.main else out / "backbone.pt"
    group.barrier()
    return path


def _progress(out: Path, iteration: int, total: int, rate: float | None) -> None:
    """OUTPUT/progress.json, rewritten at each log line: what a sweep's `status` and live table show."""
    from trainer.atomic import write_atomic

    write_atomic(out / "progress.json", json.dumps({"iteration": iteration, "total": total, "rate": rate,
                                                    "time": time.time()}))


def _restore(out: Path, net, opt, sched) -> dict[str, int]:
    """Every rank loads the newest checkpoint rank 0 wrote; the counters are the global ones."""
    state = {"iteration": 0, "images": 0, "pixels": 0}
    found = ckpt.load_latest(out / "checkpoints")
    if found:
        path, saved = found
        net.load_state_dict(saved["model"]), opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"]), ckpt.set_rng_state(saved["rng"])
        state = {k: int(saved["counters"][k]) for k in state}
        logger.info("resumed from %s at iteration %d", path, state["iteration"])
    return state


def _save(cfg: PretrainConfig, net, opt, sched, state: dict[str, int]) -> None:
    it, folder = state["iteration"], Path(cfg.output_dir) / "checkpoints"
    ckpt.save_atomic({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "rng": ckpt.rng_state(), "iteration": it, "counters": dict(state),
                      "config": config_to_dict(cfg)}, ckpt.checkpoint_path(folder, it))
    ckpt.prune(folder, cfg.keep_last)


def _write_backbone(cfg: PretrainConfig, net: torch.nn.Module, state: dict[str, int], device) -> Path:
    out = Path(cfg.output_dir)
    val_root = Path(cfg.data_root) / "val"
    top1 = _top1(net, _Folder(val_root, cfg.image_size, False, cfg.seed), device) if val_root.is_dir() else None
    meta: dict[str, Any] = {"backbone": cfg.backbone, "norm": cfg.norm, "iterations": state["iteration"],
                            "images_seen": state["images"], "pixels_seen": state["pixels"],
                            "val_top1": top1 if top1 is not None else -1.0}
    body = {k: v.cpu() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    path = ckpt.save_atomic({"backbone": body, "meta": meta}, out / "backbone.pt")
    (out / "pretrain_summary.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    logger.info("backbone written to %s (%d images, %.3g pixels seen, val top-1 %s)", path, state["images"],
                state["pixels"], "n/a" if top1 is None else f"{top1:.3f}")
    return path


def main(argv: list[str] | None = None) -> int:
    from trainer.__main__ import setup_logging

    parser = argparse.ArgumentParser(prog="python -m trainer.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--preset", choices=sorted(PRETRAIN_PRESETS),
                        help="a named recipe under the config's own keys (imagenet-gn: the paper's ImageNet one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N iterations")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = ([f"preset={args.preset}"] if args.preset else []) + args.overrides
    try:
        pretrain(load_pretrain_config(args.config, overrides), resume=args.resume, stop_after=args.stop_after)
    except TrainerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
