"""ImageNet weight files for the ResNet body: format detection, strict mapping, pixel convention.

Owns reading a weights file whatever its format, recognised from its bytes, never from a flag:

- Detectron's `R-50-GN.pkl` / `R-101-GN.pkl`: a (Python 2) pickle whose `blobs` dict maps Caffe2
  blob names to numpy arrays. It is read with an unpickler that only rebuilds numpy arrays, so a
  hostile file cannot run code. Its network expects BGR pixels in 0-255 minus Detectron's own
  `PIXEL_MEANS` (std 1). The model then normalises its input with exactly those means (in RGB
  order, on the 0-1 scale: `pixel_normalisation("detectron")`), as detectron2's PIXEL_MEAN/PIXEL_STD
  do, and only the channel order is folded into `conv1`: the body sees Detectron's input exactly.
- torchvision / timm layout (`conv1`, `bn1`, `layer1.0.downsample.0`, ...), as a torch file (zip or
  legacy), a safetensors file, or the `backbone.pt` that `trainer.pretrain` writes. RGB convention.

Loading is strict: every tensor of the body must get a value of the right shape, and a file with
tensors the body does not have (another depth, another norm) is refused with one line. The
classifier (`fc.*`, `pred_*`) and optimizer state (`*_momentum`) are dropped.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from trainer.config import DETECTRON_GN, gn_download_hint  # noqa: F401 - re-exported
from trainer.config import file_sha256 as sha256
from trainer.errors import InitError

log = logging.getLogger(__name__)

# torchvision's input normalisation (GeneralizedRCNNTransform's default, and trainer.pretrain's).
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
# Detectron's (Caffe2) cfg.PIXEL_MEANS, BGR on 0-255, std 1: what its ImageNet models were trained on.
# Not 255 x RGB_MEAN (103.53, 116.28, 123.675): they differ by 0.3-0.9 grey levels.
DETECTRON_PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)
CONVENTIONS = {"BGR255": "detectron", "RGB": "torchvision"}  # a file's convention -> model.pixel_convention


def pixel_normalisation(convention: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(image_mean, image_std) of the detector's transform, on its 0-1 RGB input, for a convention.

    "detectron": (x - mean / 255) / (1 / 255) = 255 x - mean, Detectron's input in RGB order.
    """
    if convention == "detectron":
        return tuple(m / 255.0 for m in reversed(DETECTRON_PIXEL_MEANS_BGR)), (1.0 / 255.0,) * 3
    return RGB_MEAN, RGB_STD
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a non-zip torch.save file
_DROPPED_BLOB = re.compile(r"(_momentum$|^pred_|^fc1000_|^fc_)")
_BODY_BLOB = re.compile(r"^(conv1_|res_conv1_|res\d+_)")


@dataclass(frozen=True)
class WeightsFile:
    """A weights file read into torchvision-layout tensors (before the body check)."""

    path: Path
    fmt: str  # "detectron" | "torch" | "safetensors"
    tensors: dict[str, Tensor]
    convention: str  # "BGR255" (Detectron) or "RGB" (torchvision normalisation)
    dropped: int  # classifier / optimizer entries left out


# ----------------------------------------------------------------------------------------------
# Reading: format from the file's first bytes


def sniff(path: Path) -> str:
    """'torch' (zip), 'pickle', 'safetensors', or 'unknown', from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < 1 << 30:
        return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


class _NumpyOnly(pickle.Unpickler):
    """Rebuilds dicts, lists, strings and numpy arrays; refuses every other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core", 1) if _has_numpy_core2() else module
        return super().find_class(module, name)


