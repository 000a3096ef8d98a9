"""`plan`: the trial table of a spec and what the sweep costs, without a dataset and without Ray.

Per trial: iterations, LR drops, images seen (iterations x batch), epochs (where the train-set size
is known), pixels seen (images x the resized area of the spec's typical image size; with scale
augmentation the largest scale, as the trainer counts), and GPU-hours from the spec's stated
images/s per GPU. With schedule forking, each trial also shows its fork point and the iterations it
trains itself, the trunks get rows of their own, and the totals compare the unforked and the forked
iterations. Pure: imports neither torch, Ray nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.errors import SpecError
from orchestrator.sweep.expand import Expansion, Trial
from orchestrator.sweep.fit import nodes_of_shape, trials_at_once
from orchestrator.sweep.fork import Trunk, trained_iters
from orchestrator.sweep.spec import SweepSpec
from trainer.resize import resized_area
from trainer.engine.schedule import resolve_schedule

COCO_TRAIN2017 = 118_287  # images in train2017: the size of data 'all' for epochs


@dataclass(frozen=True)
class PlanRow:
    trial: Trial | Trunk
    iters: int
    drops: tuple[int, ...]
    images: int
    epochs: float | None
    pixels: float
    gpu_hours: float
    fork: int | None = None  # where a branch leaves its trunk
    trains: int = 0  # iterations it trains itself (a branch: those after its fork point)
    trains_hours: float = 0.0


def images_per_s(spec: SweepSpec, backbone: str) -> float:
    ips = spec.estimate.images_per_s_per_gpu
    if isinstance(ips, dict):
        return float(ips.get(backbone) or max(ips.values()))
    return float(ips)


def plan_rows(exp: Expansion) -> list[PlanRow]:
    rows = []
    for t in exp.trials:
        sched = resolve_schedule(t.config.schedule)
        fork = exp.forks.branches.get(t.trial_id, (None, None))[1]
        rows.append(_row(exp.spec, t, sched.total_iters, sched.drops, fork))
    return rows


def trunk_rows(exp: Expansion) -> list[PlanRow]:
    return [_row(exp.spec, k, k.stop, (), None) for k in exp.forks.trunks]


def _row(spec: SweepSpec, t: Trial | Trunk, iters: int, drops: tuple[int, ...], fork: int | None) -> PlanRow:
    cfg = t.config
    h, w = spec.estimate.image_size
    images = iters * cfg.optim.batch_size
    short = cfg.data.scale_jitter[1] if cfg.data.scale_jitter else cfg.model.min_size
    pixels = float(images) * resized_area(h, w, short, cfg.model.max_size)
    size = cfg.data.train_images if isinstance(cfg.data.train_images, int) else _all_images(spec)
    epochs = images / size if size else None
    per_iter_h = cfg.optim.batch_size / images_per_s(spec, cfg.model.backbone) / 3600
    trains = trained_iters(iters, fork)
    return PlanRow(t, iters, drops, images, epochs, pixels, iters * per_iter_h, fork, trains, trains * per_iter_h)


def _all_images(spec: SweepSpec) -> int | None:
    """The size of data 'all', where it is known without reading the dataset."""
    if spec.dataset.generate is not None:
        return spec.dataset.generate.train
    return COCO_TRAIN2017 if spec.dataset.train_split == "train2017" else None


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def _si(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


@dataclass(frozen=True)
class Makespan:
    gpus: int  # the cluster size it is for
    slots: int  # trials at once: floor(gpus / GPUs per trial)
    critical_h: float  # the longest chain: a trunk then its longest branch, or one unforked trial
    gpu_h: float  # every task's GPU-hours (trunks and branches as they train with forking)
    bound_h: float  # no schedule ends sooner: max(critical path, GPU-hours / GPUs the slots use)


def makespan_bound(exp: Expansion, gpus: int | None = None, node: tuple[int, float] | None = None) -> Makespan:
    """Trials at once and the makespan lower bound of the sweep on `gpus` GPUs (whole gangs).

    Default cluster: enough GPUs for every task that can start at once (each trunk and unforked
    trial), where the critical path is the bound. `node` (GPUs, CPUs of one node): the cluster is
    gpus/GPUs such nodes and the trials at once are `run`'s count (`orchestrator.sweep.fit`: CPUs too,
    the trial's own bundle included); without it, GPUs alone bound them.
    """
    rows, trunks = plan_rows(exp), trunk_rows(exp)
    g = exp.spec.resources.gpus_per_trial or 1.0  # a CPU trial counts as one device
    if gpus is None:
        gpus = int(g * (len(trunks) + sum(1 for r in rows if r.fork is None)))
    if node is not None:
        slots = trials_at_once(exp.spec.resources, nodes_of_shape(gpus, *node))
    else:
        slots = int(gpus // g + 1e-9)
    wall = {id(r): r.trains_hours / g for r in rows + trunks}  # hours on its own gang
    tail: dict[str, float] = {}
    for r in rows:
        if r.fork is not None:
            trunk_id = exp.forks.branches[r.trial.trial_id][0]
            tail[trunk_id] = max(tail.get(trunk_id, 0.0), wall[id(r)])
    chains = [wall[id(t)] + tail.get(t.trial.trial_id, 0.0) for t in trunks]
    chains += [wall[id(r)] for r in rows if r.fork is None]
    critical = max(chains, default=0.0)
    gpu_h = sum(r.trains_hours for r in rows + trunks)
    bound = max(critical, gpu_h / (slots * g)) if slots else float("inf")
    return Makespan(gpus, slots, critical, gpu_h, bound)


def render_makespan(exp: Expansion, gpus: int | None = None, node: tuple[int, float] | None = None) -> str:
    m = makespan_bound(exp, gpus, node)
    g = exp.spec.resources.gpus_per_trial
    if not g:
        return (f"trials use no GPU: the cluster's CPUs bound them ({exp.spec.resources.cpus_per_trial:g} each); "
                f"makespan >= critical path {_hours(m.critical_h)} device-h")
    shape = f" ({m.gpus // node[0]} nodes of {node[0]} GPUs, {node[1]:g} CPUs)" if node else ""
    if m.slots < 1:
        raise SpecError(f"--gpus {m.gpus}: a cluster of {m.gpus} GPUs{shape} cannot hold one trial ({g:g} GPUs "
                        f"per trial, whole gangs)")
    return (f"cluster of {m.gpus} GPUs{shape}: at most {m.slots} trial(s) at a time ({g:g} GPUs each, whole gangs); "
            f"makespan >= {_hours(m.bound_h)} h = max(critical path {_hours(m.critical_h)} h, "
            f"{_hours(m.gpu_h)} GPU-h / {m.slots * (g or 1):g} GPUs)")


def render_plan(exp: Expansion, gpus: int | None = None, node: tuple[int, float] | None = None) -> str:
    spec = exp.spec
    rows, trunks = plan_rows(exp), trunk_rows(exp)
    forked = bool(trunks)
    width = max(len(r.trial.name) for r in rows + trunks)
    fork_head = f"  {'fork':<6}  {'trains':>8}" if forked else ""
    head = (f"{'#':>4}  {'trial':<{width}}  {'id':<10}  {'iters':>8}  {'LR drops':<15}{fork_head}  {'images':>7}  "
            f"{'epochs':>6}  {'pixels':>7}  {'GPU-h':>8}")
    out = [f"sweep {spec.name}  (spec hash {exp.spec_hash}; {len(rows)} trials"
           + (f", {len(trunks)} trunks" if forked else "") + "; "
           f"{spec.resources.gpus_per_trial:g} GPU(s) x {spec.resources.workers} worker(s) per trial)", head,
           "-" * len(head)]
    for i, r in enumerate(rows):
        out.append(_line(str(i), r, width, forked))
    for i, r in enumerate(trunks):
        out.append(_line(f"T{i}", r, width, forked))
    out.append("-" * len(head))
    out.extend(_totals(spec, exp, rows, trunks))
    out.append(render_makespan(exp, gpus, node))
    out.append(storage_needs(spec)["text"])
    return "\n".join(out)


def storage_needs(spec: SweepSpec) -> dict[str, Any]:
    """What the sweep's storage choice asks of the cluster (`plan` prints it; README: "Storage")."""
    from orchestrator.state.folder import scratch_dir_for, sweep_dir_for

    folder = sweep_dir_for(spec.storage_path, spec.name, spec.local_cache)
    inputs = "the dataset and weights files on every node's disk at the same paths"
    if spec.store_uri is None:
        return {"kind": "shared", "sweep_dir": str(folder),
                "text": f"storage: shared folder {folder}: every node (the head too) must see it, and {inputs}"}
    scratch = scratch_dir_for(spec.store_uri, spec.local_cache)
    return {"kind": "object_store", "uri": spec.store_uri, "mirror": str(folder), "scratch": str(scratch),
            "text": f"storage: object store {spec.store_uri} (Tune's experiment, checkpoints, metric chunks, "
                    f"records); every node reads its credentials from its own environment (AWS_* or "
                    f"GOOGLE_APPLICATION_CREDENTIALS; never written anywhere) and trains in {scratch} (its own "
                    f"disk: room for a trial's checkpoints); the driver mirrors the sweep in {folder}; {inputs}"}


