"""The trainer's task in sweeps: a spec-level field (base.model.task) or a grid axis (model.task)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.dataset import generate, needs_generation
from orchestrator.errors import SpecError
from orchestrator.expand import expand
from orchestrator.spec import load_spec, parse_spec
from tests.orchestrator.specs import tiny_spec
from trainer.schedule import resolve_schedule

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
