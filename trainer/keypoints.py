"""COCO data for the box and keypoint tasks, read through pycocotools.

Owns the COCO-layout datasets of `model.task: box` (ROOT/annotations/instances_{split}.json, boxes
and labels only, never masks) and `model.task: keypoints` (ROOT/annotations/person_keypoints_{split}
.json: K keypoints per instance as flat [x, y, v] triples, v = 0 unlabeled, 1 labeled but hidden,
2 visible), with the same seeded nested subsets and (seed, position)-fixed flips as trainer.data.
A keypoint flip also swaps the left_*/right_* keypoints. The annotation file is checked before
pycocotools indexes it, so a malformed one is refused with one line naming what is wrong.
Training uses the non-crowd instances with a box of at least 1x1; a keypoint image needs at least one
labeled keypoint (Detectron2's MIN_KEYPOINTS_PER_IMAGE = 1), a box image at least one instance.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.config import DataConfig, ModelConfig
from trainer.data import read_image, select_subset
from trainer.errors import DatasetError

logger = logging.getLogger(__name__)

ANNOTATION_PREFIX = {"box": "instances", "keypoints": "person_keypoints"}


def task_split_paths(root: Path, split: str, task: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of a split for a task, or a DatasetError saying what is missing."""
    ann = Path(root) / "annotations" / f"{ANNOTATION_PREFIX[task]}_{split}.json"
    images = Path(root) / split
    if not ann.is_file():
        hint = " --keypoints" if task == "keypoints" else ""
        raise DatasetError(f"annotation file not found: {ann} (expected ROOT/annotations/{ann.name} and images "
                           f"in ROOT/{split}/; generate offline data with `python -m trainer.synthetic --out "
                           f"{root}{hint}`)")
    if not images.is_dir():
        raise DatasetError(f"image folder not found: {images} (the images of split '{split}' belong there)")
    return ann, images


def _check_keypoint_doc(doc: dict, path: Path, k: int) -> None:
    cats = doc.get("categories") or []
    for cat in cats:
        names = cat.get("keypoints") if isinstance(cat, dict) else None
        if not isinstance(names, list) or len(names) != k:
            got = "no 'keypoints' list" if not isinstance(names, list) else f"{len(names)} keypoints"
            raise DatasetError(f"{path}: category {cat.get('id') if isinstance(cat, dict) else cat!r} has {got}, "
                               f"but model.num_keypoints={k}")
    for ann in doc["annotations"]:
        kps = ann.get("keypoints")
        if not isinstance(kps, list) or len(kps) != 3 * k or not all(isinstance(v, (int, float)) for v in kps):
            raise DatasetError(f"{path}: annotation {ann.get('id')} needs 'keypoints' as {3 * k} numbers "
                               f"(x, y, v for {k} keypoints), got {str(kps)[:60]}")
        if any(v not in (0, 1, 2) for v in kps[2::3]):
            raise DatasetError(f"{path}: annotation {ann.get('id')} has a keypoint visibility outside 0/1/2")
        if not isinstance(ann.get("num_keypoints"), int):
            raise DatasetError(f"{path}: annotation {ann.get('id')} has no integer 'num_keypoints'")


def load_task_coco(path: Path, task: str, num_keypoints: int):
    """A pycocotools COCO of a checked instances / person_keypoints file (its prints captured)."""
    from pycocotools.coco import COCO

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not a readable COCO json ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(key), list)
                                            for key in ("images", "annotations", "categories")):
        raise DatasetError(f"{path}: a COCO file needs 'images', 'annotations' and 'categories' lists")
    for ann in doc["annotations"]:
        box = ann.get("bbox") if isinstance(ann, dict) else None
        if not isinstance(box, list) or len(box) != 4 or "image_id" not in ann or "category_id" not in ann:
            raise DatasetError(f"{path}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r} needs "
                               f"image_id, category_id and a 4-number bbox")
    if task == "keypoints":
        _check_keypoint_doc(doc, Path(path), num_keypoints)
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def flip_index(names: Sequence[str]) -> list[int]:
    """Per keypoint, the index of its mirror image (left_x <-> right_x; others map to themselves)."""
    where = {n: i for i, n in enumerate(names)}
    out = []
    for i, name in enumerate(names):
        for a, b in (("left_", "right_"), ("right_", "left_")):
            if name.startswith(a) and name.replace(a, b, 1) in where:
                i = where[name.replace(a, b, 1)]
                break
        out.append(i)
    return out


