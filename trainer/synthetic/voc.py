"""Synthetic Pascal VOC: the shape scenes of trainer.synthetic.draw in VOC's on-disk layout, seeded.

    OUT/VOCdevkit/VOC2007/JPEGImages/<6-digit id>.jpg
    OUT/VOCdevkit/VOC2007/Annotations/<6-digit id>.xml     VOC XML: size, object/name/bndbox/difficult
    OUT/VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt

Boxes are VOC's 1-based inclusive pixel boxes of each object's visible part; an object with less
than 70% of it visible is marked `difficult` (VOC's "hard to recognise"), so evaluation has some to
ignore.
Class names are the shape names (`VOC_SHAPE_CLASSES`): train with data.voc_classes set to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from trainer.synthetic.draw import SHAPES, draw_scene

VOC_SHAPE_CLASSES = list(SHAPES)
DIFFICULT_BELOW = 0.7  # visible fraction under which an object is marked difficult
SPLITS = ("trainval", "test")


def voc_dir(out: Path) -> Path:
    return Path(out) / "VOCdevkit" / "VOC2007"


def _xml(image_id: str, width: int, height: int, objects: list[dict]) -> str:
    rows = [f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>",
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size><segmented>0</segmented>"]
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        rows.append(f"<object><name>{escape(o['name'])}</name><pose>Unspecified</pose><truncated>0</truncated>"
                    f"<difficult>{o['difficult']}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                    f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    rows.append("</annotation>")
    return "\n".join(rows) + "\n"


def _objects(layers: list[Any]) -> list[dict]:
    objects = []
    for layer in layers:
        ys, xs = np.nonzero(layer.visible)
        if xs.size == 0:
            continue
        frac = float(layer.visible.sum()) / max(float(layer.full.sum()), 1.0)
        objects.append({"name": SHAPES[layer.shape], "difficult": int(frac < DIFFICULT_BELOW),
                        "box": (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)})
    return objects


def generate_voc(out: Path, *, seed: int, counts: dict[str, int], width: int, height: int, max_objects: int,
                 rng_for: Callable[[str, int], np.random.Generator]) -> dict[str, Any]:
    """Write the VOC-layout set; ids run on across splits (trainval first), as in VOC's one image pool."""
    root = voc_dir(out)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"root": root, "splits": {}}
    next_id = 1
    for split in SPLITS:
        ids, n_obj, n_diff = [], 0, 0
        for i in range(counts[split]):
            image_id = f"{next_id:06d}"
            next_id += 1
            img, layers = draw_scene(rng_for(split, i), height, width, max_objects=max_objects, empty_prob=0.0,
                                     crowd_prob=0.0)
            objects = _objects(layers)
            Image.fromarray(img, "RGB").save(root / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=95)
            (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, width, height, objects))
            ids.append(image_id)
            n_obj += len(objects)
            n_diff += sum(o["difficult"] for o in objects)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        stats["splits"][split] = {"images": len(ids), "objects": n_obj, "difficult": n_diff}
    return stats
