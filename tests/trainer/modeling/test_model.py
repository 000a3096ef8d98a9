"""Mask R-CNN builder: backbones x norms x inits, norm placement, init loading, freezing, forward."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from trainer.config import ModelConfig
from trainer.errors import InitError
from trainer.modeling.model import (
    build_model,
    build_resnet,
    find_imagenet_weights,
    is_norm_param,
    load_backbone_weights,
    norm_factory,
    norm_parameters,
)

BACKBONES = ["R18", "R34", "R50", "R101"]
NORMS = ["GN", "SyncBN", "BN", "FrozenBN"]
INITS = ["random", "imagenet", "imagenet-frozenbn", "checkpoint"]
SMALL = dict(
    min_size=64, max_size=64, rpn_batch_size_per_image=32, box_batch_size_per_image=32,
    rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
    rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10,
    fpn_channels=64, representation_size=256,  # GN-compatible (2 x 32) and cheap to initialize
)
NUM_CLASSES = 3
BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    # The machine is shared; one thread keeps these tests from crowding other jobs.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Per backbone, lazily: a BN-trained file in torchvision's format (bare state dict, fc
    included) and a GN-trained file in backbone pretraining's format ({"backbone": state}).

    Only R18 files hold real tensors; the others are meta tensors (same keys and shapes, a few KB,
    loaded back as meta), which is all the meta-device builds and the shape checks need.
    """
    root = tmp_path_factory.mktemp("weights")
    cache: dict[tuple[str, str], Path] = {}

    def get(backbone: str, kind: str) -> Path:
        if (backbone, kind) not in cache:
            path = root / f"{backbone}-{kind}.pth"
            with torch.device("cpu" if backbone == "R18" else "meta"):
                state = build_resnet(backbone, kind).state_dict()
            torch.save(state if kind == "BN" else {"backbone": state, "iteration": 7}, path)
            cache[backbone, kind] = path
        return cache[backbone, kind]

    return get


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


def cfg_for(backbone: str, norm: str, init: str, files) -> ModelConfig:
    if init == "imagenet":  # GN weights for a GN model (the paper's arm), torchvision's BN ones otherwise
        weights = files(backbone, "GN" if norm == "GN" else "BN")
        return small_cfg(backbone=backbone, norm=norm, init="imagenet", imagenet_weights=weights)
    if init == "imagenet-frozenbn":  # detectron2's usual fine-tuning: BN weights, frozen-BN body
        return small_cfg(backbone=backbone, norm=norm, init="imagenet", imagenet_weights=files(backbone, "BN"),
                         body_norm="FrozenBN")
    if init == "checkpoint":
        kind = "GN" if norm == "GN" else "BN"
        return small_cfg(backbone=backbone, norm=norm, init=f"checkpoint:{files(backbone, kind)}")
    return small_cfg(backbone=backbone, norm=norm)


def batch(n: int = 2, size: int = 64):
    images = [torch.rand(3, size, size) for _ in range(n)]
    targets = []
    for i in range(n):
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 8:40, 8:40] = 1
        masks[1, 30:60, 20:50] = 1
        boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [20.0, 30.0, 50.0, 60.0]])
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2 - i % 2]), "masks": masks})
    return images, targets


def count(module: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


# ----------------------------------------------------------------------------------------------
# Build grid


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_combination_builds(backbone, norm, init, weight_files):
    cfg = cfg_for(backbone, norm, init, weight_files)
    # R34/R50/R101 are built on the meta device: same modules, resolution and checkpoint checks
    # (shapes, key coverage, norm kind), without seconds of random init per build; copying
    # weights into meta tensors is a no-op, real loading is checked on R18 below.
    device = "cpu" if backbone == "R18" else "meta"
    with torch.device(device):
        model, resolved = build_model(cfg, NUM_CLASSES)
        resnet = build_resnet(backbone, resolved.body_norm)
    assert resolved.body_norm == ("FrozenBN" if init == "imagenet-frozenbn" else norm)
    assert resolved.norm == norm and resolved.init == cfg.init

    body_params = sum(p.numel() for n, p in resnet.named_parameters() if not n.startswith("fc."))
    got_body = sum(p.numel() for p in model.backbone.body.parameters())
    assert got_body == body_params
    total = sum(p.numel() for p in model.parameters())
    assert total > body_params + 500_000  # FPN + heads
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == NUM_CLASSES


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backbone", ["R18", "R34"])
def test_forward_backward_train_and_eval(backbone, norm):
    # SyncBN included: without a process group it must fall back to plain BN on CPU.
    torch.manual_seed(0)
    model, _ = build_model(small_cfg(backbone=backbone, norm=norm), NUM_CLASSES)
    images, targets = batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"
    }
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.body.conv1.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        assert det["masks"].shape[1:] == (1, 64, 64)


def test_imagenet_gn_forward_with_frozen_bn_body(weight_files):
    cfg = cfg_for("R18", "GN", "imagenet-frozenbn", weight_files)
    model, _ = build_model(cfg, NUM_CLASSES)
    images, targets = batch()
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------------------------
# Norm placement and norm parameters


