"""Replicates as a grid axis (`grid.replicate`), the spec's base seed, and what a sweep's identity covers."""

from __future__ import annotations

import pytest

from orchestrator.sweep.dataset import generate, needs_generation
from orchestrator.errors import DatasetMismatchError, SpecError
from orchestrator.sweep.expand import bind_config, expand
from orchestrator.sweep.plan import render_plan
from orchestrator.sweep.spec import parse_spec
from orchestrator.state.folder import make_record
from bench.harness.specs import tiny_spec

GRID = {"init": ["random"], "data": [8], "schedule": ["1x", "2x"], "backbone": ["R18"], "replicate": [0, 1]}


def _spec(tmp_path, **changes):
    return parse_spec(tiny_spec(tmp_path, grid=dict(GRID), **changes))


def test_replicates_are_named_seeded_and_fork_from_their_own_trunks(tmp_path):
    exp = expand(_spec(tmp_path))
    assert [t.name for t in exp.trials] == ["random-8-1x-R18-r0", "random-8-1x-R18-r1", "random-8-2x-R18-r0",
                                            "random-8-2x-R18-r1"]
    seeds = {t.name: t.config.runtime.seed for t in exp.trials}
    assert seeds["random-8-1x-R18-r0"] == seeds["random-8-2x-R18-r0"] == 0
    assert seeds["random-8-1x-R18-r1"] == seeds["random-8-2x-R18-r1"] == 1
    assert {t.config.data.subset_seed for t in exp.trials} == {0}  # the data axis's subset, for every replicate
    trunks = {k.name: k for k in exp.forks.trunks}
    assert sorted(trunks) == ["random-8-trunk-R18-r0", "random-8-trunk-R18-r1"]
    for trial in exp.trials:  # each replicate's schedules branch off that replicate's trunk
        trunk = exp.forks.trunk(exp.forks.branches[trial.trial_id][0])
        assert trunk.name.endswith(trial.labels["replicate"])
        assert trunk.config.runtime.seed == trial.config.runtime.seed
    record = make_record(exp, "", "test")  # sweep.json: the axes `status` shows and MLflow tags as axis.*
    assert [t["axes"]["replicate"] for t in record["trials"]] == ["0", "1", "0", "1"]
    assert [k["axes"]["replicate"] for k in record["trunks"]] == ["0", "1"]
    plan = render_plan(exp)
    assert "random-8-2x-R18-r1" in plan and "replicates: 2 (r0, r1), runtime.seed 0, 1 (base seed 0)" in plan


def test_the_base_seed_shifts_every_replicate(tmp_path):
    base = expand(_spec(tmp_path))
    shifted = expand(_spec(tmp_path, seed=3))
    assert [t.config.runtime.seed for t in shifted.trials] == [3000, 3001, 3000, 3001]
    assert base.spec_hash != shifted.spec_hash
    assert not {t.trial_id for t in base.trials} & {t.trial_id for t in shifted.trials}
    # An override's runtime.seed is the base the replicate and the base seed shift.
    over = expand(_spec(tmp_path, seed=1, overrides=[{"when": {}, "set": {"runtime.seed": 7}}]))
    assert [t.config.runtime.seed for t in over.trials] == [1007, 1008, 1007, 1008]


def test_replicate_values_are_indices(tmp_path):
    with pytest.raises(SpecError, match=r"grid.replicate\[1\]: a replicate is an index"):
        parse_spec(tiny_spec(tmp_path, grid={**GRID, "replicate": [0, "one"]}))
    with pytest.raises(SpecError, match=r"grid.replicate\[1\]: 0 repeats"):
        parse_spec(tiny_spec(tmp_path, grid={**GRID, "replicate": [0, 0]}))


def test_replicates_change_init_and_batch_order_and_keep_the_subset(tmp_path):
    """Through the trainer itself: the weights it draws, the batches its loader yields, the ids it trains on."""
    import torch

    from trainer.engine.train_loop import Trainer

    spec = parse_spec(tiny_spec(tmp_path, grid={**GRID, "schedule": ["1x"]}))
    generate(spec.dataset)
    exp = expand(spec)
    runs = [Trainer(bind_config(t, tmp_path / "runs", {})) for t in exp.trials]
    assert runs[0].train_ids == runs[1].train_ids and len(runs[0].train_ids) == 8
    batches = [[[i for _, i in b] for b in r.loader().batch_sampler] for r in runs]
    assert batches[0] != batches[1]  # other batches ...
    assert {i for b in batches[0] + batches[1] for i in b} <= set(range(8))  # ... of the same 8 images
    heads = [dict(r.bare_model.named_parameters()) for r in runs]
    name = next(n for n in heads[0] if "box_predictor" in n and n.endswith("weight"))
    assert not torch.equal(heads[0][name], heads[1][name])
    again = Trainer(bind_config(exp.trials[1], tmp_path / "runs", {}))  # and a replicate is reproducible
    assert torch.equal(dict(again.bare_model.named_parameters())[name], heads[1][name])


def test_generator_settings_are_identity_and_never_share_a_folder(tmp_path):
    a = parse_spec(tiny_spec(tmp_path))
    b = parse_spec(tiny_spec(tmp_path, dataset__generate={"train": 16, "val": 4, "size": 64, "seed": 1}))
    assert [t.trial_id for t in expand(a).trials] == [t.trial_id for t in expand(b).trials]  # same paths
    assert expand(a).spec_hash != expand(b).spec_hash
    assert needs_generation(a.dataset)
    generate(a.dataset)
    before = (tmp_path / "data" / "annotations" / "instances_train.json").read_bytes()
    assert not needs_generation(a.dataset)
    with pytest.raises(DatasetMismatchError, match=r"holds a set generated with other settings \(seed 0 \(spec: 1\)\)"):
        needs_generation(b.dataset)
    assert (tmp_path / "data" / "annotations" / "instances_train.json").read_bytes() == before
