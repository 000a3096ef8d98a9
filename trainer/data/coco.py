"""COCO instance data for training and evaluation.

Owns: locating a split for every COCO detector (ROOT/annotations/instances_{split}.json, or
person_keypoints_{split}.json, and ROOT/{split}/ images, or any `data.{train,val}_json` +
`_image_dir`), running the up-front dataset check (`trainer.data.dataset_check`),
the seeded nested train subsets (`data.train_images`), the evaluation dataset, image decoding (uint8
until the device), horizontal flip, and the batch stream. Training targets come from the serialised
train index (`trainer.data.coco_index`: polygons and RLE to masks, crowd regions left out,
annotation-free images skipped). The stream is a pure function of (seed, iteration): position p of the global stream is image
`perm(seed, p // n)[p % n]`, and iteration i takes positions [i*B, (i+1)*B). A resumed run therefore
sees exactly the batches an uninterrupted one would, whatever the number of loader workers. With
aspect-ratio grouping (`data.aspect_grouping`) each epoch's permutation is cut into batches of one
orientation instead, in a seeded batch order: still a pure function of (seed, iteration).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from trainer.data.coco_index import TrainImages, TrainIndex
from trainer.config import DataConfig
from trainer.data.dataset_check import ALLOW_SWITCHES, AnnotationFile, check_split, default_cache_dir
from trainer.errors import DatasetError
from trainer.data.image_check import read_image  # noqa: F401 - the one decoder (loaders and check)
from trainer.resize import resized_area  # noqa: F401 - re-exported (engine)

logger = logging.getLogger(__name__)


ANNOTATION_PREFIX = {"mask": "instances", "box": "instances", "keypoints": "person_keypoints"}


def split_paths(root: Path, split: str, detector: str = "mask") -> tuple[Path, Path]:
    """(annotation file, image folder) of a split, or a DatasetError saying what to put where."""
    prefix = ANNOTATION_PREFIX[detector]
    ann = Path(root) / "annotations" / f"{prefix}_{split}.json"
    images = Path(root) / split
    if not ann.is_file():
        raise DatasetError(
            f"annotation file not found: {ann} (expected a COCO layout: ROOT/annotations/{prefix}_{split}.json "
            f"and images in ROOT/{split}/, or set data.{{train,val}}_json and data.{{train,val}}_image_dir; "
            f"set data.root, or generate offline data with `python -m trainer.synthetic --out {root}"
            f"{' --keypoints' if detector == 'keypoints' else ''}`)"
        )
    if not images.is_dir():
        raise DatasetError(f"image folder not found: {images} (the images of split '{split}' belong there)")
    return ann, images


def split_files(cfg: DataConfig, which: str, detector: str = "mask") -> tuple[Path, Path]:
    """(annotation file, image folder) of the "train" or "val" split of a data config: the layout
    fields when set, else the COCO layout under `data.root` (person_keypoints_* for keypoints)."""
    ann, images = getattr(cfg, f"{which}_json"), getattr(cfg, f"{which}_image_dir")
    if ann is None:
        return split_paths(cfg.root, getattr(cfg, f"{which}_split"), detector)
    if not Path(ann).is_file():
        raise DatasetError(f"annotation file not found: {ann} (data.{which}_json)")
    if not Path(images).is_dir():
        raise DatasetError(f"image folder not found: {images} (data.{which}_image_dir)")
    return Path(ann), Path(images)


def load_coco(source: Path | AnnotationFile):
    """pycocotools COCO with its prints captured (logged at debug level); an AnnotationFile's
    already parsed JSON is indexed without reading the file again."""
    from pycocotools.coco import COCO

    ann = source if isinstance(source, AnnotationFile) else AnnotationFile(source)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            coco = COCO()
            coco.dataset = ann.data
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"{ann.path}: not a COCO instances file ({type(exc).__name__}: {exc})") from None
    logger.debug("pycocotools: %s", buf.getvalue().strip())
    return coco


def select_subset(image_ids: Sequence[Any], n: int | str, seed: int) -> list[Any]:
    """A seeded random subset of `n` ids; for one seed, smaller subsets lie inside larger ones.

    Nesting comes from taking prefixes of one fixed permutation of the sorted ids, so the 1k subset
    is the first 1k of the same order that gives the 10k subset.
    """
    ids = sorted(i if isinstance(i, str) else int(i) for i in image_ids)  # VOC's ids are strings
    if n == "all":
        return ids
    if n > len(ids):
        raise DatasetError(f"data.train_images: asked for {n} images but the split has only {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[: int(n)])


class CocoInstances(Dataset):
    """The evaluation split: every selected image, item i -> (uint8 image, {"image_id"}).

    Holds the pycocotools COCO that scoring needs; items read only the file names, kept in a list
    (the val split is small; the train split goes through `trainer.data.coco_index` instead).
    """

    def __init__(self, ann_file: Path, image_dir: Path, image_ids: Sequence[int] | None = None, *,
                 coco: Any = None):
        self.image_dir = Path(image_dir)
        self.coco = coco if coco is not None else load_coco(Path(ann_file))
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise DatasetError(f"{ann_file}: no categories")
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.image_ids = sorted(self.coco.getImgIds()) if image_ids is None else list(image_ids)

    @property
    def image_ids(self) -> list[int]:
        return self._ids

    @image_ids.setter
    def image_ids(self, ids: Sequence[int]) -> None:
        self._ids = list(ids)
        self._files = [self.coco.imgs[i]["file_name"] for i in self._ids]

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return read_image(self.image_dir / self._files[int(key)]), {"image_id": self._ids[int(key)]}


def hflip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


class StreamBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for iterations start..total-1, this rank's share of the global batch as (pos, index).

    With `groups` (one group id per image, e.g. `CocoInstances.aspect_groups()`), every batch holds
    images of one group, except at most one mixed batch per epoch made of the groups' remainders;
    epoch e (n // B batches; the last n % B images of its order sit out) splits the permutation of
    epoch e by group, keeping order, cuts each group into batches and shuffles the batch order with
    seed (seed, e, 1). Iteration i is batch i % (n // B) of epoch i // (n // B); slot j of it has
    stream position i*B + j, which fixes its flip.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, start_iter: int, total_iters: int,
                 rank: int = 0, world_size: int = 1, groups: Sequence[int] | None = None):
        if batch_size % world_size:
            raise DatasetError(f"optim.batch_size {batch_size} is not divisible by {world_size} workers")
        if groups is not None and len(groups) != num_images:
            raise DatasetError(f"{len(groups)} aspect groups for {num_images} images")
        if groups is not None and num_images < batch_size:
            raise DatasetError(f"data.aspect_grouping needs at least optim.batch_size={batch_size} images, "
                               f"got {num_images}")
        self.n, self.batch, self.seed = num_images, batch_size, seed
        self.start, self.total, self.rank, self.world = start_iter, total_iters, rank, world_size
        self.groups = None if groups is None else np.asarray(groups)
        self._perms: dict[int, np.ndarray] = {}
        self._grouped: dict[int, list[np.ndarray]] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def _index(self, position: int) -> int:
        return int(self._perm(position // self.n)[position % self.n])

    def _grouped_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._grouped:
            perm, b = self._perm(epoch), self.batch
            batches, rest = [], []
            for g in np.unique(self.groups):
                members = perm[self.groups[perm] == g]  # this group's images, in permutation order
                full = len(members) - len(members) % b
                batches += [members[k:k + b] for k in range(0, full, b)]
                rest.append(members[full:])
            leftovers = np.concatenate(rest)
            batches += [leftovers[k:k + b] for k in range(0, len(leftovers) - len(leftovers) % b, b)]
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            self._grouped.pop(epoch - 2, None)
            self._grouped[epoch] = [batches[k] for k in order]
        return self._grouped[epoch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_epoch = self.n // self.batch
        for it in range(self.start, self.total):
            if self.groups is None:
                positions = range(it * self.batch + self.rank, (it + 1) * self.batch, self.world)
                yield [(p, self._index(p)) for p in positions]
            else:
                batch = self._grouped_batches(it // per_epoch)[it % per_epoch]
                yield [(it * self.batch + j, int(batch[j])) for j in range(self.rank, self.batch, self.world)]

    def __len__(self) -> int:
        return max(self.total - self.start, 0)


def to_device_float(image: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """An image on `device` in [0, 1] floats. Loaders hand images over as uint8 (4x less to copy
    between processes and to the device); they become floats only there."""
    image = image.to(device, non_blocking=non_blocking)
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def start_workers(loader: Any) -> Iterator:
    """`iter(loader)` with the parent's Python objects frozen while its workers fork.

    A full garbage collection in a forked worker walks every container object it inherited and so
    writes (copies) their pages: ~80 MiB per worker seen in bench/coco_scale.py, more in a trainer
    holding a model and the val annotations. Objects in `gc.freeze()`'s permanent generation are
    never walked; the parent unfreezes right after the fork, so only the workers keep them frozen.
    """
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[tuple, tuple]:
    """(image, target) pairs -> (images, targets); module-level so DataLoader workers can pickle it."""
    return tuple(zip(*batch))  # type: ignore[return-value]


def check_data(cfg: DataConfig, detector: str = "mask") -> dict[str, tuple[AnnotationFile, Path]]:
    """Locate and check both splits of any COCO detector (trainer.data.dataset_check) before anything is
    built from them; the AnnotationFiles come back without what the check dropped."""
    located = {which: split_files(cfg, which, detector) for which in ("train", "val")}  # both exist, or fail now
    allow = [name for name in ALLOW_SWITCHES if getattr(cfg, name)]
    found = {}
    for which, (path, images) in located.items():
        ann = AnnotationFile(path)
        check_split(ann, images, allow=allow, cache_dir=cfg.cache_dir or default_cache_dir(path),
                    workers=cfg.check_workers)
        found[which] = (ann, images)
    return found


def build_datasets(cfg: DataConfig, stream_seed: int = 0) -> tuple[TrainImages, CocoInstances, list[int]]:
    """(train set, val set, chosen train image ids) for a data config.

    Both splits are checked first, so a defective set fails before any training step. The train
    split becomes a `TrainIndex` (cached by annotation hash) cut down to the chosen images; no
    Python annotation object outlives this call. `data.subset_seed` picks the images (shared by
    every init of a sweep); `stream_seed` fixes their order and flips.
    """
    (train_ann, train_dir), (val_ann, val_dir) = check_data(cfg).values()
    index = TrainIndex.load_or_build(train_ann, cfg.cache_dir or default_cache_dir(train_ann.path))
    train_ann.drop()
    chosen = select_subset(index.image_ids, cfg.train_images, cfg.subset_seed)
    if len(chosen) < len(index):
        index = index.subset(chosen)  # a subset trial holds only its images' records
    train = TrainImages(index, train_dir, hflip=cfg.hflip, seed=stream_seed)
    val = CocoInstances(val_ann.path, val_dir, coco=load_coco(val_ann))
    if cfg.val_images != "all":
        val.image_ids = val.image_ids[: cfg.val_images]
    if val.cat_ids != train.cat_ids:
        raise DatasetError(f"train and val splits have different categories ({train.cat_ids} vs {val.cat_ids})")
    return train, val, chosen
