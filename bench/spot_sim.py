"""Benchmark: the paper grid's shape on Ray's fake autoscaler, with preemptions injected (issue 24, item 5).

The tasks are `bench/cluster_sim.py`'s (the paper grid expanded and forked as `run` does: 20 trunks +
120 branches, each lasting its planned gang-hours scaled so the makespan bound is `--bound-s`
seconds), run through the orchestrator's own `ray_backend.run_tune` with the driver's
`capacity.Capacity` on Ray's fake autoscaler (`tests/orchestrator/fake_autoscaler.py`: a head
without GPUs, a worker type of `--node-gpus` declared GPUs, min 0, max `--nodes`). Each task
checkpoints every `--ckpt` planned iterations through the trainer's own `CheckpointHook` (a real
checkpoint file; a retried attempt resumes from the newest) and notes the step it reached, so the work
a preemption costs is measured, not assumed. One bench step (0.1 s) is many planned iterations: the
redone work is measured in whole steps.

Preemptions arrive at `--rate` per node-hour of the plan's scaled schedule (their count is
rate x nodes x bound hours, at seeded random times from 10% to 80% of the bound after the first gang
is placed), each on a GPU node running a task:
  without notice   the node's trial processes are killed (SIGKILL): their trials fail and are retried
                   from their newest checkpoint. (Not the whole node: Ray's fake provider keeps a killed
                   node listed as pending for ever, so its autoscaler never replaces it and the sweep
                   would stall; `tests/orchestrator/test_autoscaling_ray.py` kills a whole node where a
                   replacement fits under max_workers.)
  with notice      SIGTERM to the node's trial processes (what a platform sends before its hard kill).
                   The stand-in handles it with the trainer's own machinery: the product's
                   `PreemptionNotice` mixin routes SIGTERM to `trainer.engine.preemption`'s flag, and the real
                   `PreemptionHook` after the step in flight writes that step's checkpoint and raises
                   `PreemptedError`; the attempt reports event "preempted" first (as `trial_report`
                   does), so the driver reschedules it without counting a failure.
Printed per arm: makespan beside the bound, preemptions, planned iterations and GPU-hours redone per
preemption, GPU nodes launched and removed, and any task that ended twice or never (with what the
driver saw of it). MLflow is not in this loop (the stand-in trials log no metrics), so duplicate MLflow
points are not measured here; the Ray tests check them on real trials.

    python bench/spot_sim.py                 # 32 GPUs (2 nodes x 16), bound 30 s, ckpt 5k and 20k iters
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cluster_sim import STEP_S, build_tasks  # noqa: E402  (after the path is set)
from orchestrator.worker.trainable import PreemptionNotice  # noqa: E402
from orchestrator.worker.reporting import K_EVENT, PREEMPTED  # noqa: E402


class _SimRun:
    """What `trainer.engine.hooks.CheckpointHook` and `trainer.engine.preemption.PreemptionHook` read of a trainer,
    for one stand-in task: one rank, its iteration (a bench step), its checkpoint folder and period."""

    world, rank, stop_after, reporters = 1, 0, None, ()

    def __init__(self, sim: dict[str, Any]):
        from types import SimpleNamespace

        self.total_iters, self.ckpt_dir = sim["steps"], Path(sim["progress"])
        self.state = SimpleNamespace(iteration=0)
        self.cfg = SimpleNamespace(checkpoint=SimpleNamespace(period=sim["ckpt_steps"], at=[], keep_last=2),
                                   runtime=SimpleNamespace(preemption_grace_s=20.0))

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.state.iteration}

    def check_finite(self) -> None:
        pass

    sync_counters = gather_rank_states = barrier = check_finite


def spot_trial(config: dict[str, Any]) -> None:
    """Tune trainable: one task paced to its scaled length, resuming from its own newest checkpoint.

    Its preemption handling is the trainer's own: SIGTERM reaches `trainer.engine.preemption`'s handler
    (installed by the product's `PreemptionNotice` mixin, armed while the task runs), the real
    `CheckpointHook` and `PreemptionHook` run after each step (checkpoint at that step, then
    `PreemptedError`), and the attempt reports event "preempted" first, as `trial_report` does, so
    the driver reschedules it without counting a failure."""
    import numpy as np
    from ray import tune

    from trainer.engine import checkpoint as ckpt
    from trainer.engine.hooks import CheckpointHook
    from trainer.engine.preemption import PreemptedError, PreemptionHook, armed

    task = config["trial"]
    sim = task["sim"]
    run, reached = _SimRun(sim), Path(sim["progress"] + ".reached")
    start = max((it for it, _ in ckpt.list_checkpoints(run.ckpt_dir)), default=0)
    if start >= sim["steps"]:  # stopped after its end, before Tune saw it: skipped, as run_trial's _done does
        _row(sim, {"name": task["name"], "skipped": "finished", "t": time.time()})
        tune.report({"done": 1.0})
        return
    lost = max(0, _step(reached) - start)  # what the stopped attempt did past its checkpoint
    _row(sim, {"name": task["name"], "attempt_from": start, "lost_steps": lost, "t": time.time()})
    t0 = time.time() - start * STEP_S
    x = np.full((32, 32), 1e-3)
    marks = {int(k): v for k, v in sim["forks"].items()}
    hooks = [CheckpointHook(), PreemptionHook()]  # the trainer's order: the checkpoint, then the notice
    try:
        with armed():
            for step in range(start + 1, sim["steps"] + 1):
                x = x @ x + 1e-3
                time.sleep(max(0.0, t0 + step * STEP_S - time.time()))
                run.state.iteration = step
                _put(reached, step)
                if step in marks:
                    Path(marks[step]).touch()
                for hook in hooks:
                    hook.after_step(run)
    except PreemptedError as exc:
        _row(sim, {"name": task["name"], "preempted_at": exc.iteration, "t": time.time()})
        tune.report({K_EVENT: PREEMPTED, "step": exc.iteration})  # before the error: no failure counted
        raise
    _row(sim, {"name": task["name"], "end": time.time()})
    tune.report({"done": 1.0})


spot_trial.__mixins__ = (PreemptionNotice,)  # type: ignore[attr-defined]  # the product's SIGTERM routing


def _row(sim: dict[str, Any], row: dict[str, Any]) -> None:
    with open(sim["log"], "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _step(path: Path) -> int:
    """A step number from a progress file (0 if absent, or caught mid-write by a kill)."""
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _put(path: Path, step: int) -> None:
    """Write a step number atomically (a kill leaves the old or the new one)."""
    tmp = Path(f"{path}.tmp")  # not with_suffix: trial names have dots (imagenet-3.5k-...)
    tmp.write_text(str(step))
    tmp.replace(path)


def _with_checkpoints(tasks: list[dict[str, Any]], folder: Path, ckpt_iters: int) -> None:
    (folder / "progress").mkdir()
    for t in tasks:
        sim = t["sim"]
        iters = t["total"] - (t.get("fork") or {}).get("at", 0)
        per_step = max(1.0, iters / sim["steps"])
        sim.update(progress=str(folder / "progress" / t["name"]), ckpt_steps=max(1, round(ckpt_iters / per_step)),
                   iters_per_step=per_step)


class Injector(threading.Thread):
    """Preempts a GPU node running a task at each of `times` (seconds after start)."""

    def __init__(self, sid: int, times: list[float], notice: bool, seed: int):
        super().__init__(daemon=True)
        self.sid, self.times, self.notice, self.rng = sid, times, notice, random.Random(seed)
        self.done: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import ray

        from bench.harness.fake_autoscaler import node_pids

        while not _busy_nodes():  # the times count from the first gang placed (nodes take a while to come)
            if self.stop.wait(0.5):
                return
        t0 = time.time()
        for at in self.times:
            if self.stop.wait(max(0.0, t0 + at - time.time())):
                return
            busy = _busy_nodes()
            if not busy:
                continue
            node = self.rng.choice(busy)
            trials = [p for p in node_pids(self.sid, node) if _is_worker(p)]
            for pid in trials:
                try:
                    os.kill(pid, signal.SIGTERM if self.notice else signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.done.append((time.time() - t0, node[-5:]))


def _busy_nodes() -> list[str]:
    """Alive GPU nodes where some GPU is held (a gang runs there)."""
    import ray

    free = ray._private.state.available_resources_per_node()
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0.0)
            > free.get(n["NodeID"], {}).get("GPU", 0.0)]


def _is_worker(pid: int) -> bool:
    """A Ray worker running a task or actor (a trial): not an idle worker, not the node's agents."""
    try:
        name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return name.startswith(b"ray::") and b"Agent" not in name and name != b"ray::IDLE"


class Tally:
    """The driver's view (the `monitor` that `run_tune` reports to): per task id, its Tune starts,
    completions, retried errors (preemptions among them) and final errors."""

    def __init__(self) -> None:
        self.events: dict[str, list[str]] = {}

    def _add(self, tid: str, what: str) -> None:
        self.events.setdefault(tid, []).append(what)

    def on_start(self, tid: str) -> None:
        self._add(tid, "start")

    def on_result(self, tid: str, result: dict[str, Any]) -> None:
        if result.get(K_EVENT) == PREEMPTED:
            self._add(tid, "preempted")

    def on_complete(self, tid: str) -> None:
        self._add(tid, "complete")

    def on_error(self, tid: str, final: bool, error: str) -> None:
        self._add(tid, "error" if final else "retry")

    def tick(self) -> None:
        pass


def _end_counts(tasks: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many end rows each task wrote (one each in a sound run)."""
    counts = {t["name"]: 0 for t in tasks}
    for r in rows:
        if "end" in r:
            counts[r["name"]] += 1
    return counts


def one_arm(address: str, sid: int, args: argparse.Namespace, notice: bool, ckpt: int) -> dict[str, Any]:
    import ray

    import orchestrator.execution.autoscale as autoscale
    import orchestrator.execution.ray_backend as rb
    from orchestrator.execution.capacity import Capacity, most_at_once
    from orchestrator.sweep.expand import expand
    from orchestrator.sweep.plan import makespan_bound
    from orchestrator.sweep.spec import load_spec

    gpus = args.nodes * args.node_gpus
    folder = Path(tempfile.mkdtemp(prefix="spot-sim-"))
    (folder / "marks").mkdir()
    tasks, res, scale = build_tasks(gpus, args.bound_s, folder)
    _with_checkpoints(tasks, folder, ckpt)
    bound_h = makespan_bound(expand(load_spec(REPO / "sweeps" / "paper_grid.yaml")), gpus).bound_h
    count = round(args.rate * args.nodes * bound_h)
    rng = random.Random(args.seed)
    times = sorted(rng.uniform(0.1, 0.8) * args.bound_s for _ in range(count))
    before = {n["NodeID"] for n in ray.nodes()}  # alive or gone: the nodes of earlier arms
    auto = autoscale.node_types()
    most = most_at_once(res, auto, rb.node_resources())
    capacity = Capacity(res, set(rb.alive_nodes()), None, None, auto, most)
    injector, tally = Injector(sid, times, notice, args.seed), Tally()
    t0 = time.time()
    injector.start()
    try:
        rb.run_tune(folder, tasks, res, args.max_failures, most, tally, trainable=spot_trial, capacity=capacity)
    finally:
        injector.stop.set()
    wall = time.time() - t0
    time.sleep(args.idle_wait)  # idle nodes go after the autoscaler's idle timeout
    nodes = [n for n in ray.nodes() if n["NodeID"] not in before]  # a gone node lists no resources
    rows = [json.loads(x) for x in (folder / "tasks.jsonl").read_text().splitlines()]
    ends = [r["end"] for r in rows if "end" in r]
    odd = {n: c for n, c in _end_counts(tasks, rows).items() if c != 1}
    ids = {t["name"]: t["trial_id"] for t in tasks}
    for name, c in odd.items():  # what the driver saw of a task that ended twice or never
        logging.warning("%s: %d end rows; driver saw %s; its rows %s", name, c, tally.events.get(ids[name]),
                        [r for r in rows if r["name"] == name])
    starts = [r["t"] for r in rows if "attempt_from" in r or "skipped" in r]  # one per attempt
    per_step = {t["name"]: t["sim"]["iters_per_step"] for t in tasks}
    lost_iters = sum(r["lost_steps"] * per_step[r["name"]] for r in rows if r.get("lost_steps"))
    lost_gpu_h = sum(r["lost_steps"] * STEP_S for r in rows if r.get("lost_steps")) / scale * res.gpus_per_trial
    n = max(1, len(starts) - len(tasks))  # attempts a preemption stopped (each is retried once more)
    return {"notice": notice, "ckpt": ckpt, "makespan": max(ends) - min(starts), "wall": wall,
            "bound": args.bound_s, "preemptions": len(injector.done), "planned": count,
            "lost_iters": lost_iters / n, "lost_gpu_h": lost_gpu_h / n, "stopped": len(starts) - len(tasks),
            "finished": len(ends), "tasks": len(tasks), "odd": odd,
            "errored": sorted(n for n, tid in ids.items() if "error" in tally.events.get(tid, [])),
            "noticed": sum(1 for r in rows if "preempted_at" in r), "load": os.getloadavg(),
            "launched": len(nodes), "removed": sum(1 for x in nodes if not x["Alive"]), "rate": args.rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2, help="max GPU nodes the autoscaler may launch")
    ap.add_argument("--node-gpus", type=int, default=16)
    ap.add_argument("--bound-s", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=0.002, help="preemptions per node-hour of the plan's schedule")
    ap.add_argument("--ckpt", type=int, nargs=2, default=[5000, 20000], help="two checkpoint periods (iterations)")
    ap.add_argument("--max-failures", type=int, default=20)
    ap.add_argument("--idle-wait", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    from bench.harness.local import auth_disabled
    from bench.harness.fake_autoscaler import fake_cluster

    workers = {"gpu": {"resources": {"CPU": args.node_gpus * 6, "GPU": args.node_gpus}, "max_workers": args.nodes}}
    results = []
    with tempfile.TemporaryDirectory(prefix="spot-cluster-") as tmp, auth_disabled():
        with fake_cluster(Path(tmp), workers, head_cpus=2, max_workers=args.nodes, idle_min=0.1) as (address, sid):
            ray.init(address=address, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
            try:
                # First an arm without preemptions: what the makespan is here before any is injected.
                arms = [(False, args.ckpt[0], 0.0)] + [(n, c, args.rate) for n in (False, True) for c in args.ckpt]
                for notice, ckpt, rate in arms:
                    results.append(one_arm(address, sid, argparse.Namespace(**{**vars(args), "rate": rate}),
                                           notice, ckpt))
            finally:
                ray.shutdown()
    _print(results, args)
    return 0 if all(not r["odd"] and not r["errored"] for r in results) else 1


def _print(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"paper grid shape (20 trunks + 120 branches, 8-GPU gangs) on a fake autoscaler: head without GPUs, "
          f"up to {args.nodes} nodes x {args.node_gpus} declared GPUs; lengths scaled to a {args.bound_s:g} s bound; "
          f"preemptions at {args.rate:g} per node-hour of the plan")
    print(f"{'rate':>5}  {'notice':>6}  {'ckpt':>6}  {'makespan s':>10}  {'bound s':>7}  {'ratio':>5}  "
          f"{'preempt.':>8}  {'stopped':>7}  {'iters redone/stop':>17}  {'GPU-h redone/stop':>17}  "
          f"{'launched':>8}  {'removed':>7}  {'done':>7}  {'stopped on notice':>17}  load 1/5/15 min")
    for r in results:
        print(f"{r['rate']:>5g}  {'yes' if r['notice'] else 'no':>6}  {r['ckpt']:>6}  {r['makespan']:>10.1f}  "
              f"{r['bound']:>7.1f}  {r['makespan'] / r['bound']:>5.2f}  {r['preemptions']:>8}  {r['stopped']:>7}  "
              f"{r['lost_iters']:>17,.0f}  {r['lost_gpu_h']:>17.1f}  {r['launched']:>8}  {r['removed']:>7}  "
              f"{r['finished']:>3}/{r['tasks']}  {r['noticed']:>17}  {'/'.join(f'{x:.1f}' for x in r['load'])}")
    for r in results:
        if r["odd"] or r["errored"]:
            print(f"  {'notice' if r['notice'] else 'no notice'}, ckpt {r['ckpt']}: end rows not 1 {r['odd']}; "
                  f"Tune ended as ERROR {r['errored']}")
    print("duplicate MLflow points: not measured (the stand-in trials log no metrics)")


if __name__ == "__main__":
    sys.exit(main())
