"""The sweep spec: a YAML file validated by one strict pydantic model per level.

Owns the schema (what a sweep may say), `${ENV}` interpolation (a bare `$ENV` is warned about, not
expanded), and the checks that need more than
types: axis values, exclusion rules, overrides and dotted trainer keys. Everything here is pure: no
Ray, no MLflow, no torch. A spec looks like

    name: demo
    seed: 0                  # base seed: every trial's runtime.seed += 1000 x seed (+ its replicate)
    dataset: {root: "${DATA:-datasets/synth}", train_split: train, val_split: val}
    pretrain: {synthetic-r18: {config: {...}}}      # jobs whose output is an init
    grid: {init: [random, "pretrained:synthetic-r18"], data: [all, 150], schedule: [1x, 2x],
           backbone: [R18, R34], replicate: [0, 1, 2],      # replicates: init seed + batch order
           optim.base_lr: [0.02]}   # any other trainer field by dotted key
    exclude: [{backbone: R34, schedule: 2x}]        # irregular grids
    overrides: [{when: {data: [150]}, set: {optim.base_lr: 0.04}}]
    base: {...}                                     # the trainer's base config (nested)
    resources: {gpus_per_trial: 1, cpus_per_trial: 4}
    ray_address: null        # else RAY_ADDRESS, else a local cluster
    tracking_uri: null       # default: sqlite:///mlflow.db in the working directory
    tracking: {metric_period: 100}  # losses, LR, seen/* to MLflow every N iterations (evaluations: all)
    storage_path: runs       # a shared folder every node mounts, or s3://bucket/prefix (gs:// too)
    local_cache: /tmp/orchestrator  # object storage: the driver's mirror and each node's scratch
    retry: {max_failures: 2}
    fork_schedules: null     # default: on when the grid has a schedule axis (see orchestrator/sweep/fork.py)
    keep_checkpoints: final  # what a finished trial keeps: all | final | weights | none (orchestrator/worker/retention.py)
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import SpecError
from orchestrator.worker.object_store import is_store_uri, split_uri
from orchestrator.worker.retention import KeepCheckpoints
from trainer.config import ModelConfig, TrainConfig, check_layout_pairs, flatten, format_validation_error

logger = logging.getLogger(__name__)

# Named axes and the trainer key each one sets. Other axes are dotted trainer keys themselves.
AXES: dict[str, str] = {
    "init": "model.init",
    "data": "data.train_images",
    "schedule": "schedule",
    "backbone": "model.backbone",
    "replicate": "runtime.seed",  # the init seed and the batch order, never the data subset (expand.replicate_seed)
}
BACKBONES: tuple[str, ...] = get_args(ModelConfig.model_fields["backbone"].annotation)
# The dataset section owns these; a base config that sets them would be silently overridden.
DATASET_KEYS = ("data.root", "data.train_split", "data.val_split", "data.train_json", "data.train_image_dir",
                "data.val_json", "data.val_image_dir", "data.format")
# Dotted keys a grid may not use as axes of their own, with the named axis that owns them.
NAMED_KEYS = {"model.init": "init", "data.train_images": "data", "model.backbone": "backbone",
               "schedule.length": "schedule", "schedule.iters": "schedule", "schedule.drops": "schedule",
               "runtime.seed": "replicate"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_BARE_ENV = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")  # $VAR: not interpolated, warned
_COUNT = re.compile(r"^(\d+(?:\.\d+)?)k$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
SEED_STRIDE = 1000  # runtime.seed = base runtime.seed + SEED_STRIDE x spec seed + replicate
NAME_AXES = ("init", "data", "schedule", "backbone")  # the first parts of a trial's name, in this order


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Generate(_Strict):
    """How to make a missing dataset: the trainer's seeded synthetic shape sets."""

    kind: Literal["synthetic"] = "synthetic"
    train: int = Field(600, gt=0)
    val: int = Field(100, gt=0)
    size: int = Field(64, gt=0)
    seed: int = Field(0, ge=0)
    classification: bool = False  # also the ImageFolder crops that pretrain jobs read
    keypoints: bool = False  # person keypoints (trainer.synthetic --keypoints) instead of the shape set
    cls_train: int = Field(300, gt=0)
    cls_val: int = Field(60, gt=0)
    cls_size: int = Field(32, gt=0)
    cls_classes: int = Field(16, ge=2, le=16)  # the classification set's classes (trainer.synthetic)
    # False: the classification classes are shapes the detection set lacks (then at most 12), as a
    # pre-training set whose categories are not the target task's.
    cls_detection_shapes: bool = True

    @model_validator(mode="after")
    def _classes_exist(self) -> Generate:
        if self.cls_detection_shapes:
            return self
        from trainer.synthetic.draw import CLS_SHAPES, SHAPES  # the generator's own count, not a copy

        most = len(CLS_SHAPES) - len(SHAPES)
        if self.cls_classes > most:
            raise ValueError(f"cls_classes is {self.cls_classes}, but without the detection shapes "
                             f"(cls_detection_shapes: false) the generator has {most} classification shapes")
        return self


