"""Pascal VOC: XML reading, the VOC07 mAP against a hand-computed case, a box trial, bad files."""

import numpy as np
import pytest

from tests.conftest import tiny_config
from trainer.__main__ import main as trainer_main
from trainer.config import build_config
from trainer.engine.train_loop import train
from trainer.errors import ConfigError
from trainer.evaluation.voc import class_pr, score_voc, voc_ap
from trainer.synthetic.datasets import generate_voc
from trainer.data.voc import VocDetection, parse_annotation

CLASSES = ["ellipse", "rectangle", "triangle", "star"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("voc")
    return generate_voc(out, seed=0, num_trainval=24, num_test=8, width=64, height=64)["root"]


def _records():
    a = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), "labels": np.array([1, 1]),
         "difficult": np.array([False, True])}
    b = {"boxes": np.array([[0, 0, 10, 10], [30, 30, 40, 40]], np.float32), "labels": np.array([1, 2]),
         "difficult": np.array([False, False])}
    return {"a": a, "b": b}


def test_voc07_map_matches_a_hand_computed_case():
    dets = [  # class 1 (2 non-difficult boxes), by score: TP, on a difficult box (ignored), FP, TP, duplicate FP
        {"image_id": "a", "label": 1, "score": 0.9, "box": [0, 0, 10, 10]},
        {"image_id": "a", "label": 1, "score": 0.8, "box": [20, 20, 30, 30]},
        {"image_id": "b", "label": 1, "score": 0.7, "box": [50, 50, 60, 60]},
        {"image_id": "b", "label": 1, "score": 0.6, "box": [1, 0, 10, 10]},  # IoU 0.9 with b's box
        {"image_id": "a", "label": 1, "score": 0.5, "box": [0, 0, 10, 10]},
        {"image_id": "a", "label": 3, "score": 0.4, "box": [0, 0, 5, 5]},  # class 3 has no box: not in the mean
    ]
    # Class 1: recall/precision after each counted detection (0.5, 1), (0.5, 1/2), (1, 2/3), (1, 1/2).
    # 11-point: recall thresholds 0..0.5 -> max precision 1 (6 points), 0.6..1.0 -> 2/3 (5 points).
    ap07 = (6 * 1.0 + 5 * 2 / 3) / 11
    # Area: recall 0 -> 0.5 at precision 1, 0.5 -> 1 at the envelope's 2/3.
    ap_area = 0.5 * 1.0 + 0.5 * 2 / 3
    gt1 = {k: {"boxes": r["boxes"][r["labels"] == 1], "difficult": r["difficult"][r["labels"] == 1]}
           for k, r in _records().items()}
    recall, precision, npos = class_pr([(d["image_id"], d["score"], d["box"]) for d in dets[:5]], gt1)
    assert npos == 2
    assert voc_ap(recall, precision, True) == pytest.approx(ap07)
    assert voc_ap(recall, precision, False) == pytest.approx(ap_area)
    # Class 2 (one box in b, no detection) has AP 0; the mean runs over classes 1 and 2.
    metrics = score_voc(dets, _records(), ["c1", "c2", "c3"])
    assert metrics == pytest.approx({"voc/mAP": ap07 / 2, "voc/mAP_area": ap_area / 2})


def test_voc_xml_reading_keeps_ids_names_and_difficult(voc_root):
    ds = VocDetection(voc_root, "test", CLASSES)
    assert ds.image_ids == [f"{i:06d}" for i in range(25, 33)]  # VOC's own string ids, trainval first
    rec = ds.records["000025"]
    xml = (voc_root / "Annotations" / "000025.xml").read_text()
    first = xml.split("<xmin>")[1].split("<")[0]
    assert rec["boxes"][0, 0] == float(first) - 1  # 1-based inclusive -> continuous
    assert ds.label_to_cat == {1: "ellipse", 2: "rectangle", 3: "triangle", 4: "star"}
    train = VocDetection(voc_root, "trainval", CLASSES)
    assert any(r["difficult"].any() for r in train.records.values())


