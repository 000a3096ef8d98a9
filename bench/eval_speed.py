"""Benchmark: evaluation at COCO's image size, like for like, three ratios measured side by side.

On a synthetic COCO split at 480x640 (COCO val2017's most common size; `--hw` for another), with the
Mask R-CNN outputs inference ends with (boxes, labels, scores, the mask head's 28x28 probabilities;
generated, not timed), one run measures, each as (plain path) / (ours) over `--repeats` alternating
repeats (median and min-max, wall and process-CPU time):

  (a) conversion: torchvision's `paste_masks_in_image` into full-image masks (the model's own
      postprocess), threshold, `mask_util.encode` per detection (torchvision's detection references)
      vs `trainer.evaluation.coco.predictions_to_coco` straight from the 28x28 masks to RLE;
  (b) scoring the same detections (ours from (a)), bbox + segm: pycocotools' COCOeval vs
      faster-coco-eval (its copy of the ground truth is rebuilt every repeat, as a run builds it once);
  (c) end to end on `--e2e-images` images: an R18-FPN GN Mask R-CNN at the images' own size (random
      init, score threshold 0 so every image has 100 detections, as a trained model on COCO has; its AP
      is ~0, so (c)'s AP check only shows both paths agree) run image by image with `--threads`,
      torchvision's postprocess + (a)'s conversion + pycocotools vs `trainer.evaluation.coco.evaluate`
      (`roi_mask_outputs`, `predictions_to_coco`, faster-coco-eval).

AP equality is printed for each pair (the conversions give byte-identical RLEs; the scorers agree to
1e-4). Usage:

    python bench/eval_speed.py                  # 100 images x 100 dets (a, b); 6 images (c); 3 repeats
    python bench/eval_speed.py --quick          # smoke run: 8 small images, 2 in (c), 1 repeat
    python bench/eval_speed.py --memory --hw 480 640 --images 5000   # rank 0's peak RSS of our evaluation
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
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
from trainer.evaluation import coco as ev  # noqa: E402

log = logging.getLogger("bench.eval_speed")
CAT_IDS = [1, 3, 4, 7, 9, 13, 18, 22, 27, 31, 35, 40, 44, 52, 57, 61, 67, 75, 82, 90]  # sparse, as COCO
LABEL_TO_CAT = {label: cat for label, cat in enumerate(CAT_IDS, start=1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="images for (a) and (b)")
    parser.add_argument("--e2e-images", type=int, default=6, help="images for (c), the end-to-end pair")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--objects", type=int, default=7, help="mean GT objects per image")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--hw", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--memory", action="store_true",
                        help="only our path, in this process: peak RSS of rank 0's evaluation (results + scoring)")
    parser.add_argument("--backend", default="auto", choices=ev.BACKENDS, help="for --memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 images of 240x320, 2 in (c), 1 repeat")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1, as evaluation runs inside a 1-thread trial)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.e2e_images, args.repeats, args.hw = 8, 2, 1, (240, 320)
    args.height, args.width = args.hw
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


def naive_score(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int] | None = None) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):  # a user script would print this; we time it only
        coco_eval = COCOeval(gt, gt.loadRes(results), iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats[:6]]


class Timer:
    """Wall-clock and process-CPU seconds of one block (CPU time is what a side costs when other
    jobs share the cores; wall time is what a user waits on a quiet machine)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    @contextlib.contextmanager
    def __call__(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu


def naive_convert_all(outputs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(a)'s plain side: paste every image's masks into full-image floats, then encode one by one."""
    bbox, segm = [], []
    for image_id, output in enumerate(outputs, start=1):
        masks = paste_masks_in_image(output["roi_masks"], output["boxes"], output["image_size"])
        b, s = naive_convert({**output, "masks": masks}, image_id)
        bbox += b
        segm += s
    return bbox, segm


def our_convert_all(outputs: list[dict]) -> list[dict]:
    return ev.predictions_to_coco(outputs, list(range(1, len(outputs) + 1)), LABEL_TO_CAT)


def pair(name: str, plain, ours, repeats: int) -> dict:
    """Run plain() and ours() `repeats` times, alternating which goes first; per-repeat timers."""
    rows = []
    for k in range(repeats):
        timers, answers = {"plain": Timer(), "ours": Timer()}, {}
        for side in ("plain", "ours") if k % 2 == 0 else ("ours", "plain"):
            with timers[side]():
                answers[side] = (plain if side == "plain" else ours)()
        rows.append(timers)
        log.info("%s repeat %d/%d: plain %.1fs, ours %.1fs wall", name, k + 1, repeats,
                 timers["plain"].wall, timers["ours"].wall)
    return {"name": name, "rows": rows, "answers": answers}


def scoring_pair(gt: COCO, results: list[dict], repeats: int) -> dict:
    def fast():
        gt.__dict__.pop("_faster_coco_eval_twin", None)  # its ground-truth index is built in every repeat
        return ev.score_coco(gt, results, backend="faster_coco_eval")

    return pair("(b) scoring", lambda: ev.score_coco(gt, results, backend="pycocotools"), fast, repeats)


class SyntheticSplit(torch.utils.data.Dataset):
    """(c)'s images: the GT ellipses filled with a per-category grey level over noise, as uint8 CHW."""

    def __init__(self, gt: COCO, ids: list[int], seed: int):
        self.coco, self.ids, self.label_to_cat = gt, ids, LABEL_TO_CAT
        rng = np.random.default_rng(seed)
        self.images = []
        for image_id in ids:
            info = gt.imgs[image_id]
            image = rng.integers(0, 60, (info["height"], info["width"], 3), dtype=np.uint8)
            for ann in gt.imgToAnns[image_id]:
                image[gt.annToMask(ann).astype(bool)] = 40 + 9 * CAT_IDS.index(ann["category_id"])
            self.images.append(torch.from_numpy(image).permute(2, 0, 1).contiguous())

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.images[index], {"image_id": self.ids[index]}


def e2e_model(height: int, width: int) -> torch.nn.Module:
    from trainer.config import ModelConfig
    from trainer.modeling.model import build_model

    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(backbone="R18", norm="GN", min_size=min(height, width),
                                           max_size=max(height, width)),
                           num_classes=len(CAT_IDS) + 1)
    model.roi_heads.score_thresh = 0.0  # 100 detections per image, as a trained model has on COCO
    return model.eval()


def e2e_pair(gt: COCO, args: argparse.Namespace) -> dict:
    dataset = SyntheticSplit(gt, list(range(1, args.e2e_images + 1)), args.seed)
    model = e2e_model(args.height, args.width)  # the images' own size: no resizing

    def plain():
        bbox, segm = [], []
        with torch.inference_mode():
            for image, target in dataset:
                output = model([image.float() / 255])[0]  # torchvision postprocess: full-image masks
                b, s = naive_convert(output, target["image_id"])
                bbox += b
                segm += s
        return {**naive_metrics(gt, bbox, "bbox", dataset.ids), **naive_metrics(gt, segm, "segm", dataset.ids)}

    def ours():
        return ev.evaluate(model, dataset, batch_size=1, backend="faster_coco_eval")

    return pair("(c) end to end", plain, ours, args.repeats)


def naive_metrics(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int] | None = None) -> dict:
    stats = naive_score(gt, results, iou_type, image_ids)
    return {f"{iou_type}/{m}": v for m, v in zip(ev.METRIC_NAMES, stats)}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    gt = build_gt(args, rng)
    outputs = [fake_outputs(gt, image_id, args, rng) for image_id in range(1, args.images + 1)]
    log.info("GT: %d images of %dx%d, %d objects; %d detections (%.1fs, untimed)", args.images, args.height,
             args.width, len(gt.anns), sum(len(o["scores"]) for o in outputs), time.perf_counter() - t0)
    ev.resolve_backend("faster_coco_eval")  # the bench compares against it: it must be installed
    conv = pair("(a) conversion", lambda: naive_convert_all(outputs), lambda: our_convert_all(outputs), args.repeats)
    (naive_bbox, naive_segm), our_results = conv["answers"]["plain"], conv["answers"]["ours"]
    identical = [r["segmentation"] for r in our_results] == [r["segmentation"] for r in naive_segm]
    conv["check"] = (f"segm RLEs byte-identical: {identical}; bbox AP / segm AP by pycocotools, plain vs ours: "
                     + _ap_diff({**naive_metrics(gt, naive_bbox, "bbox"), **naive_metrics(gt, naive_segm, "segm")},
                                ev.score_coco(gt, our_results, backend="pycocotools")))
    del naive_bbox, naive_segm
    score = scoring_pair(gt, our_results, args.repeats)
    score["check"] = "pycocotools vs faster-coco-eval: " + _ap_diff(score["answers"]["plain"], score["answers"]["ours"])
    e2e = e2e_pair(gt, args)
    e2e["check"] = "pycocotools path vs ours: " + _ap_diff(e2e["answers"]["plain"], e2e["answers"]["ours"])
    print(f"\n{args.images} images of {args.height}x{args.width}, {len(our_results)} detections in (a)/(b); "
          f"{args.e2e_images} images in (c); {args.repeats} repeats; torch threads {args.threads}")
    report([conv, score, e2e])


