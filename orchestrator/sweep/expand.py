"""Grid expansion: a spec becomes its pretrain jobs and its trials, each trial a valid trainer config.

Pure (no Ray, MLflow or torch). The order is deterministic: the product of the axes with the named
axes first (init, data, schedule, backbone) and the other axes as written, values in spec order.
A trial's config is built as base -> axis values -> matching overrides, then validated with
`trainer.config.build_config` on the driver; machine-specific paths (the pretrained backbone file,
the output folder) are placeholders until `bind_config` fills them in at launch. The trial id is a
hash of the validated config without defaults or paths, so it is stable across machines and across
trainer versions that only add fields. With `fork_schedules`, `orchestrator.sweep.fork` adds the trunks the
schedules of a cell share; their ids join the spec hash, so toggling forking is a different sweep.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import SpecError
from orchestrator.sweep.fork import ForkPlan, Trunk, plan_forks, trunk_identity
from orchestrator.sweep.spec import AXES, SEED_STRIDE, Resources, SweepSpec, matches, normalize_axis_value, task_name
from trainer.config import ModelConfig, TrainConfig, build_config, config_identity, config_to_dict, flatten
from trainer.config import digest as _digest
from trainer.errors import ConfigError
from trainer.engine.schedule import resolve_schedule

PRETRAINED_PREFIX = "pretrained:"
_PLACEHOLDER_INIT = "checkpoint:@pretrained/"  # replaced by the job's backbone file in bind_config


@dataclass(frozen=True)
class PretrainTask:
    name: str
    job_id: str
    config: dict[str, Any]  # trainer.pretrain config as given (+ data_root), without output_dir
    resources: Resources
    backbone: str


@dataclass(frozen=True)
class Trial:
    index: int
    trial_id: str
    name: str
    axes: dict[str, Any]  # axis -> canonical value (as matched by exclude/overrides)
    labels: dict[str, str]  # init/data/schedule/backbone (+ extra axes) -> label in the name
    config: TrainConfig  # validated; placeholders for machine paths
    init: str  # as the spec says it: random | imagenet | pretrained:NAME | checkpoint:PATH
    needs: tuple[str, ...] = ()  # pretrain jobs that must finish first


@dataclass(frozen=True)
class Expansion:
    spec: SweepSpec
    pretrain: list[PretrainTask]
    trials: list[Trial]
    spec_hash: str
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial/trunk name -> identity
    forks: ForkPlan = field(default_factory=ForkPlan)  # trunks and branches (none without forking)


def expand(spec: SweepSpec) -> Expansion:
    """All trials of the spec, in order, validated; raises SpecError/ConfigError naming the trial."""
    jobs = [_pretrain_task(spec, name) for name in spec.pretrain]
    job_ids = {j.name: j.job_id for j in jobs}
    job_backbones = {j.name: j.backbone for j in jobs}
    axes = spec.axis_names
    values = [[normalize_axis_value(spec, a, v, f"grid.{a}") for v in spec.grid[a]] for a in axes]
    trials: list[Trial] = []
    seen: dict[str, str] = {}
    identities: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*values):
        point = dict(zip(axes, combo))
        if any(matches(spec, rule, point) for rule in spec.exclude):
            continue
        trial, identity = _make_trial(spec, point, len(trials), job_ids)
        for job in trial.needs:
            if job_backbones[job] != trial.config.model.backbone:
                raise SpecError(f"trial {trial.name}: init pretrained:{job} is a {job_backbones[job]} backbone but "
                                f"the trial trains {trial.config.model.backbone}; exclude that combination, e.g. "
                                f"exclude: [{{init: 'pretrained:{job}', backbone: {trial.config.model.backbone}}}]")
        if trial.trial_id in seen:
            raise SpecError(f"duplicate trial: {seen[trial.trial_id]!r} and {trial.name!r} resolve to the same "
                            "config (check the grid values and overrides)")
        seen[trial.trial_id] = trial.name
        trials.append(trial)
        identities[trial.trial_id] = identity
    if not trials:
        raise SpecError("exclude: every grid point is excluded; nothing to run")
    trials = _unique_names(trials)
    used = {n for t in trials for n in t.needs}
    jobs = [j for j in jobs if j.name in used]  # a job no trial uses would only burn time
    forks = ForkPlan()
    if spec.forking:
        forks = plan_forks(trials, identities, job_ids, {t.name for t in trials})
    hashed: dict[str, Any] = {"name": spec.name, "pretrain": {j.name: j.job_id for j in jobs},
                              "trials": sorted(t.trial_id for t in trials)}
    if forks.trunks:  # absent otherwise: a sweep with nothing to fork keeps its hash
        hashed["trunks"] = sorted(k.trunk_id for k in forks.trunks)
    if spec.dataset.generate is not None:  # the trials read the data by path only: its making is identity too
        hashed["generate"] = spec.dataset.generate.model_dump(mode="json")
    named = {t.name: identities[t.trial_id] for t in trials}
    named.update({k.name: trunk_identity(k) for k in forks.trunks})
    return Expansion(spec, jobs, trials, _digest(hashed)[:12], named, forks)


def _make_trial(spec: SweepSpec, point: dict[str, Any], index: int,
                job_ids: dict[str, str]) -> tuple[Trial, dict[str, Any]]:
    tree = copy.deepcopy(spec.base)
    data = tree.setdefault("data", {})
    data.update({"root": str(spec.dataset.root), "train_split": spec.dataset.train_split,
                 "val_split": spec.dataset.val_split})
    for key in ("train_json", "train_image_dir", "val_json", "val_image_dir"):
        if getattr(spec.dataset, key) is not None:  # absent otherwise: COCO-layout trials keep their hash
            data[key] = str(getattr(spec.dataset, key))
    if spec.dataset.format != "coco":  # absent for COCO: those trials keep their hash
        data["format"] = spec.dataset.format
    for axis, value in point.items():
        key = AXES.get(axis, axis)
        if axis == "replicate":
            continue  # set after the overrides: an override's runtime.seed is the base it shifts
        if axis == "init" and value.startswith(PRETRAINED_PREFIX):
            value = _PLACEHOLDER_INIT + value.removeprefix(PRETRAINED_PREFIX)
        set_key(tree, key, value)
    for ov in spec.overrides:
        if matches(spec, ov.when, point):
            for key, value in flat_items(ov.set):
                set_key(tree, key, value)
    seed = replicate_seed(tree.get("runtime", {}).get("seed", 0), spec.seed, point.get("replicate", 0))
    if seed or "seed" in tree.get("runtime", {}):  # absent at seed 0: sweeps without replicates keep their hash
        set_key(tree, "runtime.seed", seed)
    init_value = point.get("init", tree.get("model", {}).get("init", "random"))
    labels = _labels(spec, point, init_value)
    body_norm = _body_norm_label(tree)
    if body_norm:  # e.g. imagenet-frozenbn-all-2x-R50: a body norm other than `norm` is part of the name
        labels["init"] = f"{labels['init']}-{body_norm}"
    name = task_name(labels, point)
    set_key(tree, "runtime.output_dir", f"trials/{name}")
    try:
        cfg = build_config(tree, source=f"trial {name}")
        resolve_schedule(cfg.schedule)  # a length shorter than its LR drops fails here, not on a worker
    except ConfigError as err:
        msg = str(err)
        raise SpecError(msg if msg.startswith("trial ") else f"trial {name}: {msg}") from None
    needs = (init_value.removeprefix(PRETRAINED_PREFIX),) if init_value.startswith(PRETRAINED_PREFIX) else ()
    identity = config_identity(cfg)
    trial_id = _digest({"config": identity, "pretrain": {n: job_ids[n] for n in needs}})[:10]
    return Trial(index, trial_id, name, dict(point), labels, cfg, init_value, needs), identity


def _labels(spec: SweepSpec, point: dict[str, Any], init_value: str) -> dict[str, str]:
    base_model = spec.base.get("model", {})
    base_sched = spec.base.get("schedule", "1x")
    out = {
        "init": _init_label(init_value),
        "schedule": _schedule_label(point.get("schedule", base_sched)),
        "backbone": str(point.get("backbone", base_model.get("backbone", "R50"))),
    }
    data = point.get("data", spec.base.get("data", {}).get("train_images", "all"))
    out["data"] = _count_label(data)
    if "replicate" in point:
        out["replicate"] = f"r{point['replicate']}"
    for axis, value in point.items():
        if axis not in AXES:
            out[axis] = _safe(f"{axis.rsplit('.', 1)[-1]}{_scalar_label(value)}")
    return out


def replicate_seed(base: int, spec_seed: int, replicate: int) -> int:
    """A trial's runtime.seed: the base config's, shifted by the spec's base seed and the replicate.
    It seeds the weights the init leaves random and the batch order; the subset has its own seed
    (data.subset_seed), so replicates of a cell train on the same images."""
    return int(base) + SEED_STRIDE * int(spec_seed) + int(replicate)


def _body_norm_label(tree: dict[str, Any]) -> str:
    """'frozenbn' when the trial's model.body_norm is set and differs from model.norm, else ''."""
    model = tree.get("model") or {}
    body, norm = model.get("body_norm"), model.get("norm", ModelConfig.model_fields["norm"].default)
    return _safe(str(body).lower()) if body and body != norm else ""


