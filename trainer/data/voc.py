"""Pascal VOC for the box detector: VOC XML annotations and ImageSets split lists, with difficult flags.

`data.format: voc`, `data.root` = a VOC20xx folder (VOCdevkit/VOC2007), `data.train_split` /
`data.val_split` = ImageSets/Main list names (trainval, test, train, val). Image ids are VOC's own
strings ("000005"), class names come from `data.voc_classes` (default: VOC's 20, in the devkit's
order; label = position + 1). Boxes: VOC's 1-based inclusive pixel corners become continuous
coordinates (xmin - 1, ymin - 1, xmax, ymax), so a box's width is VOC's `xmax - xmin + 1`.
`difficult` objects are kept for training (Detectron2's VOC loader keeps them too) and ignored in
evaluation (trainer.evaluation.voc). Every XML file is parsed and checked when the set is built: a
malformed file, an unknown class or an impossible box is refused with one line naming the file; and
every JPEG is decoded fully, as the COCO check does (`data.allow_unreadable_images` drops those that
do not decode, with a count). The VOC check is not cached (VOC07 trainval is 5k images).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.data.coco import read_image, select_subset
from trainer.data.image_check import decode_findings
from trainer.data.split import DetectionSplit
from trainer.errors import DatasetError

logger = logging.getLogger(__name__)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def read_split(root: Path, split: str) -> list[str]:
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DatasetError(f"VOC split list not found: {path} (expected a VOC20xx folder with Annotations/, "
                           f"ImageSets/Main/{split}.txt and JPEGImages/; `python -m trainer.synthetic --out D "
                           f"--voc` writes one under D/VOCdevkit/VOC2007)")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: no image ids")
    return ids


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{path}: <{node.tag}> has no <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    raw = _text(node, tag, path)
    try:
        return float(raw)
    except ValueError:
        raise DatasetError(f"{path}: <{tag}> is not a number ({raw!r})") from None


def parse_annotation(path: Path, class_index: dict[str, int]) -> dict[str, Any]:
    """One VOC XML file -> {width, height, boxes [N,4] continuous xyxy, labels [N], difficult [N]}."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"VOC annotation not found: {path}") from None
    except ET.ParseError as exc:
        raise DatasetError(f"{path}: not valid XML ({exc})") from None
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{path}: no <size>")
    width, height = _number(size, "width", path), _number(size, "height", path)
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = _text(obj, "name", path)
        if name not in class_index:
            raise DatasetError(f"{path}: unknown class {name!r} (classes: {', '.join(class_index)}; "
                               f"set data.voc_classes)")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{path}: object {name!r} has no <bndbox>")
        x1, y1, x2, y2 = (_number(bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        if not (1 <= x1 <= x2 <= width and 1 <= y1 <= y2 <= height):
            raise DatasetError(f"{path}: object {name!r} box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is not inside the "
                               f"{width:g}x{height:g} image (VOC boxes are 1-based, xmin <= xmax)")
        flag = obj.find("difficult")
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        labels.append(class_index[name])
        difficult.append(flag is not None and (flag.text or "0").strip() == "1")
    return {"width": int(width), "height": int(height), "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64), "difficult": np.asarray(difficult, bool)}


class VocDetection(DetectionSplit):
    """One VOC split; items as trainer.data.coco.CocoInstances (eval: (image, {"image_id"}); train, keyed
    (position, index): (image, {boxes, labels, image_id, image_size}))."""

    def __init__(self, root: Path, split: str, classes: Sequence[str], image_ids: Sequence[str] | None = None, *,
                 train: bool = False, hflip: bool = False, seed: int = 0, data: DataConfig | None = None):
        self.root, self.split = Path(root), split
        self.classes = list(classes)
        index = {c: i + 1 for i, c in enumerate(self.classes)}
        ids = read_split(self.root, split) if image_ids is None else list(image_ids)
        self.records = {i: parse_annotation(self.root / "Annotations" / f"{i}.xml", index) for i in ids}
        if data is not None:
            ids = check_voc_images(self.root, split, ids, self.records, data)
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.classes)}
        self.train, self.hflip, self.seed = train, hflip, seed
        if train:
            ids = self._keep_trainable(ids, f"VOC {split}", "objects",
                                       f"VOC split '{split}': none of the {len(ids)} selected images has an object")
        self.image_ids = ids

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _size(self, image_id: str) -> tuple[int, int]:
        return self.records[image_id]["height"], self.records[image_id]["width"]

    def _trainable(self, image_id: str) -> bool:
        return bool(len(self.records[image_id]["labels"]))

    def _read(self, image_id: str) -> torch.Tensor:
        return read_image(self.root / "JPEGImages" / f"{image_id}.jpg")  # uint8 until on the device

    def _target(self, image_id: str, hw: torch.Size) -> dict[str, Any]:
        rec = self.records[image_id]
        return {"boxes": torch.from_numpy(rec["boxes"].copy()), "labels": torch.from_numpy(rec["labels"].copy()),
                "image_id": image_id, "image_size": (int(hw[0]), int(hw[1]))}


def check_voc_images(root: Path, split: str, ids: list[str], records: dict, cfg: DataConfig) -> list[str]:
    """The ids whose JPEG decodes fully at its XML size (trainer.data.image_check, as the COCO check does);
    the others refused in one line, or dropped with a count under `data.allow_unreadable_images`
    (a size mismatch: `data.allow_size_mismatch` keeps them with a warning)."""
    entries = [(k, f"{i}.jpg", records[i]["width"], records[i]["height"]) for k, i in enumerate(ids)]
    found = decode_findings(Path(root) / "JPEGImages", entries, cfg.check_workers)
    bad = {kind: [(pos, text) for pos, k, text in found if k == kind] for kind in ("missing", "mismatch")}
    where = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    for kind, switch, what in (("missing", "allow_unreadable_images", "images are missing or unreadable"),
                               ("mismatch", "allow_size_mismatch", "images differ in size from their XML")):
        if bad[kind]:
            first = ", ".join(text for _, text in bad[kind][:3]) + (", ..." if len(bad[kind]) > 3 else "")
            line = f"{where}: {len(bad[kind])} {what} (first: {first})"
            if not getattr(cfg, switch):
                raise DatasetError(f"{line} [data.{switch}: true {'drops' if kind == 'missing' else 'keeps'} them]")
            logger.warning("%s (data.%s is set: %s)", line, switch, "dropped" if kind == "missing" else "kept")
    gone = {pos for pos, _ in bad["missing"]}
    return [i for k, i in enumerate(ids) if k not in gone]


def build_voc_datasets(cfg: DataConfig, stream_seed: int = 0) -> tuple[VocDetection, VocDetection, list[str]]:
    """(train set, val set, chosen train ids) of a VOC box trial."""
    classes = cfg.voc_classes or list(VOC_CLASSES)
    if len(set(classes)) != len(classes) or not classes:
        raise DatasetError(f"data.voc_classes must be distinct class names, got {classes}")
    train_ids = read_split(cfg.root, cfg.train_split)
    val_ids = read_split(cfg.root, cfg.val_split)  # fail before parsing the train annotations
    chosen = select_subset(train_ids, cfg.train_images, cfg.subset_seed)
    train = VocDetection(cfg.root, cfg.train_split, classes, chosen, train=True, hflip=cfg.hflip, seed=stream_seed,
                         data=cfg)
    if cfg.val_images != "all":
        val_ids = val_ids[: cfg.val_images]
    val = VocDetection(cfg.root, cfg.val_split, classes, val_ids, data=cfg)
    return train, val, chosen
