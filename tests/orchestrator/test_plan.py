"""`plan` prints the table and totals quickly, with no dataset and without importing Ray/MLflow/torch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from orchestrator.sweep.expand import expand
from orchestrator.sweep.plan import plan_rows, resized_area
from orchestrator.sweep.spec import load_spec

REPO = Path(__file__).resolve().parents[2]


def test_paper_grid_plan_cli_is_fast_and_pure(tmp_path):
    probe = ("import runpy, sys; sys.argv = ['orchestrator', 'plan', 'sweeps/paper_grid.yaml'];\n"
             "try: runpy.run_module('orchestrator', run_name='__main__')\n"
             "except SystemExit as e: code = e.code\n"
             "print('HEAVY', sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules), file=sys.stderr)\n"
             "sys.exit(code)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "COCO_ROOT": str(tmp_path / "no-coco")})
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert elapsed < 5.0
    assert "HEAVY []" in out.stderr
    text = out.stdout
    assert "random-all-6x-R101" in text and "imagenet-1k-1x-R50" in text
    assert "total: 120 trials, 37,800,000 iterations, 604,800,000 images" in text
    assert "GPU-hours" in text


def test_plan_numbers():
    exp = expand(load_spec(REPO / "sweeps" / "paper_grid.yaml"))
    rows = {r.trial.name: r for r in plan_rows(exp)}
    r = rows["random-all-6x-R50"]
    assert r.iters == 540_000 and r.drops == (480_000, 520_000) and r.images == 540_000 * 16
    assert abs(r.epochs - 73.0) < 0.1
    assert r.pixels == r.images * resized_area(480, 640, 800, 1333)
    assert abs(r.gpu_hours - r.images / 3.0 / 3600) < 1e-6
    assert resized_area(480, 640, 800, 1333) == 800 * 1067
    assert resized_area(100, 1000, 800, 1333) == 133 * 1333


def test_plan_gpus_gives_trials_at_once_and_the_makespan_bound():
    from orchestrator.sweep.plan import makespan_bound, render_makespan, trunk_rows

    exp = expand(load_spec(REPO / "sweeps" / "paper_grid.yaml"))
    rows, trunks = plan_rows(exp), trunk_rows(exp)
    m = makespan_bound(exp, 64)
    assert m.slots == 8  # 8-GPU gangs
    assert abs(m.gpu_h - sum(r.trains_hours for r in rows + trunks)) < 1e-6
    longest = max(r.gpu_hours for r in rows) / 8  # the 6x R101 chain: trunk to 480k + its branch
    assert abs(m.critical_h - longest) < 1e-6 and m.bound_h == max(m.critical_h, m.gpu_h / 64)
    assert makespan_bound(exp, 63).slots == 7 and makespan_bound(exp, 7).slots == 0
    assert makespan_bound(exp).gpus == 8 * 20  # default: every trunk at once
    assert "cluster of 64 GPUs: at most 8 trial(s) at a time" in render_makespan(exp, 64)
    out = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "sweeps/paper_grid.yaml", "--gpus", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--gpus 0" in out.stderr