def _line(number: str, r: PlanRow, width: int, forked: bool) -> str:
    drops = ",".join(_si(d) for d in r.drops) or "-"
    epochs = f"{r.epochs:.1f}" if r.epochs is not None else "-"
    fork = ""
    if forked:
        where = f"@{_si(r.fork)}" if r.fork is not None else ("trunk" if isinstance(r.trial, Trunk) else "-")
        fork = f"  {where:<6}  {r.trains:>8}"
    return (f"{number:>4}  {r.trial.name:<{width}}  {r.trial.trial_id:<10}  {r.iters:>8}  {drops:<15}{fork}  "
            f"{_si(r.images):>7}  {epochs:>6}  {_si(r.pixels):>7}  {_hours(r.gpu_hours):>8}")


def forked_totals(rows: list[PlanRow], trunks: list[PlanRow]) -> tuple[int, int]:
    """(iterations without forking, iterations with it): what `run` trains in all."""
    return sum(r.iters for r in rows), sum(r.trains for r in rows + trunks)


def _totals(spec: SweepSpec, exp: Expansion, rows: list[PlanRow], trunks: list[PlanRow]) -> list[str]:
    iters = sum(r.iters for r in rows)
    images = sum(r.images for r in rows)
    pixels = sum(r.pixels for r in rows)
    gpu_h = sum(r.gpu_hours for r in rows)
    ips: Any = spec.estimate.images_per_s_per_gpu
    ips_text = (", ".join(f"{k} {v:g}" for k, v in ips.items()) if isinstance(ips, dict) else f"{ips:g}")
    g = spec.resources.gpus_per_trial
    longest = max(rows, key=lambda r: r.gpu_hours)
    lines = [f"total: {len(rows)} trials, {iters:,} iterations, {images:,} images ({_si(images)}), "
             f"{_si(pixels)} pixels seen"]
    reps = sorted({t.axes["replicate"] for t in exp.trials if "replicate" in t.axes})
    if reps:  # the seeds say which draw this is: `--set seed=N` moves every one of them
        seeds = sorted({t.config.runtime.seed for t in exp.trials})
        lines.append(f"replicates: {len(reps)} ({', '.join(f'r{r}' for r in reps)}), runtime.seed "
                     f"{', '.join(map(str, seeds))} (base seed {spec.seed}); one pretrain job serves them all")
    hours = f"{_hours(gpu_h)} GPU-hours"
    if trunks:
        lines.append(_forking_line(rows, trunks))
        hours = f"{_hours(sum(r.trains_hours for r in rows + trunks))} GPU-hours with forking ({hours} without)"
    lines.append(f"estimate: {hours} at {ips_text} images/s per GPU ({h_w(spec)} images); longest trial "
                 f"{longest.trial.name}: "
                 + (f"{_hours(longest.gpu_hours / g)} h on its {g:g} GPUs" if g
                    else f"{_hours(longest.gpu_hours)} device-hours"))
    for job in exp.pretrain:
        cfg = job.config
        lines.append(f"pretrain job {job.name}: {job.backbone}, {cfg.get('iters', '?')} iterations x batch "
                     f"{cfg.get('batch_size', '?')}, runs before the {sum(job.name in r.trial.needs for r in rows)} "
                     "trials that use it")
    return lines


