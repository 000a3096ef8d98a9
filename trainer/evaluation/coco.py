"""COCO bbox and segm evaluation of a torchvision Mask R-CNN.

This module owns COCO scoring and the COCO evaluator; `trainer.evaluation.convert` owns the
conversion of model outputs to COCO results (`predictions_to_coco`, re-exported here), and
`trainer.evaluation.inference` the inference loop every evaluator runs in:

* `score_coco`: COCO results -> a flat dict of floats ("bbox/AP", ..., "segm/APl") on pycocotools'
  [0, 1] scale, with pycocotools or, when it is installed and agrees with pycocotools on a built-in
  self-check, faster-coco-eval.
* `RunScorer`: the "auto" backend of one training run, verified on the run's own detections: its
  first scoring runs both pycocotools and faster-coco-eval, compares every AP to 1e-4 and logs the
  result; later scorings use faster-coco-eval if they agreed, else pycocotools (with one warning).
* `COCOEvaluator` and `evaluate(model, dataset, ...)`: bbox and segm AP through
  `inference_on_dataset` (one image per forward pass, no side effects on train/eval modes or RNG
  states, sharded over the ranks with rank 0 scoring). A torchvision Mask R-CNN is run under
  `roi_mask_outputs`, so its masks go from the mask head straight to RLE (`paste_masks_rle`)
  instead of through full-image float masks.

Conventions: APs/APm/APl are -1.0 when the split has no ground truth of that size, exactly as
pycocotools reports them (callers that plot should treat negative values as "undefined"). For segm,
results are scored without their "bbox" so pycocotools derives the detection area from the mask, as
Detectron2 and torchvision's references do; small/medium/large then mean mask area.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.data.coco import collate as collate_batch  # noqa: F401 - re-exported (DataLoader workers pickle it)
from trainer.data.coco import to_device_float  # noqa: F401 - re-exported
from trainer.evaluation.convert import EvaluationError, predictions_to_coco, roi_mask_outputs
from trainer.evaluation.inference import DatasetEvaluator, bare_model, evaluate_on
from trainer.evaluation.inference import shard_bounds  # noqa: F401 - re-exported

__all__ = ["EvaluationError", "predictions_to_coco", "score_coco", "resolve_backend", "evaluate", "COCOEvaluator",
           "shard_bounds",
           "to_device_float",
           "faster_coco_eval_verified", "collate_batch", "RunScorer", "IOU_TYPES", "BACKENDS", "METRIC_NAMES"]

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
# Order of COCOeval.stats[:6]; the remaining six entries are recalls, which the sweep does not use.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# faster-coco-eval is only trusted when it reproduces pycocotools to this tolerance.
BACKEND_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- scoring


class RunScorer:
    """The scoring backend of one run, chosen on the run's own detections (not on a synthetic case).

    Passed as `backend` to `score_coco` / `evaluate`. With `requested` "auto" and faster-coco-eval
    installed, the first non-empty scoring runs both backends on the same results and compares every
    AP to `BACKEND_TOLERANCE`: `verdict` records the outcome (agreed, max |difference|, compared
    keys), an INFO line (or one WARNING when they differ) says it, and from then on the run uses
    faster-coco-eval if they agreed, else pycocotools. The metrics of that first scoring are
    pycocotools'. Other `requested` values are used as they are, unchecked.
    """

    def __init__(self, requested: str = "auto"):
        resolve_backend(requested)  # reject unknown / uninstalled choices up front
        self.requested = requested
        self.chosen: str | None = None if requested == "auto" else requested
        self.verdict: dict[str, Any] | None = None
        if requested == "auto" and not _faster_coco_eval_importable():
            self.chosen = "pycocotools"

    def score(self, coco_gt: COCO, results: Sequence[dict], iou_types: Sequence[str],
              image_ids: Sequence[int] | None) -> dict[str, float]:
        if self.chosen is not None or not results:
            return score_coco(coco_gt, results, iou_types, self.chosen or "pycocotools", image_ids)
        reference = score_coco(coco_gt, results, iou_types, "pycocotools", image_ids)
        try:
            fast = score_coco(coco_gt, results, iou_types, "faster_coco_eval", image_ids)
            diff = max(abs(reference[k] - fast[k]) for k in reference)
        except Exception as err:  # any failure of the optional backend means "do not use it"
            fast, diff = {}, float("inf")
            log.warning("faster-coco-eval failed on this run's detections (%s: %s)", type(err).__name__, err)
        agreed = diff <= BACKEND_TOLERANCE
        self.chosen = "faster_coco_eval" if agreed else "pycocotools"
        self.verdict = {"agreed": agreed, "max_abs_diff": diff, "keys": sorted(reference),
                        "detections": len(results)}
        if agreed:
            log.info("scorer check on this run's %d detections: faster-coco-eval matches pycocotools on all %d "
                     "APs (max |diff| %.2e <= %.0e): faster-coco-eval scores the rest of the run",
                     len(results), len(reference), diff, BACKEND_TOLERANCE)
        else:
            worst = max(reference, key=lambda k: abs(reference[k] - fast.get(k, float("inf"))))
            log.warning("scorer check on this run's %d detections: faster-coco-eval differs from pycocotools "
                        "(%s: %s vs %.6f, max |diff| %.2e > %.0e): pycocotools scores this whole run",
                        len(results), worst, fast.get(worst), reference[worst], diff, BACKEND_TOLERANCE)
        return reference


def score_coco(
    coco_gt: COCO,
    results: Sequence[dict],
    iou_types: Sequence[str] = IOU_TYPES,
    backend: "str | RunScorer" = "auto",
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Score COCO results against `coco_gt`: {"bbox/AP": ..., "segm/APl": ...} in [0, 1] (or -1.0).

    Empty `results` give 0.0 for every metric and a warning. `backend` is "pycocotools",
    "faster_coco_eval" or "auto" (faster-coco-eval if importable and verified, else pycocotools).
    `image_ids` restricts scoring to the images that were run (default: every image of `coco_gt`);
    without it, the ground truth of images never shown to the model would count as misses.
    """
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise EvaluationError(f"unknown iou_types {unknown}; choose from {list(IOU_TYPES)}")
    if isinstance(backend, RunScorer):
        return backend.score(coco_gt, results, iou_types, image_ids)
    chosen = resolve_backend(backend)
    if not results:
        log.warning("no detections to score: every %s metric is 0.0", "/".join(iou_types))
        return {f"{t}/{name}": 0.0 for t in iou_types for name in METRIC_NAMES}
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        started = time.perf_counter()
        dets = _results_for(iou_type, results)
        stats = _BACKEND_RUNNERS[chosen](coco_gt, dets, iou_type, image_ids)
        metrics.update({f"{iou_type}/{n}": float(v) for n, v in zip(METRIC_NAMES, stats[:6])})
        log.debug("%s scored with %s in %.3fs", iou_type, chosen, time.perf_counter() - started)
    return metrics


