"""Benchmark: trainer.evaluate's conversion + scoring against torchvision + plain pycocotools.

Builds a synthetic COCO split in memory (polygon GT of several sizes, non-contiguous category ids)
and, per image, the Mask R-CNN outputs that inference ends with: boxes, labels, scores and the mask
head's 28x28 probabilities. Then, on the very same outputs, it times

  (a) what a torchvision Mask R-CNN plus the recipe of torchvision's detection references / a typical
      user script do: `paste_masks_in_image` into full-image float masks (the model's postprocess),
      threshold them, `mask_util.encode(np.asfortranarray(mask))` once per detection, then
      `COCO.loadRes` + `COCOeval` for bbox (results without masks) and segm (results without boxes);
  (b) `predictions_to_coco` on the unpasted outputs (what `evaluate` gets under
      `roi_mask_outputs`: masks pasted straight into RLE) + `score_coco` with the best backend.

Generating the outputs is not timed. Usage:

    python bench/eval_speed.py --quick          # 300 images
    python bench/eval_speed.py                  # 5,000 images x ~7 objects x 100 detections
    python bench/eval_speed.py --memory --hw 480 640   # rank 0's peak RSS for those at 480x640
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.roi_heads import paste_masks_in_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import evaluate as ev  # noqa: E402

log = logging.getLogger("bench.eval_speed")
CAT_IDS = [1, 3, 4, 7, 9, 13, 18, 22, 27, 31, 35, 40, 44, 52, 57, 61, 67, 75, 82, 90]  # sparse, as COCO
LABEL_TO_CAT = {label: cat for label, cat in enumerate(CAT_IDS, start=1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--objects", type=int, default=7, help="mean GT objects per image")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--hw", type=int, nargs=2, metavar=("H", "W"), help="image height and width (over --size)")
    parser.add_argument("--memory", action="store_true",
                        help="only (b), in this process: peak RSS of rank 0's evaluation (results + scoring)")
    parser.add_argument("--backend", default="auto", choices=ev.BACKENDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 images")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1, as evaluation runs inside a 1-thread trial)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 300
    args.height, args.width = args.hw or (args.size, args.size)
    return args


def _ellipse_polygon(x: float, y: float, w: float, h: float, points: int = 16) -> list[float]:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    xs, ys = x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))
    return np.stack([xs, ys], axis=1).ravel().round(2).tolist()


def build_gt(args: argparse.Namespace, rng: np.random.Generator) -> COCO:
    """Elliptic polygons with log-uniform sides (8..220 px) so small, medium and large all occur."""
    height, width, images, anns = args.height, args.width, [], []
    for image_id in range(1, args.images + 1):
        images.append({"id": image_id, "height": height, "width": width})
        for _ in range(max(1, rng.poisson(args.objects))):
            w, h = np.exp(rng.uniform(np.log(8), np.log(min(220, min(height, width) - 2)), 2))
            x, y = rng.uniform(0, width - w - 1), rng.uniform(0, height - h - 1)
            poly = _ellipse_polygon(x, y, w, h)
            rle = mask_util.merge(mask_util.frPyObjects([poly], height, width))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "iscrowd": 0,
                         "category_id": int(rng.choice(CAT_IDS)), "segmentation": [poly],
                         "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist()})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def fake_outputs(gt: COCO, image_id: int, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    """~3 jittered hits per GT object (occasionally mislabelled), the rest random low-score boxes."""
    height, width, n = args.height, args.width, args.dets
    anns = gt.imgToAnns[image_id]
    cat_to_label = {c: l for l, c in LABEL_TO_CAT.items()}
    hits = [a for a in anns for _ in range(3)][:n]
    boxes = np.empty((n, 4), np.float32)
    labels = rng.integers(1, len(CAT_IDS) + 1, n)
    scores = np.sort(rng.uniform(0.05, 0.5, n))[::-1].copy()
    for k, ann in enumerate(hits):
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        boxes[k] = [x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]]
        labels[k] = cat_to_label[ann["category_id"]] if rng.random() > 0.1 else labels[k]
        scores[k] = rng.uniform(0.5, 1.0)
    rest = len(hits)
    wh = np.exp(rng.uniform(np.log(6), np.log(min(height, width) / 2), (n - rest, 2)))
    xy = rng.uniform(0, [width, height] - wh)
    boxes[rest:] = np.concatenate([xy, xy + wh], axis=1)
    boxes = np.clip(boxes, 0, [width - 1, height - 1, width - 1, height - 1])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    # Hits are confident; about one false positive in five has no pixel above 0.5.
    gain = np.where(np.arange(n) < rest, 1.0, rng.uniform(0.3, 1.5, n))
    return {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
            "scores": torch.from_numpy(scores).float(), "roi_masks": _roi_masks(gain, rng),
            "image_size": (height, width)}


def _roi_masks(gain: np.ndarray, rng: np.random.Generator, side: int = 28) -> torch.Tensor:
    """[N,1,28,28] probabilities: a soft ellipse near the middle of each box, as a mask head gives."""
    n = len(gain)
    grid = (np.arange(side) + 0.5) / side
    cx, cy = rng.uniform(0.45, 0.55, (2, n, 1))
    rx, ry = rng.uniform(0.4, 0.55, (2, n, 1))
    dx2, dy2 = ((grid[None] - cx) / rx) ** 2, ((grid[None] - cy) / ry) ** 2
    probs = gain[:, None, None] * (1.5 - (dy2[:, :, None] + dx2[:, None, :]))
    return torch.from_numpy(probs.clip(0, 1).astype(np.float32))[:, None]


def naive_convert(output: dict, image_id: int) -> tuple[list[dict], list[dict]]:
    """torchvision references' prepare_for_coco_detection / _segmentation, per-detection encode."""
    boxes = output["boxes"].clone()
    boxes[:, 2:] -= boxes[:, :2]
    boxes, scores, labels = boxes.tolist(), output["scores"].tolist(), output["labels"].tolist()
    masks = (output["masks"] > 0.5).numpy().astype(np.uint8)
    bbox_results, segm_results = [], []
    for k, mask in enumerate(masks):
        rle = mask_util.encode(np.asfortranarray(mask[0]))
        rle["counts"] = rle["counts"].decode("utf-8")
        cat = LABEL_TO_CAT[labels[k]]
        bbox_results.append({"image_id": image_id, "category_id": cat, "bbox": boxes[k], "score": scores[k]})
        segm_results.append({"image_id": image_id, "category_id": cat, "segmentation": rle, "score": scores[k]})
    return bbox_results, segm_results


