"""GN ImageNet weights through `model.imagenet_weights`: Detectron's pickle and torchvision/timm layout.

The source network is a seeded GN ResNet-50 treated as the pretrained one. Written as Detectron writes
it (Caffe2 blob names, BGR 0-255 minus mean convention) or as a torchvision/timm state dict, loaded
through `build_model`, the detector's body must compute the source network's feature maps on the same
image, each side fed its own pixel convention.
"""

from __future__ import annotations

import pickle
import struct
import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import tiny_config
from trainer.__main__ import main
from trainer.modeling.backbone import build_resnet
from trainer.config import ModelConfig
from trainer.errors import ConfigError, InitError
from trainer.modeling.imagenet_weights import RGB_MEAN, RGB_STD, caffe2_name, pixel_normalisation, sha256
from trainer.modeling.model import build_model

SMALL = dict(min_size=64, max_size=64, fpn_channels=64, representation_size=64)
# Detectron's (Caffe2) cfg.PIXEL_MEANS, written out here rather than imported: its R-50-GN.pkl was
# trained on BGR 0-255 minus these, std 1. (detectron2's 103.530, 116.280, 123.675 = 255 x torchvision's.)
DETECTRON_MEAN_BGR = (102.9801, 115.9465, 122.7717)
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def seeded_gn_resnet(backbone: str = "R50", seed: int = 0) -> nn.Module:
    """A GN ResNet with random convs and random (not 1/0) GN affines, so a mis-mapped norm shows."""
    torch.manual_seed(seed)
    net = build_resnet(backbone, "GN")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    return net.eval()


def detectron_blobs(net: nn.Module) -> dict[str, np.ndarray]:
    """Detectron's blob names, written from the network's structure (not from the loader's rules)."""
    blobs = {"conv1_w": net.conv1.weight, "conv1_gn_s": net.bn1.weight, "conv1_gn_b": net.bn1.bias}
    for stage, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=2):
        for i, block in enumerate(layer):
            for letter, k in zip("abc", (1, 2, 3)):
                conv, gn = getattr(block, f"conv{k}", None), getattr(block, f"bn{k}", None)
                if conv is None:
                    continue
                name = f"res{stage}_{i}_branch2{letter}"
                blobs.update({f"{name}_w": conv.weight, f"{name}_gn_s": gn.weight, f"{name}_gn_b": gn.bias})
            if block.downsample is not None:
                name = f"res{stage}_{i}_branch1"
                conv, gn = block.downsample
                blobs.update({f"{name}_w": conv.weight, f"{name}_gn_s": gn.weight, f"{name}_gn_b": gn.bias})
    out = {k: v.detach().numpy().copy() for k, v in blobs.items()}
    # What else Detectron's files carry: SGD momentum per blob and the ImageNet classifier.
    out.update({f"{k}_momentum": np.zeros_like(v) for k, v in list(out.items())[:5]})
    out["pred_w"] = np.zeros((1000, 2048), np.float32)
    out["pred_b"] = np.zeros(1000, np.float32)
    return out


def write_detectron(path, blobs) -> None:
    with open(path, "wb") as fh:
        pickle.dump({"blobs": blobs}, fh, protocol=2)  # Detectron (Python 2) wrote protocol 2


def photo(seed: int = 1, size: int = 64) -> torch.Tensor:
    """A smooth RGB image in [0, 1] with 8-bit levels, like a decoded photo."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=g)
    img = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (img * 255).round() / 255


def source_features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    feats = []
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
            feats.append(x)
    return feats


def detector_features(model, image: torch.Tensor) -> list[torch.Tensor]:
    """The detector's body on `image` as the detector feeds it (its own transform: RGB, mean/std)."""
    model.eval()
    with torch.no_grad():
        batch, _ = model.transform([image])
        assert batch.tensors.shape[-2:] == image.shape[-2:]  # no resize / padding at 64 px
        return list(model.backbone.body(batch.tensors).values())


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def gn_cfg(path, backbone="R50", **kw) -> ModelConfig:
    return ModelConfig(backbone=backbone, norm="GN", init="imagenet", imagenet_weights=path, **SMALL, **kw)


@pytest.fixture(scope="module")
def source():
    return seeded_gn_resnet("R50")


# ----------------------------------------------------------------------------------------------
# Same features as the source network


