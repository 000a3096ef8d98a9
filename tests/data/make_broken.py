"""A corpus of broken real-format COCO sets, made from the synthetic generator's output (no hand-edited binaries).

    python tests/data/make_broken.py --task mask --out /tmp/broken     # or box, keypoints

writes OUT/clean (the generator's set, moved into a non-COCO layout) and one folder per defect beside
it, each laid out for the four layout fields only (`data.train_json`, `train_image_dir`, `val_json`,
`val_image_dir`; `layout(folder)` gives them):

    FOLDER/labels/train.json  FOLDER/labels/val.json  FOLDER/pictures_train/  FOLDER/pictures_val/

Defects (what a real set has gone wrong with; the byte damage is done here, to real PNG/JPEG files):

    truncated_train_image  a train PNG cut in half (its header, so its size, still reads)
    truncated_val_image    a val image re-encoded as JPEG, then cut in half
    short_polygon          a train annotation whose polygon has 2 points (4 coordinates)
    odd_polygon            a val annotation whose polygon has 7 coordinates
    nan_box_val            a val annotation whose bbox height is NaN
    unreadable_image       a train "PNG" that is text

`DEFECTS[name]` says which split, which `data.allow_*` switch drops it, and whether an image or an
annotation goes. The tests generate the corpus into a temporary folder at test time
(tests/trainer/data/test_broken_corpus.py), so nothing binary is committed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (split, allow switch, what goes: "image" or "annotation")
DEFECTS = {
    "truncated_train_image": ("train", "allow_unreadable_images", "image"),
    "truncated_val_image": ("val", "allow_unreadable_images", "image"),
    "short_polygon": ("train", "allow_bad_segmentation", "annotation"),
    "odd_polygon": ("val", "allow_bad_segmentation", "annotation"),
    "nan_box_val": ("val", "allow_bad_boxes", "annotation"),
    "unreadable_image": ("train", "allow_unreadable_images", "image"),
}
PREFIX = {"mask": "instances", "box": "instances", "keypoints": "person_keypoints"}


def layout(folder: Path) -> dict[str, str]:
    """The four layout fields of a corpus folder (a `data:` section without `root`)."""
    folder = Path(folder)
    return {"train_json": str(folder / "labels" / "train.json"), "train_image_dir": str(folder / "pictures_train"),
            "val_json": str(folder / "labels" / "val.json"), "val_image_dir": str(folder / "pictures_val")}


def _generate(task: str, out: Path, seed: int) -> None:
    from trainer.synthetic.datasets import generate_detection, generate_keypoints

    if task == "keypoints":
        generate_keypoints(out, seed=seed, num_train=8, num_val=6, width=64, height=64)
    else:
        generate_detection(out, seed=seed, num_train=8, num_val=6, width=64, height=64, crowd_prob=0.0)


def _relayout(coco_root: Path, task: str, clean: Path) -> None:
    (clean / "labels").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(coco_root / "annotations" / f"{PREFIX[task]}_{split}.json", clean / "labels" / f"{split}.json")
        shutil.copytree(coco_root / split, clean / f"pictures_{split}")


def _target(doc: dict, need_box: bool = True) -> tuple[dict, dict]:
    """(an annotation with a finite box of >= 2x2 px, its image): the one a defect is put into."""
    images = {im["id"]: im for im in doc["images"]}
    for ann in sorted(doc["annotations"], key=lambda a: a["id"]):
        if not ann.get("iscrowd", 0) and (not need_box or min(ann["bbox"][2:]) >= 2):
            return ann, images[ann["image_id"]]
    raise SystemExit("no annotation to damage")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_train_image(doc: dict, folder: Path) -> str:
    _, image = _target(doc)
    _truncate(folder / "pictures_train" / image["file_name"])
    return image["file_name"]


def _truncated_val_image(doc: dict, folder: Path) -> str:
    _, image = _target(doc)
    old = folder / "pictures_val" / image["file_name"]
    buf = io.BytesIO()
    with Image.open(old) as im:
        im.convert("RGB").save(buf, "JPEG", quality=90)
    old.unlink()
    image["file_name"] = Path(image["file_name"]).with_suffix(".jpg").name
    (folder / "pictures_val" / image["file_name"]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return image["file_name"]


def _polygon(ann: dict, coords: int) -> list[float]:
    x, y, w, h = ann["bbox"]
    corners = [x, y, x + w, y, x + w, y + h, x, y + h]
    return [float(v) for v in (corners * 2)[:coords]]


def _short_polygon(doc: dict, folder: Path) -> str:
    ann, _ = _target(doc)
    ann["segmentation"] = [_polygon(ann, 4)]
    return f"ann {ann['id']}"


def _odd_polygon(doc: dict, folder: Path) -> str:
    ann, _ = _target(doc)
    ann["segmentation"] = [_polygon(ann, 7)]
    return f"ann {ann['id']}"


def _nan_box(doc: dict, folder: Path) -> str:
    ann, _ = _target(doc)
    ann["bbox"][3] = math.nan
    return f"ann {ann['id']}"


def _unreadable_image(doc: dict, folder: Path) -> str:
    _, image = _target(doc)
    (folder / "pictures_train" / image["file_name"]).write_text("not an image: a text file with a .png name\n")
    return image["file_name"]


DAMAGE: dict[str, Callable[[dict, Path], str]] = {
    "truncated_train_image": _truncated_train_image, "truncated_val_image": _truncated_val_image,
    "short_polygon": _short_polygon, "odd_polygon": _odd_polygon, "nan_box_val": _nan_box,
    "unreadable_image": _unreadable_image,
}


def make_corpus(task: str, out: Path, seed: int = 0) -> dict[str, Any]:
    """Write OUT/clean and OUT/<defect> for every defect; return {defect: what it names} (a file
    name or "ann ID"), the string a refusal must contain."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    _generate(task, out / "generated", seed)
    _relayout(out / "generated", task, out / "clean")
    shutil.rmtree(out / "generated")
    named = {}
    for defect, (split, _, _) in DEFECTS.items():
        folder = shutil.copytree(out / "clean", out / defect)
        path = folder / "labels" / f"{split}.json"
        doc = json.loads(path.read_text())
        named[defect] = DAMAGE[defect](doc, folder)
        path.write_text(json.dumps(doc))  # NaN is written as JSON's NaN, as Python's json reads it
    (out / "corpus.json").write_text(json.dumps({"task": task, "seed": seed, "named": named}, indent=1))
    return named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(PREFIX), default="mask")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for defect, named in make_corpus(args.task, args.out, args.seed).items():
        print(f"{defect}: {args.out / defect} ({named})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
