"""The training run: exact resume, checkpoints, metrics, divergence."""

import json

import pytest
import torch

from tests.conftest import tiny_config
from trainer.engine import checkpoint as ckpt
from trainer.config import build_config
from trainer.engine.train_loop import train
from trainer.errors import NonFiniteLossError
from trainer.engine.reporters import JsonlReporter, Reporter, read_metrics


class Boom(RuntimeError):
    pass


class CrashAt(Reporter):
    """Simulates a preemption: raises once the run logs `step` (after its checkpoint at 3)."""

    def __init__(self, step):
        self.step = step

    def log(self, step, metrics):
        if step == self.step and "train/loss" in metrics:
            raise Boom(step)


def _run(cfg_dict, **kw):
    return train(build_config(cfg_dict), reporters=[JsonlReporter()] + kw.pop("extra", []), **kw)


def test_resume_is_bit_exact(synth_root, tmp_path):
    full = _run(tiny_config(synth_root, tmp_path / "full"))
    assert full.status == "finished" and full.iterations == 6
    with pytest.raises(Boom):
        _run(tiny_config(synth_root, tmp_path / "cut"), extra=[CrashAt(5)])
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path / "cut" / "checkpoints")] == [3]
    resumed = _run(tiny_config(synth_root, tmp_path / "cut"), resume=True)
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert a == b  # every loss, lr, count and AP row, bit for bit, no step twice
    assert [r["step"] for r in a if "bbox/AP" in r] == [3, 6]
    assert resumed.final_metrics == full.final_metrics
    ma = ckpt.load(tmp_path / "full" / "checkpoints" / "ckpt_0000006.pt")["model"]
    mb = ckpt.load(tmp_path / "cut" / "checkpoints" / "ckpt_0000006.pt")["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_outputs_and_checkpoint_contents(synth_root, tmp_path):
    out = tmp_path / "run"
    res = _run(tiny_config(synth_root, out, checkpoint={"period": 2, "keep_last": 2}))
    assert (out / "config.yaml").exists() and (out / "train_image_ids.txt").exists()
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["seen/images"] == 12 and final["iteration"] == 6 and "segm/AP" in final
    assert res.final_metrics["bbox/AP"] == final["bbox/AP"]
    assert [i for i, _ in ckpt.list_checkpoints(out / "checkpoints")] == [4, 6]  # keep_last=2
    state = ckpt.load(out / "checkpoints" / "ckpt_0000006.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "iteration", "data_position",
                "counters", "tracking", "config"):
        assert key in state
    assert state["counters"]["images"] == 12 and state["counters"]["instances"] > 12
    rows = read_metrics(out / "metrics.jsonl")
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    assert lrs[3] == pytest.approx(0.01) and lrs[4] == pytest.approx(0.001)  # the step at iteration 4 drops


def test_tracking_dict_survives_resume(synth_root, tmp_path):
    class Track(Reporter):
        def start(self, info):
            self.seen = dict(info.tracking)
            info.tracking.setdefault("run_id", "abc123")

    first = Track()
    _run(tiny_config(synth_root, tmp_path / "t"), stop_after=3, extra=[first])
    second = Track()
    _run(tiny_config(synth_root, tmp_path / "t"), resume=True, extra=[second])
    assert first.seen == {} and second.seen == {"run_id": "abc123"}


def test_damaged_newest_checkpoint_falls_back(synth_root, tmp_path, caplog):
    out = tmp_path / "d"
    _run(tiny_config(synth_root, out, checkpoint={"period": 2}, eval={"period": 0}), stop_after=4)
    newest = out / "checkpoints" / "ckpt_0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    found = ckpt.load_latest(out / "checkpoints")
    assert found is not None and found[0].name == "ckpt_0000002.pt"
    assert "ckpt_0000004.pt" in caplog.text


def test_divergence_names_the_iteration(synth_root, tmp_path):
    cfg = tiny_config(synth_root, tmp_path / "nan", optim={"base_lr": 1e8, "grad_clip": None},
                      schedule={"iters": 6, "drops": [], "warmup_iters": 0})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at iteration \d"):
        _run(cfg)


def test_branch_forked_from_trunk_equals_independent_run(synth_root, tmp_path):
    """Schedule forking: a trunk at the base LR, checkpointed at a schedule's first drop, then that
    schedule's branch started from the checkpoint, gives the independent run bit for bit."""
    sched = {"iters": 8, "drops": [5, 7], "warmup_iters": 2}
    alone = _run(tiny_config(synth_root, tmp_path / "alone", schedule=sched, eval={"period": 4}))
    trunk_cfg = tiny_config(synth_root, tmp_path / "trunk", schedule={"iters": 8, "drops": [], "warmup_iters": 2},
                            checkpoint={"period": 0, "at": [5]}, eval={"period": 4})
    _run(trunk_cfg, stop_after=5)
    branch = _run(tiny_config(synth_root, tmp_path / "branch", schedule=sched, eval={"period": 4}),
                  start_from=tmp_path / "trunk" / "checkpoints" / "ckpt_0000005.pt")
    rows = lambda name: read_metrics(tmp_path / name / "metrics.jsonl")  # noqa: E731
    assert rows("trunk") + rows("branch") == rows("alone")
    assert branch.final_metrics == alone.final_metrics


def test_failing_evaluation_keeps_the_training_and_reruns_on_resume(synth_root, tmp_path):
    """The iteration's checkpoint is written before its evaluation; a resume runs the lost evaluation."""
    import shutil

    class RemoveOnStart(Reporter):  # after the dataset check passed, before the first step
        def start(self, info):
            victim.unlink()

    full = _run(tiny_config(synth_root, tmp_path / "full"))
    root = shutil.copytree(synth_root, tmp_path / "set", ignore=shutil.ignore_patterns(".trainer_cache"))
    victim = root / "val" / "000000000002.png"
    kept = victim.read_bytes()
    with pytest.raises(Exception, match="cannot read image"):
        _run(tiny_config(root, tmp_path / "cut"), extra=[RemoveOnStart()])
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path / "cut" / "checkpoints")] == [3]
    victim.write_bytes(kept)
    resumed = _run(tiny_config(root, tmp_path / "cut"), resume=True)
    assert resumed.final_metrics == full.final_metrics
    rows = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert sorted(map(str, rows)) == sorted(map(str, read_metrics(tmp_path / "full" / "metrics.jsonl")))
