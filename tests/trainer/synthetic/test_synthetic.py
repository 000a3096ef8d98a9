"""Tests of trainer.synthetic: COCO-valid, occlusion-correct, deterministic offline data sets."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from trainer.errors import ConfigError
from trainer.synthetic.cli import main
from trainer.synthetic.datasets import CATEGORIES, generate_classification, generate_detection
from trainer.synthetic.draw import CLS_SHAPES, SHAPES

REPO = Path(__file__).resolve().parents[3]
# Small but with high empty/crowd rates, so every annotation path shows up in a few dozen images.
SMALL = dict(num_train=40, num_val=8, empty_prob=0.15, crowd_prob=0.4)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints timing chatter
        return COCO(str(path))


def _mask_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@pytest.fixture(scope="module")
def det(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return generate_detection(tmp_path_factory.mktemp("det"), seed=3, **SMALL)


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Non-square (catches h/w swaps) and at the smallest allowed side (tiny shapes)."""
    return generate_detection(tmp_path_factory.mktemp("odd"), seed=5, width=24, height=40, **SMALL)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_detection(tmp_path / name, seed=seed, num_train=6, num_val=2, crowd_prob=0.5)
        generate_classification(tmp_path / name, seed=seed, per_class_train=2, per_class_val=1)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert len(a) == 2 + 6 + 2 + len(CLS_SHAPES) * 3
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_images_do_not_depend_on_counts(tmp_path: Path, det: dict) -> None:
    generate_detection(tmp_path, seed=3, num_train=3, num_val=1, empty_prob=0.15, crowd_prob=0.4)
    for split in ("train", "val"):
        for p in (tmp_path / split).iterdir():
            assert p.read_bytes() == (det["splits"][split]["image_dir"] / p.name).read_bytes()


def test_rerun_with_fewer_images_removes_stale_ones(tmp_path: Path) -> None:
    generate_detection(tmp_path, num_train=5, num_val=2)
    generate_detection(tmp_path, num_train=2, num_val=0)
    assert len(list((tmp_path / "train").iterdir())) == 2
    assert not list((tmp_path / "val").iterdir())


