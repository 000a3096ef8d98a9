"""The serialised train index: a COCO split's training records as a few flat numpy buffers.

Owns `TrainIndex` (build from the parsed JSON, cache, load, subset) and `TrainImages`, the training
dataset that reads it. Why flat buffers: a loader worker forked from the main process shares its
memory copy-on-write, and touching a Python object writes its reference count, so a worker that
reads annotation dicts slowly copies the whole annotation set (at COCO scale ~2 GB per worker). A
numpy buffer has one object header and its data pages are only read, so workers stay flat; and
only a few arrays are pickled where workers start by spawn/forkserver.

Per image: id, height, width, file name (a byte blob with offsets) and its range of annotations.
Per usable annotation (non-crowd, finite box of at least 1x1 pixel; crowd regions and degenerate
boxes never train): box (xywh), contiguous label, and either its polygons (float64 coordinates,
exactly what pycocotools rasterises) or its compressed RLE. Masks are decoded by pycocotools from
these, so they equal `COCO.annToMask` bit for bit.

The full index is cached as a folder of .npy files named by the annotation file's hash (see
`trainer.data.dataset_check.cache_file`) and memory-mapped on load: the ranks of a node and the trials
of a sweep share one copy through the page cache. A subset trial copies out only its images.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import time
from array import array
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from torch.utils.data import Dataset

from trainer.atomic import fsync_dir
from trainer.data.dataset_check import AnnotationFile, box_ok, cache_file, cache_lock
from trainer.errors import DatasetError

logger = logging.getLogger(__name__)

INDEX_VERSION = "1"
# An annotation's segmentation is polygons poly_offsets[seg_start : seg_start + seg_count] (ranges
# of `coords`) or, with is_rle, the compressed counts rle_bytes[rle_offsets[seg_start] : ...+1].
FIELDS = ("image_ids", "heights", "widths", "name_offsets", "names", "ann_offsets", "boxes", "labels",
          "is_rle", "seg_start", "seg_count", "poly_offsets", "coords", "rle_offsets", "rle_bytes", "cat_ids")


class TrainIndex:
    """Flat training records of a split (see the module docstring); `arrays` maps FIELDS to numpy."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        missing = [f for f in FIELDS if f not in arrays]
        if missing:
            raise DatasetError(f"train index lacks {missing}")
        self.arrays = arrays
        self.folder: Path | None = None  # the cache folder the arrays are mapped from, if any
        for name in FIELDS:
            setattr(self, name, arrays[name])

    def __reduce__(self):
        # A mapped index travels as its folder (spawn/forkserver workers map the same pages);
        # an in-memory one (a subset) as its arrays.
        if self.folder is not None:
            return (TrainIndex.load_folder, (self.folder,))
        return (TrainIndex, ({k: np.asarray(v) for k, v in self.arrays.items()},))

    @classmethod
    def load_folder(cls, folder: Path) -> "TrainIndex":
        index = cls({f: np.load(Path(folder) / f"{f}.npy", mmap_mode="r") for f in FIELDS})
        index.folder = Path(folder)
        return index

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, data: dict[str, Any]) -> "TrainIndex":
        """From a parsed COCO instances dict (checked by trainer.data.dataset_check)."""
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        if not cat_ids:
            raise DatasetError("the annotation file lists no categories")
        label = {c: i + 1 for i, c in enumerate(cat_ids)}
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        row = {int(im["id"]): k for k, im in enumerate(images)}
        per_image: list[list[dict]] = [[] for _ in images]
        for ann in data["annotations"]:
            k = row.get(ann.get("image_id"))
            if k is not None and _usable(ann):
                per_image[k].append(ann)
        names, name_offsets = bytearray(), array("q", [0])
        ann_offsets, boxes, labels, is_rle = array("q", [0]), array("f"), array("q"), array("b")
        seg_start, seg_count, poly_offsets, coords = array("q"), array("q"), array("q", [0]), array("d")
        rle_offsets, rle_bytes = array("q", [0]), bytearray()
        for im, anns in zip(images, per_image):
            names += str(im["file_name"]).encode()
            name_offsets.append(len(names))
            h, w = int(im["height"]), int(im["width"])
            for ann in anns:
                boxes.extend(float(v) for v in ann["bbox"])
                labels.append(label[ann["category_id"]])
                seg = ann["segmentation"]
                if isinstance(seg, list):  # polygons
                    is_rle.append(0)
                    seg_start.append(len(poly_offsets) - 1)
                    seg_count.append(len(seg))
                    for poly in seg:
                        coords.extend(poly)
                        poly_offsets.append(len(coords))
                else:
                    is_rle.append(1)
                    seg_start.append(len(rle_offsets) - 1)
                    seg_count.append(1)
                    rle = mask_util.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
                    counts = rle["counts"]
                    rle_bytes += counts.encode() if isinstance(counts, str) else counts
                    rle_offsets.append(len(rle_bytes))
            ann_offsets.append(len(labels))
        arrays = {
            "image_ids": np.array([int(im["id"]) for im in images], np.int64),
            "heights": np.array([int(im["height"]) for im in images], np.int32),
            "widths": np.array([int(im["width"]) for im in images], np.int32),
            "name_offsets": np.frombuffer(name_offsets, np.int64), "names": np.frombuffer(bytes(names), np.uint8),
            "ann_offsets": np.frombuffer(ann_offsets, np.int64),
            "boxes": np.frombuffer(boxes, np.float32).reshape(-1, 4), "labels": np.frombuffer(labels, np.int64),
            "is_rle": np.frombuffer(is_rle, np.int8), "seg_start": np.frombuffer(seg_start, np.int64),
            "seg_count": np.frombuffer(seg_count, np.int64),
            "poly_offsets": np.frombuffer(poly_offsets, np.int64), "coords": np.frombuffer(coords, np.float64),
            "rle_offsets": np.frombuffer(rle_offsets, np.int64),
            "rle_bytes": np.frombuffer(bytes(rle_bytes), np.uint8), "cat_ids": np.array(cat_ids, np.int64),
        }
        return cls(arrays)

    # -- cache ------------------------------------------------------------------------------
    @classmethod
    def load_or_build(cls, ann: AnnotationFile, cache_dir: Path | None) -> "TrainIndex":
        """The cached index of `ann` (memory-mapped), or a freshly built one that is then cached."""
        # keyed by the check's drops too: the same JSON with other images dropped is another index
        folder = cache_file(cache_dir, ann, "index", INDEX_VERSION, ann.drop_tag) if cache_dir is not None else None
        with cache_lock(folder):
            return cls._load_or_build(ann, folder)

    @classmethod
    def _load_or_build(cls, ann: AnnotationFile, folder: Path | None) -> "TrainIndex":
        if folder is not None and (folder / "done").is_file():
            try:
                return cls.load_folder(folder)
            except (OSError, ValueError) as exc:
                logger.warning("rebuilding damaged train index cache %s (%s)", folder, exc)
        started = time.perf_counter()
        index = cls.build(ann.data)
        logger.info("train index of %s: %d images, %d instances built in %.1fs", ann.path.name,
                    len(index.image_ids), len(index.labels), time.perf_counter() - started)
        if folder is not None and index.save(folder):
            ann.drop()
            return cls.load_folder(folder)  # mapped: shared with the other ranks through the page cache
        return index

    def save(self, folder: Path) -> bool:
        """Write the arrays to `folder` atomically; False (and a warning) if it cannot be written."""
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            for name in FIELDS:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(self.arrays[name]))
            (tmp / "done").write_text(INDEX_VERSION)
            os.replace(tmp, folder)
            fsync_dir(folder.parent)  # a folder, not a file: write_atomic's rename, by hand
        except OSError as exc:  # another rank won the race, or the cache is not writable
            if not (folder / "done").is_file():
                logger.warning("cannot write train index cache %s (%s); continuing without it", folder, exc)
                return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    # -- views ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    def rows(self, image_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(image_ids, np.int64)
        rows = np.searchsorted(self.image_ids, ids)
        if len(ids) and (rows.max(initial=0) >= len(self.image_ids) or (self.image_ids[rows] != ids).any()):
            raise DatasetError("train index: asked for image ids that the split does not list")
        return rows

    def subset(self, image_ids: Sequence[int]) -> "TrainIndex":
        """A compact index of just these images (kept in id order) and their records."""
        rows = np.sort(self.rows(image_ids))
        a = self.arrays
        names, name_off = _take_ranges(a["names"], a["name_offsets"], rows)
        ann_rows = _ranges(a["ann_offsets"], rows)
        ann_off = _offsets(a["ann_offsets"][rows + 1] - a["ann_offsets"][rows])
        rle_flag = a["is_rle"][ann_rows].astype(bool)
        start, count = a["seg_start"][ann_rows], a["seg_count"][ann_rows]
        polys = _spans(start[~rle_flag], count[~rle_flag])
        coords, poly_off = _take_ranges(a["coords"], a["poly_offsets"], polys)
        rle_bytes, rle_off = _take_ranges(a["rle_bytes"], a["rle_offsets"], start[rle_flag])
        new_start = np.empty(len(ann_rows), np.int64)
        new_start[~rle_flag] = _offsets(count[~rle_flag])[:-1]
        new_start[rle_flag] = np.arange(int(rle_flag.sum()))
        return TrainIndex({
            "image_ids": np.array(a["image_ids"][rows]), "heights": np.array(a["heights"][rows]),
            "widths": np.array(a["widths"][rows]), "name_offsets": name_off, "names": names,
            "ann_offsets": ann_off, "boxes": np.array(a["boxes"][ann_rows]), "labels": np.array(a["labels"][ann_rows]),
            "is_rle": np.array(a["is_rle"][ann_rows]), "seg_start": new_start, "seg_count": np.array(count),
            "poly_offsets": poly_off, "coords": coords, "rle_offsets": rle_off, "rle_bytes": rle_bytes,
            "cat_ids": np.array(a["cat_ids"]),
        })

    def file_name(self, row: int) -> str:
        return bytes(self.names[self.name_offsets[row]:self.name_offsets[row + 1]]).decode()

    def masks(self, row: int) -> np.ndarray:
        """uint8 [N, H, W] masks of the image's usable instances, as COCO.annToMask gives them."""
        h, w = int(self.heights[row]), int(self.widths[row])
        lo, hi = int(self.ann_offsets[row]), int(self.ann_offsets[row + 1])
        if lo == hi:
            return np.zeros((0, h, w), np.uint8)
        return np.stack([mask_util.decode(self._rle(a, h, w)) for a in range(lo, hi)])

    def _rle(self, a: int, h: int, w: int) -> dict:
        k = int(self.seg_start[a])
        if self.is_rle[a]:
            return {"size": [h, w], "counts": bytes(self.rle_bytes[self.rle_offsets[k]:self.rle_offsets[k + 1]])}
        polys = [self.coords[self.poly_offsets[p]:self.poly_offsets[p + 1]].tolist()
                 for p in range(k, k + int(self.seg_count[a]))]
        # The calls COCO.annToRLE makes for polygons, on the same float64 coordinates.
        return mask_util.merge(mask_util.frPyObjects(polys, h, w))