def _ap_diff(a: dict, b: dict) -> str:
    diff = max(abs(a[k] - b[k]) for k in a)
    return f"bbox/AP {a['bbox/AP']:.4f} vs {b['bbox/AP']:.4f}, segm/AP {a['segm/AP']:.4f} vs " \
           f"{b['segm/AP']:.4f}; max |AP difference| over 12 APs {diff:.1e}"


def report(pairs: list[dict]) -> None:
    print(f"{'pair':<16}{'plain wall s':>14}{'ours wall s':>13}{'ratio wall (min-max)':>26}"
          f"{'ratio cpu (min-max)':>26}")
    for p in pairs:
        cells = []
        for unit in ("wall", "cpu"):
            ratios = [getattr(r["plain"], unit) / max(getattr(r["ours"], unit), 1e-9) for r in p["rows"]]
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        plain = statistics.median(r["plain"].wall for r in p["rows"])
        ours = statistics.median(r["ours"].wall for r in p["rows"])
        print(f"{p['name']:<16}{plain:>14.2f}{ours:>13.2f}{cells[0]:>26}{cells[1]:>26}")
    for p in pairs:
        print(f"{p['name']}: {p['check']}")


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


def main(argv: list[str] | None = None) -> int:
    arguments = parse_args(argv)
    run_memory(arguments) if arguments.memory else run(arguments)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    sys.exit(main())