def test_gn_placement():
    model, _ = build_model(small_cfg(backbone="R18", norm="GN"), NUM_CLASSES)
    # R18 body: stem 1 + 8 blocks x 2 + 3 downsample = 20; FPN: 4 inner + 4 layer blocks.
    assert count(model.backbone.body, nn.GroupNorm) == 20
    assert count(model.backbone.fpn, nn.GroupNorm) == 8
    assert count(model.roi_heads.box_head, nn.GroupNorm) == 4
    assert count(model.roi_heads.mask_head, nn.GroupNorm) == 4
    assert count(model.rpn, nn.GroupNorm) == 0 and count(model.rpn, BN_TYPES) == 0
    assert count(model, BN_TYPES) == 0 and count(model, FrozenBatchNorm2d) == 0
    assert all(m.num_groups == 32 for m in model.modules() if isinstance(m, nn.GroupNorm))


def test_frozen_bn_only_in_body():
    model, _ = build_model(small_cfg(backbone="R18", norm="FrozenBN"), NUM_CLASSES)
    assert count(model.backbone.body, FrozenBatchNorm2d) == 20
    assert count(model, (nn.GroupNorm, *BN_TYPES)) == 0
    assert count(model, FrozenBatchNorm2d) == 20


def test_syncbn_everywhere():
    model, _ = build_model(small_cfg(backbone="R18", norm="SyncBN"), NUM_CLASSES)
    assert count(model.backbone.body, nn.SyncBatchNorm) == 20
    assert count(model.backbone.fpn, nn.SyncBatchNorm) == 8
    assert count(model.roi_heads, nn.SyncBatchNorm) == 8
    assert count(model.rpn, nn.SyncBatchNorm) == 0


@pytest.mark.parametrize("norm", ["GN", "BN", "SyncBN", "FrozenBN"])
def test_norm_parameters_cover_exactly_norm_affines(norm):
    model, _ = build_model(small_cfg(backbone="R18", norm=norm), NUM_CLASSES)
    expected = {
        id(p) for m in model.modules() if isinstance(m, (nn.GroupNorm, *BN_TYPES))
        for p in (m.weight, m.bias)
    }
    got = norm_parameters(model)
    assert got == expected
    assert (len(got) > 0) == (norm != "FrozenBN")
    named = {id(p) for n, p in model.named_parameters() if is_norm_param(n, model)}
    assert named == expected


def test_norm_factory():
    gn = norm_factory("GN")(64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32 and gn.num_channels == 64
    assert type(norm_factory("BN")(8)) is nn.BatchNorm2d
    assert type(norm_factory("SyncBN")(8)) is nn.SyncBatchNorm
    assert type(norm_factory("FrozenBN")(8)) is FrozenBatchNorm2d
    with pytest.raises(InitError):
        norm_factory("LN")


def test_gn_needs_channels_divisible_by_32():
    with pytest.raises(InitError, match="fpn_channels"):
        build_model(small_cfg(backbone="R18", norm="GN", fpn_channels=48), NUM_CLASSES)


# ----------------------------------------------------------------------------------------------
# Initialization


def test_imagenet_bn_weights_into_gn_need_an_explicit_frozen_bn_body(weight_files):
    path = weight_files("R18", "BN")
    state = torch.load(path, map_location="cpu", weights_only=True)
    with pytest.raises(InitError, match="BatchNorm-trained .*body_norm is GN"):  # never a silent switch
        build_model(small_cfg(backbone="R18", norm="GN", init="imagenet", imagenet_weights=path), 3)
    cfg = small_cfg(backbone="R18", norm="GN", init="imagenet", imagenet_weights=path, body_norm="FrozenBN")
    model, resolved = build_model(cfg, 3)
    assert resolved.body_norm == "FrozenBN" and resolved.norm == "GN"
    body = model.backbone.body
    assert count(body, FrozenBatchNorm2d) == 20 and count(body, nn.GroupNorm) == 0
    assert count(model.backbone.fpn, nn.GroupNorm) == 8 and count(model.roi_heads, nn.GroupNorm) == 8
    assert torch.equal(body.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(body.layer2[0].bn1.running_var, state["layer2.0.bn1.running_var"])


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "FrozenBN"])
def test_imagenet_into_bn_family_loads_directly(norm, weight_files):
    path = weight_files("R18", "BN")
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = small_cfg(backbone="R18", norm=norm, init="imagenet", imagenet_weights=path)
    model, resolved = build_model(cfg, 3)
    assert resolved.body_norm == norm
    assert torch.equal(model.backbone.body.bn1.running_mean, state["bn1.running_mean"])
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])


