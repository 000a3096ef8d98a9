"""Cost accounting against hand-computed values: the paper's Figure 2 arithmetic and a sweep's own counts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dashboards.cost import NOTHING, Seen, coco_seen, figure2, format_count, imagenet_seen, pretrain_seen
from dashboards.tables import cost_table


def test_imagenet_100_epochs_as_the_paper_counts_it():
    seen = imagenet_seen()
    assert seen.images == 1_280_000 * 100 == 128e6
    assert seen.instances == 128e6  # one object per ImageNet image
    assert seen.pixels == 128e6 * 224 * 224 == pytest.approx(6.422528e12)


def test_figure2_pretrain_plus_2x_vs_scratch_6x():
    fig = figure2()
    fine, both, scratch = fig["COCO fine-tuning 2x"], fig["pre-training + fine-tuning"], fig["COCO from scratch 6x"]
    # 2x = 180k iterations x 16 images; 6x = 540k x 16 (Section 4).
    assert (fine.images, scratch.images) == (2.88e6, 8.64e6)
    assert (fine.instances, scratch.instances) == (2.88e6 * 7, 8.64e6 * 7)  # ~7 instances per COCO image
    assert fine.pixels == pytest.approx(2.88e6 * 800 * 1333)  # 3.07e12
    assert both.images == 128e6 + 2.88e6 == 130.88e6
    assert both.pixels == pytest.approx(6.422528e12 + 3.071232e12)
    # The paper's point: counted in images scratch sees far fewer; in pixels nearly as many.
    assert scratch.images / both.images == pytest.approx(0.0660, abs=5e-4)
    assert scratch.instances / both.instances == pytest.approx(0.408, abs=1e-3)
    assert scratch.pixels / both.pixels == pytest.approx(0.9705, abs=5e-4)
    assert coco_seen(1).images == 90_000 * 16


def test_pretrain_counts_come_from_the_pretrain_summary(tmp_path):
    job = tmp_path / "pretrain" / "r18"
    job.mkdir(parents=True)
    (job / "pretrain_summary.json").write_text(json.dumps({"images_seen": 25600, "pixels_seen": 25600 * 32 * 32,
                                                           "iterations": 400, "backbone": "R18"}))
    init_param = f"checkpoint:{job / 'backbone.pt'}"
    seen, source = pretrain_seen("pretrained:r18", init_param)
    assert seen == Seen(25600.0, 25600.0, 25600.0 * 1024) and source.endswith("pretrain_summary.json")
    # Without the bound path, the sweep folder's layout is enough.
    assert pretrain_seen("pretrained:r18", None, tmp_path)[0] == seen
    assert pretrain_seen("random", "random") == (NOTHING, "random init")
    assert pretrain_seen("imagenet", "imagenet")[0] == imagenet_seen()
    missing, why = pretrain_seen("pretrained:gone", None, tmp_path)
    assert not missing.known and "not found" in why


def test_cost_table_adds_pretraining_to_what_detection_saw(tmp_path):
    job = tmp_path / "pretrain" / "p"
    job.mkdir(parents=True)
    (job / "pretrain_summary.json").write_text(json.dumps({"images_seen": 1000, "pixels_seen": 1000 * 1024}))
    trials = pd.DataFrame([{"name": "a", "init": "pretrained:p", "model_init": f"checkpoint:{job}/backbone.pt"},
                           {"name": "b", "init": "random", "model_init": "random"}])
    # 12 iterations at batch 4 of 64x64 images with 3 objects each.
    fin = pd.DataFrame([{"name": n, "seen/images": 48.0, "seen/instances": 144.0, "seen/pixels": 48.0 * 4096,
                         "bbox/AP": 0.25, "segm/AP": 0.2} for n in ("a", "b")])
    cost = cost_table(trials, fin, tmp_path).set_index("name")
    assert cost.loc["a", ["total_images", "total_instances", "total_pixels"]].tolist() == \
        [1048.0, 1144.0, 1000 * 1024 + 48 * 4096]
    assert cost.loc["b", ["total_images", "total_instances", "total_pixels"]].tolist() == [48.0, 144.0, 48 * 4096]
    assert cost.loc["a", "bbox/AP"] == 25.0


@pytest.mark.parametrize("value,text", [(128e6, "128M"), (6.422528e12, "6.42T"), (2240, "2.24k"), (320, "320"),
                                        (None, "n/a")])
def test_format_count(value, text):
    assert format_count(value) == text