def test_detectron_pickle_gives_the_source_features(source, tmp_path, caplog):
    path = tmp_path / "R-50-GN.pkl"
    write_detectron(path, detectron_blobs(source))
    with caplog.at_level("INFO", logger="trainer"):
        model, resolved = build_model(gn_cfg(path), 3)
    assert resolved.body_norm == "GN" and resolved.pixel_convention == "detectron"
    assert resolved.imagenet_weights_sha256 == sha256(path)  # recorded in the run's config.yaml
    mean, std = pixel_normalisation("detectron")
    assert tuple(model.transform.image_mean) == mean and tuple(model.transform.image_std) == std
    assert [round(m * 255, 4) for m in reversed(mean)] == list(DETECTRON_MEAN_BGR)
    image = photo()
    bgr255 = image.flip(0) * 255 - torch.tensor(DETECTRON_MEAN_BGR).view(3, 1, 1)  # Detectron's input
    want = source_features(source, bgr255[None])
    got = detector_features(model, image)
    diff = max_diff(got, want)
    print(f"max feature difference (Detectron pickle, R50, Detectron's PIXEL_MEANS): {diff:.3g}")
    assert diff < TOL
    # Not vacuous: without the convention the features are far off; and the former fold (the mean
    # taken as 255 x torchvision's, 0.3-0.9 grey levels off Detectron's) misses by more than TOL.
    naive = source_features(source, ((image - torch.tensor(RGB_MEAN).view(3, 1, 1))
                                     / torch.tensor(RGB_STD).view(3, 1, 1))[None])
    assert max_diff(naive, want) > 100 * TOL
    former = source_features(source, (image.flip(0) * 255 - 255 * torch.tensor(RGB_MEAN).flip(0).view(3, 1, 1))[None])
    print(f"max feature difference of the former fold: {max_diff(former, want):.3g}")
    assert max_diff(former, want) > TOL
    summary = [r.getMessage() for r in caplog.records if "body tensors mapped" in r.getMessage()]
    assert len(summary) == 1 and "detectron format, 159 body tensors mapped" in summary[0]
    assert "sha256" in summary[0]


def test_bare_blobs_pickle_loads_too(source, tmp_path):
    """Some converters pickle the blobs dict without Detectron's {"blobs": ...} wrapper."""
    with open(tmp_path / "bare.pkl", "wb") as fh:
        pickle.dump(detectron_blobs(source), fh, protocol=2)
    model, _ = build_model(gn_cfg(tmp_path / "bare.pkl"), 3)
    assert torch.equal(model.backbone.body.layer4[2].bn3.weight, source.layer4[2].bn3.weight)


def test_torchvision_layout_gn_state_dict_gives_the_source_features(source, tmp_path):
    path = tmp_path / "resnet50_gn.pth"
    torch.save(source.state_dict(), path)  # timm / torchvision layout, fc included
    model, resolved = build_model(gn_cfg(path), 3)
    image = photo(2)
    norm = (image - torch.tensor(RGB_MEAN).view(3, 1, 1)) / torch.tensor(RGB_STD).view(3, 1, 1)
    diff = max_diff(detector_features(model, image), source_features(source, norm[None]))
    print(f"max feature difference (torchvision layout, R50): {diff:.3g}")
    assert diff < TOL


def test_safetensors_gn_state_dict_loads(source, tmp_path):
    """timm's hub files are safetensors: header length, JSON header, raw little-endian data."""
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    header, chunks, offset = {}, [], 0
    for name, t in state.items():
        raw = t.numpy().tobytes()
        dtype = {torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(chunks))
    model, _ = build_model(gn_cfg(path), 3)
    assert torch.equal(model.backbone.body.layer3[4].bn2.bias, source.layer3[4].bn2.bias)


