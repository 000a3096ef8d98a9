"""Offline stand-ins for COCO and ImageNet: seeded synthetic shape data sets, written to disk.

Owns the on-disk layouts; the drawing itself is in `trainer.synthetic.draw`, the command line in
`trainer.synthetic.cli`.

Detection set, real COCO layout (what `trainer` reads with data.train_split=train, val_split=val):
    OUT/annotations/instances_{train,val}.json    images/annotations/categories, as COCO
    OUT/{train,val}/<12-digit image id>.png        `file_name` is relative to the split folder
Categories have non-contiguous ids (1, 3, 7, 12), so consumers must map ids to labels. Each
annotation's mask is the object's *visible* part (objects are drawn in z-order); unoccluded objects
get polygons, occluded ones compressed RLE, crowd clusters (iscrowd=1) uncompressed RLE as in COCO.

Classification set, torchvision ImageFolder layout (backbone pretraining, the ImageNet stand-in):
    OUT/classification/{train,val}/<shape name>/<5-digit index>.png
It has more classes than detection (16 by default: the 4 detection shapes and 12 more; or only the 12
shapes detection does not have, `--cls-no-detection-shapes`), one labelled
shape per crop at varied scale over textured backgrounds and smaller distractor shapes, and is drawn
from its own random streams: it never holds a detection image or label.

Same arguments, same bytes: every image draws from its own generator seeded by (seed, split, index),
so an image does not depend on how many others were asked for, and the JSON is dumped with sorted keys.

    python -m trainer.synthetic --out datasets/synth --train 600 --val 100 --classification
"""

from __future__ import annotations

import json
import logging
import numbers
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from trainer.errors import ConfigError
from trainer.synthetic.draw import CLS_SHAPES, SHAPES, Layer, draw_crop, draw_scene

log = logging.getLogger("trainer.synthetic")  # not __main__ under `python -m`

_CATEGORY_IDS = (1, 3, 7, 12)  # deliberately non-contiguous, like COCO's 1..90 with gaps
CATEGORIES: list[dict[str, Any]] = [
    {"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(_CATEGORY_IDS, SHAPES)
]
MIN_SIDE = 24  # below this the smallest objects are a few pixels and no longer have a shape
MAX_SIDE = 4096
# Stream tags keep the per-image generators of different splits/sets independent of each other.
_STREAMS = {("det", "train"): 0, ("det", "val"): 1, ("cls", "train"): 2, ("cls", "val"): 3,
            ("kp", "train"): 4, ("kp", "val"): 5, ("voc", "trainval"): 6, ("voc", "test"): 7}
_DET_NAME = re.compile(r"^\d{12}\.png$")
_CLS_NAME = re.compile(r"^\d{5}\.png$")


def _rng(seed: int, stream: tuple[str, str], *index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _STREAMS[stream], *index])


def _save_png(path: Path, img: np.ndarray) -> None:
    # Fixed parameters and no metadata chunks: the file is a pure function of the pixels.
    Image.fromarray(img, "RGB").save(path, format="PNG", compress_level=6, optimize=False)


def _prepare_dir(path: Path, keep: set[str], pattern: re.Pattern[str]) -> None:
    """Create `path`; remove images of an earlier, larger run that this run will not rewrite."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.iterdir():
        if old.is_file() and pattern.match(old.name) and old.name not in keep:
            old.unlink()


class _Progress:
    """A progress bar on a terminal (rich, on stderr); elsewhere a log line every ~10% of a long loop,
    so big runs show life in a log file without flooding small ones. A context manager: the bar is
    closed even when drawing fails."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.step = max(1, total // 10) if total >= 500 else 0
        self.bar: Any = None

    def __enter__(self) -> "_Progress":
        if sys.stderr.isatty() and self.total:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True))
            self.bar_id = self.bar.add_task(self.what, total=self.total)
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def tick(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.bar_id, completed=done)
        elif self.step and (done % self.step == 0 or done == self.total):
            log.info("%s: %d/%d", self.what, done, self.total)


# ---------------------------------------------------------------- detection (COCO layout)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's crowd format: column-major run lengths, starting with a (possibly empty) run of 0s."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def _annotation(layer: Layer, ann_id: int, image_id: int) -> dict[str, Any]:
    assert layer.visible is not None
    h, w = layer.visible.shape
    rle = mask_util.encode(np.asfortranarray(layer.visible.astype(np.uint8)))
    if layer.iscrowd:
        segmentation: Any = _uncompressed_rle(layer.visible)
    elif not layer.occluded:
        segmentation = [layer.polygon]  # decodes to exactly `full` == `visible`
    else:
        segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": _CATEGORY_IDS[layer.shape],
        "segmentation": segmentation,
        "area": float(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": int(layer.iscrowd),
    }