def _init_label(value: str) -> str:
    if value.startswith(PRETRAINED_PREFIX):
        return _safe(value.removeprefix(PRETRAINED_PREFIX))
    if value.startswith("checkpoint:"):
        return _safe("ckpt-" + Path(value.removeprefix("checkpoint:")).stem)
    return _safe(value)


def _schedule_label(value: Any) -> str:
    if isinstance(value, dict):
        if "iters" in value:
            return f"{value['iters']}it"
        return _safe(str(value.get("length", "1x")))  # neither: the trainer's default length
    return _safe(str(value))


def _count_label(value: Any) -> str:
    """118287 -> 118.3k, 35000 -> 35k, 3500 -> 3.5k, 1000 -> 1k, 150 -> 150."""
    if not isinstance(value, int):
        return str(value)
    if value < 1000:
        return str(value)
    return f"{value / 1000:.1f}".rstrip("0").rstrip(".") + "k"


def _scalar_label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(_scalar_label(v) for v in value)
    if isinstance(value, dict):
        return _digest(value)[:6]
    return str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _unique_names(trials: list[Trial]) -> list[Trial]:
    """Different configs that print alike (e.g. two explicit schedules) get their id appended."""
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.name] = counts.get(t.name, 0) + 1
    out = []
    for t in trials:
        if counts[t.name] > 1:
            name = f"{t.name}-{t.trial_id[:6]}"
            cfg = t.config.model_copy(update={"runtime": t.config.runtime.model_copy(
                update={"output_dir": Path(f"trials/{name}")})})
            t = Trial(t.index, t.trial_id, name, t.axes, t.labels, cfg, t.init, t.needs)
        out.append(t)
    return out