def test_legacy_torch_file_loads(tmp_path):
    """torch.save without the zip container (older torchvision / timm files) is a pickle too."""
    src = seeded_gn_resnet("R18")
    torch.save(src.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    model, _ = build_model(gn_cfg(tmp_path / "legacy.pth", backbone="R18"), 3)
    assert torch.equal(model.backbone.body.layer2[1].bn1.bias, src.layer2[1].bn1.bias)


def test_mapped_tensor_counts_r50_r101():
    """Every body tensor has its own Detectron blob: 53 convs + 53 GN x 2 (R50), 104 + 104 x 2 (R101)."""
    counts = {}
    for backbone in ("R50", "R101"):
        with torch.device("meta"):
            keys = [k for k in build_resnet(backbone, "GN").state_dict() if not k.startswith("fc.")]
        names = [caffe2_name(k) for k in keys]
        assert len(set(names)) == len(names) and None not in names
        assert sum(n.endswith("_w") for n in names) * 3 == len(names)
        counts[backbone] = len(names)
    assert counts == {"R50": 159, "R101": 312}


# ----------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, never torch's weights_only hint


@pytest.fixture
def base(synth_root, tmp_path):
    cfg = tiny_config(synth_root, tmp_path / "out")
    cfg["model"]["init"] = "imagenet"
    return cfg


def _refused(capsys, tmp_path, cfg, match: str) -> str:
    import yaml

    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["--config", str(path)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert "weights_only" not in err and "Traceback" not in err
    return lines[0]


def test_refuses_a_pickle_missing_one_block(capsys, tmp_path, base):
    blobs = detectron_blobs(seeded_gn_resnet("R18"))
    blobs = {k: v for k, v in blobs.items() if not k.startswith("res4_1_")}
    write_detectron(tmp_path / "r18.pkl", blobs)
    base["model"]["imagenet_weights"] = str(tmp_path / "r18.pkl")
    line = _refused(capsys, tmp_path, base, "6 body tensors missing")
    assert "res4_1_branch2a_w" in line


def test_refuses_a_bn_file_for_gn(capsys, tmp_path, base):
    torch.save(build_resnet("R18", "BN").state_dict(), tmp_path / "resnet18-bn.pth")
    base["model"]["imagenet_weights"] = str(tmp_path / "resnet18-bn.pth")
    line = _refused(capsys, tmp_path, base, "BatchNorm-trained")
    assert "body_norm" in line


def test_refuses_a_non_pickle_file(capsys, tmp_path, base):
    (tmp_path / "R-50-GN.pkl").write_text("<html>404 Not Found</html>\n")  # a failed download
    base["model"]["imagenet_weights"] = str(tmp_path / "R-50-GN.pkl")
    _refused(capsys, tmp_path, base, "not a Detectron pickle, a torch file or a safetensors file")


def test_refuses_a_torch_file_with_python_objects(capsys, tmp_path, base):
    torch.save({"model": build_resnet("R18", "GN").state_dict(), "args": ConfigError("x")}, tmp_path / "obj.pth")
    base["model"]["imagenet_weights"] = str(tmp_path / "obj.pth")
    _refused(capsys, tmp_path, base, "Python objects besides tensors")


def test_refuses_another_depth_and_a_mis_shaped_tensor(source, tmp_path):
    blobs = detectron_blobs(seeded_gn_resnet("R18"))
    write_detectron(tmp_path / "r18.pkl", blobs)
    with pytest.raises(InitError, match=r"does not fit the body: depth mismatch: the file has 2/2/2/2 blocks per "
                                        r"stage \(R-18\), model.backbone has 3/4/6/3") as info:
        build_model(gn_cfg(tmp_path / "r18.pkl"), 3)  # an R18 file for an R50 body
    assert "\n" not in str(info.value)
    write_detectron(tmp_path / "r50.pkl", detectron_blobs(source))
    with pytest.raises(InitError, match=r"depth mismatch: the file has 3/4/6/3 blocks per stage \(R-34 or R-50\), "
                                        r"model.backbone has 3/4/23/3 \(R-101\)"):
        build_model(gn_cfg(tmp_path / "r50.pkl", backbone="R101"), 3)  # the case: R101 asked, R50 file
    blobs = detectron_blobs(source)
    blobs["res3_2_branch2b_w"] = blobs["res3_2_branch2b_w"][:, :, :1, :1]
    write_detectron(tmp_path / "bad.pkl", blobs)
    with pytest.raises(InitError, match=r"res3_2_branch2b_w has shape \(128, 128, 1, 1\)"):
        build_model(gn_cfg(tmp_path / "bad.pkl"), 3)


def test_pixel_convention_and_sha256_must_agree_with_the_file(source, tmp_path):
    path = tmp_path / "R-50-GN.pkl"
    write_detectron(path, detectron_blobs(source))
    with pytest.raises(InitError, match="pixel_convention is torchvision but .* needs detectron"):
        build_model(gn_cfg(path, pixel_convention="torchvision"), 3)
    with pytest.raises(InitError, match=f"has sha256 {sha256(path)}, model.imagenet_weights_sha256 expects 00"):
        build_model(gn_cfg(path, imagenet_weights_sha256="00"), 3)
    _, resolved = build_model(gn_cfg(path, imagenet_weights_sha256=sha256(path)), 3)
    assert resolved.pixel_convention == "detectron"


def test_a_pickle_with_code_is_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            # eval, not print: a Ray test earlier in the same process swaps builtins.print for its own
            return (eval, ("1 + 1",))

    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"blobs": {"conv1_w": Evil()}}, fh, protocol=2)
    with pytest.raises(InitError, match=r"refusing to load (__builtin__|builtins)\.eval"):
        build_model(gn_cfg(tmp_path / "evil.pkl"), 3)


def test_imagenet_gn_without_weights_is_refused_at_validation():
    with pytest.raises(ValueError) as info:
        ModelConfig(backbone="R50", norm="GN", init="imagenet")
    msg = str(info.value)
    assert "model.imagenet_weights: weights/R-50-GN.pkl" in msg and "model.body_norm: FrozenBN" in msg
    assert "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/47261647/R-50-GN.pkl" in msg
    assert ModelConfig(norm="GN", init="imagenet", body_norm="FrozenBN").body_norm == "FrozenBN"
    assert ModelConfig(norm="GN").body_norm == "GN"