def naive_score(gt: COCO, results: list[dict], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):  # a user script would print this; we time it only
        coco_eval = COCOeval(gt, gt.loadRes(results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats[:6]]


class Stopwatch:
    """Per-stage wall-clock and process-CPU seconds.

    CPU time is what one side costs even when other jobs share the cores. Wall time is what a
    user waits on a quiet machine.
    """

    def __init__(self, *stages: str):
        self.wall = dict.fromkeys(stages, 0.0)
        self.cpu = dict.fromkeys(stages, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - wall
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - cpu


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    gt = build_gt(args, rng)
    log.info("GT: %d images, %d objects (%.1fs)", args.images, len(gt.anns), time.perf_counter() - t0)
    naive, ours = Stopwatch("paste masks", "convert"), Stopwatch("backend check", "convert")
    naive_bbox, naive_segm, our_results = [], [], []
    for image_id in range(1, args.images + 1):
        output = fake_outputs(gt, image_id, args, rng)
        with naive("paste masks"):
            masks = paste_masks_in_image(output["roi_masks"], output["boxes"], output["image_size"])
        with naive("convert"):
            bbox, segm = naive_convert({**output, "masks": masks}, image_id)
        del masks
        naive_bbox += bbox
        naive_segm += segm
        with ours("convert"):
            our_results += ev.predictions_to_coco([output], [image_id], LABEL_TO_CAT)
        if image_id % 1000 == 0:
            log.info("converted %d/%d images", image_id, args.images)
    log.info("%d detections", len(our_results))

    naive_metrics = {}
    for iou_type, results in (("bbox", naive_bbox), ("segm", naive_segm)):
        with naive(f"score {iou_type}"):
            stats = naive_score(gt, results, iou_type)
        naive_metrics.update({f"{iou_type}/{m}": v for m, v in zip(ev.METRIC_NAMES, stats)})
        log.info("pycocotools %s scored", iou_type)
    del naive_bbox, naive_segm

    with ours("backend check"):
        backend = ev.resolve_backend(args.backend)  # "auto" runs its one-time self-check here
    our_metrics = {}
    for iou_type in ev.IOU_TYPES:
        with ours(f"score {iou_type}"):
            our_metrics.update(ev.score_coco(gt, our_results, iou_types=(iou_type,), backend=backend))
    report(naive, ours, naive_metrics, our_metrics, backend, len(our_results))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_memory(args: argparse.Namespace) -> None:
    """Rank 0's evaluation memory: the results of every image (as sharded evaluation gathers them,
    pickled and unpickled), then bbox and segm scoring. Peak RSS of this process, by stage."""
    import pickle
    import resource

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    marks = [("start (imports)", _rss_mib())]
    gt = build_gt(args, rng)
    marks.append(("ground truth built", _rss_mib()))
    results: list[dict] = []
    t0 = time.perf_counter()
    for image_id in range(1, args.images + 1):
        results += ev.predictions_to_coco([fake_outputs(gt, image_id, args, rng)], [image_id], LABEL_TO_CAT)
    results = pickle.loads(pickle.dumps(results))  # what dist.gather_object hands rank 0
    marks.append((f"{len(results)} results held (converted in {time.perf_counter() - t0:.0f}s)", _rss_mib()))
    t0 = time.perf_counter()
    metrics = ev.score_coco(gt, results, backend=args.backend, image_ids=list(range(1, args.images + 1)))
    marks.append((f"scored with {ev.resolve_backend(args.backend)} in {time.perf_counter() - t0:.0f}s",
                  _rss_mib()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nrank-0 evaluation memory: {args.images} images x {args.dets} detections at "
          f"{args.height}x{args.width}")
    for stage, rss in marks:
        print(f"  {stage:<60} RSS {rss:8.0f} MiB")
    print(f"  peak RSS {peak:.0f} MiB; bbox/AP {metrics['bbox/AP']:.4f} segm/AP {metrics['segm/AP']:.4f}")


def report(naive: Stopwatch, ours: Stopwatch, naive_metrics: dict, our_metrics: dict, backend: str,
           n: int) -> None:
    for watch in (naive, ours):
        watch.wall["total"], watch.cpu["total"] = sum(watch.wall.values()), sum(watch.cpu.values())
    stages = ["backend check", "paste masks", "convert", "score bbox", "score segm", "total"]
    print(f"\n{n} detections; (a) torchvision paste + pycocotools, (b) trainer.evaluate with {backend}")
    print(f"{'stage':<16}{'(a) wall':>12}{'(a) cpu':>12}{'(b) wall':>12}{'(b) cpu':>12}")
    for stage in stages:
        cells = [w.get(stage, 0.0) for watch in (naive, ours) for w in (watch.wall, watch.cpu)]
        print(f"{stage:<16}" + "".join(f"{c:>11.2f}s" for c in cells))
    print(f"{'metric':<16}{'(a)':>12}{'(b)':>12}")
    for key in naive_metrics:
        print(f"{key:<16}{naive_metrics[key]:>12.4f}{our_metrics[key]:>12.4f}")
    diff = max(abs(naive_metrics[k] - our_metrics[k]) for k in naive_metrics)
    print(f"speed ratio (a)/(b): {naive.wall['total'] / ours.wall['total']:.2f}x wall, "
          f"{naive.cpu['total'] / ours.cpu['total']:.2f}x cpu; max |AP difference|: {diff:.2e}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    arguments = parse_args()
    run_memory(arguments) if arguments.memory else run(arguments)
