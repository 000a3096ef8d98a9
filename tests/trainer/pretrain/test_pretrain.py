"""Backbone pretraining: a classification run whose output is a detection init; exact resume; counts."""

import pytest
import torch

from tests.conftest import tiny_config
from trainer.engine import checkpoint as ckpt
from trainer.config import build_config
from trainer.errors import DatasetError
from trainer.modeling.model import build_model
from trainer.pretrain.train import load_pretrain_config, pretrain


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


# ----------------------------------------------------------------------------------------------
# The paper's ImageNet recipe (--preset imagenet-gn), data-parallel under torchrun, resumable


def test_imagenet_gn_preset_is_the_papers_recipe():
    from trainer.pretrain.train import _optimizer, build_classifier
    from trainer.pretrain.recipe import lr_factor, resolve_pretrain_schedule

    cfg = load_pretrain_config(None, ["preset=imagenet-gn"])
    assert (cfg.backbone, cfg.norm, cfg.batch_size, cfg.base_lr, cfg.weight_decay) == ("R50", "GN", 256, 0.1, 1e-4)
    assert load_pretrain_config(None, ["preset=imagenet-gn", "backbone=R101"]).backbone == "R101"
    sched = resolve_pretrain_schedule(cfg, 1_281_167)  # ImageNet-1k train
    per_epoch = 1_281_167 // 256
    assert sched.iters == 100 * per_epoch and sched.warmup == 5 * per_epoch
    assert sched.drops == (30 * per_epoch, 60 * per_epoch, 90 * per_epoch)
    f = lr_factor(cfg, sched)
    assert f(0) == pytest.approx(1 / sched.warmup) and f(sched.warmup) == 1.0
    assert f(30 * per_epoch) == pytest.approx(0.1) and f(90 * per_epoch) == pytest.approx(1e-3)
    net = build_classifier(cfg.model_copy(update={"backbone": "R18"}), 10)
    groups = _optimizer(net, cfg).param_groups
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert sum(p.numel() for p in groups[1]["params"]) == sum(
        p.numel() for m in net.modules() if isinstance(m, torch.nn.GroupNorm) for p in m.parameters())
    with pytest.raises(Exception, match="iters or epochs"):
        load_pretrain_config(None, ["preset=imagenet-gn", "iters=10"])


def _torchrun(root, out, *extra):
    """`torchrun --standalone --nproc_per_node 2 -m trainer.pretrain --preset imagenet-gn`, shrunk: R18 at
    32 px, global batch 8 over 96 images (12 iterations per epoch), 1 epoch, LR step at half of it."""
    import os
    import subprocess
    import sys

    shrunk = [f"data_root={root}", f"output_dir={out}", "backbone=R18", "image_size=32", "batch_size=8",
              "epochs=1", "warmup_epochs=0.25", "lr_steps=[0.5]", "num_workers=0", "threads=1", "log_period=3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer.pretrain", "--preset", "imagenet-gn", *[a for s in shrunk for a in ("--set", s)], *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _done(proc) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def test_preset_shrunk_on_two_gloo_workers_resumes_exactly(synth_cls_root, synth_root, tmp_path):
    # An uninterrupted run and one stopped after 5 of its 12 iterations, side by side; then the resume.
    full, cut = _torchrun(synth_cls_root, tmp_path / "full"), _torchrun(synth_cls_root, tmp_path / "cut",
                                                                         "--stop-after", "5")
    log = _done(full)
    _done(cut)
    assert "rank 1 of 2 (gloo)" in log and "12 iterations (12 per epoch over 96 images) x batch 8 on 2" in log
    assert not (tmp_path / "cut" / "backbone.pt").exists()
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path / "cut" / "checkpoints")] == [5]
    assert "resumed from" in _done(_torchrun(synth_cls_root, tmp_path / "cut", "--resume"))
    full = torch.load(tmp_path / "full" / "backbone.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "backbone.pt", weights_only=True)
    assert all(torch.equal(full["backbone"][k], resumed["backbone"][k]) for k in full["backbone"])
    assert full["meta"]["images_seen"] == 12 * 8 and full["meta"]["pixels_seen"] == 12 * 8 * 32 * 32
    assert resumed["meta"]["pixels_seen"] == full["meta"]["pixels_seen"]
    # Its backbone.pt is GN ImageNet weights for the detector (strict loader, torchvision layout).
    path = tmp_path / "full" / "backbone.pt"
    cfg = build_config(tiny_config(synth_root, tmp_path / "det",
                                   model={"init": "imagenet", "imagenet_weights": str(path)}))
    model, resolved = build_model(cfg.model, num_classes=5)
    assert resolved.body_norm == "GN"
    got = model.backbone.body.state_dict()["layer3.1.bn2.weight"]
    assert torch.equal(got, full["backbone"]["layer3.1.bn2.weight"])
