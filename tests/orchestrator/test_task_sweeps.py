"""The trainer's task in sweeps: a spec-level field (base.model.task) or a grid axis (model.task)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.sweep.dataset import generate, needs_generation
from orchestrator.errors import SpecError
from orchestrator.sweep.expand import expand
from orchestrator.sweep.spec import load_spec, parse_spec
from bench.harness.specs import tiny_spec
from trainer.engine.schedule import resolve_schedule

REPO = Path(__file__).resolve().parents[2]


def test_demo_keypoints_runs_both_inits_on_keypoints():
    exp = expand(load_spec(REPO / "sweeps" / "demo_keypoints.yaml"))
    assert sorted(t.init for t in exp.trials) == ["pretrained:synthetic-r18", "random"]
    for t in exp.trials:
        assert t.config.model.task == "keypoints" and t.config.runtime.threads == 1
        assert resolve_schedule(t.config.schedule).total_iters == 400
    assert exp.spec.dataset.generate.keypoints


def test_task_as_a_grid_axis_names_the_trials(tmp_path):
    spec = parse_spec(tiny_spec(tmp_path, grid={"init": ["random"], "model.task": ["mask", "box"]}))
    exp = expand(spec)
    assert sorted((t.name, t.config.model.task) for t in exp.trials) == [
        ("random-all-1x-R18-taskbox", "box"), ("random-all-1x-R18-taskmask", "mask")]
    with pytest.raises(SpecError, match="model.task"):  # refused on the driver, before any worker
        expand(parse_spec(tiny_spec(tmp_path, grid={"init": ["random"], "model.task": ["boxes"]})))


def test_generated_keypoint_set(tmp_path):
    spec = parse_spec(tiny_spec(tmp_path, dataset__generate={"train": 8, "val": 2, "size": 64, "keypoints": True}))
    assert needs_generation(spec.dataset)
    generate(spec.dataset)
    assert (tmp_path / "data" / "annotations" / "person_keypoints_train.json").is_file()
    assert not needs_generation(spec.dataset)


def _voc_spec(tmp_path, root):
    spec = tiny_spec(tmp_path, name="voc", dataset={"root": str(root), "format": "voc", "train_split": "trainval",
                                                    "val_split": "test"})
    spec["grid"] = {"init": ["random"], "schedule": ["1x"]}
    spec["base"]["model"]["task"] = "box"
    spec["base"]["data"]["voc_classes"] = ["ellipse", "rectangle", "triangle", "star"]
    return spec


def test_a_voc_dataset_in_a_sweep_spec(tmp_path):
    from trainer.synthetic.datasets import generate_voc

    root = generate_voc(tmp_path / "voc", seed=0, num_trainval=8, num_test=4, width=64, height=64)["root"]
    spec = parse_spec(_voc_spec(tmp_path, root))
    assert not needs_generation(spec.dataset)  # the VOC folder is there: nothing to generate, nothing missing
    (trial,) = expand(spec).trials
    assert (trial.config.data.format, trial.config.model.task, trial.config.data.train_split) == ("voc", "box",
                                                                                                    "trainval")
    coco = expand(parse_spec(tiny_spec(tmp_path))).trials[0]
    assert "format" not in coco.config.model_dump(exclude_unset=True)["data"]  # COCO trials keep their hash


def test_a_voc_dataset_is_checked_and_its_task_is_validated(tmp_path):
    from orchestrator.errors import DatasetMissingError

    spec = parse_spec(_voc_spec(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(DatasetMissingError, match=r"ImageSets/Main/trainval.txt is missing.*VOC20xx folder"):
        needs_generation(spec.dataset)
    bad = _voc_spec(tmp_path, tmp_path / "nowhere")
    bad["base"]["model"]["task"] = "mask"
    with pytest.raises(SpecError, match="box"):  # VOC has boxes only: refused on the driver
        expand(parse_spec(bad))
    with pytest.raises(SpecError, match="dataset section"):
        parse_spec(tiny_spec(tmp_path, base__data__format="voc", base__model__task="box"))
