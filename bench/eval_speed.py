"""Benchmark: trainer.evaluate's conversion + scoring against the plain pycocotools recipe.

Builds a synthetic COCO split in memory (polygon GT of several sizes, non-contiguous category ids)
and, per image, Mask R-CNN-shaped outputs (boxes, labels, scores, soft full-image masks). Then, on
the very same outputs, it times

  (a) the recipe of torchvision's detection references / a typical user script: threshold the
      image's masks, `mask_util.encode(np.asfortranarray(mask))` once per detection, then
      `COCO.loadRes` + `COCOeval` for bbox (results without masks) and segm (results without boxes);
  (b) `predictions_to_coco` + `score_coco` with the best available backend.

Generating the outputs is not timed. Usage:

    python bench/eval_speed.py --quick          # 300 images
    python bench/eval_speed.py                  # 5,000 images x ~7 objects x 100 detections
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
    parser.add_argument("--backend", default="auto", choices=ev.BACKENDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 images")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 300
    return args


def _ellipse_polygon(x: float, y: float, w: float, h: float, points: int = 16) -> list[float]:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    xs, ys = x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))
    return np.stack([xs, ys], axis=1).ravel().round(2).tolist()


def build_gt(args: argparse.Namespace, rng: np.random.Generator) -> COCO:
    """Elliptic polygons with log-uniform sides (8..220 px) so small, medium and large all occur."""
    size, images, anns = args.size, [], []
    for image_id in range(1, args.images + 1):
        images.append({"id": image_id, "height": size, "width": size})
        for _ in range(max(1, rng.poisson(args.objects))):
            w, h = np.exp(rng.uniform(np.log(8), np.log(min(220, size - 2)), 2))
            x, y = rng.uniform(0, size - w - 1), rng.uniform(0, size - h - 1)
            poly = _ellipse_polygon(x, y, w, h)
            rle = mask_util.merge(mask_util.frPyObjects([poly], size, size))
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
    size, n = args.size, args.dets
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
    wh = np.exp(rng.uniform(np.log(6), np.log(size / 2), (n - rest, 2)))
    xy = rng.uniform(0, size - wh)
    boxes[rest:] = np.concatenate([xy, xy + wh], axis=1)
    boxes = np.clip(boxes, 0, size - 1)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
            "scores": torch.from_numpy(scores).float(), "masks": _soft_masks(torch.from_numpy(boxes), size)}


def _soft_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[N,1,S,S] probabilities: 1 in the box's inscribed ellipse core, fading to 0 outside it."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
    dx2 = ((grid[None] - cx[:, None]) / rx[:, None]) ** 2
    dy2 = ((grid[None] - cy[:, None]) / ry[:, None]) ** 2
    return (1.5 - (dy2[:, :, None] + dx2[:, None, :])).clamp_(0, 1)[:, None]


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


def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    gt = build_gt(args, rng)
    log.info("GT: %d images, %d objects (%.1fs)", args.images, len(gt.anns), time.perf_counter() - t0)
    naive = {"convert": 0.0}
    ours = {"backend check": 0.0, "convert": 0.0}
    naive_bbox, naive_segm, our_results = [], [], []
    for image_id in range(1, args.images + 1):
        output = fake_outputs(gt, image_id, args, rng)
        t = time.perf_counter()
        bbox, segm = naive_convert(output, image_id)
        naive["convert"] += time.perf_counter() - t
        naive_bbox += bbox
        naive_segm += segm
        t = time.perf_counter()
        our_results += ev.predictions_to_coco([output], [image_id], LABEL_TO_CAT)
        ours["convert"] += time.perf_counter() - t
        if image_id % 1000 == 0:
            log.info("converted %d/%d images", image_id, args.images)
    log.info("%d detections", len(our_results))

    naive_metrics = {}
    for iou_type, results in (("bbox", naive_bbox), ("segm", naive_segm)):
        t = time.perf_counter()
        stats = naive_score(gt, results, iou_type)
        naive[f"score {iou_type}"] = time.perf_counter() - t
        naive_metrics.update({f"{iou_type}/{m}": v for m, v in zip(ev.METRIC_NAMES, stats)})
        log.info("pycocotools %s scored", iou_type)
    del naive_bbox, naive_segm

    t = time.perf_counter()
    backend = ev.resolve_backend(args.backend)  # "auto" runs its one-time self-check here
    ours["backend check"] = time.perf_counter() - t
    our_metrics = {}
    for iou_type in ev.IOU_TYPES:
        t = time.perf_counter()
        our_metrics.update(ev.score_coco(gt, our_results, iou_types=(iou_type,), backend=backend))
        ours[f"score {iou_type}"] = time.perf_counter() - t
    report(naive, ours, naive_metrics, our_metrics, backend, len(our_results))


def report(naive: dict, ours: dict, naive_metrics: dict, our_metrics: dict, backend: str, n: int) -> None:
    naive["total"], ours["total"] = sum(naive.values()), sum(ours.values())
    stages = ["backend check", "convert", "score bbox", "score segm", "total"]
    print(f"\n{n} detections; (b) scored with {backend}")
    print(f"{'stage':<16}{'(a) pycocotools':>18}{'(b) trainer.evaluate':>22}")
    for stage in stages:
        print(f"{stage:<16}{naive.get(stage, 0.0):>17.2f}s{ours.get(stage, 0.0):>21.2f}s")
    print(f"{'metric':<16}{'(a)':>18}{'(b)':>22}")
    for key in naive_metrics:
        print(f"{key:<16}{naive_metrics[key]:>18.4f}{our_metrics[key]:>22.4f}")
    diff = max(abs(naive_metrics[k] - our_metrics[k]) for k in naive_metrics)
    print(f"speed ratio (a)/(b): {naive['total'] / ours['total']:.2f}x; max |AP difference|: {diff:.2e}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    run(parse_args())