def _results_for(iou_type: str, results: Sequence[dict]) -> list[dict]:
    """Shallow copies shaped for one iou type (loadRes mutates its input, callers keep theirs)."""
    if iou_type == "bbox":
        return [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    missing = sum("segmentation" not in r for r in results)
    if missing:
        raise EvaluationError(f"segm scoring asked for, but {missing} of {len(results)} results "
                              "carry no 'segmentation'")
    # Without "bbox", loadRes takes the area from the mask (see the module docstring).
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results]


def resolve_backend(backend: "str | RunScorer") -> str:
    """Map "auto" to the backend actually used; reject unknown or unusable choices."""
    if isinstance(backend, RunScorer):
        return backend.chosen or "auto (verified at the first scoring)"
    if backend not in BACKENDS:
        raise EvaluationError(f"unknown eval backend {backend!r}; choose from {list(BACKENDS)}")
    if backend == "pycocotools":
        return backend
    if backend == "faster_coco_eval":
        if not _faster_coco_eval_importable():
            raise EvaluationError("eval backend 'faster_coco_eval' asked for, but it is not installed")
        return backend
    return "faster_coco_eval" if faster_coco_eval_verified() else "pycocotools"


@functools.cache
def _faster_coco_eval_importable() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _load_results(coco_gt: Any, results: list[dict]) -> Any:
    try:
        return coco_gt.loadRes(results)
    except AssertionError as err:  # pycocotools asserts on ids absent from the ground truth
        raise EvaluationError(f"results do not fit the ground truth: {err or 'unknown image id'}") from None


def _run_pycocotools(coco_gt: COCO, results: list[dict], iou_type: str,
                     image_ids: Sequence[int] | None = None) -> np.ndarray:
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        coco_dt = _load_results(coco_gt, results)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(set(image_ids))
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    log.debug("pycocotools %s:\n%s", iou_type, chatter.getvalue())
    return np.asarray(coco_eval.stats, dtype=np.float64)


