"""keep_checkpoints: what a finished trial keeps, on real checkpoint files (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import orchestrator.worker.retention as retention
from orchestrator.sweep.spec import parse_spec
from orchestrator.worker.trainable import _retain
from tests.orchestrator.conftest import tiny_spec
from tests.orchestrator.task_factory import make_task
from trainer.engine.checkpoint import checkpoint_path, list_checkpoints, load, save_atomic
from trainer.trial_dir import TrialDir

WEIGHTS_FILE = "model_final.pt"


def apply_retention(out: Path, policy: str) -> int:
    return retention.apply_retention(TrialDir(out), policy)


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


def test_a_trunk_prunes_a_fork_point_once_every_branch_there_has_started(tmp_path):
    out = make_trial(tmp_path, iters=(2, 3, 6, 8), finished=False)  # fork points 3 and 8; 2 and 6 periodic
    b3, b3b, b8 = (tmp_path / n for n in ("b3", "b3b", "b8"))
    branches = [{"name": "b3", "at": 3}, {"name": "b3b", "at": 3}, {"name": "b8", "at": 8}]
    trunk = make_task("trial", 8, folder=out, role="trunk", keep_checkpoints="none", branches=branches)
    _retain(trunk.model_copy(update={"keep_checkpoints": "all"}))
    assert kept(out) == [2, 3, 6, 8]  # `all` keeps everything
    _retain(trunk)  # done: its periodic checkpoints go, every fork point is still needed
    assert kept(out) == [3, 8] and (out / "trunk_done.json").exists()
    save_atomic({"model": {}, "iteration": 4}, checkpoint_path(b3 / "checkpoints", 4))
    branch = make_task("b3", 9, folder=b3, fork=("trial", 3), keep_checkpoints="none", branches=branches)
    _retain(branch)
    assert kept(out) == [3, 8]  # b3b has not started from 3 yet (a retry of it would fork again)
    (b3b / "final_metrics.json").parent.mkdir()
    (b3b / "final_metrics.json").write_text("{}")
    _retain(branch)
    assert kept(out) == [8]
    _retain(trunk)
    assert kept(out) == [8]
    (b8 / "final_metrics.json").parent.mkdir()
    (b8 / "final_metrics.json").write_text("{}")
    _retain(trunk)
    assert kept(out) == []
    from orchestrator.state.folder import trunk_done

    sweep = tmp_path / "sweep"
    (sweep / "trials").mkdir(parents=True)
    out.rename(sweep / "trials" / "trunk")
    assert trunk_done(sweep, "trunk", 8)  # trunk_done.json marks it done once its last fork point is gone


def test_the_policy_is_not_part_of_the_sweep_identity(tmp_path):
    from orchestrator.sweep.expand import expand

    specs = [parse_spec(tiny_spec(tmp_path, keep_checkpoints=p)) for p in ("final", "none")]
    assert specs[0].keep_checkpoints == "final" and specs[1].keep_checkpoints == "none"
    assert expand(specs[0]).spec_hash == expand(specs[1]).spec_hash
    assert parse_spec(tiny_spec(tmp_path)).keep_checkpoints == "final"  # the default