class Dataset(_Strict):
    """A COCO-layout dataset: ROOT/annotations/instances_{split}.json and ROOT/{split}/, or per split
    any annotation file and image folder (`train_json` + `train_image_dir`, `val_json` + `val_image_dir`).
    `format: voc`: ROOT is a VOC20xx folder (Annotations/, ImageSets/Main/{split}.txt, JPEGImages/)
    for the box task, with splits named as VOC's lists (trainval, test)."""

    root: Path
    format: Literal["coco", "voc"] = "coco"
    train_split: str = "train2017"
    val_split: str = "val2017"
    train_json: Path | None = None
    train_image_dir: Path | None = None
    val_json: Path | None = None
    val_image_dir: Path | None = None
    generate: Generate | None = None

    @model_validator(mode="after")
    def _layout_pairs(self) -> "Dataset":
        check_layout_pairs(self)
        return self

    def split_files(self, split: str) -> tuple[Path, Path]:
        """(annotation file, image folder) of "train" or "val" (VOC: the split's id list and JPEGImages/)."""
        if self.format == "voc":
            return (Path(self.root) / "ImageSets" / "Main" / f"{getattr(self, f'{split}_split')}.txt",
                    Path(self.root) / "JPEGImages")
        if getattr(self, f"{split}_json") is not None:
            return Path(getattr(self, f"{split}_json")), Path(getattr(self, f"{split}_image_dir"))
        name = getattr(self, f"{split}_split")
        return Path(self.root) / "annotations" / f"instances_{name}.json", Path(self.root) / name


class Resources(_Strict):
    """What one trial asks of the cluster. Several GPUs means DDP over that many workers."""

    gpus_per_trial: float = Field(0.0, ge=0)
    cpus_per_trial: float = Field(1.0, gt=0)
    workers_per_trial: int | None = Field(None, ge=1)  # default: one per GPU, else 1
    # A DDP trial's workers all on one node (Ray STRICT_PACK) instead of packed but free to spread.
    one_node: bool = False

    @model_validator(mode="after")
    def _shape(self) -> "Resources":
        g = self.gpus_per_trial
        if g > 1 and g != int(g):
            raise ValueError(f"gpus_per_trial {g}: use a fraction below 1 or a whole number")
        if self.workers_per_trial and g >= 1 and g % self.workers_per_trial:
            raise ValueError(f"gpus_per_trial {g} does not split over {self.workers_per_trial} workers")
        if self.workers_per_trial and self.workers_per_trial > 1 and 0 < g < 1:
            raise ValueError("a fractional GPU cannot be shared by several workers")
        return self

    @property
    def workers(self) -> int:
        return self.workers_per_trial or (int(self.gpus_per_trial) if self.gpus_per_trial >= 1 else 1)

    @property
    def gpus_per_worker(self) -> float:
        return self.gpus_per_trial / self.workers

    @property
    def cpus_per_worker(self) -> float:
        return self.cpus_per_trial / self.workers


class Retry(_Strict):
    max_failures: int = Field(2, ge=0)  # retries of a failed trial, each from its last checkpoint


class Estimate(_Strict):
    """The throughput `plan` turns into GPU-hours, and the image size it counts pixels with."""

    images_per_s_per_gpu: float | dict[str, float] = 3.0  # one figure, or one per backbone
    image_size: tuple[int, int] = (480, 640)  # (height, width) of a typical COCO image


class PretrainJob(_Strict):
    """A backbone pretraining run whose output is the init `pretrained:NAME`."""

    config: dict[str, Any] = Field(default_factory=dict)  # trainer.pretrain config (nested)
    resources: Resources | None = None  # default: the trials' resources