def _run_faster_coco_eval(coco_gt: COCO, results: list[dict], iou_type: str,
                          image_ids: Sequence[int] | None = None) -> np.ndarray:
    from faster_coco_eval import COCO as FastCOCO
    from faster_coco_eval import COCOeval_faster

    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        # Its own COCO class is built from the same dict; pycocotools objects are not accepted
        # by every faster-coco-eval version.
        fast_gt = _fast_gt(coco_gt, FastCOCO)
        coco_dt = _load_results(fast_gt, results)
        coco_eval = COCOeval_faster(fast_gt, coco_dt, iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(set(image_ids))
        # It reports through logging.info by default: route its summary to our debug level.
        coco_eval.print_function = _debug_line
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    log.debug("faster_coco_eval %s:\n%s", iou_type, chatter.getvalue())
    return np.asarray(coco_eval.stats, dtype=np.float64)


def _debug_line(message: Any, *_: Any, **__: Any) -> None:
    log.debug("faster_coco_eval: %s", message)


def _fast_gt(coco_gt: Any, fast_cls: type) -> Any:
    if isinstance(coco_gt, fast_cls):
        return coco_gt
    # Indexed once per COCO object: evaluation runs every few thousand iterations on the same split.
    # Keyed on the dataset dict itself so a COCO whose dataset was replaced is indexed again.
    source, twin = getattr(coco_gt, "_faster_coco_eval_twin", (None, None))
    if source is not coco_gt.dataset:
        twin = fast_cls(coco_gt.dataset)
        coco_gt._faster_coco_eval_twin = (coco_gt.dataset, twin)
    return twin


_BACKEND_RUNNERS: dict[str, Callable[[Any, list[dict], str, Sequence[int] | None], np.ndarray]] = {
    "pycocotools": _run_pycocotools,
    "faster_coco_eval": _run_faster_coco_eval,
}


@functools.cache
def faster_coco_eval_verified() -> bool:
    """True when faster-coco-eval is importable and matches pycocotools on a synthetic check."""
    if not _faster_coco_eval_importable():
        return False
    coco_gt, results = _self_check_case()
    try:
        for iou_type in IOU_TYPES:
            reference = _run_pycocotools(coco_gt, _results_for(iou_type, results), iou_type)[:6]
            fast = _run_faster_coco_eval(coco_gt, _results_for(iou_type, results), iou_type)[:6]
            if not np.allclose(reference, fast, rtol=0.0, atol=BACKEND_TOLERANCE):
                log.warning("faster-coco-eval disagrees with pycocotools on %s (%s vs %s): "
                            "using pycocotools", iou_type, fast.tolist(), reference.tolist())
                return False
    except Exception as err:  # any failure of the optional backend means "do not use it"
        log.warning("faster-coco-eval self-check failed (%s: %s): using pycocotools",
                    type(err).__name__, err)
        return False
    log.debug("faster-coco-eval verified against pycocotools")
    return True


def _self_check_case() -> tuple[COCO, list[dict]]:
    """A small deterministic GT (3 sizes, 2 categories, a crowd) and imperfect detections."""
    rng = np.random.default_rng(0)
    images, anns, results = [], [], []
    for image_id in range(1, 7):
        images.append({"id": image_id, "height": 128, "width": 128})
        for k, side in enumerate((12, 40, 110)):
            x, y = float(rng.integers(0, 128 - side)), float(rng.integers(0, 128 - side))
            poly = [x, y, x + side, y, x + side, y + side, x, y + side]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 3 + 4 * (k % 2),
                         "bbox": [x, y, side, side], "area": float(side * side),
                         "segmentation": [poly], "iscrowd": int(image_id == 3 and k == 0)})
            shift = float(rng.integers(0, side // 3 + 1))
            dpoly = [v + shift for v in poly]
            results.append({"image_id": image_id, "category_id": anns[-1]["category_id"],
                            "bbox": [x + shift, y + shift, side, side],
                            "segmentation": mask_util.merge(mask_util.frPyObjects([dpoly], 128, 128)),
                            "score": float(rng.random())})
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": anns,
                       "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    return coco_gt, results


# ----------------------------------------------------------------------------- inference


class COCOEvaluator(DatasetEvaluator):
    """bbox and segm AP of a Mask R-CNN's outputs against `dataset.coco` (see `score_coco`).

    Outputs are converted to COCO results batch by batch, so masks never pile up on the device; only
    the images that were run count (a dataset may hold a subset of its COCO split)."""

    def __init__(self, dataset: Any, backend: "str | RunScorer" = "auto", rank: int = 0, world_size: int = 1):
        super().__init__(rank, world_size)
        for attr in ("coco", "label_to_cat"):
            if not hasattr(dataset, attr):
                raise EvaluationError(f"evaluation dataset has no '{attr}' attribute")
        resolve_backend(backend)  # fail on a bad backend before spending minutes on inference
        self.coco, self.label_to_cat, self.backend = dataset.coco, dataset.label_to_cat, backend
        self.results: list[dict] = []
        self.image_ids: list[int] = []

    def reset(self) -> None:
        super().reset()
        self.results, self.image_ids = [], []

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        image_ids = [int(target["image_id"]) for target in inputs]
        self.results.extend(predictions_to_coco(outputs, image_ids, self.label_to_cat))
        self.image_ids.extend(image_ids)

    def evaluate(self) -> dict[str, float]:
        log.info("inference on %d images (rank %d of %d): %d detections in %.1fs", len(self.image_ids),
                 self.rank, self.world_size, len(self.results), time.perf_counter() - self.started)
        results, image_ids = self.gather(self.results, self.image_ids)
        if self.rank != 0:
            return {}
        return score_coco(self.coco, results, backend=self.backend, image_ids=image_ids)


def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    backend: "str | RunScorer" = "auto",
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Run `model` over `dataset` and score it against `dataset.coco` (see `score_coco`).

    With `world_size` > 1 (an initialised process group), every rank calls this with the same
    dataset; each infers on its slice and only rank 0 scores and returns metrics. The model's
    per-module train/eval flags and the global RNG states are exactly as before on return, also
    when inference raises (`trainer.evaluation.inference`).
    """
    evaluator = COCOEvaluator(dataset, backend, rank, world_size)
    with roi_mask_outputs(bare_model(model)):  # masks straight from the mask head to RLE
        return evaluate_on(model, dataset, evaluator, batch_size=batch_size, device=device, num_workers=num_workers)
