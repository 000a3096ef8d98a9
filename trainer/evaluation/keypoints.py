"""COCO evaluation of the box and keypoint detectors: bbox AP, and keypoint AP (OKS) by pycocotools.

`evaluate_box_keypoints(model, dataset, ...)` runs a Faster R-CNN or Keypoint R-CNN
(`BoxKeypointEvaluator` in the one inference loop of `trainer.evaluation.inference`) over a
`trainer.data.keypoints.CocoBoxKeypointDataset` (same guarantees as `trainer.evaluation.coco.evaluate`:
train/eval flags and global RNG states are unchanged on return) and scores it: "bbox/AP".."bbox/APl" through
`trainer.evaluation.coco.score_coco`, plus, for keypoints, "keypoints/AP", "keypoints/AP50",
"keypoints/AP75", "keypoints/APm", "keypoints/APl" from `COCOeval(iouType="keypoints")` (its
stats[:5]; COCO keypoint AP has no small-object bucket). The keypoint score of a detection is its
box score, as in torchvision's reference; OKS uses COCO's 17 per-keypoint sigmas.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import Any, Sequence

import torch
from pycocotools.cocoeval import COCOeval

from trainer.evaluation.coco import predictions_to_coco, resolve_backend, score_coco
from trainer.evaluation.convert import EvaluationError
from trainer.evaluation.inference import OutputsEvaluator, evaluate_on

log = logging.getLogger(__name__)

KEYPOINT_METRICS = ("AP", "AP50", "AP75", "APm", "APl")  # COCOeval keypoint stats[:5]


def keypoint_results(outputs: Sequence[dict], image_ids: Sequence[int], label_to_cat: dict[int, int]) -> list[dict]:
    """Keypoint R-CNN eval outputs -> COCO keypoint results (flat [x, y, 1] * K, box score)."""
    results = []
    for output, image_id in zip(outputs, image_ids):
        kps = output["keypoints"].detach().cpu().float().clone()
        kps[..., 2] = 1.0
        for row, score, label in zip(kps.flatten(1).tolist(), output["scores"].tolist(), output["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label_to_cat[int(label)]),
                            "keypoints": [round(v, 2) for v in row], "score": float(score)})
    return results


def score_keypoints(coco_gt: Any, results: Sequence[dict], image_ids: Sequence[int] | None = None
                    ) -> dict[str, float]:
    """{"keypoints/AP": ..., "keypoints/APl": ...} on pycocotools' [0, 1] scale (-1.0: no such GT)."""
    if not results:
        log.warning("no keypoint detections to score: every keypoints metric is 0.0")
        return {f"keypoints/{n}": 0.0 for n in KEYPOINT_METRICS}
    k = len(results[0]["keypoints"]) // 3
    if k != 17:
        raise EvaluationError(f"COCO keypoint AP needs COCO's 17 keypoints (OKS sigmas), results have {k}")
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        try:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        except AssertionError as err:
            raise EvaluationError(f"keypoint results do not fit the ground truth: {err or 'unknown image id'}") from None
        ev = COCOeval(coco_gt, coco_dt, "keypoints")
        if image_ids is not None:
            ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.debug("pycocotools keypoints:\n%s", chatter.getvalue())
    return {f"keypoints/{n}": float(v) for n, v in zip(KEYPOINT_METRICS, ev.stats[:5])}


class BoxKeypointEvaluator(OutputsEvaluator):
    """bbox AP, and for a keypoint dataset keypoint AP, of a Faster / Keypoint R-CNN's outputs."""

    def __init__(self, dataset: Any, backend: str = "auto", rank: int = 0, world_size: int = 1):
        super().__init__(rank, world_size)
        resolve_backend(backend)  # fail on a bad backend before spending minutes on inference
        self.dataset, self.backend = dataset, backend
        self.detector = getattr(dataset, "detector", "box")  # "box" or "keypoints"
        # the box detector logs under its own name
        self.log = log if self.detector == "keypoints" else logging.getLogger("trainer.evaluation.box")

    def score(self, outputs: list[dict], image_ids: list[Any]) -> dict[str, float]:
        ids = [int(i) for i in image_ids]
        coco, label_to_cat = self.dataset.coco, self.dataset.label_to_cat
        boxes = predictions_to_coco([{k: v for k, v in o.items() if k in ("boxes", "scores", "labels")}
                                     for o in outputs], ids, label_to_cat)
        self.log.info("inference on %d images: %d detections in %.1fs", len(ids), len(boxes),
                      time.perf_counter() - self.started)
        metrics = score_coco(coco, boxes, iou_types=("bbox",), backend=self.backend, image_ids=ids)
        if self.detector == "keypoints":
            metrics.update(score_keypoints(coco, keypoint_results(outputs, ids, label_to_cat), ids))
        return metrics


def evaluate_box_keypoints(model: torch.nn.Module, dataset: Any, *, batch_size: int = 2,
                           device: torch.device | str = "cpu", backend: str = "auto", num_workers: int = 0,
                           rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """bbox AP (and keypoint AP for keypoint datasets) of `model` on `dataset` (rank 0 scores; others get {})."""
    evaluator = BoxKeypointEvaluator(dataset, backend, rank, world_size)
    return evaluate_on(model, dataset, evaluator, batch_size=batch_size, device=device, num_workers=num_workers)