def test_voc_trial_reports_map(voc_root, tmp_path):
    cfg = tiny_config(voc_root, tmp_path / "voc", schedule={"iters": 4, "drops": [3], "warmup_iters": 1},
                      eval={"period": 0, "batch_size": 8})
    cfg["model"]["task"] = "box"
    cfg["data"].update(format="voc", train_split="trainval", val_split="test", voc_classes=CLASSES)
    result = train(build_config(cfg))
    assert result.status == "finished" and 0.0 <= result.final_metrics["voc/mAP"] <= 1.0
    assert "voc/mAP_area" in result.final_metrics and not any(k.startswith("segm") for k in result.final_metrics)
    with pytest.raises(ConfigError, match="set model.task=box"):
        build_config({**cfg, "model": {**cfg["model"], "task": "mask"}})


@pytest.mark.parametrize("edit, words", [
    (lambda x: x.replace("</annotation>", ""), "not valid XML"),
    (lambda x: x.replace("<name>ellipse</name>", "<name>blob</name>", 1).replace(
        "<name>rectangle</name>", "<name>blob</name>", 1).replace("<name>triangle</name>", "<name>blob</name>", 1)
        .replace("<name>star</name>", "<name>blob</name>", 1), "unknown class 'blob'"),
    (lambda x: x.replace("<xmin>", "<xmin>9", 1), "is not inside the"),
])
def test_bad_voc_file_is_refused_with_one_line(voc_root, tmp_path, capsys, edit, words):
    bad = tmp_path / "VOC2007"
    (bad / "Annotations").mkdir(parents=True)
    for sub in ("JPEGImages", "ImageSets"):
        (bad / sub).symlink_to(voc_root / sub)
    for xml in (voc_root / "Annotations").iterdir():
        text = xml.read_text()
        (bad / "Annotations" / xml.name).write_text(edit(text) if xml.name == "000003.xml" else text)
    with pytest.raises(Exception):
        parse_annotation(bad / "Annotations" / "000003.xml", {c: i for i, c in enumerate(CLASSES)})
    rc = trainer_main(["--set", "model.task=box", "--set", "data.format=voc", "--set", f"data.root={bad}",
                       "--set", "data.train_split=trainval", "--set", "data.val_split=test",
                       "--set", f"data.voc_classes={CLASSES}", "--set", f"runtime.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err and "000003.xml" in err


def test_synthetic_cli_writes_voc_and_keypoint_sets(tmp_path):
    from trainer.synthetic.cli import main

    assert main(["--out", str(tmp_path), "--voc", "--keypoints", "--train", "4", "--val", "2"]) == 0
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    assert (voc / "ImageSets" / "Main" / "test.txt").read_text().split() == ["000005", "000006"]
    assert len(list((voc / "JPEGImages").glob("*.jpg"))) == 6 == len(list((voc / "Annotations").glob("*.xml")))
    assert (tmp_path / "annotations" / "person_keypoints_val.json").is_file()
    assert not (tmp_path / "annotations" / "instances_train.json").exists()  # no shape set alongside


@pytest.mark.parametrize("allow", [False, True])
def test_truncated_voc_jpeg_is_refused_or_dropped(voc_root, tmp_path, capsys, caplog, allow):
    from trainer.config import DataConfig
    from trainer.data.voc import build_voc_datasets

    bad = tmp_path / "VOC2007"
    bad.mkdir()
    for sub in ("Annotations", "ImageSets"):
        (bad / sub).symlink_to(voc_root / sub)
    (bad / "JPEGImages").mkdir()
    for jpg in (voc_root / "JPEGImages").iterdir():
        data = jpg.read_bytes()
        (bad / "JPEGImages" / jpg.name).write_bytes(data[: len(data) // 2] if jpg.name == "000003.jpg" else data)
    split = next(s for s in ("trainval", "test") if "000003" in (voc_root / "ImageSets" / "Main" / f"{s}.txt").read_text())
    if not allow:
        rc = trainer_main(["--set", "model.task=box", "--set", "data.format=voc", "--set", f"data.root={bad}",
                           "--set", "data.train_split=trainval", "--set", "data.val_split=test",
                           "--set", f"data.voc_classes={CLASSES}", "--set", f"runtime.output_dir={tmp_path / 'o'}"])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{split}.txt: 1 images are missing or unreadable (first: 000003.jpg: " in err and "truncated" in err
        return
    train, val, _ = build_voc_datasets(DataConfig(root=bad, format="voc", train_split="trainval", val_split="test",
                                                  voc_classes=CLASSES, allow_unreadable_images=True))
    assert "000003" not in train.image_ids and "000003" not in val.image_ids
    assert "1 images are missing or unreadable" in caplog.text
