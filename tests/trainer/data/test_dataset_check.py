"""Dataset defects are found up front: one hand-made set per defect, each failing with one line."""

import json
import shutil

import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config
from trainer.__main__ import main
from trainer.config import DataConfig
from trainer.data.coco import build_datasets
from trainer.data.dataset_check import AnnotationFile, check_split
from trainer.errors import DatasetError


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    from trainer.synthetic.datasets import generate_detection

    root = tmp_path_factory.mktemp("clean")
    generate_detection(root, seed=1, num_train=8, num_val=4, width=48, height=40)
    return root


@pytest.fixture
def root(clean_root, tmp_path):
    """A private copy of the clean set, for one defect."""
    return shutil.copytree(clean_root, tmp_path / "set", ignore=shutil.ignore_patterns(".trainer_cache"))


def _entries(folder):
    return [p for p in folder.iterdir() if p.suffix != ".lock"] if folder.exists() else []


def _edit(root, split, change):
    path = root / "annotations" / f"instances_{split}.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


def _check(root, split="train", **kw):
    return check_split(AnnotationFile(root / "annotations" / f"instances_{split}.json"), root / split, **kw)


def _unknown_category(doc):
    for ann in doc["annotations"][2:4]:
        ann["category_id"] = 99


def _unlisted_image(doc):
    doc["annotations"][0]["image_id"] = 12345


def _crowd_size(doc):
    crowd = doc["annotations"][4]  # made a crowd region whose RLE is 20x20 on a 48x40 image
    crowd["iscrowd"], crowd["segmentation"] = 1, {"size": [20, 20], "counts": [0, 400]}


def _json_size(doc):
    """Widen the JSON size of the first image whose masks are all polygons (an RLE mask would
    then also differ from its image: a defect of its own)."""
    rle_images = {a["image_id"] for a in doc["annotations"] if isinstance(a["segmentation"], dict)}
    next(im for im in doc["images"] if im["id"] not in rle_images)["width"] = 50


DEFECTS = {
    "category": (_unknown_category, "2 annotations have a category_id not in 'categories' (first: ann 3 -> category 99"),
    "unlisted": (_unlisted_image, "1 annotations point at an image_id not in 'images' (first: ann 1 -> image 12345)"),
    "crowd": (_crowd_size, "1 RLE masks (crowd regions or objects) differ in size from their image"),
    "size": (_json_size, "1 images differ in size between the JSON and the file (first: 0000000000"),
}


