"""trainer.evaluation.convert.paste_masks_rle against torchvision's paste_masks_in_image + pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torchvision.models.detection.roi_heads import paste_masks_in_image

from trainer.evaluation import convert as conv


def _torchvision_rles(masks, boxes, size, threshold):
    """What a user gets from a torchvision Mask R-CNN: pasted float masks, thresholded, encoded."""
    pasted = paste_masks_in_image(masks, boxes, size)[:, 0] > threshold
    rles = mask_util.encode(np.asfortranarray(pasted.numpy().transpose(1, 2, 0)).view(np.uint8))
    return [rle["counts"].decode("ascii") for rle in rles]


@pytest.mark.parametrize("kind", ["random", "plateaus", "faint", "ones"])
def test_paste_masks_rle_equals_torchvision_paste(kind):
    """Byte-identical RLE on random boxes (inside, across and along the borders) and masks."""
    gen = torch.Generator().manual_seed(len(kind))
    threshold = {"random": 0.5, "plateaus": 0.0, "faint": 0.4999, "ones": 0.5}[kind]
    for _ in range(40):
        height, width = (int(v) for v in torch.randint(1, 90, (2,), generator=gen))
        n = int(torch.randint(0, 25, (1,), generator=gen))
        # Boxes reach up to 3 px past every border, as the 30/28 expansion of a clipped box can;
        # a box wholly left of / above the image is the documented exception, so x1, y1 >= 0.
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([width + 2.0, height + 2.0]) - 3
        wh = torch.rand(n, 2, generator=gen) * torch.tensor([width * 1.2, height * 1.2])
        boxes = torch.cat([xy, (xy + wh).clamp(min=0)], dim=1)
        masks = torch.rand(n, 1, 28, 28, generator=gen)
        if kind == "plateaus":  # runs of ones through whole columns (continuing across columns)
            masks = (masks > 0.3).float()
        elif kind == "faint":  # every mask under the threshold, some within a few ulps of it
            masks = masks * 0.5
        elif kind == "ones":
            masks = torch.ones(n, 1, 28, 28)
        got = [rle["counts"] for rle in conv.paste_masks_rle(masks, boxes, (height, width), threshold)]
        assert got == _torchvision_rles(masks, boxes, (height, width), threshold), (height, width, n)
