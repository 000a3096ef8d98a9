"""Schedule forking without Ray: which trials share a trunk, the trunk's config, plan totals, release order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.sweep.expand import expand
from orchestrator.sweep.plan import forked_totals, plan_rows, trunk_rows
from orchestrator.execution.release import FINISHED, ReleaseQueue
from orchestrator.sweep.spec import load_spec, parse_spec
from orchestrator.state.folder import describe_changes
from tests.orchestrator.conftest import tiny_spec
from tests.orchestrator.task_factory import make_task
from trainer.trial_dir import TrialDir

REPO = Path(__file__).resolve().parents[2]
GRID = {"init": ["random"], "data": ["all", 8], "schedule": ["1x", "2x"], "backbone": ["R18"]}


def _exp(tmp_path, **changes):
    return expand(parse_spec(tiny_spec(tmp_path, **changes)))


def test_paper_grid_forks_to_0_44x():
    exp = expand(load_spec(REPO / "sweeps" / "paper_grid.yaml"))
    assert len(exp.forks.trunks) == 20 and len(exp.forks.branches) == 120
    naive, forked = forked_totals(plan_rows(exp), trunk_rows(exp))
    # Per cell: 21 x 90k naive; one trunk to 480k plus six 60k branches with forking.
    assert (naive, forked) == (20 * 21 * 90_000, 20 * (480_000 + 6 * 60_000))
    assert round(forked / naive, 2) == 0.44
    trunk = next(k for k in exp.forks.trunks if k.name == "random-all-trunk-R50")
    assert trunk.stop == 480_000 and sorted(trunk.forks.values()) == [30_000, 120_000, 210_000, 300_000, 390_000,
                                                                       480_000]


def test_plan_cli_shows_naive_and_forked_totals():
    out = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "sweeps/paper_grid.yaml"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ("forking: 20 trunks (9,600,000 iterations) + 120 branches (7,200,000) = 16,800,000 iterations: 0.44x "
            "of the 37,800,000 unforked (21,000,000 saved)") in out.stdout
    assert "random-all-trunk-R101" in out.stdout and "@480k" in out.stdout


def test_one_trunk_per_cell_with_the_branch_schedule_and_warmup(tmp_path):
    exp = _exp(tmp_path, grid=GRID)
    assert [k.name for k in exp.forks.trunks] == ["random-all-trunk-R18", "random-8-trunk-R18"]
    trunk = exp.forks.trunks[0]
    by_name = {t.name: t for t in exp.trials}
    one, two = by_name["random-all-1x-R18"], by_name["random-all-2x-R18"]
    # iters_per_x 6: 1x = 6 iterations dropping at 2 and 5, 2x = 12 dropping at 8 and 11.
    assert trunk.forks == {one.trial_id: 2, two.trial_id: 8} and trunk.stop == 8
    assert exp.forks.branches[two.trial_id] == (trunk.trunk_id, 8)
    cfg = trunk.config
    assert cfg.schedule.iters == 12 and cfg.schedule.drops == [] and cfg.schedule.length is None
    assert cfg.schedule.warmup_iters == one.config.schedule.warmup_iters
    assert cfg.checkpoint.at == [2, 8] and cfg.eval == one.config.eval
    assert str(cfg.runtime.output_dir) == "trials/random-all-trunk-R18"
    same = lambda c: c.model_dump(exclude={"schedule", "checkpoint", "runtime"})  # noqa: E731
    assert same(cfg) == same(one.config)


def test_when_nothing_forks(tmp_path):
    # A single schedule per cell, forking switched off, or a schedule without LR drops: plain trials.
    single = _exp(tmp_path, grid={**GRID, "schedule": ["1x"]})
    assert not single.forks.trunks
    off = _exp(tmp_path, grid=GRID, fork_schedules=False)
    assert not off.forks.trunks and not off.forks.branches
    flat = _exp(tmp_path, grid={**GRID, "data": ["all"], "schedule": ["1x", {"iters": 9, "drops": []}]})
    assert not flat.forks.trunks
    # Without a schedule axis forking is off by default.
    assert not parse_spec(tiny_spec(tmp_path, grid={"data": ["all"]})).forking


def test_forking_changes_the_sweep_identity(tmp_path):
    on, off = _exp(tmp_path, grid=GRID), _exp(tmp_path, grid=GRID, fork_schedules=False)
    assert on.spec_hash != off.spec_hash
    assert [t.trial_id for t in on.trials] == [t.trial_id for t in off.trials]
    assert "2 trials added (random-all-trunk-R18, random-8-trunk-R18)" in describe_changes(off.identities,
                                                                                         on.identities)
    # Nothing to fork: the hash is what it was before forking existed.
    single = {**GRID, "schedule": ["1x"]}
    assert _exp(tmp_path, grid=single).spec_hash == _exp(tmp_path, grid=single, fork_schedules=False).spec_hash


def test_checkpoint_naming_matches_the_trainer(tmp_path):
    from trainer.engine.checkpoint import checkpoint_path

    assert TrialDir(tmp_path).checkpoint(480_000) == checkpoint_path(tmp_path / "checkpoints", 480_000)


def checkpoint_file(folder, at):
    return TrialDir(folder).checkpoint(at)


def _task(tid, total, fork=None, needs=()):
    return make_task(tid, total, fork=fork, needs=needs)


def _on_disk(names):
    """exists() over "TRUNK@AT" names of fork checkpoints (the tasks live in /nonexistent/trials)."""
    return lambda path: f"{Path(path).parents[1].name}@{int(Path(path).stem.split('_')[1])}" in names


def test_queue_releases_branches_once_their_fork_checkpoint_exists():
    on_disk: set[str] = set()
    tasks = [_task("plain", 10), _task("b1", 6, ("T", 2)), _task("b2", 12, ("T", 8)), _task("T", 8)]
    q = ReleaseQueue(tasks, exists=_on_disk(on_disk))
    # Longest critical path first: the trunk (8 + its longest branch's 4) before a 10-iteration trial.
    assert q.next().trial_id == "T" and q.next().trial_id == "plain" and q.next() is None
    on_disk.add("T@2")
    assert q.next().trial_id == "b1" and q.next() is None
    # A restarted driver learns from Tune's trial list what was released before: nothing twice.
    again = ReleaseQueue(tasks, exists=_on_disk(on_disk))
    again.sync([("T", "RUNNING"), ("plain", "TERMINATED"), ("b1", "PENDING")])
    assert again.next() is None
    # A trunk that ended without the checkpoint releases its branch (which then fails saying why).
    again.sync([("T", "ERROR"), ("plain", "TERMINATED"), ("b1", "RUNNING")])
    assert again.next().trial_id == "b2" and again.next() == FINISHED


def test_queue_hands_out_no_more_than_the_cluster_holds():
    on_disk = {"T@2", "T@8"}
    tasks = [_task("plain", 10), _task("b1", 6, ("T", 2)), _task("b2", 14, ("T", 8)), _task("T", 8)]
    q = ReleaseQueue(tasks, exists=_on_disk(on_disk))
    q.limit = 2
    assert q.next().trial_id == "T" and q.next().trial_id == "plain"
    assert q.next() is None  # two running or waiting: a third waits in the queue, not in Tune
    q.sync([("T", "TERMINATED"), ("plain", "PENDING")])  # a gang freed: the longest ready, b2 (6 to b1's 4)
    assert q.next().trial_id == "b2" and q.next() is None
    q.limit = 3  # a node joined
    q.sync([("T", "TERMINATED"), ("plain", "RUNNING"), ("b2", "RUNNING")])
    assert q.next().trial_id == "b1" and q.next() == FINISHED


def test_queue_holds_pretrained_tasks_until_their_backbone_is_on_disk():
    done: set[str] = set()
    tasks = [_task("pre-long", 20, needs=("synthetic-r18",)), _task("random", 10), _task("random-short", 4)]
    q = ReleaseQueue(tasks, job_done=done.__contains__)
    q.limit = 1  # one slot left beside the running pretrain job
    assert q.next().trial_id == "random" and q.next() is None  # the longer task waits for its backbone
    done.add("synthetic-r18")
    q.limit = 2  # the job ended: its slot is free again
    assert q.next().trial_id == "pre-long" and q.next() is None
    # A failed job releases its trials (they fail on the missing backbone instead of holding the sweep).
    failed = ReleaseQueue([_task("pre-long", 20, needs=("other",))], job_done=done.__contains__)
    assert failed.next() is None
    failed.failed_jobs = {"other"}
    assert failed.next().trial_id == "pre-long" and failed.next() == FINISHED


def test_a_branch_forks_once_then_resumes_its_own(tmp_path):
    from orchestrator.errors import ForkError
    from orchestrator.worker.trainable import fork_source
    from orchestrator.worker.reporting import TuneReporter
    from trainer.engine.reporters import RunInfo

    trunk_ckpt = checkpoint_file(tmp_path / "trunk", 2)
    out = tmp_path / "b1"
    task = make_task("b1", 6, folder=out, fork=("trunk", 2), run_id="run-b1", config={"checkpoint": {"period": 3}})
    out.mkdir()
    with pytest.raises(ForkError, match="trunk trunk has no checkpoint at iteration 2"):
        fork_source(task)
    trunk_ckpt.parent.mkdir(parents=True)
    trunk_ckpt.write_bytes(b"x")
    assert fork_source(task) == trunk_ckpt and (out / "fork.json").exists()
    checkpoint_file(out, 3).parent.mkdir()
    checkpoint_file(out, 3).write_bytes(b"x")
    assert fork_source(task) is None  # its own checkpoints from now on: never forked twice
    # Started from the trunk's checkpoint, the branch reports into its own run, not the trunk's.
    sent = []
    info = RunInfo(None, out, 2, 6, {"mlflow_run_id": "", "trial_id": "T"})
    TuneReporter(sent.append, task, 1, trunk_ckpt).start(info)
    row = json.loads((out / "attempts.jsonl").read_text())
    assert info.tracking == {"mlflow_run_id": "run-b1", "trial_id": "b1"} and row["run_id"] == "run-b1"