# ----------------------------------------------------------------------------------------------
# SyncBN arm: torchvision's BN weights into a SyncBN body, fine-tuned


def bn_weights_file(path, seed: int = 3):
    """torchvision's BN ResNet-18 layout (fc and num_batches_tracked included) with seeded values,
    running statistics too: the hub is out of reach, so the file is built here."""
    torch.manual_seed(seed)
    net = build_resnet("R18", "BN")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
                m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    torch.save(net.state_dict(), path)
    return net.state_dict()


def syncbn_cfg(path) -> ModelConfig:
    return ModelConfig(backbone="R18", norm="SyncBN", init="imagenet", imagenet_weights=path, **SMALL)


def _check_loaded(body: nn.Module, state: dict) -> None:
    syncs = [m for m in body.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == 20 and not any(isinstance(m, nn.GroupNorm) for m in body.modules())
    own = body.state_dict()
    for key in ("bn1.running_var", "layer2.0.downsample.1.running_mean", "layer4.1.bn2.weight", "conv1.weight"):
        assert torch.equal(own[key], state[key]), key


def test_syncbn_body_gets_torchvision_bn_weights_and_fine_tunes_them(tmp_path):
    from tests.trainer.modeling.test_model import batch

    state = bn_weights_file(tmp_path / "resnet18-bn.pth")
    model, resolved = build_model(syncbn_cfg(tmp_path / "resnet18-bn.pth"), 3)
    assert resolved.body_norm == "SyncBN"
    body = model.backbone.body
    _check_loaded(body, state)
    assert all(p.requires_grad for p in body.parameters())  # fine-tuned, not frozen
    before = {k: v.clone() for k, v in body.state_dict().items()}
    model.train()
    images, targets = batch(2, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sum(model(images, targets).values()).backward()
    opt.step()
    after = body.state_dict()
    # Without a process group SyncBN is BN: affine trained, running statistics updated from the batch.
    assert not torch.equal(after["layer1.0.bn1.weight"], before["layer1.0.bn1.weight"])
    assert not torch.equal(after["layer1.0.bn1.running_mean"], before["layer1.0.bn1.running_mean"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _syncbn_rank(rank: int, world: int, port: int, path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, _ = build_model(syncbn_cfg(path), 3)
        body = model.backbone.body
        _check_loaded(body, torch.load(path, weights_only=True))
        # Every rank holds the same body: the sum over ranks of each tensor is world x rank 0's.
        for key, value in body.state_dict().items():
            if value.is_floating_point():
                total = value.clone()
                dist.all_reduce(total)
                assert torch.allclose(total, value * world), key
        x = torch.linspace(-1, 1, 3 * 64 * 64).view(1, 3, 64, 64)
        with torch.no_grad():
            body.eval()  # eval mode uses the loaded running statistics, no synchronisation
            feats = [float(v.double().sum()) for v in body(x).values()]
        errors = []
        try:
            nn.parallel.DistributedDataParallel(model)
        except ValueError as exc:
            errors.append(str(exc))
        body.train()
        try:
            body(torch.cat([x, -x]))
        except ValueError as exc:
            errors.append(str(exc))
        torch.save({"feats": feats, "errors": errors}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_syncbn_weights_in_a_two_process_gloo_group(tmp_path):
    """As far as gloo on CPU goes: both ranks of a process group load the same weights into their SyncBN
    bodies and agree in eval mode. DDP around SyncBN and a synchronised training forward need CUDA
    (torch refuses both on CPU, checked here so the test notices when that changes)."""
    import torch.multiprocessing as mp

    bn_weights_file(tmp_path / "resnet18-bn.pth")
    out = str(tmp_path / "rank")
    mp.spawn(_syncbn_rank, args=(2, _free_port(), str(tmp_path / "resnet18-bn.pth"), out), nprocs=2)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert r0["feats"] == r1["feats"]
    assert len(r0["errors"]) == 2 and "GPU" in r0["errors"][0] and "GPU" in r0["errors"][1], r0["errors"]


def test_sha256_is_filled_in_at_validation_and_is_not_identity(source, tmp_path):
    from trainer.config import build_config, config_identity, config_to_dict, flatten

    path = tmp_path / "R-50-GN.pkl"
    write_detectron(path, detectron_blobs(source))
    cfg = build_config({"model": {"init": "imagenet", "imagenet_weights": str(path)}})
    assert flatten(config_to_dict(cfg))["model.imagenet_weights_sha256"] == sha256(path)  # the sweep's params
    missing = build_config({"model": {"init": "imagenet", "imagenet_weights": str(tmp_path / "absent.pkl")}})
    assert missing.model.imagenet_weights_sha256 is None
    assert config_identity(cfg) == config_identity(missing.model_copy(update={"model": missing.model.model_copy(
        update={"imagenet_weights": path})}))
