"""What the box, keypoint and VOC data sets share: one split as the trainer and evaluation read it.

`DetectionSplit` owns the item contract and the stream's randomness; a subclass says how an image
is read (`_read`), what its training target is (`_target`), its size (`_size`) and whether it can
train (`_trainable`). Evaluation items are `(image, {"image_id"})`, indexed 0..len-1. Training
items are keyed `(position, index)` by the stream sampler (`trainer.data.coco.StreamBatchSampler`):
`(image, target)` with at least boxes, labels, image_id and image_size, flipped horizontally when
the draw seeded by (seed, position) says so, so a resumed run sees the same flips.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer.errors import DatasetError

logger = logging.getLogger(__name__)


def flip_drawn(seed: int, position: int) -> bool:
    """The fixed coin of stream position `position`: heads (flip) with probability 1/2."""
    return bool(np.random.default_rng([seed, position]).random() < 0.5)


class DetectionSplit(Dataset):
    """One split of a box / keypoint / VOC data set; see the module docstring."""

    image_ids: list
    train: bool = False
    hflip: bool = False
    seed: int = 0

    def _read(self, image_id: Any) -> torch.Tensor:
        raise NotImplementedError

    def _target(self, image_id: Any, hw: torch.Size) -> dict[str, Any]:
        raise NotImplementedError

    def _size(self, image_id: Any) -> tuple[int, int]:
        """(height, width) as the annotations give it."""
        raise NotImplementedError

    def _trainable(self, image_id: Any) -> bool:
        raise NotImplementedError

    def _keep_trainable(self, ids: Sequence[Any], where: str, what: str, refusal: str) -> list:
        """The ids that can train (logged as '<where>: n of m images have <what>'); none: `refusal`."""
        usable = [i for i in ids if self._trainable(i)]
        logger.info("%s: %d of %d images have %s (others skipped in training)", where, len(usable), len(ids), what)
        if not usable:
            raise DatasetError(refusal)
        return usable

    def aspect_groups(self) -> list[int]:
        return [0 if w >= h else 1 for h, w in (self._size(i) for i in self.image_ids)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self.train:
            image_id = self.image_ids[int(key)]
            return self._read(image_id), {"image_id": image_id}
        position, index = key
        image_id = self.image_ids[index]
        image = self._read(image_id)
        target = self._target(image_id, image.shape[-2:])
        if self.hflip and flip_drawn(self.seed, position):
            image, target = self.flip(image, target)
        return image, target

    def flip(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The image mirrored left-right and its boxes with it (subclasses mirror what else they carry)."""
        width = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        return image.flip(-1), {**target, "boxes": boxes}
