"""The shipped sweep files: the demo's replicated init x schedule cells and its size; the laptop sweep's."""

from __future__ import annotations

from pathlib import Path

from orchestrator.sweep.expand import expand
from orchestrator.sweep.spec import load_spec
from trainer.engine.schedule import resolve_schedule

REPO = Path(__file__).resolve().parents[2]


def test_demo_replicates_the_cells_its_claims_read_and_has_the_pretrain_job():
    exp = expand(load_spec(REPO / "sweeps" / "demo.yaml"))
    for axis in ("init", "schedule"):  # C1, C2, C4: both inits at two schedules, on all the data
        assert len({t.axes[axis] for t in exp.trials}) == 2, axis
    cells = {}
    for t in exp.trials:
        cells.setdefault((t.axes["init"], t.axes["schedule"]), []).append(t.config.runtime.seed)
    assert all(sorted(seeds) == [1000, 1001, 1002] for seeds in cells.values())  # base seed 1, three replicates
    assert [j.name for j in exp.pretrain] == ["synthetic-r18"]
    assert any(t.init == "pretrained:synthetic-r18" for t in exp.trials)
    # Every trial is CPU-sized: one thread, the images' own 64 px.
    for t in exp.trials:
        assert t.config.runtime.device == "cpu" and t.config.runtime.threads == 1
        assert t.config.model.min_size == t.config.model.max_size == 64


def test_demo_iteration_budget():
    """What the 15-minute budget holds (5:14 alone at half this): 4,800 iterations planned, 4,002 with forking."""
    exp = expand(load_spec(REPO / "sweeps" / "demo.yaml"))
    totals = sorted(resolve_schedule(t.config.schedule).total_iters for t in exp.trials)
    assert totals == [200] * 6 + [600] * 6
    trunks = sum(tr.stop for tr in exp.forks.trunks)
    branches = sum(resolve_schedule(t.config.schedule).total_iters - exp.forks.branches[t.trial_id][1]
                   for t in exp.trials if t.trial_id in exp.forks.branches)
    alone = sum(resolve_schedule(t.config.schedule).total_iters for t in exp.trials
                if t.trial_id not in exp.forks.branches)
    assert (trunks, branches, alone) == (6 * 533, 12 * 67, 0)


def test_laptop_paper_has_c3s_data_sizes_and_its_budget():
    """Both inits at two data sizes and two schedules (for C1..C4), three replicates: ~16,000 forked iterations."""
    exp = expand(load_spec(REPO / "sweeps" / "laptop_paper.yaml"))
    cells = {(t.axes["init"], t.axes["data"], t.axes["schedule"]) for t in exp.trials}
    assert len(cells) == 8 and len(exp.trials) == 24
    assert {t.axes["replicate"] for t in exp.trials} == {0, 1, 2}
    assert {str(t.axes["data"]) for t in exp.trials} == {"all", "100"}
    trunks = sum(tr.stop for tr in exp.forks.trunks)
    branches = sum(resolve_schedule(t.config.schedule).total_iters - exp.forks.branches[t.trial_id][1]
                   for t in exp.trials if t.trial_id in exp.forks.branches)
    assert (len(exp.forks.trunks), trunks + branches) == (12, 3 * 5332)
    assert all(t.config.runtime.threads == 1 and t.config.model.min_size == 64 for t in exp.trials)
