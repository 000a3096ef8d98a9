"""The demo sweep three ways, one after the other on one machine: forked, unforked, and as plain processes.

1. `python -m orchestrator run` on the demo spec with `fork_schedules: true` (the default);
2. the same spec with `fork_schedules: false` (every trial trains from iteration 0);
3. the unforked sweep's own jobs (its pretrain config and trial configs, as the sweep wrote them) run
   with `python -m trainer.pretrain` / `python -m trainer`, no Ray and no MLflow, as many at a time
   as the sweep ran (`max_concurrent`, 2 on the demo) and in the order the sweep started them.

(2) vs (3) is the orchestration overhead: Ray start, Tune, the MLflow single writer, checkpoint
reporting, trial process start-up, scheduling gaps. (1) vs (2) is what schedule forking saves on
the demo. The dataset is generated once beforehand so no run pays for it. All three runs train the
same iterations as their plan says and get the same AP (CPU training is deterministic); the table
shows both so a reader can check.

    python bench/orchestration_overhead.py [--spec sweeps/demo.yaml] [--work DIR] [--skip-forked]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.dataset import generate, needs_generation  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402


def _env(data: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "DEMO_DATA": str(data)}


def run_sweep(spec_path: Path, work: Path, name: str, fork: bool, data: Path) -> dict:
    """One orchestrator run of a renamed copy of the spec; returns wall time and what it trained."""
    spec = yaml.safe_load(spec_path.read_text())
    spec.update(name=name, fork_schedules=fork)
    (work / name).mkdir(parents=True, exist_ok=True)
    copy = work / name / "spec.yaml"
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(copy), "--no-view", "--storage",
                           str(work / "runs")], cwd=work / name, env=_env(data), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / name / "driver.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{name}: orchestrator exited {proc.returncode}; see {work / name / 'driver.log'}")
    sweep = work / "runs" / name
    return {"wall": wall, **_trained(sweep), "best_ap": _best_ap(sweep), "sweep": sweep}


def _trained(sweep: Path) -> dict:
    iters = 0
    for seg in sweep.glob("trials/*/segments.jsonl"):
        for line in seg.read_text().splitlines():
            row = json.loads(line)
            iters += row["end"] - row["start"]
    return {"iterations": iters, "jobs": len(list(sweep.glob("trials/*/segments.jsonl")))}


def _best_ap(root: Path) -> float:
    aps = [json.loads(p.read_text()).get("bbox/AP", float("nan")) for p in root.glob("**/final_metrics.json")]
    return max(aps) if aps else float("nan")


def standalone_jobs(sweep: Path, out: Path) -> tuple[list[list[str]], list[tuple[str, list[str]]]]:
    """The sweep's pretrain commands and its trial commands (in the sweep's start order), re-rooted."""
    pre_cmds, renamed = [], {}
    for cfg in sorted(sweep.glob("pretrain/*/pretrain_config.yaml")):
        dest = out / "pretrain" / cfg.parent.name
        pre_cmds.append([sys.executable, "-m", "trainer.pretrain", "--config", str(cfg),
                         "--set", f"output_dir={dest}"])
        renamed[str(cfg.parent / "backbone.pt")] = str(dest / "backbone.pt")
    started = []
    for trial in sweep.glob("trials/*"):
        first = json.loads((trial / "attempts.jsonl").read_text().splitlines()[0])
        started.append((first["time"], trial))
    trials = []
    for _, trial in sorted(started):
        cfg = yaml.safe_load((trial / "config.yaml").read_text())
        cmd = [sys.executable, "-m", "trainer", "--config", str(trial / "config.yaml"),
               "--set", f"runtime.output_dir={out / 'trials' / trial.name}"]
        init = cfg["model"]["init"]
        if init.startswith("checkpoint:") and init[len("checkpoint:"):] in renamed:
            cmd += ["--set", f"model.init=checkpoint:{renamed[init[len('checkpoint:'):]]}"]
        trials.append((trial.name, cmd))
    return pre_cmds, trials


def run_pool(jobs: list[tuple[str, list[str]]], slots: int, cwd: Path, env: dict) -> dict[str, float]:
    """Run commands `slots` at a time in the given order; returns each job's own wall time."""
    pending, running, took = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < slots:
            name, cmd = pending.pop(0)
            log = open(cwd / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT),
                             time.perf_counter(), log)
        time.sleep(0.2)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                if proc.returncode != 0:
                    sys.exit(f"standalone {name} exited {proc.returncode}; see {cwd / (name + '.log')}")
                took[name] = time.perf_counter() - t0
                del running[name]
    return took


def run_standalone(sweep: Path, work: Path, data: Path, slots: int) -> dict:
    out = work / "standalone"
    out.mkdir(parents=True, exist_ok=True)
    pre_cmds, trials = standalone_jobs(sweep, out)
    t0 = time.perf_counter()
    pre = run_pool([(f"pretrain-{i}", c) for i, c in enumerate(pre_cmds)], 1, out, _env(data))
    took = run_pool(trials, slots, out, _env(data))
    wall = time.perf_counter() - t0
    return {"wall": wall, "pretrain": sum(pre.values()), "trial_sum": sum(took.values()), "per_trial": took,
            "jobs": len(trials), "best_ap": _best_ap(out / "trials")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=REPO / "sweeps" / "demo.yaml")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp dir)")
    ap.add_argument("--skip-forked", action="store_true", help="only the unforked sweep and the plain runs")
    args = ap.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="orch_bench_"))).resolve()
    data = work / "data"
    os.environ["DEMO_DATA"] = str(data)
    spec = load_spec(args.spec.resolve())
    if needs_generation(spec.dataset, need_classification=bool(spec.pretrain)):
        generate(spec.dataset)
    rows = {}
    if not args.skip_forked:
        rows["forked"] = run_sweep(args.spec.resolve(), work, "bench-forked", True, data)
        print(f"forked sweep: {rows['forked']['wall']:.1f} s", flush=True)
    rows["unforked"] = run_sweep(args.spec.resolve(), work, "bench-unforked", False, data)
    print(f"unforked sweep: {rows['unforked']['wall']:.1f} s", flush=True)
    # As many at a time as the sweep itself ran ("running N trials, at most K at a time").
    found = re.search(r"at most (\d+) at a time", (work / "bench-unforked" / "driver.log").read_text())
    slots = int(found.group(1)) if found else 1
    alone = run_standalone(rows["unforked"]["sweep"], work, data, slots)
    report(rows, alone, slots, work)


def report(rows: dict, alone: dict, slots: int, work: Path) -> None:
    print(f"\n# demo sweep, {os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.2f}; work dir {work}")
    print(f"| run | wall (s) | jobs | iterations trained | best box AP |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| `orchestrator run` ({name}) | {r['wall']:.1f} | {r['jobs']} | {r['iterations']} | {r['best_ap']:.4f} |")
    print(f"| plain `python -m trainer`, {slots} at a time | {alone['wall']:.1f} | {alone['jobs']} | "
          f"same as unforked | {alone['best_ap']:.4f} |")
    print(f"\nstandalone: pretrain {alone['pretrain']:.1f} s, trials summed {alone['trial_sum']:.1f} s "
          + ", ".join(f"{k} {v:.0f}" for k, v in alone["per_trial"].items()))
    if "forked" in rows:
        print(f"forking: forked/unforked wall = {rows['forked']['wall'] / rows['unforked']['wall']:.3f}")
    overhead = rows["unforked"]["wall"] / alone["wall"] - 1
    print(f"orchestration overhead: unforked sweep wall / plain processes wall - 1 = {overhead:+.2%}")


if __name__ == "__main__":
    main()
