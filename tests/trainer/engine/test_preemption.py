"""Preemption with notice: a SIGTERM stops a run at a step's end with that iteration's checkpoint.

A real `python -m trainer` subprocess on the tiny synthetic config gets SIGTERM mid-run; a 2-rank gloo
DDP run gets it on one rank only. Each writes the checkpoint of the iteration it reached, exits as
preempted, and `--resume` ends exactly where an uninterrupted run ends. What was measured is printed
as one `preemption:` line each (pytest -s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from tests.conftest import tiny_config
from tests.trainer.engine.test_ddp import _port
from trainer.engine import checkpoint as ckpt
from trainer.engine import preemption
from trainer.config import build_config
from trainer.engine.train_loop import init_distributed, train
from trainer.engine.reporters import JsonlReporter, read_metrics

REPO = Path(__file__).resolve().parents[3]
SCHED = {"iters": 12, "drops": [9], "warmup_iters": 2}
LEVELS = {"schedule": SCHED, "eval": {"period": 6}, "checkpoint": {"period": 0}}  # no periodic checkpoint


def _steps(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "train/loss" in r] if path.exists() else []


def _trainer(cfg_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(cfg_path), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_checkpoints_the_reached_iteration_and_resume_is_exact(synth_root, tmp_path):
    ref = tiny_config(synth_root, tmp_path / "ref", **LEVELS)
    train(build_config(ref), reporters=[JsonlReporter()])
    cfg = tiny_config(synth_root, tmp_path / "cut", **LEVELS)
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _trainer(path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(_steps(tmp_path / "cut")) < 3:
        time.sleep(0.05)
    seen = max(_steps(tmp_path / "cut"))
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == preemption.EXIT_PREEMPTED, out[-3000:]
    assert "preempted at iteration" in out and "Traceback" not in out, out[-3000:]
    saved = [i for i, _ in ckpt.list_checkpoints(tmp_path / "cut" / "checkpoints")]
    reached = max(_steps(tmp_path / "cut"))
    assert saved == [reached] and seen <= reached < SCHED["iters"], (saved, seen, reached)
    assert reached - seen <= 1  # the notice came after `seen`: only the step in flight finished
    assert took < build_config(cfg).runtime.preemption_grace_s
    again = _trainer(path, "--resume")
    out2, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out2[-3000:]
    assert read_metrics(tmp_path / "cut" / "metrics.jsonl") == read_metrics(tmp_path / "ref" / "metrics.jsonl")
    final = json.loads((tmp_path / "cut" / "final_metrics.json").read_text())
    assert final == json.loads((tmp_path / "ref" / "final_metrics.json").read_text())
    print(f"preemption: SIGTERM seen at iteration >= {seen}, checkpoint at {reached}, exit "
          f"{proc.returncode} {took:.1f} s after the signal; resumed run's metrics and final equal the reference")


def _signal_when(folder: Path, step: int) -> None:
    """SIGTERM this process (from a thread, as a platform's notice comes) once rank 0 logged `step`."""
    import threading

    def watch() -> None:
        while len(_steps(folder)) < step:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def _rank(rank: int, world: int, port: int, cfg_dict: dict, resume: bool, notice: bool) -> None:
    import torch

    torch.set_num_threads(1)
    cfg = build_config(cfg_dict)
    out = Path(cfg.runtime.output_dir)
    preemption.install()
    if rank == 1 and notice:
        _signal_when(out, 3)  # rank 1 alone gets the notice
    init_distributed(cfg.runtime, rank, world, f"127.0.0.1:{port}")
    try:
        train(cfg, reporters=[JsonlReporter()] if rank == 0 else [], resume=resume)
    except preemption.PreemptedError as exc:
        (out / f"preempted_rank{rank}.json").write_text(json.dumps({"iteration": exc.iteration,
                                                                    "reason": exc.reason}))
    finally:
        dist.destroy_process_group()


def test_ddp_sigterm_on_one_rank_stops_both_at_one_iteration(synth_root, tmp_path):
    ref = tiny_config(synth_root, tmp_path / "ref", **LEVELS, runtime={"dist_backend": "gloo"})
    cut = tiny_config(synth_root, tmp_path / "cut", **LEVELS, runtime={"dist_backend": "gloo"})
    for cfg, resume, notice in ((ref, False, False), (cut, False, True), (cut, True, False)):
        mp.spawn(_rank, args=(2, _port(), cfg, resume, notice), nprocs=2, join=True)
        if notice:
            marks = [json.loads((tmp_path / "cut" / f"preempted_rank{r}.json").read_text()) for r in (0, 1)]
            at = marks[0]["iteration"]
            assert marks[1]["iteration"] == at and 3 <= at < SCHED["iters"], marks
            assert marks[1]["reason"] == "SIGTERM" and marks[0]["reason"] == "a peer rank's notice", marks
            saved = ckpt.list_checkpoints(tmp_path / "cut" / "checkpoints")
            assert [i for i, _ in saved] == [at] and max(_steps(tmp_path / "cut")) == at
            assert len(ckpt.load(saved[0][1])["ranks"]) == 2
    assert read_metrics(tmp_path / "cut" / "metrics.jsonl") == read_metrics(tmp_path / "ref" / "metrics.jsonl")
    final = json.loads((tmp_path / "cut" / "final_metrics.json").read_text())
    assert final == json.loads((tmp_path / "ref" / "final_metrics.json").read_text())
    print(f"preemption: DDP rank 1 SIGTERMed once rank 0 logged step 3; both ranks stopped at {at}, one "
          "checkpoint with both ranks' states; resumed run equals the uninterrupted one")
