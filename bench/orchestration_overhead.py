"""Orchestration overhead: a small sweep vs the same trials as plain trainer runs, split into phases.

The workload is the demo's model and data, shrunk to finish in minutes: 4 trials (data all/150 x
seed 0/1, random init, R18-FPN GN, `--iters` iterations at batch `--batch`, one evaluation and one checkpoint at
the end), 2 at a time on 2 cores. Each repeat runs, in alternating order,

* sweep: `python -m orchestrator run SPEC` (Ray started by the driver, Tune with reused actors,
  MLflow in sqlite, checkpoints reported to Tune);
* plain: the sweep's own trial configs run by `python -m trainer`'s entry point inside a pool of as many
  spawned Python processes as the sweep ran trials at once, in the sweep's start order, each process
  taking the next trial when its last one ends (no Ray, no MLflow), with OMP_NUM_THREADS=1 as Ray
  gives its workers.

Cold vs cold at start-up (nothing runs before either side is launched; both start fresh Python
processes), warm vs warm at hand-over (Tune reuses its trial actors; a pool process keeps its imports).
From each trial's own log (`train.log`: the "training iterations" line; the last progress line's
it/s, which the trainer measures with perf_counter over its steps) and its `final_metrics.json` mtime:

  start-up   launch -> the first trial's first training step is about to run
  hand-over  a trial's end -> the next trial in that slot starts training (median over hand-overs)
  step       seconds per iteration inside a trial (median over trials); the ratio is sweep / plain
  shut-down  the last trial's end -> the launched command has exited

Log lines carry whole seconds, so start-up and hand-over are +-1 s. Box AP per trial is compared (CPU
training is deterministic). The machine's load average is printed before and after.

    python bench/orchestration_overhead.py [--repeats 3 --iters 100 --batch 2 --work DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from concurrent.futures import ProcessPoolExecutor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.sweep.dataset import generate, needs_generation  # noqa: E402
from orchestrator.sweep.spec import parse_spec  # noqa: E402

PHASES = ("start-up", "hand-over", "step", "shut-down", "total")
STARTED = re.compile(r"^(\d\d:\d\d:\d\d) .*training iterations \d+ -> \d+")
PROGRESS = re.compile(r"iter \d+/\d+ .* ([0-9.]+) it/s")


def bench_spec(demo: Path, data: Path, iters: int, batch: int) -> dict:
    spec = yaml.safe_load(demo.read_text())
    spec.pop("pretrain", None)
    spec.pop("exclude", None)
    spec.pop("estimate", None)
    spec["dataset"]["root"] = str(data)
    spec["dataset"]["generate"] = {"train": 200, "val": 20, "size": 64}
    spec["grid"] = {"data": ["all", 150], "runtime.seed": [0, 1]}
    base = spec["base"]
    base["model"]["backbone"] = "R18"
    base["schedule"] = {"iters": iters, "drops": [int(iters * 0.8)], "warmup_iters": min(20, iters // 5)}
    base["optim"]["batch_size"] = batch
    base["eval"] = {"period": 0, "batch_size": 10}
    base["checkpoint"] = {"period": 0, "keep_last": 1}
    spec["fork_schedules"] = False
    return spec


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_sweep(spec: dict, work: Path, name: str) -> dict:
    (work / name).mkdir(parents=True, exist_ok=True)
    path = work / name / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec, "name": name}, sort_keys=False))
    launch = time.time()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(path), "--no-view", "--storage",
                           str(work / "runs")], cwd=work / name, env=_env(), capture_output=True, text=True)
    exited = time.time()
    (work / name / "driver.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{name}: orchestrator exited {proc.returncode}; see {work / name / 'driver.log'}")
    found = re.search(r"at most (\d+) at a time", proc.stdout + proc.stderr)
    trials = sorted((work / "runs" / name / "trials").glob("*"))
    return {"launch": launch, "exit": exited, "slots": int(found.group(1)) if found else 1, "trials": trials}


def _run_one(job: tuple[str, str]) -> None:
    """One trial inside a warm pool process: `python -m trainer --config CFG --set runtime.output_dir=OUT`."""
    from trainer.__main__ import main

    # A spawned pool process inherits "spawn" as its default start method; `python -m trainer` forks its
    # loader workers (spawning them re-imports torch at every evaluation: ~10x slower inference here).
    mp.set_start_method("fork", force=True)
    cfg, out = job
    Path(out).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(out) / "train.log")  # the same format as a sweep trial's train.log
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        if main(["--config", cfg, "--set", f"runtime.output_dir={out}"]) != 0:
            raise RuntimeError(f"trainer failed on {cfg}; see {out}/train.log")
    finally:
        root.removeHandler(handler)
        handler.close()


def run_plain(sweep: dict, work: Path, name: str) -> dict:
    """The sweep's trial configs in the sweep's start order, `slots` warm processes taking the next one."""
    order = sorted(sweep["trials"], key=lambda t: json.loads((t / "attempts.jsonl").read_text().splitlines()[0])["time"])
    jobs = [(str(t / "config.yaml"), str(work / name / t.name)) for t in order]
    # Ray starts its workers with OMP_NUM_THREADS = the task's CPUs (1); the pool gets the same, as
    # a user starting trials side by side on a shared machine would set it.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    launch = time.time()
    try:
        # Not multiprocessing.Pool: its processes are daemons, which may not start loader workers.
        with ProcessPoolExecutor(sweep["slots"], mp_context=mp.get_context("spawn")) as pool:
            list(pool.map(_run_one, jobs))
    finally:
        exited = time.time()
        os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.update(OMP_NUM_THREADS=saved)
    return {"launch": launch, "exit": exited, "slots": sweep["slots"], "trials": [Path(j[1]) for j in jobs]}


def _clock(hms: str, near: float) -> float:
    """An HH:MM:SS log stamp (local time) as epoch seconds, on the day of `near`."""
    day = dt.datetime.fromtimestamp(near).date()
    t = dt.datetime.combine(day, dt.time.fromisoformat(hms)).timestamp()
    return t + 86400 if t < near - 43200 else t


def phases(run: dict) -> dict:
    """The phase table of one launched run (see the module docstring), plus per-trial s/iter and AP."""
    starts, ends, per_it, ap = [], [], {}, {}
    for trial in run["trials"]:
        text = (trial / "train.log").read_text()
        started = [m.group(1) for m in map(STARTED.search, text.splitlines()) if m]
        rates = PROGRESS.findall(text)
        if not started or not rates:
            sys.exit(f"{trial}/train.log has no training start or progress line")
        starts.append(_clock(started[-1], run["launch"]))
        ends.append((trial / "final_metrics.json").stat().st_mtime)
        per_it[trial.name] = 1.0 / float(rates[-1])
        ap[trial.name] = json.loads((trial / "final_metrics.json").read_text())["bbox/AP"]
    starts.sort()
    ends.sort()
    slots = run["slots"]
    hand = [starts[i] - ends[i - slots] for i in range(slots, len(starts))]
    return {"start-up": starts[0] - run["launch"], "hand-over": statistics.median(hand) if hand else float("nan"),
            "step": statistics.median(per_it.values()), "shut-down": run["exit"] - ends[-1],
            "total": run["exit"] - run["launch"], "per_it": per_it, "ap": ap}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=REPO / "sweeps" / "demo.yaml", help="model/data recipe to shrink")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="orch_bench_"))).resolve()
    load_before = os.getloadavg()
    spec = bench_spec(args.spec.resolve(), work / "data", args.iters, args.batch)
    parsed = parse_spec(spec, source="bench spec")
    if needs_generation(parsed.dataset, need_classification=False):
        generate(parsed.dataset)
    rows: list[dict] = []
    first = None
    for r in range(args.repeats):
        sides = ("sweep", "plain") if r % 2 == 0 else ("plain", "sweep")
        row = {}
        for side in sides:
            if side == "sweep":
                run = run_sweep(spec, work, f"bench-sweep-{r}")
                first = first or run
            else:
                run = run_plain(first, work, f"plain-{r}")
            row[side] = phases(run)
            print(f"repeat {r + 1}/{args.repeats} {side}: {row[side]['total']:.1f} s", flush=True)
        rows.append(row)
    report(rows, first["slots"], len(first["trials"]), args, work, load_before)
    return 0


def report(rows: list[dict], slots: int, n: int, args: argparse.Namespace, work: Path, load_before) -> None:
    print(f"\n# {n} trials x {args.iters} iterations (batch {args.batch}), {slots} at a time, {args.repeats} repeats; "
          f"{os.cpu_count()} CPUs; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"work dir {work}")
    print("| phase | sweep (median, min-max) | plain (median, min-max) | sweep - plain | sweep / plain |")
    print("|---|---|---|---|---|")
    for phase in PHASES:
        cells = []
        for side in ("sweep", "plain"):
            v = [r[side][phase] for r in rows]
            cells.append(f"{_num(statistics.median(v), phase)} ({_num(min(v), phase)}-{_num(max(v), phase)})")
        diffs = [r["sweep"][phase] - r["plain"][phase] for r in rows]
        ratios = [r["sweep"][phase] / r["plain"][phase] for r in rows]
        unit = " s/it" if phase == "step" else " s"
        print(f"| {phase} | {cells[0]} | {cells[1]} | {_num(statistics.median(diffs), phase)}{unit} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
    aps = [abs(r["sweep"]["ap"][k] - r["plain"]["ap"][k]) for r in rows for k in r["plain"]["ap"]]
    print(f"\nper trial box AP, sweep vs plain: max |difference| {max(aps):.2e} over {len(aps)} pairs")
    print("per-repeat sweep/plain total: " + ", ".join(f"{r['sweep']['total'] / r['plain']['total']:.3f}" for r in rows))


def _num(v: float, phase: str) -> str:
    return f"{v:.3f}" if phase == "step" else f"{v:.1f}"


if __name__ == "__main__":
    sys.exit(main())