def test_categories_non_contiguous_with_supercategory(det: dict) -> None:
    ids = [c["id"] for c in CATEGORIES]
    assert len(ids) >= 3 and ids != list(range(1, len(ids) + 1))
    assert all(c["name"] and c["supercategory"] for c in CATEGORIES)
    doc = json.loads(det["splits"]["train"]["annotation_file"].read_text())
    assert doc["categories"] == CATEGORIES


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("dataset", ["det", "odd"])
def test_coco_masks_match_area_bbox_and_do_not_overlap(
    request: pytest.FixtureRequest, dataset: str, split: str
) -> None:
    info = request.getfixturevalue(dataset)["splits"][split]
    coco = _load_coco(info["annotation_file"])
    assert len(coco.imgs) == info["images"]
    for image_id, img in coco.imgs.items():
        path = info["image_dir"] / img["file_name"]
        assert Image.open(path).size == (img["width"], img["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        union = np.zeros((img["height"], img["width"]), dtype=np.int32)
        for ann in anns:
            mask = coco.annToMask(ann)
            assert int(mask.sum()) == ann["area"] > 0
            assert _mask_bbox(mask) == ann["bbox"]
            assert ann["category_id"] in coco.cats
            union += mask
        assert union.max() <= 1, f"overlapping masks in image {image_id}"
        objects = sum(1 for a in anns if not a["iscrowd"])
        assert objects <= 6 and (objects >= 1 or not anns)


def test_every_segmentation_format_and_empty_images_occur(det: dict) -> None:
    info = det["splits"]["train"]
    anns = json.loads(info["annotation_file"].read_text())["annotations"]
    kinds = Counter(
        "crowd" if a["iscrowd"] else "polygon" if isinstance(a["segmentation"], list) else "rle" for a in anns
    )
    assert kinds["polygon"] and kinds["rle"] and kinds["crowd"]
    for a in anns:  # compressed RLE (str counts) for occluded objects, COCO's list counts for crowds
        if isinstance(a["segmentation"], dict):
            assert isinstance(a["segmentation"]["counts"], list if a["iscrowd"] else str)
    assert info["empty_images"] >= 1
    assert len({a["image_id"] for a in anns}) == info["images"] - info["empty_images"]


def test_no_crowds_or_empties_unless_asked(tmp_path: Path) -> None:
    res = generate_detection(tmp_path, num_train=20, num_val=0, empty_prob=0.0, crowd_prob=0.0)
    stats = res["splits"]["train"]
    assert stats["crowd"] == 0 and stats["empty_images"] == 0


def test_classification_loads_with_imagefolder(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    res = generate_classification(tmp_path, per_class_train=3, per_class_val=2, size=40)
    # More classes than detection (as ImageNet has more than COCO), the detection shapes among them.
    assert len(CLS_SHAPES) == 16 and CLS_SHAPES[:len(SHAPES)] == SHAPES
    for split, per_class in (("train", 3), ("val", 2)):
        ds = ImageFolder(str(tmp_path / "classification" / split))
        assert ds.classes == sorted(CLS_SHAPES)
        assert Counter(label for _, label in ds.samples) == {i: per_class for i in range(len(CLS_SHAPES))}
        assert ds[0][0].size == (40, 40)
        assert res["splits"][split]["images"] == per_class * len(CLS_SHAPES)
    # Fewer classes later: the folders of the dropped ones go, so ImageFolder sees only the 5 asked for.
    generate_classification(tmp_path, per_class_train=1, per_class_val=1, size=40, classes=5)
    assert ImageFolder(str(tmp_path / "classification" / "train")).classes == sorted(CLS_SHAPES[:5])
    with pytest.raises(ConfigError):
        generate_classification(tmp_path, classes=len(CLS_SHAPES) + 1)


def test_classification_without_the_detection_shapes(tmp_path: Path) -> None:
    """A pre-training set whose categories are not the target's: only the 12 classification-only shapes."""
    from torchvision.datasets import ImageFolder

    res = generate_classification(tmp_path, per_class_train=1, per_class_val=1, size=32, detection_shapes=False,
                                  classes=12)
    assert res["classes"] == list(CLS_SHAPES[len(SHAPES):])
    assert ImageFolder(str(tmp_path / "classification" / "train")).classes == sorted(CLS_SHAPES[len(SHAPES):])
    with pytest.raises(ConfigError, match="without the detection shapes"):
        generate_classification(tmp_path, classes=13, detection_shapes=False)


def test_classification_is_drawn_apart_from_detection(tmp_path: Path) -> None:
    """Same seed, same size: no classification crop is a detection image (separate random streams)."""
    generate_detection(tmp_path, seed=0, num_train=8, num_val=2, width=32, height=32)
    generate_classification(tmp_path, seed=0, per_class_train=2, per_class_val=1, size=32)
    det = {p.read_bytes() for p in (tmp_path / "train").glob("*.png")}
    crops = {p.read_bytes() for p in (tmp_path / "classification").rglob("*.png")}
    assert det and crops and not det & crops


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_train=-1), dict(width=8), dict(empty_prob=1.5), dict(max_objects=0), dict(seed=-2)],
)
def test_api_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        generate_detection(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_writes_both_sets(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    cmd = [sys.executable, "-m", "trainer.synthetic", "--out", str(out), "--train", "4", "--val", "2",
           "--size", "48", "--classification", "--cls-train", "2", "--cls-val", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 train + 2 val" in proc.stderr
    assert len(_load_coco(out / "annotations" / "instances_train.json").imgs) == 4
    assert Image.open(out / "val" / "000000000002.png").size == (48, 48)
    assert len(list((out / "classification" / "val").rglob("*.png"))) == len(CLS_SHAPES)


def test_cli_bad_argument_is_one_line_exit_2(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "trainer.synthetic", "--out", str(tmp_path), "--train", "-5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--train" in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [["--size", "8"], ["--empty-prob", "-0.1"], ["--train", "x"], ["--no-detection"], ["--out-is-file"]],
)
def test_main_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    out = tmp_path / "out"
    if argv == ["--out-is-file"]:
        out.write_text("not a directory")
        argv = []
    try:
        rc = main(["--out", str(out), *argv])
    except SystemExit as e:  # argparse's own errors (a non-integer) exit from parse_args
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err