def _forking_line(rows: list[PlanRow], trunks: list[PlanRow]) -> str:
    naive, forked = forked_totals(rows, trunks)
    branches = [r for r in rows if r.fork is not None]
    plain = [r for r in rows if r.fork is None]
    parts = [f"{len(trunks)} trunks ({sum(r.trains for r in trunks):,} iterations)",
             f"{len(branches)} branches ({sum(r.trains for r in branches):,})"]
    if plain:
        parts.append(f"{len(plain)} unforked trials ({sum(r.trains for r in plain):,})")
    return (f"forking: {' + '.join(parts)} = {forked:,} iterations: {forked / naive:.2f}x of the {naive:,} "
            f"unforked ({naive - forked:,} saved)")


def h_w(spec: SweepSpec) -> str:
    h, w = spec.estimate.image_size
    return f"{h}x{w}"


# ----------------------------------------------------------------------------------------------
# `plan --json` and `plan --show TRIAL`


def plan_json(exp: Expansion, gpus: int | None = None, node: tuple[int, float] | None = None) -> dict[str, Any]:
    """What `plan` prints, as data: one dict per trial and trunk, the totals and the makespan bound."""
    rows, trunks = plan_rows(exp), trunk_rows(exp)
    m = makespan_bound(exp, gpus, node)
    naive, forked = forked_totals(rows, trunks)

    def row(r: PlanRow) -> dict[str, Any]:
        out = {"name": r.trial.name, "id": r.trial.trial_id, "iters": r.iters, "drops": list(r.drops),
               "images": r.images, "epochs": r.epochs, "pixels": r.pixels, "gpu_hours": r.gpu_hours,
               "fork": r.fork, "trains": r.trains, "trains_gpu_hours": r.trains_hours}
        if isinstance(r.trial, Trial):
            out["axes"] = {a: str(v) for a, v in r.trial.axes.items()}
        return out

    spec = exp.spec
    return {"name": spec.name, "spec_hash": exp.spec_hash, "gpus_per_trial": spec.resources.gpus_per_trial,
            "workers_per_trial": spec.resources.workers, "trials": [row(r) for r in rows],
            "trunks": [row(r) for r in trunks], "pretrain": [{"name": j.name, "id": j.job_id} for j in exp.pretrain],
            "totals": {"iterations": naive, "iterations_with_forking": forked,
                       "gpu_hours": sum(r.gpu_hours for r in rows),
                       "gpu_hours_with_forking": sum(r.trains_hours for r in rows + trunks)},
            "makespan": {"gpus": m.gpus, "trials_at_once": m.slots, "critical_path_h": m.critical_h,
                         "gpu_hours": m.gpu_h, "bound_h": m.bound_h},
            "storage": {k: v for k, v in storage_needs(spec).items() if k != "text"}}