def _has_numpy_core2() -> bool:
    import numpy

    return hasattr(numpy, "_core")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_weights(path: str | Path) -> WeightsFile:
    """Read a weights file into torchvision-layout tensors, whatever its format; InitError otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InitError(f"weights file not found: {path}")
    kind = sniff(path)
    if kind == "torch":
        return _from_state(path, "torch", _torch_load(path))
    if kind == "safetensors":
        return _from_state(path, "safetensors", _read_safetensors(path))
    if kind == "pickle":
        try:
            with open(path, "rb") as fh:
                obj = _NumpyOnly(fh, encoding="latin1").load()
        except Exception as exc:  # noqa: BLE001 - any unreadable pickle becomes one line
            raise InitError(f"cannot read weights file {path}: not a Detectron pickle of numpy arrays "
                            f"({_first_line(exc)})") from None
        if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:  # torch.save without the zip container
            return _from_state(path, "torch", _torch_load(path))
        if isinstance(obj, Mapping) and isinstance(obj.get("blobs"), Mapping):
            return _from_detectron(path, obj["blobs"])
        if isinstance(obj, Mapping) and any(isinstance(k, str) and _BODY_BLOB.match(k) for k in obj):
            return _from_detectron(path, obj)  # the blobs dict pickled on its own, as some converters write it
        raise InitError(f"cannot use weights file {path}: a pickle without a 'blobs' dict (Detectron's format)")
    raise InitError(f"cannot read weights file {path}: not a Detectron pickle, a torch file or a safetensors file")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message recommends weights_only=False; we never load arbitrary objects.
        raise InitError(f"cannot read weights file {path}: it holds Python objects besides tensors, which are "
                        "never loaded; save a plain state dict (torch.save(model.state_dict(), ...))") from None
    except Exception as exc:  # noqa: BLE001
        raise InitError(f"cannot read weights file {path}: {_first_line(exc)}") from None


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32}


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + size])
        base = 8 + size
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            flat = torch.frombuffer(bytearray(raw[base + start:base + end]), dtype=_ST_DTYPES[info["dtype"]])
            out[name] = flat.reshape(info["shape"]).clone()
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InitError(f"cannot read safetensors file {path}: {_first_line(exc)}") from None
    return out


def _from_state(path: Path, fmt: str, obj: Any) -> WeightsFile:
    for key in ("backbone", "model", "state_dict"):  # trainer.pretrain's file, other trainers' wrappers
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise InitError(f"weights file {path} holds no state dict (expected tensors, or a 'backbone' entry)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    kept = {k: v for k, v in tensors.items() if not _drop_torch_key(k)}
    return WeightsFile(path, fmt, kept, "RGB", len(tensors) - len(kept))


def _drop_torch_key(key: str) -> bool:
    """The classifier (fc.*) and BN's step counter, which no body here uses."""
    parts = key.split(".")
    return (len(parts) >= 2 and parts[-2] == "fc") or key.endswith("num_batches_tracked")


# ----------------------------------------------------------------------------------------------
# Detectron (Caffe2) names


def caffe2_name(key: str) -> str | None:
    """torchvision key -> Detectron blob name ('layer1.0.bn2.weight' -> 'res2_0_branch2b_gn_s')."""
    norm_suffix = {"weight": "_gn_s", "bias": "_gn_b"}
    parts = key.split(".")
    if parts[0] == "conv1" and parts[1] == "weight":
        return "conv1_w"
    if parts[0] == "bn1":
        return "conv1" + norm_suffix[parts[1]]
    m = re.match(r"^layer(\d)$", parts[0])
    if not m or len(parts) < 4:
        return None
    stem = f"res{int(m.group(1)) + 1}_{parts[1]}"
    module, leaf = parts[2], parts[-1]
    if module == "downsample":
        return f"{stem}_branch1" + ("_w" if parts[3] == "0" else norm_suffix[leaf])
    branch = "abc"[int(module[-1]) - 1]
    return f"{stem}_branch2{branch}" + ("_w" if module.startswith("conv") else norm_suffix[leaf])