class CocoTaskDataset(Dataset):
    """One split for the box or keypoint task; items as trainer.data.CocoInstances (eval: (image,
    {"image_id"}); train, keyed (position, index): (image, target) with boxes, labels, image_id,
    image_size and, for keypoints, keypoints [N, K, 3])."""

    def __init__(self, root: Path, split: str, task: str, num_keypoints: int, image_ids: Sequence[int] | None = None,
                 *, train: bool = False, hflip: bool = False, seed: int = 0, coco: Any = None):
        ann_file, self.image_dir = task_split_paths(root, split, task)
        self.coco = coco if coco is not None else load_task_coco(ann_file, task, num_keypoints)
        self.task, self.k = task, num_keypoints
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise DatasetError(f"{ann_file}: no categories")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i: c for c, i in self.cat_to_label.items()}
        names = self.coco.cats[self.cat_ids[0]].get("keypoints", []) if task == "keypoints" else []
        self.keypoint_names = list(names)
        self.flip_index = flip_index(names)
        ids = sorted(self.coco.getImgIds()) if image_ids is None else list(image_ids)
        self.train, self.hflip, self.seed = train, hflip, seed
        if train:
            usable = [i for i in ids if self._trainable(i)]
            what = "labeled keypoints" if task == "keypoints" else "instances"
            logger.info("%s: %d of %d images have %s (others skipped in training)", split, len(usable), len(ids), what)
            if not usable:
                raise DatasetError(f"split '{split}': none of the {len(ids)} selected images has {what}")
            ids = usable
        self.image_ids = ids

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def aspect_groups(self) -> list[int]:
        return [0 if info["width"] >= info["height"] else 1 for info in (self.coco.imgs[i] for i in self.image_ids)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def _anns(self, image_id: int) -> list[dict]:
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def _trainable(self, image_id: int) -> bool:
        anns = self._anns(image_id)
        return any(a["num_keypoints"] > 0 for a in anns) if self.task == "keypoints" else bool(anns)

    def _read(self, image_id: int) -> torch.Tensor:
        return read_image(self.image_dir / self.coco.imgs[image_id]["file_name"])  # uint8 until on the device

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self.train:
            image_id = self.image_ids[int(key)]
            return self._read(image_id), {"image_id": image_id}
        position, index = key
        image_id = self.image_ids[index]
        image = self._read(image_id)
        target = self._target(image_id, image.shape[-2:])
        if self.hflip and np.random.default_rng([self.seed, position]).random() < 0.5:
            image, target = self.flip(image, target)
        return image, target

    def _target(self, image_id: int, hw: torch.Size) -> dict[str, Any]:
        anns = self._anns(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, hw[1])
        boxes[:, 1::2].clamp_(0, hw[0])
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image_id,
            "image_size": (int(hw[0]), int(hw[1])),
        }
        if self.task == "keypoints":
            target["keypoints"] = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, self.k, 3)
        return target

    def flip(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        width = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        out = {**target, "boxes": boxes}
        if "keypoints" in target:
            kps = target["keypoints"][:, self.flip_index].clone()
            labeled = kps[..., 2] > 0
            kps[..., 0] = torch.where(labeled, width - kps[..., 0], kps[..., 0])
            out["keypoints"] = kps
        return image.flip(-1), out


def build_coco_task_datasets(cfg: DataConfig, model: ModelConfig, stream_seed: int = 0
                             ) -> tuple[CocoTaskDataset, CocoTaskDataset, list[int]]:
    """(train set, val set, chosen train image ids) of a COCO box or keypoint trial."""
    task, k = model.task, model.num_keypoints
    train_ann, _ = task_split_paths(cfg.root, cfg.train_split, task)
    task_split_paths(cfg.root, cfg.val_split, task)  # fail before the train index is built
    coco = load_task_coco(train_ann, task, k)
    chosen = select_subset(coco.getImgIds(), cfg.train_images, cfg.subset_seed)
    train = CocoTaskDataset(cfg.root, cfg.train_split, task, k, chosen, train=True, hflip=cfg.hflip,
                            seed=stream_seed, coco=coco)
    val = CocoTaskDataset(cfg.root, cfg.val_split, task, k)
    if cfg.val_images != "all":
        val.image_ids = val.image_ids[: cfg.val_images]
    if val.cat_ids != train.cat_ids:
        raise DatasetError(f"train and val splits have different categories ({train.cat_ids} vs {val.cat_ids})")
    return train, val, chosen
