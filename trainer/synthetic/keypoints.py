"""Synthetic COCO person keypoints: articulated stick figures with COCO's 17 keypoints, seeded.

Writes OUT/annotations/person_keypoints_{train,val}.json and OUT/{train,val}/<12-digit id>.png in
COCO's keypoint format: one category "person" (id 1) with COCO's keypoint names and skeleton; each
figure an annotation with `keypoints` [x, y, v] * 17, `num_keypoints`, `bbox`/`area`/RLE
`segmentation` of its visible part. Figures face the camera (the person's left is on the image's
right, as in COCO's front views), with random size, lean and limb angles; limbs, torso and head are
polygons rasterised with pycocotools, eyes and nose are painted dots. Visibility: v=2 visible, v=1
inside the image but covered by a figure drawn later, v=0 (and x=y=0) outside the image.
Every image draws from its own generator seeded by (seed, split, index).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from trainer.synthetic.draw import _contrasting_colour, _finish, background, object_fill, rasterize

KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
            [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]  # COCO's, 1-based
PERSON = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(KEYPOINT_NAMES),
          "skeleton": SKELETON}
FIGURE_SCALE = (0.5, 0.9)  # figure height as a fraction of the image height
_LIMBS = [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)]  # 0-based pairs


def _pose(rng: np.random.Generator, cx: float, cy: float, h: float) -> tuple[np.ndarray, float]:
    """17 keypoints (x, y) of a front-facing figure of height h centred at (cx, cy), head radius."""
    lean = rng.uniform(-0.15, 0.15)
    up = np.array([math.sin(lean), -math.cos(lean)])  # towards the head
    side = np.array([math.cos(lean), math.sin(lean)])  # towards the figure's left (image right)
    hip_c = np.array([cx, cy]) - up * 0.02 * h
    neck = hip_c + up * 0.32 * h
    head_r = 0.075 * h
    head = neck + up * (head_r * 1.25)
    p = np.zeros((17, 2))
    sh, hw = rng.uniform(0.09, 0.13) * h, rng.uniform(0.06, 0.09) * h
    p[5], p[6] = neck + side * sh, neck - side * sh
    p[11], p[12] = hip_c + side * hw, hip_c - side * hw
    for s_i, e_i, w_i, sign in ((5, 7, 9, 1), (6, 8, 10, -1)):
        a1 = rng.uniform(0.1, 2.6)  # angle from hanging down, outwards
        a2 = a1 + rng.uniform(-1.2, 1.2)
        for a, src, dst, length in ((a1, s_i, e_i, 0.16), (a2, e_i, w_i, 0.15)):
            d = -up * math.cos(a) + sign * side * math.sin(a)
            p[dst] = p[src] + d * length * h
    for h_i, k_i, a_i, sign in ((11, 13, 15, 1), (12, 14, 16, -1)):
        a1 = rng.uniform(0.0, 0.5)
        a2 = a1 + rng.uniform(-0.4, 0.3)
        for a, src, dst in ((a1, h_i, k_i), (a2, k_i, a_i)):
            d = -up * math.cos(a) + sign * side * math.sin(a)
            p[dst] = p[src] + d * 0.22 * h
    p[0] = head - up * 0.25 * head_r
    p[1], p[2] = head + side * 0.4 * head_r + up * 0.2 * head_r, head - side * 0.4 * head_r + up * 0.2 * head_r
    p[3], p[4] = head + side * 0.95 * head_r, head - side * 0.95 * head_r
    return p, head_r


def _segment(a: np.ndarray, b: np.ndarray, width: float) -> list[float]:
    d = b - a
    n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6) * width / 2
    return np.round(np.concatenate([a + n, b + n, b - n, a - n]), 2).tolist()


def _figure_polygons(p: np.ndarray, head_r: float, h: float) -> list[list[float]]:
    head = (p[3] + p[4]) / 2
    t = np.linspace(0, 2 * math.pi, 20, endpoint=False)
    circle = np.stack([head[0] + head_r * np.cos(t), head[1] + head_r * 1.15 * np.sin(t)], 1)
    neck = (p[5] + p[6]) / 2
    polys = [np.round(circle.ravel(), 2).tolist(), np.round(np.concatenate([p[5], p[6], p[12], p[11]]), 2).tolist(),
             _segment(neck, head, 0.4 * head_r)]
    limb_w = max(2.0, 0.045 * h)
    polys += [_segment(p[a], p[b], limb_w) for a, b in _LIMBS]
    return polys


def draw_figures(rng: np.random.Generator, h: int, w: int, max_figures: int) -> tuple[np.ndarray, list[dict]]:
    """One image (uint8 HxWx3) and per figure, bottom first: full/visible masks and keypoints [17, 3]."""
    bg = background(rng, h, w)
    avoid = bg.mean(axis=(0, 1))
    figures = []
    for _ in range(int(rng.integers(1, max_figures + 1))):
        fh = h * rng.uniform(*FIGURE_SCALE)
        cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.35 * h, 0.65 * h)
        pts, head_r = _pose(rng, cx, cy, fh)
        full = rasterize(_figure_polygons(pts, head_r, fh), h, w)
        fill = object_fill(rng, h, w, avoid)
        figures.append({"pts": pts, "full": full, "fill": fill, "mark": _contrasting_colour(rng, fill[0, 0])})
    img = bg
    covered = np.zeros((h, w), bool)
    for fig in reversed(figures):  # visibility top-down
        fig["visible"] = fig["full"] & ~covered
        covered |= fig["full"]
    for i, fig in enumerate(figures):
        img = np.where(fig["full"][..., None], fig["fill"], img)
        for j in (0, 1, 2):  # eyes and nose: dots, so the face has landmarks to find
            x, y = int(fig["pts"][j][0]), int(fig["pts"][j][1])
            if 0 <= x < w and 0 <= y < h and fig["visible"][y, x]:
                img[y, x] = fig["mark"]
        above = np.zeros((h, w), bool)
        for other in figures[i + 1:]:
            above |= other["full"]
        kps = np.zeros((17, 3))
        for j, (x, y) in enumerate(fig["pts"]):
            if 0 <= x < w and 0 <= y < h:
                kps[j] = (round(float(x), 2), round(float(y), 2), 1 if above[int(y), int(x)] else 2)
        fig["keypoints"] = kps
    return _finish(rng, np.asarray(img, np.float32)), figures


def annotation(fig: dict, ann_id: int, image_id: int) -> dict[str, Any] | None:
    """COCO person-keypoint annotation of a figure, or None when nothing of it is visible."""
    vis = fig["visible"]
    if vis.sum() < 4:
        return None
    rle = mask_util.encode(np.asfortranarray(vis.astype(np.uint8)))
    kps = fig["keypoints"]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "segmentation": {"size": list(vis.shape), "counts": rle["counts"].decode("ascii")},
            "keypoints": [float(v) if i % 3 < 2 else int(v) for i, v in enumerate(kps.ravel())],
            "num_keypoints": int((kps[:, 2] > 0).sum())}


def write_keypoint_split(out: Path, split: str, count: int, seed: int, size: tuple[int, int], max_figures: int,
                         rng_for, save_png) -> dict[str, Any]:
    """Draw and write one split; `rng_for(i)` gives image i's generator, `save_png(path, img)` writes it."""
    width, height = size
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(count):
        img, figures = draw_figures(rng_for(i), height, width, max_figures)
        name = f"{i + 1:012d}.png"
        save_png(image_dir / name, img)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for fig in figures:
            ann = annotation(fig, len(anns) + 1, i + 1)
            if ann is not None:
                anns.append(ann)
    doc = {"info": {"description": "trainer.synthetic stick figures", "version": "1", "seed": seed},
           "licenses": [], "images": images, "annotations": anns, "categories": [PERSON]}
    path = out / "annotations" / f"person_keypoints_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    return {"annotation_file": path, "images": count, "annotations": len(anns),
            "labeled_keypoints": sum(a["num_keypoints"] for a in anns)}