def _usable(ann: dict) -> bool:
    if ann.get("iscrowd", 0) or not box_ok(ann.get("bbox")):
        return False
    return float(ann["bbox"][2]) >= 1 and float(ann["bbox"][3]) >= 1 and ann.get("segmentation") is not None


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def _spans(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated arange(start, start + count) for each pair."""
    starts, counts = np.asarray(starts, np.int64), np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    return np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(total)


def _ranges(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Concatenated arange(offsets[r], offsets[r+1]) for each row."""
    rows = np.asarray(rows, np.int64)
    return _spans(offsets[rows], offsets[rows + 1] - offsets[rows])


def _take_ranges(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values of the rows' ranges, concatenated; their new offsets)."""
    rows = np.asarray(rows, np.int64)
    return np.array(values[_ranges(offsets, rows)]), _offsets(offsets[rows + 1] - offsets[rows])


class TrainImages(Dataset):
    """Training items from a TrainIndex: only images with at least one usable instance.

    Items are keyed by (stream_position, index), so the flip of a sample is fixed by its stream
    position. Images come back uint8 [3, H, W]; they become floats on the device.
    """

    def __init__(self, index: TrainIndex, image_dir: Path, *, hflip: bool = False, seed: int = 0):
        # Rows of the images with instances: the (possibly mapped) index itself is not copied.
        self.rows = np.flatnonzero(np.diff(index.ann_offsets) > 0)
        logger.info("train: %d of %d images have instances (others skipped in training)", len(self.rows), len(index))
        if not len(self.rows):
            raise DatasetError(f"none of the {len(index)} selected train images has an instance")
        self.index = index
        self.image_dir = Path(image_dir)
        self.hflip, self.seed = hflip, seed
        self.cat_ids = [int(c) for c in self.index.cat_ids]
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self._mapped_in: int | None = None  # the pid that has mapped every page of the index

    def _map_whole_index(self) -> None:
        """Map every page of a memory-mapped index into this process, once, at its first item.

        A loader worker would otherwise map pages as its images come up, so its memory would creep
        for the whole first pass. Mapped up front, a worker's memory at its first batch is what it
        keeps: the pages are the node's shared page cache (one copy for every rank and worker), not
        private copies. One byte read per page faults them in.
        """
        self._mapped_in = os.getpid()
        for values in self.index.arrays.values():
            if isinstance(values, np.memmap) and values.size:
                int(np.asarray(values).reshape(-1).view(np.uint8)[::mmap.PAGESIZE].sum())

    @property
    def image_ids(self) -> list[int]:
        return self.index.image_ids[self.rows].tolist()

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def aspect_groups(self) -> list[int]:
        """Per item: 0 for landscape (width >= height), 1 for portrait; read from the annotations."""
        return (self.index.widths[self.rows] < self.index.heights[self.rows]).astype(int).tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        from trainer.data.coco import hflip, read_image

        if self._mapped_in != os.getpid():
            self._map_whole_index()
        position, item = key
        ix, row = self.index, int(self.rows[item])
        image = read_image(self.image_dir / ix.file_name(row))
        lo, hi = int(ix.ann_offsets[row]), int(ix.ann_offsets[row + 1])
        h, w = image.shape[-2:]
        boxes = torch.from_numpy(np.array(ix.boxes[lo:hi], np.float32)).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        target = {"boxes": boxes, "labels": torch.from_numpy(np.array(ix.labels[lo:hi], np.int64)),
                  "masks": torch.from_numpy(ix.masks(row)), "image_id": int(ix.image_ids[row])}
        if self.hflip and np.random.default_rng([self.seed, position]).random() < 0.5:
            image, target = hflip(image, target)
        return image, target
