"""Trial configuration: one strict pydantic model per level, YAML loading and dotted overrides.

A trial is fully described by a `TrainConfig` (model, data, optim, schedule, eval, checkpoint,
runtime). Unknown keys are rejected with their dotted path and the keys that level allows, so a typo
never silently falls back to a default. `load_config` reads YAML and applies `--set a.b=c` overrides
before validation; `dump_config` writes the resolved config next to a run's outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.errors import ConfigError
from trainer.recipes import DETECTRON_GN, PRETRAIN_PRESETS, gn_download_hint  # noqa: F401 - re-exported


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Backbone = Literal["R18", "R34", "R50", "R101"]
Norm = Literal["GN", "SyncBN", "BN", "FrozenBN"]


class ModelConfig(_Strict):
    """Mask R-CNN with a ResNet-FPN backbone; sampling knobs default to torchvision's."""

    backbone: Backbone = "R50"
    norm: Norm = "GN"  # body (unless body_norm says otherwise), FPN and heads
    # The ResNet body's norm. Unset means `norm`; validation fills it in, so a resolved config always
    # says what the body runs. `FrozenBN` under a GN model = torchvision's BN ImageNet weights with a
    # frozen-BN body (detectron2's usual fine-tuning), which is never chosen silently.
    body_norm: Norm | None = None
    init: str = "random"  # random | imagenet | checkpoint:PATH
    # ImageNet weights file: Detectron pickle (R-50-GN.pkl) or torchvision/timm/trainer.pretrain state
    # dict, told apart by content; unset: torchvision's BN file in the torch hub cache (BN bodies only).
    imagenet_weights: Path | None = None
    # The input normalisation the body expects. auto: Detectron's (its PIXEL_MEANS, BGR 0-255, std 1)
    # for a Detectron pickle, torchvision's otherwise; the built model fills it in, so a run's
    # config.yaml always says which one it used. An explicit value must agree with the weights.
    pixel_convention: Literal["auto", "torchvision", "detectron"] = "auto"
    # sha256 of model.imagenet_weights: filled in at validation where the file exists (so the sweep's
    # MLflow params hold it) and when the model is built (config.yaml); a file with another digest
    # than the one set is refused. Not part of a trial's identity.
    imagenet_weights_sha256: str | None = None
    freeze_at: int = Field(0, ge=0, le=5)  # stages frozen from the stem: 0 = nothing (scratch)
    min_size: int = Field(800, gt=0)
    max_size: int = Field(1333, gt=0)
    rpn_batch_size_per_image: int = Field(256, gt=0)
    rpn_pre_nms_top_n_train: int = Field(2000, gt=0)
    rpn_post_nms_top_n_train: int = Field(2000, gt=0)
    rpn_pre_nms_top_n_test: int = Field(1000, gt=0)
    rpn_post_nms_top_n_test: int = Field(1000, gt=0)
    box_batch_size_per_image: int = Field(512, gt=0)
    box_detections_per_img: int = Field(100, gt=0)
    representation_size: int = Field(1024, gt=0)
    sampling_ratio: int = Field(2, ge=0)  # RoIAlign samples per bin; 0 = adaptive
    fpn_channels: int = Field(256, gt=0)
    # One anchor size per FPN level P2..P6 (3 aspect ratios each). The default suits COCO at 800 px;
    # small images need smaller anchors, or objects below the smallest size are barely matched.
    anchor_sizes: tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)
    task: Literal["mask", "box", "keypoints"] = "mask"  # Mask / Faster / Keypoint R-CNN (trainer.modeling.detectors)
    num_keypoints: int = Field(17, gt=0)  # keypoints task: must equal the dataset's (COCO: 17)
    keypoint_head_channels: int = Field(512, gt=0)  # Detectron's 8 x 3x3 conv keypoint head width
    keypoint_head_norm: Literal["none", "model"] = "none"  # none: as Detectron's keypoint configs

    @field_validator("anchor_sizes")
    @classmethod
    def _check_anchors(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(a <= 0 for a in v) or list(v) != sorted(set(v)):
            raise ValueError("must be 5 positive, strictly increasing sizes (P2..P6)")
        return v

    @field_validator("init")
    @classmethod
    def _check_init(cls, v: str) -> str:
        if v in ("random", "imagenet") or (v.startswith("checkpoint:") and len(v) > len("checkpoint:")):
            return v
        raise ValueError("must be 'random', 'imagenet' or 'checkpoint:PATH'")

    @model_validator(mode="after")
    def _resolve_body_norm(self) -> "ModelConfig":
        body = self.body_norm or self.norm
        if self.init == "imagenet" and body == "GN" and self.imagenet_weights is None:
            where = f"weights/{DETECTRON_GN[self.backbone][0]}" if self.backbone in DETECTRON_GN else "PATH/backbone.pt"
            raise ValueError(
                f"init imagenet with a GN body needs GroupNorm ImageNet weights (torchvision only has BN "
                f"ones): set model.imagenet_weights: {where} ({gn_download_hint(self.backbone)}), or "
                "set model.body_norm: FrozenBN to fine-tune torchvision's BN weights in a frozen-BN body "
                "(detectron2's usual setup, not the paper's GN arm)")
        self.__dict__["body_norm"] = body
        if self.init == "imagenet" and self.imagenet_weights is not None and self.imagenet_weights_sha256 is None:
            self.__dict__["imagenet_weights_sha256"] = _weights_digest(Path(self.imagenet_weights))
        return self


_DIGESTS: dict[tuple, str] = {}


def _weights_digest(path: Path) -> str | None:
    """sha256 of a weights file that exists here (None otherwise), once per file version and process:
    filled in at validation, so the driver's MLflow params and every trial's config carry it."""
    try:
        st = path.expanduser().stat()
    except OSError:
        return None
    key = (str(path.expanduser().resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path.expanduser())
    return _DIGESTS[key]


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks (no torch import: `plan` stays light)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_layout_pairs(section: Any) -> None:
    """A split's annotation file and image folder come together or not at all (data configs and the
    sweep spec's dataset section share this rule)."""
    for split in ("train", "val"):
        if (getattr(section, f"{split}_json") is None) != (getattr(section, f"{split}_image_dir") is None):
            raise ValueError(f"{split}_json and {split}_image_dir go together: give both or neither")


class DataConfig(_Strict):
    """A COCO instances dataset: ROOT/annotations/instances_{split}.json and ROOT/{split}/ images by
    default, or any annotation file + image folder per split (`train_json`/`train_image_dir`, ...)."""

    root: Path = Path("datasets/coco")
    train_split: str = "train2017"
    val_split: str = "val2017"
    train_images: int | Literal["all"] = "all"  # seeded, nested subset of the train split
    val_images: int | Literal["all"] = "all"  # first N val images (by id), for quick checks
    subset_seed: int = 0
    hflip: bool = True
    scale_jitter: tuple[int, int] | None = None  # e.g. (640, 800): the paper's "train aug"
    num_workers: int = Field(2, ge=0)
    prefetch_factor: int = Field(2, ge=1)  # batches each loader worker keeps ready
    # Keep loader workers alive between passes over the loader. The train stream is one pass per
    # `fit()`, so this only saves worker start-up when a loader is iterated again; off by default.
    persistent_workers: bool = False
    pin_memory: bool = True  # CUDA only: page-locked batches, copied to the GPU with non_blocking
    # Batches of landscape-only or portrait-only images (less padding per batch). Still a pure
    # function of (seed, iteration); off by default because it changes which images share a batch.
    aspect_grouping: bool = False
    format: Literal["coco", "voc"] = "coco"  # voc: ROOT is a VOC20xx folder, box task only (trainer.data.voc)
    voc_classes: list[str] | None = None  # voc: class names in label order; None = the 20 VOC classes
    # Any layout, like detectron2's register_coco_instances(name, {}, json, image_root): a split's
    # annotation file and image folder, given together, replace ROOT/annotations/instances_{split}.json
    # and ROOT/{split}/ for that split. Unset: the COCO 2017 layout under `root`.
    train_json: Path | None = None
    train_image_dir: Path | None = None
    val_json: Path | None = None
    val_image_dir: Path | None = None
    # A JSON width/height that differs from the image file is an error; true makes it a warning
    # with the count (masks of those images may then be off their boxes).
    allow_size_mismatch: bool = False
    # The up-front check refuses these defects (exit 2, one line); each switch turns its kind into a
    # logged drop, from training and from the evaluation ground truth alike: images that are missing
    # or do not decode fully (with their annotations), annotations with a bad polygon or an RLE of
    # another size, annotations whose bbox is not 4 finite numbers.
    allow_unreadable_images: bool = False
    allow_bad_segmentation: bool = False
    allow_bad_boxes: bool = False
    check_workers: int = Field(0, ge=0)  # processes decoding images in the check; 0 = one per CPU
    # Dataset check results and the train index, keyed by the annotation file's hash. None: a
    # `.trainer_cache` folder beside the annotation file (skipped with a warning if unwritable).
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _layout_pairs(self) -> "DataConfig":
        check_layout_pairs(self)
        return self

    @field_validator("train_images", "val_images")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive image count or 'all'")
        return v

    @field_validator("scale_jitter")
    @classmethod
    def _jitter(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 < v[0] <= v[1]):
            raise ValueError("must be (min_short_side, max_short_side) with 0 < min <= max")
        return v


class OptimConfig(_Strict):
    """SGD as in the paper: LR 0.02 at batch 16, momentum 0.9, wd 1e-4 and none on norm parameters."""

    base_lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    weight_decay_norm: float = Field(0.0, ge=0)
    batch_size: int = Field(16, gt=0)  # images per iteration, over all workers of a trial
    grad_clip: float | None = Field(None, gt=0)  # max total grad norm; None = off
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype; fp16 adds a GradScaler on CUDA


_NX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x\s*$")


class ScheduleConfig(_Strict):
    """The paper's rule: `length: 2x` = 2 x iters_per_x iterations, LR x gamma at the last 60k and 20k.

    Written in YAML either as `schedule: 2x` or as an explicit `schedule: {iters: 90000, drops: [60000,
    80000]}` (Detectron's own 1x). Drop distances scale with iters_per_x / 90000.
    """

    length: str | None = None
    iters: int | None = Field(None, gt=0)
    drops: list[int] | None = None
    iters_per_x: int = Field(90_000, gt=0)
    drop_distances: tuple[int, ...] = (60_000, 20_000)  # at iters_per_x = 90k
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_iters: int = Field(500, ge=0)
    warmup_factor: float = Field(1.0 / 3.0, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"length": data}
        return data

    @model_validator(mode="after")
    def _one_form(self) -> "ScheduleConfig":
        if (self.length is None) == (self.iters is None):
            if self.length is None:
                self.__dict__["length"] = "1x"
            else:
                raise ValueError("give either a length like '2x' or explicit iters, not both")
        if self.length is not None:
            if not _NX.match(self.length):
                raise ValueError(f"unknown schedule {self.length!r}; expected 'Nx' (e.g. 1x, 2x, 6x)")
            if self.drops is not None:
                raise ValueError("drops go with explicit iters; a length like '2x' derives them")
        elif self.drops is not None:
            if list(self.drops) != sorted(self.drops) or any(d <= 0 or d >= self.iters for d in self.drops):
                raise ValueError(f"drops must be increasing and inside (0, {self.iters})")
        return self


class EvalConfig(_Strict):
    period: int = Field(0, ge=0)  # iterations between evaluations; 0 = only at the end
    batch_size: int = Field(2, gt=0)
    backend: Literal["auto", "pycocotools", "faster_coco_eval"] = "auto"
    num_workers: int = Field(2, ge=0)  # evaluation loader workers (image decoding), per rank


class CheckpointConfig(_Strict):
    period: int = Field(0, ge=0)  # iterations between checkpoints; 0 = only at the end
    keep_last: int = Field(3, ge=1)
    # Extra iterations to checkpoint at (kept regardless of keep_last): schedule fork points.
    at: list[int] = Field(default_factory=list)


class RuntimeConfig(_Strict):
    output_dir: Path = Path("runs/trial")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, gt=0)  # torch intra-op threads; None = torch's default
    log_period: int = Field(20, gt=0)
    # Speed switches (trainer/speed.py). CUDA-only ones are no-ops on CPU (logged at debug level).
    # cuDNN autotuning pays off only when input shapes repeat; detection batches vary in shape
    # (aspect ratio, scale jitter), so it is off by default, as in Detectron2.
    cudnn_benchmark: bool = False
    tf32: bool = True  # CUDA only: TF32 tensor cores for fp32 matmuls and convolutions
    channels_last: bool = False  # NHWC weights and backbone input (CPU and CUDA)
    compile_backbone: bool = False  # torch.compile the ResNet-FPN backbone in place
    # DDP process-group backend: auto = NCCL when the run's device is CUDA, gloo otherwise.
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Seconds between a preemption notice (SIGTERM) and the hard kill, as this run assumes them: the
    # run stops at the end of the step in flight and writes its checkpoint (trainer.engine.preemption); a
    # checkpoint that took longer is warned about (the platform's grace is what really counts).
    preemption_grace_s: float = Field(20.0, gt=0)


class PretrainConfig(_Strict):
    """Backbone pretraining (`python -m trainer.pretrain`): classification on an ImageFolder set.

    Its length is `iters`, or `epochs` over the train folder (then `warmup_epochs` and `lr_steps` are in
    epochs too, turned into iterations once the folder's size is known). `batch_size` is the global batch,
    split over the processes of a data-parallel run.
    """

    preset: Literal["imagenet-gn"] | None = None
    data_root: Path = Path("datasets/imagenet")  # holds train/<class>/... and optionally val/
    backbone: Backbone = "R50"
    norm: Norm = "GN"
    image_size: int = Field(224, gt=0)  # random-resized-crop size; val: resize + center crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (ImageNet default)
    iters: int | None = Field(None, gt=0)  # None: from epochs, else 1000
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(256, gt=0)
    base_lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(0, ge=0)
    warmup_epochs: float | None = Field(None, ge=0)
    lr_schedule: Literal["cosine", "step"] = "cosine"  # cosine to zero, or x gamma at each of lr_steps
    lr_steps: list[float] = Field(default_factory=list)  # in epochs with `epochs`, else in iterations
    gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)  # max total grad norm; None = off
    num_workers: int = Field(2, ge=0)
    seed: int = 0
    threads: int | None = Field(None, gt=0)
    device: str = "auto"
    output_dir: Path = Path("runs/pretrain")
    checkpoint_period: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    log_period: int = Field(20, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("preset") in PRETRAIN_PRESETS:
            return {**PRETRAIN_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _length(self) -> "PretrainConfig":
        if self.iters is not None and self.epochs is not None:
            raise ValueError("give iters or epochs, not both (a preset sets epochs: override it with epochs=N, "
                             "or set epochs=null with iters=N)")
        if self.warmup_epochs is not None and self.epochs is None:
            raise ValueError("warmup_epochs goes with epochs; with iters use warmup_iters")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s <= 0 for s in self.lr_steps):
            raise ValueError("lr_steps must be positive and increasing")
        if self.lr_steps and self.lr_schedule != "step":
            raise ValueError("lr_steps needs lr_schedule: step")
        if self.iters is None and self.epochs is None:
            self.__dict__["iters"] = 1000
        return self


class TrainConfig(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _task_fits_data(self) -> "TrainConfig":
        if self.data.format == "voc" and self.model.task != "box":
            raise ValueError(f"data.format=voc has boxes only: set model.task=box (got {self.model.task})")
        return self


# ----------------------------------------------------------------------------------------------
# Loading, overrides, errors


def _allowed_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names of the sub-model at `loc` (the parent of a rejected key)."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return []
        current = field.annotation
        for arg in getattr(current, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    return sorted(getattr(current, "model_fields", {}))


def _clean_loc(e: Mapping[str, Any]) -> list[Any]:
    return [p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after", "function-before"))]


def format_validation_error(err: ValidationError | Sequence[Mapping[str, Any]], model: type[BaseModel],
                            prefix: str = "") -> str:
    """One line per problem, each naming the dotted key; unknown keys list what is allowed."""
    lines = []
    for e in (err.errors() if isinstance(err, ValidationError) else err):
        loc = _clean_loc(e)
        dotted = prefix + ".".join(str(p) for p in loc) if loc else prefix.rstrip(".") or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            lines.append(f"unknown key '{dotted}' (allowed: {', '.join(allowed)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            lines.append(f"{dotted}: {msg}{shown}")
    return "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'optim.base_lr=0.01' -> (['optim', 'base_lr'], 0.01); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); validation happens later, so typos are caught."""
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None or not isinstance(child, str) else {"length": child}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key written twice in one mapping: PyYAML would keep the last one
    silently (a second `resources:` block once turned 8 GPUs per trial into 1)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may legitimately repeat keys it merges in
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first[key]})", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def build_config(data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "config") -> TrainConfig:
    """Validate a nested dict (plus overrides) into a TrainConfig, or raise a one-line ConfigError."""
    merged = apply_overrides(dict(data), overrides)
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_attributed(err, overrides, source)) from None


def _attributed(err: ValidationError, overrides: Sequence[str], source: str) -> str:
    """The errors of a config, each told against what set the key: an override (`--set KEY=VALUE`)
    or the config file."""
    keys = [(item, parse_override(item)[0]) for item in overrides]
    by_source: dict[str, list] = {}
    for e in err.errors():
        loc = [str(p) for p in _clean_loc(e)]
        item = next((item for item, key in reversed(keys) if loc[:len(key)] == key or key[:len(loc)] == loc), None)
        by_source.setdefault(f"--set {item}" if item else source, []).append(e)
    return "; ".join(f"{where}: {format_validation_error(errors, TrainConfig)}" for where, errors in by_source.items())


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    data = read_yaml(path) if path is not None else {}
    return build_config(data, overrides, source=str(path) if path else "config")


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain, YAML-safe nested dict (paths as strings, tuples as lists)."""
    return cfg.model_dump(mode="json")


def flatten(data: Mapping[str, Any], prefix: str = "", empty_leaves: bool = False) -> dict[str, Any]:
    """{'optim': {'base_lr': 0.02}} -> {'optim.base_lr': 0.02}; used for params, run tables and specs.

    Lists are leaves; an empty mapping is dropped, or kept as a leaf with `empty_leaves`."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and (value or not empty_leaves):
            out.update(flatten(value, name + ".", empty_leaves))
        else:
            out[name] = value
    return out


def digest(data: Any) -> str:
    """sha256 hex of a JSON-able value (keys sorted): the ids of trials, trunks, jobs and sweeps."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def config_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What defines a run, for ids: the config without defaults and without its output folder.

    `model.body_norm` equal to `model.norm` counts as a default (validation fills it in), so ids of
    runs made before it was a resolved field stay the same; `model.imagenet_weights_sha256` never counts.
    """
    identity = cfg.model_dump(mode="json", exclude_defaults=True)
    identity.get("runtime", {}).pop("output_dir", None)
    model = identity.get("model", {})
    if cfg.model.body_norm == cfg.model.norm:
        model.pop("body_norm", None)
    model.pop("imagenet_weights_sha256", None)  # a property of the file, recorded, not an identity
    if "model" in identity and not model:
        identity.pop("model")
    return identity


def dump_config(cfg: TrainConfig, path: str | Path) -> Path:
    from trainer.atomic import write_atomic

    return write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def load_pretrain_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    data = apply_overrides(read_yaml(path) if path else {}, overrides)
    try:
        return PretrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path or 'config'}: {format_validation_error(err, PretrainConfig)}") from None
