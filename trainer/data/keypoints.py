"""COCO data for the box and keypoint detectors, read through pycocotools.

Owns the COCO datasets of `model.task: box` (instances files, boxes and labels only, never masks)
and `model.task: keypoints` (person_keypoints files: K keypoints per instance as flat [x, y, v]
triples, v = 0 unlabeled, 1 labeled but hidden, 2 visible), with the same seeded nested subsets and
(seed, position)-fixed flips as trainer.data.coco (the items and flips: `trainer.data.split`). The
files are found by the same layout fields and pass the same up-front check as the mask detector's
(`trainer.data.coco.check_data`); the keypoint fields are then
checked before pycocotools indexes them, so a malformed file is refused with one line naming what is
wrong. A keypoint flip also swaps the left_*/right_* keypoints.
Training uses the non-crowd instances with a box of at least 1x1; a keypoint image needs at least one
labeled keypoint (Detectron2's MIN_KEYPOINTS_PER_IMAGE = 1), a box image at least one instance.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from trainer.config import DataConfig, ModelConfig
from trainer.data.coco import check_data, read_image, select_subset
from trainer.data.dataset_check import AnnotationFile, box_finite
from trainer.data.split import DetectionSplit
from trainer.errors import DatasetError

logger = logging.getLogger(__name__)

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


def load_box_keypoint_coco(source: Path | AnnotationFile, detector: str, num_keypoints: int):
    """A pycocotools COCO of a checked instances / person_keypoints file (its prints captured); an
    AnnotationFile's parsed JSON, without what the dataset check dropped, is used as it is."""
    from pycocotools.coco import COCO

    ann = source if isinstance(source, AnnotationFile) else AnnotationFile(Path(source))
    doc = ann.data
    for entry in doc["annotations"]:
        if "image_id" not in entry or "category_id" not in entry or not box_finite(entry.get("bbox")):
            raise DatasetError(f"{ann.path}: annotation {entry.get('id')} needs image_id, category_id and a "
                               f"4-number bbox")
    if detector == "keypoints":
        _check_keypoint_doc(doc, ann.path, num_keypoints)
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


class CocoBoxKeypointDataset(DetectionSplit):
    """One split for the box or keypoint detector; items as trainer.data.coco.CocoInstances (eval: (image,
    {"image_id"}); train, keyed (position, index): (image, target) with boxes, labels, image_id,
    image_size and, for keypoints, keypoints [N, K, 3])."""

    def __init__(self, ann_file: Path | AnnotationFile, image_dir: Path, detector: str, num_keypoints: int,
                 image_ids: Sequence[int] | None = None, *, train: bool = False, hflip: bool = False, seed: int = 0,
                 coco: Any = None):
        self.image_dir = Path(image_dir)
        self.coco = coco if coco is not None else load_box_keypoint_coco(ann_file, detector, num_keypoints)
        split = Path(getattr(ann_file, "path", ann_file)).name
        self.detector, self.k = detector, num_keypoints
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise DatasetError(f"{ann_file}: no categories")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i: c for c, i in self.cat_to_label.items()}
        names = self.coco.cats[self.cat_ids[0]].get("keypoints", []) if detector == "keypoints" else []
        self.keypoint_names = list(names)
        self.flip_index = flip_index(names)
        ids = sorted(self.coco.getImgIds()) if image_ids is None else list(image_ids)
        self.train, self.hflip, self.seed = train, hflip, seed
        if train:
            what = "labeled keypoints" if detector == "keypoints" else "instances"
            ids = self._keep_trainable(ids, split, what, f"{split}: none of the {len(ids)} selected images has {what}")
        self.image_ids = ids

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _size(self, image_id: int) -> tuple[int, int]:
        info = self.coco.imgs[image_id]
        return info["height"], info["width"]

    def _anns(self, image_id: int) -> list[dict]:
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def _trainable(self, image_id: int) -> bool:
        anns = self._anns(image_id)
        return any(a["num_keypoints"] > 0 for a in anns) if self.detector == "keypoints" else bool(anns)

    def _read(self, image_id: int) -> torch.Tensor:
        return read_image(self.image_dir / self.coco.imgs[image_id]["file_name"])  # uint8 until on the device

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
        if self.detector == "keypoints":
            target["keypoints"] = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, self.k, 3)
        return target

    def flip(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        width = image.shape[-1]
        image, out = super().flip(image, target)
        if "keypoints" in target:
            kps = target["keypoints"][:, self.flip_index].clone()
            labeled = kps[..., 2] > 0
            kps[..., 0] = torch.where(labeled, width - kps[..., 0], kps[..., 0])
            out["keypoints"] = kps
        return image, out


def build_box_keypoint_datasets(cfg: DataConfig, model: ModelConfig, stream_seed: int = 0
                                ) -> tuple[CocoBoxKeypointDataset, CocoBoxKeypointDataset, list[int]]:
    """(train set, val set, chosen train image ids) of a COCO box or keypoint trial.

    The splits are located and checked as the mask detector's are (`trainer.data.coco.check_data`: the same
    layout fields, the same up-front check and drops), before pycocotools indexes them.
    """
    detector, k = model.task, model.num_keypoints
    (train_ann, train_dir), (val_ann, val_dir) = check_data(cfg, detector).values()
    coco = load_box_keypoint_coco(train_ann, detector, k)
    val_coco = load_box_keypoint_coco(val_ann, detector, k)  # fail before anything trains
    chosen = select_subset(coco.getImgIds(), cfg.train_images, cfg.subset_seed)
    train = CocoBoxKeypointDataset(train_ann, train_dir, detector, k, chosen, train=True, hflip=cfg.hflip,
                                   seed=stream_seed, coco=coco)
    val = CocoBoxKeypointDataset(val_ann, val_dir, detector, k, coco=val_coco)
    if cfg.val_images != "all":
        val.image_ids = val.image_ids[: cfg.val_images]
    if val.cat_ids != train.cat_ids:
        raise DatasetError(f"train and val splits have different categories ({train.cat_ids} vs {val.cat_ids})")
    return train, val, chosen