def _pretrain_task(spec: SweepSpec, name: str) -> PretrainTask:
    job = spec.pretrain[name]
    where = f"pretrain.{name}.config"
    cfg = copy.deepcopy(job.config)
    if "output_dir" in cfg:
        raise SpecError(f"{where}.output_dir: set by the orchestrator (SWEEP/pretrain/{name})")
    cfg.setdefault("data_root", str(Path(spec.dataset.root) / "classification"))
    validated = validate_pretrain(cfg, where)
    job_id = _digest({"name": name, "config": cfg})[:10]
    return PretrainTask(name, job_id, cfg, job.resources or spec.resources, str(validated.backbone))


def validate_pretrain(cfg: dict[str, Any], where: str) -> Any:
    """A pretrain job's config as a trainer.config.PretrainConfig, or a SpecError naming the key."""
    from pydantic import ValidationError

    # Imported here: trainer.pretrain pulls in torch, which only sweeps with pretrain jobs pay for.
    from trainer.config import format_validation_error
    from trainer.config import PretrainConfig

    try:
        return PretrainConfig.model_validate(cfg)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, PretrainConfig, prefix=where + ".")) from None


def bind_pretrain(task: PretrainTask, sweep_dir: Path) -> dict[str, Any]:
    """The job's launch config (absolute data root and output folder) as a plain dict."""
    cfg = copy.deepcopy(task.config)
    cfg["data_root"] = str(Path(cfg["data_root"]).resolve())
    cfg["output_dir"] = str(pretrain_dir(sweep_dir, task.name).resolve())
    return cfg


