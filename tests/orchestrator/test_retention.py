"""keep_checkpoints: what a finished trial keeps, on real checkpoint files (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.retention import WEIGHTS_FILE, apply_retention
from orchestrator.spec import parse_spec
from orchestrator.trainable import _retain
from tests.orchestrator.conftest import tiny_spec
from trainer.checkpoint import checkpoint_path, list_checkpoints, load, save_atomic


def make_trial(tmp_path: Path, iters=(3, 6, 9), finished: bool = True) -> Path:
    out = tmp_path / "trial"
    for it in iters:
        save_atomic({"model": {"w": torch.full((64, 64), float(it))}, "iteration": it,
                     "optimizer": {"state": {0: {"momentum_buffer": torch.ones(64, 64)}}},
                     "config": {"schedule": {"iters": 9}}}, checkpoint_path(out / "checkpoints", it))
    if finished:
        (out / "final_metrics.json").write_text(json.dumps({"bbox/AP": 0.1}))
    return out


def kept(out: Path) -> list[int]:
    return [i for i, _ in list_checkpoints(out / "checkpoints")]


@pytest.mark.parametrize("policy", ["all", "final", "weights", "none"])
def test_an_unfinished_trial_keeps_every_checkpoint(tmp_path, policy):
    out = make_trial(tmp_path, finished=False)
    assert apply_retention(out, policy) == 0
    assert kept(out) == [3, 6, 9] and not (out / WEIGHTS_FILE).exists()


def test_final_keeps_the_newest_full_checkpoint_only(tmp_path):
    out = make_trial(tmp_path)
    sizes = sum(p.stat().st_size for _, p in list_checkpoints(out / "checkpoints")[:-1])
    assert apply_retention(out, "final") == sizes
    assert kept(out) == [9]
    assert "optimizer" in load(checkpoint_path(out / "checkpoints", 9))  # still resumable
    assert apply_retention(out, "final") == 0 and kept(out) == [9]  # twice changes nothing


def test_weights_leaves_the_model_of_the_last_iteration(tmp_path):
    out = make_trial(tmp_path)
    assert apply_retention(out, "weights") > 0
    assert kept(out) == []
    slim = torch.load(out / WEIGHTS_FILE, weights_only=True)
    assert set(slim) == {"model", "iteration", "config"} and slim["iteration"] == 9
    assert torch.equal(slim["model"]["w"], torch.full((64, 64), 9.0))
    assert apply_retention(out, "weights") == 0


def test_none_removes_them_all_and_all_keeps_them(tmp_path):
    out = make_trial(tmp_path)
    assert apply_retention(out, "all") == 0 and kept(out) == [3, 6, 9]
    assert apply_retention(out, "none") > 0 and kept(out) == []
    assert (out / "final_metrics.json").exists() and not (out / WEIGHTS_FILE).exists()


def test_a_trunk_keeps_its_fork_points(tmp_path):
    out = make_trial(tmp_path)
    _retain({"role": "trunk", "keep_checkpoints": "none"}, out)
    assert kept(out) == [3, 6, 9]
    _retain({"role": "branch", "keep_checkpoints": "none"}, out)
    assert kept(out) == []


def test_the_policy_is_not_part_of_the_sweep_identity(tmp_path):
    from orchestrator.expand import expand

    specs = [parse_spec(tiny_spec(tmp_path, keep_checkpoints=p)) for p in ("final", "none")]
    assert specs[0].keep_checkpoints == "final" and specs[1].keep_checkpoints == "none"
    assert expand(specs[0]).spec_hash == expand(specs[1]).spec_hash
    assert parse_spec(tiny_spec(tmp_path)).keep_checkpoints == "final"  # the default