def test_gn_checkpoint_into_gn_loads_directly(weight_files):
    path = weight_files("R18", "GN")
    state = torch.load(path, map_location="cpu", weights_only=True)["backbone"]
    model, resolved = build_model(small_cfg(backbone="R18", norm="GN", init=f"checkpoint:{path}"), 3)
    assert resolved.body_norm == "GN"
    got = model.backbone.body.layer4[0].downsample[1].weight
    assert torch.equal(got, state["layer4.0.downsample.1.weight"])


def test_missing_imagenet_weights_names_file_and_places(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    with pytest.raises(InitError) as info:
        build_model(small_cfg(backbone="R50", init="imagenet", body_norm="FrozenBN"), 3)
    msg = str(info.value)
    assert "\n" not in msg
    assert "resnet50-0676ba61.pth" in msg
    assert str(hub / "checkpoints") in msg
    assert "model.imagenet_weights" in msg
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in msg


def test_imagenet_weights_found_in_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    target = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir()
    target.write_bytes(b"")
    assert find_imagenet_weights("R18", None) == target
    with pytest.raises(InitError, match="not found"):
        find_imagenet_weights("R18", tmp_path / "nope.pth")


def test_missing_checkpoint_names_path(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(InitError, match=re.escape(str(path))):
        build_model(small_cfg(backbone="R18", init=f"checkpoint:{path}"), 3)


def test_unreadable_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(InitError, match="cannot read"):
        build_model(small_cfg(backbone="R18", init=f"checkpoint:{path}"), 3)


def test_wrong_architecture_checkpoint(tmp_path, weight_files):
    path = weight_files("R50", "BN")
    with pytest.raises(InitError, match="wrong architecture") as info:
        build_model(small_cfg(backbone="R18", norm="BN", init=f"checkpoint:{path}"), 3)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unrelated_state_dict_is_rejected():
    body = build_resnet("R18", "BN")
    state = {"encoder.weight": torch.zeros(3), "decoder.bias": torch.zeros(3)}
    with pytest.raises(InitError, match="wrong architecture: src.pth"):
        load_backbone_weights(body, state, "src.pth")


def test_bn_checkpoint_into_gn_needs_an_explicit_frozen_bn_body(weight_files):
    path = weight_files("R18", "BN")
    with pytest.raises(InitError, match="set model.body_norm: FrozenBN"):
        build_model(small_cfg(backbone="R18", norm="GN", init=f"checkpoint:{path}"), 3)
    _, resolved = build_model(small_cfg(backbone="R18", norm="GN", init=f"checkpoint:{path}", body_norm="FrozenBN"), 3)
    assert resolved.body_norm == "FrozenBN"


def test_gn_checkpoint_into_bn_is_rejected(weight_files):
    path = weight_files("R18", "GN")
    with pytest.raises(InitError, match="running statistics"):
        build_model(small_cfg(backbone="R18", norm="BN", init=f"checkpoint:{path}"), 3)


def test_partial_and_prefixed_checkpoint_reports_missing(caplog):
    src = build_resnet("R18", "GN")
    state = {f"module.backbone.body.{k}": v for k, v in src.state_dict().items()}
    dropped = ["layer4.1.conv2.weight", "layer4.1.bn2.weight"]
    for key in dropped:
        del state[f"module.backbone.body.{key}"]
    state["module.backbone.body.extra.weight"] = torch.zeros(2)
    state["module.roi_heads.box_head.0.weight"] = torch.zeros(2)  # outside the prefix: ignored
    body = build_resnet("R18", "GN")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        report = load_backbone_weights(body, state, "part.pth")
    assert report["missing"] == dropped
    assert report["unexpected"] == ["extra.weight"]
    assert report["loaded"] == len(src.state_dict()) - 2 - 2  # minus fc.weight/bias and the dropped
    assert any("missing" in r.getMessage() for r in caplog.records)
    assert torch.equal(body.layer2[0].conv1.weight, src.layer2[0].conv1.weight)


# ----------------------------------------------------------------------------------------------
# Freezing


@pytest.mark.parametrize("norm", ["GN", "BN"])
def test_freeze_at_2_freezes_stem_and_res2_only(norm):
    model, _ = build_model(small_cfg(backbone="R18", norm=norm, freeze_at=2), NUM_CLASSES)
    for name, param in model.named_parameters():
        frozen_stage = name.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"))
        assert param.requires_grad == (not frozen_stage), name
    if norm == "BN":
        # Frozen stages must not keep updating BN statistics in train mode.
        assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
        assert count(model.backbone.body.layer1, FrozenBatchNorm2d) == 4
        assert isinstance(model.backbone.body.layer2[0].bn1, nn.BatchNorm2d)


def test_freeze_at_0_freezes_nothing():
    model, _ = build_model(small_cfg(backbone="R18"), NUM_CLASSES)
    assert all(p.requires_grad for p in model.parameters())


def test_anchor_sizes_reach_the_rpn():
    cfg = ModelConfig(backbone="R18", fpn_channels=64, representation_size=64,
                      anchor_sizes=(8, 16, 32, 64, 128))
    model, _ = build_model(cfg, num_classes=3)
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
