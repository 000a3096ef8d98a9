"""Benchmark: the paper grid's shape as whole-gang trials on a fake-GPU Ray cluster (project issue 12, item 7).

The tasks are the paper grid's own (`sweeps/paper_grid.yaml`, expanded and forked as `run` does:
20 trunks + 120 branches), each lasting its planned hours on its gang (`orchestrator.sweep.plan`: the
iterations it trains itself at the spec's images/s, over its GPUs), scaled so the sweep's makespan
lower bound is `--bound-s` seconds. They run through the orchestrator's own Tune path
(`ray_backend.run_tune`: the gang's placement group per trial, the fork queue deciding who starts,
bounded by what the cluster holds) on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`)
whose nodes declare GPUs. A task's process does tiny real CPU steps (a 32x32 matmul) paced to its
scaled length; a trunk writes its fork-point files on the way, which release its branches. The
gang's worker processes are not started (the trial's placement group holds their GPUs; what this
measures is who holds GPUs when). Printed, per repeat:

  makespan             first task start to last task end (wall seconds)
  bound                max(critical path, total GPU-time / GPUs the gangs can use), same scale
  ratio                makespan / bound (target <= 1.15)
  PGs                  placement groups the cluster made (GCS table) for the 140 trial attempts (Tune
                       reuses a finished trial's group and process for the next trial of the same
                       shape), and how many of them waited (were tried more than once) before placed
  peak                 most trials holding their gang at one time (from the tasks' own start/end)

    python bench/cluster_sim.py                        # 64 GPUs on 4 nodes, bound 120 s, 2 repeats
    python bench/cluster_sim.py --gpus 32 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEP_S = 0.1
SIM_TABLE = "CLUSTER_SIM_TABLE"  # the env var naming the sim table (steps and fork files per task)


def sim_trial(config: dict[str, Any]) -> None:
    """Tune trainable: one task (the product's wire dict), paced to its scaled length; a trunk writes the
    checkpoint files its branches fork from (empty: the release queue only checks that they exist)."""
    import numpy as np
    import ray
    from ray import tune

    task = config["trial"]
    sim = json.loads(Path(os.environ[SIM_TABLE]).read_text())[task["trial_id"]]
    t0 = time.time()
    x = np.full((32, 32), 1e-3)
    marks = {int(k): v for k, v in sim["forks"].items()}
    for step in range(1, sim["steps"] + 1):
        x = x @ x + 1e-3  # a tiny real CPU step
        time.sleep(max(0.0, t0 + step * STEP_S - time.time()))
        for path in marks.get(step, []):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).touch()
    pg = ray.util.get_current_placement_group()
    row = {"name": task["name"], "start": t0, "end": time.time(), "node": ray.get_runtime_context().get_node_id(),
           "pg": pg.id.hex() if pg else None}
    with open(sim["log"], "a") as fh:
        fh.write(json.dumps(row) + "\n")
    tune.report({"done": 1.0})


def build_tasks(gpus: int, bound_s: float, folder: Path) -> tuple[list[Any], Any, float]:
    """The paper grid's tasks, built as `run` builds them, with scaled lengths written to the sim table;
    (tasks, resources, seconds per planned hour)."""
    from orchestrator.execution.run import bound_configs, build_tasks as product_tasks
    from orchestrator.sweep.expand import expand
    from orchestrator.sweep.plan import makespan_bound, plan_rows, trunk_rows
    from orchestrator.sweep.spec import load_spec

    os.environ.setdefault("COCO_ROOT", str(folder / "coco"))
    exp = expand(load_spec(REPO / "sweeps" / "paper_grid.yaml"))
    g = exp.spec.resources.gpus_per_trial
    scale = bound_s / makespan_bound(exp, gpus).bound_h  # seconds per hour
    tasks = product_tasks(exp, bound_configs(exp, folder / "sweep"), {})
    steps = {r.trial.trial_id: max(1, round(r.trains_hours / g * scale / STEP_S)) for r in [*trunk_rows(exp),
                                                                                         *plan_rows(exp)]}
    log, table = str(folder / "tasks.jsonl"), {}
    for t in tasks:
        forks: dict[int, list[str]] = {}
        if t.role == "trunk":
            for b in t.branches:
                forks.setdefault(max(1, round(steps[t.trial_id] * b.at / t.total)), []).append(
                    str(t.folder.checkpoint(b.at)))
        table[t.trial_id] = {"steps": steps[t.trial_id], "forks": forks, "log": log}
    (folder / "sim.json").write_text(json.dumps(table))
    return tasks, exp.spec.resources, scale


def one_run(gpus: int, nodes: int, bound_s: float) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    import orchestrator.execution.ray_backend as rb
    from orchestrator.sweep.fit import max_concurrent
    from orchestrator.sweep.plan import makespan_bound

    folder = Path(tempfile.mkdtemp(prefix="cluster-sim-"))
    tasks, res, scale = build_tasks(gpus, bound_s, folder)
    per_node = gpus // nodes
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": per_node * 6, "num_gpus": per_node, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=per_node * 6, num_gpus=per_node)  # the spec asks 5 CPUs per GPU
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), SIM_TABLE: str(folder / "sim.json")}})
    try:
        concurrent = max_concurrent(res, rb.node_resources())
        t0 = time.time()
        rb.run_tune(folder / "sweep", tasks, res, 0, concurrent, None, trainable=sim_trial)
        wall = time.time() - t0
        table = ray.util.placement_group_table()
    finally:
        ray.shutdown()
        cluster.shutdown()
    rows = [json.loads(x) for x in (folder / "tasks.jsonl").read_text().splitlines()]
    events = sorted([(r["start"], 1) for r in rows] + [(r["end"], -1) for r in rows])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    from orchestrator.sweep.expand import expand
    from orchestrator.sweep.spec import load_spec

    m = makespan_bound(expand(load_spec(REPO / "sweeps" / "paper_grid.yaml")), gpus)
    bound = m.bound_h * scale
    waited = sum(1 for g in table.values() if g.get("stats", {}).get("scheduling_attempt", 0) > 1)
    return {"tasks": len(rows), "expected": len(tasks), "makespan": span, "wall": wall, "bound": bound,
            "critical": m.critical_h * scale, "ratio": span / bound, "pgs": len(table), "waited": waited,
            "peak": peak, "slots": concurrent, "distinct_pgs_used": len({r["pg"] for r in rows})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--bound-s", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    results = [one_run(args.gpus, args.nodes, args.bound_s) for _ in range(args.repeats)]
    print(f"paper grid shape on {args.nodes} nodes x {args.gpus // args.nodes} declared GPUs, 8-GPU gangs "
          f"(20 trunks + 120 branches), lengths scaled to a {args.bound_s:g} s bound")
    print(f"{'repeat':>6}  {'tasks':>5}  {'makespan s':>10}  {'bound s':>7}  {'crit. s':>7}  {'ratio':>5}  "
          f"{'PGs':>4}  {'PGs waited':>10}  {'peak':>4}  {'slots':>5}")
    for i, r in enumerate(results):
        print(f"{i:>6}  {r['tasks']:>5}  {r['makespan']:>10.1f}  {r['bound']:>7.1f}  {r['critical']:>7.1f}  "
              f"{r['ratio']:>5.3f}  {r['pgs']:>4}  {r['waited']:>10}  {r['peak']:>4}  {r['slots']:>5}")
    ratios = [r["ratio"] for r in results]
    spread = f" (min {min(ratios):.3f}, max {max(ratios):.3f})" if len(ratios) > 1 else ""
    print(f"makespan / bound: median {statistics.median(ratios):.3f}{spread}; target <= 1.15")
    ok = all(r["tasks"] == r["expected"] and r["peak"] <= r["slots"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
