"""ResNet trunks, normalization choice, stage freezing and backbone weight loading.

Owns everything about the ResNet body that detection (`trainer.modeling.model`) and backbone pretraining
share: the norm layer factory, the torchvision ResNet builder, finding torchvision's ImageNet weight
files in the local hub cache (never downloading), loading a backbone state dict with prefix
tolerance and architecture checks, freezing the first stages, and the set of norm parameters (which
the optimizer keeps out of weight decay).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from trainer.errors import InitError

log = logging.getLogger(__name__)

GN_GROUPS = 32  # the paper's (and Detectron's) GroupNorm group count

_RESNETS = {
    "R18": ("resnet18", "ResNet18_Weights"),
    "R34": ("resnet34", "ResNet34_Weights"),
    "R50": ("resnet50", "ResNet50_Weights"),
    "R101": ("resnet101", "ResNet101_Weights"),
}

# Stage names of a torchvision ResNet, in the order freeze_at counts them (1 = stem).
STAGES: tuple[tuple[str, ...], ...] = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """A callable C -> norm layer; picklable (no lambdas) so models can be deep-copied or pickled."""
    if norm == "GN":
        return functools.partial(nn.GroupNorm, GN_GROUPS)
    if norm == "SyncBN":
        # Without an initialized process group SyncBatchNorm falls back to plain BN, so one CPU
        # process works; the trainer converts nothing.
        return nn.SyncBatchNorm
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    raise InitError(f"unknown norm {norm!r} (expected GN, SyncBN, BN or FrozenBN)")


def _resnet_names(backbone: str) -> tuple[str, str]:
    if backbone not in _RESNETS:
        raise InitError(f"unknown backbone {backbone!r} (expected one of {', '.join(_RESNETS)})")
    return _RESNETS[backbone]


def build_resnet(backbone: str, norm: str) -> torchvision.models.ResNet:
    """A randomly initialized torchvision ResNet (fc kept) with `norm` layers.

    torchvision's own init: kaiming-normal fan_out convs, norm weight 1 / bias 0, no zero-init of
    the last norm of a block (the paper's from-scratch init is the standard one).
    """
    fn_name, _ = _resnet_names(backbone)
    return getattr(torchvision.models, fn_name)(weights=None, norm_layer=norm_factory(norm))


def imagenet_weights_info(backbone: str) -> tuple[str, str]:
    """(file name in the hub cache, download URL) of torchvision's IMAGENET1K_V1 weights."""
    _, enum_name = _resnet_names(backbone)
    url = getattr(torchvision.models, enum_name).IMAGENET1K_V1.url
    return url.rsplit("/", 1)[-1], url


def find_imagenet_weights(backbone: str, explicit: Path | None, body_norm: str = "BN") -> Path:
    """The local ImageNet weight file: `explicit` if given, else torch hub's checkpoints cache (BN only)."""
    from trainer.config import gn_download_hint

    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            hint = gn_download_hint(backbone) if body_norm == "GN" else imagenet_weights_info(backbone)[1]
            raise InitError(f"model.imagenet_weights file not found: {path} (get {hint})")
        return path
    if body_norm == "GN":
        raise InitError(f"model.imagenet_weights is required for a GN body: {gn_download_hint(backbone)}")
    file_name, url = imagenet_weights_info(backbone)
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    path = hub_dir / file_name
    if path.is_file():
        return path
    raise InitError(
        f"ImageNet weights for {backbone} not found: put {file_name} into {hub_dir}/ "
        f"or set model.imagenet_weights=/path/to/{file_name}; the trainer never downloads: "
        f"fetch it on a machine with internet from {url}"
    )


def read_state_file(path: Path) -> dict[str, Tensor]:
    """A backbone state dict from a torch/safetensors file: bare, or under "backbone" (pretraining's)."""
    from trainer.modeling.imagenet_weights import read_weights

    path = Path(path).expanduser()
    if not path.is_file():
        raise InitError(f"init checkpoint not found: {path}")
    file = read_weights(path)
    if file.fmt == "detectron":
        raise InitError(f"{path} is a Detectron pickle: use it as model.init: imagenet with "
                        f"model.imagenet_weights: {path}")
    return file.tensors


def has_bn_statistics(state: Mapping[str, Tensor]) -> bool:
    """True for BN-trained weights (running statistics present); GN-trained files have none."""
    return any(k.endswith("running_mean") for k in state)


def _best_prefix(keys: Iterable[str], targets: set[str]) -> str:
    """The prefix ("", "module.", "backbone.body.", ...) under which most keys hit `targets`."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in targets:
                prefix = ".".join(parts[:i]) + ("." if i else "")
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    return max(counts, key=lambda p: (counts[p], -len(p))) if counts else ""


def _skip(key: str) -> bool:
    # fc belongs to classification only; num_batches_tracked is bookkeeping FrozenBN does not keep.
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def load_backbone_weights(body: nn.Module, state: Mapping[str, Tensor], source: str) -> dict:
    """Load a ResNet state dict into `body` (a ResNet or FPN's IntermediateLayerGetter body).

    Accepts a common prefix ("module.", "body.", "backbone.body.", ...), ignores fc.*, and refuses
    checkpoints of another architecture: any shape mismatch, fewer than half of the body's tensors
    matched, or BN statistics that do not fit the body's norm.
    """
    own = {k: v for k, v in body.state_dict().items() if not _skip(k)}
    prefix = _best_prefix(state.keys(), set(own))
    stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = len(state) - len(stripped)
    stripped = {k: v for k, v in stripped.items() if not _skip(k)}
    for key, value in stripped.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise InitError(
                f"checkpoint of the wrong architecture: {source}: {prefix}{key} has shape "
                f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    matched = [k for k in own if k in stripped]
    missing = [k for k in own if k not in stripped]
    unexpected = [k for k in stripped if k not in own]
    if len(matched) * 2 < len(own):
        example = f"; e.g. missing {missing[0]}" if missing else ""
        raise InitError(
            f"checkpoint of the wrong architecture: {source}: only {len(matched)} of the backbone's "
            f"{len(own)} tensors found{example}"
        )
    _check_norm_kind(own, stripped, source)
    body.load_state_dict({k: stripped[k] for k in matched}, strict=False)
    if missing:
        log.warning("init from %s: %d backbone tensors missing (left at init): %s", source, len(missing),
                    missing)
    if unexpected:
        log.warning("init from %s: %d unexpected tensors ignored: %s", source, len(unexpected), unexpected)
    if outside:
        log.info("init from %s: %d tensors outside prefix %r ignored", source, outside, prefix)
    log.info("init from %s: loaded %d backbone tensors (prefix %r)", source, len(matched), prefix)
    return {"missing": missing, "unexpected": unexpected, "loaded": len(matched)}


def _check_norm_kind(own: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str) -> None:
    """BN weights into a GN body (or GN weights into a BN body) would load silently but be wrong."""
    body_bn, file_bn = has_bn_statistics(own), has_bn_statistics(state)
    if body_bn and not file_bn:
        raise InitError(
            f"checkpoint {source} has no BN running statistics (GN-trained?) but the backbone uses "
            f"batch norm; use model.norm=GN for it"
        )
    if file_bn and not body_bn:
        raise InitError(
            f"checkpoint {source} is BN-trained (running statistics) but the backbone has no batch "
            f"norm; set model.body_norm: FrozenBN (or another BN variant) to use it"
        )


def _to_frozen_bn(module: nn.Module) -> nn.Module:
    """Replace BN/SyncBN children by FrozenBatchNorm2d carrying the same statistics and affine."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = _to_frozen_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def freeze_stages(body: nn.Module, freeze_at: int) -> int:
    """Freeze the first `freeze_at` stages (1 = stem, 2 = stem + res2, ...); returns params frozen.

    Same selection as torchvision's trainable_layers = 5 - freeze_at. Like detectron2, BN layers
    inside frozen stages become FrozenBN, else train mode would keep updating their statistics.
    """
    frozen = 0
    for names in STAGES[:freeze_at]:
        for name in names:
            child = getattr(body, name, None)
            if child is None:
                continue
            new = _to_frozen_bn(child)
            if new is not child:
                setattr(body, name, new)
            for param in new.parameters():
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


NORM_TYPES = (nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LayerNorm)


def norm_parameters(model: nn.Module) -> set[int]:
    """ids of the affine parameters of GroupNorm / BatchNorm / SyncBN (/LayerNorm) layers."""
    return {
        id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)
    }


def is_norm_param(name: str, module: nn.Module) -> bool:
    """Whether parameter `name` (dotted, as in named_parameters) of `module` is a norm parameter."""
    owner_name, _, _ = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return isinstance(owner, NORM_TYPES)
