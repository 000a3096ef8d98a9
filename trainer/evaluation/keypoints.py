"""COCO evaluation of the box and keypoint tasks: bbox AP, and keypoint AP (OKS) by pycocotools.

`evaluate_task(model, dataset, ...)` runs a Faster R-CNN or Keypoint R-CNN over a
`trainer.data.keypoints.CocoTaskDataset` (same guarantees as `trainer.evaluation.coco.evaluate`: train/eval
flags and global RNG states are unchanged on return) and scores it: "bbox/AP".."bbox/APl" through
`trainer.evaluation.coco.score_coco`, plus, for keypoints, "keypoints/AP", "keypoints/AP50",
"keypoints/AP75", "keypoints/APm", "keypoints/APl" from `COCOeval(iouType="keypoints")` (its
stats[:5]; COCO keypoint AP has no small-object bucket). The keypoint score of a detection is its
box score, as in torchvision's reference; OKS uses COCO's 17 per-keypoint sigmas.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import time
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from trainer.evaluation.coco import collate_batch, predictions_to_coco, resolve_backend, score_coco
from trainer.evaluation.convert import EvaluationError

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


@contextlib.contextmanager
def preserved_state(net: torch.nn.Module, device: torch.device):
    """Eval mode and forked RNGs inside; every module's train flag and every RNG restored after."""
    modes = [(m, m.training) for m in net.modules()]
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            net.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        random.setstate(py_state)
        np.random.set_state(np_state)


def predict(model: torch.nn.Module, dataset: Any, *, batch_size: int, device: torch.device | str,
            num_workers: int = 0, rank: int = 0, world_size: int = 1) -> tuple[list[dict], list[Any]]:
    """Model outputs (moved to the CPU) and image ids over `dataset`, state-preserving.

    As `trainer.evaluation.coco.evaluate` does: one image per forward pass (GroupNorm never sees batch
    padding, so AP does not depend on `batch_size`, which only sizes the loader's batches), and with
    `world_size` > 1 each rank infers on its slice and rank 0 gets every rank's outputs in rank order
    (the other ranks get empty lists).
    """
    from trainer.data.coco import to_device_float
    from trainer.evaluation.coco import gather_results, shard_bounds

    net = model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                             torch.nn.DataParallel)) else model
    device = torch.device(device)
    lo, hi = shard_bounds(len(dataset), rank, world_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, collate_fn=collate_batch)
    outputs: list[dict] = []
    ids: list[int] = []
    with preserved_state(net, device), torch.inference_mode():
        for images, targets in loader:
            for image in images:
                out = net([to_device_float(image, device)])[0]
                outputs.append({k: v.cpu() for k, v in out.items() if torch.is_tensor(v)})
            ids.extend(t["image_id"] for t in targets)  # as the dataset gives them (VOC: strings)
    if world_size > 1:
        outputs, ids = gather_results(outputs, ids, rank, world_size)
    return outputs, ids


def evaluate_task(model: torch.nn.Module, dataset: Any, *, batch_size: int = 2, device: torch.device | str = "cpu",
                  backend: str = "auto", num_workers: int = 0, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """bbox AP (and keypoint AP for keypoint datasets) of `model` on `dataset` (rank 0 scores; others get {})."""
    resolve_backend(backend)
    started = time.perf_counter()
    outputs, ids = predict(model, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
                           rank=rank, world_size=world_size)
    if rank != 0:
        return {}
    ids = [int(i) for i in ids]
    task = getattr(dataset, "task", "box")
    task_log = log if task == "keypoints" else logging.getLogger("trainer.evaluate_box")  # its own logger
    boxes = predictions_to_coco([{k: v for k, v in o.items() if k in ("boxes", "scores", "labels")} for o in outputs],
                                ids, dataset.label_to_cat)
    task_log.info("inference on %d images: %d detections in %.1fs", len(ids), len(boxes),
                  time.perf_counter() - started)
    metrics = score_coco(dataset.coco, boxes, iou_types=("bbox",), backend=backend, image_ids=ids)
    if task == "keypoints":
        metrics.update(score_keypoints(dataset.coco, keypoint_results(outputs, ids, dataset.label_to_cat), ids))
    return metrics
