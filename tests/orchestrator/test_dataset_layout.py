"""Sweep specs point at any dataset layout: per-split annotation file + image folder reach every trial."""

from __future__ import annotations

import pytest

from orchestrator.sweep.dataset import missing_files
from orchestrator.errors import SpecError
from orchestrator.sweep.expand import expand
from orchestrator.sweep.spec import parse_spec
from bench.harness.specs import tiny_spec


def _layout(tmp_path):
    return {"root": str(tmp_path / "unused"), "train_json": str(tmp_path / "a" / "train.json"),
            "train_image_dir": str(tmp_path / "pics"), "val_split": "val"}


def test_layout_fields_reach_trial_configs(tmp_path):
    spec = parse_spec(tiny_spec(tmp_path, dataset=_layout(tmp_path)))
    trials = expand(spec).trials
    assert trials
    for trial in trials:
        data = trial.config.data
        assert data.train_json == tmp_path / "a" / "train.json"
        assert data.train_image_dir == tmp_path / "pics" and data.val_json is None
    assert missing_files(spec.dataset)[:2] == [tmp_path / "a" / "train.json", tmp_path / "pics"]
    assert missing_files(spec.dataset)[2] == tmp_path / "unused" / "annotations" / "instances_val.json"


def test_layout_fields_are_checked(tmp_path):
    half = {**_layout(tmp_path)}
    del half["train_image_dir"]
    with pytest.raises(SpecError, match="train_json and train_image_dir go together"):
        parse_spec(tiny_spec(tmp_path, dataset=half))
    with pytest.raises(SpecError, match="base.data.train_json"):
        parse_spec(tiny_spec(tmp_path, base__data__train_json="x.json", base__data__train_image_dir="x"))
