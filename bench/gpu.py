"""GPU benchmark: train / inference / evaluation images/s of R50-FPN GN Mask R-CNN at 800x1333.

Needs only the repo and torch (plus the project's pycocotools): images, boxes and masks are random
and made in memory (no dataset, no weights download). Training runs through the project's own loop
(`Trainer.train_step` on batches from `Trainer.loader()`, batch 2 per GPU, random init) once per
precision mode; inference times the model's forward on images already on the device
(full-image masks pasted, as a user calls it); evaluation times the path `trainer.evaluation.coco.evaluate`
takes (inference with unpasted masks, then `predictions_to_coco` + `score_coco`).
The RoI heads' score threshold is set to 0 so every image yields the full detections-per-image a
trained model gives (a random-init model would otherwise keep almost none, making evaluation free).

    python bench/gpu.py                        # CUDA: fp32 / tf32 / bf16 / bf16+channels_last (~3 min, estimated)
    python bench/gpu.py --compile              # adds a bf16 + compiled-backbone row (compile takes minutes)
    python bench/gpu.py --device cpu --tiny    # every path on a tiny model in seconds (the smoke test)

Target (project issue 7): >= 30 training images/s per H200 with bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.evaluation import coco as ev  # noqa: E402
from trainer.config import build_config  # noqa: E402
from trainer.engine.train_loop import Trainer  # noqa: E402
from trainer.errors import NonFiniteLossError  # noqa: E402
from trainer.engine.speed import autocast  # noqa: E402

log = logging.getLogger("bench.gpu")
TARGET_BF16 = 30.0  # training images/s per H200, R50-FPN GN, 800x1333, bf16

FULL = {"model": {"backbone": "R50", "norm": "GN", "init": "random", "min_size": 800, "max_size": 1333},
        "size": (800, 1333), "warmup": 15, "iters": 50, "infer_images": 32, "eval_images": 32, "workers": 8}
# CPU smoke: the test config's R18-FPN at 64 px; same code paths, seconds instead of minutes.
TINY = {"model": {"backbone": "R18", "norm": "GN", "init": "random", "min_size": 64, "max_size": 96,
                  "rpn_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
                  "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 32,
                  "box_detections_per_img": 20, "representation_size": 128, "sampling_ratio": 1, "fpn_channels": 64},
        "size": (64, 96), "warmup": 1, "iters": 2, "infer_images": 4, "eval_images": 4, "workers": 0}


@dataclass(frozen=True)
class Mode:
    name: str
    amp: str = "none"
    tf32: bool = True
    channels_last: bool = False
    compile: bool = False


MODES = {m.name: m for m in (Mode("fp32", tf32=False), Mode("tf32"), Mode("bf16", amp="bf16"),
                             Mode("bf16+nhwc", amp="bf16", channels_last=True),
                             Mode("bf16+compile", amp="bf16", compile=True))}


class SyntheticInstances(torch.utils.data.Dataset):
    """Random images with 1..8 elliptic instances each, a pure function of (seed, index).

    Training items are keyed (stream position, index) like `CocoInstances`; evaluation items by
    index. `coco` (built with `with_coco`) is the ground truth in COCO form for scoring.
    """

    def __init__(self, n: int, size: tuple[int, int], num_classes: int = 80, seed: int = 0,
                 with_coco: bool = False):
        self.n, (self.h, self.w), self.seed, self.classes = n, size, seed, num_classes
        self.image_ids = list(range(1, n + 1))
        self.label_to_cat = {k: k for k in range(1, num_classes + 1)}
        self.coco = self._coco() if with_coco else None

    @property
    def num_classes(self) -> int:
        return self.classes

    def __len__(self) -> int:
        return self.n

    def aspect_groups(self) -> list[int]:
        return [0 if self.w >= self.h else 1] * self.n

    def _instances(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        k = int(rng.integers(1, 9))
        wh = rng.uniform(0.05, 0.6, (k, 2)) * [self.w, self.h]
        xy = rng.uniform(0, 1, (k, 2)) * ([self.w, self.h] - wh)
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        masks = np.zeros((k, self.h, self.w), np.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.round().astype(int)):
            yy, xx = np.ogrid[y0:y1, x0:x1]
            cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, max((y1 - y0) / 2, 1), max((x1 - x0) / 2, 1)
            m[y0:y1, x0:x1] = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1
        labels = rng.integers(1, self.classes + 1, k)
        return torch.from_numpy(boxes), torch.from_numpy(labels), torch.from_numpy(masks)

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else int(key)
        image = torch.rand(3, self.h, self.w, generator=torch.Generator().manual_seed(self.seed * 100_003 + index))
        if not isinstance(key, tuple):
            return image, {"image_id": self.image_ids[index]}
        boxes, labels, masks = self._instances(index)
        return image, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": self.image_ids[index]}

    def _coco(self) -> COCO:
        images, anns = [], []
        for index, image_id in enumerate(self.image_ids):
            images.append({"id": image_id, "height": self.h, "width": self.w})
            _, labels, masks = self._instances(index)
            rles = mask_util.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0)))
            for label, rle in zip(labels.tolist(), rles):
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": label, "iscrowd": 0,
                             "segmentation": rle, "area": float(mask_util.area(rle)),
                             "bbox": mask_util.toBbox(rle).tolist()})
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": c, "name": f"c{c}"} for c in self.label_to_cat.values()]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(preset: dict, mode: Mode, args: argparse.Namespace, train_set, val_set, out: Path) -> Trainer:
    cfg = build_config({
        "model": preset["model"],
        "data": {"num_workers": preset["workers"], "prefetch_factor": 4, "pin_memory": True},
        "optim": {"batch_size": 2, "amp": mode.amp},
        # Never reaches its end inside the bench, so no evaluation or checkpoint hook fires.
        "schedule": {"iters": 100_000, "drops": []},
        "eval": {"period": 0}, "checkpoint": {"period": 0},
        "runtime": {"device": args.device, "output_dir": str(out / mode.name), "tf32": mode.tf32,
                    "cudnn_benchmark": True,  # every batch has one shape here
                    "channels_last": mode.channels_last, "compile_backbone": mode.compile,
                    "threads": args.threads},
    })
    return Trainer(cfg, datasets=(train_set, val_set, train_set.image_ids))


def train_speed(trainer: Trainer, warmup: int, iters: int) -> dict[str, float]:
    """Images/s of `train_step` on loader batches, the share of it spent waiting for data, peak memory."""
    dev = trainer.device
    trainer.model.train()
    batches = iter(trainer.loader())
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    wait, started = 0.0, time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        trainer.train_step(*batch)
    sync(dev)
    elapsed = time.perf_counter() - started
    finite = _finite(trainer)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return {"train": iters * trainer.cfg.optim.batch_size / elapsed, "wait": wait / elapsed, "peak": peak,
            "finite": finite}


def _finite(trainer: Trainer) -> bool:
    try:
        trainer.check_finite()
    except NonFiniteLossError as exc:  # reported in the table; the speed still counts
        log.warning("%s", exc)
        return False
    return True


def _eval_batches(images: list[torch.Tensor], batch: int = 1) -> list[list[torch.Tensor]]:
    # One image per forward, as `trainer.evaluation.coco` runs (GroupNorm must never see batch padding).
    return [images[k:k + batch] for k in range(0, len(images), batch)]


def infer_speed(trainer: Trainer, images: list[torch.Tensor], amp: str) -> float:
    """Images/s of the model's forward in eval mode (images already on the device)."""
    model, dev = trainer.bare_model, trainer.device
    model.eval()
    batches = _eval_batches(images)
    with torch.inference_mode(), autocast(amp, dev):
        model(batches[0])  # warm-up (and cuDNN autotuning) for the eval shapes
        sync(dev)
        started = time.perf_counter()
        for batch in batches:
            model(batch)
        sync(dev)
    return len(images) / (time.perf_counter() - started)


