"""Trial config: strict levels, dotted overrides, one-line errors naming the key."""

import pytest
import yaml

from trainer.config import build_config, dump_config, flatten, load_config, config_to_dict
from trainer.errors import ConfigError


def test_defaults_are_the_paper_recipe():
    cfg = build_config({})
    assert (cfg.optim.base_lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.02, 0.9, 1e-4)
    assert cfg.optim.weight_decay_norm == 0.0 and cfg.optim.batch_size == 16
    assert (cfg.model.norm, cfg.model.min_size, cfg.model.max_size) == ("GN", 800, 1333)
    assert (cfg.schedule.warmup_iters, cfg.schedule.warmup_factor) == (500, pytest.approx(1 / 3))


def test_overrides_parse_into_the_model():
    cfg = build_config({"schedule": "2x"}, ["optim.base_lr=0.01", "model.backbone=R18",
                                            "schedule.iters_per_x=300", "data.train_images=1000"])
    assert cfg.optim.base_lr == 0.01 and cfg.model.backbone == "R18"
    assert cfg.schedule.length == "2x" and cfg.schedule.iters_per_x == 300
    assert cfg.data.train_images == 1000


def test_unknown_key_names_dotted_path_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        build_config({"optim": {"lr": 0.1}})
    msg = str(err.value)
    assert "unknown key 'optim.lr'" in msg and "base_lr" in msg and "\n" not in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer' \(allowed: checkpoint, data, eval"):
        build_config({"optimizer": {}})


@pytest.mark.parametrize("override,match", [
    ("optim.base_lr=abc", "optim.base_lr"),
    ("model.backbone=R152", "model.backbone"),
    ("data.train_images=-3", "data.train_images"),
    ("model.init=pretrained", "model.init"),
    ("bad", "not of the form"),
    ("model.anchor_sizes=[8,16,16,32,64]", "model.anchor_sizes"),
    ("model.anchor_sizes=[8,16,32,64]", "model.anchor_sizes"),
])
def test_wrong_values(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config({}, [override])


def test_yaml_roundtrip(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"model": {"backbone": "R34"}, "schedule": "3x"}))
    cfg = load_config(path, ["runtime.seed=5"])
    out = dump_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(out)
    assert again == cfg and again.runtime.seed == 5
    assert flatten(config_to_dict(cfg))["model.backbone"] == "R34"


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