class Tracking(_Strict):
    """How often the sweep's MLflow runs get the per-iteration metrics (metrics.jsonl keeps every row)."""

    # Losses, LR and seen/*: the first row past each multiple of this (and the final row). Evaluations: all.
    metric_period: int = Field(100, ge=1)


class Override(_Strict):
    """Extra trainer settings for the grid points matching `when` (e.g. small-data recipes)."""

    when: dict[str, Any]
    set: dict[str, Any]


class SweepSpec(_Strict):
    name: str = Field(pattern=_NAME, max_length=80)
    # The base seed: shifts every trial's runtime.seed (init and batch order, not the data subset) by
    # SEED_STRIDE x seed, so replicate r of base seed s is a run no other (s, r) repeats.
    seed: int = Field(0, ge=0)
    dataset: Dataset
    pretrain: dict[str, PretrainJob] = Field(default_factory=dict)
    grid: dict[str, list[Any]]
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)
    base: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Resources()
    ray_address: str | None = None
    tracking_uri: str | None = None
    tracking: Tracking = Tracking()
    # A folder every node mounts at the same path, or an object store (`orchestrator.worker.store_sync`).
    storage_path: Path | str = Path("runs")
    # Object storage only: the driver's local mirror (LOCAL_CACHE/mirror/...) and every node's scratch
    # folder its trials train in (LOCAL_CACHE/scratch/...), checkpoints included: node-local disk.
    local_cache: Path = Path("/tmp/orchestrator")
    retry: Retry = Retry()
    estimate: Estimate = Estimate()
    # One base-LR trunk per cell shared by its schedules, each branching off at its first LR drop.
    fork_schedules: bool | None = None
    # A storage policy, not part of any trial's identity: changing it never blocks a resume.
    keep_checkpoints: KeepCheckpoints = "final"

    @model_validator(mode="after")
    def _storage(self) -> "SweepSpec":
        path = self.storage_path
        if isinstance(path, str) and not is_store_uri(path):
            if "://" in path:
                raise ValueError(f"storage_path {path!r}: an object store is s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
            self.storage_path = Path(path)
        elif isinstance(path, str):
            if not split_uri(path)[1]:
                raise ValueError(f"storage_path {path!r}: name the bucket (s3://BUCKET[/PREFIX])")
            # The trial's process pulls and pushes the folder its ranks train in: they share its node's scratch.
            if self.resources.workers > 1 and not self.resources.one_node:
                raise ValueError(f"storage_path {path}: DDP trials ({self.resources.workers} workers) on an object "
                                 "store need resources.one_node: true (each gang on one node, sharing its scratch)")
        return self

    @property
    def store_uri(self) -> str | None:
        """The sweep's root in its object store (STORAGE/NAME), or None on a shared folder."""
        return f"{str(self.storage_path).rstrip('/')}/{self.name}" if is_store_uri(self.storage_path) else None

    @property
    def forking(self) -> bool:
        """Whether schedules share trunks: as set, else on for grids with a schedule axis."""
        return self.fork_schedules if self.fork_schedules is not None else "schedule" in self.grid

    @property
    def axis_names(self) -> list[str]:
        """Named axes first (fixed order, as in trial names), then the others as written."""
        named = [a for a in AXES if a in self.grid]
        return named + [a for a in self.grid if a not in AXES]


def task_name(labels: dict[str, str], axes: Any) -> str:
    """A trial's (or trunk's) name: the four named labels, the other axes as written, the replicate last
    (random-all-2x-R18-r1), so a cell's replicates sort together."""
    parts = [labels[k] for k in NAME_AXES] + [labels[a] for a in axes if a not in AXES]
    return "-".join(parts + ([labels["replicate"]] if "replicate" in axes else []))


# ----------------------------------------------------------------------------------------------
# Loading


def load_spec(path: str | Path, sets: Sequence[str] = ()) -> SweepSpec:
    """Read, interpolate and validate a spec file (plus `--set` overrides, `orchestrator.sweep.sets`);
    raise a one-line SpecError naming the field."""
    from orchestrator.sweep.sets import apply_sets
    from trainer.config import read_yaml
    from trainer.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path} is a directory, not a spec file (e.g. sweeps/demo.yaml)")
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = read_yaml(path)  # the trainer's safe YAML reading: the line of a syntax error or a repeated key
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    return parse_spec(apply_sets(data, sets), source=str(path))


