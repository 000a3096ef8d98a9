"""Trial configuration: one strict pydantic model per level, YAML loading and dotted overrides.

A trial is fully described by a `TrainConfig` (model, data, optim, schedule, eval, checkpoint,
runtime). Unknown keys are rejected with their dotted path and the keys that level allows, so a typo
never silently falls back to a default. `load_config` reads YAML and applies `--set a.b=c` overrides
before validation; `dump_config` writes the resolved config next to a run's outputs.

One module per level: `model` (ModelConfig), `data` (DataConfig), `train` (TrainConfig and optim,
schedule, eval, checkpoint, runtime), `pretrain` (PretrainConfig); `loading` reads, overrides,
validates and writes them. Torch-free, so `orchestrator plan` stays light; every name is importable
from `trainer.config` itself.
"""

from trainer.config.base import Backbone, Norm
from trainer.config.data import DataConfig, check_layout_pairs
from trainer.config.loading import (UniqueKeyLoader, apply_overrides, build_config, config_identity, config_to_dict,
                                    digest, dump_config, flatten, format_validation_error, load_config,
                                    load_pretrain_config, parse_override, read_yaml)
from trainer.config.model import ModelConfig, file_sha256
from trainer.config.pretrain import PretrainConfig
from trainer.config.train import (CheckpointConfig, EvalConfig, OptimConfig, RuntimeConfig, ScheduleConfig,
                                  TrainConfig)
from trainer.recipes import DETECTRON_GN, PRETRAIN_PRESETS, gn_download_hint

__all__ = [
    "Backbone", "Norm", "ModelConfig", "DataConfig", "OptimConfig", "ScheduleConfig", "EvalConfig",
    "CheckpointConfig", "RuntimeConfig", "TrainConfig", "PretrainConfig", "check_layout_pairs", "file_sha256",
    "UniqueKeyLoader", "apply_overrides", "build_config", "config_identity", "config_to_dict", "digest",
    "dump_config", "flatten", "format_validation_error", "load_config", "load_pretrain_config", "parse_override",
    "read_yaml", "DETECTRON_GN", "PRETRAIN_PRESETS", "gn_download_hint",
]
