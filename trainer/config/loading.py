"""Configs from YAML and `--set a.b=c` overrides, one-line errors naming the dotted key, and the
config's plain forms (dict, flat keys, identity and digest for ids, config.yaml)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from trainer.config.pretrain import PretrainConfig
from trainer.config.train import TrainConfig
from trainer.errors import ConfigError


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