def show_task(exp: Expansion, which: str) -> str:
    """The resolved trainer config (YAML) a trial or trunk runs, as `run` would launch it here; `which`
    is its name, id, or row number in the plan (`3`, `T0`)."""
    import yaml

    from orchestrator.sweep.expand import backbone_file, bind_config
    from orchestrator.state.folder import sweep_dir_for
    from trainer.config import config_to_dict

    tasks: list[Trial | Trunk] = [*exp.trials, *exp.forks.trunks]
    numbers = {str(i): t for i, t in enumerate(exp.trials)} | {f"T{i}": k for i, k in enumerate(exp.forks.trunks)}
    found = numbers.get(which) or next((t for t in tasks if which in (t.name, t.trial_id)), None)
    if found is None:
        names = ", ".join(t.name for t in tasks[:6]) + (", ..." if len(tasks) > 6 else "")
        raise SpecError(f"--show {which}: no such trial (give a name, an id or a row number of the plan: {names})")
    sweep_dir = sweep_dir_for(exp.spec.storage_path, exp.spec.name, exp.spec.local_cache)
    cfg = bind_config(found, sweep_dir, {j.name: backbone_file(sweep_dir, j.name) for j in exp.pretrain})
    head = f"# {found.name} ({found.trial_id}) of sweep {exp.spec.name}, spec hash {exp.spec_hash}\n"
    return head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip("\n")