def eval_speed(trainer: Trainer, eval_set: SyntheticInstances, images: list[torch.Tensor]) -> dict[str, float]:
    """Inference, `predictions_to_coco` and `score_coco` seconds, as `trainer.evaluation.coco.evaluate` runs
    them for the EvalHook: no autocast, masks left unpasted (`roi_mask_outputs`) for the conversion."""
    model, dev = trainer.bare_model, trainer.device
    model.eval()
    results: list[dict] = []
    t_inf = t_conv = 0.0
    ids = iter(eval_set.image_ids)
    with torch.inference_mode(), ev.roi_mask_outputs(model):
        for batch in _eval_batches(images):
            t = time.perf_counter()
            outputs = model(batch)
            sync(dev)
            t_inf += time.perf_counter() - t
            t = time.perf_counter()
            results.extend(ev.predictions_to_coco(outputs, [next(ids) for _ in batch], eval_set.label_to_cat))
            t_conv += time.perf_counter() - t
    t = time.perf_counter()
    metrics = ev.score_coco(eval_set.coco, results, image_ids=eval_set.image_ids)
    t_score = time.perf_counter() - t
    return {"inference": t_inf, "conversion": t_conv, "scoring": t_score, "dets": len(results) / len(images),
            "segm/AP": metrics["segm/AP"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes: a smoke run of every path")
    parser.add_argument("--modes", default="fp32,tf32,bf16,bf16+nhwc", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--compile", action="store_true", help="add the bf16+compile mode")
    parser.add_argument("--warmup", type=int, help="untimed training iterations per mode")
    parser.add_argument("--iters", type=int, help="timed training iterations per mode")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()] + (["bf16+compile"] if args.compile else [])
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    return args


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    preset = dict(TINY if args.tiny else FULL)
    preset.update({k: getattr(args, k) for k in ("warmup", "iters") if getattr(args, k) is not None})
    train_set = SyntheticInstances(64, preset["size"], seed=1)
    eval_set = SyntheticInstances(preset["eval_images"], preset["size"], seed=2, with_coco=True)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for name in args.modes:
            mode = MODES[name]
            log.info("mode %s: building the model", name)
            trainer = make_trainer(preset, mode, args, train_set, eval_set, Path(tmp))
            trainer.bare_model.roi_heads.score_thresh = 0.0  # full detections per image (see docstring)
            images = [eval_set[i % len(eval_set)][0].to(trainer.device) for i in range(preset["infer_images"])]
            log.info("mode %s: training %d + %d iterations", name, preset["warmup"], preset["iters"])
            rows[name] = train_speed(trainer, preset["warmup"], preset["iters"])
            rows[name]["infer"] = infer_speed(trainer, images, mode.amp)
            if name == ("tf32" if "tf32" in args.modes else args.modes[0]):
                log.info("mode %s: evaluation on %d images", name, len(eval_set))
                rows["eval"] = {**eval_speed(trainer, eval_set, images[:len(eval_set)]), "mode": name}
            del trainer, images
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def print_table(rows: dict[str, dict], args: argparse.Namespace, header: str) -> None:
    print(f"\n{header}")
    print(f"{'mode':<14}{'train img/s':>12}{'data wait':>11}{'peak GiB':>10}{'infer img/s':>13}{'finite':>8}")
    for name in args.modes:
        r = rows[name]
        peak = f"{r['peak']:.2f}" if r["peak"] == r["peak"] else "-"  # NaN off CUDA
        print(f"{name:<14}{r['train']:>12.2f}{r['wait']:>10.0%} {peak:>10}{r['infer']:>13.2f}"
              f"{'yes' if r['finite'] else 'NO':>8}")
    e = rows["eval"]
    n = args.eval_images
    per = {k: n / e[k] for k in ("inference", "conversion", "scoring")}
    total = n / (e["inference"] + e["conversion"] + e["scoring"])
    print(f"evaluation ({e['mode']}, {n} images, {e['dets']:.0f} detections/image): inference "
          f"{per['inference']:.2f}, conversion {per['conversion']:.2f}, scoring {per['scoring']:.2f}, "
          f"total {total:.2f} img/s")
    if "fp32" in rows and "bf16" in rows:
        print(f"bf16 / fp32 training speed: {rows['bf16']['train'] / rows['fp32']['train']:.2f}x")
    if "bf16" in rows and args.device == "cuda" and not args.tiny:
        met = "met" if rows["bf16"]["train"] >= TARGET_BF16 else "NOT met"
        print(f"target >= {TARGET_BF16:.0f} bf16 training img/s per GPU: {met} ({rows['bf16']['train']:.2f})")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False). Run it on a "
                         "machine with a CUDA GPU, or use `--device cpu --tiny` for a smoke run.\n")
        return 2
    preset = TINY if args.tiny else FULL
    args.eval_images = preset["eval_images"]
    h, w = preset["size"]
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    header = (f"Mask R-CNN {preset['model']['backbone']}-FPN GN, {h}x{w}, batch 2, random init, on {where} "
              f"(torch {torch.__version__})")
    started = time.perf_counter()
    rows = run(args)
    print_table(rows, args, header)
    print(f"wall time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
