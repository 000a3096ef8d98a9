"""The paper's schedule rule: LR x0.1 at the last 60k and 20k iterations, whatever the length."""

import pytest

from trainer.config import ScheduleConfig, build_config
from trainer.errors import ConfigError
from trainer.engine.schedule import resolve_schedule


@pytest.mark.parametrize("length,total,drops", [
    ("1x", 90_000, (30_000, 70_000)),     # by the rule (Detectron's own 1x is 60k/80k, below)
    ("2x", 180_000, (120_000, 160_000)),  # Detectron e2e_mask_rcnn_R-50-FPN_2x_gn.yaml
    ("3x", 270_000, (210_000, 250_000)),  # Detectron/detectron2 3x configs
    ("4x", 360_000, (300_000, 340_000)),
    ("5x", 450_000, (390_000, 430_000)),
    ("6x", 540_000, (480_000, 520_000)),
    ("9x", 810_000, (750_000, 790_000)),  # scratch with train aug
])
def test_paper_drop_points(length, total, drops):
    s = resolve_schedule(ScheduleConfig.model_validate(length))
    assert (s.total_iters, s.drops) == (total, drops)
    assert s.first_drop == drops[0]


def test_detectron_1x_in_explicit_form():
    s = resolve_schedule(ScheduleConfig.model_validate({"iters": 90_000, "drops": [60_000, 80_000]}))
    assert (s.total_iters, s.drops) == (90_000, (60_000, 80_000))


def test_distances_scale_with_iters_per_x():
    s = resolve_schedule(ScheduleConfig(length="2x", iters_per_x=900))
    assert (s.total_iters, s.drops) == (1800, (1200, 1600))


def test_lr_factor_warmup_and_drops():
    s = resolve_schedule(ScheduleConfig(length="2x", warmup_iters=500, warmup_factor=1 / 3))
    assert s.lr_factor(0) == pytest.approx(1 / 3)
    assert s.lr_factor(250) == pytest.approx(1 / 3 + (1 - 1 / 3) * 0.5)
    assert s.lr_factor(500) == 1.0
    assert s.lr_factor(119_999) == 1.0
    assert s.lr_factor(120_000) == pytest.approx(0.1)
    assert s.lr_factor(160_000) == pytest.approx(0.01)
    assert s.lr_factor(179_999) == pytest.approx(0.01)


def test_schedules_share_base_lr_prefix():
    """Every schedule runs the same LR until its first drop: the basis of schedule forking."""
    s2, s6 = (resolve_schedule(ScheduleConfig(length=x)) for x in ("2x", "6x"))
    assert all(s2.lr_factor(i) == s6.lr_factor(i) for i in range(0, s2.first_drop, 997))


def test_gamma_from_config():
    s = resolve_schedule(ScheduleConfig(length="6x", gamma=0.02))
    assert s.lr_factor(500_000) == pytest.approx(0.02)


@pytest.mark.parametrize("value,match", [
    ("fast", "unknown schedule 'fast'"),
    ("0.5x", "shorter than the first LR drop"),
    ({"iters": 100, "drops": [150]}, "drops must be increasing"),
    ({"length": "2x", "iters": 10}, "not both"),
])
def test_bad_schedules(value, match):
    with pytest.raises(ConfigError, match=match):
        resolve_schedule(build_config({"schedule": value}).schedule)
