"""Mask R-CNN eval outputs -> COCO result dicts (bbox in xywh, masks as compressed RLE).

This module owns the conversion half of evaluation, the part that dominates its cost at COCO scale:

* `predictions_to_coco`: per image, one threshold, one RLE pass and one `.tolist()` per field.
  An output carries either full-image `masks` [N,1,H,W] (what a torchvision Mask R-CNN returns)
  or, faster, the mask head's `roi_masks` [N,1,M,M] plus `image_size` (H, W).
* `roi_mask_outputs`: a context manager under which a torchvision Mask R-CNN returns `roi_masks`
  instead of pasting every mask into a full-image float tensor.
* `paste_masks_rle`: pastes `roi_masks` straight into RLE. It calls torchvision's own box
  expansion, padding and `F.interpolate` on each mask, exactly as `paste_masks_in_image` does, so
  every pixel that can be set is computed by the same op on the same input. The mask is cut to its
  box, thresholded there, and run-length encoded from the box's columns. No float mask the size of
  the image is ever allocated. The result is the same RLE that `pycocotools.mask.encode` gives for
  torchvision's pasted mask (tested to the byte). The one exception is a box lying wholly outside
  the image, where torchvision's negative slice bounds wrap around; here it gives an empty mask.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from trainer.errors import TrainerError

# A bilinear sample is a convex combination of its four inputs, give or take a few float32 ulps
# (~1e-7 relative). So a mask whose largest input sits below threshold * (1 - margin) pastes to
# all zeros, and we skip interpolating it. That is the only exact way to threshold before
# upsampling.
_EMPTY_MARGIN = 1e-5


class EvaluationError(TrainerError, ValueError):
    """Predictions, ground truth or options that cannot be scored (unknown label, wrong image id)."""


def predictions_to_coco(
    outputs: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_cat: Mapping[int, int],
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Convert Mask R-CNN eval outputs to COCO result dicts.

    Each output holds `boxes` [N,4] xyxy in original image coordinates, `labels` [N] (contiguous
    1..K), `scores` [N] and optionally either `masks` [N,1,H,W] probabilities or `roi_masks`
    [N,1,M,M] plus `image_size` (see `roi_mask_outputs`). Without either, the results carry no
    "segmentation" (bbox-only scoring).
    """
    if len(outputs) != len(image_ids):
        raise EvaluationError(f"{len(outputs)} model outputs for {len(image_ids)} image ids")
    if not 0.0 <= mask_threshold < 1.0:  # below 0 the area outside a box would count as mask
        raise EvaluationError(f"mask_threshold must lie in [0, 1), got {mask_threshold}")
    results: list[dict] = []
    for output, image_id in zip(outputs, image_ids):
        results.extend(_image_to_coco(output, int(image_id), label_to_cat, mask_threshold))
    return results


def _image_to_coco(
    output: Mapping[str, Any], image_id: int, label_to_cat: Mapping[int, int], threshold: float
) -> list[dict]:
    boxes = output["boxes"].detach()
    if boxes.numel() == 0:
        return []
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1).float().cpu().tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    try:
        categories = [label_to_cat[label] for label in output["labels"].detach().cpu().tolist()]
    except KeyError as err:
        raise EvaluationError(
            f"image {image_id}: model predicted label {err.args[0]}, not in label_to_cat "
            f"(known labels {sorted(label_to_cat)})"
        ) from None
    if not len(xywh) == len(scores) == len(categories):
        raise EvaluationError(f"image {image_id}: {len(xywh)} boxes, {len(scores)} scores and "
                              f"{len(categories)} labels")
    results = [
        {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}
        for cat, box, score in zip(categories, xywh, scores)
    ]
    rles = _output_rles(output, boxes, image_id, threshold)
    if rles is not None:
        for result, rle in zip(results, rles):
            result["segmentation"] = rle
    return results


