"""Every task's CLI against the broken corpus (tests/data/make_broken.py, generated into tmp at test time).

For mask, box and keypoints, configured only through the four layout fields: the clean set trains and
evaluates; each defect is refused with exit 2 and one line naming the file or annotation, before any
training step; with its `data.allow_*` switch it is a logged drop, gone from training and from the
evaluation ground truth.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config
from tests.data.make_broken import DEFECTS, layout, make_corpus
from trainer.__main__ import main
from trainer.config import build_config

REPO = Path(__file__).resolve().parents[3]
TASKS = ("mask", "box", "keypoints")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{task: (corpus folder, {defect: what the refusal names})}, built once per module."""
    out = tmp_path_factory.mktemp("broken")
    return {task: (out / task, make_corpus(task, out / task)) for task in TASKS}


def _config(task: str, folder: Path, out: Path, **data) -> dict:
    cfg = tiny_config(folder / "no-coco-root-here", out, schedule={"iters": 2, "drops": [1], "warmup_iters": 1},
                      eval={"period": 0, "batch_size": 6, "num_workers": 0}, checkpoint={"period": 0})
    cfg["data"] = {**layout(folder), "num_workers": 0, **data}
    cfg["model"]["task"] = task
    if task == "keypoints":
        cfg["model"]["keypoint_head_channels"] = 32
    return cfg


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_is_one_line_exit_2_before_any_step(corpus, tmp_path, capsys, caplog, task, defect):
    folder, named = corpus[task]
    split = DEFECTS[defect][0]
    cfg = _config(task, folder / defect, tmp_path / "out")
    with caplog.at_level(logging.INFO):
        assert main(["--config", str(_write(cfg, tmp_path / "trial.json"))]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: dataset check of {folder / defect / 'labels' / split}.json: ")
    assert named[defect] in lines[0] and f"data.{DEFECTS[defect][1]}: true drops them" in lines[0]
    assert "Traceback" not in err + caplog.text and "iter " not in caplog.text
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("task", TASKS)
def test_real_cli_refuses_a_truncated_train_image_in_one_line(corpus, tmp_path, task):
    folder, named = corpus[task]
    cfg = _write(_config(task, folder / "truncated_train_image", tmp_path / "out"), tmp_path / "trial.json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(cfg)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and named["truncated_train_image"] in lines[0] and "truncated" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and " iter " not in proc.stderr


# One training run per task: the clean set, and a defect dropped by its switch (a different kind per task).
RUNS = {"mask": "truncated_val_image", "box": "nan_box_val", "keypoints": "odd_polygon"}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("variant", ["clean", "allowed"])
def test_layout_fields_alone_train_and_evaluate(corpus, tmp_path, caplog, task, variant):
    from trainer.engine.train_loop import train

    folder, _ = corpus[task]
    defect = RUNS[task]
    extra = {DEFECTS[defect][1]: True} if variant == "allowed" else {}
    cfg = build_config(_config(task, folder / (defect if variant == "allowed" else "clean"), tmp_path / "out",
                               **extra))
    with caplog.at_level(logging.INFO):
        result = train(cfg)
    metric = {"mask": "segm/AP", "box": "bbox/AP", "keypoints": "keypoints/AP"}[task]
    assert result.status == "finished" and metric in result.final_metrics
    recorded = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert recorded["model"]["pixel_convention"] == "torchvision"  # resolved, never left at auto
    if variant == "allowed":
        assert f"dropped from training and evaluation (data.{DEFECTS[defect][1]} is set)" in caplog.text


def _datasets(task: str, folder: Path, **data):
    from trainer.data.coco import build_datasets
    from trainer.modeling.detectors import build_detector_datasets

    cfg = build_config(_config(task, folder, folder / "unused", **data))
    return build_datasets(cfg.data) if task == "mask" else build_detector_datasets(cfg)


def _train_ids(train) -> set:
    return set(int(i) for i in train.image_ids)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_allowed_defect_leaves_training_and_ground_truth(corpus, task, defect):
    folder, _ = corpus[task]
    split, switch, unit = DEFECTS[defect]
    doc = json.loads((folder / defect / "labels" / f"{split}.json").read_text())
    clean = json.loads((folder / "clean" / "labels" / f"{split}.json").read_text())
    damaged_ids = {a["id"] for a, c in zip(doc["annotations"], clean["annotations"]) if json.dumps(a) != json.dumps(c)}
    damaged_images = {im["id"] for im, c in zip(doc["images"], clean["images"]) if im != c}
    if unit == "image" and not damaged_images:  # damage in the file's bytes: the image of the first annotation
        damaged_images = {sorted(doc["annotations"], key=lambda a: a["id"])[0]["image_id"]}
    train, val, _ = _datasets(task, folder / defect, **{switch: True})
    if split == "val":
        gt = val.coco
        if unit == "image":
            assert not damaged_images & set(gt.getImgIds()) and not damaged_images & set(val.image_ids)
            assert not any(a["image_id"] in damaged_images for a in gt.dataset["annotations"])
        else:
            assert damaged_ids and not damaged_ids & set(gt.getAnnIds())
            assert len(gt.getAnnIds()) == len(clean["annotations"]) - len(damaged_ids)
    elif unit == "image":
        assert damaged_images and not damaged_images & _train_ids(train)
    else:
        kept = _train_annotation_count(train)
        full, _, _ = _datasets(task, folder / "clean")
        assert kept == _train_annotation_count(full) - len(damaged_ids)


def _train_annotation_count(train) -> int:
    if hasattr(train, "index"):  # the mask task's TrainImages
        return len(train.index.labels)
    return sum(len(train._anns(i)) for i in train.coco.getImgIds())


def _cocoeval_ap(gt_file: Path, dets: list[dict]) -> list[float]:
    """Plain pycocotools on a JSON file: the reference scorer."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:6]]


@pytest.mark.parametrize("defect", ["nan_box_val", "odd_polygon"])
def test_dropped_val_annotation_is_absent_from_what_cocoeval_scores(corpus, tmp_path, defect):
    from trainer.evaluation.coco import METRIC_NAMES, score_coco

    folder, _ = corpus["mask"]
    clean = json.loads((folder / "clean" / "labels" / "val.json").read_text())
    damaged = json.loads((folder / defect / "labels" / "val.json").read_text())
    (gone,) = [c["id"] for a, c in zip(damaged["annotations"], clean["annotations"]) if json.dumps(a) != json.dumps(c)]
    # detections: every clean ground-truth box (the dropped one's included), shifted by a pixel, and
    # two misses; scores fall with the annotation id, so the dropped one's detection ranks first
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0 - 0.01 * k,
             "bbox": [a["bbox"][0] + 1, a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for k, a in enumerate(sorted(clean["annotations"], key=lambda a: a["id"]))]
    dets += [{**dets[0], "bbox": [0, 0, 5, 5], "score": 0.5}, {**dets[1], "bbox": [50, 50, 9, 9], "score": 0.4}]
    without = {**clean, "annotations": [a for a in clean["annotations"] if a["id"] != gone]}
    (tmp_path / "without.json").write_text(json.dumps(without))
    (tmp_path / "clean.json").write_text(json.dumps(clean))
    reference = _cocoeval_ap(tmp_path / "without.json", dets)
    assert reference != _cocoeval_ap(tmp_path / "clean.json", dets)  # the annotation matters to the AP

    _, val, _ = _datasets("mask", folder / defect, **{DEFECTS[defect][1]: True})
    assert gone not in val.coco.anns
    for backend in ("pycocotools", "auto"):
        ours = score_coco(val.coco, dets, iou_types=("bbox",), backend=backend, image_ids=val.image_ids)
        assert [ours[f"bbox/{n}"] for n in METRIC_NAMES] == pytest.approx(reference, abs=1e-12)
