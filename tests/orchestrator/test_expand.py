"""Grid expansion: order, ids, names, exclusions, overrides, pretrain dependencies, duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import SpecError
from orchestrator.sweep.expand import bind_config, expand, set_key
from orchestrator.sweep.spec import load_spec, parse_spec
from tests.orchestrator.conftest import tiny_spec

REPO = Path(__file__).resolve().parents[2]


def _grid(tmp_path, **changes):
    return expand(parse_spec(tiny_spec(tmp_path, **changes)))


def test_order_names_and_stable_ids(tmp_path):
    grid = {"init": ["random", "imagenet"], "data": ["all", "3.5k"], "schedule": ["1x", "2x"],
            "backbone": ["R18"], "optim.base_lr": [0.02, 0.04]}
    big = {"dataset__generate__train": 4000,  # a 3.5k subset needs that many images
           "base__model__imagenet_weights": "weights/r18-gn.pt"}  # GN weights: init imagenet with norm GN
    exp = _grid(tmp_path, grid=grid, **big)
    names = [t.name for t in exp.trials]
    assert len(names) == 16 and names[0] == "random-all-1x-R18-base_lr0.02"
    assert names[1] == "random-all-1x-R18-base_lr0.04" and names[-1] == "imagenet-3.5k-2x-R18-base_lr0.04"
    again = _grid(tmp_path, grid=grid, **big)
    assert [t.trial_id for t in again.trials] == [t.trial_id for t in exp.trials]
    assert again.spec_hash == exp.spec_hash
    # Ids do not depend on the machine's paths, and an explicit default is no change.
    moved = _grid(tmp_path, grid=grid, storage_path="/elsewhere", base__optim__momentum=0.9, **big)
    assert [t.trial_id for t in moved.trials] == [t.trial_id for t in exp.trials]
    assert exp.trials[3].config.optim.base_lr == 0.04 and exp.trials[3].config.data.train_images == "all"


def test_exclude_and_overrides(tmp_path):
    exp = _grid(tmp_path, grid={"init": ["random"], "data": ["all", 8], "schedule": ["1x", "2x"],
                                "backbone": ["R18", "R34"]},
                exclude=[{"data": 8, "schedule": "2x"}, {"backbone": "R34", "data": [8]}],
                overrides=[{"when": {"data": 8}, "set": {"optim.base_lr": 0.04, "data.scale_jitter": [48, 64]}}])
    names = [t.name for t in exp.trials]
    assert names == ["random-all-1x-R18", "random-all-1x-R34", "random-all-2x-R18", "random-all-2x-R34",
                     "random-8-1x-R18"]
    small = exp.trials[-1].config
    assert small.optim.base_lr == 0.04 and small.data.scale_jitter == (48, 64) and small.data.train_images == 8


def test_schedule_axis_forms(tmp_path):
    exp = _grid(tmp_path, grid={"schedule": ["2x", {"iters": 9, "drops": [5, 7]}]}, base__schedule={
        "length": "1x", "iters_per_x": 6, "warmup_iters": 1})
    a, b = exp.trials
    assert a.config.schedule.length == "2x" and a.config.schedule.iters_per_x == 6
    assert b.config.schedule.iters == 9 and b.config.schedule.length is None and b.name.endswith("-9it-R18")
    tree = {"schedule": "2x"}
    set_key(tree, "schedule.iters", 5)
    assert tree == {"schedule": {"iters": 5}}


def test_duplicate_trial_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"grid.data\[1\]: 'all' repeats grid.data\[0\]"):
        _grid(tmp_path, grid={"data": ["all", "all"]})
    with pytest.raises(SpecError, match="duplicate trial"):
        _grid(tmp_path, grid={"optim.base_lr": [0.02, 0.04]},
              overrides=[{"when": {"optim.base_lr": 0.04}, "set": {"optim.base_lr": 0.02}}])


def test_invalid_trial_config_names_the_trial(tmp_path):
    with pytest.raises(SpecError, match=r"trial random-all-1x-R18-base_lr-1: optim.base_lr"):
        _grid(tmp_path, grid={"optim.base_lr": [0.02, -1]})
    with pytest.raises(SpecError, match=r"trial random-all-0.1x-R18: schedule.length"):
        _grid(tmp_path, grid={"schedule": ["0.1x"]})


def test_pretrain_jobs_and_binding(tmp_path):
    spec = tiny_spec(tmp_path, grid={"init": ["random", "pretrained:shapes"], "backbone": ["R18", "R34"]},
                     pretrain={"shapes": {"config": {"backbone": "R18", "iters": 5, "batch_size": 8}}},
                     exclude=[{"init": "pretrained:shapes", "backbone": "R34"}])
    exp = expand(parse_spec(spec))
    assert [j.name for j in exp.pretrain] == ["shapes"]
    pt = [t for t in exp.trials if t.needs]
    assert [t.name for t in pt] == ["shapes-all-1x-R18"]
    cfg = bind_config(pt[0], tmp_path / "runs" / "tiny", {"shapes": tmp_path / "b.pt"})
    assert cfg.model.init == f"checkpoint:{tmp_path / 'b.pt'}"
    assert Path(cfg.runtime.output_dir) == tmp_path / "runs" / "tiny" / "trials" / "shapes-all-1x-R18"
    spec.pop("exclude")
    with pytest.raises(SpecError, match="is a R18 backbone but the trial trains R34"):
        expand(parse_spec(spec))


def test_paper_grid_expands(monkeypatch):
    monkeypatch.delenv("IMAGENET_GN_R50", raising=False)
    monkeypatch.delenv("IMAGENET_GN_R101", raising=False)
    exp = expand(load_spec(REPO / "sweeps" / "paper_grid.yaml"))
    assert len(exp.trials) == 2 * 5 * 6 * 2
    small = next(t for t in exp.trials if t.name == "random-1k-6x-R101")
    assert small.config.optim.base_lr == 0.04 and small.config.schedule.gamma == 0.02
    assert small.config.data.scale_jitter == (512, 800) and small.config.data.train_images == 1000
    full = next(t for t in exp.trials if t.name == "imagenet-all-2x-R50")
    assert full.config.optim.base_lr == 0.02 and full.config.model.freeze_at == 2
    assert full.config.optim.batch_size == 16 and full.config.model.norm == "GN"
    # The pre-trained arm is the same GN model from GN ImageNet weights, one file per backbone.
    assert full.config.model.body_norm == "GN" and full.config.model.imagenet_weights.name == "R-50-GN.pkl"
    big = next(t for t in exp.trials if t.name == "imagenet-all-2x-R101")
    assert big.config.model.imagenet_weights.name == "R-101-GN.pkl"
    assert small.config.model.imagenet_weights is None


def test_body_norm_names_ids_and_refusal(tmp_path):
    grid = {"init": ["random", "imagenet"], "schedule": ["2x"], "backbone": ["R18"]}
    with pytest.raises(SpecError, match="trial imagenet-all-2x-R18: model: .*model.body_norm: FrozenBN"):
        _grid(tmp_path, grid=grid)
    exp = _grid(tmp_path, grid=grid, overrides=[{"when": {"init": "imagenet"}, "set": {"model.body_norm": "FrozenBN"}}])
    assert [t.name for t in exp.trials] == ["random-all-2x-R18", "imagenet-frozenbn-all-2x-R18"]
    frozen = exp.trials[1]
    assert frozen.config.model.body_norm == "FrozenBN" and frozen.config.model.norm == "GN"
    # A body norm equal to norm is a default: the same id as a spec that does not write it.
    plain = _grid(tmp_path, grid={"init": ["random"], "schedule": ["2x"], "backbone": ["R18"]})
    explicit = _grid(tmp_path, grid={"init": ["random"], "schedule": ["2x"], "backbone": ["R18"]},
                     base__model__body_norm="GN")
    assert [t.trial_id for t in plain.trials] == [t.trial_id for t in explicit.trials]
    assert [t.name for t in explicit.trials] == ["random-all-2x-R18"]
    assert plain.trials[0].config.model.body_norm == "GN"


def test_imagenet_weights_per_backbone_through_overrides(tmp_path):
    """`init: imagenet` in the base with its GN weights given per backbone by overrides is a valid spec; a
    backbone the overrides miss is refused at that trial."""
    files = [{"when": {"backbone": b}, "set": {"model.imagenet_weights": f"weights/{b}-gn.pt"}} for b in ("R18",)]
    exp = _grid(tmp_path, grid={"backbone": ["R18"]}, base__model__init="imagenet", overrides=files)
    assert exp.trials[0].config.model.imagenet_weights == Path("weights/R18-gn.pt")
    with pytest.raises(SpecError, match="trial imagenet-all-1x-R34: model: .*body_norm"):
        _grid(tmp_path, grid={"backbone": ["R18", "R34"]}, base__model__init="imagenet", overrides=files)