def pretrain_dir(sweep_dir: Path, name: str) -> Path:
    return Path(sweep_dir) / "pretrain" / name


def backbone_file(sweep_dir: Path, name: str) -> Path:
    """Where trainer.pretrain writes a job's backbone (OUTPUT/backbone.pt)."""
    return pretrain_dir(sweep_dir, name) / "backbone.pt"


# ----------------------------------------------------------------------------------------------
# Binding to a machine


def bind_config(trial: Trial | Trunk, sweep_dir: Path, backbone_files: dict[str, Path]) -> TrainConfig:
    """The trial's launch config: absolute data root and output folder, pretrained init resolved.

    Re-validated through build_config, so what is launched is exactly a valid trainer config.
    """
    tree = config_to_dict(trial.config)
    init = tree["model"]["init"]
    if init.startswith(_PLACEHOLDER_INIT):
        job = init.removeprefix(_PLACEHOLDER_INIT)
        tree["model"]["init"] = f"checkpoint:{Path(backbone_files[job]).resolve()}"
    tree["data"]["root"] = str(Path(tree["data"]["root"]).resolve())
    if tree["model"].get("imagenet_weights"):  # relative to where the sweep is started, like the data root
        tree["model"]["imagenet_weights"] = str(Path(tree["model"]["imagenet_weights"]).expanduser().resolve())
    tree["runtime"]["output_dir"] = str((Path(sweep_dir) / tree["runtime"]["output_dir"]).resolve())
    return build_config(tree, source=f"trial {trial.name}")


def missing_weight_files(trials: list[Trial]) -> list[str]:
    """One line per absent `model.imagenet_weights` file, with where to get it: `run` refuses on them
    (with the dataset, all at once) before anything is launched; `plan` does not, so a grid can be
    costed without the files."""
    from trainer.config import gn_download_hint

    users: dict[Path, list[Trial]] = {}
    for trial in trials:
        m = trial.config.model
        if m.init == "imagenet" and m.imagenet_weights is not None:
            users.setdefault(Path(m.imagenet_weights).expanduser(), []).append(trial)
    lines = []
    for path, group in users.items():
        if path.is_file():
            continue
        m = group[0].config.model
        where = (gn_download_hint(m.backbone) if m.body_norm == "GN"
                 else f"torchvision's IMAGENET1K_V1 {m.backbone} file from download.pytorch.org/models")
        more = f" (and {len(group) - 1} more trials)" if len(group) > 1 else ""
        lines.append(f"trial {group[0].name}{more}: model.imagenet_weights file not found: {path} (from "
                     f"{Path.cwd()}); get {where}")
    return lines


# ----------------------------------------------------------------------------------------------
# Small dict helpers


def set_key(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict. A schedule given as a string becomes {length: ...}, and setting
    a length drops explicit iters/drops (and the reverse), so the two forms never mix."""
    if dotted == "schedule":
        sched = tree.get("schedule")
        sched = {"length": sched} if isinstance(sched, str) else dict(sched or {})
        for k in ("length", "iters", "drops"):
            sched.pop(k, None)
        sched.update({"length": value} if isinstance(value, str) else copy.deepcopy(value))
        tree["schedule"] = sched
        return
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "schedule":
            child = {"length": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    if parts[0] == "schedule" and len(parts) == 2:
        if parts[1] == "length":
            node.pop("iters", None), node.pop("drops", None)
        elif parts[1] in ("iters", "drops"):
            node.pop("length", None)
    node[parts[-1]] = copy.deepcopy(value)


def flat_items(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """Leaf (dotted key, value) pairs of a nested dict; lists and empty dicts are leaves."""
    return list(flatten(data, empty_leaves=True).items())