def _output_rles(output: Mapping[str, Any], boxes: torch.Tensor, image_id: int,
                 threshold: float) -> list[dict] | None:
    if "masks" in output and "roi_masks" in output:
        raise EvaluationError(f"image {image_id}: output has both 'masks' and 'roi_masks'")
    key = "masks" if "masks" in output else "roi_masks" if "roi_masks" in output else None
    if key is None:
        return None
    masks = output[key].detach()
    square = key == "masks" or masks.shape[-1] == masks.shape[-2]
    if masks.dim() != 4 or masks.shape[:2] != (len(boxes), 1) or not square:
        expected = "[N,1,H,W]" if key == "masks" else "[N,1,M,M]"
        raise EvaluationError(f"image {image_id}: {key} of shape {tuple(masks.shape)} for "
                              f"{len(boxes)} boxes; expected {expected}")
    if key == "masks":
        return _encode_masks(masks, threshold)
    if "image_size" not in output:
        raise EvaluationError(f"image {image_id}: 'roi_masks' without 'image_size'")
    height, width = (int(v) for v in output["image_size"])
    return paste_masks_rle(masks, boxes, (height, width), threshold)


# ----------------------------------------------------------------------------- full-image masks


def _encode_masks(masks: torch.Tensor, threshold: float) -> list[dict]:
    """RLE-encode [N,1,H,W] probabilities in one pycocotools call; counts become str (JSON-able)."""
    probs = masks.detach()[:, 0]
    if probs.device.type == "cpu" and probs.dtype != torch.bfloat16:  # numpy has no bfloat16
        binary = _threshold_numpy(probs, threshold)
    else:
        binary = _threshold_torch(probs, threshold)
    return _ascii(mask_util.encode(binary))


def _ascii(rles: list[dict]) -> list[dict]:
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


# encode wants a Fortran-ordered uint8 [H,W,N]: every mask gets transposed, whoever does it.


def _threshold_numpy(probs: torch.Tensor, threshold: float) -> np.ndarray:
    # Thresholds straight into that layout in one pass; torch's CPU compare plus a transposing
    # copy measured ~3x slower on 100 x 256x256 masks.
    return np.greater(probs.numpy().transpose(1, 2, 0), threshold, order="F").view(np.uint8)


def _threshold_torch(probs: torch.Tensor, threshold: float) -> np.ndarray:
    # On an accelerator threshold and transpose are nearly free, and uint8 moves 4x less than
    # float; a C-ordered [N,W,H] is a Fortran-ordered [H,W,N], so `.T` costs nothing.
    return probs.gt(threshold).transpose(1, 2).contiguous().to(torch.uint8).cpu().numpy().T


# ----------------------------------------------------------------------------- ROI masks


@contextlib.contextmanager
def roi_mask_outputs(model: torch.nn.Module) -> Iterator[bool]:
    """While active, a torchvision Mask R-CNN's eval outputs carry `roi_masks` + `image_size`.

    The model's own postprocess still runs (boxes are resized to the original image exactly as
    usual). Only the masks are taken out before it and put back unpasted afterwards. Yields False
    and changes nothing for models without a `GeneralizedRCNNTransform` (they paste their own).
    """
    transform = getattr(model, "transform", None)
    if not isinstance(transform, GeneralizedRCNNTransform):
        yield False
        return
    original = transform.postprocess
    shadowed = "postprocess" in vars(transform)

    def postprocess(result: list[dict], image_shapes: list, original_sizes: list) -> list[dict]:
        held = [pred.pop("masks", None) for pred in result]
        result = original(result, image_shapes, original_sizes)
        for pred, masks, size in zip(result, held, original_sizes):
            if masks is not None:
                pred["roi_masks"], pred["image_size"] = masks, (int(size[0]), int(size[1]))
        return result

    transform.postprocess = postprocess  # an instance attribute shadows the method
    try:
        yield True
    finally:
        if shadowed:
            transform.postprocess = original
        else:
            del transform.postprocess