def parse_spec(data: dict[str, Any], source: str = "spec") -> SweepSpec:
    data = interpolate(data, environ=dict(os.environ))
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {format_validation_error(err, SweepSpec)}") from None
    try:
        check_spec(spec)
    except SpecError as err:
        raise SpecError(f"{source}: {err}") from None
    return spec


def interpolate(node: Any, environ: dict[str, str], where: str = "") -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string; an unset VAR without default fails."""
    if isinstance(node, dict):
        return {k: interpolate(v, environ, f"{where}{k}.") for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, environ, f"{where}{i}.") for i, v in enumerate(node)]
    if isinstance(node, str) and (bare := _BARE_ENV.search(node)):
        # Warned, not expanded: only ${VAR} is interpolation, so a spec means one thing on every machine.
        logger.warning("%s: %r has $%s without braces: not expanded (write ${%s})", where.rstrip(".") or "spec",
                       node, bare.group(1), bare.group(1))
    if not isinstance(node, str) or "${" not in node:
        return node

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise SpecError(f"{where.rstrip('.')}: environment variable {name} is not set (write ${{{name}:-default}} "
                        "for a default)")

    return _ENV.sub(sub, node)


# ----------------------------------------------------------------------------------------------
# Checks beyond types


def check_spec(spec: SweepSpec) -> None:
    """Axis values, dotted keys, exclusions and overrides; raises SpecError naming the field."""
    if spec.dataset.generate is not None and (spec.dataset.train_split, spec.dataset.val_split) != ("train", "val"):
        raise SpecError("dataset.generate: the synthetic sets have splits 'train' and 'val'; set train_split: "
                        "train and val_split: val")
    if spec.dataset.generate is not None and (spec.dataset.train_json or spec.dataset.val_json):
        raise SpecError("dataset.generate writes the COCO layout under dataset.root; drop train_json/val_json")
    if spec.dataset.format == "voc" and (spec.dataset.generate is not None or spec.dataset.train_json
                                         or spec.dataset.val_json):
        raise SpecError("dataset.format voc reads a VOC20xx folder at dataset.root: drop generate/train_json/val_json")
    if not spec.grid:
        raise SpecError("grid: needs at least one axis (init, data, schedule, backbone or a trainer key)")
    try:
        TrainConfig.model_validate(_base_for_check(spec.base))
    except ValidationError as err:
        raise SpecError(format_validation_error(err, TrainConfig, prefix="base.")) from None
    flat_base = _dotted_keys(spec.base)
    for key in DATASET_KEYS:
        if key in flat_base:
            raise SpecError(f"base.{key}: set it in the dataset section instead")
    for name in spec.pretrain:
        if not re.match(_NAME, name):
            raise SpecError(f"pretrain.{name}: job names may use letters, digits, '.', '_' and '-'")
    for axis, values in spec.grid.items():
        check_axis(spec, axis, values)
    for i, rule in enumerate(spec.exclude):
        where = f"exclude[{i}]"
        if not rule:
            raise SpecError(f"{where}: an empty rule would exclude every trial")
        _check_match(spec, rule, where)
    for i, ov in enumerate(spec.overrides):
        where = f"overrides[{i}]"
        _check_match(spec, ov.when, f"{where}.when")
        for key in _dotted_keys(ov.set):
            if not trainer_key_exists(key):
                raise SpecError(f"{where}.set.{key}: not a trainer config key")


def _base_for_check(base: dict[str, Any]) -> dict[str, Any]:
    """The base as checked alone: overrides may still give `init: imagenet` its weights file per
    backbone, so that rule is left to each expanded trial (`plan` refuses there, naming the trial)."""
    model = base.get("model")
    if not isinstance(model, dict) or model.get("init") != "imagenet" or model.get("imagenet_weights"):
        return base
    return {**base, "model": {**model, "imagenet_weights": "<set per trial>"}}


def check_axis(spec: SweepSpec, axis: str, values: list[Any]) -> None:
    where = f"grid.{axis}"
    if axis not in AXES:
        if not trainer_key_exists(axis):
            raise SpecError(f"{where}: unknown axis (named axes: {', '.join(AXES)}; others must be "
                            "dotted trainer keys such as optim.base_lr)")
        if axis in NAMED_KEYS:
            raise SpecError(f"{where}: set by a named axis ({NAMED_KEYS[axis]}); use that axis instead")
        if axis in DATASET_KEYS:
            raise SpecError(f"{where}: set by the dataset section")
    if not values:
        raise SpecError(f"{where}: axis has no values")
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        canonical = normalize_axis_value(spec, axis, value, f"{where}[{i}]")
        key = repr(canonical)
        if key in seen:
            raise SpecError(f"{where}[{i}]: {value!r} repeats {where}[{seen[key]}] (every axis value once)")
        seen[key] = i
        gen = spec.dataset.generate
        if axis == "data" and gen is not None and isinstance(canonical, int) and canonical > gen.train:
            raise SpecError(f"{where}[{i}]: {canonical} training images, but the generated train split has "
                            f"{gen.train} (dataset.generate.train)")


def normalize_axis_value(spec: SweepSpec, axis: str, value: Any, where: str) -> Any:
    """The canonical form of one axis value (data '3.5k' -> 3500); raises SpecError if invalid."""
    if axis == "data":
        return parse_image_count(value, where)
    if axis == "backbone":
        if value not in BACKBONES:
            raise SpecError(f"{where}: unknown backbone {value!r} (allowed: {', '.join(BACKBONES)})")
        return value
    if axis == "init":
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected random, imagenet, pretrained:NAME or checkpoint:PATH")
        if value.startswith("pretrained:"):
            job = value.removeprefix("pretrained:")
            if job not in spec.pretrain:
                known = ", ".join(spec.pretrain) or "none defined"
                raise SpecError(f"{where}: no pretrain job named {job!r} (pretrain jobs: {known})")
            return value
        if value in ("random", "imagenet") or (value.startswith("checkpoint:") and len(value) > 11):
            return value
        raise SpecError(f"{where}: unknown init {value!r} (random, imagenet, pretrained:NAME, checkpoint:PATH)")
    if axis == "replicate":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_STRIDE:
            raise SpecError(f"{where}: a replicate is an index 0..{SEED_STRIDE - 1}, got {value!r}")
        return value
    if axis == "schedule":
        if isinstance(value, str) and re.match(r"^\s*\d+(\.\d+)?\s*x\s*$", value):
            return value.strip()
        if isinstance(value, dict) and set(value) <= {"iters", "drops"} and "iters" in value:
            return value
        raise SpecError(f"{where}: expected a length like 2x or {{iters: N, drops: [...]}}, got {value!r}")
    return value


def parse_image_count(value: Any, where: str) -> int | str:
    """'all' | positive int | '35k' / '3.5k' -> int."""
    if value == "all":
        return "all"
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (m := _COUNT.match(value.strip().lower())):
        count = round(float(m.group(1)) * 1000)
        if count > 0:
            return count
    raise SpecError(f"{where}: expected an image count (e.g. 10000 or 10k) or 'all', got {value!r}")


def _check_match(spec: SweepSpec, rule: dict[str, Any], where: str) -> None:
    for axis, wanted in rule.items():
        if axis not in spec.grid:
            raise SpecError(f"{where}.{axis}: not a grid axis (axes: {', '.join(spec.grid)})")
        axis_values = [normalize_axis_value(spec, axis, v, "") for v in spec.grid[axis]]
        for v in wanted if isinstance(wanted, list) else [wanted]:
            if normalize_axis_value(spec, axis, v, f"{where}.{axis}") not in axis_values:
                raise SpecError(f"{where}.{axis}: {v!r} is not a value of that axis")


def matches(spec: SweepSpec, rule: dict[str, Any], point: dict[str, Any]) -> bool:
    """Whether a grid point (axis -> canonical value) satisfies every key of a rule."""
    for axis, wanted in rule.items():
        options = [normalize_axis_value(spec, axis, v, "") for v in (wanted if isinstance(wanted, list) else [wanted])]
        if point[axis] not in options:
            return False
    return True


def trainer_key_exists(dotted: str) -> bool:
    """Whether `a.b.c` names a field (leaf or level) of the trainer's TrainConfig."""
    current: Any = TrainConfig
    for part in dotted.split("."):
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return False
        current = fields[part].annotation
    return True


def _dotted_keys(data: dict[str, Any]) -> list[str]:
    """Leaf keys of a nested dict; a dotted key written flat ('optim.base_lr': x) stays as is."""
    return list(flatten(data, empty_leaves=True))