def _from_detectron(path: Path, blobs: Mapping[str, Any]) -> WeightsFile:
    """Blobs -> torch tensors under Caffe2 names; the body mapping happens against the body's keys."""
    import numpy as np

    kept, dropped = {}, 0
    for name, value in blobs.items():
        if _DROPPED_BLOB.search(name) or not isinstance(value, np.ndarray) or not _BODY_BLOB.match(name):
            dropped += 1
            continue
        kept[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if not kept:
        raise InitError(f"weights file {path}: its 'blobs' hold no ResNet blobs (conv1_w, res2_0_branch2a_w, ...)")
    return WeightsFile(path, "detectron", kept, "BGR255", dropped)


# ----------------------------------------------------------------------------------------------
# Mapping onto a body


def _is_bn_trained(names: list[str]) -> bool:
    return any(n.endswith(("running_mean", "running_var")) or "_bn_" in n for n in names)


def _strict_map(body_keys: Mapping[str, Tensor], file: WeightsFile) -> dict[str, Tensor]:
    """{body key: tensor} covering every body tensor with the right shape, or one refusing line."""
    src = file.tensors
    if file.fmt == "detectron":
        names = {k: caffe2_name(k) for k in body_keys}
        prefix = ""
    else:
        from trainer.modeling.backbone import _best_prefix

        prefix = _best_prefix(src.keys(), set(body_keys))
        names = {k: prefix + k for k in body_keys}
        src = {k: v for k, v in src.items() if k.startswith(prefix)}
    used = set(names.values())
    missing = [n for k, n in names.items() if n not in src]
    unexpected = [n for n in src if n not in used]
    if missing or unexpected:
        mismatch = _depth_mismatch(body_keys, file)
        if mismatch:
            raise InitError(f"weights file {file.path} ({file.fmt}) does not fit the body: {mismatch}")
        parts = []
        if missing:
            parts.append(f"{len(missing)} body tensors missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (first: {', '.join(unexpected[:3])})")
        raise InitError(f"weights file {file.path} ({file.fmt}) does not fit the body: {'; '.join(parts)}")
    out = {}
    for key, name in names.items():
        want, got = tuple(body_keys[key].shape), tuple(src[name].shape)
        if want != got:
            raise InitError(f"weights file {file.path} ({file.fmt}) does not fit the body: {name} has shape "
                            f"{got}, the body's {key} expects {want}")
        out[key] = src[name]
    return out


def fold_bgr_into_conv1(weight: Tensor) -> Tensor:
    """conv1 weights of a net fed BGR -> the same net fed RGB: W'[:, c] = W[:, 2 - c].

    Only the channel order: the mean and scale are the model's input normalisation
    (`pixel_normalisation("detectron")`), so nothing is approximated.
    """
    return weight.flip(1)


def _depth_mismatch(body_keys: Iterable[str], file: WeightsFile) -> str | None:
    """'depth mismatch: ...' when the file's blocks per stage differ from the body's, else None."""
    def blocks(names: Iterable[str], pattern: str) -> tuple[int, ...]:
        found: dict[int, int] = {}
        for name in names:
            m = re.search(pattern, name)
            if m:
                found[int(m.group(1))] = max(found.get(int(m.group(1)), 0), int(m.group(2)) + 1)
        return tuple(found.get(k, 0) for k in sorted(found))

    body = blocks(body_keys, r"(?:^|\.)layer(\d)\.(\d+)\.")
    theirs = blocks(file.tensors, r"^res(\d)_(\d+)_" if file.fmt == "detectron" else r"(?:^|\.)layer(\d)\.(\d+)\.")
    depth = {(2, 2, 2, 2): "R-18", (3, 4, 6, 3): "R-34 or R-50", (3, 4, 23, 3): "R-101", (3, 8, 36, 3): "R-152"}
    if body == theirs or theirs not in depth:  # a file missing a block is not another depth
        return None
    return (f"depth mismatch: the file has {'/'.join(map(str, theirs))} blocks per stage ({depth[theirs]}), "
            f"model.backbone has {'/'.join(map(str, body))} ({depth.get(body, '?')})")


def load_imagenet_weights(body: nn.Module, path: str | Path, body_norm: str) -> dict[str, Any]:
    """Strictly load ImageNet weights into a torchvision ResNet `body` whose norm is `body_norm`.

    Returns {format, mapped, dropped, sha256, convention}; `convention` ("detectron" or
    "torchvision") is the input normalisation the loaded body needs (`pixel_normalisation`).
    """
    file = read_weights(path)
    bn_file = _is_bn_trained(list(file.tensors))
    if body_norm == "GN" and bn_file:
        raise InitError(f"weights file {file.path} is BatchNorm-trained ({file.fmt}) but model.body_norm is GN: "
                        "give GroupNorm weights (e.g. Detectron's R-50-GN.pkl), or set model.body_norm: FrozenBN")
    if body_norm != "GN" and not bn_file:
        raise InitError(f"weights file {file.path} has no BatchNorm statistics (GroupNorm-trained?) but "
                        f"model.body_norm is {body_norm}: use it with model.norm: GN")
    own = {k: v for k, v in body.state_dict().items() if not _drop_torch_key(k)}
    mapped = _strict_map(own, file)
    if file.convention == "BGR255":
        mapped["conv1.weight"] = fold_bgr_into_conv1(mapped["conv1.weight"])
    body.load_state_dict(mapped, strict=False)
    digest = sha256(file.path)
    log.info("ImageNet weights %s: %s format, %d body tensors mapped, %d classifier/optimizer entries dropped, "
             "%s; sha256 %s", file.path, file.fmt, len(mapped), file.dropped,
             "Detectron's pixel means (BGR 0-255, std 1) in the input normalisation, channel order folded into "
             "conv1" if file.convention == "BGR255" else "torchvision's pixel convention", digest)
    return {"format": file.fmt, "mapped": len(mapped), "dropped": file.dropped, "sha256": digest,
            "convention": CONVENTIONS[file.convention]}
