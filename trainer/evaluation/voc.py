"""Pascal VOC detection scoring: per-class AP at IoU 0.5 and their mean, difficult objects ignored.

The VOC devkit's rule (and Detectron's `voc_eval`): per class, detections sorted by score are
matched greedily to the ground-truth box of their image they overlap most; overlap > 0.5 with a
not yet matched box is a true positive, with a `difficult` box neither true nor false positive, and
anything else (a second hit, or overlap <= 0.5) a false positive; recall counts non-difficult boxes
only. AP is the VOC2007 11-point interpolated precision ("voc/mAP", the metric the paper reports for
VOC07 test) or the area under the monotone precision envelope (VOC2010+, "voc/mAP_area"). Boxes are
in continuous coordinates (trainer.data.voc), which gives the devkit's "+1" pixel areas exactly. The
mean runs over classes with at least one non-difficult box in the evaluated images.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from trainer.evaluation.inference import OutputsEvaluator, evaluate_on

log = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from a recall/precision curve: 11-point (VOC2007) or area under the precision envelope."""
    if use_07_metric:
        points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.arange(0.0, 1.1, 0.1)]
        return float(np.sum(points) / 11.0)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _iou(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(gts[:, 2], box[2]) - np.maximum(gts[:, 0], box[0]), 0, None)
    ih = np.clip(np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 1], box[1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1]) - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def class_pr(detections: Sequence[tuple[Any, float, Sequence[float]]], ground_truth: Mapping[Any, dict]
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """(recall, precision, number of non-difficult boxes) of one class.

    `detections`: (image id, score, box xyxy); `ground_truth`: image id -> {"boxes" [N,4],
    "difficult" [N] bool} of this class, for every evaluated image."""
    npos = int(sum((~np.asarray(g["difficult"], bool)).sum() for g in ground_truth.values()))
    used = {k: np.zeros(len(g["boxes"]), bool) for k, g in ground_truth.items()}
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])  # stable: ties keep input order
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, i in enumerate(order):
        image_id, _, box = detections[i]
        gt = ground_truth.get(image_id)
        if gt is None or len(gt["boxes"]) == 0:
            fp[rank] = 1
            continue
        overlaps = _iou(np.asarray(box, np.float64), np.asarray(gt["boxes"], np.float64))
        j = int(np.argmax(overlaps))
        if overlaps[j] > IOU_THRESHOLD:
            if gt["difficult"][j]:
                continue  # neither true nor false positive
            if not used[image_id][j]:
                tp[rank], used[image_id][j] = 1, True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / max(npos, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision, npos


def score_voc(detections: Sequence[dict], records: Mapping[Any, dict], classes: Sequence[str]) -> dict[str, float]:
    """{"voc/mAP": 11-point mean AP, "voc/mAP_area": area mean AP} in [0, 1].

    `detections`: {"image_id", "label" (1-based), "score", "box"}; `records`: image id -> {"boxes",
    "labels", "difficult"} (trainer.data.voc) of every evaluated image."""
    aps07, aps = [], []
    for label, name in enumerate(classes, start=1):
        gt = {k: {"boxes": r["boxes"][r["labels"] == label], "difficult": r["difficult"][r["labels"] == label]}
              for k, r in records.items()}
        dets = [(d["image_id"], d["score"], d["box"]) for d in detections if d["label"] == label]
        recall, precision, npos = class_pr(dets, gt)
        if npos == 0:
            log.debug("VOC class %s has no non-difficult box in these images: left out of the mean", name)
            continue
        aps07.append(voc_ap(recall, precision, True))
        aps.append(voc_ap(recall, precision, False))
    if not aps:
        log.warning("no class has a non-difficult box in the evaluated images: VOC mAP is 0.0")
        return {"voc/mAP": 0.0, "voc/mAP_area": 0.0}
    return {"voc/mAP": float(np.mean(aps07)), "voc/mAP_area": float(np.mean(aps))}


class VOCEvaluator(OutputsEvaluator):
    """VOC07 11-point mAP@0.5 (and the area mAP) of a Faster R-CNN's outputs on a VOC split."""

    def __init__(self, dataset: Any, rank: int = 0, world_size: int = 1):
        super().__init__(rank, world_size)
        self.dataset = dataset

    def score(self, outputs: list[dict], image_ids: list[Any]) -> dict[str, float]:
        dets = [{"image_id": i, "label": int(lab), "score": float(s), "box": b}
                for o, i in zip(outputs, image_ids)
                for b, s, lab in zip(o["boxes"].tolist(), o["scores"].tolist(), o["labels"].tolist())]
        log.info("inference on %d images: %d detections in %.1fs", len(image_ids), len(dets),
                 time.perf_counter() - self.started)
        return score_voc(dets, {i: self.dataset.records[i] for i in image_ids}, self.dataset.classes)


def evaluate_voc(model: torch.nn.Module, dataset: Any, *, batch_size: int = 2, device: torch.device | str = "cpu",
                 backend: str = "auto", num_workers: int = 0, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Run `model` over a trainer.data.voc.VocDetection split and score it (`backend` is COCO's; unused).
    Sharded over the ranks (`trainer.evaluation.inference`); rank 0 scores, the others get {}."""
    evaluator = VOCEvaluator(dataset, rank, world_size)
    return evaluate_on(model, dataset, evaluator, batch_size=batch_size, device=device, num_workers=num_workers)
