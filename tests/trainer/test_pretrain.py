"""Backbone pretraining: a classification run whose output is a detection init; exact resume; counts."""

import pytest
import torch

from tests.conftest import tiny_config
from trainer import checkpoint as ckpt
from trainer.config import build_config
from trainer.errors import DatasetError
from trainer.model import build_model
from trainer.pretrain import load_pretrain_config, pretrain


def _cfg(root, out, *extra):
    return load_pretrain_config(None, [f"data_root={root}", f"output_dir={out}", "backbone=R18", "norm=GN",
                                       "image_size=32", "iters=6", "batch_size=8", "num_workers=0",
                                       "threads=1", "checkpoint_period=3", "log_period=3", *extra])


def test_pretrain_writes_an_init_for_detection(synth_cls_root, synth_root, tmp_path):
    path = pretrain(_cfg(synth_cls_root, tmp_path / "pt"))
    saved = torch.load(path, weights_only=True)
    meta = saved["meta"]
    assert meta["images_seen"] == 48 and meta["pixels_seen"] == 48 * 32 * 32
    assert meta["backbone"] == "R18" and 0.0 <= meta["val_top1"] <= 1.0
    assert not any(k.startswith("fc.") for k in saved["backbone"])
    cfg = build_config(tiny_config(synth_root, tmp_path / "det", model={"init": f"checkpoint:{path}"}))
    model, resolved = build_model(cfg.model, num_classes=5)
    body = model.backbone.body.state_dict()
    assert torch.equal(body["conv1.weight"], saved["backbone"]["conv1.weight"])
    assert resolved.body_norm == "GN"


def test_pretrain_resume_is_exact(synth_cls_root, tmp_path):
    full = torch.load(pretrain(_cfg(synth_cls_root, tmp_path / "a")), weights_only=True)
    cut = tmp_path / "c"
    pretrain(_cfg(synth_cls_root, cut))
    # drop the final checkpoint and resume from iteration 3
    (cut / "checkpoints" / "ckpt_0000006.pt").unlink()
    resumed = torch.load(pretrain(_cfg(synth_cls_root, cut), resume=True), weights_only=True)
    assert all(torch.equal(full["backbone"][k], resumed["backbone"][k]) for k in full["backbone"])
    assert resumed["meta"]["images_seen"] == full["meta"]["images_seen"]
    assert [i for i, _ in ckpt.list_checkpoints(cut / "checkpoints")] == [3, 6]


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="ImageNet layout"):
        pretrain(_cfg(tmp_path / "none", tmp_path / "o"))