def paste_masks_rle(roi_masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                    threshold: float = 0.5) -> list[dict]:
    """RLE of `paste_masks_in_image(roi_masks, boxes, image_size)[:, 0] > threshold`, per mask.

    `roi_masks` [N,1,M,M] are probabilities and `boxes` [N,4] are xyxy in the image's pixels,
    both on any device. The interpolation runs there and one boolean buffer comes back.
    """
    height, width = image_size
    if len(roi_masks) == 0:
        return []
    padded, scale = expand_masks(roi_masks, padding=1)
    int_boxes = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()
    peaks = _peaks(padded, threshold)
    crops, geometry = [], []
    for k, (bx0, by0, bx1, by1) in enumerate(int_boxes):
        # The same box arithmetic as torchvision's paste_mask_in_image.
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, width), max(by0, 0), min(by1 + 1, height)
        if x1 <= x0 or y1 <= y0 or (peaks is not None and peaks[k]):
            geometry.append((0, 0, 0, 0))
            continue
        mask = F.interpolate(padded[k:k + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        # Column-major pixels, as COCO's RLE counts them.
        crops.append(mask[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0].t().flatten())
        geometry.append((y0, x0, y1 - y0, x1 - x0))
    bits = torch.cat(crops).gt(threshold).cpu().numpy() if crops else np.zeros(0, bool)
    return _ascii(mask_util.frPyObjects(_runs(bits, geometry, height, width), height, width))


def _peaks(padded: torch.Tensor, threshold: float) -> list[bool] | None:
    """Per mask: provably all below threshold once pasted (see _EMPTY_MARGIN); None to skip."""
    if padded.dtype not in (torch.float32, torch.float64) or threshold <= 0 or len(padded) == 0:
        return None
    return (padded.amax(dim=(1, 2, 3)) < threshold * (1 - _EMPTY_MARGIN)).tolist()


def _runs(bits: np.ndarray, geometry: list[tuple[int, int, int, int]], height: int,
          width: int) -> list[dict]:
    """Uncompressed RLEs of masks that are zero outside their crops.

    `bits` holds each crop's pixels column by column; `geometry` gives each mask's (y0, x0, crop
    height, crop width), with 0 x 0 for an empty mask. A run starts where a pixel is set and its
    predecessor in the crop column is not, and ends after a set pixel whose successor is not.
    Positions are column-major indices into the whole image.
    """
    area = height * width
    geo = np.asarray(geometry, dtype=np.int64).reshape(-1, 4)
    col_heights = np.repeat(geo[:, 2], geo[:, 3])
    col_mask = np.repeat(np.arange(len(geo)), geo[:, 3])
    col_index = np.arange(len(col_mask)) - np.repeat(np.cumsum(geo[:, 3]) - geo[:, 3], geo[:, 3])
    col_base = (geo[col_mask, 1] + col_index) * height + geo[col_mask, 0]
    col_start = np.cumsum(col_heights) - col_heights
    prev, succ = np.zeros_like(bits), np.zeros_like(bits)
    prev[1:], succ[:-1] = bits[:-1], bits[1:]
    prev[col_start] = False
    succ[col_start + col_heights - 1] = False
    starts, ends = np.flatnonzero(bits & ~prev), np.flatnonzero(bits & ~succ)
    positions = np.concatenate([_positions(starts, col_start, col_base, col_mask, area),
                                _positions(ends, col_start, col_base, col_mask, area) + 1])
    positions.sort()
    # A crop as tall as the image continues a run from one column into the next: the end of
    # one and the start of the other fall on the same position and cancel.
    same = positions[1:] == positions[:-1]
    if same.any():
        keep = np.ones(len(positions), bool)
        keep[:-1] &= ~same
        keep[1:] &= ~same
        positions = positions[keep]
    # One sentinel per mask at the image's end turns "positions" into every run's end.
    ends_of = np.arange(len(geo)) * (area + 1) + area
    owner, positions = np.divmod(np.sort(np.concatenate([positions, ends_of])), area + 1)
    first = np.ones(len(owner), bool)
    first[1:] = owner[1:] != owner[:-1]
    counts = positions - np.where(first, 0, np.roll(positions, 1))
    # A run that reaches the last pixel leaves a zero-length final run behind it: drop it.
    last = np.append(first[1:], True)
    drop = last & (counts == 0) & ~first
    if drop.any():
        counts, owner = counts[~drop], owner[~drop]
    pieces = np.split(counts, np.flatnonzero(owner[1:] != owner[:-1]) + 1)
    return [{"size": [height, width], "counts": piece} for piece in pieces]


def _positions(index: np.ndarray, col_start: np.ndarray, col_base: np.ndarray,
               col_mask: np.ndarray, area: int) -> np.ndarray:
    """Bit indices -> mask * (area + 1) + column-major position, so one sort orders both."""
    col = np.searchsorted(col_start, index, side="right") - 1
    return col_mask[col] * (area + 1) + col_base[col] + (index - col_start[col])