def test_clean_set_passes_and_is_cached(root):
    assert _check(root, cache_dir=root / "cache") == 0
    assert len(_entries(root / "cache")) == 1
    assert _check(root, cache_dir=root / "cache") == 0
    assert len(_entries(root / "cache")) == 1  # answered by the cache, nothing new written
    # an image file that changes (here: truncated, header intact) is decoded again despite the cache
    image = root / "train" / "000000000002.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"1 listed image files are missing or unreadable \(first: 000000000002\.png: "):
        _check(root, cache_dir=root / "cache")
    shutil.rmtree(root / "train")
    (root / "train").mkdir()
    with pytest.raises(DatasetError, match="8 listed image files are missing"):
        _check(root, cache_dir=root / "cache")


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_is_one_line_with_count_and_offenders(root, defect):
    change, message = DEFECTS[defect]
    _edit(root, "train", change)
    with pytest.raises(DatasetError) as err:
        _check(root, cache_dir=root / "cache")
    text = str(err.value)
    assert "\n" not in text and message in text, text
    with pytest.raises(DatasetError, match="dataset check of"):  # the cache keeps findings, not verdicts
        _check(root, cache_dir=root / "cache")


def test_missing_file_and_several_defects_in_one_line(root):
    (root / "val" / "000000000003.png").unlink()
    with pytest.raises(DatasetError, match=r"1 listed image files are missing or unreadable \(first: 000000000003\.png\)"):
        _check(root, "val")
    _edit(root, "val", lambda doc: (_unknown_category(doc), _json_size(doc)))
    with pytest.raises(DatasetError) as err:
        _check(root, "val")
    text = str(err.value)
    assert "\n" not in text and text.count(";") == 2 and "category_id" in text and "missing" in text
    assert "JSON 50x40 file 48x40" in text


def test_rle_object_size_mismatch(root):
    def shrink(doc):
        ann = next(a for a in doc["annotations"] if isinstance(a["segmentation"], dict))
        ann["segmentation"]["size"] = [20, 20]
    _edit(root, "train", shrink)
    with pytest.raises(DatasetError, match=r"1 RLE masks \(crowd regions or objects\) differ in size"):
        _check(root)


def test_size_mismatch_opt_out_warns_with_the_count(root, caplog):
    _edit(root, "train", _json_size)
    assert _check(root, allow_size_mismatch=True, cache_dir=root / "cache") == 0
    assert "1 images differ in size" in caplog.text and "allow_size_mismatch" in caplog.text
    with pytest.raises(DatasetError, match="differ in size"):  # the cache keeps findings, not verdicts
        _check(root, cache_dir=root / "cache")


def test_degenerate_boxes_are_dropped_with_a_count(root, caplog):
    def degenerate(doc):
        doc["annotations"][0]["bbox"][2] = 0.0
        doc["annotations"][1]["bbox"][3] = float("nan")
    _edit(root, "train", degenerate)
    with pytest.raises(DatasetError, match=r"1 annotations have a bbox that is not 4 finite numbers \(first: ann 2 "
                                           r"bbox \[.*nan\]\) \[data.allow_bad_boxes: true drops them\]"):
        _check(root)
    assert _check(root, allow=["allow_bad_boxes"]) == 2
    assert "1 annotations with an empty box dropped (first: ann 1" in caplog.text
    assert "1 annotations have a bbox that is not 4 finite numbers (first: ann 2" in caplog.text
    cfg = DataConfig(root=root, train_split="train", val_split="val", hflip=False, allow_bad_boxes=True)
    train, _, _ = build_datasets(cfg)
    doc = json.loads((root / "annotations" / "instances_train.json").read_text())
    plain = [a for a in doc["annotations"] if not a["iscrowd"]]
    assert len(train.index.labels) == len(plain) - 2  # the two degenerate boxes never train
    targets = [train[(0, row)][1] for row in range(len(train))]
    assert sum(len(t["boxes"]) for t in targets) == len(plain) - 2
    assert all(torch.isfinite(t["boxes"]).all() and (t["boxes"][:, 2:] > t["boxes"][:, :2]).all() for t in targets)


@pytest.mark.parametrize("defect", ["category", "missing_train_image", "size"])
def test_trial_with_one_defect_exits_2_before_any_step(root, tmp_path, capsys, defect):
    if defect == "missing_train_image":
        (root / "train" / "000000000005.png").unlink()
        expected = "1 listed image files are missing or unreadable (first: 000000000005.png)"
    else:
        change, expected = DEFECTS[defect]
        _edit(root, "train", change)
    cfg = tiny_config(root, tmp_path / "out", schedule={"iters": 4, "drops": [3], "warmup_iters": 1})
    (tmp_path / "trial.json").write_text(json.dumps(cfg))
    assert main(["--config", str(tmp_path / "trial.json")]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: dataset check of ") and expected in lines[0], lines
    assert "train/loss" not in captured.out + captured.err
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_any_layout(root, tmp_path):
    moved = tmp_path / "elsewhere"
    (moved / "ann").mkdir(parents=True)
    shutil.move(root / "train", moved / "pictures")
    shutil.copy(root / "annotations" / "instances_train.json", moved / "ann" / "mine.json")
    cfg = DataConfig(root=root, train_split="train", val_split="val", train_json=moved / "ann" / "mine.json",
                     train_image_dir=moved / "pictures", train_images=5)
    train, val, chosen = build_datasets(cfg)
    assert len(chosen) == 5 and train.image_dir == moved / "pictures" and len(val) == 4
    image, _ = train[(0, 0)]
    assert image.shape[-2:] == (40, 48)
    with pytest.raises(ValueError, match="train_json and train_image_dir go together"):
        DataConfig(train_json=moved / "ann" / "mine.json")


def test_pool_decode_finds_what_the_inline_decode_finds(root):
    """More files than POOL_MIN go through the process pool; its findings equal one process's."""
    from trainer.data.image_check import POOL_MIN, decode_findings

    many = root / "many"
    many.mkdir()
    sources = sorted((root / "train").iterdir())
    entries = []
    for k in range(POOL_MIN + 40):
        src = sources[k % len(sources)]
        (many / f"{k:05d}.png").symlink_to(src)
        with Image.open(src) as im:
            w, h = im.size
        entries.append((k, f"{k:05d}.png", w + (k == 7), h))  # entry 7: the JSON says 1 px wider
    data = sources[0].read_bytes()
    (many / "00100.png").unlink()
    (many / "00100.png").write_bytes(data[: len(data) // 2])  # truncated, header intact
    (many / "00200.png").unlink()  # missing
    pooled = decode_findings(many, entries, workers=2)
    assert sorted(pooled) == sorted(decode_findings(many, entries, workers=1))
    assert [(p, kind) for p, kind, _ in sorted(pooled)] == [(7, "mismatch"), (100, "missing"), (200, "missing")]