def _write_split(
    out: Path, split: str, count: int, seed: int, size: tuple[int, int], scene: dict[str, Any]
) -> dict[str, Any]:
    """Draw and write one split's images and annotation file; return its stats."""
    width, height = size
    image_dir = out / split
    images, annotations = [], []
    stats = {"images": count, "annotations": 0, "crowd": 0, "polygon": 0, "rle": 0, "empty_images": 0}
    names = {f"{i + 1:012d}.png" for i in range(count)}
    _prepare_dir(image_dir, names, _DET_NAME)
    with _Progress(f"detection {split}", count) as progress:
        for i in range(count):
            image_id = i + 1
            img, layers = draw_scene(_rng(seed, ("det", split), i), height, width, **scene)
            file_name = f"{image_id:012d}.png"
            _save_png(image_dir / file_name, img)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            for layer in layers:
                ann = _annotation(layer, len(annotations) + 1, image_id)
                annotations.append(ann)
                polygon = isinstance(ann["segmentation"], list)
                stats["crowd" if ann["iscrowd"] else "polygon" if polygon else "rle"] += 1
            stats["empty_images"] += not layers
            progress.tick(i + 1)
    stats["annotations"] = len(annotations)
    doc = {
        "info": {"description": "trainer.synthetic shapes", "version": "1", "seed": seed, **scene},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    ann_file = out / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    return {"annotation_file": ann_file, "image_dir": image_dir, **stats}


def _check_out(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    return out


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


def _check_side(name: str, value: int) -> None:
    if not isinstance(value, numbers.Integral) or not MIN_SIDE <= value <= MAX_SIDE:
        raise ConfigError(f"{name} must be an integer in [{MIN_SIDE}, {MAX_SIDE}] pixels, got {value!r}")


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")


def generate_detection(
    out: Path,
    *,
    seed: int = 0,
    num_train: int = 600,
    num_val: int = 100,
    width: int = 64,
    height: int = 64,
    max_objects: int = 6,
    empty_prob: float = 0.03,
    crowd_prob: float = 0.05,
) -> dict[str, Any]:
    """Write the COCO-layout shape set under `out`; return {"root", "categories", "seconds", "splits":
    {split: {"annotation_file", "image_dir", "images", "annotations", "crowd", "polygon", "rle",
    "empty_images"}}}. Raises ConfigError on impossible arguments, before writing anything."""
    out = _check_out(out)
    _check_count("seed", seed)
    _check_count("num_train (--train)", num_train)
    _check_count("num_val (--val)", num_val)
    _check_side("image width (--size/--width)", width)
    _check_side("image height (--size/--height)", height)
    if not isinstance(max_objects, int) or not 1 <= max_objects <= 50:
        raise ConfigError(f"max_objects (--max-objects) must be an integer in [1, 50], got {max_objects!r}")
    _check_prob("empty_prob (--empty-prob)", empty_prob)
    _check_prob("crowd_prob (--crowd-prob)", crowd_prob)
    start = time.perf_counter()
    scene = {"max_objects": max_objects, "empty_prob": float(empty_prob), "crowd_prob": float(crowd_prob)}
    splits = {
        split: _write_split(out, split, count, int(seed), (int(width), int(height)), scene)
        for split, count in (("train", num_train), ("val", num_val))
    }
    return {"root": out, "categories": CATEGORIES, "splits": splits, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------ classification (ImageFolder)


def generate_classification(
    out: Path, *, seed: int = 0, per_class_train: int = 300, per_class_val: int = 60, size: int = 32,
    classes: int = len(CLS_SHAPES), detection_shapes: bool = True,
) -> dict[str, Any]:
    """Write OUT/classification/{train,val}/<class>/NNNNN.png for the first `classes` of CLS_SHAPES, or
    with `detection_shapes=False` of the classification-only shapes (none of the detection set's
    categories, not even as clutter); return {"root", "classes", "seconds", "splits": {split: {"dir",
    "per_class", "images"}}}. Raises ConfigError on impossible arguments."""
    out = _check_out(out)
    _check_count("seed", seed)
    _check_count("per_class_train (--cls-train)", per_class_train)
    _check_count("per_class_val (--cls-val)", per_class_val)
    _check_side("crop size (--cls-size)", size)
    first = 0 if detection_shapes else len(SHAPES)
    most = len(CLS_SHAPES) - first
    if not isinstance(classes, numbers.Integral) or not 2 <= classes <= most:
        without = "" if detection_shapes else " without the detection shapes"
        raise ConfigError(f"classes (--cls-classes) must be an integer in [2, {most}]{without}, got {classes!r}")
    start = time.perf_counter()
    root = out / "classification"
    names_of = CLS_SHAPES[first:first + classes]
    splits: dict[str, Any] = {}
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        names = {f"{i:05d}.png" for i in range(per_class)}
        with _Progress(f"classification {split}", per_class * classes) as progress:
            for c, name in enumerate(names_of):
                class_dir = root / split / name
                _prepare_dir(class_dir, names, _CLS_NAME)
                for i in range(per_class):
                    crop = draw_crop(_rng(seed, ("cls", split), c, i), first + c, size, classes, first)
                    _save_png(class_dir / f"{i:05d}.png", crop)
                    progress.tick(c * per_class + i + 1)
        _remove_stale_classes(root / split, set(names_of))
        splits[split] = {"dir": root / split, "per_class": per_class, "images": per_class * classes}
    return {"root": root, "classes": list(names_of), "splits": splits, "seconds": time.perf_counter() - start}


def _remove_stale_classes(split_dir: Path, keep: set[str]) -> None:
    """Class folders of an earlier run with more classes would be read by ImageFolder: empty them."""
    for old in split_dir.iterdir():
        if old.is_dir() and old.name in CLS_SHAPES and old.name not in keep:
            _prepare_dir(old, set(), _CLS_NAME)
            old.rmdir()


# ----------------------------------------------- keypoints and Pascal VOC (their own modules)


def _check_set_args(out: Path, counts, width: int, height: int, most: tuple[str, Any, int]) -> Path:
    """The shared argument checks of the keypoint and VOC generators; returns the checked OUT."""
    out = _check_out(out)
    for name, value in counts:
        _check_count(name, value)
    _check_side("image width (--size/--width)", width)
    _check_side("image height (--size/--height)", height)
    name, value, hi = most
    if not isinstance(value, int) or not 1 <= value <= hi:
        raise ConfigError(f"{name} (--max-objects) must be an integer in [1, {hi}], got {value!r}")
    return out


def generate_keypoints(out: Path, *, seed: int = 0, num_train: int = 600, num_val: int = 100, width: int = 64,
                       height: int = 64, max_figures: int = 3) -> dict[str, Any]:
    """Write OUT/annotations/person_keypoints_{train,val}.json and OUT/{train,val}/*.png (stick figures
    with COCO's 17 keypoints, trainer.synthetic.keypoints); return per-split stats."""
    from trainer.synthetic.keypoints import write_keypoint_split

    out = _check_set_args(out, (("seed", seed), ("num_train (--train)", num_train), ("num_val (--val)", num_val)),
                          width, height, ("max_figures", max_figures, 10))
    start = time.perf_counter()
    splits = {}
    for split, count in (("train", num_train), ("val", num_val)):
        _prepare_dir(out / split, {f"{i + 1:012d}.png" for i in range(count)}, _DET_NAME)
        splits[split] = write_keypoint_split(out, split, count, int(seed), (int(width), int(height)), max_figures,
                                             lambda i, sp=split: _rng(seed, ("kp", sp), i), _save_png)
    return {"root": out, "splits": splits, "seconds": time.perf_counter() - start}


def generate_voc(out: Path, *, seed: int = 0, num_trainval: int = 300, num_test: int = 100, width: int = 64,
                 height: int = 64, max_objects: int = 4) -> dict[str, Any]:
    """Write a VOC-layout shape set under OUT/VOCdevkit/VOC2007 (trainer.synthetic.voc)."""
    from trainer.synthetic import voc as synthetic_voc

    out = _check_set_args(out, (("seed", seed), ("num_trainval (--train)", num_trainval), ("num_test (--val)", num_test)),
                          width, height, ("max_objects", max_objects, 50))
    start = time.perf_counter()
    stats = synthetic_voc.generate_voc(out, seed=int(seed), counts={"trainval": num_trainval, "test": num_test},
                                       width=int(width), height=int(height), max_objects=max_objects,
                                       rng_for=lambda split, i: _rng(seed, ("voc", split), i))
    return {**stats, "seconds": time.perf_counter() - start}
